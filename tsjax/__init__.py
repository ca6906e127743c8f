"""tsjax: GGUF language models as Flax modules with jit-compiled prefill and decode steps.

The public surface (imported lazily, so `tsjax pull` starts without loading JAX):

    load(model, *, max_len=None, rows=1, mmproj=None) -> Model   a catalog name or a .gguf path
    Model                                              config, params, tokenizer, template, steps
    Prompt, EmbedSpan                                  prompt ids with image embeddings spliced in
                                                       (Model.chat_prompt(messages, images))
    generate(model, prompt_ids, ...) -> Generation     run to the end
    stream(model, prompt_ids, ...) -> Iterator[str]    text as it is decoded
    SamplingParams                                     temperature, top-k/p, min-p, penalties, seed
    Tokenizer, ChatTemplate, GGUFFile, ModelConfig, Cache, Steps, StepShapes
    Runner, LocalRunner                                the steps with their state (model.runner())
    pull(name) -> Path, resolve_model(name_or_path) -> Path
"""

from __future__ import annotations

import importlib

# the crash handlers this process has before anything tsjax loads (see tsjax.crash)
from tsjax import crash as _crash  # noqa: F401

_EXPORTS = {
    "load": "tsjax.model",
    "Model": "tsjax.model",
    "generate": "tsjax.generation",
    "stream": "tsjax.generation",
    "Generation": "tsjax.generation",
    "PromptTooLongError": "tsjax.generation",
    "SamplingParams": "tsjax.sampling",
    "Prompt": "tsjax.spans",
    "EmbedSpan": "tsjax.spans",
    "Tokenizer": "tsjax.tokenizer",
    "ChatTemplate": "tsjax.chat_template",
    "GGUFFile": "tsjax.gguf",
    "GGUFError": "tsjax.gguf",
    "ModelConfig": "tsjax.models.config",
    "Cache": "tsjax.cache",
    "Steps": "tsjax.steps",
    "StepShapes": "tsjax.shapes",
    "Runner": "tsjax.runner",
    "LocalRunner": "tsjax.runner",
    "pull": "tsjax.catalog",
    "resolve_model": "tsjax.catalog",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'tsjax' has no attribute {name!r}")
