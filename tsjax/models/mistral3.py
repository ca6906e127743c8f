"""Mistral 3 (`mistral3`: Ministral 3 3B/8B/14B text): the Llama layout (q/k rows permuted by
the converter, SiLU-gated MLP, no biases) with YaRN RoPE and Llama 4's attention temperature.

- YaRN: the ramp rounded to whole dimensions (llama.cpp always; transformers' default
  `truncate`), magnitude 0.1 ln(f) + 1 over itself with `yarn_log_multiplier` (= 1 for the
  released models: cos/sin unscaled).
- Queries are multiplied after RoPE by 1 + beta ln(1 + floor(p / n0)) at position p (beta
  `attention.temperature_scale`, n0 the original context), so attention sharpens with
  distance past the trained context.

Its vision tower (Pixtral) is a separate projector file (`clip.projector_type = pixtral`).
"""

from __future__ import annotations

from tsjax.gguf import GGUFFile
from tsjax.models.config import ModelConfig, base_config_kwargs, yarn_from_gguf


def config(g: GGUFFile) -> ModelConfig:
    arch = g.architecture
    kw = base_config_kwargs(g, "mistral3")
    yarn = yarn_from_gguf(g, truncate=True)
    beta = float(g.meta(f"{arch}.attention.temperature_scale", 0.0))
    # llama.cpp's floor length is the original (YaRN) context, which defaults to the context
    n0 = int(g.meta(f"{arch}.rope.scaling.original_context_length", kw["context_length"]))
    return ModelConfig(
        **kw,
        permuted_qk=True,
        o_bias=g.has_tensor("blk.0.attn_output.bias"),  # optional in llama.cpp
        rope_yarn=yarn,
        query_temperature=(beta, n0) if beta else None,
    )
