"""Declarative registry: GGUF `general.architecture` -> the family module that runs it."""

from __future__ import annotations

from types import ModuleType

from tsjax.gguf import GGUFError, GGUFFile
from tsjax.models import gemma, gemma4, gpt_oss, llama, mistral3, nemotron_h, qwen2, qwen3, qwen35
from tsjax.models.config import ModelConfig
from tsjax.models.decoder import Decoder

ARCHITECTURES: dict[str, ModuleType] = {
    "llama": llama,
    "mistral": llama,
    "qwen2": qwen2,
    "qwen3": qwen3,
    "gemma": gemma,
    "gemma2": gemma,
    "gemma3": gemma,
    "gemma4": gemma4,
    "qwen35": qwen35,
    "qwen35moe": qwen35,
    "nemotron_h": nemotron_h,
    "nemotron_h_moe": nemotron_h,
    "gpt-oss": gpt_oss,
    "mistral3": mistral3,
}


def config_from_gguf(g: GGUFFile) -> ModelConfig:
    arch = g.architecture
    family = ARCHITECTURES.get(arch)
    if family is None:
        raise GGUFError(
            f"{g.path.name}: architecture {arch!r} is not supported "
            f"(supported: {', '.join(sorted(ARCHITECTURES))})"
        )
    return family.config(g)


__all__ = ["ARCHITECTURES", "Decoder", "ModelConfig", "config_from_gguf"]
