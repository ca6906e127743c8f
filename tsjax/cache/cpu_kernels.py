"""XLA:CPU kernels of the blocked cache layout (`tsjax.cache.blocked`): scatter a step's new
keys and values into the blocks their rows and positions fall in, gather a few rows back into
one array, and decode attention that reads the blocks where they lie.

One layer's keys (or values) are a grid of separate buffers `[R, K, P, H]`, one per (block of
rows, block of positions). XLA:CPU's dot and reduce kernels take whole buffers: from one big
cache array, every step first copied each layer's bucket out of it (measured: 14 of 55 ms of a
16-row int8 step).

Attention runs in one native call a layer where the CPU kernels are built
(`tsjax.kernels.blockdot.attention`): each query reads only the positions it sees, where they
lie (a prefill no longer gathers its row out of the blocks first).
Keys were stored transposed `[R, K, H, P]` for XLA's batched q.k dot (62 against 111 us per
12-row block, `python -m benchmarks.kernels`), but then a step's write of one position touched
one cache line per value instead of one per 16: in a 16-row SmolLM2 step those scatters took
4.5 ms against 0.5 ms for the values (`python -m benchmarks.profile`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from tsjax.cache.dense import NEG_INF, visible
from tsjax.kernels import blockdot
from tsjax.shapes import SKIP_MIN_ROWS

#: One layer's blocked keys (or values): row blocks, each a tuple of position blocks.
Blocks = tuple[tuple[jax.Array, ...], ...]


def block_bounds(blocks: Blocks) -> tuple[list[int], list[int]]:
    """Start offsets of the row blocks and of the position blocks of one layer's Blocks."""
    rows = [0]
    for rb in blocks[:-1]:
        rows.append(rows[-1] + rb[0].shape[0])
    pos = [0]
    for pb in blocks[0][:-1]:
        pos.append(pos[-1] + pb.shape[2])
    return rows, pos


def _local(index: jax.Array, lo: int, size: int) -> jax.Array:
    """Global index -> index inside a block starting at lo of `size`, or `size` (out of
    bounds, so a scatter with mode="drop" skips it; negative indices would wrap)."""
    local = index - lo
    return jnp.where((local >= 0) & (local < size), local, size)


#: Per block of one layer's Blocks, its [b, T, 2] scatter indices (row, position inside the
#: block; out of bounds where a write falls elsewhere), or None for a block left untouched.
WriteIndex = tuple[tuple[jax.Array | None, ...], ...]


def write_index(
    blocks: Blocks,
    rows: jax.Array,
    positions: jax.Array,
    row_end: int | None = None,
    pos_end: int | None = None,
) -> WriteIndex:
    """Where `write_blocks` puts rows[b] at positions[b, T] in each block of a layer's key
    or value blocks (the two share bounds, so either's index serves both). Blocks
    starting at or past the static bounds `row_end` / `pos_end` (known to hold no row /
    position written) get None. Every layer of a step writes the same places: the decoder
    computes this once per step, where per layer and block XLA:CPU ran the same index
    arithmetic 8 times a layer."""
    row_lo, pos_lo = block_bounds(blocks)
    out = []
    for rlo, rb in zip(row_lo, blocks, strict=True):
        if row_end is not None and rlo >= row_end:
            out.append((None,) * len(rb))
            continue
        lr = jnp.broadcast_to(_local(rows, rlo, rb[0].shape[0])[:, None], positions.shape)
        out.append(
            tuple(
                None
                if pos_end is not None and plo >= pos_end
                else jnp.stack([lr, _local(positions, plo, blk.shape[2])], axis=-1)
                for plo, blk in zip(pos_lo, rb, strict=True)
            )
        )
    return tuple(out)


def batch_write_index(
    blocks: Blocks, rows: jax.Array | None, positions: jax.Array, attn_len: int
) -> WriteIndex:
    """`write_index` for a step's batch into key blocks: positions [B, T] below `attn_len`,
    rows [B] (None: the batch is the cache rows [0, B), so no row block from B on is
    written)."""
    b = positions.shape[0]
    if rows is None:
        return write_index(blocks, jnp.arange(b, dtype=jnp.int32), positions, b, attn_len)
    return write_index(blocks, rows, positions, None, attn_len)


def write_blocks(
    blocks: Blocks,
    rows: jax.Array,
    positions: jax.Array,
    new: jax.Array,
    row_end: int | None = None,
    pos_end: int | None = None,
    index: WriteIndex | None = None,
) -> Blocks:
    """Scatter new[b, T, K, H] into rows[b] at positions[b, T] of key or value blocks
    ([R, K, P, H]); rows or positions outside the cache are
    dropped. Each block receives only its own part; blocks starting at or past the static
    bounds `row_end` / `pos_end` (known to hold no row / position written) are left as they
    are, without a scatter. `index`: `write_index` of the same arguments, if already made."""
    if index is None:
        index = write_index(blocks, rows, positions, row_end, pos_end)
    numbers = jax.lax.ScatterDimensionNumbers(
        update_window_dims=(2, 3),  # new's K, H
        inserted_window_dims=(0, 2),
        scatter_dims_to_operand_dims=(0, 2),
    )
    return tuple(
        tuple(
            blk
            if idx is None
            else jax.lax.scatter(
                blk,
                idx,
                new.astype(blk.dtype),
                numbers,
                mode=jax.lax.GatherScatterMode.FILL_OR_DROP,
            )
            for blk, idx in zip(rb, rb_index, strict=True)
        )
        for rb, rb_index in zip(blocks, index, strict=True)
    )


def read_rows(blocks: Blocks, rows: jax.Array, length: int) -> jax.Array:
    """Rows[b] (any cache rows) over the first `length` positions (a block boundary) as one
    [b, K, length, H] array: for prefill and scoring, which read few rows. Rows outside the
    cache read zeros."""
    row_lo, pos_lo = block_bounds(blocks)
    n_pos = sum(1 for p in pos_lo if p < length)
    out = None
    for rlo, rb in zip(row_lo, blocks, strict=True):
        r = rb[0].shape[0]
        local = rows - rlo
        inside = (local >= 0) & (local < r)
        part = jnp.concatenate(
            [jnp.take(blk, jnp.clip(local, 0, r - 1), axis=0) for blk in rb[:n_pos]], axis=2
        )
        part = jnp.where(inside[:, None, None, None], part, 0)
        out = part if out is None else out + part
    assert out is not None and out.shape[2] == length, (length, pos_lo)
    return out


def attend_blocks(
    q: jax.Array,
    k_blocks: Blocks,
    v_blocks: Blocks,
    pos: jax.Array,
    attn_len: int,
    window: jax.Array,
    scale: float,
    softcap: float | None,
    sinks: jax.Array | None = None,
    skip_min_rows: int = SKIP_MIN_ROWS,
) -> jax.Array:
    """Decode attention for the cache rows [0, b) straight from the blocked cache. q:
    [b, K, G, H]; pos: [b]; sinks: [K*G] per-head sink logits
    (`tsjax.cache.dense.softmax_with_sink`), or None. Returns [b, K*G*H].

    In XLA's ops (where the native kernel runs, `BlockedKV.attend` calls `native_attend`
    instead): per row block, scores against each position block below `attn_len` (batched dots
    over whole buffers), one softmax over them, then the value blocks' weighted sum.

    A row block of at least `skip_min_rows` rows none of which reaches the last position
    block below `attn_len` skips it (a `lax.cond` on its furthest row). Long spans are two
    blocks (`tsjax.shapes.StepShapes.split_span`), so there such a step reads at most 1.5x
    the cache its rows need instead of 2x."""
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

        def attend_used(blocks, qr, pr):
            return _attend_row_block(qr, pr, blocks, window, scale, softcap, sinks)

        if len(used) == 1 or n < skip_min_rows:
            o = attend_used(used, qr, pr)
        else:
            # Read the last block (a split span's upper half, or the bucket's last span)
            # only when a row reaches it. Two branches, not one per block: each branch
            # compiles its own attention. Rows past the bucket are padding: their writes are
            # dropped and what they read does not matter.
            reach = jnp.max(jnp.where(pr < attn_len, pr, 0))
            o = jax.lax.cond(
                reach >= starts[-1],
                functools.partial(attend_used, used),
                functools.partial(attend_used, used[:-1]),
                qr,
                pr,
            )
        out.append(o)
        lo += r
    out = jnp.concatenate(out, axis=0)
    if out.shape[0] < b:  # a padded batch past the cache's rows
        out = jnp.pad(out, ((0, b - out.shape[0]), (0, 0), (0, 0), (0, 0)))
    return out[:b].reshape(b, kv * g * h)


def native_attention(q: jax.Array, k_blocks: Blocks, softcap: float | None) -> bool:
    """Whether decode attention can run in the native kernel: on CPU with the kernels built,
    float32 blocks, no logit soft-cap (Gemma 2's keeps the XLA form). Not over a mesh either
    (XLA partitions its own ops, not a foreign call): `KVLayout.native_attention`."""
    if softcap or jax.default_backend() != "cpu":
        return False
    if any(blk.dtype != jnp.float32 for rb in k_blocks for blk in rb):
        return False
    return blockdot.available()


def native_attend(
    q: jax.Array,
    k_blocks: Blocks,
    v_blocks: Blocks,
    positions: jax.Array,
    rows: jax.Array,
    attn_len: int,
    window: jax.Array,
    scale: float,
    sinks: jax.Array | None = None,
    key_end: jax.Array | None = None,
) -> jax.Array:
    """Attention of rows[b]'s T queries q [b, T, K, G, H] at `positions` [b, T] (causal, or
    below `key_end` [b, T]) over their cache rows' blocks below `attn_len`, in
    `tsjax.kernels.blockdot.attention`: each query reads only the positions it sees, where
    they lie (no gather, no branch for an unreached last block). Returns [b, T, K, G, H] in
    q's dtype; a row outside the cache gets zeros."""
    used = sum(1 for st in block_bounds(k_blocks)[1] if st < attn_len)
    out = blockdot.attention(
        q.astype(jnp.float32) * jnp.float32(scale),
        positions,
        rows,
        window,
        sinks,
        key_end,
        tuple(rb[:used] for rb in k_blocks),
        tuple(rb[:used] for rb in v_blocks),
    )
    return out.astype(q.dtype)


def _attend_row_block(qr, pr, used, window, scale, softcap, sinks=None):
    """One row block's attention over the position blocks `used` [(keys, values)], from
    position 0. qr: [r, K, G, H]; pr: [r]. Returns [r, K, G, H].

    Block by block, with no concatenated scores: the softmax's max spans every block, each
    block's exponentials feed its own value dot, and the sum of the products is divided by
    the sum of the exponentials at the end ([r, K, G, H] divides, not [r, K, G, S])."""
    q = qr * jnp.asarray(scale, qr.dtype)
    scores, start = [], 0
    for kblk, _ in used:
        sc = jnp.einsum("rkgh,rksh->rkgs", q, kblk.astype(q.dtype))
        if softcap:
            sc = jnp.tanh(sc / softcap) * softcap
        seen = visible(pr, sc.shape[-1], window, start)
        scores.append(jnp.where(seen[:, None, None, :], sc, NEG_INF))
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
