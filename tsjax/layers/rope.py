"""Rotary position embedding, NeoX layout (rotate the two halves of each head).

llama.cpp's converter permutes Llama's q/k rows to the interleaved layout; the loader undoes
that permutation, so every family uses this one function.

The angles depend only on the positions and the layer's base, so the decoder looks the
rows' cos/sin up once per step and distinct base, in a table of every position the step can
reach (`rope_lookup`, a constant of the program), and every layer's q and k rotate with them
(`rotate`). Computed in the step instead, XLA:CPU fused the sine and cosine into every
rotation and evaluated them once per element of every head of every layer (0.7 ms of a
16-row step). One table serves every layer loop (unrolled or scanned), so both round alike.
"""

from __future__ import annotations

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
    half = head_dim // 2
    exponent = np.arange(half, dtype=np.float32) * np.float32(2.0 / head_dim)
    inv_freq = np.float32(1.0) / np.power(np.float32(theta), exponent)
    angles = (np.arange(n_positions, dtype=np.float32) / np.float32(scale))[:, None] * inv_freq

    def look(table: np.ndarray) -> jax.Array:
        rows = jnp.take(jnp.asarray(table), positions, axis=0, mode="clip")  # float32
        return rows[:, :, None, :]

    return look(np.cos(angles)), look(np.sin(angles))


def rotate(x: jax.Array, tables: RopeTables) -> jax.Array:
    """x: [B, T, N, H] rotated by `rope_lookup` tables of its positions."""
    cos, sin = tables
    half = x.shape[-1] // 2
    xf = x.astype(jnp.float32)
    x1, x2 = xf[..., :half], xf[..., half:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
