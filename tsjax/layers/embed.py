"""Token embedding, also used as the tied output projection."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from tsjax.kernels.blocks import QK, block_matmul, q4_dequantize, q8_dequantize
from tsjax.layers.linear import transposed_matmul
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
