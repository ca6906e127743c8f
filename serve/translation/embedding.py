"""Embeddings of the hosted model, for every API style that asks: inputs to token ids (text
as a raw prompt, or ids as given), the window rule (truncate or refuse), one engine request
per input (each prefilled into a free row between decode dispatches, never disturbing the
rows that generate), and the pooled vectors back.

The vector is the mean of the last layer's final-normed states over the input's tokens (what
Ollama asks llama.cpp for: llama.cpp itself has no pooling for a causal LM that declares
none, and its OpenAI route refuses that), L2-normalized by the routes that normalize
(`normalized`).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import numpy as np

from serve.engine import EventKind, GenerationRequest
from serve.errors import ApiError
from serve.state import Hub
from serve.translation.prompt import check_model, max_prompt_chars, raw_prompt
from serve.translation.reply import generation_failed, run_answers
from tsjax.generation import PromptTooLongError
from tsjax.model import Model
from tsjax.sampling import SamplingParams


@dataclass
class Embedded:
    """One vector per input (mean-pooled, not yet normalized), the tokens they took, and the
    seconds from the call to the last vector."""

    vectors: list[np.ndarray]
    prompt_tokens: int
    seconds: float


def normalized(v: np.ndarray) -> np.ndarray:
    """v / |v| (a zero vector stays zero)."""
    return v / max(float(np.linalg.norm(v)), 1e-12)


def input_ids(model: Model, item: str | list[int], truncate: bool, param: str) -> list[int]:
    """Token ids of one input: text as a raw prompt (the file's BOS rule, special tokens
    parsed), ids checked against the vocabulary. Longer than the window: cut to it with
    `truncate`, else a 400. Text too long for any window is cut (`truncate`) or refused by
    its length in characters before it is tokenized: its first `max_len` tokens lie within
    `max_prompt_chars` characters, so the cut never changes them."""
    if isinstance(item, str) and truncate:
        item = item[: max_prompt_chars(model, model.max_len)]
    ids = raw_prompt(model, item)[0] if isinstance(item, str) else list(item)
    if not ids:
        raise ApiError(400, f"{param} must not be empty", param=param)
    vocab = model.config.vocab_size
    if any(not 0 <= t < vocab for t in ids):
        raise ApiError(400, f"{param}: token ids must be in [0, {vocab})", param=param)
    if len(ids) > model.max_len:
        if not truncate:
            raise ApiError(400, f"{param} has {len(ids)} tokens but the context window is "
                           f"{model.max_len} tokens", param=param)  # fmt: skip
        ids = ids[: model.max_len]
    return ids


async def embed(
    hub: Hub,
    model_name: str,
    items: list[str] | list[list[int]],
    *,
    truncate: bool,
    dimensions: int | None = None,
    param: str = "input",
) -> Embedded:
    """The pooled vector of each input, checked first (model, dimensions, lengths: a 400
    before anything is queued)."""
    began = time.perf_counter()
    model, engine = hub.live()
    check_model(model_name, model)
    if dimensions is not None and dimensions != model.config.dim:
        raise ApiError(400, f"dimensions must be {model.config.dim} for {model.name} (its "
                       f"embedding size; it cannot give shorter vectors), got {dimensions}",
                       param="dimensions")  # fmt: skip
    reqs = []
    for i, item in enumerate(items):
        where = param if len(items) == 1 else f"{param}[{i}]"
        # tokenizing a long text takes seconds: in the prepare pool, off the event loop
        ids = await hub.offload(input_ids, model, item, truncate, where)
        req = GenerationRequest(ids, SamplingParams.greedy(), 0, embed=True)
        try:
            engine.check(req)
        except (PromptTooLongError, ValueError) as e:
            raise ApiError(400, str(e), param=param) from e
        reqs.append(req)
    answers = await asyncio.gather(*(run_answers(engine, r) for r in reqs))
    vectors = []
    for (answer,) in answers:
        final = answer.final
        if final.kind is EventKind.ERROR or final.embedding is None:
            raise generation_failed(hub, final)
        vectors.append(final.embedding)
    tokens = sum(len(r.prompt_ids) for r in reqs)
    return Embedded(vectors, tokens, time.perf_counter() - began)
