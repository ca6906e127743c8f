"""Qwen 3 (dense): the Llama layout plus per-head RMSNorm on queries and keys before RoPE."""

from __future__ import annotations

from tsjax.gguf import GGUFFile
from tsjax.models.config import ModelConfig, base_config_kwargs


def config(g: GGUFFile) -> ModelConfig:
    return ModelConfig(**base_config_kwargs(g, "qwen3"), qk_norm=True)
