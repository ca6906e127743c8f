"""Sampled tokens -> emitted text, for one request: end-of-generation tokens, stop strings
(held back, never emitted), max tokens and the context window, and UTF-8-complete output.

Shared by the single-request loop (`tsjax.generation`) and the server's engine, so both
finish requests by the same rules.
"""

from __future__ import annotations

from tsjax.stopping import StopMatcher
from tsjax.tokenizer import Tokenizer


class TextStream:
    def __init__(self, tokenizer: Tokenizer, *, stop=(), max_tokens: int, room: int):
        """`room`: how many tokens fit in the context window after the prompt."""
        self._eog = tokenizer.eog_ids
        self._detok = tokenizer.incremental_decoder()
        self._matcher = StopMatcher(tuple(stop))
        self.max_tokens = min(max_tokens, room)
        self._length_reason = "length"
        self.tokens: list[int] = []  # generated tokens kept (no EOG, nothing after a stop)
        self.text = ""
        self.finish_reason: str | None = None  # "stop" | "length" once finished

    def push(self, token: int) -> str:
        """Feed one sampled token; returns newly emitted text. Ignored once finished."""
        if self.finish_reason is not None:
            return ""
        if token in self._eog:
            self.finish_reason = "stop"
            return self._tail()
        self.tokens.append(token)
        piece = self._matcher.push(self._detok.push(token))
        if self._matcher.stopped is not None:
            self.finish_reason = "stop"
        elif len(self.tokens) >= self.max_tokens:
            self.finish_reason = "length"
            piece += self._tail()
        self.text += piece
        return piece

    @property
    def stop_string(self) -> str | None:
        """The stop string that ended the stream, if one did."""
        return self._matcher.stopped

    def finish(self, reason: str) -> str:
        """End the stream from outside (e.g. abort); returns any held-back text."""
        if self.finish_reason is not None:
            return ""
        self.finish_reason = reason
        tail = self._tail()
        self.text += tail
        return tail

    def _tail(self) -> str:
        if self._matcher.stopped is not None:
            return ""
        return self._matcher.push(self._detok.flush()) + self._matcher.flush()
