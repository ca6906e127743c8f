"""What each kind of engine dispatch costs, in wall and CPU seconds, for the served path's
cost model: decode dispatches by step count (1 step, as while requests wait, or
`decode_steps`) and by sampling (greedy, or the server's defaults: temperature 0.8, top-k
40, top-p 0.9, repeat penalty 1.1), and prefill by how many prompts one call takes.
Variants of one measurement alternate, round after round, so a busy machine slows them alike.

    python -m benchmarks.dispatch_cost                       # 8 rows x 2048, --quant auto
    python -m benchmarks.dispatch_cost --rows 16 --quant f32
    python -m benchmarks.dispatch_cost --prefill-batches 1,4,8,16 --prompt 64

CPU seconds count every thread of this process: on a shared machine they move far less than
wall time, and CPU seconds per token over the cores XLA keeps busy is the cost floor.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from tsjax.quants import QUANT_CHOICES, QUANT_HELP


def timed(fn) -> tuple[float, float]:
    """(wall s, CPU s) of fn()."""
    t, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t, time.process_time() - c


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", "-m", default=None)
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--max-len", type=int, default=2048)
    p.add_argument("--quant", choices=QUANT_CHOICES, default="auto", help=QUANT_HELP)
    p.add_argument("--position", type=int, default=150, help="rows' length while decoding")
    p.add_argument("--steps", type=int, default=4, help="decode_steps")
    p.add_argument("--prompt", type=int, default=64, help="prompt tokens per prefill row")
    p.add_argument("--prefill-batches", default="1,2,4,8")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)

    import dataclasses

    import jax
    import jax.numpy as jnp
    import numpy as np

    from tsjax.model import load
    from tsjax.sampling import SamplingParams, host_sampler_state

    model = load(args.model, rows=args.rows, max_len=args.max_len, progress=False, quant=args.quant)
    steps, params = model.steps, model.params
    rows = list(range(args.rows))
    cache = steps.new_cache()
    server = SamplingParams(repeat_penalty=1.1)  # the server's default sampling
    samplers = {
        "greedy": host_sampler_state([SamplingParams.greedy()] * args.rows, [[]] * args.rows),
        "server default": host_sampler_state(
            [dataclasses.replace(server, seed=i) for i in rows],
            [list(range(100, 100 + args.position))] * args.rows,
        ),
    }

    def decode(sampler_name: str, n: int):
        nonlocal cache
        cache = dataclasses.replace(cache, lengths=jnp.full_like(cache.lengths, args.position))
        jax.block_until_ready(cache.lengths)

        def go():
            nonlocal cache
            toks, _, cache, samplers[sampler_name] = steps.decode(
                params, cache, samplers[sampler_name], rows, [1] * args.rows, args.position, n
            )

        return timed(go)

    variants = [(s, n) for s in samplers for n in sorted({1, args.steps})]
    for v in variants:  # compile (one program serves every variant) and warm
        decode(*v)
        decode(*v)
    res: dict = {v: [] for v in variants}
    for _ in range(args.rounds):
        for v in variants:
            res[v].append(decode(*v))
    print(
        f"## {model.name}, {args.rows} rows x {args.max_len}, {args.quant or 'float32'},"
        f" decode at position {args.position}\n"
        "| sampling | steps per dispatch | wall ms per step | CPU ms per step |"
        " CPU ms per token |\n|---|---|---|---|---|"
    )
    for (s, n), xs in res.items():
        wall = statistics.median(x for x, _ in xs) / n * 1e3
        cpu = statistics.median(c for _, c in xs) / n * 1e3
        print(f"| {s} | {n} | {wall:.1f} | {cpu:.1f} | {cpu / args.rows:.2f} |", flush=True)

    prompt = [int(x) for x in np.random.default_rng(0).integers(100, 10000, args.prompt)]
    batches = [int(x) for x in args.prefill_batches.split(",")]
    greedy = SamplingParams.greedy()

    def prefill(b: int):
        def go():
            nonlocal cache
            _, _, cache, samplers["greedy"] = steps.prefill(
                params, cache, samplers["greedy"], [prompt] * b, list(range(b)), [greedy] * b
            )

        return timed(go)

    for b in batches:
        prefill(b)
        prefill(b)
    pre: dict = {b: [] for b in batches}
    for _ in range(args.rounds):
        for b in batches:
            pre[b].append(prefill(b))
    print(
        f"\n| prompts per prefill call ({args.prompt} tokens each) | wall s per call |"
        " wall ms per token | CPU ms per token |\n|---|---|---|---|"
    )
    for b, xs in pre.items():
        wall = statistics.median(x for x, _ in xs)
        cpu = statistics.median(c for _, c in xs)
        tok = b * args.prompt
        print(f"| {b} | {wall:.3f} | {wall / tok * 1e3:.2f} | {cpu / tok * 1e3:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
