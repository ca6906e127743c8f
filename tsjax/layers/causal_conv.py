"""The short causal depthwise convolution in front of the recurrent layers (Gated DeltaNet's
q/k/v, Mamba2's x/B/C), with its window carried between steps.

Each channel c of the output at token t is sum_j w[c, j] * x[t - (K-1) + j, c] over the K
taps, where the taps before the step's first token come from the row's window (its last K-1
inputs, zeros for a fresh row). The weight is GGUF's `ssm_conv1d.weight` as llama.cpp's
converter writes it (HF's [C, 1, K] squeezed to [C, K]); the window is [B, C, K-1], the
layout of llama.cpp's conv state (`ggml_ssm_conv`).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


def causal_conv(
    x: jax.Array, window: jax.Array, weight: jax.Array, counts: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """x: [B, T, C] the step's inputs (the first counts[b] of row b are real); window:
    [B, C, K-1] the inputs before them; weight: [C, K]. Returns (y [B, T, C], the new window
    [B, C, K-1]: the last K-1 inputs up to and including each row's last real token, so a
    row's padding never enters it; a row with no real token keeps its window)."""
    t = x.shape[1]
    k = weight.shape[1]
    w = weight.astype(x.dtype)
    xp = jnp.concatenate([jnp.swapaxes(window, 1, 2).astype(x.dtype), x], axis=1)  # [B,K-1+T,C]
    # K shifted multiply-adds: K is 4, and a depthwise conv has no matmul to hand to.
    y = sum(xp[:, j : j + t] * w[:, j] for j in range(k))
    if t == 1:  # decode: shift by one, unless the row idles
        new = jnp.where((counts > 0)[:, None, None], xp[:, 1:], xp[:, :-1])
    else:
        idx = counts[:, None] + jnp.arange(k - 1, dtype=jnp.int32)  # [B, K-1]
        new = jnp.take_along_axis(xp, idx[:, :, None], axis=1)
    return y, jnp.swapaxes(new, 1, 2).astype(window.dtype)


class CausalConv1d(nn.Module):
    """The convolution's parameters: `weight` [C, K] (GGUF `ssm_conv1d.weight`) and, with
    `use_bias`, `bias` [C] (`ssm_conv1d.bias`, Mamba2's)."""

    kernel: int
    use_bias: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self, x: jax.Array, window: jax.Array, counts: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        """x: [B, T, C]; window: [B, C, K-1]; counts: [B]. Returns (silu(conv(x) + bias),
        new window); see `causal_conv`."""
        c = x.shape[-1]
        weight = self.param("weight", nn.initializers.normal(0.2), (c, self.kernel), self.dtype)
        y, window = causal_conv(x, window, weight, counts)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (c,), self.dtype).astype(y.dtype)
        return jax.nn.silu(y), window
