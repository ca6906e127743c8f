"""Token embedding, also used as the tied output projection; Gemma 4's per-layer inputs."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from tsjax.layers.linear import Linear, transposed_matmul
from tsjax.layers.norms import RMSNorm


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


class PerLayerInputs(nn.Module):
    """Gemma 4 E models' per-layer inputs: each layer l gets a small vector [P] made of its own
    slice of a second token embedding and of a projection of the main one:

        tok  = per_layer_embedding[token] * sqrt(P)     [L, P] per token
        proj = rms_norm(W x0 / sqrt(D)) * norm          [L, P], x0 the scaled embedding
        out  = (proj + tok) / sqrt(2)

    The table [V, L*P] is GGUF's `per_layer_token_embd`."""

    vocab_size: int
    n_layers: int
    dim: int  # P
    eps: float
    dtype: jnp.dtype = jnp.float32
    quant: str | None = None

    @nn.compact
    def __call__(self, tokens: jax.Array, x0: jax.Array) -> jax.Array:
        """tokens [B, T], x0 [B, T, D] (the scaled token embeddings) -> [L, B, T, P]."""
        n, p = self.n_layers, self.dim
        table = Embed(self.vocab_size, n * p, self.dtype, name="embed")
        tok = table(tokens) * jnp.asarray(p**0.5, x0.dtype)
        proj = Linear(n * p, False, self.dtype, self.quant, name="proj")(x0)
        proj = proj * jnp.asarray(x0.shape[-1] ** -0.5, x0.dtype)
        proj = RMSNorm(self.eps, self.dtype, name="norm")(proj.reshape(*proj.shape[:-1], n, p))
        out = (proj + tok.reshape(proj.shape)) * jnp.asarray(2**-0.5, x0.dtype)
        return jnp.moveaxis(out, -2, 0)
