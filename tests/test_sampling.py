"""Sampling filters and penalties on hand-made logits, and stop-string hold-back."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from tsjax.sampling import (
    SamplingParams,
    apply_penalties,
    filter_logits,
    host_sampler_state,
    sample,
)
from tsjax.stopping import StopMatcher

LOGITS = np.log(np.array([[0.5, 0.25, 0.15, 0.07, 0.03]], np.float32))


def kept(params: SamplingParams, history=()):
    s = host_sampler_state([params], [list(history)])
    out = np.asarray(filter_logits(jnp.asarray(LOGITS), s))[0]
    return [i for i in range(out.shape[0]) if out[i] > -1e29]


def test_top_k_top_p_min_p_keep_the_right_tokens():
    assert kept(SamplingParams(top_k=2, top_p=1.0)) == [0, 1]
    assert kept(SamplingParams(top_k=0, top_p=0.7)) == [0, 1]  # 0.5 + 0.25 reaches 0.7
    assert kept(SamplingParams(top_k=0, top_p=0.8)) == [0, 1, 2]
    assert kept(SamplingParams(top_k=0, top_p=1.0, min_p=0.3)) == [0, 1, 2]  # >= 0.15
    assert kept(SamplingParams(top_k=0, top_p=0.01)) == [0]  # never empty


def test_penalties_follow_llama_cpp_semantics():
    logits = jnp.asarray([[2.0, -2.0, 1.0, 0.5]])
    p = SamplingParams(
        repeat_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25, repeat_last_n=3
    )
    s = host_sampler_state([p], [[3, 0, 1, 1]])  # token 3 is outside the last-3 window
    out = np.asarray(apply_penalties(logits, s))[0]
    np.testing.assert_allclose(out, [2.0 / 2 - 0.25 - 0.5, -2.0 * 2 - 0.5 - 0.5, 1.0, 0.5])


def test_greedy_seeded_and_per_row_independent():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(3, 50)).astype(np.float32))
    rows = [
        SamplingParams.greedy(),
        SamplingParams(temperature=1.0, top_k=0, top_p=1.0, seed=7),
        SamplingParams(temperature=1.0, top_k=0, top_p=1.0, seed=7),
    ]
    tok, _ = sample(logits, host_sampler_state(rows, [[]] * 3))
    assert int(tok[0]) == int(np.argmax(logits[0]))
    # Same seed and same logits in another row of another batch: same token.
    tok2, _ = sample(logits[1:2], host_sampler_state(rows[1:2], [[]]))
    assert int(tok[1]) == int(tok2[0])


def test_temperature_sampling_follows_the_distribution():
    probs = np.array([0.6, 0.3, 0.1], np.float32)
    logits = jnp.asarray(np.tile(np.log(probs), (2000, 1)))
    params = [SamplingParams(temperature=1.0, top_k=0, top_p=1.0, seed=i) for i in range(2000)]
    tok, _ = sample(logits, host_sampler_state(params, [[]] * 2000))
    freq = np.bincount(np.asarray(tok), minlength=3) / 2000
    np.testing.assert_allclose(freq, probs, atol=0.05)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.8, top_k=40, top_p=0.9),  # the server default
        SamplingParams(temperature=1.0, top_k=5, top_p=1.0, min_p=0.05),
        SamplingParams(temperature=1.0, top_k=0, top_p=0.9),  # peaked: inside the candidates
        SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.02),
        SamplingParams(temperature=2.0, top_k=0, top_p=0.99),  # flat: needs the full sort
        SamplingParams(temperature=1.0, top_k=300, top_p=0.95),  # top_k above CANDIDATES
    ],
    ids=["default", "top-k+min-p", "top-p", "min-p", "flat-top-p", "large-top-k"],
)
def test_filtered_draws_stay_in_the_full_sort_kept_set(params):
    """Whether a row draws from the top-CANDIDATES shortcut or the full sort, every token
    lies in the set `filter_logits` (the full sort) keeps, and a mixed batch gives each row the
    tokens it gets alone."""
    rng = np.random.default_rng(1)
    n, v = 64, 2048
    logits = rng.standard_normal((n, v)).astype(np.float32) * 4.0
    logits[:, :3] += 6.0  # a few likely tokens, as a language model has
    rows = [SamplingParams(**{**params.__dict__, "seed": i}) for i in range(n)]
    state = host_sampler_state(rows, [[]] * n)
    tok = np.asarray(sample(jnp.asarray(logits), state)[0])
    scaled = jnp.asarray(logits) / params.temperature
    allowed = np.asarray(filter_logits(scaled, state)) > -1e29
    assert all(allowed[i, tok[i]] for i in range(n))
    mixed = [rows[0], SamplingParams(temperature=2.0, top_k=0, top_p=0.999, seed=3)]
    both = np.asarray(sample(jnp.asarray(logits[:2]), host_sampler_state(mixed, [[]] * 2))[0])
    alone = np.asarray(sample(jnp.asarray(logits[:1]), host_sampler_state(mixed[:1], [[]]))[0])
    assert both[0] == alone[0]


def test_top_k_shortcut_follows_the_distribution():
    """The top-CANDIDATES draw renormalises like the full sort: top_k=2 over 0.5/0.25/...
    gives 2/3 and 1/3."""
    logits = jnp.asarray(np.tile(LOGITS[0], (3000, 1)))
    params = [SamplingParams(temperature=1.0, top_k=2, top_p=1.0, seed=i) for i in range(3000)]
    tok, _ = sample(logits, host_sampler_state(params, [[]] * 3000))
    freq = np.bincount(np.asarray(tok), minlength=5) / 3000
    np.testing.assert_allclose(freq, [2 / 3, 1 / 3, 0, 0, 0], atol=0.04)


def test_invalid_parameters_are_named():
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0).validate()
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1).validate()


@pytest.mark.parametrize(
    "chunks",
    [
        ["Hello wor", "ld STOP", " more"],
        ["Hello world S", "TO", "P more"],
        list("Hello world STOP more"),
    ],
)
def test_stop_string_across_chunks_is_never_emitted(chunks):
    m = StopMatcher(["STOP"])
    out = "".join(m.push(c) for c in chunks) + m.flush()
    assert out == "Hello world "
    assert m.stopped == "STOP"


def test_held_back_text_is_released_when_no_stop_follows():
    m = StopMatcher(["</end>"])
    assert m.push("a </e") == "a "
    assert m.push("x") == "</ex"
    assert m.push("b </") == "b "
    assert m.flush() == "</"


def test_mask_restricts_every_mode_and_leaves_unconstrained_rows_alone():
    v = 70  # three mask words, the last one partial
    logits = jnp.asarray(np.random.default_rng(1).normal(size=(3, v)).astype(np.float32))
    mask = np.full((3, 3), -1, np.int32)
    allowed = {5, 37, 66}
    for row in (0, 1):
        mask[row] = 0
        for t in allowed:
            mask[row, t // 32] |= np.int32(1 << (t % 32)) if t % 32 < 31 else np.int32(-(2**31))
    rows = [
        SamplingParams.greedy(),
        SamplingParams(temperature=1.5, top_k=0, top_p=1.0, seed=3),
        SamplingParams.greedy(),
    ]
    for _ in range(5):
        tok, _ = sample(logits, host_sampler_state(rows, [[]] * 3), jnp.asarray(mask))
        assert int(tok[0]) in allowed and int(tok[1]) in allowed
        assert int(tok[2]) == int(np.argmax(logits[2]))
        rows[1] = SamplingParams(temperature=1.5, top_k=0, top_p=1.0, seed=int(tok[1]))
