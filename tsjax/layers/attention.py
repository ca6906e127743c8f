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
from tsjax.layers.norms import RMSNorm, rms_norm
from tsjax.layers.rope import RopeTables, rotate


class Attention(nn.Module):
    """Projections, optional q/k RMSNorm, RoPE, cache write, attention, output projection.

    Gemma 4 adds: values RMS-normed without a weight (`v_norm`); layers whose values are
    their keys' projection (`v_from_k`: no v projection, the values taken before the keys'
    norm and rotation); and layers that compute no keys or values at all (`kv_shared`): their
    queries attend over another layer's, which `state` then is (written by that layer)."""

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
    v_norm: bool = False
    v_from_k: bool = False
    kv_shared: bool = False

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
        n, h = self.n_heads, self.head_dim
        q = Linear(n * h, self.qkv_bias, self.dtype, self.quant, name="q")(x).reshape(b, t, n, h)
        o_proj = Linear(d, False, self.dtype, self.quant, name="o")
        if self.qk_norm:
            q = RMSNorm(self.norm_eps, self.dtype, name="q_norm")(q)
        q = rotate(q, rope)
        if not self.kv_shared:
            state = state.write(*self._keys_values(x, rope), step, layer)
        sinks = None
        if self.sinks:
            sinks = self.param("sinks", nn.initializers.zeros, (n,), jnp.float32)
        out = state.attend(q, step, layer, window, self.scale, self.softcap, sinks)
        return o_proj(out), state

    def _keys_values(self, x: jax.Array, rope: RopeTables) -> tuple[jax.Array, jax.Array]:
        """The step's keys (normed, rotated) and values [B, T, K, H]."""
        b, t, _ = x.shape
        kv, h = self.n_kv_heads, self.head_dim
        k = Linear(kv * h, self.qkv_bias, self.dtype, self.quant, name="k")(x).reshape(b, t, kv, h)
        if self.v_from_k:
            v = k
        else:
            v = Linear(kv * h, self.qkv_bias, self.dtype, self.quant, name="v")(x)
            v = v.reshape(b, t, kv, h)
        if self.qk_norm:
            k = RMSNorm(self.norm_eps, self.dtype, name="k_norm")(k)
        if self.v_norm:
            v = rms_norm(v, jnp.ones((h,), jnp.float32), self.norm_eps)
        return rotate(k, rope), v
