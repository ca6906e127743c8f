"""Log-probabilities as the API styles show them, written once: a token's text and bytes, and
the `{token, logprob, bytes, top_logprobs}` entry that OpenAI chat and Ollama share (the
legacy completions shape is OpenAI's own, in its adapter).

The values are the model's raw distribution (`tsjax.logprobs`): before penalties, grammar
masks, temperature and top-k/top-p/min-p, as OpenAI and vLLM report them by default.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from serve.errors import ApiError
from tsjax.logprobs import TOP, TokenLogprob
from tsjax.tokenizer import Tokenizer


def top_count(value: int | None, param: str) -> int:
    """A requested number of alternatives per token: 0-20 (`TOP`), else a 400."""
    n = 0 if value is None else value
    if not 0 <= n <= TOP:
        raise ApiError(400, f"{param} must be between 0 and {TOP}, got {n}", param=param)
    return n


def token_bytes(tok: Tokenizer, token: int) -> bytes:
    """The bytes a token stands for: a character split over several tokens has part of its
    UTF-8 in each (their `bytes` join to it; their text alone cannot hold it)."""
    return tok.token_to_piece(token)


def token_text(tok: Tokenizer, token: int) -> str:
    """A token's text; bytes that are not whole UTF-8 characters become U+FFFD."""
    return token_bytes(tok, token).decode("utf-8", errors="replace")


def entry(tok: Tokenizer, e: TokenLogprob, top: int) -> dict[str, Any]:
    """`{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}` with `top`
    alternatives, most likely first."""
    return {
        **_one(tok, e.token, e.logprob),
        "top_logprobs": [_one(tok, t, lp) for t, lp in e.top[:top]],
    }


def entries(tok: Tokenizer, es: Iterable[TokenLogprob], top: int) -> list[dict[str, Any]]:
    return [entry(tok, e, top) for e in es]


def _one(tok: Tokenizer, token: int, logprob: float) -> dict[str, Any]:
    return {"token": token_text(tok, token), "logprob": logprob,
            "bytes": list(token_bytes(tok, token))}  # fmt: skip
