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
        gate = Linear(self.ffn_dim, dtype=self.dtype, quant=self.quant, name="gate")(x)  # [B, T, F]
        up = Linear(self.ffn_dim, dtype=self.dtype, quant=self.quant, name="up")(x)
        return Linear(x.shape[-1], dtype=self.dtype, quant=self.quant, name="down")(
            act(gate) * up
        )  # [B, T, D]
