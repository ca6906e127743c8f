"""Embedded spans (tsjax.spans): their host arrays, the attention mask they open, how prefill
chunks and reused prefixes respect them, and what the prefix cache sees of them. No model."""

from __future__ import annotations

import numpy as np
import pytest

from tsjax.spans import (
    EmbedSpan,
    cache_ids,
    check_spans,
    chunk_end,
    reuse_limit,
    span_inputs,
    spans_in,
    text_ids,
)

D = 4


def _span(start: int, n: int, key: str = "ab", bidirectional: bool = True) -> EmbedSpan:
    return EmbedSpan(start, np.full((n, D), start + 1.0, np.float32), key, bidirectional)


def test_span_inputs():
    a, b = _span(1, 3), _span(2, 2, "cd", bidirectional=False)
    got = span_inputs([[a], [b], []], np.array([10, 0, 5]), 6, D, np.float32)
    assert got.embeds.shape == (3, 6, D) and got.embeds.dtype == np.float32
    np.testing.assert_array_equal(got.mask[0], [0, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(got.embeds[0, 1:4], a.embeds)
    assert not got.embeds[0, [0, 4, 5]].any()
    # causal: position + 1; a bidirectional span's positions see to its end
    np.testing.assert_array_equal(got.key_end[0], [11, 14, 14, 14, 15, 16])
    np.testing.assert_array_equal(got.key_end[1], [1, 2, 3, 4, 5, 6])  # causal span
    np.testing.assert_array_equal(got.key_end[2], np.arange(6, 12))
    assert not got.mask[2].any()
    with pytest.raises(ValueError, match="outside"):
        span_inputs([[_span(4, 3)]], np.zeros(1, np.int32), 6, D, np.float32)
    with pytest.raises(ValueError, match="width"):
        span_inputs([[_span(0, 2)]], np.zeros(1, np.int32), 6, D + 1, np.float32)


def test_mrope_offsets():
    """M-RoPE (Qwen 3.5): an image of 2 x 3 tokens at positions 2..7 sits at (t, h, w) =
    (2, 2 + row, 2 + col); the text after it continues 3 (max(rows, cols)) positions on, so
    its shift is 3 - 6; a second image (1 x 2) advances 2, its own count; a span without a
    grid is one position a token. The fourth column is the shift the next token takes."""
    img = EmbedSpan(2, np.zeros((6, D), np.float32), "ab", grid=(2, 3))
    wide = EmbedSpan(9, np.zeros((2, D), np.float32), "cd", grid=(1, 2))
    got = span_inputs([[img, wide]], np.array([5]), 12, D, np.float32, mrope=True).rope[0]
    rope = np.arange(12)[:, None] + got[:, :3]  # (t, h, w) with a start shift of 0
    want = [(0, 0, 0), (1, 1, 1), (2, 2, 2), (2, 2, 3), (2, 2, 4), (2, 3, 2), (2, 3, 3),
            (2, 3, 4), (5, 5, 5), (6, 6, 6), (6, 6, 7), (8, 8, 8)]  # fmt: skip
    np.testing.assert_array_equal(rope, want)
    np.testing.assert_array_equal(got[[0, 1, 7, 8, 10, 11], 3], [0, 0, -3, -3, -3, -3])
    flat = EmbedSpan(1, np.zeros((3, D), np.float32), "ef")
    got = span_inputs([[flat]], np.array([0]), 5, D, np.float32, mrope=True).rope[0]
    assert not got.any()
    assert span_inputs([[img]], np.array([0]), 8, D, np.float32).rope is None


def test_visible_opens_a_span_and_keeps_the_window():
    import jax.numpy as jnp

    from tsjax.cache.dense import visible

    pos = jnp.arange(6, dtype=jnp.int32)[None]
    causal = np.asarray(visible(pos, 6, 0))
    np.testing.assert_array_equal(causal, np.tril(np.ones((6, 6), bool))[None])
    key_end = jnp.asarray([[1, 4, 4, 4, 5, 6]], jnp.int32)  # positions 1-3 are one span
    seen = np.asarray(visible(pos, 6, 0, key_end=key_end))[0]
    want = np.tril(np.ones((6, 6), bool))
    want[1:4, 1:4] = True
    np.testing.assert_array_equal(seen, want)
    # a window of 2: later keys inside the span stay visible, earlier ones 2 back do not
    windowed = np.asarray(visible(pos, 6, 2, key_end=key_end))[0]
    assert windowed[1, 3] and windowed[3, 2] and not windowed[3, 1]


def test_chunks_and_reuse_never_cut_a_span():
    spans = [_span(5, 4), _span(12, 6)]  # [5, 9) and [12, 18)
    assert chunk_end(0, 7, 30, spans) == 5  # stops before the first span
    assert chunk_end(5, 2, 30, spans) == 9  # starts at it: the whole span, past the limit
    assert chunk_end(9, 5, 30, spans) == 12
    assert chunk_end(12, 20, 30, spans) == 30
    assert chunk_end(0, 4, 30, spans) == 4
    ends, start = [], 0
    while start < 30:
        start = chunk_end(start, 4, 30, spans)
        ends.append(start)
    assert ends == [4, 5, 9, 12, 18, 22, 26, 30]
    assert [reuse_limit(n, spans) for n in (3, 5, 7, 9, 14, 18, 20)] == [3, 5, 5, 9, 12, 18, 20]
    inside = spans_in(spans, 9, 20)
    assert [(s.start, s.end) for s in inside] == [(3, 9)]
    with pytest.raises(ValueError, match="crosses"):
        spans_in(spans, 6, 20)


def test_cache_ids_tell_images_apart():
    ids = list(range(100, 120))
    one, same, other = _span(3, 4, "ab12"), _span(3, 4, "ab12"), _span(3, 4, "ab13")
    a, b, c = cache_ids(ids, [one]), cache_ids(ids, [same]), cache_ids(ids, [other])
    assert a == b and a[:3] == ids[:3] and a[7:] == ids[7:]
    assert a[3:7] == [one.cache_id] * 4 and one.cache_id < 0
    assert c[3] != a[3] and c[:3] == a[:3]
    assert text_ids(ids, [one]) == ids[:3] + ids[7:]
    assert text_ids(ids, [one], 5) == ids[:3]


def test_check_spans():
    check_spans([_span(1, 2), _span(3, 2)], 6, D)
    with pytest.raises(ValueError, match="overlap"):
        check_spans([_span(1, 3), _span(3, 2)], 8, D)
    with pytest.raises(ValueError, match="past the prompt"):
        check_spans([_span(4, 3)], 6, D)
    with pytest.raises(ValueError, match="model's"):
        check_spans([_span(1, 2)], 6, D + 2)
