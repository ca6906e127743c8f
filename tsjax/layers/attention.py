"""Grouped-query attention over the cache.

One layer serves prefill and decode: projections, optional q/k RMSNorm and RoPE, then the
layer's cache state takes the T new keys/values at each row's positions and the queries
attend over the first `attn_len` cache positions with a causal (and, per layer,
sliding-window) mask. How the keys and values are laid out, and the kernels that read them,
are the state's (`tsjax.cache`): this layer is the same for every layout.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from tsjax.cache import KVState, Step
from tsjax.layers.linear import Linear
from tsjax.layers.norms import RMSNorm
from tsjax.layers.rope import RopeTables, rotate


class Attention(nn.Module):
    """Projections, optional q/k RMSNorm, RoPE, cache write, attention, output projection."""

    n_heads: int
    n_kv_heads: int
    head_dim: int
    norm_eps: float
    qkv_bias: bool = False
    qk_norm: bool = False
    scale: float = 1.0
    softcap: float | None = None
    dtype: jnp.dtype = jnp.float32
    quant: str | None = None
    sinks: bool = False  # gpt-oss: a learned sink logit per query head (`softmax_with_sink`)

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        state: KVState,
        layer: Any,
        step: Step,
        window: jax.Array,
        rope: RopeTables,
    ) -> tuple[jax.Array, KVState]:
        """x: [B, T, D] at the step's positions; state: this layer's keys and values (`layer`
        indexes a stacked state's leading axis); rope: this layer's
        `tsjax.layers.rope.rope_lookup` of the positions. Returns (out [B, T, D], state)."""
        b, t, d = x.shape
        n, kv, h = self.n_heads, self.n_kv_heads, self.head_dim
        q = Linear(n * h, self.qkv_bias, self.dtype, self.quant, name="q")(x).reshape(b, t, n, h)
        k = Linear(kv * h, self.qkv_bias, self.dtype, self.quant, name="k")(x).reshape(b, t, kv, h)
        v = Linear(kv * h, self.qkv_bias, self.dtype, self.quant, name="v")(x).reshape(b, t, kv, h)
        o_proj = Linear(d, False, self.dtype, self.quant, name="o")
        if self.qk_norm:
            q = RMSNorm(self.norm_eps, self.dtype, name="q_norm")(q)
            k = RMSNorm(self.norm_eps, self.dtype, name="k_norm")(k)
        q = rotate(q, rope)
        k = rotate(k, rope)
        sinks = None
        if self.sinks:
            sinks = self.param("sinks", nn.initializers.zeros, (n,), jnp.float32)
        state = state.write(k, v, step, layer)
        out = state.attend(q, step, layer, window, self.scale, self.softcap, sinks)
        return o_proj(out), state
