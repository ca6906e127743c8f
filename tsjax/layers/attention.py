"""Grouped-query attention over a slot-indexed KV cache.

One function serves prefill and decode: the new keys/values for T tokens are scattered into
the cache at each row's positions, then the queries attend over the first `attn_len` cache
positions with a causal (and, per layer, sliding-window) mask. `attn_len` is a static bucket,
so decode reads only as much cache as the longest live sequence needs.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from tsjax.layers.linear import Linear
from tsjax.layers.norms import RMSNorm
from tsjax.layers.rope import apply_rope

NEG_INF = -1e30
# Decode batches at least this big use the fused multiply-reduce form. Measured on XLA:CPU
# (SmolLM2, 2 cores, 150 cached positions): 16 rows 112.8 vs 123.6 ms/step for the einsum
# form; 1 row 35.7 vs 29.9 ms/step, so single rows keep the einsum.
FUSED_DECODE_MIN_ROWS = 4


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_pos: jax.Array,
    window: jax.Array,
    scale: float,
    softcap: float | None,
) -> jax.Array:
    """q: [B, T, N, H]; k, v: [B, K, S, H]; q_pos: [B, T]; window: scalar (0 = global).

    Key j is visible to a query at position p when j <= p and (window == 0 or p - j < window).
    Returns [B, T, N*H].
    """
    b, t, n, h = q.shape
    kv = k.shape[1]
    g = n // kv
    q = q.reshape(b, t, kv, g, h)
    if t == 1 and b >= FUSED_DECODE_MIN_ROWS:
        return _attend_one(q[:, 0], k, v, q_pos[:, 0], window, scale, softcap)
    scores = jnp.einsum("btkgh,bksh->bkgts", q, k, preferred_element_type=jnp.float32) * scale
    if softcap:
        scores = jnp.tanh(scores / softcap) * softcap
    kv_pos = jnp.arange(k.shape[2], dtype=jnp.int32)
    delta = q_pos[:, :, None] - kv_pos[None, None, :]  # [B, T, S]
    visible = (delta >= 0) & ((window <= 0) | (delta < window))
    scores = jnp.where(visible[:, None, None, :, :], scores, NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bksh->btkgh", probs, v)
    return out.reshape(b, t, n * h)


def _attend_one(q, k, v, pos, window, scale, softcap):
    """Decode (one query per row) as broadcast-multiply-reduce: for a batch of rows XLA:CPU
    runs the einsum form's tiny per-(row, head) matrix products as many small dots, slower
    than these fused elementwise loops. q: [B, K, G, H]; k, v: [B, K, S, H]."""
    b, kv, g, h = q.shape
    scores = jnp.sum(q[:, :, :, None, :] * k[:, :, None, :, :], axis=-1) * scale  # [B,K,G,S]
    if softcap:
        scores = jnp.tanh(scores / softcap) * softcap
    delta = pos[:, None] - jnp.arange(k.shape[2], dtype=jnp.int32)[None, :]  # [B, S]
    visible = (delta >= 0) & ((window <= 0) | (delta < window))
    scores = jnp.where(visible[:, None, None, :], scores, NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.sum(probs[..., None] * v[:, :, None, :, :], axis=-2)  # [B, K, G, H]
    return out.reshape(b, 1, kv * g * h).astype(v.dtype)


class Attention(nn.Module):
    """Projections, optional q/k RMSNorm, RoPE, cache write, attention, output projection."""

    n_heads: int
    n_kv_heads: int
    head_dim: int
    norm_eps: float
    qkv_bias: bool = False
    qk_norm: bool = False
    scale: float = 1.0
    softcap: float | None = None
    dtype: jnp.dtype = jnp.float32
    quant: str | None = None

    @nn.compact
    def __call__(
        self, x, positions, cache_k, cache_v, layer, rows, attn_len, window, theta, rope_scale
    ):
        """x: [B, T, D]; positions: [B, T]; cache_k/v: [L, Bc, K, S, H] (all layers);
        rows: [B] cache row of each batch row, or None when the batch is every cache row.
        Returns (out [B, T, D], cache_k, cache_v)."""
        b, t, d = x.shape
        n, kv, h = self.n_heads, self.n_kv_heads, self.head_dim
        q = Linear(n * h, self.qkv_bias, self.dtype, self.quant, name="q")(x).reshape(b, t, n, h)
        k = Linear(kv * h, self.qkv_bias, self.dtype, self.quant, name="k")(x).reshape(b, t, kv, h)
        v = Linear(kv * h, self.qkv_bias, self.dtype, self.quant, name="v")(x).reshape(b, t, kv, h)
        if self.qk_norm:
            q = RMSNorm(self.norm_eps, self.dtype, name="q_norm")(q)
            k = RMSNorm(self.norm_eps, self.dtype, name="k_norm")(k)
        q = apply_rope(q, positions, theta, rope_scale)
        k = apply_rope(k, positions, theta, rope_scale)

        # Scatter the new K/V; rows >= Bc (batch padding) and positions >= S are dropped.
        row_idx = jnp.arange(b, dtype=jnp.int32) if rows is None else rows
        ri = row_idx[:, None]
        cache_k = cache_k.at[layer, ri, :, positions, :].set(k.astype(cache_k.dtype), mode="drop")
        cache_v = cache_v.at[layer, ri, :, positions, :].set(v.astype(cache_v.dtype), mode="drop")

        layer_k = jax.lax.dynamic_index_in_dim(cache_k, layer, 0, keepdims=False)
        layer_v = jax.lax.dynamic_index_in_dim(cache_v, layer, 0, keepdims=False)
        if rows is None:
            keys, values = layer_k[:, :, :attn_len], layer_v[:, :, :attn_len]
        else:
            keys = jnp.take(layer_k[:, :, :attn_len], rows, axis=0, mode="clip")
            values = jnp.take(layer_v[:, :, :attn_len], rows, axis=0, mode="clip")
        out = attend(
            q,
            keys.astype(q.dtype),
            values.astype(q.dtype),
            positions,
            window,
            self.scale,
            self.softcap,
        )
        return Linear(d, False, self.dtype, self.quant, name="o")(out), cache_k, cache_v
