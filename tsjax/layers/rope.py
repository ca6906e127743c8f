"""Rotary position embedding, NeoX layout (rotate the two halves of each head).

llama.cpp's converter permutes Llama's q/k rows to the interleaved layout; the loader undoes
that permutation, so every family uses this one function.

The angles depend only on the positions and the layer's base. Where the bases are known
when tracing (the unrolled layer loop), the decoder looks the rows' cos/sin up in a table of
every position the step can reach (`rope_lookup`, a constant of the program), once per
distinct base, and every layer's q and k rotate with them (`rotate`). Computed in the step
instead, XLA:CPU fused the sine and cosine into every rotation and evaluated them once per
element of every head of every layer (0.7 ms of a 16-row step).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

#: (cos, sin), each [B, T, 1, H/2] float32.
RopeTables = tuple[jax.Array, jax.Array]


def rope_tables(
    positions: jax.Array, theta: jax.Array | float, scale: float | jax.Array, head_dim: int
) -> RopeTables:
    """positions: [B, T] int; theta: scalar base (may be traced, per layer). `scale` is
    linear position interpolation (positions / scale), as in Gemma 3's larger models."""
    half = head_dim // 2
    exponent = jnp.arange(half, dtype=jnp.float32) * (2.0 / head_dim)
    inv_freq = 1.0 / jnp.power(jnp.asarray(theta, jnp.float32), exponent)  # [H/2]
    angles = (positions.astype(jnp.float32) / scale)[..., None] * inv_freq  # [B, T, H/2]
    return jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]


def rope_lookup(
    positions: jax.Array, theta: float, scale: float, head_dim: int, n_positions: int
) -> RopeTables:
    """`rope_tables` for a static base, looked up in a [n_positions, H/2] constant table
    (positions past it read its last entry)."""
    half = head_dim // 2
    exponent = np.arange(half, dtype=np.float32) * np.float32(2.0 / head_dim)
    inv_freq = np.float32(1.0) / np.power(np.float32(theta), exponent)
    angles = (np.arange(n_positions, dtype=np.float32) / np.float32(scale))[:, None] * inv_freq

    def look(table: np.ndarray) -> jax.Array:
        rows = jnp.take(jnp.asarray(table.astype(np.float32)), positions, axis=0, mode="clip")
        return rows[:, :, None, :]

    return look(np.cos(angles)), look(np.sin(angles))


def rotate(x: jax.Array, tables: RopeTables) -> jax.Array:
    """x: [B, T, N, H] rotated by `rope_tables` of its positions."""
    cos, sin = tables
    half = x.shape[-1] // 2
    xf = x.astype(jnp.float32)
    x1, x2 = xf[..., :half], xf[..., half:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)

