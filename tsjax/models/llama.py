"""Llama 2/3, SmolLM2, Mistral (dense): pre-norm, SiLU-gated MLP, RoPE, GQA.

llama.cpp's converter permutes q/k rows for its interleaved RoPE; `permuted_qk` tells the
loader to undo that so the shared NeoX-layout RoPE applies.
"""

from __future__ import annotations

from tsjax.gguf import GGUFFile
from tsjax.models.config import ModelConfig, base_config_kwargs


def config(g: GGUFFile) -> ModelConfig:
    kw = base_config_kwargs(g, "llama")
    arch = g.architecture
    window = int(g.meta(f"{arch}.attention.sliding_window", 0) or 0)
    if window:  # Mistral v0.1-style sliding window on every layer
        kw["layer_windows"] = (window,) * kw["n_layers"]
    return ModelConfig(**kw, permuted_qk=True)
