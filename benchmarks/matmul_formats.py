"""Every weight matmul of one SmolLM2-135M decode step (30 layers: q, k, v, o, gate, up, down,
and the 49152 x 576 output projection), in one jitted program, for each candidate narrow
weight format and row count (issue 16).

    python -m benchmarks.matmul_formats [--modes f32,bf16,int8_row,...] [--rows 1,2,4,16,32]
                                        [--reps 5] [--inner 5]

The layers are chained (each feeds the next through a residual and a norm) so that nothing is
hoisted or dropped. Each repetition runs every (mode, rows) once, interleaved, and times the best
of `--inner` calls; the figure printed is the best over `--reps` repetitions (this machine is
shared and noisy), with the median beside it, and how many threads were busy (process CPU
time over wall time). Weights are random: timing only (accuracy on real models:
`python -m benchmarks.format_accuracy`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from tsjax.kernels import blockdot, blocks

L, D, F, KV, V = 30, 576, 1536, 192, 49152
SHAPES = {
    "q": (D, D),
    "k": (KV, D),
    "v": (KV, D),
    "o": (D, D),
    "g": (F, D),
    "u": (F, D),
    "d": (D, F),
}


def _pad_rows(x: jax.Array, least: int) -> jax.Array:
    return x if x.shape[0] >= least else jnp.pad(x, ((0, least - x.shape[0]), (0, 0)))


# --- formats: prep(w [N, K] float32 numpy) -> pytree; mm(x [M, K] f32, p) -> [M, N] f32 ---


def f32_prep(w):
    return jnp.asarray(w)


def f32_mm(x, w):
    y = jax.lax.dot_general(w, x, (((1,), (1,)), ((), ())))
    return jax.lax.optimization_barrier(y).T


def bf16_prep(w):
    return jnp.asarray(w, jnp.bfloat16)


def bf16_mm(x, w):
    y = jax.lax.dot_general(
        w, x.astype(jnp.bfloat16), (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
    )
    return jax.lax.optimization_barrier(y).T


def int8_channel_prep(w):
    """int8 [N, K] with one scale per output channel."""
    s = np.abs(w).max(1, keepdims=True) / 127.0
    return jnp.asarray(np.round(w / s).astype(np.int8)), jnp.asarray(s[:, 0].astype(np.float32))


def _quant_rows(x):
    amax = jnp.max(jnp.abs(x), axis=-1, keepdims=True)
    s = jnp.where(amax > 0, amax / 127.0, 1.0)
    return jnp.round(x / s).astype(jnp.int8), s


def _int_dot(xq, wq):
    y = jax.lax.dot_general(wq, xq, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32)
    return jax.lax.optimization_barrier(y).T  # [M, N]


def int8_row_mm(x, p):
    """Today's `--quant int8` shape: one activation scale per row."""
    wq, ws = p
    xq, xs = _quant_rows(x)
    return _int_dot(xq, wq).astype(jnp.float32) * xs * ws


def int8_two_mm(x, p):
    """Activations as two int8 terms, x ~ s1 q1 + s2 q2 (the second quantizes what the first
    missed), stacked as 2M rows of ONE int8 dot: the weights are read once."""
    wq, ws = p
    m = x.shape[0]
    q1, s1 = _quant_rows(x)
    q2, s2 = _quant_rows(x - q1.astype(jnp.float32) * s1)
    acc = _int_dot(jnp.concatenate([q1, q2]), wq).astype(jnp.float32)
    return (acc[:m] * s1 + acc[m:] * s2) * ws


def int8_block_prep(block):
    def prep(w):
        n, k = w.shape
        wb = w.reshape(n, k // block, block)
        s = np.abs(wb).max(2, keepdims=True) / 127.0
        s = np.where(s > 0, s, 1.0)
        return jnp.asarray(np.round(wb / s).astype(np.int8)), jnp.asarray(
            s[..., 0].astype(np.float32)
        )

    return prep


def int8_block_mm(block):
    """int8 weights and activations with one scale per block of `block` along K on both sides:
    a dot batched over the K/block blocks ([G, M, N] int32), then the scaled sum over G."""

    def mm(x, p):
        wq, ws = p  # [N, G, B], [N, G]
        m, k = x.shape
        xb = x.reshape(m, k // block, block)
        amax = jnp.max(jnp.abs(xb), axis=-1, keepdims=True)
        xs = jnp.where(amax > 0, amax / 127.0, 1.0)
        xq = jnp.round(xb / xs).astype(jnp.int8)
        acc = jax.lax.dot_general(
            xq, wq, (((2,), (2,)), ((1,), (1,))), preferred_element_type=jnp.int32
        )  # [G, M, N]
        return jnp.einsum("gmn,mg,ng->mn", acc.astype(jnp.float32), xs[..., 0], ws)

    return mm


def q8_prep(w):
    return tuple(jnp.asarray(a) for a in blocks.q8_blocks(w))


def q4_prep(w):
    return tuple(jnp.asarray(a) for a in blocks.q4_blocks(w))


MODES = {
    "f32": (f32_prep, f32_mm, 1),
    "bf16": (bf16_prep, bf16_mm, 2),
    "int8_row": (int8_channel_prep, int8_row_mm, 2),
    "int8_two": (int8_channel_prep, int8_two_mm, 1),
    "int8_b32": (int8_block_prep(32), int8_block_mm(32), 2),
    "int8_b64": (int8_block_prep(64), int8_block_mm(64), 2),
    # tsjax/kernels/blockdot.cc through jax.ffi: int8 activation blocks of 32 inside
    "q8_ffi": (q8_prep, lambda x, p: blockdot.q8_matmul(x, *p), 1),
    "q4_ffi": (q4_prep, lambda x, p: blockdot.q4_matmul(x, *p), 1),
}
# SmolLM2-135M Q4_1's own mix: 4-bit layers, the Q8_0 (tied embedding) output projection q8
HEAD_MODES = {"q4q8_ffi": ("q4_ffi", "q8_ffi")}


def random_weights(seed: int = 0):
    rng = np.random.default_rng(seed)

    def one(shape):
        return (rng.standard_normal(shape, dtype=np.float32) / np.sqrt(shape[1])).astype(np.float32)

    return [{n: one(s) for n, s in SHAPES.items()} for _ in range(L)], one((V, D))


def make_step(mm, least_rows: int, head_mm=None):
    head_mm = head_mm or mm

    @jax.jit
    def step(x, packed):
        layers, head = packed
        n = x.shape[0]
        x = _pad_rows(x, least_rows)
        for p in layers:
            q, k, v = mm(x, p["q"]), mm(x, p["k"]), mm(x, p["v"])
            o = mm(q, p["o"])
            h = jax.nn.silu(mm(x, p["g"])) * mm(x, p["u"])
            x = x + 0.1 * (o + mm(h, p["d"]) + jnp.concatenate([k, v, k], axis=1))
            x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=1, keepdims=True) + 1e-6)
        return head_mm(x, head)[:n]

    return step


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--modes", default=",".join([*MODES, *HEAD_MODES]))
    ap.add_argument("--rows", default="1,2,4,16,32")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--inner", type=int, default=5)
    a = ap.parse_args(argv)
    modes, rows = a.modes.split(","), [int(r) for r in a.rows.split(",")]
    layers, head = random_weights()
    rng = np.random.default_rng(1)
    xs = {r: jnp.asarray(rng.standard_normal((r, D), dtype=np.float32)) for r in rows}
    built = {}
    for m in modes:
        body, top = HEAD_MODES.get(m, (m, m))
        prep, mm, least = MODES[body]
        head_prep, head_mm, _ = MODES[top]
        packed = ([{n: prep(w) for n, w in lay.items()} for lay in layers], head_prep(head))
        step = make_step(mm, least, head_mm)
        for r in rows:
            step(xs[r], packed).block_until_ready()
        nbytes = sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(packed))
        built[m] = (step, packed, nbytes)
    res = {(m, r): [] for m in modes for r in rows}
    busy = {(m, r): [0.0, 0.0] for m in modes for r in rows}  # process CPU s, wall s
    for _ in range(a.reps):
        for m in modes:
            step, packed, _ = built[m]
            for r in rows:
                best = float("inf")
                c0, w0 = time.process_time(), time.perf_counter()
                for _ in range(a.inner):
                    t = time.perf_counter()
                    step(xs[r], packed).block_until_ready()
                    best = min(best, time.perf_counter() - t)
                busy[m, r][0] += time.process_time() - c0
                busy[m, r][1] += time.perf_counter() - w0
                res[(m, r)].append(best * 1e3)
    print("| mode | MB held | " + " | ".join(f"{r} rows ms" for r in rows) + " |")
    print("|---|---|" + "---|" * len(rows))
    for m in modes:
        cells = [f"{min(res[m, r]):.1f} ({statistics.median(res[m, r]):.1f})" for r in rows]
        print(f"| {m} | {built[m][2] / 1e6:.0f} | " + " | ".join(cells) + " |")
    print(f"\nthreads busy (process CPU time / wall time; {os.cpu_count()} CPUs):")
    print("| mode | " + " | ".join(f"{r} rows" for r in rows) + " |")
    print("|---|" + "---|" * len(rows))
    for m in modes:
        cells = [f"{busy[m, r][0] / busy[m, r][1]:.2f}" for r in rows]
        print(f"| {m} | " + " | ".join(cells) + " |")
    for m in modes:
        for r in rows:
            print(json.dumps({"mode": m, "rows": r, "min_ms": round(min(res[m, r]), 2),
                              "all_ms": [round(v, 2) for v in res[m, r]]}))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
