"""Attention over contiguous keys and values: the stacked layout's (every step), and the
blocked layout's prefill and scoring (which gather their few rows into contiguous arrays).

Key j is visible to a query at position p when j <= p and (window == 0 or p - j < window).
Inside a bidirectional span of embeddings (`tsjax.spans`) the query's `key_end` replaces
p + 1 as the end of what it sees, and the window still applies to keys before it, as
llama.cpp masks Gemma 3's images (non-causal, sliding window kept).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

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
    sinks: jax.Array | None = None,
    key_end: jax.Array | None = None,
) -> jax.Array:
    """q: [B, T, N, H]; k, v: [B, K, S, H]; q_pos: [B, T]; window: scalar (0 = global);
    sinks: [N] per-head sink logits (gpt-oss), or None; key_end: [B, T] the end of the keys
    each query sees (None: causal). Returns [B, T, N*H]."""
    b, t, n, h = q.shape
    kv = k.shape[1]
    g = n // kv
    q = q.reshape(b, t, kv, g, h)
    if t == 1 and b >= FUSED_DECODE_MIN_ROWS and key_end is None:
        return _attend_one(q[:, 0], k, v, q_pos[:, 0], window, scale, softcap, sinks)
    scores = jnp.einsum("btkgh,bksh->bkgts", q, k, preferred_element_type=jnp.float32) * scale
    if softcap:
        scores = jnp.tanh(scores / softcap) * softcap
    seen = visible(q_pos, k.shape[2], window, key_end=key_end)  # [B, T, S]
    scores = jnp.where(seen[:, None, None, :, :], scores, NEG_INF)
    sink = None if sinks is None else sinks.reshape(kv, g)[None, :, :, None]
    probs = softmax_with_sink(scores, sink).astype(v.dtype)
    out = jnp.einsum("bkgts,bksh->btkgh", probs, v)
    return out.reshape(b, t, n * h)


def softmax_with_sink(scores: jax.Array, sink: jax.Array | None) -> jax.Array:
    """Softmax over the last axis of scores [..., S], float32. With a sink logit (broadcast
    to scores[..., 0]; gpt-oss learns one per head) the denominator also counts exp(sink):
    the probabilities sum to less than one, the rest going to no value at all."""
    if sink is None:
        return jax.nn.softmax(scores, axis=-1)
    sink = sink.astype(jnp.float32)[..., None]
    top = jnp.maximum(jnp.max(scores, axis=-1, keepdims=True), sink)
    e = jnp.exp(scores - top)
    return e / (jnp.sum(e, axis=-1, keepdims=True) + jnp.exp(sink - top))


def _attend_one(q, k, v, pos, window, scale, softcap, sinks=None):
    """Decode (one query per row) as broadcast-multiply-reduce: for a batch of rows XLA:CPU
    runs the einsum form's tiny per-(row, head) matrix products as many small dots, slower
    than these fused elementwise loops. q: [B, K, G, H]; k, v: [B, K, S, H]."""
    b, kv, g, h = q.shape
    scores = jnp.sum(q[:, :, :, None, :] * k[:, :, None, :, :], axis=-1) * scale  # [B,K,G,S]
    if softcap:
        scores = jnp.tanh(scores / softcap) * softcap
    seen = visible(pos, k.shape[2], window)
    scores = jnp.where(seen[:, None, None, :], scores, NEG_INF)
    probs = softmax_with_sink(scores, None if sinks is None else sinks.reshape(1, kv, g))
    out = jnp.sum(probs[..., None] * v[:, :, None, :, :], axis=-2)  # [B, K, G, H]
    return out.reshape(b, 1, kv * g * h).astype(v.dtype)


def visible(
    q_pos: jax.Array, kv_len: int, window, start: int = 0, key_end: jax.Array | None = None
) -> jax.Array:
    """[..., S] mask of the keys at positions start .. start + S - 1 a query at q_pos [...]
    sees (causal, or below key_end [...]; optional sliding window)."""
    keys = start + jnp.arange(kv_len, dtype=jnp.int32)
    delta = q_pos[..., None] - keys
    seen = delta >= 0 if key_end is None else keys < key_end[..., None]
    return seen & ((window <= 0) | (delta < window))
