"""Attention keys and values of one layer in blocks (XLA:CPU, where the layer loop is
unrolled): a grid of separate buffers `[R, K, P, H]`, one per (block of rows, block of
positions) (`tsjax.cache.cpu_kernels` says why).

The blocks follow the steps' buckets (`tsjax.shapes.StepShapes.cache_blocks`: position
blocks end at the attention buckets, long spans cut in two halves; row blocks at the decode
buckets, at least `min_row_block` rows). The scatter indices of a step's writes are made
once, for every layer (`prepare`). Attention, decode and prefill, runs in the native CPU kernel
where it can (`native`): each query reads the positions it sees where they lie. In XLA's ops
instead, a decode step over the first b rows reads whole buffers, and a row block skips a
span's upper half that none of its rows reach; prefill and scoring, which read few rows,
gather them from the blocks and attend over them whole.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from tsjax.cache.cpu_kernels import (
    Blocks,
    attend_blocks,
    batch_write_index,
    native_attend,
    native_attention,
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
    # attention in the native CPU kernel where it can run (`native_attention`); False keeps
    # XLA's ops (`KVLayout.native_attention`)
    native: bool = field(default=True, metadata=dict(static=True))

    AXES: ClassVar = ("batch", "kv_heads", "seq", "head_dim")  # [R, K, P, H]
    REWINDS: ClassVar[bool] = True

    @classmethod
    def create(
        cls,
        blocks: BlockBounds,
        kv_heads: int,
        head_dim: int,
        dtype,
        skip_min_rows: int,
        native: bool = True,
    ) -> BlockedKV:
        """Zeroed blocks; `blocks` = (row bounds, position bounds), e.g. ((4, 16, 32),
        (128, 256, 512)): rows 0-3, 4-15, 16-31 by positions 0-127, 128-255, 256-511."""
        rows, pos = block_sizes(blocks[0]), block_sizes(blocks[1])

        def grid() -> Blocks:
            made = iter(zeros_many([(r, kv_heads, p, head_dim) for r in rows for p in pos], dtype))
            return tuple(tuple(next(made) for _ in pos) for _ in rows)

        return cls(grid(), grid(), skip_min_rows, native)

    @property
    def bounds(self) -> BlockBounds:
        rows, pos, r, p = [], [], 0, 0
        for rb in self.k:
            r += rb[0].shape[0]
            rows.append(r)
        for blk in self.k[0]:
            p += blk.shape[2]
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
        return dataclasses.replace(
            self,
            k=write_blocks(self.k, rows, pos, k, index=index),
            v=write_blocks(self.v, rows, pos, v, index=index),
        )

    def attend(self, q, step: Step, layer, window, scale, softcap, sinks=None) -> jax.Array:
        b, t, n, h = q.shape
        kv = self.k[0][0].shape[1]
        if self.native and native_attention(q, self.k, softcap):  # decode or prefill
            out = native_attend(
                q.reshape(b, t, kv, n // kv, h),
                self.k,
                self.v,
                step.positions,
                step.row_index,
                step.attn_len,
                window,
                scale,
                sinks,
                step.key_end,
            )
            return out.reshape(b, t, n * h)
        if step.decode:  # the cache rows [0, b): read the blocks where they lie
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
        keys = read_rows(self.k, step.row_index, step.attn_len)
        values = read_rows(self.v, step.row_index, step.attn_len)
        keys, values = keys.astype(q.dtype), values.astype(q.dtype)
        return attend(q, keys, values, step.positions, window, scale, softcap, sinks, step.key_end)

    def swap(self, src: jax.Array, dst: jax.Array) -> BlockedKV:
        """Each moved row read whole from its blocks and scattered into its new place."""
        rows, max_len = self.bounds[0][-1], self.bounds[1][-1]
        every = jnp.arange(max_len, dtype=jnp.int32)
        pos = jnp.broadcast_to(every, (src.shape[0], max_len))

        def move(blocks: Blocks) -> Blocks:
            vals = read_rows(blocks, jnp.minimum(src, rows - 1), max_len)
            return write_blocks(blocks, dst, pos, vals.transpose(0, 2, 1, 3))

        return dataclasses.replace(self, k=move(self.k), v=move(self.v))

    def checkpoint(self, rows: jax.Array, slots: jax.Array) -> BlockedKV:
        return self  # rewinding keys and values is setting the row's length

    def restore(self, rows: jax.Array, slots: jax.Array) -> BlockedKV:
        return self

    def shardings(self, named: Named) -> BlockedKV:
        """Each block split like the stacked layout; a block whose rows do not divide over
        the batch's mesh axis is kept whole on it."""

        def grid(blocks: Blocks, axes) -> Blocks:
            return tuple(tuple(named(axes, blk.shape) for blk in rb) for rb in blocks)

        return dataclasses.replace(self, k=grid(self.k, self.AXES), v=grid(self.v, self.AXES))
