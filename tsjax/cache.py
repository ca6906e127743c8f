"""The KV cache: a pytree of every layer's keys and values plus per-row lengths.

Two layouts, chosen with the layer loop (`tsjax.models.decoder.unroll_layers_default`):

- stacked, `[L, B, K, S, H]`: one leading layer axis so a single `lax.scan` walks the layers
  and updates the cache in place (accelerators, where slicing a buffer is free);
- blocked (XLA:CPU, unrolled layers): per layer, a grid of separate buffers, one per (block of
  rows, block of positions): values `[R, K, P, H]`, keys transposed `[R, K, H, P]`. The blocks
  follow the steps' buckets (position blocks: the attention buckets, long spans cut in two
  halves, `tsjax.steps.split_blocks`), so a decode step over the first b rows reads whole
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


def block_sizes(bounds: tuple[int, ...]) -> list[int]:
    """Block bounds (each block's end) -> block sizes."""
    return [hi - lo for lo, hi in zip((0, *bounds[:-1]), bounds, strict=True)]


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


def write_blocks(
    blocks: Blocks,
    rows: jax.Array,
    positions: jax.Array,
    new: jax.Array,
    keys: bool,
    row_end: int | None = None,
    pos_end: int | None = None,
) -> Blocks:
    """Scatter new[b, T, K, H] into rows[b] at positions[b, T] of key (`keys`, stored
    [R, K, H, P]) or value ([R, K, P, H]) blocks; rows or positions outside the cache are
    dropped. Each block receives only its own part; blocks starting at or past the static
    bounds `row_end` / `pos_end` (known to hold no row / position written) are left as they
    are, without a scatter."""
    row_lo, pos_lo = block_bounds(blocks, keys)
    out = []
    for rlo, rb in zip(row_lo, blocks, strict=True):
        if row_end is not None and rlo >= row_end:
            out.append(rb)
            continue
        r = rb[0].shape[0]
        lr = _local(rows, rlo, r)[:, None]
        row_out = []
        for plo, blk in zip(pos_lo, rb, strict=True):
            if pos_end is not None and plo >= pos_end:
                row_out.append(blk)
                continue
            lp = _local(positions, plo, blk.shape[3 if keys else 2])
            at = blk.at[lr, :, :, lp] if keys else blk.at[lr, :, lp, :]
            row_out.append(at.set(new.astype(blk.dtype), mode="drop"))
        out.append(tuple(row_out))
    return tuple(out)


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
