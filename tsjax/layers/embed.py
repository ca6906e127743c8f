"""Token embedding, also used as the tied output projection; Gemma 4's per-layer inputs."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from tsjax.kernels.blocks import QK, block_matmul, q4_dequantize, q8_dequantize
from tsjax.layers.linear import Linear, transposed_matmul
from tsjax.layers.norms import RMSNorm
from tsjax.quants import BLOCK_QUANTS


class Embed(nn.Module):
    """The [V, D] table. With a block format (`quant` "q8" / "q4", D a multiple of 32) it is
    held in blocks of 32 as the Linears' weights are (`tsjax.kernels.blocks`: `q`, `d`, or
    `qs`, `d`, `m`), a lookup dequantizes only the rows it gathers, and the tied output
    projection runs on the same blocks: no float copy of the table."""

    vocab_size: int
    dim: int
    dtype: jnp.dtype = jnp.float32
    quant: str | None = None

    def setup(self):
        v, d = self.vocab_size, self.dim
        if self.quant in BLOCK_QUANTS and d % QK == 0:
            g = d // QK
            if self.has_variable("params", "qs"):
                self.blocks = {
                    "qs": self.param("qs", nn.initializers.zeros, (v, d // 2), jnp.uint8),
                    "d": self.param("d", nn.initializers.ones, (g, v), jnp.float16),
                    "m": self.param("m", nn.initializers.zeros, (g, v), jnp.float16),
                }
            else:
                self.blocks = {
                    "q": self.param("q", nn.initializers.zeros, (v, d), jnp.int8),
                    "d": self.param("d", nn.initializers.ones, (g, v), jnp.float16),
                }
        else:
            self.blocks = None
            self.embedding = self.param(
                "embedding", nn.initializers.normal(0.02), (v, d), self.dtype
            )

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """tokens [B, T] -> [B, T, D] in `dtype`."""
        if self.blocks is None:
            return jnp.take(self.embedding, tokens, axis=0)
        flat, b = tokens.reshape(-1), self.blocks
        d = jnp.take(b["d"], flat, axis=1)  # [D/32, n]
        if "qs" in b:
            m = jnp.take(b["m"], flat, axis=1)
            rows = q4_dequantize(jnp.take(b["qs"], flat, axis=0), d, m, self.dtype)
        else:
            rows = q8_dequantize(jnp.take(b["q"], flat, axis=0), d, self.dtype)
        return rows.reshape(*tokens.shape, self.dim)

    def attend(self, x: jax.Array) -> jax.Array:
        """[..., D] -> [..., V] logits, as (table @ x^T)^T (see tsjax.layers.linear), or
        through the block kernels."""
        if self.blocks is not None:
            return block_matmul(x, self.blocks)
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
