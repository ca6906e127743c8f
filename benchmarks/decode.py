"""Decode-step cost by live rows and attention bucket: where batched decode time goes.

    python -m benchmarks.decode [--model smollm2-135m] [--rows 16] [--live 16]
                                [--max-len 2048] [--positions 100,200,1000] [--steps 4]
                                 [--quant int8] [--sampling greedy|default] [--logprobs]

Runs the compiled decode step directly (no engine; greedy, or the server's default sampling
top-k 40 / top-p 0.9 / temperature 0.8 with `--sampling default`) for 1 and `--live` (default:
all `--rows` cache rows) live rows at
cache positions whose attention bucket differs, and prints ms per step (best of 3 dispatches
after 2 warm-up ones) and tok/s. Comparing buckets at a fixed row count shows how much of the
step is attention over the cache rather than the weights. `--logprobs`: every row asks for
its tokens' log-probabilities (the chosen token's and the top 20, `tsjax.logprobs`), to see
what they cost.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

from tsjax.quants import QUANT_CHOICES, QUANT_HELP


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.decode", description=__doc__)
    p.add_argument("--model", "-m", default=None)
    p.add_argument("--rows", type=int, default=16, help="cache rows (decode slots)")
    p.add_argument("--live", type=int, default=None, help="rows decoding (default: all)")
    p.add_argument("--max-len", type=int, default=2048)
    p.add_argument("--positions", default="100,200,1000")
    p.add_argument("--steps", type=int, default=4, help="decode steps per dispatch")
    p.add_argument("--quant", choices=QUANT_CHOICES, default=None, help=QUANT_HELP)
    p.add_argument("--sampling", choices=["greedy", "default"], default="greedy")
    p.add_argument("--logprobs", action="store_true", help="every row reports logprobs")
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp

    from tsjax.model import load
    from tsjax.sampling import SamplingParams, host_sampler_state
    from tsjax.shapes import StepShapes
    from tsjax.sharding import put_tree

    shapes = StepShapes.default(rows=args.rows, max_len=args.max_len)
    model = load(args.model, progress=False, shapes=shapes, quant=args.quant)
    steps, n = model.steps, args.steps
    cache, sampler = steps.new_cache(), steps.new_sampler()
    if args.sampling == "default" or args.logprobs:
        params = [SamplingParams(seed=i) for i in range(args.rows)]
        if args.sampling == "greedy":
            params = [SamplingParams.greedy()] * args.rows
        sampler = host_sampler_state(params, [[]] * args.rows, logprobs=[args.logprobs] * args.rows)
        if steps.plan is not None:
            sampler = put_tree(sampler, steps.plan.sampler())
    print(
        f"{model.name}: {args.rows} rows, cache {args.max_len}, {n} steps per dispatch,"
        f" {args.quant or 'float32'} weights, {args.sampling} sampling"
        + (", logprobs" if args.logprobs else "")
    )
    print("| live rows | attention bucket | ms/step | tok/s |\n|---|---|---|---|")
    for pos in (int(x) for x in args.positions.split(",")):
        if pos + n > args.max_len:
            continue
        for live in sorted({1, args.live or args.rows}):
            rows = list(range(live))
            times = []
            for i in range(5):
                # every row holds `pos` tokens, as after a prompt of that length
                cache = dataclasses.replace(cache, lengths=jnp.full_like(cache.lengths, pos))
                jax.block_until_ready(cache.lengths)
                t = time.perf_counter()
                _, _, cache, sampler = steps.decode(
                    model.params, cache, sampler, rows, [0] * live, pos, n
                )
                if i >= 2:
                    times.append((time.perf_counter() - t) / n)
            dt = min(times)
            bucket = steps.attn_len_for(pos + n)
            print(f"| {live} | {bucket} | {dt * 1e3:.1f} | {live / dt:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
