"""Feed-forward blocks: gated, down(act(gate(x)) * up(x)), for the decoders; plain,
down(act(up(x))), with biases for the vision encoders and without for Nemotron-H's squared
ReLU MLP."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from tsjax.layers.linear import Linear
from tsjax.quants import BLOCK_QUANTS

ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # exact (erf): Pixtral's "gelu"
    # CLIP's "quick GELU" (llama.cpp's default for projectors without clip.use_gelu)
    "gelu_quick": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu2": lambda x: jnp.square(jax.nn.relu(x)),  # Nemotron-H's MLP (no gate)
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
        # into the activation and back out of it. int8 and the block formats' kernels take
        # rows first.
        ff = self.quant not in ("int8", *BLOCK_QUANTS)
        gate = Linear(self.ffn_dim, dtype=self.dtype, quant=self.quant, name="gate")
        up = Linear(self.ffn_dim, dtype=self.dtype, quant=self.quant, name="up")
        down = Linear(x.shape[-1], dtype=self.dtype, quant=self.quant, name="down")
        h = act(gate(x, features_first_out=ff)) * up(x, features_first_out=ff)
        return down(h, features_first_in=ff)  # [B, T, D]


class MLP(nn.Module):
    """down(act(up(x) + b_up)) + b_down. x: [..., D] -> [..., D]."""

    ffn_dim: int
    activation: str = "gelu_tanh"
    use_bias: bool = True
    dtype: jnp.dtype = jnp.float32
    quant: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        act = ACTIVATIONS[self.activation]
        up = Linear(self.ffn_dim, self.use_bias, self.dtype, self.quant, name="up")
        down = Linear(x.shape[-1], self.use_bias, self.dtype, self.quant, name="down")
        # features first between the matmuls, as in GatedMLP (float weights)
        ff = self.quant != "int8"
        return down(act(up(x, features_first_out=ff)), features_first_in=ff)
