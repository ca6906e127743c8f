"""Log-probabilities of tokens, computed inside the compiled steps as arrays.

What a step reports is the model's raw distribution: the log-softmax of its logits, before
penalties, grammar masks, temperature or top-k/top-p/min-p (what OpenAI and vLLM report by
default). For each row it gives the chosen token's log-probability and the `TOP` most likely
tokens with theirs; an API then shows as many of those as the request asked for (0-20).

A step computes them only when some row asks (a per-row flag in the sampler state, read under
`lax.cond`), so one compiled program serves rows that ask and rows that do not, and costs next
to nothing while nobody does.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

#: How many most likely tokens a step keeps per position (OpenAI's `top_logprobs` limit).
TOP = 20
#: Positions scored together when a prefill reports every prompt position's log-probability:
#: the vocabulary projection of a whole prompt at once would hold [T, V] logits.
PROMPT_CHUNK = 32


@jax.tree_util.register_dataclass
@dataclass
class Logprobs:
    """Device arrays for tokens at any leading shape `S` (steps x rows, rows x positions):
    `chosen` S (the token's log-probability), `top_ids` S + [TOP] (the most likely tokens, best
    first) and `top` S + [TOP] (their log-probabilities)."""

    chosen: jax.Array
    top_ids: jax.Array
    top: jax.Array

    @classmethod
    def zeros(cls, shape: tuple[int, ...]) -> Logprobs:
        return cls(
            jnp.zeros(shape, jnp.float32),
            jnp.zeros((*shape, TOP), jnp.int32),
            jnp.zeros((*shape, TOP), jnp.float32),
        )

    def at_set(self, i, value: Logprobs) -> Logprobs:
        """This with value written at index i of the leading axis."""
        return jax.tree.map(lambda a, v: a.at[i].set(v), self, value)


def of(logits: jax.Array, tokens: jax.Array) -> Logprobs:
    """Raw log-softmax of logits [..., V] at tokens [...], and the best TOP tokens."""
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    chosen = jnp.take_along_axis(logits, tokens[..., None], axis=-1)[..., 0] - lse
    top, ids = jax.lax.top_k(logits, min(TOP, logits.shape[-1]))
    return Logprobs(chosen, ids.astype(jnp.int32), top - lse[..., None])


def of_positions(project, hidden: jax.Array, targets: jax.Array) -> Logprobs:
    """Per position of hidden [B, T, D] (final-normed states): the log-probability of
    targets [B, T] (the token that follows each position) and the best TOP tokens there.
    `project` maps [B, C, D] states to [B, C, V] logits; positions go PROMPT_CHUNK at a time so
    only [B, PROMPT_CHUNK, V] logits exist at once."""
    b, t, d = hidden.shape
    c = min(PROMPT_CHUNK, t)
    pad = -t % c
    h = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(b, -1, c, d).swapaxes(0, 1)
    y = jnp.pad(targets, ((0, 0), (0, pad))).reshape(b, -1, c).swapaxes(0, 1)
    out = jax.lax.map(lambda hy: of(project(hy[0]), hy[1]), (h, y))  # [chunks, B, c, ...]

    def join(a):
        a = a.swapaxes(0, 1)
        return a.reshape(b, -1, *a.shape[3:])[:, :t]

    return jax.tree.map(join, out)


@dataclass(frozen=True)
class TokenLogprob:
    """One token's entry as the APIs show it: id, log-probability and the best alternatives
    (id, log-probability), best first, as many as the step kept (TOP)."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]


def host_entries(chosen: np.ndarray, ids: np.ndarray, top: np.ndarray, tokens) -> list:
    """`TokenLogprob`s from host arrays: chosen [n], ids and top [n, TOP], tokens [n]."""
    return [
        TokenLogprob(int(t), float(c), tuple(zip(map(int, i), map(float, v), strict=True)))
        for t, c, i, v in zip(tokens, chosen, ids, top, strict=True)
    ]
