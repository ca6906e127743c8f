"""The state of layers that keep nothing of their own: Gemma 4's KV-shared layers attend over
the keys and values an earlier layer wrote (`ModelConfig.kv_sources`), so their segment's
place in `Cache.layers` holds only which layer that is. The decoder hands such a segment the
source layer's state to read (`tsjax.models.decoder.Decoder`); nothing is copied, and every
row operation here is a no-op (the source's own state does it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import jax

from tsjax.cache.state import Named, Step


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class SharedKV:
    """A segment whose layers read layer `source`'s keys and values (no arrays)."""

    source: int = field(metadata=dict(static=True))

    REWINDS: ClassVar[bool] = True  # the source's keys and values rewind by length

    def prepare(self, step: Step) -> None:
        pass

    def swap(self, src: jax.Array, dst: jax.Array) -> SharedKV:
        return self

    def checkpoint(self, rows: jax.Array, which: jax.Array) -> SharedKV:
        return self

    def restore(self, rows: jax.Array, which: jax.Array) -> SharedKV:
        return self

    def shardings(self, named: Named) -> SharedKV:
        return self
