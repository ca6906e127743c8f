"""Rotary position embedding, NeoX layout (rotate the two halves of each head).

llama.cpp's converter permutes Llama's q/k rows to the interleaved layout; the loader undoes
that permutation, so every family uses this one function.

The angles depend only on the positions and the layer's base, so the decoder looks the
rows' cos/sin up once per step and distinct base, in a table of every position the step can
reach (`rope_lookup`, a constant of the program), and every layer's q and k rotate with them
(`rotate`). Computed in the step instead, XLA:CPU fused the sine and cosine into every
rotation and evaluated them once per element of every head of every layer (0.7 ms of a
16-row step). One table serves every layer loop (unrolled or scanned), so both round alike.

YaRN (gpt-oss, Mistral 3) changes only the frequencies and scales the tables
(`yarn_frequencies`, `yarn_attention_factor`, then `rope_lookup_freqs`); Mistral 3 also scales
its queries by position (`attention_temperature`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

#: (cos, sin), each [B, T, 1, H/2] float32.
RopeTables = tuple[jax.Array, jax.Array]


def rope_lookup(
    positions: jax.Array, theta: float, scale: float, head_dim: int, n_positions: int
) -> RopeTables:
    """The (cos, sin) of positions [B, T] for base `theta`, each [B, T, 1, H/2], looked up in
    a constant table of the positions 0 .. n_positions - 1 (later ones read its last entry).
    `scale` is linear position interpolation (positions / scale), as in Gemma 3's larger
    models."""
    return rope_lookup_freqs(positions, rope_frequencies(theta, head_dim), n_positions, scale)


def rope_frequencies(theta: float, head_dim: int) -> np.ndarray:
    """The inverse frequencies theta ** (-2i / H), i < H/2: [H/2] float32."""
    exponent = np.arange(head_dim // 2, dtype=np.float32) * np.float32(2.0 / head_dim)
    return np.float32(1.0) / np.power(np.float32(theta), exponent)


def layer_frequencies(
    theta: float, head_dim: int, factors: tuple[float, ...] | None, width: int
) -> np.ndarray:
    """A layer's inverse frequencies [width] float32: theta ** (-2i / H) for i < H/2, each
    divided by llama.cpp's `rope_freqs` factor where given (Gemma 4's global layers: 1 for the
    pairs that rotate, 1e30 for those that pass through, as transformers' "proportional"
    RoPE, which zeroes them), then zeros up to `width` (never read: `rotate` reads H/2)."""
    inv = rope_frequencies(theta, head_dim)
    if factors:
        inv = (inv / np.asarray(factors[: head_dim // 2], np.float32)).astype(np.float32)
    return np.pad(inv, (0, width - inv.shape[0]))


def rope_lookup_freqs(
    positions: jax.Array,
    inv_freq: np.ndarray,
    n_positions: int,
    scale: float = 1.0,
    magnitude: float = 1.0,
) -> RopeTables:
    """`rope_lookup` for given inverse frequencies [H/2]; the tables are multiplied by
    `magnitude` (YaRN's attention factor, which thereby scales q.k by its square)."""
    angles = (np.arange(n_positions, dtype=np.float32) / np.float32(scale))[:, None] * inv_freq
    cos, sin = np.cos(angles), np.sin(angles)
    if magnitude != 1.0:
        cos, sin = cos * np.float32(magnitude), sin * np.float32(magnitude)

    def look(table: np.ndarray) -> jax.Array:
        rows = jnp.take(jnp.asarray(table), positions, axis=0, mode="clip")  # float32
        return rows[:, :, None, :]

    return look(cos), look(sin)


def yarn_frequencies(
    theta: float,
    head_dim: int,
    factor: float,
    original_positions: int,
    beta_fast: float = 32.0,
    beta_slow: float = 1.0,
    truncate: bool = True,
) -> np.ndarray:
    """YaRN's inverse frequencies [H/2] (Peng et al. 2023): the fast dimensions (more than
    `beta_fast` turns over `original_positions`) keep their frequency, the slow ones (fewer
    than `beta_slow` turns) are divided by `factor`, and a linear ramp blends the ones between.
    `truncate` rounds the ramp's ends outwards to whole dimensions, as llama.cpp always does
    and transformers does unless the config says `truncate: false` (gpt-oss's does, as its
    reference implementation)."""
    # theta ** (2i / H) in float32 as transformers computes it (rope_frequencies rounds the
    # exponent differently: a last-bit difference, worth matching here)
    wavelength = np.power(np.float32(theta), np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)
    extrapolation = np.float32(1) / wavelength
    interpolation = np.float32(1) / (np.float32(factor) * wavelength)

    def dim_of(turns: float) -> float:  # the dimension that turns `turns` times
        return (
            head_dim * math.log(original_positions / (turns * 2 * math.pi)) / (2 * math.log(theta))
        )

    low, high = dim_of(beta_fast), dim_of(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # as both references: no division by zero
    ramp = np.clip((np.arange(head_dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    keep = np.float32(1) - ramp.astype(np.float32)  # 1: extrapolate (keep the frequency)
    return (interpolation * (1 - keep) + extrapolation * keep).astype(np.float32)


def yarn_attention_factor(
    factor: float, mscale: float | None = None, mscale_all_dim: float | None = None
) -> float:
    """YaRN's magnitude for the cos/sin tables: 0.1 ln(factor) + 1, or with DeepSeek-style
    `mscale` / `mscale_all_dim` (Mistral 3: GGUF `rope.scaling.yarn_log_multiplier`) the
    ratio of the two such terms. 1 when factor <= 1."""

    def m(scale: float) -> float:
        return 1.0 if factor <= 1 else 0.1 * scale * math.log(factor) + 1.0

    if mscale and mscale_all_dim:
        return m(mscale) / m(mscale_all_dim)
    return m(1.0)


@dataclass(frozen=True)
class Yarn:
    """A model's YaRN scaling (GGUF `rope.scaling.*`, type "yarn"): its frequencies for a base
    and head size (`yarn_frequencies`), and the magnitude of its cos/sin tables
    (`yarn_attention_factor`, computed by the family from what its file says)."""

    factor: float
    original_positions: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True
    magnitude: float = 1.0

    def frequencies(self, theta: float, head_dim: int) -> np.ndarray:
        return yarn_frequencies(
            theta,
            head_dim,
            self.factor,
            self.original_positions,
            self.beta_fast,
            self.beta_slow,
            self.truncate,
        )


def mrope_choice(sections: tuple[int, ...], width: int) -> np.ndarray:
    """[width] int32: which of a token's (t, h, w) positions each rotary frequency turns
    with under interleaved M-RoPE (llama.cpp's IMROPE, transformers'
    `apply_interleaved_mrope`): frequency j (its sector j % sum(sections)) takes h where
    sector % 3 == 1 and sector < 3 * sections[1], w where sector % 3 == 2 and
    sector < 3 * sections[2], t otherwise."""
    total = sum(sections)
    out = np.zeros((width,), np.int32)
    for j in range(width):
        sector = j % total
        if sector % 3 == 1 and sector < 3 * sections[1]:
            out[j] = 1
        elif sector % 3 == 2 and sector < 3 * sections[2]:
            out[j] = 2
    return out


def attention_temperature(positions: jax.Array, beta: float, original_positions: int) -> jax.Array:
    """Mistral 3's (Llama 4's) query scale by position: 1 + beta ln(1 + floor(p / original)),
    [B, T] -> [B, T, 1, 1] float32 to multiply the rotated queries [B, T, N, H] (GGUF:
    `attention.temperature_scale` is beta, `rope.scaling.original_context_length` the
    length)."""
    p = jnp.floor(positions.astype(jnp.float32) / original_positions)
    return (1.0 + beta * jnp.log1p(p))[:, :, None, None]


def rotate(x: jax.Array, tables: RopeTables) -> jax.Array:
    """x: [B, T, N, H] rotated by `rope_lookup` tables of its positions. Tables wider than
    H/2 (made for the widest head of a model whose layers differ, Gemma 4) are read up to
    H/2."""
    cos, sin = tables
    half = x.shape[-1] // 2
    cos, sin = cos[..., :half], sin[..., :half]
    xf = x.astype(jnp.float32)
    x1, x2 = xf[..., :half], xf[..., half:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
