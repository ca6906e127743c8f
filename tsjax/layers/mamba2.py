"""Mamba2: the selective state-space layer of Nemotron-H (GGUF `nemotron_h`, `nemotron_h_moe`).

One input projection gives the gate z, the convolution's input xBC and the time step dt; xBC
passes through a short causal convolution (with bias) and SiLU and splits into x [H, P] and
B, C [G, N] (heads h read group h // (H/G)). Per head, with dt = softplus(dt + dt_bias):

    S <- exp(dt A) S + dt x B^T;  y = S C + D x

(A = ssm_a, negative). Then y * silu(z) is RMS-normalised per group of channels, scaled, and
projected out.

Prefill runs the SSD chunked scan (state space duality): within a chunk of c tokens the
outputs are a masked attention-like product, (C_i . B_j) exp(sum of dt A over (j, i]) x_j
dt_j; each chunk's contribution to the state is one product over its tokens; only the
passage of the state from chunk to chunk is sequential (T/c steps), and the outputs' read of
each chunk's starting state is one batched product afterwards. Decode (T = 1) is the one-step
recurrence. A row's padding tokens get dt = 0, which leaves its state exactly as its last
real token left it.
On XLA:CPU the token-by-token form (`recurrent=True`) costs less CPU than the chunked one at
real models' sizes (BENCHMARKS.md, "Recurrent layers"); the chunked form is for accelerators.

Parameters follow the GGUF layout (llama.cpp's converter, `Mamba2Model.modify_tensors`), so
the loader copies each tensor (E = H*P, the inner size):

| GGUF tensor (blk.i.) | param path     | shape              | logical axes               |
|----------------------|----------------|--------------------|----------------------------|
| ssm_in.weight        | in_proj/weight | [2*E + 2*G*N + H, D] | (ssm_channels, embed)    |
| ssm_conv1d.weight    | conv1d/weight  | [E + 2*G*N, K]     | (ssm_channels, None)       |
| ssm_conv1d.bias      | conv1d/bias    | [E + 2*G*N]        | (ssm_channels,)            |
| ssm_dt.bias          | dt_bias        | [H]                | (ssm_heads,)               |
| ssm_a                | a              | [H, 1]             | (ssm_heads, None)          |
| ssm_d                | d              | [H, 1]             | (ssm_heads, None)          |
| ssm_norm.weight      | norm/scale     | [G, E/G]           | (ssm_groups, None)         |
| ssm_out.weight       | out/weight     | [D, E]             | (embed, ssm_heads)         |

What the converter changes from transformers' `NemotronHMamba2Mixer`: `ssm_a` is
-exp(A_log) and, like `ssm_d`, gets a trailing axis of 1; the conv weight is squeezed to
[C, K]; the norm weight is reshaped to [G, E/G] (no +1). The in_proj rows keep transformers'
order [z (E) | x (E) | B (G*N) | C (G*N) | dt (H)]. GGUF metadata: K = `ssm.conv_kernel`,
E = `ssm.inner_size`, N = `ssm.state_size`, H = `ssm.time_step_rank`, G = `ssm.group_count`,
eps = `attention.layer_norm_rms_epsilon`. transformers also clamps dt to
`time_step_limit` in its chunked path; the GGUF does not carry it and llama.cpp does not
clamp (the default limit (0, inf) is no clamp).
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

CHUNK = 128  # transformers' NemotronHConfig.chunk_size default


def ssd_step(x, dt, decay, b, c, s):
    """One token for every row and head. x: [B, H, P]; dt: [B, H] (after softplus); decay:
    [B, H] (exp(dt A)); b, c: [B, G, N]; s: [B, H, P, N]. Returns (y [B, H, P] without the
    D skip, s).

    s keeps its shape throughout (B and C are repeated to the heads instead), so XLA:CPU
    updates it in place; y reads the new s (reading the old one would let the update run
    first and copy s to keep it)."""
    r = x.shape[1] // b.shape[1]
    b, c = jnp.repeat(b, r, axis=1), jnp.repeat(c, r, axis=1)  # [B, H, N], head h: group h // r
    xdt = x * dt[..., None]
    s = s * decay[..., None, None] + xdt[..., None] * b[:, :, None, :]
    return jnp.einsum("bhpn,bhn->bhp", s, c), s


def recurrent_ssd(x, dt, a, b, c, s):
    """The token-by-token form over T tokens (the reference the chunked form must equal).
    x: [B, T, H, P]; dt: [B, T, H]; b, c: [B, T, G, N]; s: [B, H, P, N]."""

    def body(s, xs):
        x, dt, b, c = xs
        y, s = ssd_step(x, dt, jnp.exp(dt * a), b, c, s)
        return s, y

    s, y = jax.lax.scan(body, s, tuple(jnp.moveaxis(v, 1, 0) for v in (x, dt, b, c)))
    return jnp.moveaxis(y, 0, 1), s


def chunked_ssd(x, dt, a, b, c, s, chunk: int = CHUNK):
    """The SSD chunked scan; same arguments and result as `recurrent_ssd`.

    Per chunk (cumulative log decay A_i = sum of dt A up to token i; heads h = (g, r), r
    indexing the heads of group g): outputs (C_i.B_j) exp(A_i - A_j) x_j dt_j over j <= i,
    plus exp(A_i) C_i . S (S the state at the chunk's start); the state becomes
    exp(A_c) S + sum_j exp(A_c - A_j) dt_j x_j B_j^T."""
    n_b, t, h, p = x.shape
    g, n = b.shape[2:]
    r = h // g
    nc = -(-t // chunk)

    def chunks(v, *tail):  # [B, T, ...] -> [B, nc, c, *tail], zero-padded to nc*c tokens
        v = jnp.pad(v, [(0, 0), (0, nc * chunk - t)] + [(0, 0)] * (v.ndim - 2))
        return v.reshape(n_b, nc, chunk, *tail)

    xdt = chunks(x * dt[..., None], g, r, p)  # [B, nc, c, G, R, P]
    acs = jnp.cumsum(chunks(dt * a, g, r), axis=2)  # [B, nc, c, G, R]
    b, c = chunks(b, g, n), chunks(c, g, n)  # [B, nc, c, G, N]
    lower = jnp.tril(jnp.ones((chunk, chunk), bool))
    at = jnp.moveaxis(acs, 2, -1)  # [B, nc, G, R, c]
    diff = at[..., :, None] - at[..., None, :]
    decay = jnp.where(lower, jnp.exp(jnp.where(lower, diff, 0.0)), 0.0)  # no exp overflow
    cb = jnp.einsum("bzign,bzjgn->bzgij", c, b)
    y = jnp.einsum("bzgrij,bzjgrp->bzigrp", cb[:, :, :, None] * decay, xdt)
    last = acs[:, :, -1:]  # [B, nc, 1, G, R]
    # The decay to the chunk's end scales x (a head's own), so B stays per group: one
    # [R*P, c] @ [c, N] product per group and chunk.
    x_end = xdt * jnp.exp(last - acs)[..., None]
    contrib = jnp.einsum("bzlgn,bzlgrp->bzgrpn", b, x_end)  # [B, nc, G, R, P, N]

    def body(s, xs):  # the state at each chunk's start
        contrib, last = xs
        return s * last[..., None, None] + contrib, s

    xs = (jnp.moveaxis(contrib, 1, 0), jnp.moveaxis(jnp.exp(last[:, :, 0]), 1, 0))
    s, starts = jax.lax.scan(body, s.reshape(n_b, g, r, p, n), xs)  # starts: [nc, B, G, R, P, N]
    y_off = jnp.einsum("bzign,zbgrpn->bzigrp", c, starts) * jnp.exp(acs)[..., None]
    y = (y + y_off).reshape(n_b, nc * chunk, h, p)
    return y[:, :t], s.reshape(n_b, h, p, n)


class GroupedGatedRMSNorm(nn.Module):
    """y * silu(z), RMS-normalised per group of E/G channels, times `scale` [G, E/G] (GGUF
    `ssm_norm.weight`; transformers' NemotronHRMSNormGated: gate, then normalise)."""

    groups: int
    eps: float
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, y: jax.Array, z: jax.Array) -> jax.Array:
        """y, z: [..., E] -> [..., E] in y's dtype."""
        e = y.shape[-1]
        scale = self.param(
            "scale", nn.initializers.ones, (self.groups, e // self.groups), self.dtype
        )
        y = y * jax.nn.silu(z.astype(y.dtype))
        y = y.reshape(*y.shape[:-1], self.groups, e // self.groups)
        y = y * jax.lax.rsqrt(jnp.mean(y * y, axis=-1, keepdims=True) + self.eps)
        return (y * scale.astype(y.dtype)).reshape(*y.shape[:-2], e)


class Mamba2(nn.Module):
    """The layer: input projection, conv, selective scan over the row's state, D skip, gated
    grouped norm, output. Called as `(x [B, T, D], state, layer, step) -> (out, state)`,
    like `tsjax.layers.attention.Attention` (`layer` indexes a stacked state)."""

    #: Paths under this module's params (a block holding it as `name` prefixes them).
    PARAMS: ClassVar[tuple[Param, ...]] = (
        Param("ssm_in.weight", ("in_proj", "weight"), ("ssm_channels", "embed")),
        Param("ssm_conv1d.weight", ("conv1d", "weight"), ("ssm_channels", None)),
        Param("ssm_conv1d.bias", ("conv1d", "bias"), ("ssm_channels",)),
        Param("ssm_dt.bias", ("dt_bias",), ("ssm_heads",)),
        Param("ssm_a", ("a",), ("ssm_heads", None)),
        Param("ssm_d", ("d",), ("ssm_heads", None)),
        Param("ssm_norm.weight", ("norm", "scale"), ("ssm_groups", None)),
        Param("ssm_out.weight", ("out", "weight"), ("embed", "ssm_heads")),
    )

    n_heads: int  # H
    head_dim: int  # P
    n_groups: int  # G
    state_size: int  # N
    conv_kernel: int  # K
    norm_eps: float
    chunk: int = CHUNK
    conv_bias: bool = True
    dtype: jnp.dtype = jnp.float32
    quant: str | None = None

    @classmethod
    def from_ssm(cls, ssm: SSMConfig, norm_eps: float, **kw) -> Mamba2:
        """The layer of a model's `ModelConfig.ssm` (GGUF `{arch}.ssm.*`); `kw`: the other
        fields (chunk, conv_bias, dtype, quant, name)."""
        h = ssm.time_step_rank
        return cls(
            n_heads=h,
            head_dim=ssm.inner_size // h,
            n_groups=ssm.group_count,
            state_size=ssm.state_size,
            conv_kernel=ssm.conv_kernel,
            norm_eps=norm_eps,
            **kw,
        )

    @property
    def inner(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def conv_channels(self) -> int:
        return self.inner + 2 * self.n_groups * self.state_size

    def new_state(self, layers: int | None, rows: int, slots: int = 1) -> RecurrentState:
        """A zeroed state of `layers` such layers (None: one unrolled layer, no layer axis)
        for `rows` cache rows, with `slots` checkpoint slots each."""
        shape = (self.n_heads, self.head_dim, self.state_size)
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
        bsz, t, d = x.shape
        h, p, g, n, e = self.n_heads, self.head_dim, self.n_groups, self.state_size, self.inner
        f32 = jnp.float32

        def linear(features, name):
            return Linear(features, False, self.dtype, self.quant, name=name)

        zxbcdt = linear(2 * e + 2 * g * n + h, "in_proj")(x)
        z, xbc, dt = zxbcdt[..., :e], zxbcdt[..., e : e + self.conv_channels], zxbcdt[..., -h:]
        dt_bias = self.param("dt_bias", nn.initializers.ones, (h,), self.dtype).astype(f32)
        a = self.param("a", nn.initializers.constant(-1.0), (h, 1), self.dtype).astype(f32)
        d_skip = self.param("d", nn.initializers.ones, (h, 1), self.dtype).astype(f32)
        window, s, carry = state.read(step, layer)
        conv = CausalConv1d(self.conv_kernel, self.conv_bias, self.dtype, name="conv1d")
        xbc, window = conv(xbc, window, step.counts)
        xbc = xbc.astype(f32)
        xs = xbc[..., :e].reshape(bsz, t, h, p)
        b = xbc[..., e : e + g * n].reshape(bsz, t, g, n)
        c = xbc[..., e + g * n :].reshape(bsz, t, g, n)
        # A row's padding (tokens past its count) has dt = 0: no decay, no input.
        real = jnp.arange(t, dtype=jnp.int32)[None, :, None] < step.counts[:, None, None]
        dt = jnp.where(real, jax.nn.softplus(dt.astype(f32) + dt_bias), 0.0)
        if t == 1 and recurrent is not False:  # decode: one step, no loop
            decay = jnp.exp(dt[:, 0] * a[:, 0]) * carry[:, None]
            y, s = ssd_step(xs[:, 0], dt[:, 0], decay, b[:, 0], c[:, 0], s)
            y = y[:, None]
        elif recurrent:
            y, s = recurrent_ssd(xs, dt, a[:, 0], b, c, s * carry[:, None, None, None])
        else:
            y, s = chunked_ssd(xs, dt, a[:, 0], b, c, s * carry[:, None, None, None], self.chunk)
        y = (y + xs * d_skip).reshape(bsz, t, e)
        y = GroupedGatedRMSNorm(g, self.norm_eps, self.dtype, name="norm")(y, z).astype(x.dtype)
        return linear(d, "out")(y), state.write(window, s, step, layer)
