"""Decode-step cost by live rows and attention bucket: where batched decode time goes.

    python -m benchmarks.decode [--model smollm2-135m] [--rows 16] [--live 16]
                                [--max-len 2048] [--positions 100,200,1000] [--steps 4]
                                 [--quant int8] [--sampling greedy|default] [--logprobs]
                                 [--repeat 3]

Runs the compiled decode step directly (no engine; greedy, or the server's default sampling
top-k 40 / top-p 0.9 / temperature 0.8 with `--sampling default`) for 1 and `--live` (default:
all `--rows` cache rows) live rows at cache positions whose attention bucket differs, and
prints ms per step (best of `--repeat` dispatches after 2 warm-up ones) and tok/s. Comparing
buckets at a fixed row count shows how much of the step is attention over the cache rather than
the weights. `--logprobs` also times the same step with every row asking for its tokens' log-
probabilities (the chosen token's and the top 20, `tsjax.logprobs`), alternating dispatches
with and without, to see what they cost. `--compare-attention` times decode attention in the
native CPU kernel against XLA's own ops over the same cache blocks (two copies of the model,
alternating dispatches).
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
    p.add_argument("--quant", choices=QUANT_CHOICES, default="auto", help=QUANT_HELP)
    p.add_argument("--sampling", choices=["greedy", "default"], default="greedy")
    p.add_argument(
        "--logprobs",
        action="store_true",
        help="also time every row reporting log-probabilities, alternating with not",
    )
    p.add_argument(
        "--compare-attention",
        action="store_true",
        help="also time decode attention in XLA's ops instead of the native CPU kernel"
        " (a second copy of the model), alternating with it",
    )
    p.add_argument("--repeat", type=int, default=3, help="timed dispatches (best is shown)")
    args = p.parse_args(argv)
    if args.logprobs and args.compare_attention:
        p.error("--logprobs and --compare-attention are separate comparisons")

    import jax
    import jax.numpy as jnp

    from tsjax.model import load
    from tsjax.sampling import SamplingParams, host_sampler_state
    from tsjax.shapes import StepShapes
    from tsjax.sharding import put_tree

    shapes = StepShapes.default(rows=args.rows, max_len=args.max_len)
    model = load(args.model, progress=False, shapes=shapes, quant=args.quant)
    steps, n = model.steps, args.steps
    # (steps, params) of each timed variant: the model, and with --compare-attention a second
    # copy whose cache keeps decode attention in XLA's ops (its programs are its own)
    variants = [(steps, model.params)]
    if args.compare_attention:
        xla_model = load(args.model, progress=False, shapes=shapes, quant=args.quant)
        xs = xla_model.steps
        xs.layout = dataclasses.replace(xs.layout, native_attention=False)
        variants.append((xs, xla_model.params))
    params = [SamplingParams(seed=i) for i in range(args.rows)]
    if args.sampling == "greedy":
        params = [SamplingParams.greedy()] * args.rows

    def sampler_state(logprobs: bool):
        kw = {"logprobs": [True] * args.rows} if logprobs else {}  # main's has no such field
        state = host_sampler_state(params, [[]] * args.rows, **kw)
        return state if steps.plan is None else put_tree(state, steps.plan.sampler())

    # with --logprobs the same compiled program runs both: only the per-row flag differs
    samplers = [sampler_state(False)] + ([sampler_state(True)] if args.logprobs else [])
    if args.compare_attention:
        samplers.append(sampler_state(False))
    caches = [s.new_cache() for s, _ in variants]
    print(
        f"{model.name}: {args.rows} rows, cache {args.max_len}, {n} steps per dispatch,"
        f" {args.quant or 'float32'} weights, {args.sampling} sampling, best of {args.repeat}"
    )
    if args.logprobs or args.compare_attention:
        other = "with logprobs" if args.logprobs else "XLA attention"
        print(f"| live rows | attention bucket | ms/step | {other} | tok/s |")
        print("|---|---|---|---|---|")
    else:
        print("| live rows | attention bucket | ms/step | tok/s |\n|---|---|---|---|")
    for pos in (int(x) for x in args.positions.split(",")):
        if pos + n > args.max_len:
            continue
        for live in sorted({1, args.live or args.rows}):
            rows = list(range(live))
            times: list[list[float]] = [[] for _ in samplers]
            for i in range(2 + args.repeat):
                for k in range(len(samplers)):  # alternate: contention hits both alike
                    v = k if args.compare_attention else 0  # (--logprobs: one model, one cache)
                    # every row holds `pos` tokens, as after a prompt of that length
                    c = caches[v]
                    c = dataclasses.replace(c, lengths=jnp.full_like(c.lengths, pos))
                    jax.block_until_ready(c.lengths)
                    vsteps, vparams = variants[v]
                    t = time.perf_counter()
                    _, _, caches[v], samplers[k] = vsteps.decode(
                        vparams, c, samplers[k], rows, [0] * live, pos, n
                    )
                    if i >= 2:  # the first two warm up
                        times[k].append((time.perf_counter() - t) / n)
            dt = [min(ts) for ts in times]
            bucket = steps.attn_len_for(pos + n)
            cols = " | ".join(f"{d * 1e3:.1f}" for d in dt)
            print(f"| {live} | {bucket} | {cols} | {live / dt[0]:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
