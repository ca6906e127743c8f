"""Attention keys and values of one layer in blocks (XLA:CPU, where the layer loop is
unrolled): a grid of separate buffers, one per (block of rows, block of positions), values
`[R, K, P, H]`, keys transposed `[R, K, H, P]` (`tsjax.cache.cpu_kernels` says why).

The blocks follow the steps' buckets (`tsjax.shapes.StepShapes.cache_blocks`: position
blocks end at the attention buckets, long spans cut in two halves; row blocks at the decode
buckets, at least `min_row_block` rows), so a decode step over the first b rows reads whole
buffers, and a row block skips a span's upper half that none of its rows reach. The scatter
indices of a step's writes are made once, for every layer (`prepare`). Prefill and scoring,
which read few rows, gather them from the blocks and attend over them whole.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from tsjax.cache.cpu_kernels import (
    Blocks,
    attend_blocks,
    batch_write_index,
    read_rows,
    write_blocks,
)
from tsjax.cache.dense import attend
from tsjax.cache.state import Named, Step
from tsjax.residency import zeros_many
from tsjax.shapes import BlockBounds, block_sizes


@jax.tree_util.register_dataclass
@dataclass
class BlockedKV:
    """One layer's key and value blocks (row blocks, each a tuple of position blocks)."""

    k: Blocks
    v: Blocks
    skip_min_rows: int = field(metadata=dict(static=True))  # see `attend_blocks`

    KEY_AXES: ClassVar = ("batch", "kv_heads", "head_dim", "seq")  # [R, K, H, P]
    VALUE_AXES: ClassVar = ("batch", "kv_heads", "seq", "head_dim")  # [R, K, P, H]
    REWINDS: ClassVar[bool] = True

    @classmethod
    def create(
        cls, blocks: BlockBounds, kv_heads: int, head_dim: int, dtype, skip_min_rows: int
    ) -> BlockedKV:
        """Zeroed blocks; `blocks` = (row bounds, position bounds), e.g. ((4, 16, 32),
        (128, 256, 512)): rows 0-3, 4-15, 16-31 by positions 0-127, 128-255, 256-511."""
        rows, pos = block_sizes(blocks[0]), block_sizes(blocks[1])

        def grid(keys: bool) -> Blocks:
            kh, h = kv_heads, head_dim
            made = iter(
                zeros_many(
                    [(r, kh, h, p) if keys else (r, kh, p, h) for r in rows for p in pos], dtype
                )
            )
            return tuple(tuple(next(made) for _ in pos) for _ in rows)

        return cls(grid(True), grid(False), skip_min_rows)

    @property
    def bounds(self) -> BlockBounds:
        rows, pos, r, p = [], [], 0, 0
        for rb in self.k:
            r += rb[0].shape[0]
            rows.append(r)
        for blk in self.k[0]:
            p += blk.shape[3]
            pos.append(p)
        return tuple(rows), tuple(pos)

    def prepare(self, step: Step) -> None:
        """Every layer of a step writes the same places: one set of scatter indices per
        block for all of them (XLA:CPU ran the same index fusion 8 times a layer)."""
        key = f"blocked-write-index{self.bounds}"
        if key not in step.prepared:
            step.prepared[key] = batch_write_index(self.k, step.rows, step.positions, step.attn_len)

    def write(self, k: jax.Array, v: jax.Array, step: Step, layer: Any = 0) -> BlockedKV:
        index = step.prepared.get(f"blocked-write-index{self.bounds}")
        if index is None:
            index = batch_write_index(self.k, step.rows, step.positions, step.attn_len)
        rows, pos = step.row_index, step.positions
        return BlockedKV(
            write_blocks(self.k, rows, pos, k, keys=True, index=index),
            write_blocks(self.v, rows, pos, v, keys=False, index=index),
            self.skip_min_rows,
        )

    def attend(self, q, step: Step, layer, window, scale, softcap, sinks=None) -> jax.Array:
        b, t, n, h = q.shape
        if step.decode:  # the cache rows [0, b): read the blocks where they lie
            kv = self.k[0][0].shape[1]
            out = attend_blocks(
                q.reshape(b, kv, n // kv, h),
                self.k,
                self.v,
                step.positions[:, 0],
                step.attn_len,
                window,
                scale,
                softcap,
                sinks,
                self.skip_min_rows,
            )
            return out[:, None]
        keys = read_rows(self.k, step.row_index, step.attn_len, keys=True)
        values = read_rows(self.v, step.row_index, step.attn_len, keys=False)
        keys, values = keys.astype(q.dtype), values.astype(q.dtype)
        return attend(q, keys, values, step.positions, window, scale, softcap, sinks, step.key_end)

    def swap(self, src: jax.Array, dst: jax.Array) -> BlockedKV:
        """Each moved row read whole from its blocks and scattered into its new place."""
        rows, max_len = self.bounds[0][-1], self.bounds[1][-1]
        every = jnp.arange(max_len, dtype=jnp.int32)
        pos = jnp.broadcast_to(every, (src.shape[0], max_len))

        def move(blocks: Blocks, keys: bool) -> Blocks:
            vals = read_rows(blocks, jnp.minimum(src, rows - 1), max_len, keys)
            return write_blocks(blocks, dst, pos, vals.transpose(0, 2, 1, 3), keys)

        return BlockedKV(move(self.k, True), move(self.v, False), self.skip_min_rows)

    def checkpoint(self, rows: jax.Array, slots: jax.Array) -> BlockedKV:
        return self  # rewinding keys and values is setting the row's length

    def restore(self, rows: jax.Array, slots: jax.Array) -> BlockedKV:
        return self

    def shardings(self, named: Named) -> BlockedKV:
        """Each block split like the stacked layout; a block whose rows do not divide over
        the batch's mesh axis is kept whole on it."""

        def grid(blocks: Blocks, axes) -> Blocks:
            return tuple(tuple(named(axes, blk.shape) for blk in rb) for rb in blocks)

        return BlockedKV(
            grid(self.k, self.KEY_AXES), grid(self.v, self.VALUE_AXES), self.skip_min_rows
        )
