"""Nemotron-H (GGUF `nemotron_h`: Nemotron-H, Nemotron Nano v2; `nemotron_h_moe`: Nemotron 3
Nano): a stack of single-mixer blocks, each `x + mixer(rms(x))` with one norm (GGUF's
`attn_norm`, whatever the mixer). Three kinds, chosen per layer from the file's per-layer
arrays as llama.cpp does (`config`):

- `MAMBA2` (`tsjax.layers.mamba2`): a convolution window and an SSM state per row
  (`tsjax.cache.recurrent`); `head_count_kv[i] == 0` and `feed_forward_length[i] == 0`;
- `NEMOTRON_ATTENTION`: grouped-query attention with no positional encoding at all (no RoPE;
  the causal mask and the Mamba2 layers carry order); `feed_forward_length[i] == 0`;
- `NEMOTRON_FFN`: a squared-ReLU MLP without gate (`nemotron_h`), or a MoE (`nemotron_h_moe`:
  sigmoid router, top-k chosen with a selection bias but weighed without it, renormalised and
  scaled, squared-ReLU experts and a shared expert; `tsjax.layers.moe`). It keeps no state
  between steps (`tsjax.cache.NoState`).

The layer loop (`tsjax.stack.layer_plan`): on CPU every layer is its own segment, unrolled
(each Mamba2 layer with its own recurrent state, each attention layer with its blocked keys
and values); on accelerators each run of equal kinds is one `nn.scan` over stacked weights
and state. Nemotron-H's patterns alternate kinds almost every layer (`M-M-M*-...`), so runs
are short there and most segments hold one layer.

The Mamba2 layers' prefill form is the token-by-token scan on CPU and the chunked SSD scan
elsewhere (`tsjax.models.qwen35.recurrent_prefill`, the same measurement).
"""

from __future__ import annotations

from typing import ClassVar

import flax.linen as nn
import jax.numpy as jnp

from tsjax.cache import STATES, kv_state, no_state
from tsjax.gguf import GGUFError, GGUFFile
from tsjax.layers.attention import Attention
from tsjax.layers.mamba2 import Mamba2
from tsjax.layers.mlp import MLP
from tsjax.layers.moe import MoE, MoESpec, moe_params
from tsjax.layers.norms import RMSNorm
from tsjax.models.config import ModelConfig, SSMConfig, base_config_kwargs
from tsjax.models.decoder import BLOCKS
from tsjax.models.qwen35 import recurrent_prefill
from tsjax.stack import MAMBA2, Param

#: Nemotron-H's attention layer kind (no RoPE, no FFN) and its FFN-only kind (MLP or MoE).
NEMOTRON_ATTENTION = "nemotron_attention"
NEMOTRON_FFN = "nemotron_ffn"

#: The one norm of every block.
NORM = Param("attn_norm.weight", ("attn_norm", "scale"), ("embed",))


def _per_layer(value, n: int) -> list[int]:
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)] * n


def config(g: GGUFFile) -> ModelConfig:
    arch = g.architecture
    kw = base_config_kwargs(g, "nemotron_h")
    # the per-layer sizes are 0 where a layer has no attention / FFN: the layer kinds say
    # which layers have them, all of one size each (the model-wide values)
    kw["layer_kv_heads"], kw["layer_ffn_dims"] = (), ()
    n = kw["n_layers"]
    kv = _per_layer(g.meta(f"{arch}.attention.head_count_kv"), n)
    ff = _per_layer(g.meta(f"{arch}.feed_forward_length"), n)
    kinds = tuple(
        (MAMBA2 if k == 0 else NEMOTRON_ATTENTION) if f == 0 else NEMOTRON_FFN
        for k, f in zip(kv, ff, strict=True)
    )
    if len({f for f in ff if f}) > 1:
        raise GGUFError(f"{g.path.name}: FFN layers of different sizes {sorted(set(ff))}")
    # no `_rms_` key is written: llama.cpp falls back to the plain norm's epsilon
    kw["norm_eps"] = float(
        g.meta(f"{arch}.attention.layer_norm_rms_epsilon", None)
        or g.meta(f"{arch}.attention.layer_norm_epsilon", 1e-5)
    )
    moe = _moe_spec(g, kinds) if g.meta(f"{arch}.expert_count", None) else None
    if moe is not None:
        kw["ffn_dim"] = moe.shared_ffn_dim  # the only dense FFN ("ffw" axis)
    return ModelConfig(**kw, rope_dim=0, moe=moe, layer_kinds=kinds, ssm=SSMConfig.from_gguf(g))


def _moe_spec(g: GGUFFile, kinds: tuple[str, ...]) -> MoESpec:
    arch = g.architecture
    first = kinds.index(NEMOTRON_FFN)
    shared = int(g.meta(f"{arch}.expert_shared_feed_forward_length", 0))
    shared *= int(g.meta(f"{arch}.expert_shared_count", 1 if shared else 0))
    return MoESpec(
        n_experts=int(g.meta(f"{arch}.expert_count")),
        top_k=int(g.meta(f"{arch}.expert_used_count")),
        ffn_dim=int(g.meta(f"{arch}.expert_feed_forward_length")),
        scoring="sigmoid",
        normalize=bool(g.meta(f"{arch}.expert_weights_norm", False)),
        routed_scale=float(g.meta(f"{arch}.expert_weights_scale", 1.0)),
        selection_bias=g.has_tensor(f"blk.{first}.exp_probs_b.bias"),
        n_groups=int(g.meta(f"{arch}.expert_group_count", 1)),
        groups_used=int(g.meta(f"{arch}.expert_group_used_count", 1)),
        activation="relu2",
        latent_dim=int(g.meta(f"{arch}.moe_latent_size", 0)),
        shared_ffn_dim=shared,
    )


class NemotronMamba2Layer(nn.Module):
    """x + Mamba2(rms(x)). Called as every layer kind:
    `((x [B, T, D], state), step, (layer, window, base), rope) -> ((x, state), None)`."""

    PARAMS: ClassVar[tuple[Param, ...]] = (
        NORM,
        *(Param(p.gguf, ("mamba2", *p.path), p.axes) for p in Mamba2.PARAMS),
    )

    cfg: ModelConfig
    dtype: jnp.dtype = jnp.float32
    quant: str | None = None

    @nn.compact
    def __call__(self, carry, step, layer_data, rope):
        x, state = carry
        c = self.cfg
        assert c.ssm is not None
        mixer = Mamba2.from_ssm(
            c.ssm, c.norm_eps, dtype=self.dtype, quant=self.quant, name="mamba2"
        )
        h = RMSNorm(c.norm_eps, self.dtype, name="attn_norm")(x)
        h, state = mixer(h, state, layer_data[0], step, recurrent_prefill())
        return (x + h, state), None


class NemotronAttentionLayer(nn.Module):
    """x + attention(rms(x)), no positional encoding."""

    PARAMS: ClassVar[tuple[Param, ...]] = (
        NORM,
        Param("attn_q.weight", ("attn", "q", "weight"), ("q_heads", "embed")),
        Param("attn_k.weight", ("attn", "k", "weight"), ("kv_heads", "embed")),
        Param("attn_v.weight", ("attn", "v", "weight"), ("kv_heads", "embed")),
        Param("attn_output.weight", ("attn", "o", "weight"), ("embed", "q_heads")),
    )

    cfg: ModelConfig
    dtype: jnp.dtype = jnp.float32
    quant: str | None = None

    @nn.compact
    def __call__(self, carry, step, layer_data, rope):
        x, state = carry
        c = self.cfg
        layer, window = layer_data.index, layer_data.window
        attn = Attention(
            n_heads=c.n_heads,
            n_kv_heads=c.n_kv_heads,
            head_dim=c.head_dim,
            norm_eps=c.norm_eps,
            scale=c.attn_scale,
            dtype=self.dtype,
            quant=self.quant,
            rope_dim=0,
            name="attn",
        )
        h = RMSNorm(c.norm_eps, self.dtype, name="attn_norm")(x)
        h, state = attn(h, state, layer, step, window, (rope[0][0], rope[1][0]))
        return (x + h, state), None


class NemotronFFNLayer(nn.Module):
    """x + FFN(rms(x)): a squared-ReLU MLP, or the MoE block; no state."""

    PARAMS: ClassVar[tuple[Param, ...]] = (
        NORM,
        Param("ffn_up.weight", ("mlp", "up", "weight"), ("ffw", "embed")),
        Param("ffn_down.weight", ("mlp", "down", "weight"), ("embed", "ffw")),
        *moe_params(("moe",)),
    )

    cfg: ModelConfig
    dtype: jnp.dtype = jnp.float32
    quant: str | None = None

    @nn.compact
    def __call__(self, carry, step, layer_data, rope):
        x, state = carry
        c = self.cfg
        h = RMSNorm(c.norm_eps, self.dtype, name="attn_norm")(x)
        if c.moe is None:
            h = MLP(c.ffn_dim, "relu2", False, self.dtype, self.quant, name="mlp")(h)
        else:
            h = MoE(c.moe, self.dtype, self.quant, name="moe")(h)
        return (x + h, state), None


BLOCKS[MAMBA2] = NemotronMamba2Layer
BLOCKS[NEMOTRON_ATTENTION] = NemotronAttentionLayer
BLOCKS[NEMOTRON_FFN] = NemotronFFNLayer
STATES[NEMOTRON_ATTENTION] = kv_state
STATES[NEMOTRON_FFN] = no_state
