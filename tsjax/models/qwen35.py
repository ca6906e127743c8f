"""Qwen 3.5 (GGUF `qwen35`, `qwen35moe`): full-attention layers between runs of Gated DeltaNet
linear-attention layers (three DeltaNet layers, then one attention layer, by default).

Every layer is pre-norm: `x + mixer(rms(x))`, then `x + ffn(rms(x))` with GGUF's
`post_attention_norm` as the FFN's norm. The mixer is one of two kinds:

- `DELTANET` (`tsjax.layers.deltanet`): the layer keeps a convolution window and a recurrent
  state per row (`tsjax.cache.recurrent`);
- `QWEN35_ATTENTION`: gated attention (`tsjax.layers.attention` with `output_gate`: the q
  projection gives each head [q | gate] and the output is multiplied by sigmoid(gate)), per-head
  q/k RMSNorm, and RoPE on the first `rope.dimension_count` dims of each head (a quarter),
  interleaved M-RoPE (`ModelConfig.mrope_sections`): text tokens have the same position in
  every section, which is plain RoPE; image tokens have (t, h, w) positions of their grid
  (`tsjax.spans`).

The FFN is a SwiGLU MLP (`qwen35`) or a MoE (`qwen35moe`, `tsjax.layers.moe`: softmax router,
top-k renormalised, SwiGLU experts, plus a shared expert scaled by sigmoid(x @ w)).

The layer loop (`tsjax.stack.layer_plan`): on CPU every layer is its own segment, unrolled,
each recurrent layer with its own state (no layer axis) and each attention layer with its
blocked keys and values; on accelerators each run of equal layers is one `nn.scan` over its
stacked weights and state (3 DeltaNet layers, 1 attention layer, 3 DeltaNet layers, ...), so
the loop alternates scanned runs of the two kinds.

The recurrent layers' prefill form is the token-by-token scan on CPU and the chunked one
elsewhere (`recurrent_prefill`). Which tensors the converter reorders or folds: see
`tsjax.layers.deltanet`. `qwen3next` (the older Qwen3-Next) is not this family: its GGUF fuses
beta and alpha into `ssm_ba` in key-head-grouped order, may carry a fused `ssm_in`, and keeps
value heads grouped, not tiled.
"""

from __future__ import annotations

from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from tsjax.cache import STATES, kv_state
from tsjax.gguf import GGUFFile
from tsjax.layers.attention import Attention
from tsjax.layers.deltanet import GatedDeltaNet
from tsjax.layers.mlp import GatedMLP
from tsjax.layers.moe import MoE, MoESpec, moe_params
from tsjax.layers.norms import RMSNorm
from tsjax.models.config import ModelConfig, SSMConfig, base_config_kwargs
from tsjax.models.decoder import BLOCKS
from tsjax.stack import DELTANET, Param

#: Qwen 3.5's full-attention layer kind (gated, partial RoPE, then the FFN).
QWEN35_ATTENTION = "qwen35_attention"


def recurrent_prefill() -> bool | None:
    """The recurrent layers' prefill form: True (the token-by-token scan) on XLA:CPU, where it
    costs less than the chunked form at real models' sizes (BENCHMARKS.md, "Recurrent
    layers"); None (chunked) on accelerators, where T sequential steps are what costs."""
    return True if jax.default_backend() == "cpu" else None


def config(g: GGUFFile) -> ModelConfig:
    arch = g.architecture
    kw = base_config_kwargs(g, "qwen35", ffn_default=0)
    n = kw["n_layers"]
    recurrent = g.meta(f"{arch}.attention.recurrent_layers", None)
    if recurrent is None:  # llama.cpp's default: every `full_attention_interval`-th attends
        interval = int(g.meta(f"{arch}.full_attention_interval", 4))
        recurrent = [(i + 1) % interval != 0 for i in range(n)]
    kinds = tuple(DELTANET if r else QWEN35_ATTENTION for r in recurrent)
    moe = None
    if g.meta(f"{arch}.expert_count", None):
        shared = int(g.meta(f"{arch}.expert_shared_feed_forward_length", 0))
        moe = MoESpec(
            n_experts=int(g.meta(f"{arch}.expert_count")),
            top_k=int(g.meta(f"{arch}.expert_used_count")),
            ffn_dim=int(g.meta(f"{arch}.expert_feed_forward_length")),
            scoring="softmax",
            normalize=True,  # llama.cpp always renormalises for qwen35moe
            shared_ffn_dim=shared,
            shared_gate=shared > 0,
        )
        kw["ffn_dim"] = shared  # the only dense FFN ("ffw" axis): the shared expert
    return ModelConfig(
        **kw,
        qk_norm=True,
        rope_dim=int(g.meta(f"{arch}.rope.dimension_count", kw["head_dim"])),
        mrope_sections=_sections(g.meta(f"{arch}.rope.dimension_sections", [])),
        moe=moe,
        layer_kinds=kinds,
        ssm=SSMConfig.from_gguf(g),
    )


def _sections(value) -> tuple[int, ...]:
    """GGUF `rope.dimension_sections` -> `ModelConfig.mrope_sections` (() when all zero)."""
    sections = tuple(int(x) for x in value)
    return sections if any(sections) else ()


#: The FFN half of every layer: its norm (GGUF `post_attention_norm`) and an MLP or a MoE.
FFN_PARAMS: tuple[Param, ...] = (
    Param("post_attention_norm.weight", ("ffn_norm", "scale"), ("embed",)),
    Param("ffn_gate.weight", ("mlp", "gate", "weight"), ("ffw", "embed")),
    Param("ffn_up.weight", ("mlp", "up", "weight"), ("ffw", "embed")),
    Param("ffn_down.weight", ("mlp", "down", "weight"), ("embed", "ffw")),
    *moe_params(("moe",)),
)


def ffn(cfg: ModelConfig, dtype, quant: str | None, x: jax.Array) -> jax.Array:
    """x + FFN(rms(x)) (called inside a layer's compact method: the modules are its)."""
    h = RMSNorm(cfg.norm_eps, dtype, name="ffn_norm")(x)
    if cfg.moe is None:
        return x + GatedMLP(cfg.ffn_dim, "silu", dtype, quant, name="mlp")(h)
    return x + MoE(cfg.moe, dtype, quant, name="moe")(h)


class Qwen35DeltaNetLayer(nn.Module):
    """Pre-norm Gated DeltaNet (`mixer`) and FFN. Called as every layer kind:
    `((x [B, T, D], state), step, (layer, window, base), rope) -> ((x, state), None)`."""

    PARAMS: ClassVar[tuple[Param, ...]] = (
        Param("attn_norm.weight", ("attn_norm", "scale"), ("embed",)),
        *(Param(p.gguf, ("deltanet", *p.path), p.axes) for p in GatedDeltaNet.PARAMS),
        *FFN_PARAMS,
    )

    cfg: ModelConfig
    dtype: jnp.dtype = jnp.float32
    quant: str | None = None

    @nn.compact
    def __call__(self, carry, step, layer_data, rope):
        x, state = carry
        c = self.cfg
        assert c.ssm is not None
        mixer = GatedDeltaNet.from_ssm(
            c.ssm, c.norm_eps, dtype=self.dtype, quant=self.quant, name="deltanet"
        )
        h = RMSNorm(c.norm_eps, self.dtype, name="attn_norm")(x)
        h, state = mixer(h, state, layer_data[0], step, recurrent_prefill())
        return (ffn(c, self.dtype, self.quant, x + h), state), None


class Qwen35AttentionLayer(nn.Module):
    """Pre-norm gated attention (partial RoPE, q/k norms) and FFN."""

    PARAMS: ClassVar[tuple[Param, ...]] = (
        Param("attn_norm.weight", ("attn_norm", "scale"), ("embed",)),
        # q rows: per head [q | gate], so a split by heads keeps each head's pair together
        Param("attn_q.weight", ("attn", "q", "weight"), ("q_heads", "embed")),
        Param("attn_k.weight", ("attn", "k", "weight"), ("kv_heads", "embed")),
        Param("attn_v.weight", ("attn", "v", "weight"), ("kv_heads", "embed")),
        Param("attn_output.weight", ("attn", "o", "weight"), ("embed", "q_heads")),
        Param("attn_q_norm.weight", ("attn", "q_norm", "scale"), ("head_dim",)),
        Param("attn_k_norm.weight", ("attn", "k_norm", "scale"), ("head_dim",)),
        *FFN_PARAMS,
    )

    cfg: ModelConfig
    dtype: jnp.dtype = jnp.float32
    quant: str | None = None

    @nn.compact
    def __call__(self, carry, step, layer_data, rope):
        x, state = carry
        c = self.cfg
        layer, window, base = layer_data.index, layer_data.window, layer_data.base
        attn = Attention(
            n_heads=c.n_heads,
            n_kv_heads=c.n_kv_heads,
            head_dim=c.head_dim,
            norm_eps=c.norm_eps,
            qk_norm=True,
            scale=c.attn_scale,
            dtype=self.dtype,
            quant=self.quant,
            rope_dim=c.rotary_dim,
            output_gate=True,
            name="attn",
        )
        h = RMSNorm(c.norm_eps, self.dtype, name="attn_norm")(x)
        h, state = attn(h, state, layer, step, window, (rope[0][base], rope[1][base]))
        return (ffn(c, self.dtype, self.quant, x + h), state), None


BLOCKS[DELTANET] = Qwen35DeltaNetLayer
BLOCKS[QWEN35_ATTENTION] = Qwen35AttentionLayer
STATES[QWEN35_ATTENTION] = kv_state  # keys and values, like any attention layer
