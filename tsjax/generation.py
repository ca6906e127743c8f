"""Single-request generation on the compiled steps: the loop behind `tsjax generate` and the
notebooks. (The server's engine runs many requests through the same steps.)"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from tsjax.grammar import Constraint, mask_words
from tsjax.model import Model
from tsjax.sampling import SamplingParams
from tsjax.spans import EmbedSpan, Prompt, check_spans, text_ids
from tsjax.textstream import TextStream


class PromptTooLongError(ValueError):
    def __init__(self, n_tokens: int, limit: int):
        super().__init__(f"prompt has {n_tokens} tokens but the context window is {limit} tokens")
        self.n_tokens, self.limit = n_tokens, limit


@dataclass
class Generation:
    text: str = ""
    tokens: list[int] = field(default_factory=list)
    finish_reason: str = ""  # "stop" | "length"
    prompt_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0

    @property
    def decode_tok_per_s(self) -> float:
        n = max(len(self.tokens) - 1, 0)
        return n / self.decode_seconds if self.decode_seconds > 0 else 0.0

    @property
    def prefill_tok_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0


def stream(
    model: Model,
    prompt_ids: list[int] | Prompt,
    sampling: SamplingParams | None = None,
    max_tokens: int = 256,
    stop: tuple[str, ...] | list[str] = (),
    steps_per_dispatch: int = 4,
    result: Generation | None = None,
    constraint: Constraint | None = None,
) -> Iterator[str]:
    """Yield text pieces as they are decoded. Fills `result` (tokens, finish reason,
    timings) as it goes. Stops at an end-of-generation token, a stop string (never emitted),
    `max_tokens`, or the end of the cache. With a `constraint` (tsjax.grammar), every token
    is one the grammar allows (one decode step per dispatch, to refresh the mask).
    A `Prompt` (`Model.chat_prompt`) brings its images' embeddings along."""
    spans: tuple[EmbedSpan, ...] = ()
    if isinstance(prompt_ids, Prompt):
        prompt_ids, spans = prompt_ids.ids, prompt_ids.spans
        check_spans(spans, len(prompt_ids), model.config.dim)
    sampling = (sampling or SamplingParams()).validate()
    res = result if result is not None else Generation()
    limit = model.max_len
    if len(prompt_ids) >= limit:
        raise PromptTooLongError(len(prompt_ids), limit)
    if not prompt_ids:
        raise ValueError("empty prompt")
    runner = model.runner()
    text = TextStream(
        model.tokenizer, stop=stop, max_tokens=max_tokens, room=limit - len(prompt_ids)
    )
    res.prompt_tokens = len(prompt_ids)

    t0 = time.perf_counter()
    words = mask_words(model.config.vocab_size)

    def mask() -> np.ndarray | None:
        if constraint is None or constraint.finished:
            return None
        out = np.empty((1, words), np.int32)
        constraint.fill(out[0])
        return out

    first = runner.prefill(
        [prompt_ids],
        [0],
        [sampling],
        histories=[text_ids(prompt_ids, spans)],
        masks=mask(),
        spans=[list(spans)] if spans else None,
    ).get()[0]
    res.prefill_seconds = time.perf_counter() - t0
    pending = [int(first[0])]
    fed = 0  # sampled tokens written back into the cache
    t1 = time.perf_counter()
    while True:
        for t in pending:
            if constraint is not None and t not in model.tokenizer.eog_ids:
                constraint.accept(t)
            piece = text.push(t)
            if piece:
                yield piece
            if text.finish_reason:
                break
        if text.finish_reason:
            break
        left = text.max_tokens - len(text.tokens)
        n = steps_per_dispatch if left >= steps_per_dispatch and constraint is None else 1
        out = runner.decode([0], [pending[-1]], len(prompt_ids) + fed, n, masks=mask()).get()
        fed += n
        pending = [int(x) for x in out[:, 0]]
    res.decode_seconds = time.perf_counter() - t1
    res.tokens, res.text, res.finish_reason = text.tokens, text.text, text.finish_reason


def generate(model: Model, prompt_ids: list[int] | Prompt, **kwargs) -> Generation:
    """Run `stream` to the end and return the whole result."""
    res = Generation()
    for _ in stream(model, prompt_ids, result=res, **kwargs):
        pass
    return res
