"""Rotary position embedding, NeoX layout (rotate the two halves of each head).

llama.cpp's converter permutes Llama's q/k rows to the interleaved layout; the loader undoes
that permutation, so every family uses this one function.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def apply_rope(
    x: jax.Array, positions: jax.Array, theta: jax.Array, scale: float = 1.0
) -> jax.Array:
    """x: [B, T, N, H]; positions: [B, T] int; theta: scalar base (may be traced, per layer).

    `scale` is linear position interpolation (positions / scale), as in Gemma 3's larger models.
    """
    h = x.shape[-1]
    half = h // 2
    exponent = jnp.arange(half, dtype=jnp.float32) * (2.0 / h)
    inv_freq = 1.0 / jnp.power(jnp.asarray(theta, jnp.float32), exponent)  # [H/2]
    angles = (positions.astype(jnp.float32) / scale)[..., None] * inv_freq  # [B, T, H/2]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    xf = x.astype(jnp.float32)
    x1, x2 = xf[..., :half], xf[..., half:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
