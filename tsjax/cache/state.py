"""The cache pytree and the interface every layer kind's state implements.

`Cache` holds one state per segment of the layer loop (`tsjax.stack.Segment`) plus
the per-row bookkeeping (`lengths`). A state is a registered dataclass pytree whose arrays
have the row axis first (after a stacked segment's layer axis); the compiled steps donate the
cache, so its operations (functional, each returning the updated state) run in place.

What each state offers (`LayerState`): exchange rows (`swap`), save a row's state into one of
its checkpoint slots and bring it back (`checkpoint` / `restore`), its per-step preparation
(`prepare`: made once for every layer that shares it), and its shardings. Attention states
add `write` (a step's new keys and values) and `attend` (`KVState`). Another kind of state
(a recurrent one) adds its own reads and updates, which its own layer module calls.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Protocol, Self

import jax
import jax.numpy as jnp

from tsjax.shapes import SKIP_MIN_ROWS, BlockBounds

#: Makes the sharding of one array from its logical axes and its shape (`ShardingPlan`).
Named = Callable[[tuple[str | None, ...], tuple[int, ...]], Any]

#: The logical axes of the per-row bookkeeping.
LENGTHS_AXES = ("batch",)
SHIFT_AXES = ("batch", None)


@jax.tree_util.register_dataclass
@dataclass
class Step:
    """Where one step's new tokens go, for every layer: positions [B, T] (cache positions of
    the T tokens of each batch row), rows [B] (their cache rows; None: the batch is the cache
    rows [0, B)), counts [B] (how many of a row's T tokens are real: a prefill row's prompt
    length, 1 or 0 for a decode row, active or idle; the rest is padding that no state may
    keep), and the static bucket `attn_len` of positions attention reads. `prepared` holds
    what the states made once for every layer (`LayerState.prepare`). `key_end` [B, T] (None:
    causal) is the exclusive end of the key positions each query sees, past its own
    position inside a bidirectional span of embeddings (`tsjax.spans`); a span lies whole
    inside one step, so every key it opens is one the step writes."""

    positions: jax.Array
    rows: jax.Array | None
    counts: jax.Array
    prepared: dict[str, Any] = field(default_factory=dict)
    attn_len: int = field(default=0, metadata=dict(static=True))
    key_end: jax.Array | None = None

    @property
    def decode(self) -> bool:
        """One new token for each of the cache rows [0, B)."""
        return self.rows is None and self.positions.shape[1] == 1

    @property
    def row_index(self) -> jax.Array:
        """[B] the cache row of each batch row."""
        b = self.positions.shape[0]
        return jnp.arange(b, dtype=jnp.int32) if self.rows is None else self.rows


class LayerState(Protocol):
    """One segment's state for every cache row. A state that is more than its positions (a
    recurrent one) starts a row afresh where the step's positions start at 0, and keeps
    only a row's real tokens (`Step.counts`): a decode row that idles, or a prefill's
    padding, must leave it as it was."""

    #: Whether a row's state at any earlier length is just its first positions (keys and
    #: values: rewinding is setting the length). A state that is not (a recurrent one) keeps
    #: `checkpoint`s to resume from.
    REWINDS: ClassVar[bool]

    def prepare(self, step: Step) -> None:
        """Add to `step.prepared` what this state's operations read every layer (under a key
        of its own, unless a state like it already did)."""
        ...

    def swap(self, src: jax.Array, dst: jax.Array) -> Self:
        """Row dst[i] takes row src[i]'s state ([n] each; src and dst together name each
        exchanged row twice). Indices >= B are padding: read clipped, write nothing."""
        ...

    def checkpoint(self, rows: jax.Array, slots: jax.Array) -> Self:
        """Save rows[b]'s state into its checkpoint slot slots[b] ([b] each; a slot < 0, or
        a row past the cache's, saves nothing). Each row has `KVLayout.checkpoints` slots."""
        ...

    def restore(self, rows: jax.Array, slots: jax.Array) -> Self:
        """Bring back rows[b]'s state saved in slot slots[b] (< 0: none)."""
        ...

    def shardings(self, named: Named) -> Self:
        """The same state with each array replaced by its sharding."""
        ...


class KVState(LayerState, Protocol):
    """An attention layer's keys and values (`layer`: the index into a stacked segment's
    leading axis, traced inside a scan; 0 for a state of one layer)."""

    def write(self, k: jax.Array, v: jax.Array, step: Step, layer: Any) -> Self:
        """Keys and values [B, T, K, H] of the step's tokens, at their rows and positions;
        rows >= the cache's (padding) and positions >= S are dropped."""
        ...

    def attend(
        self,
        q: jax.Array,
        step: Step,
        layer: Any,
        window: jax.Array,
        scale: float,
        softcap: float | None,
        sinks: jax.Array | None = None,
    ) -> jax.Array:
        """Queries [B, T, N, H] at the step's positions over this layer's first `attn_len`
        cache positions of their rows (causal or up to `step.key_end`, optional sliding
        window; `sinks` [N]: a sink logit per head, `tsjax.cache.dense.softmax_with_sink`).
        -> [B, T, N*H]."""
        ...


@dataclass(frozen=True)
class KVLayout:
    """How the states are laid out: attention's keys and values stacked `[L, B, K, S, H]`
    (`blocks` None), or in blocks of rows and positions (CPU; `tsjax.cache.blocked`); and how
    many checkpoint slots each row of a state that cannot rewind keeps (`checkpoints`);
    whether blocked attention may run in the native CPU kernel (`native_attention`:
    not over a mesh, whose sharded blocks XLA partitions through its own ops only)."""

    blocks: BlockBounds | None = None
    skip_min_rows: int = SKIP_MIN_ROWS
    checkpoints: int = 2
    native_attention: bool = True


@jax.tree_util.register_dataclass
@dataclass
class NoState:
    """The state of a layer that keeps nothing between steps (Nemotron-H's MLP and MoE
    layers): no arrays, every operation a no-op."""

    REWINDS: ClassVar[bool] = True

    def prepare(self, step: Step) -> None:
        pass

    def swap(self, src: jax.Array, dst: jax.Array) -> NoState:
        return self

    def checkpoint(self, rows: jax.Array, slots: jax.Array) -> NoState:
        return self

    def restore(self, rows: jax.Array, slots: jax.Array) -> NoState:
        return self

    def shardings(self, named: Named) -> NoState:
        return self


@jax.tree_util.register_dataclass
@dataclass
class Cache:
    """Every segment's state (`layers`, in layer order) and how many tokens each row holds
    (`lengths` [B] int32). An M-RoPE model's cache also keeps `rope_shift` [B, S] int32: at
    each position, the rope position of the token after it minus that token's cache position
    (0 until an image moves them apart, `tsjax.spans`); a row's prefix keeps its shifts
    whatever comes after, so resuming from any prefix (or a checkpoint) finds them. None for
    the other models (their steps are what they were)."""

    layers: tuple[Any, ...]
    lengths: jax.Array
    rope_shift: jax.Array | None = None

    @property
    def rewinds(self) -> bool:
        """Whether any row can resume from any prefix of what it holds (see `REWINDS`)."""
        return all(type(s).REWINDS for s in self.layers)

    def step(
        self,
        positions: jax.Array,
        rows: jax.Array | None,
        counts: jax.Array,
        attn_len: int,
        key_end: jax.Array | None = None,
    ) -> Step:
        """The step's `Step`, each state's per-step preparation made once."""
        step = Step(positions, rows, counts, {}, attn_len, key_end)
        for s in self.layers:
            s.prepare(step)
        return step

    def with_layers(self, layers) -> Cache:
        return replace(self, layers=tuple(layers))

    def shift_before(self, rows: jax.Array, starts: jax.Array) -> jax.Array:
        """[b] the rope shift a step that writes rows[i] from position starts[i] starts
        with: what the token before it left (0 at position 0, and without `rope_shift`)."""
        if self.rope_shift is None:
            return jnp.zeros_like(starts)
        prev = jnp.maximum(starts - 1, 0)
        got = self.rope_shift[jnp.clip(rows, 0, self.rope_shift.shape[0] - 1), prev]
        return jnp.where(starts > 0, got, 0)

    def write_shift(
        self, rows: jax.Array, positions: jax.Array, shifts: jax.Array, real: jax.Array
    ) -> Cache:
        """Record shifts [b, T] at rows [b] x positions [b, T] where `real` [b, T] (padding
        tokens and rows past the cache's write nothing)."""
        if self.rope_shift is None:
            return self
        where = jnp.where(real, positions, self.rope_shift.shape[1])
        table = self.rope_shift.at[rows[:, None], where].set(shifts, mode="drop")
        return replace(self, rope_shift=table)

    def swap(self, src: jax.Array, dst: jax.Array) -> Cache:
        """Exchange rows (see `LayerState.swap`), lengths (and rope shifts) included."""

        def move(x):
            return x.at[dst].set(jnp.take(x, src, axis=0, mode="clip"), mode="drop")

        shift = None if self.rope_shift is None else move(self.rope_shift)
        return Cache(tuple(s.swap(src, dst) for s in self.layers), move(self.lengths), shift)

    def checkpoint(self, rows: jax.Array, slots: jax.Array) -> Cache:
        """Save rows[b] into checkpoint slot slots[b] (< 0: none) in every state."""
        return self.with_layers(s.checkpoint(rows, slots) for s in self.layers)

    def restore(self, rows: jax.Array, slots: jax.Array) -> Cache:
        """Bring rows[b] back from checkpoint slot slots[b] (< 0: none) in every state."""
        return self.with_layers(s.restore(rows, slots) for s in self.layers)

    def shardings(self, named: Named) -> Cache:
        """Shardings of this (or an abstract, `jax.eval_shape`) cache, same structure."""
        shift = self.rope_shift
        return Cache(
            tuple(s.shardings(named) for s in self.layers),
            named(LENGTHS_AXES, self.lengths.shape),
            None if shift is None else named(SHIFT_AXES, shift.shape),
        )
