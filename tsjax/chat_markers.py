"""A chat template's own control tokens, told apart from the same text typed by a client.

A rendered prompt is one string: the `<|im_end|>` a template writes and the `<|im_end|>` a
client types in a message look the same, and tokenizing the whole prompt with special-token
parsing turns both into the control token, so a client could close its turn and open a system
one. Tracking the client's text through everything a template may do to it (trim, split, slices,
`tojson`, macros) is not possible with Python strings, so we track the template's text instead:
every control-token text in the template's own literals, and in the special-token variables it
prints (`bos_token`, `eos_token`), is replaced once per template by a variable. At render time
each variable holds a code point that occurs nowhere in the template nor in the request, so in
the output each such code point is exactly one control token that the template wrote, and
nothing else can be. Message content, tool definitions, results, names and arguments, and
template kwargs are text, whatever they contain; a marker the template does not write (say, one
it assembles from pieces, `'<|im_' + 'end|>'`, which no known template does) is text as well.

The template sees the client's data unchanged, so its output is today's for any conversation
without control-token text. Where a template compares its own literals with client text
(`'</think>' in content`), a client's control text no longer matches, and the template treats it
as text too.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.visitor import NodeTransformer

_VARIABLE = "tsjax_control_{}"

# Marker code points, in order of preference: Unicode's noncharacters (reserved for a program's
# internal use), then the private use areas.
_POOL = ((0xFDD0, 0xFDEF), (0xE000, 0xF8FF), (0xF0000, 0xFFFFD), (0x100000, 0x10FFFD))
_POOL_RE = re.compile("[" + "".join(f"{chr(a)}-{chr(b)}" for a, b in _POOL) + "]")


def _pool() -> Iterator[str]:
    for first, last in _POOL:
        for code in range(first, last + 1):
            yield chr(code)


def _char_class(chars: str) -> re.Pattern[str]:
    return re.compile("[" + re.escape(chars) + "]")


@dataclass(frozen=True)
class MarkedTemplate:
    """A template whose control-token literals read variables `tsjax_control_<i>`.

    `texts[i]` is the control token variable i stands for; `reserved` are the pool code points
    the template's own text contains, which can never be markers.
    """

    template: jinja2.Template
    texts: tuple[str, ...]
    reserved: frozenset[str]
    _pattern: re.Pattern[str] | None

    def variables(self, markers: str) -> dict[str, str]:
        """The template variables that print `markers` (one code point per text)."""
        return {_VARIABLE.format(i): m for i, m in enumerate(markers)}

    def mark(self, value: str, markers: str) -> str:
        """A trusted string (a special-token variable) with its control texts as markers."""
        if self._pattern is None:
            return value
        index = {t: i for i, t in enumerate(self.texts)}
        return self._pattern.sub(lambda m: markers[index[m.group()]], value)

    def choose_markers(self, client: Iterable[Any]) -> str | None:
        """One marker per text, none of them in the template or in any string of `client`
        (JSON-like data: keys and values); None when every candidate is taken."""
        n = len(self.texts)
        if n == 0:
            return ""
        free = (c for c in _pool() if c not in self.reserved)
        first = "".join(c for _, c in zip(range(n), free, strict=False))
        strings = list(_strings(client))
        taken = _char_class(first)
        if not any(taken.search(s) for s in strings):
            return first
        used = set(self.reserved)
        for s in strings:
            used.update(_POOL_RE.findall(s))
        free = (c for c in _pool() if c not in used)
        markers = "".join(c for _, c in zip(range(n), free, strict=False))
        return markers if len(markers) == n else None

    def unmark(self, output: str, markers: str) -> tuple[str, list[tuple[int, int]]]:
        """The prompt text (markers replaced by their control texts) and the (start, end)
        character spans of those control tokens in it, in order."""
        if not markers:
            return output, []
        text = dict(zip(markers, self.texts, strict=True))
        pieces: list[str] = []
        spans: list[tuple[int, int]] = []
        pos = length = 0
        for m in _char_class(markers).finditer(output):
            pieces.append(output[pos : m.start()])
            length += m.start() - pos
            token = text[m.group()]
            spans.append((length, length + len(token)))
            pieces.append(token)
            length += len(token)
            pos = m.end()
        pieces.append(output[pos:])
        return "".join(pieces), spans

    def restore(self, message: str, markers: str) -> str:
        """An error message with markers written back as their control texts."""
        return message.translate({ord(m): t for m, t in zip(markers, self.texts, strict=True)})


def _strings(data: Iterable[Any]) -> Iterator[str]:
    """Every string in JSON-like data, keys included (iteratively: bodies may nest deeply)."""
    stack = list(data)
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            yield value
        elif isinstance(value, dict):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, list | tuple):
            stack.extend(value)


class _ControlsToVariables(NodeTransformer):
    """Rewrites string literals and template text so control texts become variable reads."""

    def __init__(self, pattern: re.Pattern[str], index: dict[str, int]) -> None:
        self.pattern, self.index = pattern, index

    def _split(self, value: str, lineno: int, literal: type[nodes.Node]) -> list[nodes.Node]:
        """`value` as literal pieces (of class `literal`) and variable reads, in order."""
        out: list[nodes.Node] = []
        pos = 0
        for m in self.pattern.finditer(value):
            if m.start() > pos:
                out.append(literal(value[pos : m.start()], lineno=lineno))
            name = _VARIABLE.format(self.index[m.group()])
            out.append(nodes.Name(name, "load", lineno=lineno))
            pos = m.end()
        if pos < len(value):
            out.append(literal(value[pos:], lineno=lineno))
        return out

    def visit_Const(self, node: nodes.Const) -> nodes.Node:
        if not isinstance(node.value, str) or not self.pattern.search(node.value):
            return node
        parts = self._split(node.value, node.lineno, nodes.Const)
        return parts[0] if len(parts) == 1 else nodes.Concat(parts, lineno=node.lineno)

    def visit_TemplateData(self, node: nodes.TemplateData) -> list[nodes.Node]:
        return self._split(node.data, node.lineno, nodes.TemplateData)


@lru_cache(maxsize=32)
def marked_template(
    env: jinja2.Environment, source: str, controls: frozenset[str], trusted: tuple[str, ...]
) -> MarkedTemplate:
    """`source` compiled with its control-token literals (any of `controls`) as variables.

    `trusted` are the other strings the template may print as control tokens (the special-token
    variables); their control texts get variables too, for `MarkedTemplate.mark`.
    """
    ast = env.parse(source)
    literals = [n.value for n in ast.find_all(nodes.Const) if isinstance(n.value, str)]
    literals += [n.data for n in ast.find_all(nodes.TemplateData)]
    haystack = "\0".join([*literals, *trusted])
    texts = tuple(sorted((t for t in controls if t and t in haystack), key=lambda t: (-len(t), t)))
    reserved = frozenset(_POOL_RE.findall(haystack)) | frozenset(_POOL_RE.findall(source))
    if not texts:
        return MarkedTemplate(env.from_string(ast), (), reserved, None)
    # Longest first: at any position the longest control text wins, as in the tokenizer.
    pattern = re.compile("|".join(map(re.escape, texts)))
    ast = _ControlsToVariables(pattern, {t: i for i, t in enumerate(texts)}).visit(ast)
    ast.set_environment(env)
    return MarkedTemplate(env.from_string(ast), texts, reserved, pattern)
