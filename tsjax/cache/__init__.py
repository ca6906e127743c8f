"""The cache: what each layer keeps between steps, as one pytree the steps donate.

Each layer kind has its own state type behind one interface (`tsjax.cache.state`): attention
keeps keys and values (`KVState`: write the step's new tokens, attend over them), a recurrent
layer (Gated DeltaNet, Mamba2) a convolution window and a recurrent state per row
(`RecurrentState`, `tsjax.cache.recurrent`); a layer that reads another layer's keys and
values keeps nothing (`SharedKV`, `tsjax.cache.shared`). Every state swaps rows, and checkpoints and
restores them (a no-op for keys and values, which rewind by their row's length alone). `Cache`
holds one state per segment of the layer loop and the rows' lengths.

Attention has two layouts with the same operations, picked with the layer loop:

- `StackedKV` `[L, B, K, S, H]` (accelerators, scanned layers): one buffer per segment;
- `BlockedKV` (XLA:CPU, unrolled layers): per layer, a grid of buffers by blocks of rows and
  positions, read in place by the kernels of `tsjax.cache.cpu_kernels`.

A stack of layers of different kinds (Gated DeltaNet or Mamba2 layers between attention
layers) is looped segment by segment (`tsjax.stack.layer_plan`). Unrolled (CPU), every
layer is a segment with its own state, so attention layers keep `BlockedKV` and each
recurrent layer its own state, side by side in `Cache.layers`. Scanned (accelerators), each
run of equal-kind layers is one `nn.scan` over weights and state stacked on a leading layer
axis, and its state is one stacked state (a run of attention layers one `StackedKV`); a
pattern whose runs are short may rather be unrolled there too (`Decoder(unrolled=True)`).
The decoder hands each segment its state and collects the updated one; the steps never look
inside.

A new kind of state is a module here with the `LayerState` operations and an entry in
`STATES` (kind -> how to create it); its layer module, which reads and updates it, is the
family's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import jax.numpy as jnp

from tsjax.cache.blocked import BlockedKV
from tsjax.cache.recurrent import RecurrentState, deltanet_state, mamba2_state
from tsjax.cache.shared import SharedKV
from tsjax.cache.stacked import StackedKV
from tsjax.cache.state import Cache, KVLayout, KVState, LayerState, NoState, Step
from tsjax.stack import ATTENTION, DELTANET, MAMBA2, Segment

if TYPE_CHECKING:  # tsjax.models imports this package (a real import would be a cycle)
    from tsjax.models.config import ModelConfig


def kv_state(
    cfg: ModelConfig, seg: Segment, layout: KVLayout, rows: int, max_len: int, dtype
) -> StackedKV | BlockedKV:
    """An attention segment's zeroed keys and values in `layout` (its layers' KV heads and
    head size, which every layer of a segment shares)."""
    kv, h = cfg.kv_heads_at(seg.first), cfg.head_dim_at(seg.first)
    assert all((cfg.kv_heads_at(i), cfg.head_dim_at(i)) == (kv, h) for i in seg.layers), seg
    if layout.blocks is None:
        return StackedKV.create(seg.count, rows, kv, max_len, h, dtype)
    assert not seg.stacked, "the blocked layout is per layer (an unrolled layer loop)"
    assert layout.blocks[0][-1] == rows and layout.blocks[1][-1] == max_len, layout.blocks
    return BlockedKV.create(
        layout.blocks, kv, h, dtype, layout.skip_min_rows, layout.native_attention
    )


def no_state(cfg: ModelConfig, seg: Segment, layout: KVLayout, rows: int, max_len: int, dtype):
    """The state of a layer kind that keeps nothing between steps (an MLP-only layer)."""
    return NoState()


#: Layer kind -> its state's constructor (cfg, segment, layout, rows, max_len, dtype).
STATES: dict[str, Callable[..., Any]] = {
    ATTENTION: kv_state,
    DELTANET: deltanet_state,
    MAMBA2: mamba2_state,
}


def create_cache(
    cfg: ModelConfig,
    segments: Sequence[Segment],
    layout: KVLayout,
    rows: int,
    max_len: int,
    dtype=jnp.float32,
) -> Cache:
    """A zeroed cache: one state per segment, every row empty. A segment whose layers read
    another layer's keys and values (`ModelConfig.kv_source`) holds a `SharedKV`."""
    layers = tuple(
        SharedKV(cfg.kv_source(s.first))
        if cfg.kv_source(s.first) != s.first
        else STATES[s.kind](cfg, s, layout, rows, max_len, dtype)
        for s in segments
    )
    shift = jnp.zeros((rows, max_len), jnp.int32) if cfg.mrope_sections else None
    return Cache(layers, jnp.zeros((rows,), jnp.int32), shift)


__all__ = [
    "STATES",
    "BlockedKV",
    "Cache",
    "KVLayout",
    "KVState",
    "LayerState",
    "NoState",
    "RecurrentState",
    "SharedKV",
    "StackedKV",
    "Step",
    "create_cache",
    "kv_state",
    "no_state",
]
