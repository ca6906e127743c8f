"""Gemma 4 (`gemma4`): the E models (E2B/E4B: per-layer inputs, KV sharing), the dense 31B
and the 26B-A4B mixture of experts, on the shared decoder. What it adds to Gemma 3:

- Sliding and global layers have their own head size (`key_length_swa` / `key_length`),
  RoPE base (`rope.freq_base_swa` / `rope.freq_base`) and, in the 26B/31B, KV heads
  (`head_count_kv` per layer); the pattern is the file's `sliding_window_pattern` (one bool a
  layer). Global layers rotate only the first pairs of their head (transformers'
  "proportional" RoPE), which the file says with `rope_freqs.weight` (llama.cpp's frequency
  divisors: 1 to rotate, 1e30 to pass through).
- q and k are RMS-normed with weights and v without, so attention is unscaled (scale 1); no
  attention soft-capping, the final logits capped. Norms are plain (w, not 1 + w).
- Global layers of the 26B/31B (`attention_k_eq_v`) have no v projection: the values are
  the keys' projection, normed without weight, unrotated.
- KV sharing (E models, `attention.shared_kv_layers` n): the last n layers compute no keys
  or values; each attends over those of the last earlier layer of its kind (transformers'
  rule; llama.cpp takes layer L-n-2 for sliding and L-n-1 for global ones, the same layers
  in every released model). Their segment's cache is a `tsjax.cache.SharedKV`: nothing is
  stored twice. Those layers' MLPs are twice as wide (`feed_forward_length` per layer).
- Per-layer inputs (E models, `embedding_length_per_layer_input` P): a vector per layer and
  token (`tsjax.layers.embed.PerLayerInputs`), gated into the residual after the MLP:
  x += rms(proj(gelu(gate(x)) * inputs_l)) * post_norm.
- Every layer's output is multiplied by a learned scalar (`layer_output_scale`).
- 26B-A4B: each layer runs its dense MLP and a MoE block (`tsjax.layers.moe`) side by side,
  each post-normed, their sum normed again: the router reads the residual (RMS-normed, times
  a learned scale / sqrt(D)), the experts its own pre-norm; GeGLU experts with a learned
  scale each; the experts' gate and up are one GGUF tensor (`ffn_gate_up_exps`).

Layer kinds follow what changes a layer's parameter shapes (sliding or global, own keys and
values or shared), so a scanned stack loops each run of one kind.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from tsjax.cache import STATES, Step, kv_state
from tsjax.gguf import GGUFError, GGUFFile
from tsjax.layers.attention import Attention
from tsjax.layers.linear import Linear
from tsjax.layers.mlp import GatedMLP
from tsjax.layers.moe import MOE_PARAM_AXES, MoE, MoESpec
from tsjax.layers.norms import RMSNorm
from tsjax.models.config import ModelConfig, base_config_kwargs
from tsjax.models.decoder import BLOCKS, DecoderLayer, LayerData
from tsjax.stack import Param

SLIDING, GLOBAL = "gemma4_sliding", "gemma4_global"
GLOBAL_K_EQ_V = "gemma4_global_k_eq_v"  # 26B/31B global layers: values = keys' projection
SLIDING_SHARED, GLOBAL_SHARED = "gemma4_sliding_shared", "gemma4_global_shared"
_MOE = MOE_PARAM_AXES


def _sliding_spans(step: Step, window) -> Step:
    """The step as a layer sees it: a bidirectional span of embeddings (an image) opens its
    keys to its queries on the sliding-window layers only; the global layers stay causal.
    llama.cpp (`LLAMA_NON_CAUSAL_TYPE_SWA_ONLY`) and transformers (`create_masks_for_vision
    _model`: "Gemma 4 explicitly disables bidirectional attention on global layers") agree.
    window: the layer's (0: global), static or traced from the scan."""
    if step.key_end is None:
        return step
    causal = step.positions + 1
    return dataclasses.replace(step, key_end=jnp.where(window > 0, step.key_end, causal))


def config(g: GGUFFile) -> ModelConfig:
    arch = g.architecture
    kw = base_config_kwargs(g, "gemma4")
    n, d = kw["n_layers"], kw["dim"]
    sliding = [bool(s) for s in g.meta(f"{arch}.attention.sliding_window_pattern")]
    if len(sliding) != n:
        raise GGUFError(f"{g.name}: sliding_window_pattern has {len(sliding)} entries, not {n}")
    head = _head_sizes(g)
    n_shared = int(g.meta(f"{arch}.attention.shared_kv_layers", 0))
    sources = _kv_sources(sliding, n_shared)
    kinds = tuple(layer_kind(g, i, sliding[i], src != i) for i, src in enumerate(sources))
    theta, theta_swa = kw["rope_theta"], float(g.meta(f"{arch}.rope.freq_base_swa", 10000.0))
    window = int(g.meta(f"{arch}.attention.sliding_window"))
    factors = ()
    if g.has_tensor("rope_freqs.weight"):
        factors = tuple(float(f) for f in g.tensor("rope_freqs.weight"))
    kv = kw["layer_kv_heads"] or (kw["n_kv_heads"],) * n
    ffn = kw["layer_ffn_dims"] or (kw["ffn_dim"],) * n
    kw.update(
        head_dim=max(head.values()),
        layer_head_dims=tuple(head[s] for s in sliding),
        layer_kv_heads=kv,
        layer_ffn_dims=ffn,
        layer_windows=tuple(window if s else 0 for s in sliding),
        layer_rope_thetas=tuple(theta_swa if s else theta for s in sliding),
        layer_rope_scales=(1.0,) * n,
        rope_freq_factors=factors,
        layer_rope_factored=tuple(not s for s in sliding),
    )
    cfg = ModelConfig(
        **kw,
        layer_kinds=kinds,
        kv_sources=sources,
        per_layer_input_dim=int(g.meta(f"{arch}.embedding_length_per_layer_input", 0)),
        activation="gelu_tanh",
        embed_scale=d**0.5,
        qk_norm=True,
        v_norm=True,
        post_norms=True,
        query_scale=1.0,  # q and k are normed: attention is not scaled
        final_softcap=float(g.meta(f"{arch}.final_logit_softcapping", 0.0)) or None,
        moe=_moe(g, kw["norm_eps"]),
    )
    _check_kinds(g, cfg)
    return cfg


def layer_kind(g: GGUFFile, layer: int, sliding: bool, shared: bool) -> str:
    if shared:
        return SLIDING_SHARED if sliding else GLOBAL_SHARED
    if sliding:
        return SLIDING
    # llama.cpp reads a layer without `attn_v` as one whose values are its keys' projection
    return GLOBAL if g.has_tensor(f"blk.{layer}.attn_v.weight") else GLOBAL_K_EQ_V


def _head_sizes(g: GGUFFile) -> dict[bool, int]:
    """{sliding: head size} from `key_length(_swa)` (values must match: one cache shape)."""
    arch = g.architecture
    out = {}
    for sliding, suffix in ((False, ""), (True, "_swa")):
        k = int(g.meta(f"{arch}.attention.key_length{suffix}"))
        if int(g.meta(f"{arch}.attention.value_length{suffix}", k)) != k:
            raise GGUFError(f"{g.name}: key_length{suffix} and value_length{suffix} differ")
        out[sliding] = k
    return out


def _kv_sources(sliding: list[bool], n_shared: int) -> tuple[int, ...]:
    """Each layer's keys-and-values layer: its own, or for the last `n_shared` layers the last
    earlier layer of its kind that has its own."""
    first_shared = len(sliding) - n_shared
    out = []
    for i, s in enumerate(sliding):
        if i < first_shared:
            out.append(i)
            continue
        owners = [j for j in range(first_shared) if sliding[j] == s]
        if not owners:
            raise GGUFError(f"gemma4: KV-shared layer {i} has no earlier layer of its kind")
        out.append(owners[-1])
    return tuple(out)


def _moe(g: GGUFFile, eps: float) -> MoESpec | None:
    """26B-A4B's experts: softmax router on its own normed input, top-k renormalised, a
    learned scale per expert, GeGLU."""
    arch = g.architecture
    if not g.meta(f"{arch}.expert_count", 0):
        return None
    return MoESpec(
        n_experts=int(g.meta(f"{arch}.expert_count")),
        top_k=int(g.meta(f"{arch}.expert_used_count")),
        ffn_dim=int(g.meta(f"{arch}.expert_feed_forward_length")),
        normalize=True,
        router_norm=True,
        norm_eps=eps,
        expert_scale=True,
        activation="gelu_tanh",
        fused_gate_up=True,
    )


def kind_sizes(cfg: ModelConfig, kind: str) -> tuple[int, int, int]:
    """(head size, KV heads, MLP width) of the layers of `kind` (equal for all of them)."""
    i = cfg.layer_kinds.index(kind)
    return cfg.head_dim_at(i), cfg.kv_heads_at(i), cfg.ffn_dim_at(i)


def _check_kinds(g: GGUFFile, cfg: ModelConfig) -> None:
    """Layers of one kind share their parameter shapes (a scanned segment loops them)."""
    for i, kind in enumerate(cfg.layer_kinds):
        if (cfg.head_dim_at(i), cfg.kv_heads_at(i), cfg.ffn_dim_at(i)) != kind_sizes(cfg, kind):
            raise GGUFError(f"{g.name}: layer {i} differs in size from other {kind} layers")


class Gemma4Layer(nn.Module):
    """One Gemma 4 layer: sandwich-normed attention, then the MLP (beside the MoE block in
    the 26B), the per-layer input, the output scale. A subclass per kind fixes whether the
    layer is sliding, has a v projection (else `V_FROM_K`) or reads another layer's keys and
    values (`SHARED`): its `KIND`."""

    KIND: ClassVar[str] = SLIDING
    SHARED: ClassVar[bool] = False
    V_FROM_K: ClassVar[bool] = False

    #: The attention and MLP parameters of `DecoderLayer` (same paths and axes), and Gemma
    #: 4's own. Expert matrices are [E, out, in] (`tsjax.layers.moe`).
    PARAMS: ClassVar[tuple[Param, ...]] = (
        *(p for p in DecoderLayer.PARAMS if not p.gguf.endswith(".bias")),
        Param("layer_output_scale.weight", ("output_scale",), (None,)),
        Param("inp_gate.weight", ("per_layer_gate", "weight"), (None, "embed")),
        Param("proj.weight", ("per_layer_proj", "weight"), ("embed", None)),
        Param("post_norm.weight", ("per_layer_norm", "scale"), ("embed",)),
        Param("post_ffw_norm_1.weight", ("post_ffn_norm_1", "scale"), ("embed",)),
        Param("pre_ffw_norm_2.weight", ("pre_ffn_norm_2", "scale"), ("embed",)),
        Param("post_ffw_norm_2.weight", ("post_ffn_norm_2", "scale"), ("embed",)),
        Param("ffn_gate_inp.weight", ("moe", "router", "weight"), _MOE[("router", "weight")]),
        Param("ffn_gate_inp.scale", ("moe", "router", "input_scale"), ("embed",)),
        Param("ffn_down_exps.scale", ("moe", "expert_scale"), _MOE[("expert_scale",)]),
        Param("ffn_gate_up_exps.weight", ("moe", "gate_up", "weight"), _MOE[("gate_up", "weight")]),
        Param("ffn_down_exps.weight", ("moe", "down", "weight"), _MOE[("down", "weight")]),
    )

    cfg: ModelConfig
    dtype: jnp.dtype = jnp.float32
    quant: str | None = None

    @nn.compact
    def __call__(self, carry, step, data: LayerData, rope):
        """As `DecoderLayer`: ((x [B, T, D], state), step, data, rope) -> ((x, state), None).
        A shared layer's state is its source layer's (`data.index` into it), read only."""
        x, state = carry
        c = self.cfg
        h, kv, f = kind_sizes(c, self.KIND)
        attn = Attention(
            n_heads=c.n_heads,
            n_kv_heads=kv,
            head_dim=h,
            norm_eps=c.norm_eps,
            qk_norm=True,
            scale=c.attn_scale,
            dtype=self.dtype,
            quant=self.quant,
            v_norm=c.v_norm,
            v_from_k=self.V_FROM_K,
            kv_shared=self.SHARED,
            name="attn",
        )
        a = RMSNorm(c.norm_eps, self.dtype, name="attn_norm")(x)
        tables = (rope[0][data.base], rope[1][data.base])
        a, state = attn(
            a, state, data.index, _sliding_spans(step, data.window), data.window, tables
        )
        x = x + RMSNorm(c.norm_eps, self.dtype, name="post_attn_norm")(a)
        x = x + RMSNorm(c.norm_eps, self.dtype, name="post_ffn_norm")(self._ffn(x, f))
        if c.per_layer_input_dim:
            x = x + self._per_layer(x, data.inputs)
        scale = self.param("output_scale", nn.initializers.ones, (1,), self.dtype)
        return (x * scale.astype(x.dtype), state), None

    def _ffn(self, x: jax.Array, f: int) -> jax.Array:
        """The dense MLP; with experts, both branches post-normed and summed."""
        c = self.cfg
        h = RMSNorm(c.norm_eps, self.dtype, name="ffn_norm")(x)
        m = GatedMLP(f, c.activation, self.dtype, self.quant, name="mlp")(h)
        if c.moe is None:
            return m
        m = RMSNorm(c.norm_eps, self.dtype, name="post_ffn_norm_1")(m)
        e = RMSNorm(c.norm_eps, self.dtype, name="pre_ffn_norm_2")(x)
        e = MoE(c.moe, self.dtype, self.quant, name="moe")(e, router_x=x)
        return m + RMSNorm(c.norm_eps, self.dtype, name="post_ffn_norm_2")(e)

    def _per_layer(self, x: jax.Array, inputs: jax.Array) -> jax.Array:
        """The per-layer input's contribution: rms(proj(gelu(gate(x)) * inputs)) * norm."""
        c = self.cfg
        g = Linear(c.per_layer_input_dim, False, self.dtype, self.quant, name="per_layer_gate")(x)
        g = jax.nn.gelu(g, approximate=True) * inputs.astype(g.dtype)
        y = Linear(c.dim, False, self.dtype, self.quant, name="per_layer_proj")(g)
        return RMSNorm(c.norm_eps, self.dtype, name="per_layer_norm")(y)


class Gemma4Global(Gemma4Layer):
    KIND: ClassVar[str] = GLOBAL


class Gemma4GlobalKEqV(Gemma4Layer):
    KIND: ClassVar[str] = GLOBAL_K_EQ_V
    V_FROM_K: ClassVar[bool] = True


class Gemma4SlidingShared(Gemma4Layer):
    KIND: ClassVar[str] = SLIDING_SHARED
    SHARED: ClassVar[bool] = True


class Gemma4GlobalShared(Gemma4Layer):
    KIND: ClassVar[str] = GLOBAL_SHARED
    SHARED: ClassVar[bool] = True


for _name, _block in (
    (SLIDING, Gemma4Layer),
    (GLOBAL, Gemma4Global),
    (GLOBAL_K_EQ_V, Gemma4GlobalKEqV),
    (SLIDING_SHARED, Gemma4SlidingShared),
    (GLOBAL_SHARED, Gemma4GlobalShared),
):
    BLOCKS[_name] = _block
    STATES[_name] = kv_state  # keys and values (a shared segment gets a SharedKV instead)
