"""Grouped-query attention over a slot-indexed KV cache.

One layer serves prefill and decode: the new keys/values for T tokens are scattered into
the cache at each row's positions, then the queries attend over the first `attn_len` cache
positions with a causal (and, per layer, sliding-window) mask. `attn_len` is a static bucket,
so decode reads only as much cache as the longest live sequence needs. With the blocked cache
layout (`tsjax.cache`), decode attends block by block, reading each buffer where it lies.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from tsjax.cache import WriteIndex, batch_write_index, read_rows, write_blocks
from tsjax.layers.linear import Linear
from tsjax.layers.norms import RMSNorm
from tsjax.layers.rope import RopeTables, rotate
from tsjax.shapes import SKIP_MIN_ROWS

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
) -> jax.Array:
    """q: [B, T, N, H]; k, v: [B, K, S, H]; q_pos: [B, T]; window: scalar (0 = global);
    sinks: [N] per-head sink logits (gpt-oss), or None.

    Key j is visible to a query at position p when j <= p and (window == 0 or p - j < window).
    Returns [B, T, N*H].
    """
    b, t, n, h = q.shape
    kv = k.shape[1]
    g = n // kv
    q = q.reshape(b, t, kv, g, h)
    if t == 1 and b >= FUSED_DECODE_MIN_ROWS:
        return _attend_one(q[:, 0], k, v, q_pos[:, 0], window, scale, softcap, sinks)
    scores = jnp.einsum("btkgh,bksh->bkgts", q, k, preferred_element_type=jnp.float32) * scale
    if softcap:
        scores = jnp.tanh(scores / softcap) * softcap
    visible = _visible(q_pos, k.shape[2], window)  # [B, T, S]
    scores = jnp.where(visible[:, None, None, :, :], scores, NEG_INF)
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
    visible = _visible(pos, k.shape[2], window)
    scores = jnp.where(visible[:, None, None, :], scores, NEG_INF)
    probs = softmax_with_sink(scores, None if sinks is None else sinks.reshape(1, kv, g))
    out = jnp.sum(probs[..., None] * v[:, :, None, :, :], axis=-2)  # [B, K, G, H]
    return out.reshape(b, 1, kv * g * h).astype(v.dtype)


def _visible(q_pos, kv_len: int, window, start: int = 0):
    """[..., S] mask of the keys at positions start .. start + S - 1 a query at q_pos [...]
    sees (causal, optional sliding window)."""
    delta = q_pos[..., None] - (start + jnp.arange(kv_len, dtype=jnp.int32))
    return (delta >= 0) & ((window <= 0) | (delta < window))


def attend_blocks(
    q,
    k_blocks,
    v_blocks,
    pos,
    attn_len,
    window,
    scale,
    softcap,
    sinks=None,
    skip_min_rows=SKIP_MIN_ROWS,
):
    """Decode attention for the cache rows [0, b) straight from the blocked cache: per row
    block, scores against each position block below `attn_len` (batched dots over whole
    buffers; key blocks are [R, K, H, P]), one softmax over their concatenation, then the
    value blocks' weighted sum. q: [b, K, G, H]; pos: [b]. Returns [b, K*G*H].

    A row block of at least `skip_min_rows` rows none of which reaches the last position
    block below `attn_len` skips it (a `lax.cond` on its furthest row). Spans of 256
    positions and more are two blocks (`StepShapes.split_span`), so there such a step reads
    at most 1.5x the cache its rows need instead of 2x."""
    b, kv, g, h = q.shape
    out, lo = [], 0
    for kb, vb in zip(k_blocks, v_blocks, strict=True):
        if lo >= b:
            break
        r = kb[0].shape[0]
        qr, pr = q[lo : lo + r], pos[lo : lo + r]
        n = qr.shape[0]  # < r: the batch ends inside this block; read only its first n rows
        used, starts = [], []
        start = 0
        for kblk, vblk in zip(kb, vb, strict=True):
            if start >= attn_len:
                break
            if n < r:
                kblk, vblk = kblk[:n], vblk[:n]
            used.append((kblk, vblk))
            starts.append(start)
            start += vblk.shape[2]

        def attend(blocks, qr, pr):
            return _attend_row_block(qr, pr, blocks, window, scale, softcap, sinks)

        if len(used) == 1 or n < skip_min_rows:
            o = attend(used, qr, pr)
        else:
            # Read the last block (a split span's upper half, or the bucket's last span)
            # only when a row reaches it. Two branches, not one per block: each branch
            # compiles its own attention. Rows past the bucket are padding: their writes are
            # dropped and what they read does not matter.
            reach = jnp.max(jnp.where(pr < attn_len, pr, 0))
            o = jax.lax.cond(
                reach >= starts[-1],
                functools.partial(attend, used),
                functools.partial(attend, used[:-1]),
                qr,
                pr,
            )
        out.append(o)
        lo += r
    out = jnp.concatenate(out, axis=0)
    if out.shape[0] < b:  # a padded batch past the cache's rows
        out = jnp.pad(out, ((0, b - out.shape[0]), (0, 0), (0, 0), (0, 0)))
    return out[:b].reshape(b, kv * g * h)


def _attend_row_block(qr, pr, used, window, scale, softcap, sinks=None):
    """One row block's attention over the position blocks `used` [(keys, values)], from
    position 0. qr: [r, K, G, H]; pr: [r]. Returns [r, K, G, H].

    Block by block, with no concatenated scores: the softmax's max spans every block, each
    block's exponentials feed its own value dot, and the sum of the products is divided by
    the sum of the exponentials at the end ([r, K, G, H] divides, not [r, K, G, S])."""
    q = qr * jnp.asarray(scale, qr.dtype)
    scores, start = [], 0
    for kblk, _ in used:
        sc = jnp.einsum("rkgh,rkhs->rkgs", q, kblk.astype(q.dtype))
        if softcap:
            sc = jnp.tanh(sc / softcap) * softcap
        visible = _visible(pr, sc.shape[-1], window, start)
        scores.append(jnp.where(visible[:, None, None, :], sc, NEG_INF))
        start += sc.shape[-1]
    top = functools.reduce(jnp.maximum, [jnp.max(sc, axis=-1, keepdims=True) for sc in scores])
    num, den = 0, 0
    if sinks is not None:  # the sink's term of the denominator (`softmax_with_sink`)
        sink = sinks.reshape(1, *top.shape[1:3], 1).astype(top.dtype)
        top = jnp.maximum(top, sink)
        den = jnp.exp(sink - top)
    for sc, (_, vblk) in zip(scores, used, strict=True):
        e = jnp.exp(sc - top)
        den = den + jnp.sum(e, axis=-1, keepdims=True)
        num = num + jnp.einsum("rkgs,rksh->rkgh", e, vblk.astype(q.dtype))
    return num / den


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
    sinks: bool = False  # gpt-oss: a learned sink logit per query head (`softmax_with_sink`)
    skip_min_rows: int = SKIP_MIN_ROWS  # blocked cache: see `attend_blocks`

    @nn.compact
    def __call__(
        self,
        x,
        positions,
        cache_k,
        cache_v,
        layer,
        rows,
        attn_len,
        window,
        rope: RopeTables,
        writes: WriteIndex | None = None,
    ):
        """x: [B, T, D]; positions: [B, T]; cache_k/v: stacked [L, Bc, K, S, H] (all layers,
        this one at `layer`) or this layer's Blocks; rows: [B] cache row of each batch row,
        or None when the batch is the cache rows [0, B); rope: this layer's
        `tsjax.layers.rope.rope_lookup` of `positions`; writes: the blocked cache's
        `tsjax.cache.write_index` for this step, when the caller made it. Returns
        (out [B, T, D], cache_k, cache_v)."""
        b, t, d = x.shape
        n, kv, h = self.n_heads, self.n_kv_heads, self.head_dim
        q = Linear(n * h, self.qkv_bias, self.dtype, self.quant, name="q")(x).reshape(b, t, n, h)
        k = Linear(kv * h, self.qkv_bias, self.dtype, self.quant, name="k")(x).reshape(b, t, kv, h)
        v = Linear(kv * h, self.qkv_bias, self.dtype, self.quant, name="v")(x).reshape(b, t, kv, h)
        o_proj = Linear(d, False, self.dtype, self.quant, name="o")
        if self.qk_norm:
            q = RMSNorm(self.norm_eps, self.dtype, name="q_norm")(q)
            k = RMSNorm(self.norm_eps, self.dtype, name="k_norm")(k)
        q = rotate(q, rope)
        k = rotate(k, rope)
        sinks = None
        if self.sinks:
            sinks = self.param("sinks", nn.initializers.zeros, (n,), jnp.float32)

        # Scatter the new K/V; rows >= Bc (batch padding) and positions >= S are dropped.
        row_idx = jnp.arange(b, dtype=jnp.int32) if rows is None else rows
        if isinstance(cache_k, tuple):  # blocked: this layer's Blocks
            if writes is None:
                writes = batch_write_index(cache_k, rows, positions, attn_len)
            cache_k = write_blocks(cache_k, row_idx, positions, k, keys=True, index=writes)
            cache_v = write_blocks(cache_v, row_idx, positions, v, keys=False, index=writes)
            if rows is None and t == 1:  # decode of the cache rows [0, b)
                q = q.reshape(b, kv, n // kv, h)
                out = attend_blocks(
                    q,
                    cache_k,
                    cache_v,
                    positions[:, 0],
                    attn_len,
                    window,
                    self.scale,
                    self.softcap,
                    sinks,
                    self.skip_min_rows,
                )
                return o_proj(out[:, None]), cache_k, cache_v
            keys = read_rows(cache_k, row_idx, attn_len, keys=True)
            values = read_rows(cache_v, row_idx, attn_len, keys=False)
        else:  # stacked [L, Bc, K, S, H]
            ri = row_idx[:, None]
            cache_k = cache_k.at[layer, ri, :, positions, :].set(
                k.astype(cache_k.dtype), mode="drop"
            )
            cache_v = cache_v.at[layer, ri, :, positions, :].set(
                v.astype(cache_v.dtype), mode="drop"
            )
            layer_k = jax.lax.dynamic_index_in_dim(cache_k, layer, 0, keepdims=False)
            layer_v = jax.lax.dynamic_index_in_dim(cache_v, layer, 0, keepdims=False)
            if rows is None and b <= layer_k.shape[0]:  # the cache rows [0, b)
                keys, values = layer_k[:b, :, :attn_len], layer_v[:b, :, :attn_len]
            else:  # given rows, or a batch padded past the cache's rows (read clipped)
                keys = jnp.take(layer_k[:, :, :attn_len], row_idx, axis=0, mode="clip")
                values = jnp.take(layer_v[:, :, :attn_len], row_idx, axis=0, mode="clip")
        keys, values = keys.astype(q.dtype), values.astype(q.dtype)
        out = attend(q, keys, values, positions, window, self.scale, self.softcap, sinks)
        return o_proj(out), cache_k, cache_v
