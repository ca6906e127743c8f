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

M-RoPE text models (Qwen 3.5) give an image's tokens 3-D positions: a span with a `grid`
(rows, cols of its tokens) starting at rope position s puts token i at (t, h, w) = (s, s + i
// cols, s + i % cols), and the text after it continues at s + max(rows, cols), as both
transformers (`get_rope_index`) and llama.cpp (`mtmd_image_tokens_get_n_pos`) place it. So a
token's rope position is its cache position plus a shift that changes at each image; the
cache keeps, per row and position, the shift of the token after it (`Cache.rope_shift`), and
`SpanInputs.rope` carries each token's offsets from there (`span_inputs(mrope=True)`).

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
    grid: tuple[int, int] | None = None  # (rows, cols) of its tokens, for M-RoPE positions

    @property
    def length(self) -> int:
        return int(self.embeds.shape[0])

    @property
    def rope_advance(self) -> int:
        """How many rope positions the span takes in an M-RoPE model: max(rows, cols) for a
        grid, else one per token."""
        return self.length if self.grid is None else max(self.grid)

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
    bool, key_end [B, T] int32 (see the module docstring); for an M-RoPE model `rope`
    [B, T, 4] int32: each token's (t, h, w) rope position minus (its cache position + the
    shift it starts from), and the shift the token after it takes minus that same start
    (`mrope_offsets`); None for the others."""

    embeds: np.ndarray
    mask: np.ndarray
    key_end: np.ndarray
    rope: np.ndarray | None = None


def mrope_offsets(row: Sequence[EmbedSpan], t: int) -> np.ndarray:
    """[t, 4] int32 for one prefill row of t tokens with spans `row` (starts relative to
    the row's first token): per token its (t, h, w) offsets and the next token's shift,
    all relative to the shift the row starts with (see `SpanInputs`)."""
    out = np.zeros((t, 4), np.int32)
    extra, end = 0, 0  # rope positions gained (in practice lost) by the spans so far
    for s in row:
        out[end : s.start] = extra
        i = np.arange(s.length, dtype=np.int32)
        if s.grid is None:  # one position per token, as text
            first = h = w = np.full_like(i, extra)
        else:  # every token at the span's first position, plus its row and column
            first = extra - i
            h, w = first + i // s.grid[1], first + i % s.grid[1]
        out[s.start : s.end, 0], out[s.start : s.end, 1], out[s.start : s.end, 2] = first, h, w
        out[s.start : s.end, 3] = extra  # inside a span: never read (no prefix ends there)
        extra += s.rope_advance - s.length
        out[s.end - 1, 3] = extra
        end = s.end
    out[end:] = extra
    return out


def span_inputs(
    spans: Sequence[Sequence[EmbedSpan]],
    starts: np.ndarray,
    t: int,
    dim: int,
    dtype,
    mrope: bool = False,
) -> SpanInputs:
    """Host arrays for a prefill of b = len(starts) rows of t tokens. spans[i]: row i's spans,
    their starts relative to the row's first token (which sits at cache position
    starts[i]); every span lies inside the row's t tokens. `mrope`: the model's positions
    are M-RoPE's (`SpanInputs.rope`)."""
    b = len(starts)
    embeds = np.zeros((b, t, dim), dtype)
    mask = np.zeros((b, t), bool)
    positions = np.asarray(starts, np.int32)[:, None] + np.arange(t, dtype=np.int32)[None, :]
    key_end = positions + 1
    rope = np.zeros((b, t, 4), np.int32) if mrope else None
    for i, row in enumerate(spans):
        if rope is not None:
            rope[i] = mrope_offsets(row, t)
        for s in row:
            if s.start < 0 or s.end > t:
                raise ValueError(f"span [{s.start}, {s.end}) is outside the step's {t} tokens")
            if s.embeds.ndim != 2 or s.embeds.shape[1] != dim:
                raise ValueError(f"span embeddings {s.embeds.shape} do not have width {dim}")
            embeds[i, s.start : s.end] = s.embeds
            mask[i, s.start : s.end] = True
            if s.bidirectional:
                key_end[i, s.start : s.end] = starts[i] + s.end
    return SpanInputs(embeds, mask, key_end, rope)


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
