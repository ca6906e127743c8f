"""Prompt positions fed embeddings instead of tokens: an image's encoder output (later an
audio clip's), spliced into the prompt where the chat template put it.

Host side, an `EmbedSpan` says where (its first prompt position), what (embeddings [n, D]),
which content (`key`: a digest of what was encoded, the prefix cache's identity for those
positions) and whether the span's positions attend to each other in both directions (Gemma
3's images do; a causal family's do not).

Device side, a prefill step with spans takes one `SpanInputs`: embeddings [B, T, D] and a
mask [B, T] (where they replace the token embedding; they are not scaled by the family's
embedding scale, as llama.cpp and transformers feed them), and `key_end` [B, T], the
exclusive end of the key positions each query sees: its own position + 1 (causal), or its
span's end inside a bidirectional span. A text-only prefill passes None, so its compiled
program is what it was; prefills with spans compile their own (one per token bucket).

A span is never split between two prefill steps (`chunk_end`): its bidirectional attention
needs all of its keys in the step, and a prefix reused from the cache ends before a span or
after it (`reuse_limit`). Plain numpy: the engine imports this without JAX.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import NamedTuple

import numpy as np


@dataclass(frozen=True)
class EmbedSpan:
    """Prompt positions [start, start + n) fed `embeds` [n, D] in place of token embeddings.
    `key`: a hex digest of the content (spans with equal keys are the same embeddings)."""

    start: int
    embeds: np.ndarray
    key: str
    bidirectional: bool = False

    @property
    def length(self) -> int:
        return int(self.embeds.shape[0])

    @property
    def end(self) -> int:
        return self.start + self.length

    def moved(self, offset: int) -> EmbedSpan:
        """The same span `offset` positions further (negative: earlier)."""
        return replace(self, start=self.start + offset)

    @property
    def cache_id(self) -> int:
        """The pseudo token id the prefix cache sees at each of this span's positions: a
        negative number (never a real token) that only an equal digest gives."""
        return -1 - int(self.key, 16)


@dataclass(frozen=True)
class Prompt:
    """Prompt token ids and the spans of them fed embeddings (sorted, disjoint). The ids at a
    span's positions are placeholders (`tsjax.vision.prompt.FILLER`)."""

    ids: list[int]
    spans: tuple[EmbedSpan, ...] = ()

    def __len__(self) -> int:
        return len(self.ids)


class SpanInputs(NamedTuple):
    """A prefill step's spans as arrays (a pytree: a tuple): embeds [B, T, D], mask [B, T]
    bool, key_end [B, T] int32 (see the module docstring)."""

    embeds: np.ndarray
    mask: np.ndarray
    key_end: np.ndarray


def span_inputs(
    spans: Sequence[Sequence[EmbedSpan]], starts: np.ndarray, t: int, dim: int, dtype
) -> SpanInputs:
    """Host arrays for a prefill of b = len(starts) rows of t tokens. spans[i]: row i's spans,
    their starts relative to the row's first token (which sits at cache position
    starts[i]); every span lies inside the row's t tokens."""
    b = len(starts)
    embeds = np.zeros((b, t, dim), dtype)
    mask = np.zeros((b, t), bool)
    positions = np.asarray(starts, np.int32)[:, None] + np.arange(t, dtype=np.int32)[None, :]
    key_end = positions + 1
    for i, row in enumerate(spans):
        for s in row:
            if s.start < 0 or s.end > t:
                raise ValueError(f"span [{s.start}, {s.end}) is outside the step's {t} tokens")
            if s.embeds.ndim != 2 or s.embeds.shape[1] != dim:
                raise ValueError(f"span embeddings {s.embeds.shape} do not have width {dim}")
            embeds[i, s.start : s.end] = s.embeds
            mask[i, s.start : s.end] = True
            if s.bidirectional:
                key_end[i, s.start : s.end] = starts[i] + s.end
    return SpanInputs(embeds, mask, key_end)


def check_spans(spans: Sequence[EmbedSpan], n_tokens: int, dim: int) -> None:
    """ValueError unless the spans are sorted, disjoint, inside a prompt of n_tokens and of
    width `dim`."""
    end = 0
    for s in spans:
        if s.start < end:
            raise ValueError(f"embedded spans overlap or are out of order at position {s.start}")
        if s.length < 1 or s.embeds.ndim != 2 or s.embeds.shape[1] != dim:
            raise ValueError(
                f"span embeddings {tuple(s.embeds.shape)} are not [n >= 1, {dim}] (the model's"
                " width)"
            )
        end = s.end
    if end > n_tokens:
        raise ValueError(f"an embedded span ends at {end}, past the prompt's {n_tokens} tokens")


def cache_ids(ids: Sequence[int], spans: Sequence[EmbedSpan]) -> list[int]:
    """The prompt as the prefix cache sees it: each span's positions hold its `cache_id`, so
    rows match through an image only if it is the same image."""
    out = list(ids)
    for s in spans:
        out[s.start : s.end] = [s.cache_id] * s.length
    return out


def text_ids(ids: Sequence[int], spans: Sequence[EmbedSpan], end: int | None = None) -> list[int]:
    """The prompt's token ids before `end` without the span positions (what repeat
    penalties may count: a span's positions hold no token)."""
    end = len(ids) if end is None else end
    keep = np.ones((end,), bool)
    for s in spans:
        keep[max(s.start, 0) : min(s.end, end)] = False
    return [t for t, k in zip(ids[:end], keep, strict=True) if k]


def chunk_end(start: int, limit: int, n_tokens: int, spans: Sequence[EmbedSpan]) -> int:
    """Where a prefill step that starts at `start` and takes at most `limit` tokens ends,
    never inside a span: before a span it would cut, or after one that starts at `start`
    (which then runs whole, past `limit` if it must)."""
    end = min(start + limit, n_tokens)
    for s in spans:
        if s.start < end < s.end:
            end = s.start if s.start > start else s.end
    return end


def reuse_limit(reuse: int, spans: Sequence[EmbedSpan]) -> int:
    """A reusable prefix length moved back to the start of a span it would end inside."""
    for s in spans:
        if s.start < reuse < s.end:
            return s.start
    return reuse


def spans_in(spans: Sequence[EmbedSpan], start: int, end: int) -> list[EmbedSpan]:
    """The spans inside prompt positions [start, end), their starts made relative to start
    (a span that crosses either bound is a ValueError: see `chunk_end`)."""
    out = []
    for s in spans:
        if s.end <= start or s.start >= end:
            continue
        if s.start < start or s.end > end:
            raise ValueError(f"span [{s.start}, {s.end}) crosses the step [{start}, {end})")
        out.append(s.moved(-start))
    return out
