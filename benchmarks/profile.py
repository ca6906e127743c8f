"""Where one decode step's time goes, op by op (XLA:CPU): the per-op split BENCHMARKS.md quotes.

    python -m benchmarks.profile [--model smollm2-135m] [--rows 32] [--live 16]
                                 [--position 200] [--quant int8] [--top 25]

Runs `--live` rows of the compiled decode step (4 steps per dispatch) at cache position
`--position` under JAX's profiler with XLA:CPU's per-thunk trace events on, then groups the
events by what each fused op computes (its output shape and its main operations, read from the
compiled HLO: `dot`, `reduce`, `scatter`, ...) and prints ms per step and ops per step, largest
first, with totals for matmuls (int8 `s32`/float dots over the weights, the block matmul
kernels), attention (its dots, or the native decode attention kernel) and
everything else. The times are trace events summed, so an op both cores ran counts once per
core and tracing adds a little per op: the total runs above `benchmarks.decode`'s wall time
(float32 more so). Read the shares, not the absolute sum. A last line splits the wall clock:
the time some op of each group runs on any thread, and the time no op runs at all.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import os
import re
import tempfile

from tsjax.quants import QUANT_CHOICES, QUANT_HELP

KINDS = (
    "dot",
    "reduce",
    "convert",
    "exponential",
    "scatter",
    "gather",
    "dynamic-slice",
    "concatenate",
    "slice",
    "rsqrt",
    "round-nearest-even",
    "select",
    "tanh",
    "logistic",
)


#: The native CPU kernels' FFI targets, as the table names them.
CUSTOM_CALLS = {
    "tsjax_q4_matmul": "block matmul (custom call)",
    "tsjax_q8_matmul": "block matmul (custom call)",
    "tsjax_attention": "attention (custom call)",
}


def fusion_contents(hlo: str) -> dict[str, str]:
    """Fused op name -> "output-shape op/op/...", from a compiled module's text."""
    comps: dict[str, list[str]] = {}
    cur = None
    for line in hlo.splitlines():
        if not line.startswith(" "):
            m = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line.strip())
            if m:
                cur = m.group(1)
                comps[cur] = []
                continue
        if cur:
            comps[cur].append(line)
    out = {}
    for line in hlo.splitlines():
        m = re.search(r"%([\w.\-]+) = (\S+) fusion\(.*calls=%([\w.\-]+)", line)
        if m:
            ops = (re.search(r"= \S+ (\w[\w-]*)\(", x) for x in comps.get(m.group(3), []))
            kinds = sorted({o.group(1) for o in ops if o and o.group(1) in KINDS})
            out[m.group(1)] = f"{m.group(2).split('{')[0]} {'/'.join(kinds)}"
        m = re.search(r"%([\w.\-]+) = .*custom-call\(.*custom_call_target=\"(\w+)\"", line)
        if m:  # the CPU kernels (tsjax.kernels.blockdot)
            out[m.group(1)] = CUSTOM_CALLS.get(m.group(2), f"custom call {m.group(2)}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile", description=__doc__)
    p.add_argument("--model", "-m", default=None)
    p.add_argument("--rows", type=int, default=32, help="cache rows")
    p.add_argument("--live", type=int, default=16, help="rows decoding")
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--position", type=int, default=200)
    p.add_argument("--quant", choices=QUANT_CHOICES, default="auto", help=QUANT_HELP)
    p.add_argument("--top", type=int, default=25)
    p.add_argument(
        "--prefill",
        type=int,
        default=0,
        metavar="T",
        help="profile the prefill of one prompt of T new tokens after `--position` cached"
        " ones instead of decode",
    )
    args = p.parse_args(argv)
    # before jax is imported: XLA:CPU emits one trace event per executed op with this
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true"
    ).strip()

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax._src.lib import _profile_data

    from tsjax.model import load
    from tsjax.sampling import SamplingParams
    from tsjax.shapes import StepShapes, bucket_for, steps_bucket

    shapes = StepShapes.default(rows=args.rows, max_len=args.max_len)
    model = load(args.model, progress=False, shapes=shapes, quant=args.quant)
    steps, n = model.steps, 4
    cache, sampler = steps.new_cache(), steps.new_sampler()
    rows = list(range(args.live))

    def dispatch():
        nonlocal cache, sampler
        # every row holds `--position` tokens (attention reads the blocks its rows reach)
        cache = dataclasses.replace(cache, lengths=jnp.full_like(cache.lengths, args.position))
        if args.prefill:
            prompt = [[1] * (args.position + args.prefill)]
            greedy = [SamplingParams.greedy()]
            _, _, cache, sampler = steps.prefill(
                model.params, cache, sampler, prompt, [0], greedy, starts=[args.position]
            )
            return
        _, _, cache, sampler = steps.decode(
            model.params, cache, sampler, rows, [0] * args.live, args.position, n
        )

    for _ in range(3):
        dispatch()
    runs = 2
    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d)
        for _ in range(runs):
            dispatch()
        jax.block_until_ready(cache)
        jax.profiler.stop_trace()
        (path,) = glob.glob(f"{d}/**/*.xplane.pb", recursive=True)
        trace = _profile_data.ProfileData.from_file(path)
        totals: collections.Counter = collections.Counter()
        counts: collections.Counter = collections.Counter()
        spans: list[tuple[str, int, int]] = []  # (op, start, end) on any thread
        for plane in trace.planes:
            for line in plane.lines:
                for ev in line.events:
                    totals[ev.name] += ev.duration_ns
                    counts[ev.name] += 1
                    spans.append((ev.name, ev.start_ns, ev.start_ns + ev.duration_ns))

    # the same program the dispatches ran, to name what each fused op computes
    if args.prefill:
        t = bucket_for(args.prefill, steps.shapes.prefill_lens)
        attn_len = steps.attn_len_for(args.position + t)
        key = ("prefill", 1, t, attn_len)
        per_step = runs  # "per step": per prefill
    else:
        b = steps.shapes.decode_batches[np.searchsorted(steps.shapes.decode_batches, max(rows) + 1)]
        attn_len = steps.attn_len_for(args.position + n)
        key = ("decode", b, attn_len, steps_bucket(n))
        per_step = runs * n
    names = fusion_contents(steps._lower(key).compile().as_text())
    by: collections.Counter = collections.Counter()
    ops: collections.Counter = collections.Counter()
    group_of = {}  # traced op name -> its group, for the wall-clock split below
    for name, ns in totals.items():
        what = names.get(name)
        if what is None and re.fullmatch(r"(dot|convolution)[.\d]*", name):
            what = "dot (unfused)"
        if what is None and re.fullmatch(r"(custom-call|ffi_call)[.\d]*", name):
            what = "block matmul (custom call)"  # --quant q8 / q4: tsjax.kernels.blockdot
        if what is not None:
            by[what] += ns
            ops[what] += counts[name]
            group_of[name] = group(what)
    groups = {"matmuls": 0.0, "attention": 0.0, "other": 0.0}
    for what, ns in by.items():
        groups[group(what)] += ns / 1e6 / per_step
    what = (
        f"prefill of {args.prefill} tokens (per prefill)"
        if args.prefill
        else (f"{args.live} of {args.rows} rows")
    )
    print(
        f"{model.name}: {what}, position {args.position}"
        f" (attention bucket {attn_len}), {args.quant or 'float32'} weights"
    )
    print("| ms/step | ops/step | fused op (output shape, main operations) |\n|---|---|---|")
    for what, ns in by.most_common(args.top):
        print(f"| {ns / 1e6 / per_step:.2f} | {ops[what] / per_step:.0f} | {what} |")
    print("\n" + ", ".join(f"{k} {v:.1f} ms" for k, v in groups.items()) + " per step")
    # Wall clock: the time during which some op of each group runs on any thread (an op both
    # cores run counts once), and the time no op runs at all (the executor between ops).
    ops = [(group_of[n], a, b) for n, a, b in spans if n in group_of]
    t0, t1 = min(a for _, a, _ in ops), max(b for _, _, b in ops)
    wall = {k: covered([(a, b) for g, a, b in ops if g == k]) for k in groups}
    idle = (t1 - t0) - covered([(a, b) for _, a, b in ops])
    print(
        f"wall clock: step {(t1 - t0) / 1e6 / per_step:.1f} ms; "
        + ", ".join(f"{k} {v / 1e6 / per_step:.1f} ms" for k, v in wall.items())
        + f", no op running {idle / 1e6 / per_step:.1f} ms"
    )
    return 0


def group(what: str) -> str:
    """matmuls (the weights' dots, 2-d outputs), attention (4-d dot outputs, the native
    kernel) or other."""
    if what == "block matmul (custom call)":
        return "matmuls"
    if what == "attention (custom call)":
        return "attention"
    if what.endswith("dot") or what == "dot (unfused)":
        return "attention" if what.count(",") >= 3 else "matmuls"
    return "other"


def covered(spans: list[tuple[int, int]]) -> int:
    """Length of the union of [start, end) spans."""
    total, cur = 0, None
    for a, b in sorted(spans):
        if cur is None or a > cur[1]:
            total += 0 if cur is None else cur[1] - cur[0]
            cur = [a, b]
        else:
            cur[1] = max(cur[1], b)
    return total + (0 if cur is None else cur[1] - cur[0])


if __name__ == "__main__":
    raise SystemExit(main())
