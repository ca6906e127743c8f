"""The state of a recurrent layer (Gated DeltaNet, Mamba2): per row, the short convolution's
window and the recurrent state, plus one saved copy of both (the checkpoint a prompt suffix
resumes from: a recurrent state cannot be rewound, `LayerState.REWINDS`).

Shapes, with a stacked segment's leading layer axis L (1 for an unrolled layer):

- `conv` [L, B, C, K-1]: the last K-1 inputs of the convolution (`tsjax.layers.causal_conv`);
- `ssm` [L, B, H, ...]: Gated DeltaNet [L, B, H, Dk, Dv] (value heads, key dim, value dim),
  Mamba2 [L, B, H, P, N] (heads, head dim, state size), llama.cpp's and transformers' order.

Both are float32 whatever the model's dtype: the recurrence accumulates over the whole
sequence (transformers keeps Mamba2's in float32 too, `mamba_ssm_cache_dtype`).

The layer reads its rows' states (`read`: zeros for a row whose step starts at position 0)
and writes back what its step's real tokens made of them (`write`: a row with no real token
is left as it was, a batch row past the cache's rows writes nothing).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from tsjax.cache.state import Named, Step

#: Logical axes: heads over `tp`, rows over `dp`. The convolution's channels are q/k/v (or
#: x/B/C) fused, so a contiguous split of them is not a split by heads: left whole.
CONV_AXES = ("layers", "batch", "ssm_channels", None)
SSM_AXES = ("layers", "batch", "ssm_heads", None, None)


@jax.tree_util.register_dataclass
@dataclass
class RecurrentState:
    """One segment's recurrent layers: live `conv` / `ssm` and their saved copies."""

    conv: jax.Array
    ssm: jax.Array
    saved_conv: jax.Array
    saved_ssm: jax.Array

    REWINDS: ClassVar[bool] = False

    @classmethod
    def create(
        cls, layers: int, rows: int, channels: int, kernel: int, ssm_shape: tuple[int, ...]
    ) -> RecurrentState:
        """Zeroed: conv [layers, rows, channels, kernel-1], ssm [layers, rows, *ssm_shape].
        Four buffers, not shared: the steps donate each."""
        conv = (layers, rows, channels, kernel - 1)
        ssm = (layers, rows, *ssm_shape)
        z = jnp.float32
        return cls(jnp.zeros(conv, z), jnp.zeros(ssm, z), jnp.zeros(conv, z), jnp.zeros(ssm, z))

    def prepare(self, step: Step) -> None:
        pass  # the row gathers are per layer and cheap

    def read(self, step: Step, layer: Any) -> tuple[jax.Array, jax.Array]:
        """This layer's (conv [B, C, K-1], ssm [B, H, ...]) of the step's rows; zeros where a
        row's step starts at position 0 (a new sequence)."""
        b = step.positions.shape[0]

        def rows_of(x):
            x = jax.lax.dynamic_index_in_dim(x, layer, 0, keepdims=False)
            if step.rows is None and b <= x.shape[0]:  # the cache rows [0, b)
                x = x[:b]
            else:  # given rows, or a batch padded past the cache's rows (read clipped)
                x = jnp.take(x, step.row_index, axis=0, mode="clip")
            fresh = (step.positions[:, 0] == 0).reshape((b,) + (1,) * (x.ndim - 1))
            return jnp.where(fresh, 0, x)

        return rows_of(self.conv), rows_of(self.ssm)

    def write(self, conv: jax.Array, ssm: jax.Array, step: Step, layer: Any) -> RecurrentState:
        """The step's rows take conv [B, C, K-1] and ssm [B, H, ...], except rows with no
        real token (`Step.counts` 0) and rows past the cache's (padding)."""
        b, n = conv.shape[0], self.conv.shape[1]

        def put(buf, new):
            new = new.astype(buf.dtype)
            if step.rows is None and b == n:  # decode of every cache row: a select, in place
                old = jax.lax.dynamic_index_in_dim(buf, layer, 0, keepdims=False)
                keep = (step.counts > 0).reshape((b,) + (1,) * (new.ndim - 1))
                return jax.lax.dynamic_update_index_in_dim(buf, jnp.where(keep, new, old), layer, 0)
            rows = jnp.where(step.counts > 0, step.row_index, n)  # n: out of range, dropped
            return buf.at[layer, rows].set(new, mode="drop")

        return replace(self, conv=put(self.conv, conv), ssm=put(self.ssm, ssm))

    def swap(self, src: jax.Array, dst: jax.Array) -> RecurrentState:
        def move(x):
            return x.at[:, dst].set(jnp.take(x, src, axis=1, mode="clip"), mode="drop")

        # A row's checkpoint moves with it: it belongs to the sequence, not the slot.
        return RecurrentState(
            *(move(x) for x in (self.conv, self.ssm, self.saved_conv, self.saved_ssm))
        )

    def checkpoint(self, rows: jax.Array, which: jax.Array) -> RecurrentState:
        return replace(
            self,
            saved_conv=_copy_rows(self.conv, self.saved_conv, rows, which),
            saved_ssm=_copy_rows(self.ssm, self.saved_ssm, rows, which),
        )

    def restore(self, rows: jax.Array, which: jax.Array) -> RecurrentState:
        return replace(
            self,
            conv=_copy_rows(self.saved_conv, self.conv, rows, which),
            ssm=_copy_rows(self.saved_ssm, self.ssm, rows, which),
        )

    def shardings(self, named: Named) -> RecurrentState:
        conv, ssm = named(CONV_AXES, self.conv.shape), named(SSM_AXES, self.ssm.shape)
        return RecurrentState(conv, ssm, conv, ssm)


def _copy_rows(src: jax.Array, dst: jax.Array, rows: jax.Array, which: jax.Array) -> jax.Array:
    """dst with rows[i] replaced by src's where which[i] ([L, B, ...] buffers; rows past B
    are padding: dropped)."""
    rows = jnp.where(which, rows, dst.shape[1])
    return dst.at[:, rows].set(jnp.take(src, rows, axis=1, mode="clip"), mode="drop")
