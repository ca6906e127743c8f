"""Streaming text machinery shared by the reasoning and tool-call parsers.

Generated text arrives in pieces that can cut a marker such as `</think>` anywhere, so every
parser holds back a trailing fragment that could still grow into a marker, and decides what a
piece of text is only once enough of it has arrived. Decisions made that way do not depend on
how the text was chunked, which is what the differential tests check.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any


def partial_suffix(text: str, markers: Iterable[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of one of `markers`."""
    best = 0
    for marker in markers:
        for n in range(min(len(marker) - 1, len(text)), best, -1):
            if text.endswith(marker[:n]):
                best = n
                break
    return best


def find_first(text: str, markers: Iterable[str], start: int = 0) -> tuple[int, str]:
    """(index, marker) of the earliest marker in `text`, longest first on ties; (-1, "") if none."""
    found, which = -1, ""
    for marker in markers:
        i = text.find(marker, start)
        if i >= 0 and (found < 0 or i < found or (i == found and len(marker) > len(which))):
            found, which = i, marker
    return found, which


def json_value_end(text: str, start: int = 0) -> int | None:
    """Index just past the JSON object or array that opens at `text[start]`, or None while it
    is still open. Only brackets outside strings count, so `"}"` inside a value is safe; the
    slice is not validated here (json.loads does that once it is complete)."""
    depth, in_string, escaped = 0, False, False
    for i in range(start, len(text)):
        c = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth <= 0:
                return i + 1
    return None


class Trimmer:
    """Passes text through, but drops the whitespace that touches a marker.

    Trailing whitespace is held until non-space text follows it, so it can be dropped if a
    marker (a tool call, a reasoning tag) comes first; after `cut()` the whitespace that
    follows the marker is skipped too. Without any `cut()` the output equals the input.
    """

    def __init__(self, lstrip: bool = False) -> None:
        self.pending = ""
        self.lstrip = lstrip

    def feed(self, text: str) -> str:
        if self.lstrip:
            text = text.lstrip()
            if not text:
                return ""
            self.lstrip = False
        body = text.rstrip()
        if not body:
            self.pending += text
            return ""
        out = self.pending + body
        self.pending = text[len(body) :]
        return out

    def cut(self) -> None:
        """A marker sits here: forget held whitespace and skip whitespace that follows."""
        self.pending = ""
        self.lstrip = True

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


# -- Gemma 4 argument values ---------------------------------------------------------------

_QUOTE = '<|"|>'


class GemmaArgsReader:
    """Gemma 4's argument syntax: JSON-like, with bare keys and strings between `<|"|>` marks
    (no escapes inside). Plain JSON strings and bare words are tolerated as well."""

    def __init__(self, text: str) -> None:
        self.text = text

    def value(self, i: int) -> tuple[Any, int]:
        t = self.text
        i = self._skip(i)
        if t.startswith(_QUOTE, i):
            end = t.find(_QUOTE, i + len(_QUOTE))
            if end < 0:
                raise ValueError("unterminated string")
            return t[i + len(_QUOTE) : end], end + len(_QUOTE)
        if i < len(t) and t[i] == '"':  # control characters taken as they come (strict=False)
            return json.JSONDecoder(strict=False).raw_decode(t, i)
        if i < len(t) and t[i] == "{":
            return self._object(i + 1)
        if i < len(t) and t[i] == "[":
            return self._array(i + 1)
        m = re.compile(r"[^,}\]]*").match(t, i)
        word = m.group(0).strip() if m else ""
        if not word:
            raise ValueError("missing value")
        try:
            return json.loads(word), m.end()  # type: ignore[union-attr]
        except json.JSONDecodeError:
            return word, m.end()  # type: ignore[union-attr]

    def _object(self, i: int) -> tuple[dict[str, Any], int]:
        t, out = self.text, {}
        while True:
            i = self._skip(i)
            if i < len(t) and t[i] == "}":
                return out, i + 1
            if t.startswith(_QUOTE, i) or (i < len(t) and t[i] == '"'):
                key, i = self.value(i)
            else:
                colon = t.find(":", i)
                if colon < 0:
                    raise ValueError("missing colon")
                key, i = t[i:colon].strip(), colon
            i = self._skip(i)
            if i >= len(t) or t[i] != ":" or not isinstance(key, str) or not key:
                raise ValueError("bad key")
            out[key], i = self.value(i + 1)
            i = self._skip(i)
            if i < len(t) and t[i] == ",":
                i += 1
            elif i >= len(t) or t[i] != "}":
                raise ValueError("unterminated object")

    def _array(self, i: int) -> tuple[list[Any], int]:
        t, out = self.text, []
        while True:
            i = self._skip(i)
            if i < len(t) and t[i] == "]":
                return out, i + 1
            item, i = self.value(i)
            out.append(item)
            i = self._skip(i)
            if i < len(t) and t[i] == ",":
                i += 1
            elif i >= len(t) or t[i] != "]":
                raise ValueError("unterminated array")

    def _skip(self, i: int) -> int:
        while i < len(self.text) and self.text[i].isspace():
            i += 1
        return i
