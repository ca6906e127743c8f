"""Block-quantized weights: values in blocks of 32 along the input axis, as GGUF stores them,
and the arithmetic on them in plain XLA (accelerators, and the reference for the CPU kernels).

Two layouts (W is a Linear's weight [N, K], output features first, as in GGUF):
- q8: `q` int8 [N, K], `d` float16 [K/32, N]; w = d q. GGUF's Q8_0, unpacked.
- q4: `qs` uint8 [N, K/2], `d` and `m` float16 [K/32, N]; w = d q + m with q in 0..15, byte j
  of a block holding its element j (low nibble) and j+16 (high nibble). GGUF's Q4_1 (and Q4_0,
  and every 32-value sub-block of Q4_K, are this form).
Scales are stored block-major ([K/32, N]) so that the CPU kernels load eight channels' scales as
one vector.

The conversions take the float tensor (what `tsjax.loader` reads, one tensor at a time) and are
exact where the file's own blocks are of that form: Q8_0 into q8, Q4_0 and Q4_1 (quantized by
llama.cpp's reference quantizer, whose blocks reach both ends of 0..15) into q4. Anything else is
quantized afresh into the block form (q8: an error of at most 1/254 of each block's largest
magnitude).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from tsjax.quants import FOUR_BIT_TYPES

QK = 32  # values per block


def _blocks(w: np.ndarray) -> np.ndarray:
    n, k = w.shape
    if k % QK:
        raise ValueError(f"input size {k} is not a multiple of {QK}")
    return np.asarray(w, np.float32).reshape(n, k // QK, QK)


def q8_blocks(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Float [N, K] -> (q int8 [N, K], d float16 [K/32, N]), symmetric per block of 32."""
    wb = _blocks(w)
    d = (np.abs(wb).max(-1) / 127.0).astype(np.float16)
    d32 = d.astype(np.float32)[..., None]
    q = np.round(np.divide(wb, d32, out=np.zeros_like(wb), where=d32 > 0))
    return np.clip(q, -127, 127).astype(np.int8).reshape(w.shape), np.ascontiguousarray(d.T)


def q4_blocks(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Float [N, K] -> (qs uint8 [N, K/2], d float16 [K/32, N], m float16 [K/32, N]): each
    block spans its own minimum to maximum in 16 steps."""
    wb = _blocks(w)
    lo, hi = wb.min(-1), wb.max(-1)
    m = lo.astype(np.float16)
    d = ((hi - m.astype(np.float32)) / 15.0).astype(np.float16)
    d32, m32 = d.astype(np.float32)[..., None], m.astype(np.float32)[..., None]
    q = np.round(np.divide(wb - m32, d32, out=np.zeros_like(wb), where=d32 > 0))
    q = np.clip(q, 0, 15).astype(np.uint8)
    qs = q[..., : QK // 2] | (q[..., QK // 2 :] << 4)
    return qs.reshape(w.shape[0], -1), np.ascontiguousarray(d.T), np.ascontiguousarray(m.T)


def q8_dequantize(q: jax.Array, d: jax.Array, dtype=jnp.float32) -> jax.Array:
    """(q [N, K], d [K/32, N]) -> W [N, K] in `dtype`."""
    n, k = q.shape
    w = q.reshape(n, k // QK, QK).astype(dtype) * d.T.astype(dtype)[..., None]
    return w.reshape(n, k)


def q4_values(qs: jax.Array) -> jax.Array:
    """uint8 [N, K/2] -> the 4-bit values [N, K] (uint8 0..15), in element order."""
    n, half = qs.shape
    b = qs.reshape(n, half // (QK // 2), QK // 2)
    return jnp.concatenate([b & 0x0F, b >> 4], axis=-1).reshape(n, 2 * half)


def q4_dequantize(qs: jax.Array, d: jax.Array, m: jax.Array, dtype=jnp.float32) -> jax.Array:
    """(qs [N, K/2], d, m [K/32, N]) -> W [N, K] in `dtype`."""
    q = q4_values(qs)
    n, k = q.shape
    w = q.reshape(n, k // QK, QK).astype(dtype) * d.T.astype(dtype)[..., None]
    return (w + m.T.astype(dtype)[..., None]).reshape(n, k)


def quantize_activations(x: jax.Array) -> jax.Array:
    """x [..., K] float -> x rounded as the CPU kernels see it: int8 with one scale per block of
    32 (amax / 127), multiplied back out (float32)."""
    shape = x.shape
    xb = x.astype(jnp.float32).reshape(*shape[:-1], shape[-1] // QK, QK)
    s = jnp.max(jnp.abs(xb), axis=-1, keepdims=True) / 127.0
    q = jnp.round(jnp.where(s > 0, xb / jnp.where(s > 0, s, 1.0), 0.0))
    return (q * s).reshape(shape)


def reference_matmul(x: jax.Array, w: jax.Array, quantized_inputs: bool) -> jax.Array:
    """x [..., K] @ w [N, K]^T -> [..., N] float32 with float32 accumulation; with
    `quantized_inputs` x is first rounded as the CPU kernels round it."""
    if quantized_inputs:
        x = quantize_activations(x)
    dims = (((x.ndim - 1,), (1,)), ((), ()))
    return jax.lax.dot_general(x, w, dims, preferred_element_type=jnp.float32)


def _halves(raw: np.ndarray, at: int) -> np.ndarray:
    return raw[..., at : at + 2].copy().view(np.float16)[..., 0]


def q4_from_gguf(raw: np.ndarray, qtype: str, shape: tuple[int, int]):
    """A GGUF tensor's own bytes (uint8, `qtype` in FOUR_BIT_TYPES, numpy `shape` [N, K]) ->
    (qs uint8 [N, K/2], d float16 [K/32, N], m float16 [K/32, N]), the same values: exact for
    Q4_0 and Q4_1; Q4_K's sub-block scale and offset (d * 6-bit, dmin * 6-bit) are rounded to
    float16 (2^-11 relative)."""
    n, k = shape
    if qtype in ("Q4_0", "Q4_1"):
        size = 18 if qtype == "Q4_0" else 20
        b = raw.reshape(n, k // QK, size)
        d = _halves(b, 0)
        m = (-8 * d.astype(np.float32)).astype(np.float16) if qtype == "Q4_0" else _halves(b, 2)
        qs = b[..., size - 16 :].reshape(n, k // 2)
        return np.ascontiguousarray(qs), np.ascontiguousarray(d.T), np.ascontiguousarray(m.T)
    if qtype != "Q4_K":
        raise ValueError(f"{qtype} is not a 4-bit block type")
    b = raw.reshape(n, k // 256, 144)
    d, dmin = _halves(b, 0).astype(np.float32), _halves(b, 2).astype(np.float32)
    s = b[..., 4:16].astype(np.uint8)  # 8 six-bit scales and 8 six-bit offsets, packed
    sc = np.concatenate([s[..., 0:4] & 63, (s[..., 8:12] & 0xF) | ((s[..., 0:4] >> 6) << 4)], -1)
    mn = np.concatenate([s[..., 4:8] & 63, (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)], -1)
    q = b[..., 16:].reshape(n, k // 256, 4, 32)  # 32 bytes per pair of sub-blocks
    vals = np.stack([q & 0x0F, q >> 4], axis=3).reshape(n, k // QK, QK)  # sub-blocks in order
    qs = vals[..., : QK // 2] | (vals[..., QK // 2 :] << 4)
    sub_d = (d[..., None] * sc).reshape(n, k // QK).astype(np.float16)
    sub_m = (-dmin[..., None] * mn).reshape(n, k // QK).astype(np.float16)
    return qs.reshape(n, k // 2), np.ascontiguousarray(sub_d.T), np.ascontiguousarray(sub_m.T)


def block_matmul(x: jax.Array, w: dict[str, jax.Array]) -> jax.Array:
    """x [..., K] @ W^T for W in blocks (`w`: {"q", "d"} for q8, {"qs", "d", "m"} for q4)
    -> [..., N] in x's dtype.

    On CPU: the `blockdot` kernels (activations quantized per block of 32 inside), or where they
    cannot be built the same arithmetic in XLA (`xla_block_matmul`, the weights dequantized on
    every call: several times slower). Elsewhere: weight-only, `xla_block_matmul` with x as it
    comes (bfloat16 on accelerators)."""
    if jax.default_backend() != "cpu":
        return xla_block_matmul(x, w, quantize_inputs=False)
    from tsjax.kernels import blockdot

    if not blockdot.available():
        return xla_block_matmul(x, w, quantize_inputs=True)
    if "qs" in w:
        return blockdot.q4_matmul(x, w["qs"], w["d"], w["m"]).astype(x.dtype)
    return blockdot.q8_matmul(x, w["q"], w["d"]).astype(x.dtype)


def xla_block_matmul(x: jax.Array, w: dict[str, jax.Array], quantize_inputs: bool) -> jax.Array:
    """`block_matmul` in plain XLA: the weights dequantized to x's dtype inside the step (on an
    accelerator XLA can fuse that into the matmul), float32 accumulation; with
    `quantize_inputs` x is first rounded as the CPU kernels round it."""
    dt = x.dtype
    if "qs" in w:
        wf = q4_dequantize(w["qs"], w["d"], w["m"], dt)
    else:
        wf = q8_dequantize(w["q"], w["d"], dt)
    return reference_matmul(x, wf, quantized_inputs=quantize_inputs).astype(dt)


def q8_from_gguf(raw: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """A Q8_0 tensor's own bytes (uint8, numpy `shape` [N, K]) -> (q int8 [N, K], d float16
    [K/32, N]): the same values, without a float copy."""
    n, k = shape
    b = raw.reshape(n, k // QK, 34)
    q = b[..., 2:].copy().view(np.int8).reshape(n, k)
    return q, np.ascontiguousarray(_halves(b, 0).T)


def tensor_blocks(
    w: np.ndarray | None, qtype: str, raw: np.ndarray | None, four_bit: bool, shape=None
) -> dict[str, np.ndarray]:
    """One Linear weight [N, K] -> its blocks: 4-bit {"qs", "d", "m"} when `four_bit` and the
    file holds it in a 4-bit type, else int8 {"q", "d"}. From the file's own bytes `raw` where
    given and the type allows (4-bit types, Q8_0: exact, no float copy; `shape` [N, K] then
    stands for `w`), else from the float values `w` (exact for Q8_0 and llama.cpp's reference
    Q4_0/Q4_1). Pure: the loader calls it per tensor."""
    shape = tuple(w.shape) if w is not None else tuple(shape)
    if four_bit and qtype in FOUR_BIT_TYPES:
        qs, d, m = q4_from_gguf(raw, qtype, shape) if raw is not None else q4_blocks(w)
        return {"qs": qs, "d": d, "m": m}
    if qtype == "Q8_0" and raw is not None:
        q, d = q8_from_gguf(raw, shape)
    else:
        q, d = q8_blocks(w)
    return {"q": q, "d": d}
