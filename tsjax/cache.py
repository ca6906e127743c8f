"""The KV cache: a pytree of all layers' keys and values plus per-row lengths.

Layout [L, B, K, S, H]: one leading layer axis so a single `lax.scan` walks the layers and
updates the cache in place (it is the loop carry, and the compiled steps donate it).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from tsjax.models.config import ModelConfig


@jax.tree_util.register_dataclass
@dataclass
class KVCache:
    k: jax.Array  # [L, B, K, S, H]
    v: jax.Array  # [L, B, K, S, H]
    lengths: jax.Array  # [B] int32: tokens held per row

    @classmethod
    def create(cls, cfg: ModelConfig, rows: int, max_len: int, dtype=jnp.float32) -> KVCache:
        shape = (cfg.n_layers, rows, cfg.n_kv_heads, max_len, cfg.head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((rows,), jnp.int32))
