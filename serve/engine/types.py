"""What crosses the engine's seam: requests in, token events out. No wire format here."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

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
    prompt_ids: list[int]  # an embedded span's positions hold placeholder ids
    sampling: SamplingParams = field(default_factory=SamplingParams)
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    reuse_prefix: bool = True  # may start from a cached prefix of another turn
    # A tsjax.grammar.Constraint: each sampled token must be allowed by it (structured output,
    # forced tool calls), from the first (a reasoning block is part of the grammar).
    constraint: Any = None
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
