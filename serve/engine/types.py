"""What crosses the engine's seam: requests in, token events out. No wire format here."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np

from tsjax.logprobs import TokenLogprob
from tsjax.sampling import SamplingParams
from tsjax.spans import EmbedSpan, cache_ids, reuse_limit

_ids = itertools.count(1)


class FinishReason(StrEnum):
    STOP = "stop"  # end-of-generation token or stop string
    LENGTH = "length"  # max_tokens or the context window
    ABORT = "abort"  # cancelled (client went away)
    ERROR = "error"


@dataclass
class GenerationRequest:
    """One prompt and what to do with it. `max_tokens` 0 (only with `prompt_logprobs` or
    `embed`) runs the prompt's prefill alone, without generating."""

    prompt_ids: list[int]  # an embedded span's positions hold placeholder ids
    sampling: SamplingParams = field(default_factory=SamplingParams)
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    reuse_prefix: bool = True  # may start from a cached prefix of another turn
    # A tsjax.grammar.Constraint: each sampled token must be allowed by it (structured output,
    # forced tool calls), from the first (a reasoning block is part of the grammar). Each of
    # `n` answers gets its own copy (`Constraint.fork`).
    constraint: Any = None
    # Answers to the prompt, each in its own cache row after one shared prefill, with seeds
    # seed + i (independent random ones without a seed); events carry the answer's `index`.
    n: int = 1
    logprobs: bool = False  # each sampled token's log-probabilities (`TokenEvent.logprobs`)
    prompt_logprobs: bool = False  # every prompt token's, after the first (no prefix reuse)
    embed: bool = False  # the prompt's pooled embedding (`TokenEvent.embedding`); no tokens
    # Positions of the prompt where a later request may resume (a chat: where the last user
    # message and the generation prompt start). A cache that cannot rewind saves its state
    # there (`serve.engine.scheduler`); () saves it at the end of the prompt.
    checkpoints: tuple[int, ...] = ()
    id: str = field(default_factory=lambda: f"req-{next(_ids)}")
    created: float = field(default_factory=time.time)
    # Prompt positions fed embeddings in place of tokens (images; `tsjax.spans`), sorted.
    spans: tuple[EmbedSpan, ...] = ()

    @property
    def cache_ids(self) -> list[int]:
        """The prompt as cache rows remember it: each span's positions hold a pseudo id of
        its content's digest, so a row matches through an image only if it is the same."""
        return cache_ids(self.prompt_ids, self.spans) if self.spans else self.prompt_ids

    def reusable(self, n: int) -> int:
        """A cached prefix of n tokens cut back so that it never ends inside a span."""
        return reuse_limit(n, self.spans)

    def __post_init__(self) -> None:
        if self.prompt_logprobs or self.embed:
            self.reuse_prefix = False  # both need every prompt position computed

    @property
    def prefill_only(self) -> bool:
        return self.embed or self.max_tokens == 0


class EventKind(StrEnum):
    QUEUED = "queued"  # still waiting: position (1-based) and pending count
    TOKEN = "token"  # new text (may be empty while a stop string is held back)
    DONE = "done"  # final event with the stats
    ERROR = "error"


@dataclass
class Stats:
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens served from the KV cache (prefix reuse)
    completion_tokens: int = 0
    queue_seconds: float = 0.0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    first_token_seconds: float = 0.0  # from submission

    @property
    def cache_hit_ratio(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


@dataclass
class TokenEvent:
    kind: EventKind
    text: str = ""
    token_ids: tuple[int, ...] = ()
    finish_reason: FinishReason | None = None
    stats: Stats | None = None
    queue_position: int = 0
    queue_pending: int = 0
    error: str = ""
    stop_sequence: str | None = None  # DONE: the stop string that ended the answer, if one did
    index: int = 0  # which of the request's `n` answers
    # The log-probabilities of the generated tokens this event reports (requests with
    # `logprobs`), in order; every generated token's appears in exactly one event.
    logprobs: tuple[TokenLogprob, ...] = ()
    # `prompt_logprobs`: one entry per prompt token, None for the first (nothing precedes
    # it); on the answer's first TOKEN event, or on DONE for a prefill-only request.
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None
    # `embed` (on DONE): [D] float32, the mean of the prompt's final-normed last-layer states
    embedding: np.ndarray | None = None
