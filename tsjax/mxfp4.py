"""MXFP4, the OCP microscaling 4-bit float format GPT-OSS ships its expert weights in, as GGUF
stores it (`GGMLQuantizationType.MXFP4`).

A block is 32 weights along a row, in 17 bytes: one E8M0 scale byte `e`, then 16 bytes whose low
nibbles are weights 0-15 and high nibbles weights 16-31. A nibble is an E2M1 code: sign bit,
then an index into (0, 0.5, 1, 1.5, 2, 3, 4, 6). ggml stores those values doubled, as integers
(`KVALUES`), and halves the scale instead: weight = KVALUES[code] * 2**(e - 128). Every weight is
exactly representable in float32 (and in bfloat16: at most 3 significant bits), so dequantizing
is exact in either.

Ways to hold such a tensor (`benchmarks/moe.py` measures them in the MoE layer):

- `dequantize`: float32 at load (numpy, bit-exact with `gguf.quants.dequantize`, ~4x faster);
  the caller narrows it to the model's weight format, exactly to bfloat16.
- `to_int8_blocks`: exactly to int8 with a float scale per block of 32 (the doubled values
  are small integers, the scales powers of two), the MoE layer's "int8" expert format.
- `unpack` + `decode`: keep the bytes (4.25 bits a weight) and decode each expert's matrix in
  the step, inside the tile that multiplies it. On XLA:CPU the decode (two table lookups a
  weight) costs more than the bytes it saves: the load-time forms run faster.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

BLOCK = 32  # weights per block
BLOCK_BYTES = 17  # 1 scale byte + 16 bytes of nibbles

#: E2M1 codes -> value x 2 (ggml's kvalues_mxfp4).
KVALUES = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], np.int8)


def _e8m0_half_table() -> np.ndarray:
    """2**(e - 128) for every scale byte e, built from its bits as ggml does (e < 2 gives the
    float32 subnormals 2**-128 and 2**-127), so the values match ggml's bit for bit."""
    e = np.arange(256, dtype=np.uint32)
    bits = np.where(e < 2, np.uint32(0x00200000) << e, (e - 1) << np.uint32(23))
    return bits.astype(np.uint32).view(np.float32)


#: scale byte -> float32 multiplier of the doubled values.
E8M0_HALF = _e8m0_half_table()


def unpack(raw: np.ndarray, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """GGUF MXFP4 bytes of a tensor of numpy `shape` [..., I] -> (scales uint8 [..., I/32],
    nibbles uint8 [..., I/32, 16]), views of `raw` (no copy)."""
    *lead, cols = shape
    if cols % BLOCK:
        raise ValueError(f"MXFP4 rows hold whole blocks of {BLOCK}; got {cols} columns")
    blocks = np.asarray(raw, np.uint8).reshape(*lead, cols // BLOCK, BLOCK_BYTES)
    return blocks[..., 0], blocks[..., 1:]


def pack(scales: np.ndarray, nibbles: np.ndarray) -> np.ndarray:
    """The inverse of `unpack`: (scales [..., I/32], nibbles [..., I/32, 16]) -> GGUF bytes
    [..., I/32 * 17]."""
    out = np.concatenate([scales[..., None], nibbles], axis=-1).astype(np.uint8)
    return out.reshape(*scales.shape[:-1], -1)


def dequantize(scales: np.ndarray, nibbles: np.ndarray) -> np.ndarray:
    """(scales [..., G], nibbles [..., G, 16]) -> float32 [..., G * 32], on the host."""
    codes = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1)  # [..., G, 32]
    values = KVALUES[codes].astype(np.float32) * E8M0_HALF[scales][..., None]
    return values.reshape(*scales.shape[:-1], -1)


def to_int8_blocks(scales: np.ndarray, nibbles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """MXFP4 -> int8 weights with a float32 scale per block of 32 (the MoE layer's "int8"
    expert format), losslessly: the doubled E2M1 values are the integers -12..12, the scale
    2**(e - 128). (scales [..., G], nibbles [..., G, 16]) -> (int8 [..., G * 32], float32
    [..., G])."""
    codes = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1)
    return KVALUES[codes].reshape(*scales.shape[:-1], -1), E8M0_HALF[scales]


def dequantize_raw(raw: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """GGUF MXFP4 bytes -> float32 of numpy `shape`."""
    return dequantize(*unpack(raw, shape)).reshape(shape)


def decode(scales: jax.Array, nibbles: jax.Array, dtype=jnp.float32) -> jax.Array:
    """`dequantize` in the step: (scales [..., G], nibbles [..., G, 16]) -> [..., G * 32] in
    `dtype`, exact in float32 and bfloat16 except for scale bytes 0 and 1 (float32
    subnormals, which XLA:CPU flushes to zero). The tables have 16 and 256 entries."""
    codes = jnp.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1).astype(jnp.int32)
    kv = jnp.asarray(KVALUES, jnp.float32)[codes]
    scale = jnp.asarray(E8M0_HALF)[scales.astype(jnp.int32)][..., None]
    return (kv * scale).astype(dtype).reshape(*scales.shape[:-1], -1)
