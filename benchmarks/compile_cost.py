"""What one compiled decode shape costs, for a given way of building it: seconds to trace and
lower, seconds for XLA to compile it (the persistent cache is off here), the memory its
executable holds, its HLO op count, and then its step time. Run once per variant and compare
rows made back to back (XLA_FLAGS and allocator variables belong to the process: set them in
front of the command).

    python -m benchmarks.compile_cost                              # 8 rows x 2048, b=8, 2048
    python -m benchmarks.compile_cost --scan                       # lax.scan over the layers
    python -m benchmarks.compile_cost --opt-level O0               # jax_optimization_level
    XLA_FLAGS=--xla_backend_optimization_level=0 python -m benchmarks.compile_cost
    python -m benchmarks.compile_cost --serialize                  # reload without tracing
    python -m benchmarks.compile_cost --gil                        # compile in a thread: how
                                                                   # much Python keeps running

`--gil` compiles a second shape in a background thread while the main thread runs decode
dispatches of the first and a pure-Python loop: what a server compiling in the background
leaves its engine (both figures against the same work with no compile running).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import statistics
import sys
import threading
import time

from benchmarks.memory import MB, malloc_state


def _in_use() -> int:
    m = malloc_state()
    return (m["in_use"] + m["mmapped"]) if m else 0


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", "-m", default=None)
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--max-len", type=int, default=2048)
    p.add_argument("--batch", type=int, default=None, help="decode bucket (default: rows)")
    p.add_argument("--attn", type=int, default=None, help="attention bucket (default: max-len)")
    p.add_argument("--position", type=int, default=None, help="rows' length (default attn-8)")
    p.add_argument("--steps", type=int, default=4, help="decode steps per dispatch")
    p.add_argument("--quant", default=None)
    p.add_argument("--scan", action="store_true", help="lax.scan over stacked layers")
    p.add_argument("--no-split", action="store_true", help="split_span=None (whole spans)")
    p.add_argument("--opt-level", default=None, help="jax_optimization_level O0..O3")
    p.add_argument("--repeat", type=int, default=7, help="timed dispatches")
    p.add_argument("--gil", action="store_true", help="background-compile probe")
    p.add_argument(
        "--serialize", action="store_true", help="time jax.experimental.serialize_executable"
    )
    p.add_argument("--label", default="", help="row label")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ["TSJAX_COMPILATION_CACHE"] = "off"
    import jax
    import jax.numpy as jnp
    import numpy as np

    if args.opt_level:
        jax.config.update("jax_optimization_level", args.opt_level)
    from tsjax.grammar import mask_words
    from tsjax.model import load
    from tsjax.steps import StepShapes, steps_bucket

    shapes = StepShapes.default(rows=args.rows, max_len=args.max_len)
    if args.no_split:
        shapes = dataclasses.replace(shapes, split_span=None)
    model = load(
        args.model,
        progress=False,
        shapes=shapes,
        quant=args.quant,
        unrolled=False if args.scan else None,
    )
    steps = model.steps
    b = args.batch or min(args.rows, steps.shapes.decode_batches[-1])
    b = min(x for x in steps.shapes.decode_batches if x >= b)
    attn = args.attn or args.max_len
    pos = args.position if args.position is not None else attn - 2 * args.steps
    cache, sampler = steps.new_cache(), steps.new_sampler()
    w = mask_words(model.config.vocab_size)
    call = (
        np.zeros((b,), np.int32),
        np.ones((b,), bool),
        np.full((b, w), -1, np.int32),
        np.int32(args.steps),
    )
    kw = {"attn_len": attn, "max_steps": steps_bucket(args.steps)}
    gc.collect()
    m0 = _in_use()
    t0 = time.perf_counter()
    lowered = steps.decode_fn.lower(model.params, cache, sampler, *call, **kw)
    t1 = time.perf_counter()
    c1 = time.process_time()
    compiled = lowered.compile()
    t2, c2 = time.perf_counter(), time.process_time()
    gc.collect()
    grown = _in_use() - m0
    ops = (compiled.as_text() or "").count("\n  ")

    def dispatch(cache, sampler):
        cache = dataclasses.replace(cache, lengths=jnp.full_like(cache.lengths, pos))
        jax.block_until_ready(cache.lengths)
        t = time.perf_counter()
        out = compiled(model.params, cache, sampler, *call)
        jax.block_until_ready(out)
        return (time.perf_counter() - t) / args.steps, out[3], out[4]

    times = []
    for i in range(args.repeat + 2):
        if i == 2:
            cpu0 = time.process_time()
        dt, cache, sampler = dispatch(cache, sampler)
        if i >= 2:
            times.append(dt)
    # CPU seconds of every thread per step: little moved by other processes on the machine
    cpu_ms = (time.process_time() - cpu0) / (args.repeat * args.steps) * 1e3
    step_ms = statistics.median(times) * 1e3
    label = args.label or ("scan" if args.scan else "unrolled")
    flags = os.environ.get("XLA_FLAGS", "")
    print(
        "| variant | rows x ctx | b | attn | trace+lower s | compile s (CPU s) | executable MB"
        " | HLO ops | ms/step (min) | CPU ms/step |\n|---|---|---|---|---|---|---|---|---|---|"
    )
    print(
        f"| {label} {args.quant or 'f32'} {args.opt_level or ''} {flags} |"
        f" {args.rows} x {args.max_len} | {b} | {attn} | {t1 - t0:.1f} | {t2 - t1:.1f}"
        f" ({c2 - c1:.1f}) | {grown / MB:.0f} | {ops} | {step_ms:.1f} ({min(times) * 1e3:.1f})"
        f" | {cpu_ms:.1f} |",
        flush=True,
    )
    if args.serialize:
        serialize_probe(compiled)
    if args.gil:
        gil_probe(steps, model, dispatch, cache, sampler, b, call, attn, kw)
    return 0


def serialize_probe(compiled) -> None:
    """An executable serialized by the program itself (no trace, no lowering on reload):
    bytes, seconds to serialize, seconds and memory to load it back."""
    from jax.experimental.serialize_executable import deserialize_and_load, serialize

    t = time.perf_counter()
    blob, in_tree, out_tree = serialize(compiled)
    t_ser = time.perf_counter() - t
    gc.collect()
    m0 = _in_use()
    t = time.perf_counter()
    again = deserialize_and_load(blob, in_tree, out_tree)
    t_load = time.perf_counter() - t
    grown = _in_use() - m0
    print(
        f"\nserialized executable: {len(blob) / MB:.1f} MB, serialize {t_ser:.1f}s,"
        f" deserialize_and_load {t_load:.1f}s, +{grown / MB:.0f} MB",
        flush=True,
    )
    del again


def _python_rate(seconds: float) -> float:
    """Iterations per second of a pure-Python loop (what the GIL lets through)."""
    n, end = 0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(1000):
            n += 1
    return n / seconds


def gil_probe(steps, model, dispatch, cache, sampler, b, call, attn, kw) -> None:
    """Decode dispatches and a Python loop, alone and while another shape (the next smaller
    attention bucket) is traced, lowered and compiled in a background thread."""
    smaller = max(x for x in steps.shapes.attn_lens if x < attn)
    base_py = _python_rate(2.0)
    base = []
    for _ in range(5):
        dt, cache, sampler = dispatch(cache, sampler)
        base.append(dt)
    phases: dict[str, float] = {}

    def background():
        t = time.perf_counter()
        lowered = steps.decode_fn.lower(
            model.params, cache, sampler, *call, **{**kw, "attn_len": smaller}
        )
        phases["lower"] = time.perf_counter() - t
        t = time.perf_counter()
        lowered.compile()
        phases["compile"] = time.perf_counter() - t

    th = threading.Thread(target=background)
    t_start = time.perf_counter()
    th.start()
    py_during, during = [], []
    while th.is_alive():
        py_during.append(_python_rate(0.5))
        if not th.is_alive():
            break
        dt, cache, sampler = dispatch(cache, sampler)
        during.append((time.perf_counter() - t_start, dt))
    th.join()
    lower_end = phases.get("lower", 0)
    in_lower = [dt for t, dt in during if t <= lower_end]
    in_compile = [dt for t, dt in during if t > lower_end]
    print(
        f"\nbackground compile of attn={smaller}: lower {phases['lower']:.1f}s, compile"
        f" {phases['compile']:.1f}s\n"
        f"- decode ms/step alone {statistics.median(base) * 1e3:.1f}; during the background"
        f" trace+lower {_med(in_lower)}; during the background XLA compile {_med(in_compile)}\n"
        f"- Python loop rate during the background work: "
        f"{statistics.median(py_during) / base_py:.0%} of alone",
        flush=True,
    )


def _med(xs: list[float]) -> str:
    return f"{statistics.median(xs) * 1e3:.1f} (n={len(xs)})" if xs else "-"


if __name__ == "__main__":
    sys.exit(main())
