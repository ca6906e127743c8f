"""Attention keys and values stacked `[L, B, K, S, H]`: one leading layer axis, so one
`lax.scan` walks a segment's layers and updates the state in place (accelerators, where
slicing a buffer is free). Reads take the first `attn_len` positions of the step's rows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from tsjax.cache.dense import attend
from tsjax.cache.state import Named, Step
from tsjax.residency import zeros


@jax.tree_util.register_dataclass
@dataclass
class StackedKV:
    """Keys and values of a segment's L layers: [L, B, K, S, H] each."""

    k: jax.Array
    v: jax.Array

    AXES: ClassVar = ("layers", "batch", "kv_heads", "seq", "head_dim")
    REWINDS: ClassVar[bool] = True

    @classmethod
    def create(cls, layers: int, rows: int, kv_heads: int, max_len: int, head_dim: int, dtype):
        shape = (layers, rows, kv_heads, max_len, head_dim)
        return cls(zeros(shape, dtype), zeros(shape, dtype))

    def prepare(self, step: Step) -> None:
        pass  # a scatter per layer needs no shared indices

    def write(self, k: jax.Array, v: jax.Array, step: Step, layer: Any) -> StackedKV:
        ri = step.row_index[:, None]
        pos = step.positions
        return StackedKV(
            self.k.at[layer, ri, :, pos, :].set(k.astype(self.k.dtype), mode="drop"),
            self.v.at[layer, ri, :, pos, :].set(v.astype(self.v.dtype), mode="drop"),
        )

    def attend(self, q, step: Step, layer, window, scale, softcap, sinks=None) -> jax.Array:
        b, attn_len = q.shape[0], step.attn_len
        layer_k = jax.lax.dynamic_index_in_dim(self.k, layer, 0, keepdims=False)
        layer_v = jax.lax.dynamic_index_in_dim(self.v, layer, 0, keepdims=False)
        if step.rows is None and b <= layer_k.shape[0]:  # the cache rows [0, b)
            keys, values = layer_k[:b, :, :attn_len], layer_v[:b, :, :attn_len]
        else:  # given rows, or a batch padded past the cache's rows (read clipped)
            keys = jnp.take(layer_k[:, :, :attn_len], step.row_index, axis=0, mode="clip")
            values = jnp.take(layer_v[:, :, :attn_len], step.row_index, axis=0, mode="clip")
        keys, values = keys.astype(q.dtype), values.astype(q.dtype)
        return attend(q, keys, values, step.positions, window, scale, softcap, sinks, step.key_end)

    def swap(self, src: jax.Array, dst: jax.Array) -> StackedKV:
        def move(x):
            return x.at[:, dst].set(jnp.take(x, src, axis=1, mode="clip"), mode="drop")

        return StackedKV(move(self.k), move(self.v))

    def checkpoint(self, rows: jax.Array, slots: jax.Array) -> StackedKV:
        return self  # rewinding keys and values is setting the row's length

    def restore(self, rows: jax.Array, slots: jax.Array) -> StackedKV:
        return self

    def shardings(self, named: Named) -> StackedKV:
        return StackedKV(named(self.AXES, self.k.shape), named(self.AXES, self.v.shape))
