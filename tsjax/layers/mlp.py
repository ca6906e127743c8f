"""Gated feed-forward: down(act(gate(x)) * up(x))."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from tsjax.layers.linear import Linear

ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


class GatedMLP(nn.Module):
    ffn_dim: int
    activation: str = "silu"
    dtype: jnp.dtype = jnp.float32
    quant: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        act = ACTIVATIONS[self.activation]
        # Float weights: gate and up leave their outputs features first ([F, B, T], the
        # matmuls' own layout) and down takes them so; rows first, XLA:CPU transposed both
        # into the activation and back out of it.
        ff = self.quant != "int8"
        gate = Linear(self.ffn_dim, dtype=self.dtype, quant=self.quant, name="gate")
        up = Linear(self.ffn_dim, dtype=self.dtype, quant=self.quant, name="up")
        down = Linear(x.shape[-1], dtype=self.dtype, quant=self.quant, name="down")
        h = act(gate(x, features_first_out=ff)) * up(x, features_first_out=ff)
        return down(h, features_first_in=ff)  # [B, T, D]
