"""The KV cache: a pytree of every layer's keys and values plus per-row lengths.

Two layouts, chosen with the layer loop (`tsjax.models.decoder.unroll_layers_default`):

- stacked, `[L, B, K, S, H]`: one leading layer axis so a single `lax.scan` walks the layers
  and updates the cache in place (accelerators, where slicing a buffer is free);
- blocked (XLA:CPU, unrolled layers): per layer, a grid of separate buffers, one per (block of
  rows, block of positions): values `[R, K, P, H]`, keys transposed `[R, K, H, P]`. The blocks
  follow the steps' buckets (position blocks: the attention buckets, long spans cut in two
  halves, `tsjax.shapes.split_blocks`), so a decode step over the first b rows reads whole
  buffers, and skips a span's upper half that none of its rows reach. XLA:CPU's dot and
  reduce kernels take whole buffers: from a stacked cache, every step first copied each
  layer's bucket out of it (measured: 14 of 55 ms of a 16-row int8 step). Keys are
  transposed because the batched q.k dot reads them at memory speed that way (48 against 91
  us per 12-row block, measured).

The compiled steps donate the cache, so writes update the buffers in place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from tsjax.shapes import block_sizes

if TYPE_CHECKING:  # tsjax.models imports this module (a real import would be a cycle)
    from tsjax.models.config import ModelConfig

#: One layer's blocked keys (or values): row blocks, each a tuple of position blocks.
Blocks = tuple[tuple[jax.Array, ...], ...]


@jax.tree_util.register_dataclass
@dataclass
class KVCache:
    k: jax.Array | tuple[Blocks, ...]  # stacked [L, B, K, S, H], or per layer Blocks
    v: jax.Array | tuple[Blocks, ...]
    lengths: jax.Array  # [B] int32: tokens held per row

    @classmethod
    def create(
        cls,
        cfg: ModelConfig,
        rows: int,
        max_len: int,
        dtype=jnp.float32,
        blocks: tuple[tuple[int, ...], tuple[int, ...]] | None = None,
    ) -> KVCache:
        """A zeroed cache; `blocks` = (row bounds, position bounds) selects the blocked
        layout, e.g. ((4, 16, 32), (128, 256, 512)): rows 0-3, 4-15, 16-31 by positions
        0-127, 128-255, 256-511. Each list ends at `rows` / `max_len`."""
        lengths = jnp.zeros((rows,), jnp.int32)
        if blocks is None:
            shape = (cfg.n_layers, rows, cfg.n_kv_heads, max_len, cfg.head_dim)
            return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), lengths)
        row_bounds, pos_bounds = blocks
        assert row_bounds[-1] == rows and pos_bounds[-1] == max_len, blocks

        def layer(keys: bool) -> Blocks:
            kh, h = cfg.n_kv_heads, cfg.head_dim
            return tuple(
                tuple(
                    jnp.zeros((r, kh, h, p) if keys else (r, kh, p, h), dtype)
                    for p in block_sizes(pos_bounds)
                )
                for r in block_sizes(row_bounds)
            )

        n = cfg.n_layers
        k = tuple(layer(True) for _ in range(n))
        return cls(k, tuple(layer(False) for _ in range(n)), lengths)

    @property
    def blocked(self) -> bool:
        return isinstance(self.k, tuple)


def block_bounds(blocks: Blocks, keys: bool) -> tuple[list[int], list[int]]:
    """Start offsets of the row blocks and of the position blocks of one layer's Blocks."""
    rows = [0]
    for rb in blocks[:-1]:
        rows.append(rows[-1] + rb[0].shape[0])
    pos = [0]
    for pb in blocks[0][:-1]:
        pos.append(pos[-1] + pb.shape[3 if keys else 2])
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
    keys: bool,
    row_end: int | None = None,
    pos_end: int | None = None,
) -> WriteIndex:
    """Where `write_blocks` puts rows[b] at positions[b, T] in each block of a layer's key
    (`keys`) or value blocks (the two share bounds, so either's index serves both). Blocks
    starting at or past the static bounds `row_end` / `pos_end` (known to hold no row /
    position written) get None. Every layer of a step writes the same places: the decoder
    computes this once per step, where per layer and block XLA:CPU ran the same index
    arithmetic 8 times a layer."""
    row_lo, pos_lo = block_bounds(blocks, keys)
    pos_dim = 3 if keys else 2
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
                else jnp.stack([lr, _local(positions, plo, blk.shape[pos_dim])], axis=-1)
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
        return write_index(blocks, jnp.arange(b, dtype=jnp.int32), positions, True, b, attn_len)
    return write_index(blocks, rows, positions, True, None, attn_len)


def write_blocks(
    blocks: Blocks,
    rows: jax.Array,
    positions: jax.Array,
    new: jax.Array,
    keys: bool,
    row_end: int | None = None,
    pos_end: int | None = None,
    index: WriteIndex | None = None,
) -> Blocks:
    """Scatter new[b, T, K, H] into rows[b] at positions[b, T] of key (`keys`, stored
    [R, K, H, P]) or value ([R, K, P, H]) blocks; rows or positions outside the cache are
    dropped. Each block receives only its own part; blocks starting at or past the static
    bounds `row_end` / `pos_end` (known to hold no row / position written) are left as they
    are, without a scatter. `index`: `write_index` of the same arguments, if already made."""
    if index is None:
        index = write_index(blocks, rows, positions, keys, row_end, pos_end)
    pos_dim = 3 if keys else 2
    numbers = jax.lax.ScatterDimensionNumbers(
        update_window_dims=(2, 3),  # new's K, H
        inserted_window_dims=(0, pos_dim),
        scatter_dims_to_operand_dims=(0, pos_dim),
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


def read_rows(blocks: Blocks, rows: jax.Array, length: int, keys: bool) -> jax.Array:
    """Rows[b] (any cache rows) over the first `length` positions (a block boundary) as one
    [b, K, length, H] array: for prefill and scoring, which read few rows. Rows outside the
    cache read zeros."""
    row_lo, pos_lo = block_bounds(blocks, keys)
    n_pos = sum(1 for p in pos_lo if p < length)
    axis = 3 if keys else 2
    out = None
    for rlo, rb in zip(row_lo, blocks, strict=True):
        r = rb[0].shape[0]
        local = rows - rlo
        inside = (local >= 0) & (local < r)
        part = jnp.concatenate(
            [jnp.take(blk, jnp.clip(local, 0, r - 1), axis=0) for blk in rb[:n_pos]], axis=axis
        )
        part = jnp.where(inside[:, None, None, None], part, 0)
        out = part if out is None else out + part
    assert out is not None and out.shape[axis] == length, (length, pos_lo)
    return out.swapaxes(2, 3) if keys else out
