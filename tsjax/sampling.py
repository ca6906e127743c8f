"""Batched sampling from per-row parameter arrays, inside the compiled decode step.

Every knob a request can turn is a [B] array, so changing it never recompiles:
penalties over the last `repeat_last_n` tokens (llama.cpp/Ollama semantics: repeat, presence
and frequency penalties all count the same window), then top-k, top-p, min-p, temperature,
and a draw from a per-row PRNG key. Temperature 0 is greedy. A row's result depends only on
its own logits, parameters and key, so a seeded request gives the same tokens alone or in a
full batch.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import jax
import jax.numpy as jnp
import numpy as np

NEG_INF = -1e30
HISTORY = 256  # the longest repeat_last_n window the state keeps per row
CANDIDATES = 256  # filtered sampling draws from the best this many tokens when it provably can


@dataclass(frozen=True)
class SamplingParams:
    """One request's sampling settings (host side; validated at the API edge)."""

    temperature: float = 0.8
    top_k: int = 40  # 0 = off
    top_p: float = 0.9  # 1.0 = off
    min_p: float = 0.0  # 0.0 = off
    repeat_penalty: float = 1.0  # 1.0 = off
    repeat_last_n: int = 64  # 0 = off, -1 = the whole kept history
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int = -1  # -1 = random

    @classmethod
    def greedy(cls) -> SamplingParams:
        return cls(temperature=0.0, top_k=0, top_p=1.0)

    def validate(self) -> SamplingParams:
        checks = [
            ("temperature", self.temperature >= 0),
            ("top_k", self.top_k >= 0),
            ("top_p", 0 < self.top_p <= 1),
            ("min_p", 0 <= self.min_p <= 1),
            ("repeat_penalty", self.repeat_penalty > 0),
            ("repeat_last_n", self.repeat_last_n >= -1),
        ]
        for name, ok in checks:
            if not ok:
                raise ValueError(f"invalid sampling parameter {name}={getattr(self, name)!r}")
        return self


@jax.tree_util.register_dataclass
@dataclass
class SamplerState:
    """Per-row sampling arrays, all with leading dimension B."""

    temperature: jax.Array  # f32
    top_k: jax.Array  # i32
    top_p: jax.Array  # f32
    min_p: jax.Array  # f32
    repeat_penalty: jax.Array  # f32
    repeat_last_n: jax.Array  # i32
    presence_penalty: jax.Array  # f32
    frequency_penalty: jax.Array  # f32
    keys: jax.Array  # u32 [B, 2] raw PRNG key data
    history: jax.Array  # i32 [B, HISTORY] ring of recent tokens, -1 = empty
    history_pos: jax.Array  # i32 [B] next write position in the ring
    logprobs: jax.Array  # bool [B] report this row's log-probabilities (`tsjax.logprobs`)

    @classmethod
    def create(cls, rows: int) -> SamplerState:
        return host_sampler_state([SamplingParams.greedy()] * rows, [[]] * rows)


def host_sampler_state(
    params: list[SamplingParams],
    histories: list[list[int]],
    seeds: list[int] | None = None,
    logprobs: list[bool] | None = None,
) -> SamplerState:
    """Build the arrays for several rows at once (numpy, then one transfer). `seeds` override
    the params' own (-1: random); `logprobs`: rows whose steps report log-probabilities."""
    b = len(params)
    cols = {f.name: np.array([getattr(p, f.name) for p in params]) for f in fields(SamplingParams)}
    seeds = seeds if seeds is not None else [_seed(p.seed) for p in params]
    keys = np.stack([np.asarray(jax.random.key_data(jax.random.key(s))) for s in seeds])
    hist = np.full((b, HISTORY), -1, np.int32)
    pos = np.zeros((b,), np.int32)
    for i, h in enumerate(histories):
        h = list(h)[-HISTORY:]
        hist[i, : len(h)] = h
        pos[i] = len(h) % HISTORY
    window = np.where(cols["repeat_last_n"] < 0, HISTORY, cols["repeat_last_n"])
    return SamplerState(
        temperature=jnp.asarray(cols["temperature"], jnp.float32),
        top_k=jnp.asarray(cols["top_k"], jnp.int32),
        top_p=jnp.asarray(cols["top_p"], jnp.float32),
        min_p=jnp.asarray(cols["min_p"], jnp.float32),
        repeat_penalty=jnp.asarray(cols["repeat_penalty"], jnp.float32),
        repeat_last_n=jnp.asarray(np.minimum(window, HISTORY), jnp.int32),
        presence_penalty=jnp.asarray(cols["presence_penalty"], jnp.float32),
        frequency_penalty=jnp.asarray(cols["frequency_penalty"], jnp.float32),
        keys=jnp.asarray(keys, jnp.uint32),
        history=jnp.asarray(hist),
        history_pos=jnp.asarray(pos),
        logprobs=jnp.asarray(np.zeros((b,), bool) if logprobs is None else np.asarray(logprobs)),
    )


def _seed(seed: int) -> int:
    return int(np.random.default_rng().integers(0, 2**31 - 1)) if seed < 0 else seed & 0x7FFFFFFF


def apply_penalties(logits: jax.Array, s: SamplerState) -> jax.Array:
    """Penalise tokens seen in each row's last `repeat_last_n` tokens. logits: [B, V]."""
    b, v = logits.shape
    age = (s.history_pos[:, None] - 1 - jnp.arange(HISTORY)[None, :]) % HISTORY  # 0 = newest
    in_window = (s.history >= 0) & (age < s.repeat_last_n[:, None])
    tok = jnp.where(in_window, s.history, v)  # out-of-window entries land on a dropped index
    counts = jnp.zeros((b, v), jnp.float32).at[jnp.arange(b)[:, None], tok].add(1.0, mode="drop")
    seen = counts > 0
    rp = s.repeat_penalty[:, None]
    penalised = jnp.where(logits > 0, logits / rp, logits * rp)
    logits = jnp.where(seen, penalised, logits)
    logits = logits - counts * s.frequency_penalty[:, None]
    return logits - seen * s.presence_penalty[:, None]


def filter_logits(logits: jax.Array, s: SamplerState) -> jax.Array:
    """top-k, top-p and min-p per row, on temperature-scaled logits. logits: [B, V]."""
    v = logits.shape[-1]
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    rank = jnp.arange(v)[None, :]
    k = jnp.where(s.top_k > 0, s.top_k, v)[:, None]
    keep = rank < k
    probs = jax.nn.softmax(jnp.where(keep, sorted_logits, NEG_INF), axis=-1)
    cum_before = jnp.cumsum(probs, axis=-1) - probs
    keep &= cum_before < s.top_p[:, None]
    keep &= probs >= s.min_p[:, None] * probs[:, :1]
    keep = keep.at[:, 0].set(True)
    filtered = jnp.where(keep, sorted_logits, NEG_INF)
    return (
        jnp.full_like(logits, NEG_INF).at[jnp.arange(logits.shape[0])[:, None], order].set(filtered)
    )


def apply_mask(logits: jax.Array, mask: jax.Array) -> jax.Array:
    """Disallow tokens whose bit is clear. mask: [B, ceil(V/32)] int32 (bit v % 32 of word
    v // 32 is token v; a row of -1 words allows everything)."""
    v = logits.shape[-1]
    ids = jnp.arange(v, dtype=jnp.int32)
    words = jnp.take(mask, ids // 32, axis=1)  # [B, V]
    shifts = jnp.broadcast_to(ids % 32, words.shape)
    allowed = (jax.lax.shift_right_logical(words, shifts) & 1).astype(bool)
    return jnp.where(allowed, logits, NEG_INF)


def argmax(x: jax.Array) -> jax.Array:
    """First index of the maximum along the last axis, as int32. Two plain reductions: XLA:CPU
    runs `jnp.argmax`'s (value, index) pair reduction several times slower (3.5 vs 0.5 ms on
    16 x 49,152 logits). They reduce over the leading axis of `x.T`: the projections leave
    logits transposed in memory ([V, B], `tsjax.layers.linear.transposed_matmul`), where XLA
    cancels the two transposes and each pass reads [V, B] in order, all rows at once."""
    xt = x.T  # [V, ..., B] reversed axes
    top = jnp.max(xt, axis=0, keepdims=True)
    ids = jnp.arange(x.shape[-1], dtype=jnp.int32).reshape((-1,) + (1,) * (x.ndim - 1))
    return jnp.min(jnp.where(xt == top, ids, x.shape[-1]), axis=0).T


def _draw_filtered(
    scaled: jax.Array, s: SamplerState, keys: jax.Array, greedy: jax.Array
) -> jax.Array:
    """One draw per row from its top-k / top-p / min-p filtered distribution. scaled: [B, V];
    `greedy` rows are picked elsewhere (their result here is unused).

    A full sort of the vocabulary costs ~170 ms for 16 x 49,152 logits on XLA:CPU, several
    times a whole decode step, while `lax.top_k` of the best CANDIDATES costs ~3 ms. The kept
    tokens are always a prefix of the sorted order, so a row's draw comes from the candidates
    whenever the filter provably stops inside them: top_k <= CANDIDATES, or (top_k off) the
    candidates already hold top_p of the mass or their last one is under min_p. Other rows
    (a flat distribution with a loose top-p, top_k above CANDIDATES) take the full sort, under
    a `lax.cond` that costs nothing when no row needs it, and rows with no filter at all draw
    from the whole vocabulary. Which path a row takes depends only on its own logits and
    settings, so a seeded request draws the same tokens alone or in a full batch."""
    b, v = scaled.shape
    c = min(CANDIDATES, v)
    filtered = (s.top_k > 0) | (s.top_p < 1) | (s.min_p > 0)
    cand, idx = jax.lax.top_k(scaled, c)  # [B, c], best first
    rank = jnp.arange(c)[None, :]
    by_k = (s.top_k > 0) & (s.top_k <= c)
    in_k = rank < jnp.where(s.top_k > 0, s.top_k, v)[:, None]
    norm = jnp.where(  # top-k renormalises over its k tokens, else over the vocabulary
        by_k,
        jax.nn.logsumexp(jnp.where(in_k, cand, NEG_INF), axis=-1),
        jax.nn.logsumexp(scaled, axis=-1),
    )
    probs = jnp.exp(cand - norm[:, None]) * in_k
    cum_before = jnp.cumsum(probs, axis=-1) - probs
    keep = in_k & (cum_before < s.top_p[:, None]) & (probs >= s.min_p[:, None] * probs[:, :1])
    keep = keep.at[:, 0].set(True)
    stops_inside = (probs.sum(-1) >= s.top_p) | (probs[:, -1] < s.min_p * probs[:, 0])
    inside = filtered & (by_k | ((s.top_k == 0) & stops_inside))
    gumbel = jax.vmap(lambda k: jax.random.gumbel(k, (c,), scaled.dtype))(keys)
    choice = argmax(jnp.where(keep, cand, NEG_INF) + gumbel)
    fast = jnp.take_along_axis(idx, choice[:, None], axis=1)[:, 0].astype(jnp.int32)
    full_sort = filtered & ~inside

    def whole_vocabulary():
        x = jax.lax.cond(jnp.any(full_sort & ~greedy), filter_logits, lambda x, _: x, scaled, s)
        return _draw(keys, x)

    rest = jax.lax.cond(
        jnp.any(~inside & ~greedy), whole_vocabulary, lambda: jnp.zeros((b,), jnp.int32)
    )
    return jnp.where(inside, fast, rest)


def _draw(keys: jax.Array, logits: jax.Array) -> jax.Array:
    """One categorical draw per row (the Gumbel-max trick, as `jax.random.categorical`)."""
    gumbel = jax.vmap(lambda k: jax.random.gumbel(k, logits.shape[-1:], logits.dtype))(keys)
    return argmax(logits + gumbel)


def sample(
    logits: jax.Array, s: SamplerState, mask: jax.Array | None = None
) -> tuple[jax.Array, SamplerState]:
    """Pick one token per row, among the tokens `mask` allows (grammar constraints).
    Returns (tokens [B], state with keys and history advanced)."""
    logits = logits.astype(jnp.float32)
    constrained = jnp.any(mask != -1) if mask is not None else jnp.asarray(False)
    needs_penalty = jnp.any(
        (s.repeat_last_n > 0)
        & ((s.repeat_penalty != 1) | (s.presence_penalty != 0) | (s.frequency_penalty != 0))
    )
    greedy = s.temperature <= 0
    keys = jax.vmap(jax.random.wrap_key_data)(s.keys)
    split = jax.vmap(lambda k: jax.random.split(k, 2))(keys)  # [B, 2]

    def general():
        x = logits
        if mask is not None:
            x = jax.lax.cond(constrained, apply_mask, lambda x, _: x, x, mask)
        x = jax.lax.cond(needs_penalty, apply_penalties, lambda x, _: x, x, s)
        picked = argmax(x)
        scaled = x / jnp.where(greedy, 1.0, s.temperature)[:, None]
        return jax.lax.cond(
            jnp.all(greedy),
            lambda: picked,
            lambda: jnp.where(greedy, picked, _draw_filtered(scaled, s, split[:, 1], greedy)),
        )

    # Greedy rows with nothing to mask or penalise (the common batch) read the logits once,
    # in place: the general path's conditionals copy them on the way through.
    tokens = jax.lax.cond(
        jnp.all(greedy) & ~needs_penalty & ~constrained, lambda: argmax(logits), general
    )
    rows = jnp.arange(tokens.shape[0])
    history = s.history.at[rows, s.history_pos].set(tokens)
    new = SamplerState(
        **{f.name: getattr(s, f.name) for f in fields(SamplerState)},
    )
    new.keys = jax.vmap(jax.random.key_data)(split[:, 0])
    new.history = history
    new.history_pos = (s.history_pos + 1) % HISTORY
    return tokens, new
