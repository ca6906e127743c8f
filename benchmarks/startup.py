"""Where `tsjax serve`'s start-up time and memory go, measured in-process phase by phase:
import, model load (GGUF read + dequantization, param placement), engine (KV cache), warm-up
(every compiled shape: trace, lowering, XLA compile or persistent-cache load, first run),
then what the process holds afterwards (live JAX arrays by owner, resident pages by mapping,
glibc's arenas, and how much `malloc_trim` gives back).

    python -m benchmarks.startup                            # serve defaults: 8 rows x 2048
    python -m benchmarks.startup --quant bf16
    python -m benchmarks.startup --cache fresh              # cold: an empty compilation cache
    python -m benchmarks.startup --per-shape                # each shape alone: seconds, RSS
                                                            # growth, XLA's memory analysis
    python -m benchmarks.startup --shapes prefill=16,512 --steps 1,4 --decode-batches 1,8

`--cache fresh` compiles into a new empty directory (then kept, so a second run with
`--cache DIR` measures the warm start from exactly that cache). Environment variables that
change the allocator (MALLOC_ARENA_MAX, LD_PRELOAD) or XLA (XLA_FLAGS) must be set before the
process starts; they are echoed in the report. Figures on a shared machine are noisy: repeat
and alternate.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import replace

from benchmarks.memory import (
    MB,
    PeakSampler,
    format_groups,
    malloc_state,
    malloc_trim,
    reset_peak,
    smaps_groups,
    status,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", "-m", default=None)
    p.add_argument("--rows", type=int, default=8, help="cache rows (serve default 8)")
    p.add_argument("--max-len", type=int, default=2048, help="context (serve default 2048)")
    p.add_argument("--quant", default=None, help="bf16 / int8 (default float32)")
    p.add_argument("--decode-steps", type=int, default=4, help="serve default 4")
    p.add_argument("--prefill-chunk", type=int, default=512, help="serve default 512")
    p.add_argument(
        "--cache",
        default="default",
        help="compilation cache: default (~/.cache/tsjax/jax-cache), off, fresh (a new empty"
        " dir), or a directory",
    )
    p.add_argument("--per-shape", action="store_true", help="compile each shape alone (AOT)")
    p.add_argument("--decode-batches", default=None, help="override, e.g. 1,8")
    p.add_argument("--attn-lens", default=None, help="override, e.g. 512,2048")
    p.add_argument("--steps", default=None, help="decode step counts warmed, e.g. 1,4")
    p.add_argument("--opt-level", default=None, help="jax_optimization_level (O0..O3)")
    p.add_argument("--trim", action="store_true", help="malloc_trim after warm-up, RSS again")
    p.add_argument("--json", default=None, help="write the raw figures to this file")
    return p.parse_args(argv)


def set_cache(choice: str) -> str:
    """Point TSJAX_COMPILATION_CACHE at the chosen directory before tsjax reads it."""
    if choice == "default":
        os.environ.pop("TSJAX_COMPILATION_CACHE", None)
        return "default"
    if choice == "off":
        os.environ["TSJAX_COMPILATION_CACHE"] = "off"
        return "off"
    path = tempfile.mkdtemp(prefix="tsjax-cache-") if choice == "fresh" else choice
    os.environ["TSJAX_COMPILATION_CACHE"] = path
    return path


class Phases:
    """Seconds, resident bytes after, and peak resident bytes of each phase."""

    def __init__(self):
        self.rows: list[dict] = []
        self._t = 0.0
        self._sampler: PeakSampler | None = None

    def begin(self) -> None:
        gc.collect()
        reset_peak()
        self._sampler = PeakSampler(interval=0.02).start()
        self._t = time.perf_counter()
        self._cpu = time.process_time()

    def end(self, name: str, **extra) -> dict:
        secs = time.perf_counter() - self._t
        cpu = time.process_time() - self._cpu
        assert self._sampler is not None
        sampled = self._sampler.stop()
        st = status()
        row = {
            "phase": name,
            "seconds": secs,
            "cpu_seconds": cpu,
            "rss_after": st["VmRSS"],
            "peak": max(st["VmHWM"], sampled),
            **extra,
        }
        self.rows.append(row)
        print(
            f"[{name}] {secs:.1f}s ({cpu:.1f} CPU s), RSS {st['VmRSS'] / MB:.0f} MB,"
            f" peak {row['peak'] / MB:.0f} MB",
            file=sys.stderr,
            flush=True,
        )
        return row


class CompileEvents:
    """JAX's compile-path durations (trace, lowering, backend compile or cache load, cache
    retrieval), collected per function name through `jax.monitoring`."""

    EVENTS = {
        "/jax/core/compile/jaxpr_trace_duration": "trace",
        "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
        "/jax/core/compile/backend_compile_duration": "compile_or_load",
        "/jax/compilation_cache/cache_retrieval_time_sec": "cache_read",
    }

    def __init__(self):
        import jax

        self.by_fun: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        self.totals: dict[str, list[float]] = defaultdict(list)
        self.hits = 0
        self.enabled = True

        def on_duration(event: str, secs: float, **kw) -> None:
            kind = self.EVENTS.get(event)
            if kind is None or not self.enabled:
                return
            self.totals[kind].append(secs)
            self.by_fun[kw.get("fun_name", "?")][kind].append(secs)

        def on_event(event: str, **kw) -> None:
            if event == "/jax/compilation_cache/cache_hits" and self.enabled:
                self.hits += 1

        jax.monitoring.register_event_duration_secs_listener(on_duration)
        jax.monitoring.register_event_listener(on_event)

    def table(self) -> list[str]:
        out = ["| function | compiles | trace s | lower s | compile/load s | cache read s |"]
        out.append("|---|---|---|---|---|---|")
        for fun, kinds in sorted(
            self.by_fun.items(), key=lambda kv: -sum(map(sum, kv[1].values()))
        ):
            n = len(kinds.get("compile_or_load", []))
            cells = [f"{sum(kinds.get(k, [])):.1f}" for k in ("trace", "lower", "compile_or_load")]
            cells.append(f"{sum(kinds.get('cache_read', [])):.1f}")
            out.append(f"| {fun} | {n} | " + " | ".join(cells) + " |")
        return out


def live_breakdown(model, engine) -> dict[str, int]:
    """Bytes of live JAX arrays: params, KV cache, sampler state, everything else."""
    import jax

    def ids(tree) -> set[int]:
        return {id(x) for x in jax.tree_util.tree_leaves(tree)}

    owners = {
        "params": ids(model.params),
        "kv cache": ids(engine._cache),
        "sampler": ids(engine._sampler),
    }
    out: dict[str, int] = defaultdict(int)
    counts: dict[str, int] = defaultdict(int)
    for a in jax.live_arrays():
        owner = next((k for k, v in owners.items() if id(a) in v), "other arrays")
        out[owner] += a.nbytes
        counts[owner] += 1
    return {**out, **{f"n {k}": v for k, v in counts.items()}}


def timed_load(args):
    """`tsjax.model.load` as the server calls it, with GGUF read + dequantization and param
    placement timed apart (wrapping the loader's own functions for this process only)."""
    import jax

    import tsjax.loader as loader
    from tsjax.model import load

    spent = {"dequant": 0.0, "place": 0.0}
    convert, put = loader._convert, jax.device_put

    def timed_convert(*a, **k):
        t = time.perf_counter()
        try:
            return convert(*a, **k)
        finally:
            spent["dequant"] += time.perf_counter() - t

    def timed_put(*a, **k):
        t = time.perf_counter()
        try:
            return jax.block_until_ready(put(*a, **k))
        finally:
            spent["place"] += time.perf_counter() - t

    loader._convert, jax.device_put = timed_convert, timed_put
    try:
        model = load(
            args.model,
            rows=args.rows,
            max_len=args.max_len,
            progress=False,
            quant=args.quant,
            shapes=custom_shapes(args),
        )
    finally:
        loader._convert, jax.device_put = convert, put
    return model, spent


def custom_shapes(args):
    """The serve defaults' `StepShapes`, with the overrides given (None: unchanged)."""
    from tsjax.steps import StepShapes

    shapes = StepShapes.default(rows=args.rows, max_len=args.max_len)
    if args.decode_batches:
        shapes = replace(shapes, decode_batches=_ints(args.decode_batches))
    if args.attn_lens:
        shapes = replace(shapes, attn_lens=_ints(args.attn_lens))
    return shapes


def _ints(s: str) -> tuple[int, ...]:
    return tuple(int(x) for x in s.split(","))


def per_shape(model, engine, args) -> list[dict]:
    """Compile each warm-up shape alone through `lower().compile()`: seconds to trace and
    lower, seconds to compile (or load from the persistent cache), resident growth, and
    XLA's own figures for the executable (code size, temporary buffers, HLO size)."""
    import jax
    import numpy as np

    from tsjax.grammar import mask_words
    from tsjax.sampling import SamplingParams, host_sampler_state
    from tsjax.steps import steps_bucket

    steps, params = model.steps, model.params
    cache, sampler = engine._cache, engine._sampler
    w = mask_words(model.config.vocab_size)
    sh = steps.shapes
    jobs = []
    for t in sh.prefill_lens:
        if t > engine.prefill_chunk:
            break
        b = 1
        ns = host_sampler_state([SamplingParams.greedy()] * b, [[]] * b)
        fn_args = (
            params,
            cache,
            sampler,
            ns,
            np.zeros((b, t), np.int32),
            np.zeros((b,), np.int32),
            np.zeros((b,), np.int32),
            np.ones((b,), np.int32),
            np.full((b, w), -1, np.int32),
        )
        a = steps.attn_len_for(t)
        jobs.append((f"prefill b={b} T={t}", steps.prefill_fn, fn_args, {"attn_len": a}))
    counts = sorted({steps_bucket(n) for n in _step_counts(args)})
    for b in sh.decode_batches:
        for a in sh.attn_lens:
            for m in counts:
                fn_args = (
                    params,
                    cache,
                    sampler,
                    np.zeros((b,), np.int32),
                    np.ones((b,), bool),
                    np.full((b, w), -1, np.int32),
                    np.int32(1),
                )
                kw = {"attn_len": a, "max_steps": m}
                jobs.append((f"decode b={b} attn={a} steps<={m}", steps.decode_fn, fn_args, kw))
    pairs = np.full((steps.SWAP_PAIRS,), sh.rows, np.int32)
    jobs.append(("swap", steps.swap_fn, (cache, sampler, pairs, pairs), {}))
    out, held = [], []
    for name, fn, fn_args, kw in jobs:
        gc.collect()
        r0, m0 = status()["VmRSS"], _in_use()
        t0, c0 = time.perf_counter(), time.process_time()
        lowered = fn.lower(*fn_args, **kw)
        t1, c1 = time.perf_counter(), time.process_time()
        r1, m1 = status()["VmRSS"], _in_use()
        compiled = lowered.compile()
        t2, c2 = time.perf_counter(), time.process_time()
        mod_chars = len(lowered.as_text())
        del lowered
        gc.collect()
        r2, m2 = status()["VmRSS"], _in_use()
        held.append(compiled)  # as the jit caches hold them in the server
        mem = compiled.memory_analysis()
        hlo = compiled.as_text() or ""
        row = {
            "shape": name,
            "lower_s": t1 - t0,
            "compile_s": t2 - t1,
            "lower_cpu": c1 - c0,
            "compile_cpu": c2 - c1,
            "rss_lower": r1 - r0,
            "rss_compile": r2 - r1,
            "malloc_lower": m1 - m0,
            "malloc_compile": m2 - m1,
            "code_bytes": getattr(mem, "generated_code_size_in_bytes", -1),
            "temp_bytes": getattr(mem, "temp_size_in_bytes", -1),
            "stablehlo_chars": mod_chars,
            "hlo_chars": len(hlo),
            "hlo_ops": hlo.count("\n  "),
            "constants": hlo.count(" constant("),
        }
        out.append(row)
        print(
            f"{name}: lower {row['lower_s']:.1f}s ({c1 - c0:.1f} CPU)"
            f" compile {row['compile_s']:.1f}s ({c2 - c1:.1f} CPU)"
            f" RSS +{(r1 - r0) / MB:.0f} +{(r2 - r1) / MB:.0f} MB,"
            f" malloc +{(m1 - m0) / MB:.0f} +{(m2 - m1) / MB:.0f} MB,"
            f" code {row['code_bytes'] / MB:.1f} MB temp {row['temp_bytes'] / MB:.1f} MB"
            f" ops {row['hlo_ops']} stablehlo {mod_chars / MB:.1f} MB",
            file=sys.stderr,
            flush=True,
        )
    # What the executables hold, apart from JAX's trace and lowering caches.
    before = status()["VmRSS"], _in_use()
    del held
    gc.collect()
    freed = status()["VmRSS"], _in_use()
    jax.clear_caches()
    gc.collect()
    cleared = status()["VmRSS"], _in_use()
    malloc_trim()
    trimmed = status()["VmRSS"], _in_use()
    for label, (r, m) in [
        ("every executable held", before),
        ("executables dropped", freed),
        ("jax.clear_caches()", cleared),
        ("malloc_trim", trimmed),
    ]:
        out.append({"shape": f"({label})", "rss": r, "malloc_in_use": m})
    return out


def _in_use() -> int:
    m = malloc_state()
    return m["in_use"] + m["mmapped"] if m else 0


def _step_counts(args) -> tuple[int, ...]:
    return _ints(args.steps) if args.steps else tuple(sorted({1, args.decode_steps}))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cache_dir = set_cache(args.cache)
    phases = Phases()
    phases.begin()
    import jax

    if args.opt_level:
        jax.config.update("jax_optimization_level", args.opt_level)
    import serve.engine  # noqa: F401  (what the server imports before loading)
    import tsjax.model  # noqa: F401

    phases.end("import")
    events = CompileEvents()
    phases.begin()
    model, spent = timed_load(args)
    phases.end("load", **spent, param_bytes=model.load_stats.bytes_params)
    from serve.engine import Engine

    phases.begin()
    engine = Engine(model, decode_steps=args.decode_steps, prefill_chunk=args.prefill_chunk)
    jax.block_until_ready(engine._cache)
    phases.end("engine (cache)")
    shapes_out: list[dict] = []
    phases.begin()
    if args.per_shape:
        shapes_out = per_shape(model, engine, args)
        phases.end("compile each shape (AOT)", n_shapes=len(shapes_out))
    else:
        if args.steps:
            secs = model.steps.warmup(
                model.params, _step_counts(args), max_prompt=engine.prefill_chunk
            )
            engine._cache, engine._sampler = model.steps.new_cache(), model.steps.new_sampler()
        else:
            secs = engine.warmup()
        jax.block_until_ready(engine._cache)
        phases.end("warm-up", warmup_s=secs, cache_hits=events.hits)
    events.enabled = False
    report(args, cache_dir, phases, events, model, engine, shapes_out)
    return 0


def report(args, cache_dir, phases, events, model, engine, shapes_out) -> None:
    import jax

    live = live_breakdown(model, engine)
    groups = smaps_groups()
    malloc = malloc_state()
    st = status()
    trimmed = None
    if args.trim:
        malloc_trim()
        trimmed = status()["VmRSS"]
    env = {k: os.environ.get(k) for k in ("XLA_FLAGS", "MALLOC_ARENA_MAX", "LD_PRELOAD")}
    lines = [
        f"## start-up: rows {args.rows} x {args.max_len}, quant {args.quant or 'float32'},"
        f" cache {cache_dir}, jax {jax.__version__}",
        f"env: {json.dumps({k: v for k, v in env.items() if v})}",
        f"shapes: {model.steps.shapes}",
        "",
        "| phase | seconds | CPU seconds | RSS after MB | peak MB | notes |",
        "|---|---|---|---|---|---|",
    ]
    for r in phases.rows:
        notes = {
            k: (round(v, 1) if isinstance(v, float) else v)
            for k, v in r.items()
            if k not in ("phase", "seconds", "cpu_seconds", "rss_after", "peak")
        }
        lines.append(
            f"| {r['phase']} | {r['seconds']:.1f} | {r['cpu_seconds']:.1f} |"
            f" {r['rss_after'] / MB:.0f} |"
            f" {r['peak'] / MB:.0f} | {notes or ''} |"
        )
    lines += ["", *events.table(), f"persistent-cache hits: {events.hits}", ""]
    lines += ["| live JAX arrays | MB | arrays |", "|---|---|---|"]
    for k in ("params", "kv cache", "sampler", "other arrays"):
        lines.append(f"| {k} | {live.get(k, 0) / MB:.0f} | {live.get('n ' + k, 0)} |")
    lines += [
        "",
        f"VmRSS {st['VmRSS'] / MB:.0f} MB (anon {st.get('RssAnon', 0) / MB:.0f},"
        f" file {st.get('RssFile', 0) / MB:.0f})",
    ]
    if malloc:
        lines.append(
            "glibc malloc: in use {:.0f} MB, free held in arenas {:.0f} MB, mmapped {:.0f} MB,"
            " arena {:.0f} MB".format(
                *(malloc[k] / MB for k in ("in_use", "free_held", "mmapped", "arena"))
            )
        )
    if trimmed is not None:
        lines.append(f"after malloc_trim(0): VmRSS {trimmed / MB:.0f} MB")
    lines += ["", "| mapping group | mappings | resident MB | anonymous MB |", "|---|---|---|---|"]
    lines += format_groups(groups)
    if shapes_out:
        lines += [
            "",
            "| shape | lower s (CPU) | compile s (CPU) | RSS MB lower + compile"
            " | malloc MB lower + compile | code MB | temp MB | HLO ops | constants"
            " | StableHLO MB |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in shapes_out:
            if "rss" in r:
                lines.append(
                    f"| {r['shape']} | RSS {r['rss'] / MB:.0f} MB, malloc in use"
                    f" {r['malloc_in_use'] / MB:.0f} MB |||||||||"
                )
                continue
            lines.append(
                f"| {r['shape']} | {r['lower_s']:.1f} ({r['lower_cpu']:.1f}) |"
                f" {r['compile_s']:.1f} ({r['compile_cpu']:.1f}) |"
                f" {r['rss_lower'] / MB:.0f} + {r['rss_compile'] / MB:.0f} |"
                f" {r['malloc_lower'] / MB:.0f} + {r['malloc_compile'] / MB:.0f} |"
                f" {r['code_bytes'] / MB:.2f} | {r['temp_bytes'] / MB:.1f} | {r['hlo_ops']} |"
                f" {r['constants']} | {r['stablehlo_chars'] / MB:.1f} |"
            )
    print("\n".join(lines))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "phases": phases.rows,
                    "events": {k: dict(v) for k, v in events.by_fun.items()},
                    "live": live,
                    "smaps": groups,
                    "malloc": malloc,
                    "shapes": shapes_out,
                    "trimmed_rss": trimmed,
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    sys.exit(main())
