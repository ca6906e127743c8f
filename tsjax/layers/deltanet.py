"""Gated DeltaNet: the linear-attention layer of Qwen 3.5 (GGUF `qwen35`, `qwen35moe`).

Per value head, a state S [Dk, Dv] is decayed and corrected by the delta rule at each token:

    S <- exp(g) S;  S <- S + k (beta (v - S^T k))^T;  o = S^T q / sqrt(Dk)

with q, k L2-normalised, beta = sigmoid(x W_beta) and the log decay
g = ssm_a * softplus(x W_alpha + dt_bias) (ssm_a = -exp(A_log), negative). Before that, q/k/v
pass through a short causal convolution and SiLU; after, o is RMS-normalised per head, scaled,
gated by silu(z) and projected out.

Prefill runs the chunked form (chunks of 64 tokens, as transformers' and llama.cpp's): within
a chunk the delta rule's corrections are one unit-lower-triangular solve (the "UT
transform"), so a chunk costs a few [64, 64] and [64, D] matrix products, and only the chunks
(T/64 of them) are sequential. Decode (T = 1) is the one-step recurrence. A row's padding
tokens get beta = 0 and g = 0, which leaves its state exactly as its last real token left it.
On XLA:CPU the token-by-token form (`recurrent=True`) costs less CPU than the chunked one at
real models' sizes (BENCHMARKS.md, "Recurrent layers"); the chunked form is for accelerators.

Parameters follow the GGUF layout (llama.cpp's converter), so the loader copies each tensor:

| GGUF tensor (blk.i.) | param path       | shape             | logical axes               |
|----------------------|------------------|-------------------|----------------------------|
| attn_qkv.weight      | qkv/weight       | [2*Hk*Dk+Hv*Dv, D] | (ssm_channels, embed)      |
| attn_gate.weight     | gate/weight      | [Hv*Dv, D]        | (ssm_heads, embed)         |
| ssm_beta.weight      | beta/weight      | [Hv, D]           | (ssm_heads, embed)         |
| ssm_alpha.weight     | alpha/weight     | [Hv, D]           | (ssm_heads, embed)         |
| ssm_conv1d.weight    | conv1d/weight    | [2*Hk*Dk+Hv*Dv, K] | (ssm_channels, None)       |
| ssm_dt.bias          | dt_bias          | [Hv]              | (ssm_heads,)               |
| ssm_a                | a                | [Hv]              | (ssm_heads,)               |
| ssm_norm.weight      | norm/scale       | [Dv]              | (head_dim,)                |
| ssm_out.weight       | out/weight       | [D, Hv*Dv]        | (embed, ssm_heads)         |

What the converter changes from transformers' `Qwen3_5GatedDeltaNet`: `ssm_a` is -exp(A_log);
the conv weight is squeezed to [C, K]; `ssm_norm` has no +1 (unlike the model's other norms);
and where Hv > Hk the value heads are reordered from grouped by key head (HF: value head j
reads key head j // (Hv/Hk)) to tiled (value head j reads key head j % Hk) in every
value-head-indexed tensor (the v rows of attn_qkv and the conv, attn_gate, ssm_beta,
ssm_alpha, ssm_dt, ssm_a, the columns of ssm_out), so here q and k are tiled, not repeated.
GGUF metadata: Hk = `ssm.group_count`, Hv = `ssm.time_step_rank`, Dk = `ssm.state_size`,
Hv*Dv = `ssm.inner_size`, K = `ssm.conv_kernel`, eps = `attention.layer_norm_rms_epsilon`
(llama.cpp's L2 norm uses it too; transformers' uses 1e-6, the same for Qwen 3.5).
(`qwen3next` differs: grouped value heads and a fused `ssm_ba`; not handled here.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from tsjax.cache.recurrent import RecurrentState
from tsjax.cache.state import Step
from tsjax.layers.causal_conv import CausalConv1d
from tsjax.layers.linear import Linear
from tsjax.stack import Param

if TYPE_CHECKING:  # the layers import nothing of tsjax.models
    from tsjax.models.config import SSMConfig

CHUNK = 64


def l2_normalize(x: jax.Array, eps: float) -> jax.Array:
    """x / sqrt(sum(x^2) + eps) over the last axis."""
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


def delta_rule_step(q, k, v, decay, beta, s):
    """One token of the gated delta rule for every row and head. q, k: [B, H, Dk] (q already
    scaled); v: [B, H, Dv]; decay (exp(g)), beta: [B, H]; s: [B, H, Dk, Dv]. Returns
    (o [B, H, Dv], s).

    o = s'^T q is computed from the old s (decay (s^T q) + (q.k) delta), so one product
    reads s for both q and k, and one pass updates it in place."""
    decay = decay[..., None]  # [B, H, 1]
    # Both reads in one product, rows last ("ibhv" out is 5x slower on XLA:CPU), so the
    # update depends on all of it and runs in place after it.
    qks = jnp.einsum("bhik,bhkv->bhiv", jnp.stack([q, k], axis=2), s)
    qs, ks = qks[:, :, 0], qks[:, :, 1]
    delta = beta[..., None] * (v - decay * ks)
    s = s * decay[..., None] + k[..., :, None] * delta[..., None, :]
    o = decay * qs + jnp.sum(q * k, axis=-1, keepdims=True) * delta
    return o, s


def recurrent_delta_rule(q, k, v, g, beta, s):
    """The token-by-token form over T tokens (the reference the chunked form must equal).
    q, k: [B, T, H, Dk]; v: [B, T, H, Dv]; g, beta: [B, T, H]; s: [B, H, Dk, Dv].
    Returns (o [B, T, H, Dv], s)."""
    q = q * q.shape[-1] ** -0.5

    def body(s, xs):
        o, s = delta_rule_step(*xs, s)
        return s, o

    xs = tuple(jnp.moveaxis(a, 1, 0) for a in (q, k, v, jnp.exp(g), beta))
    s, o = jax.lax.scan(body, s, xs)
    return jnp.moveaxis(o, 0, 1), s


def chunked_delta_rule(q, k, v, g, beta, s, chunk: int = CHUNK):
    """The chunked form; same arguments and result as `recurrent_delta_rule`.

    Per chunk of c tokens (cumulative log decay G_i within it, D_ij = exp(G_i - G_j) for
    j <= i): the tokens' corrections solve (I + tril_strict(diag(beta) K K^T * D)) U =
    [beta V | beta K exp(G)], so that, from the state S at the chunk's start, the corrected
    values are V' = U_v - U_k S; outputs are exp(G) Q S + tril(Q K^T * D) V'; and the state
    becomes exp(G_c) S + (K exp(G_c - G))^T V'."""
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    n = -(-t // chunk)
    q = q * dk**-0.5

    def chunks(x):  # [B, T, H, ...] -> [B, H, n, c, ...], zero-padded to n*c tokens
        x = jnp.pad(x, [(0, 0), (0, n * chunk - t)] + [(0, 0)] * (x.ndim - 2))
        x = x.reshape(b, n, chunk, *x.shape[2:])
        return jnp.moveaxis(x, 3, 1)

    q, k, v, g, beta = map(chunks, (q, k, v, g, beta))
    gc = jnp.cumsum(g, axis=-1)  # [B, H, n, c]
    lower = jnp.tril(jnp.ones((chunk, chunk), bool))
    diff = gc[..., :, None] - gc[..., None, :]
    decay = jnp.where(lower, jnp.exp(jnp.where(lower, diff, 0.0)), 0.0)  # no exp overflow
    k_beta = k * beta[..., None]
    a = jnp.einsum("...id,...jd->...ij", k_beta, k) * decay
    a = jnp.where(jnp.tril(lower, -1), a, 0.0) + jnp.eye(chunk, dtype=a.dtype)
    rhs = jnp.concatenate([v * beta[..., None], k_beta * jnp.exp(gc)[..., None]], axis=-1)
    sol = jax.lax.linalg.triangular_solve(a, rhs, left_side=True, lower=True, unit_diagonal=True)
    u, w = sol[..., :dv], sol[..., dv:]
    attn = jnp.einsum("...id,...jd->...ij", q, k) * decay
    q_g = q * jnp.exp(gc)[..., None]
    k_g = k * jnp.exp(gc[..., -1:] - gc)[..., None]
    last = jnp.exp(gc[..., -1])[..., None, None]  # [B, H, n, 1, 1]

    def body(s, xs):
        u, w, q_g, k_g, attn, last = xs
        v_new = u - jnp.einsum("bhck,bhkv->bhcv", w, s)
        o = jnp.einsum("bhck,bhkv->bhcv", q_g, s) + jnp.einsum("bhij,bhjv->bhiv", attn, v_new)
        s = s * last + jnp.einsum("bhck,bhcv->bhkv", k_g, v_new)
        return s, o

    xs = tuple(jnp.moveaxis(x, 2, 0) for x in (u, w, q_g, k_g, attn, last))
    s, o = jax.lax.scan(body, s, xs)  # o: [n, B, H, c, Dv]
    o = jnp.transpose(o, (1, 0, 3, 2, 4)).reshape(b, n * chunk, h, dv)
    return o[:, :t], s


class GatedRMSNorm(nn.Module):
    """RMS norm over the last axis, times `scale` (GGUF `ssm_norm.weight`), times silu(z)
    (transformers' Qwen3_5RMSNormGated: normalise, then gate)."""

    eps: float
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, o: jax.Array, z: jax.Array) -> jax.Array:
        """o, z: [..., Dv] -> [..., Dv] in o's dtype."""
        scale = self.param("scale", nn.initializers.ones, (o.shape[-1],), self.dtype)
        o = o * jax.lax.rsqrt(jnp.mean(o * o, axis=-1, keepdims=True) + self.eps)
        return o * scale.astype(o.dtype) * jax.nn.silu(z.astype(o.dtype))


class GatedDeltaNet(nn.Module):
    """The layer: projections, conv, delta rule over the row's state, gated norm, output.
    Called as `(x [B, T, D], state, layer, step) -> (out [B, T, D], state)`, like
    `tsjax.layers.attention.Attention` (`layer` indexes a stacked state)."""

    #: Paths under this module's params (a block holding it as `name` prefixes them).
    PARAMS: ClassVar[tuple[Param, ...]] = (
        Param("attn_qkv.weight", ("qkv", "weight"), ("ssm_channels", "embed")),
        Param("attn_gate.weight", ("gate", "weight"), ("ssm_heads", "embed")),
        Param("ssm_beta.weight", ("beta", "weight"), ("ssm_heads", "embed")),
        Param("ssm_alpha.weight", ("alpha", "weight"), ("ssm_heads", "embed")),
        Param("ssm_conv1d.weight", ("conv1d", "weight"), ("ssm_channels", None)),
        Param("ssm_dt.bias", ("dt_bias",), ("ssm_heads",)),
        Param("ssm_a", ("a",), ("ssm_heads",)),
        Param("ssm_norm.weight", ("norm", "scale"), ("head_dim",)),
        Param("ssm_out.weight", ("out", "weight"), ("embed", "ssm_heads")),
    )

    k_heads: int  # Hk
    v_heads: int  # Hv, a multiple of Hk
    k_dim: int  # Dk
    v_dim: int  # Dv
    conv_kernel: int  # K
    norm_eps: float
    chunk: int = CHUNK
    dtype: jnp.dtype = jnp.float32
    quant: str | None = None

    @classmethod
    def from_ssm(cls, ssm: SSMConfig, norm_eps: float, **kw) -> GatedDeltaNet:
        """The layer of a model's `ModelConfig.ssm` (GGUF `{arch}.ssm.*`); `kw`: the other
        fields (chunk, dtype, quant, name)."""
        hv = ssm.time_step_rank
        return cls(
            k_heads=ssm.group_count,
            v_heads=hv,
            k_dim=ssm.state_size,
            v_dim=ssm.inner_size // hv,
            conv_kernel=ssm.conv_kernel,
            norm_eps=norm_eps,
            **kw,
        )

    @property
    def conv_channels(self) -> int:
        return 2 * self.k_heads * self.k_dim + self.v_heads * self.v_dim

    def new_state(self, layers: int | None, rows: int, slots: int = 1) -> RecurrentState:
        """A zeroed state of `layers` such layers (None: one unrolled layer, no layer axis)
        for `rows` cache rows, with `slots` checkpoint slots each."""
        shape = (self.v_heads, self.k_dim, self.v_dim)
        return RecurrentState.create(
            layers, rows, self.conv_channels, self.conv_kernel, shape, slots
        )

    @nn.compact
    def __call__(
        self, x: jax.Array, state: RecurrentState, layer: Any, step: Step, recurrent=None
    ) -> tuple[jax.Array, RecurrentState]:
        """x: [B, T, D] at the step's positions. `recurrent` forces the token-by-token form
        (True) or the chunked one (False); by default decode (T = 1) steps once and a
        longer step runs in chunks."""
        b, t, d = x.shape
        hk, hv, dk, dv = self.k_heads, self.v_heads, self.k_dim, self.v_dim
        f32 = jnp.float32

        def linear(features, name):
            return Linear(features, False, self.dtype, self.quant, name=name)

        qkv = linear(self.conv_channels, "qkv")(x)
        z = linear(hv * dv, "gate")(x).reshape(b, t, hv, dv)
        beta = jax.nn.sigmoid(linear(hv, "beta")(x).astype(f32))
        alpha = linear(hv, "alpha")(x).astype(f32)
        dt_bias = self.param("dt_bias", nn.initializers.ones, (hv,), self.dtype).astype(f32)
        a = self.param("a", nn.initializers.constant(-1.0), (hv,), self.dtype).astype(f32)
        window, s, carry = state.read(step, layer)
        conv = CausalConv1d(self.conv_kernel, False, self.dtype, name="conv1d")
        qkv, window = conv(qkv, window, step.counts)
        qkv = qkv.astype(f32)
        q = l2_normalize(qkv[..., : hk * dk].reshape(b, t, hk, dk), self.norm_eps)
        k = l2_normalize(qkv[..., hk * dk : 2 * hk * dk].reshape(b, t, hk, dk), self.norm_eps)
        v = qkv[..., 2 * hk * dk :].reshape(b, t, hv, dv)
        q, k = (jnp.tile(y, (1, 1, hv // hk, 1)) for y in (q, k))  # tiled value heads
        # A row's padding (tokens past its count) neither decays nor writes its state.
        real = (jnp.arange(t, dtype=jnp.int32)[None, :] < step.counts[:, None])[..., None]
        g = jnp.where(real, a * jax.nn.softplus(alpha + dt_bias), 0.0)
        beta = jnp.where(real, beta, 0.0)
        if t == 1 and recurrent is not False:  # decode: one step, no loop
            decay = jnp.exp(g[:, 0]) * carry[:, None]
            o, s = delta_rule_step(q[:, 0] * dk**-0.5, k[:, 0], v[:, 0], decay, beta[:, 0], s)
            o = o[:, None]
        elif recurrent:
            o, s = recurrent_delta_rule(q, k, v, g, beta, s * carry[:, None, None, None])
        else:
            s = s * carry[:, None, None, None]
            o, s = chunked_delta_rule(q, k, v, g, beta, s, self.chunk)
        o = GatedRMSNorm(self.norm_eps, self.dtype, name="norm")(o, z).astype(x.dtype)
        out = linear(d, "out")(o.reshape(b, t, hv * dv))
        return out, state.write(window, s, step, layer)
