"""The state of a recurrent layer (Gated DeltaNet, Mamba2): per row, the short convolution's
window and the recurrent state, plus saved copies of both in a few checkpoint slots (what a
prompt suffix resumes from: a recurrent state cannot be rewound, `LayerState.REWINDS`; the
engine decides where rows save theirs, `serve.engine.scheduler`).

Shapes, with a stacked segment's leading layer axis L (none for an unrolled layer):

- `conv` [L, B, C, K-1]: the last K-1 inputs of the convolution (`tsjax.layers.causal_conv`);
- `ssm` [L, B, H, ...]: Gated DeltaNet [L, B, H, Dk, Dv] (value heads, key dim, value dim),
  Mamba2 [L, B, H, P, N] (heads, head dim, state size), llama.cpp's and transformers' order;
- `saved_conv` [L, B, n, C, K-1], `saved_ssm` [L, B, n, H, ...]: the n checkpoint slots of
  each row (`KVLayout.checkpoints`), which move with their row.

An unrolled layer's state has no layer axis (not an axis of 1): XLA:CPU updates a buffer in
place only when the step's arithmetic reads it as it lies, and a view through a unit axis is
a reshape, which costs a decode step a copy of the whole state (16 rows of a Qwen3.5-0.8B
layer: 16 MiB).

Both are float32 whatever the model's dtype: the recurrence accumulates over the whole
sequence (transformers keeps Mamba2's in float32 too, `mamba_ssm_cache_dtype`).

The layer reads its rows' states (`read`: a row whose step starts at position 0 starts from
zeros) and writes back what its step's real tokens made of them (`write`: a row with no real
token is left as it was, a batch row past the cache's rows writes nothing).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, ClassVar

import jax
import jax.numpy as jnp

from tsjax.cache.state import Named, Step
from tsjax.residency import zeros
from tsjax.stack import Segment

if TYPE_CHECKING:  # tsjax.models imports tsjax.cache (a real import would be a cycle)
    from tsjax.models.config import ModelConfig

#: Logical axes: heads over `tp`, rows over `dp`. The convolution's channels are q/k/v (or
#: x/B/C) fused, so a contiguous split of them is not a split by heads: left whole.
CONV_AXES = ("batch", "ssm_channels", None)
SSM_AXES = ("batch", "ssm_heads", None, None)
SLOT_AXIS = None  # the checkpoint slots of a row: never split


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
        cls,
        layers: int | None,
        rows: int,
        channels: int,
        kernel: int,
        ssm_shape: tuple[int, ...],
        slots: int = 1,
    ) -> RecurrentState:
        """Zeroed: conv [layers, rows, channels, kernel-1], ssm [layers, rows, *ssm_shape]
        and `slots` saved copies of each per row (`layers` None: one unrolled layer, no
        layer axis). Four buffers, not shared: the steps donate each."""
        lead = () if layers is None else (layers,)
        conv = (channels, kernel - 1)
        z = jnp.float32
        return cls(
            zeros((*lead, rows, *conv), z),
            zeros((*lead, rows, *ssm_shape), z),
            zeros((*lead, rows, slots, *conv), z),
            zeros((*lead, rows, slots, *ssm_shape), z),
        )

    @property
    def stacked(self) -> bool:
        """Whether the arrays have a leading layer axis."""
        return self.conv.ndim == 4

    def prepare(self, step: Step) -> None:
        pass  # the row gathers are per layer and cheap

    def read(self, step: Step, layer: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
        """This layer's (conv [B, C, K-1], ssm [B, H, ...], carry [B]) of the step's rows
        (`layer` indexes a stacked state; ignored otherwise).

        A row whose step starts at position 0 with real tokens begins a new sequence: its
        window comes back zeroed, and its `carry` is 0, else 1. The layer multiplies the
        ssm by it (decode folds it into the token's decay: zeroing here would copy a decode
        step's whole state once more)."""
        b = step.positions.shape[0]
        fresh = (step.positions[:, 0] == 0) & (step.counts > 0)

        def rows_of(x):
            if self.stacked:
                x = jax.lax.dynamic_index_in_dim(x, layer, 0, keepdims=False)
            if step.rows is None and b == x.shape[0]:  # every cache row: as it lies
                return x
            if step.rows is None and b < x.shape[0]:  # the cache rows [0, b)
                return x[:b]
            # given rows, or a batch padded past the cache's rows (read clipped)
            return jnp.take(x, step.row_index, axis=0, mode="clip")

        conv = jnp.where(fresh[:, None, None], 0, rows_of(self.conv))
        return conv, rows_of(self.ssm), jnp.where(fresh, 0.0, 1.0)

    def write(self, conv: jax.Array, ssm: jax.Array, step: Step, layer: Any) -> RecurrentState:
        """The step's rows take conv [B, C, K-1] and ssm [B, H, ...]; rows past the cache's
        (padding) write nothing.

        A row with no real token (`Step.counts` 0) keeps its state. Given rows, it is not
        written. A decode step over every cache row overwrites them all, in place: the
        layers hand an idle row's state back exactly as it was (its window unshifted, its
        decay exp(0) = 1 and its input 0), so no select reads the old state again."""
        b = conv.shape[0]
        n = self.conv.shape[1 if self.stacked else 0]

        def put(buf, new):
            new = new.astype(buf.dtype)
            if step.rows is None and b == n:  # decode of every cache row
                if not self.stacked:
                    return new
                return jax.lax.dynamic_update_index_in_dim(buf, new, layer, 0)
            rows = jnp.where(step.counts > 0, step.row_index, n)  # n: out of range, dropped
            if not self.stacked:
                return buf.at[rows].set(new, mode="drop")
            return buf.at[layer, rows].set(new, mode="drop")

        return replace(self, conv=put(self.conv, conv), ssm=put(self.ssm, ssm))

    def swap(self, src: jax.Array, dst: jax.Array) -> RecurrentState:
        ax = int(self.stacked)

        def move(x):
            moved = jnp.take(x, src, axis=ax, mode="clip")
            return x.at[(slice(None),) * ax + (dst,)].set(moved, mode="drop")

        # A row's checkpoint moves with it: it belongs to the sequence, not the slot.
        return RecurrentState(
            *(move(x) for x in (self.conv, self.ssm, self.saved_conv, self.saved_ssm))
        )

    def checkpoint(self, rows: jax.Array, slots: jax.Array) -> RecurrentState:
        return replace(
            self,
            saved_conv=self._save(self.conv, self.saved_conv, rows, slots),
            saved_ssm=self._save(self.ssm, self.saved_ssm, rows, slots),
        )

    def restore(self, rows: jax.Array, slots: jax.Array) -> RecurrentState:
        return replace(
            self,
            conv=self._load(self.saved_conv, self.conv, rows, slots),
            ssm=self._load(self.saved_ssm, self.ssm, rows, slots),
        )

    def _save(self, live, saved, rows: jax.Array, slots: jax.Array) -> jax.Array:
        """saved with [rows[i], slots[i]] replaced by live[rows[i]] (slot < 0 or a row past
        B: dropped)."""
        ax = int(self.stacked)
        if saved.shape[ax + 1] == 0:  # no slots kept
            return saved
        rows = jnp.where(slots >= 0, rows, live.shape[ax])
        lead = (slice(None),) * ax
        moved = jnp.take(live, rows, axis=ax, mode="clip")
        return saved.at[(*lead, rows, jnp.maximum(slots, 0))].set(moved, mode="drop")

    def _load(self, saved, live, rows: jax.Array, slots: jax.Array) -> jax.Array:
        """live with rows[i] replaced by saved[rows[i], slots[i]] (slot < 0: kept)."""
        ax = int(self.stacked)
        if saved.shape[ax + 1] == 0:  # no slots kept
            return live
        lead = (slice(None),) * ax
        got = saved[(*lead, jnp.minimum(rows, live.shape[ax] - 1), jnp.maximum(slots, 0))]
        rows = jnp.where(slots >= 0, rows, live.shape[ax])
        return live.at[(*lead, rows)].set(got, mode="drop")

    def shardings(self, named: Named) -> RecurrentState:
        lead = ("layers",) if self.stacked else ()
        conv = named((*lead, *CONV_AXES), self.conv.shape)
        ssm = named((*lead, *SSM_AXES), self.ssm.shape)
        row, *conv_rest = CONV_AXES
        _, *ssm_rest = SSM_AXES
        saved_conv = named((*lead, row, SLOT_AXIS, *conv_rest), self.saved_conv.shape)
        saved_ssm = named((*lead, row, SLOT_AXIS, *ssm_rest), self.saved_ssm.shape)
        return RecurrentState(conv, ssm, saved_conv, saved_ssm)


def deltanet_state(cfg: ModelConfig, seg: Segment, layout, rows: int, max_len: int, dtype):
    """A Gated DeltaNet segment's zeroed state from `cfg.ssm` (`tsjax.models.config.SSMConfig`):
    conv channels 2*Hk*Dk + Hv*Dv, ssm [Hv, Dk, Dv], `layout.checkpoints` slots per row;
    float32 whatever `dtype` (`max_len` is attention's). The same shapes as
    `GatedDeltaNet.new_state`."""
    s = cfg.ssm
    hv, dk = s.time_step_rank, s.state_size
    channels = 2 * s.group_count * dk + s.inner_size
    layers = seg.count if seg.stacked else None
    shape = (hv, dk, s.inner_size // hv)
    return RecurrentState.create(layers, rows, channels, s.conv_kernel, shape, layout.checkpoints)


def mamba2_state(cfg: ModelConfig, seg: Segment, layout, rows: int, max_len: int, dtype):
    """A Mamba2 segment's zeroed state from `cfg.ssm`: conv channels E + 2*G*N, ssm [H, P, N]
    (P = E/H), `layout.checkpoints` slots per row; float32. The same shapes as
    `Mamba2.new_state`."""
    s = cfg.ssm
    h, n = s.time_step_rank, s.state_size
    channels = s.inner_size + 2 * s.group_count * n
    layers = seg.count if seg.stacked else None
    shape = (h, s.inner_size // h, n)
    return RecurrentState.create(layers, rows, channels, s.conv_kernel, shape, layout.checkpoints)
