"""Token embedding, also used as the tied output projection."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class Embed(nn.Module):
    vocab_size: int
    dim: int
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        self.embedding = self.param(
            "embedding", nn.initializers.normal(0.02), (self.vocab_size, self.dim), self.dtype
        )

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return jnp.take(self.embedding, tokens, axis=0)  # [B, T] -> [B, T, D]

    def attend(self, x: jax.Array) -> jax.Array:
        return jnp.dot(x, self.embedding.T.astype(x.dtype))  # [B, D] -> [B, V]
