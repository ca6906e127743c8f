"""Grouped-query attention over the cache.

One layer serves prefill and decode: projections, optional q/k RMSNorm and RoPE, then the
layer's cache state takes the T new keys/values at each row's positions and the queries
attend over the first `attn_len` cache positions with a causal (and, per layer,
sliding-window) mask. How the keys and values are laid out, and the kernels that read them,
are the state's (`tsjax.cache`): this layer is the same for every layout.

Two variants are options: partial or no RoPE (`rope_dim`: Qwen 3.5 rotates the first quarter
of each head, Nemotron-H's attention has no positions at all), and Qwen 3.5's output gate
(`output_gate`: the q projection gives each head [q | gate], and the attention output is
multiplied by sigmoid(gate) before the output projection).
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
    rope_dim: int | None = None  # rotated dims of each head: None all, 0 none, else the first
    output_gate: bool = False  # Qwen 3.5: q rows per head [q | gate], out * sigmoid(gate)
    o_bias: bool = False  # gpt-oss: a bias on the output projection

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        state: KVState,
        layer: Any,
        step: Step,
        window: jax.Array,
        rope: RopeTables,
        q_scale: jax.Array | None = None,
    ) -> tuple[jax.Array, KVState]:
        """x: [B, T, D] at the step's positions; state: this layer's keys and values (`layer`
        indexes a stacked state's leading axis); rope: this layer's
        `tsjax.layers.rope.rope_lookup` of the positions; q_scale: [B, T, 1, 1] multiplies
        the rotated queries (Mistral 3's `attention_temperature`). Returns (out [B, T, D],
        state)."""
        b, t, d = x.shape
        n, h = self.n_heads, self.head_dim
        gated = 2 if self.output_gate else 1
        q = Linear(gated * n * h, self.qkv_bias, self.dtype, self.quant, name="q")(x)
        q = q.reshape(b, t, n, gated * h)
        q, gate = q[..., :h], q[..., h:]  # [B, T, N, H] each (gate empty when not gated)
        o_proj = Linear(d, self.o_bias, self.dtype, self.quant, name="o")
        if self.qk_norm:
            q = RMSNorm(self.norm_eps, self.dtype, name="q_norm")(q)
        q = self._rotate(q, rope)
        if q_scale is not None:  # after RoPE, as Llama 4 / Mistral 3
            q = (q.astype(jnp.float32) * q_scale).astype(q.dtype)
        if not self.kv_shared:
            state = state.write(*self._keys_values(x, rope), step, layer)
        sinks = None
        if self.sinks:
            sinks = self.param("sinks", nn.initializers.zeros, (n,), jnp.float32)
        out = state.attend(q, step, layer, window, self.scale, self.softcap, sinks)
        if self.output_gate:
            g = jax.nn.sigmoid(gate.reshape(b, t, n * h).astype(jnp.float32))
            out = (out.astype(jnp.float32) * g).astype(out.dtype)
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
        return self._rotate(k, rope), v

    def _rotate(self, x: jax.Array, rope: RopeTables) -> jax.Array:
        """RoPE on the first `rope_dim` dims of each head (tables of that width), NeoX pairing
        among them; the other dims pass unrotated."""
        r = self.head_dim if self.rope_dim is None else self.rope_dim
        if r == 0:
            return x
        if r == self.head_dim:
            return rotate(x, rope)
        return jnp.concatenate([rotate(x[..., :r], rope), x[..., r:]], axis=-1)
