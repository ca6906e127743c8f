"""Qwen 2 / 2.5: the Llama layout plus biases on the q, k and v projections; NeoX RoPE."""

from __future__ import annotations

from tsjax.gguf import GGUFFile
from tsjax.models.config import ModelConfig, base_config_kwargs


def config(g: GGUFFile) -> ModelConfig:
    return ModelConfig(**base_config_kwargs(g, "qwen2"), qkv_bias=True)
