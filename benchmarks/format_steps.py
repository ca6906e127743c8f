"""The compiled steps per weight format, alternating in one process (issue 16's decision).

    python -m benchmarks.format_steps [--model smollm2-135m] [--quants f32,bf16,int8,q8,q4]
                                      [--rows 32] [--live 16] [--position 100] [--rounds 5]

Loads the model once per format (cache of `--rows` rows, 512 positions), then in each round
times, format after format: one decode step of 1 live row and of `--live` rows (4 steps per
dispatch, every row at `--position` tokens, greedy; what `benchmarks.decode` runs) and the
prefill of one 128-token prompt. Prints the best over `--rounds` rounds (the machine is shared:
only the alternation makes formats comparable) with the median beside it, and the params held.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import statistics
import time


def _decode_ms(model, cache, sampler, live: int, pos: int, n: int = 4) -> tuple[float, object]:
    import jax
    import jax.numpy as jnp

    steps, rows = model.steps, list(range(live))
    best = float("inf")
    for _ in range(3):
        cache = dataclasses.replace(cache, lengths=jnp.full_like(cache.lengths, pos))
        jax.block_until_ready(cache.lengths)
        t = time.perf_counter()
        _, _, cache, sampler = steps.decode(model.params, cache, sampler, rows, [0] * live, pos, n)
        best = min(best, (time.perf_counter() - t) / n)
    return best * 1e3, (cache, sampler)


def _prefill_ms(model, cache, sampler, prompt: list[int]) -> tuple[float, object]:
    from tsjax.sampling import SamplingParams

    best = float("inf")
    for _ in range(2):
        t = time.perf_counter()
        first, _, cache, sampler = model.steps.prefill(
            model.params, cache, sampler, [prompt], [0], [SamplingParams.greedy()]
        )
        best = min(best, time.perf_counter() - t)
    return best * 1e3, (cache, sampler)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.format_steps", description=__doc__)
    p.add_argument("--model", "-m", default=None)
    p.add_argument("--quants", default="f32,bf16,int8,q8,q4")
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--live", type=int, default=16)
    p.add_argument("--position", type=int, default=100)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)

    import jax

    from tsjax.model import load
    from tsjax.shapes import StepShapes

    shapes = StepShapes.default(rows=args.rows, max_len=512)
    quants = args.quants.split(",")
    models, state, held = {}, {}, {}
    for q in quants:
        t = time.perf_counter()
        m = load(args.model, progress=False, shapes=shapes, quant=None if q == "f32" else q)
        held[q] = sum(x.nbytes for x in jax.tree_util.tree_leaves(m.params)) / 1e6
        state[q] = (m.steps.new_cache(), m.steps.new_sampler())
        prompt = [(7 * i + 3) % m.config.vocab_size for i in range(args.prompt_tokens)]
        for live in (1, args.live):  # compile
            _, state[q] = _decode_ms(m, *state[q], live, args.position)
        _, state[q] = _prefill_ms(m, *state[q], prompt)
        models[q] = m
        print(f"{q}: loaded and compiled in {time.perf_counter() - t:.0f} s", flush=True)
        gc.collect()
    res = {(q, k): [] for q in quants for k in ("1", "live", "prefill")}
    for _ in range(args.rounds):
        for q in quants:
            m = models[q]
            ms, state[q] = _decode_ms(m, *state[q], 1, args.position)
            res[q, "1"].append(ms)
            ms, state[q] = _decode_ms(m, *state[q], args.live, args.position)
            res[q, "live"].append(ms)
            ms, state[q] = _prefill_ms(m, *state[q], prompt)
            res[q, "prefill"].append(ms)
    name = next(iter(models.values())).name
    print(f"\n{name}: {args.rows} cache rows, position {args.position}, best (median) of "
          f"{args.rounds} alternating rounds")  # fmt: skip
    print(f"| format | params MB | 1 row ms/step | {args.live} rows ms/step | {args.live} rows "
          f"tok/s | prefill {args.prompt_tokens} ms |\n|---|---|---|---|---|---|")  # fmt: skip

    def cell(q, k):
        return f"{min(res[q, k]):.1f} ({statistics.median(res[q, k]):.1f})"

    for q in quants:
        tok_s = args.live / min(res[q, "live"]) * 1e3
        print(f"| {q} | {held[q]:.0f} | {cell(q, '1')} | {cell(q, 'live')} | {tok_s:.0f} | "
              f"{cell(q, 'prefill')} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
