"""Prefill of several prompts in one call against one call each: what the engine's grouping of
requests admitted together (`Engine._prefill_groups`) saves.

    python -m benchmarks.prefill [--model smollm2-135m] [--batches 1,2,4,8,16] [--tokens 64]
                                 [--start 26] [--quant auto] [--rounds 5]

Runs the compiled prefill step directly (greedy) for b prompts of `--tokens` new tokens each,
after `--start` cached ones (what a chat prompt prefills after the template's shared prefix),
in one call per batch size b, and prints the best of `--rounds` calls (after one warm-up call
that compiles) with the time per prompt beside the time of b one-prompt calls.
"""

from __future__ import annotations

import argparse
import time

from tsjax.quants import QUANT_CHOICES, QUANT_HELP


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.prefill", description=__doc__)
    p.add_argument("--model", "-m", default=None)
    p.add_argument("--batches", default="1,2,4,8,16")
    p.add_argument("--tokens", type=int, default=64, help="new tokens per prompt")
    p.add_argument("--start", type=int, default=26, help="cached tokens before them")
    p.add_argument("--quant", choices=QUANT_CHOICES, default="auto", help=QUANT_HELP)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)

    from tsjax.model import load
    from tsjax.sampling import SamplingParams
    from tsjax.shapes import StepShapes

    batches = [int(x) for x in args.batches.split(",")]
    rows = max(batches)
    shapes = StepShapes.default(rows=rows, max_len=max(512, args.start + args.tokens))
    model = load(args.model, progress=False, shapes=shapes, quant=args.quant)
    steps, params = model.steps, model.params
    cache, sampler = steps.new_cache(), steps.new_sampler()

    def call(b: int) -> float:
        nonlocal cache, sampler
        prompts = [[5 + i] * args.tokens for i in range(b)]
        t = time.perf_counter()
        _, _, cache, sampler = steps.prefill(
            params, cache, sampler, prompts, list(range(b)), [SamplingParams.greedy()] * b,
            starts=[args.start] * b,
        )  # fmt: skip
        return time.perf_counter() - t

    print(
        f"{model.name}: prompts of {args.tokens} new tokens after {args.start} cached,"
        f" {args.quant} weights, best of {args.rounds}"
    )
    print("| prompts | one call, ms | ms per prompt | one call each, ms | ratio |")
    print("|---|---|---|---|---|")
    single = None
    for b in sorted({1, *batches}):
        call(b)  # compiles
        best = min(call(b) for _ in range(args.rounds))
        single = best if b == 1 else single
        assert single is not None
        print(
            f"| {b} | {best * 1e3:.1f} | {best / b * 1e3:.1f} | {single * b * 1e3:.1f} |"
            f" {single * b / best:.2f}x |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
