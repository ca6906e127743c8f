"""GPT-OSS (`gpt-oss`, OpenAI's 20b/120b): attention with sinks and q/k/v/o biases, YaRN RoPE,
sliding-window attention on every other layer, and a mixture of experts in place of the MLP.

- Attention: a learned sink logit per query head joins each softmax (`Attention(sinks=True)`);
  even layers attend over a sliding window (llama.cpp's `set_swa_pattern(2)`, transformers'
  `layer_types`), odd ones globally: per-layer data, one layer kind.
- RoPE: NeoX pairing over the whole head, YaRN frequencies, cos/sin scaled by
  0.1 ln(factor) + 1. The ramp between the fast and slow dimensions is not rounded to whole
  dimensions, as transformers does with gpt-oss's `truncate: false`; llama.cpp always rounds
  it, so its logits differ from both by a little (see the README).
- MoE in every layer (`tsjax.layers.moe`): router logits with a bias, the top k of them
  softmaxed; experts are clamped SwiGLU (alpha 1.702, limit 7, up + 1) with biases. The
  norm before it is GGUF's `post_attention_norm` (llama.cpp's `attn_post_norm`).

Expert weights ship as MXFP4 and are decoded at load (exactly) into the experts' format for
the model's weight format (`tsjax.layers.moe.expert_format`): int8 blocks of 32 under "q8" /
"q4" (the CPU default) and "int8", bfloat16 bits under "bf16" (both lossless from MXFP4), the
model dtype under "f32".
"""

from __future__ import annotations

from typing import ClassVar

import flax.linen as nn
import jax.numpy as jnp
from jax.sharding import Mesh

from tsjax.cache import STATES, kv_state
from tsjax.gguf import GGUFFile
from tsjax.layers.moe import ExpertParallel, MoE, MoESpec, moe_params
from tsjax.layers.norms import RMSNorm
from tsjax.models.config import ModelConfig, base_config_kwargs, yarn_from_gguf
from tsjax.models.decoder import ATTENTION_PARAMS, BLOCKS, run_attention
from tsjax.stack import Param

#: GPT-OSS's layer kind: attention, then the MoE block.
GPT_OSS = "gpt_oss"


def config(g: GGUFFile) -> ModelConfig:
    arch = g.architecture
    kw = base_config_kwargs(g, "gpt_oss")
    n = kw["n_layers"]
    window = int(g.meta(f"{arch}.attention.sliding_window"))
    sliding = [i % 2 == 0 for i in range(n)]
    swa_theta = float(g.meta(f"{arch}.rope.freq_base_swa", kw["rope_theta"]))
    kw["layer_windows"] = tuple(window if s else 0 for s in sliding)
    kw["layer_rope_thetas"] = tuple(swa_theta if s else kw["rope_theta"] for s in sliding)
    moe = MoESpec(
        n_experts=int(g.meta(f"{arch}.expert_count")),
        top_k=int(g.meta(f"{arch}.expert_used_count")),
        ffn_dim=int(g.meta(f"{arch}.expert_feed_forward_length")),
        softmax_topk=True,
        router_bias=True,
        activation="swiglu_oai",
        expert_bias=True,
    )
    return ModelConfig(
        **kw,
        qkv_bias=True,
        o_bias=True,
        attn_sinks=True,
        rope_yarn=yarn_from_gguf(g, truncate=False),
        moe=moe,
        layer_kinds=(GPT_OSS,) * n,
    )


def expert_parallel(mesh: Mesh | None) -> ExpertParallel | None:
    """Experts split over the mesh's `tp` axis, each `dp` group routing its own rows."""
    if mesh is None:
        return None
    return ExpertParallel(mesh, "tp", "dp" if "dp" in mesh.shape else None)


class GptOssLayer(nn.Module):
    """Pre-norm attention (sinks, biases, window by layer), then the pre-norm MoE block.

    `quant` is the weight format of the whole layer: attention's Linears take it, and the
    experts the same one (`MoE.quant`: None, "bf16", "int8")."""

    PARAMS: ClassVar[tuple[Param, ...]] = (
        *ATTENTION_PARAMS,
        Param("post_attention_norm.weight", ("ffn_norm", "scale"), ("embed",)),
        *moe_params(("moe",)),
    )

    cfg: ModelConfig
    dtype: jnp.dtype = jnp.float32
    quant: str | None = None
    mesh: Mesh | None = None

    @nn.compact
    def __call__(self, carry, step, layer_data, rope):
        """As `tsjax.models.decoder.DecoderLayer`: ((x [B, T, D], state), None)."""
        x, state = carry
        c = self.cfg
        assert c.moe is not None
        h, state = run_attention(c, self.dtype, self.quant, x, state, step, layer_data, rope)
        x = x + h
        h = RMSNorm(c.norm_eps, self.dtype, name="ffn_norm")(x)
        moe = MoE(c.moe, self.dtype, self.quant, parallel=expert_parallel(self.mesh), name="moe")
        return (x + moe(h), state), None


BLOCKS[GPT_OSS] = GptOssLayer
STATES[GPT_OSS] = kv_state  # keys and values, like any attention layer
