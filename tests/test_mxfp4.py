"""MXFP4 (GGUF's GPT-OSS expert format) against the gguf package: host dequantization bit for
bit over every scale byte and every nibble pair, through a real GGUF file; the lossless int8
blocks; the in-step decode (exact but for the two subnormal scales, which XLA:CPU flushes to
zero); and gguf's own quantizer's output round-tripping.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import quants

from tsjax import mxfp4


def _raw(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Random MXFP4 bytes [rows, cols / 32 * 17] whose scale bytes run through 0..255 and whose
    nibble bytes through 0..255."""
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows, cols // 32, 17), dtype=np.uint8)
    raw[..., 0] = np.arange(raw[..., 0].size).reshape(raw[..., 0].shape) % 256
    raw[..., 1:] = np.arange(raw[..., 1:].size).reshape(raw[..., 1:].shape) % 256
    return raw.reshape(rows, -1)


def _bits(a) -> np.ndarray:
    return np.asarray(a, np.float32).view(np.uint32)


def test_dequantize_bit_exact_with_gguf():
    shape = (4, 32, 256)  # [E, out, in]: 4096 blocks, every scale byte 16 times
    raw = _raw(4 * 32, 256)
    with np.errstate(over="ignore"):  # scale bytes near 255 overflow to inf in both
        ref = quants.dequantize(raw, Q.MXFP4).reshape(shape)
        ours = mxfp4.dequantize_raw(raw, shape)
    np.testing.assert_array_equal(_bits(ours), _bits(ref))
    scales, nibbles = mxfp4.unpack(raw, shape)
    assert scales.shape == (4, 32, 8) and nibbles.shape == (4, 32, 8, 16)
    np.testing.assert_array_equal(mxfp4.pack(scales, nibbles), raw.reshape(4, 32, -1))


def test_int8_blocks_are_lossless():
    raw = _raw(64, 128, seed=1)
    scales, nibbles = mxfp4.unpack(raw, (64, 128))
    q, block_scale = mxfp4.to_int8_blocks(scales, nibbles)
    assert q.dtype == np.int8 and np.abs(q).max() == 12
    with np.errstate(over="ignore", invalid="ignore"):
        values = (q.reshape(64, 4, 32) * block_scale[..., None]).reshape(64, 128)
        np.testing.assert_array_equal(_bits(values), _bits(mxfp4.dequantize(scales, nibbles)))


def test_in_step_decode():
    raw = _raw(32, 256, seed=2)
    scales, nibbles = mxfp4.unpack(raw, (32, 256))
    with np.errstate(over="ignore"):
        ref = mxfp4.dequantize(scales, nibbles)
    ours = np.asarray(mxfp4.decode(jnp.asarray(scales), jnp.asarray(nibbles)))
    # scale bytes 0 and 1 are float32 subnormals (2**-128, 2**-127), which XLA:CPU flushes
    normal = np.repeat(scales >= 2, 32, axis=-1)
    np.testing.assert_array_equal(_bits(ours[normal]), _bits(ref[normal]))
    assert np.all(np.abs(ours[~normal]) <= np.abs(ref[~normal]))  # kept or 0
    bf16 = np.asarray(mxfp4.decode(jnp.asarray(scales), jnp.asarray(nibbles), jnp.bfloat16))
    finite = normal & np.isfinite(ref) & (np.abs(ref) < 1e38)
    np.testing.assert_array_equal(bf16[finite].astype(np.float32), ref[finite])  # exact


def test_gguf_quantizer_round_trip(tmp_path):
    """Weights through gguf's MXFP4 quantizer and a GGUF file read back by tsjax.gguf: the
    file's bytes dequantize here as gguf does it."""
    from gguf import GGUFWriter

    from tsjax.gguf import GGUFFile

    rng = np.random.default_rng(3)
    w = (rng.standard_normal((8, 16, 64)) * 0.05).astype(np.float32)
    raw = quants.quantize(w, Q.MXFP4)
    path = tmp_path / "mxfp4.gguf"
    writer = GGUFWriter(path, "gpt-oss")
    writer.add_tensor("blk.0.ffn_up_exps.weight", raw, raw_dtype=Q.MXFP4)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    g = GGUFFile(path)
    info = g.info("blk.0.ffn_up_exps.weight")
    assert info.shape == w.shape and info.qtype == "MXFP4"
    t = g._get("blk.0.ffn_up_exps.weight")
    file_raw = np.asarray(g._mm[t.offset : t.offset + t.n_bytes])
    ours = mxfp4.dequantize_raw(file_raw, w.shape)
    np.testing.assert_array_equal(_bits(ours), _bits(g.tensor("blk.0.ffn_up_exps.weight")))
    assert np.max(np.abs(ours - w)) <= 0.25 * np.abs(w).max()  # 4-bit quantization error
