"""XLA:CPU kernel forms behind the CPU layout choices (README, "The KV cache on CPU: blocks").

    python -m benchmarks.kernels [--rows 16]

Times, on SmolLM2-135M's shapes (30 layers, random data), each choice this backend's layout
rests on, best of 8 runs of one jitted program:
- every layer's weight matmuls for `--rows` rows: float32 x @ W[in, out] against
  (W[out, in] @ x^T)^T (what `tsjax.layers.linear` runs), bfloat16 weights in that form
  (`--quant bf16`: float32 x cast to bfloat16, float32 accumulation; try `--rows 1`), int8 x
  int8 -> int32 in both orders, and int8 activations as uint8 (VNNI's native form);
- decode attention's q.k dot over 60 blocks of 12 rows x 128 positions in XLA's ops: keys
  [R, K, P, H] (what `tsjax.cache` stores: a step's write of one position then touches one
  cache line per 16 values, and its attention runs in the native kernel where built) against
  keys transposed [R, K, H, P] (faster for this dot, what the cache stored before);
- q.k and p.v dots over those blocks in float32 against bfloat16 and int8 operands (a bf16 or
  int8 cache);
- one decode step's cache write (a scatter of one position per row) into each of those blocks
  stored as float32, bfloat16, bfloat16 written as uint16 bits, and int8: XLA:CPU converts a
  bfloat16 block to float32 and back around the scatter.
"""

from __future__ import annotations

import argparse
import time


def _best(fn, *args, runs: int = 8) -> float:
    import jax

    fn = jax.jit(fn)
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(runs):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.kernels", description=__doc__)
    p.add_argument("--rows", type=int, default=16)
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np

    from tsjax.layers.linear import transposed_matmul

    rng = np.random.default_rng(0)
    m, layers, d = args.rows, 30, 576
    shapes = [(d, 576), (d, 192), (d, 192), (576, d), (d, 1536), (d, 1536), (1536, d)]  # in, out

    def weights(dtype, transpose: bool):
        def one(shape):
            shape = shape[::-1] if transpose else shape
            if dtype == jnp.int8:
                return jnp.asarray(rng.integers(-127, 127, shape, dtype=np.int8))
            return jnp.asarray(rng.standard_normal(shape, np.float32)).astype(dtype)

        return [[one(s) for s in shapes] for _ in range(layers)]

    def matmuls(form, x_dtype):
        def run(ws, x, x3):
            out = 0.0
            for layer in ws:
                for w in layer:
                    k_in = w.shape[1] if form == "t" else w.shape[0]
                    y = form_fn(x if k_in == d else x3, w)
                    out = out + jnp.sum(y.astype(jnp.float32))
            return out

        def form_fn(x, w):
            if form == "t":
                return transposed_matmul(x, w) if x.dtype != jnp.int8 else _int_t(x, w)
            kw = {"preferred_element_type": jnp.int32} if x.dtype in (jnp.int8, jnp.uint8) else {}
            return jax.lax.dot_general(x, w, (((1,), (0,)), ((), ())), **kw)

        x = jnp.ones((m, d), x_dtype)
        x3 = jnp.ones((m, 1536), x_dtype)
        return run, x, x3

    def _int_t(x, w):
        y = jax.lax.dot_general(w, x, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32)
        return jax.lax.optimization_barrier(y).T

    macs = m * layers * sum(a * b for a, b in shapes)
    print(f"weight matmuls, {m} rows x 30 layers ({macs / 1e6:.0f} M MACs):")
    cases = [
        ("float32 x @ W[in, out]", jnp.float32, jnp.float32, "n", False),
        ("float32 (W[out, in] @ x^T)^T", jnp.float32, jnp.float32, "t", True),
        ("bfloat16 (W[out, in] @ x^T)^T", jnp.bfloat16, jnp.float32, "t", True),
        ("int8 x @ W[in, out]", jnp.int8, jnp.int8, "n", False),
        ("int8 (W[out, in] @ x^T)^T", jnp.int8, jnp.int8, "t", True),
        ("uint8 x @ int8 W[in, out]", jnp.int8, jnp.uint8, "n", False),
    ]
    for name, w_dtype, x_dtype, form, transpose in cases:
        run, x, x3 = matmuls(form, x_dtype)
        ms = _best(run, weights(w_dtype, transpose), x, x3)
        print(f"  {name:32s} {ms:7.1f} ms  {macs / ms / 1e6:6.1f} GMAC/s")

    r, kv, g, h, pos, n = 12, 3, 3, 64, 128, 60
    q = jnp.asarray(rng.standard_normal((r, kv, g, h), np.float32))
    print(f"decode attention, {n} blocks of {r} rows x {pos} positions:")
    k_std = [jnp.asarray(rng.standard_normal((r, kv, pos, h), np.float32)) for _ in range(n)]
    k_t = [jnp.asarray(rng.standard_normal((r, kv, h, pos), np.float32)) for _ in range(n)]
    qk = _best(
        lambda q, ks: sum(jnp.sum(jnp.einsum("rkgh,rksh->rkgs", q, k)) for k in ks), q, k_std
    )
    qkt = _best(lambda q, ks: sum(jnp.sum(jnp.einsum("rkgh,rkhs->rkgs", q, k)) for k in ks), q, k_t)
    print(f"  q.k, keys [R, K, P, H]            {qk:7.2f} ms  ({qk / n * 1e3:.0f} us a block)")
    print(f"  q.k, keys [R, K, H, P]            {qkt:7.2f} ms  ({qkt / n * 1e3:.0f} us a block)")
    vals = [jnp.asarray(rng.standard_normal((r, kv, pos, h), np.float32)) for _ in range(n)]

    def both(q, ks, vs, dtype):
        out = 0.0
        for k, v in zip(ks, vs, strict=True):
            s = jnp.einsum(
                "rkgh,rkhs->rkgs", q.astype(dtype), k, preferred_element_type=jnp.float32
            )
            o = jnp.einsum(
                "rkgs,rksh->rkgh", s.astype(dtype), v, preferred_element_type=jnp.float32
            )
            out = out + jnp.sum(o)
        return out

    for dtype in (jnp.float32, jnp.bfloat16):
        ks = [k.astype(dtype) for k in k_t]
        vs = [v.astype(dtype) for v in vals]
        ms = _best(lambda q, ks, vs, dt=dtype: both(q, ks, vs, dt), q, ks, vs)
        print(f"  q.k + p.v, {jnp.dtype(dtype).name:9s} operands    {ms:7.2f} ms")
    # int8 keys and values: int8 x int8 -> int32 dots (queries and probabilities int8 too)
    k8 = [jnp.asarray(rng.integers(-127, 128, k.shape, dtype=np.int8)) for k in k_t]
    v8 = [jnp.asarray(rng.integers(-127, 128, v.shape, dtype=np.int8)) for v in vals]

    def both_int8(q, ks, vs):
        out = 0.0
        q8 = jnp.clip(jnp.round(q * 20), -127, 127).astype(jnp.int8)
        for k, v in zip(ks, vs, strict=True):
            s = jnp.einsum("rkgh,rkhs->rkgs", q8, k, preferred_element_type=jnp.int32)
            p8 = (s >> 12).astype(jnp.int8)
            o = jnp.einsum("rkgs,rksh->rkgh", p8, v, preferred_element_type=jnp.int32)
            out = out + jnp.sum(o.astype(jnp.float32))
        return out

    ms = _best(both_int8, q, k8, v8)
    print(f"  q.k + p.v, int8 operands       {ms:7.2f} ms")

    # One decode step's cache write into each block: a scatter of one position per row.
    print(f"cache writes, {n} blocks of {r} rows x {pos} positions (one position per row):")
    rows_i = jnp.arange(r, dtype=jnp.int32)[:, None]
    at_pos = jnp.full((r, 1), pos // 2, jnp.int32)
    new = jnp.asarray(rng.standard_normal((r, 1, kv, h), np.float32))

    def writes(blocks, new, bits: bool):
        out = []
        for blk in blocks:
            if bits:  # bfloat16 stored, written as its uint16 bits
                u = jax.lax.bitcast_convert_type(blk, jnp.uint16)
                val = jax.lax.bitcast_convert_type(new.astype(blk.dtype), jnp.uint16)
                u = u.at[rows_i, :, at_pos, :].set(val, mode="drop")
                out.append(jax.lax.bitcast_convert_type(u, blk.dtype))
            else:
                out.append(blk.at[rows_i, :, at_pos, :].set(new.astype(blk.dtype), mode="drop"))
        return out

    for name, dtype, bits in [
        ("float32", jnp.float32, False),
        ("bfloat16", jnp.bfloat16, False),
        ("bfloat16 as uint16 bits", jnp.bfloat16, True),
        ("int8", jnp.int8, False),
    ]:
        blocks = [jnp.array(v, dtype) for v in vals]  # copies: these get donated
        fn = jax.jit(lambda b, x, bits=bits: writes(b, x, bits), donate_argnums=0)
        blocks = fn(blocks, new)  # compile; then time in place (the blocks are donated)
        jax.block_until_ready(blocks)
        best = float("inf")
        for _ in range(8):
            t = time.perf_counter()
            blocks = fn(blocks, new)
            jax.block_until_ready(blocks)
            best = min(best, time.perf_counter() - t)
        print(f"  {name:28s} {best * 1e3:7.2f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
