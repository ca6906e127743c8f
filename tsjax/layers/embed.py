"""Token embedding, also used as the tied output projection."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from tsjax.layers.linear import transposed_matmul


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
        """[..., D] -> [..., V] logits, as (table @ x^T)^T (see tsjax.layers.linear)."""
        return transposed_matmul(x, self.embedding.astype(x.dtype))
