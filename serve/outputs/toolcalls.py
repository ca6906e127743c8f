"""Streaming tool-call parsers: answer text in, content deltas and whole tool calls out.

Formats (what the model writes; see tests/test_outputs.py for the sources checked):

* `HermesParser`: Qwen / Hermes `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, and
  the XML body Qwen 3.5 / Qwen3-Coder templates ask for:
  `<tool_call><function=NAME><parameter=KEY>VALUE</parameter></function></tool_call>`.
  XML values are untyped text: a parameter the tool declares a string stays the text as
  written, others read as JSON where they parse (`ToolCallParser.schemas`).
* `NemotronParser`: Nemotron-H (Nano v2) `<TOOLCALL>[{"name": ..., "arguments": {...}}, ...]
  </TOOLCALL>`.
* `Gemma4Parser`: `<|tool_call>call:NAME{key:<|"|>text<|"|>,n:1}<tool_call|>`.
* `MistralParser`: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]` (tokenizers before
  v11) and `[TOOL_CALLS]NAME[ARGS]{...}` (v11+; `[CALL_ID]ID` before `[ARGS]` is skipped).
* `JsonCallParser`: Llama 3.x `{"name": ..., "parameters": {...}}`, optionally after
  `<|python_tag|>` and `;`-separated; and the generic form for templates without tool syntax:
  `{"tool_calls": [{"name", "arguments"}]}`, a bare `{"name", "arguments"}`, or a list of them.

A call is reported only once it is complete and valid, as `ToolCallStart`, one `ToolCallArgs`
with the whole canonical JSON object, then `ToolCallEnd`. Peers that stream partial argument
JSON garble it under odd chunkings (sglang#35564, vllm#10395); waiting costs only the latency of
one call's arguments. A call that cannot be read is kept as content, with a `MalformedCall`
event, instead of vanishing (the reference server drops it with its text).
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from serve.outputs.scanning import GemmaArgsReader, Trimmer, json_value_end, partial_suffix


def new_call_id() -> str:
    """`call_` and 24 random hex digits, the shape OpenAI clients expect."""
    return "call_" + secrets.token_hex(12)


@dataclass(frozen=True)
class ToolCall:
    index: int  # 0, 1, ... within one response
    id: str
    name: str
    arguments: dict[str, Any]  # Ollama's `function.arguments`

    @property
    def arguments_json(self) -> str:
        """OpenAI's `function.arguments`: a JSON string that parses to an object."""
        return json.dumps(self.arguments, ensure_ascii=False)


@dataclass(frozen=True)
class ContentDelta:
    text: str


@dataclass(frozen=True)
class ToolCallStart:
    index: int
    id: str
    name: str


@dataclass(frozen=True)
class ToolCallArgs:
    index: int
    fragment: str  # the fragments of one call concatenate to `ToolCall.arguments_json`


@dataclass(frozen=True)
class ToolCallEnd:
    call: ToolCall


@dataclass(frozen=True)
class MalformedCall:
    """A tool-call marker whose call could not be read; `text` was also sent as content."""

    text: str
    reason: str


ToolEvent = ContentDelta | ToolCallStart | ToolCallArgs | ToolCallEnd | MalformedCall


def normalize_call(name: Any, arguments: Any) -> tuple[str, dict[str, Any]] | None:
    """(name, arguments object) or None. Arguments given as a JSON string are decoded (some
    models double-encode them); missing arguments mean `{}`; anything else is malformed."""
    if not isinstance(name, str) or not name.strip():
        return None
    if arguments is None:
        arguments = {}
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except (json.JSONDecodeError, RecursionError):
            return None
    if not isinstance(arguments, dict):
        return None
    return name.strip(), arguments


def call_from_object(obj: Any) -> tuple[str, dict[str, Any]] | None:
    """One call from `{"name", "arguments"|"parameters"}`, also wrapped as OpenAI's
    `{"function": {...}}`. An object without an arguments key is not a call."""
    if not isinstance(obj, dict):
        return None
    if isinstance(obj.get("function"), dict):
        obj = obj["function"]
    for key in ("arguments", "parameters"):
        if key in obj:
            return normalize_call(obj.get("name"), obj[key])
    return None


def calls_from_json(obj: Any) -> list[tuple[str, dict[str, Any]]] | None:
    """Every call in a decoded JSON value, or None unless the whole value is calls."""
    if isinstance(obj, dict) and isinstance(obj.get("tool_calls"), list):
        obj = obj["tool_calls"]
    items = obj if isinstance(obj, list) else [obj]
    calls = [call_from_object(item) for item in items]
    if not calls or any(c is None for c in calls):
        return None
    return calls  # type: ignore[return-value]


class ToolCallParser:
    """Base parser: passes content through (holding only whitespace that may touch a call) and
    numbers calls. Subclasses override `_scan`, consuming `self.buf`."""

    def __init__(self, id_factory: Callable[[], str] = new_call_id) -> None:
        self.buf = ""
        self.index = 0
        self.id_factory = id_factory
        self.trim = Trimmer()
        self.events: list[ToolEvent] = []
        # The request's tools' parameter schemas by name: formats that write argument values
        # as untyped text read them by their declared types.
        self.schemas: dict[str, dict[str, Any]] = {}

    def push(self, text: str) -> list[ToolEvent]:
        self.buf += text
        self._scan(final=False)
        return self.take()

    def finish(self) -> list[ToolEvent]:
        self._scan(final=True)
        self._content(self.buf)
        self.buf = ""
        tail = self.trim.flush()
        if tail:
            self.events.append(ContentDelta(tail))
        return self.take()

    def add_call(self, name: str, arguments: dict[str, Any]) -> None:
        """Report one complete, valid call."""
        call = ToolCall(self.index, self.id_factory(), name, arguments)
        self.index += 1
        self.trim.cut()
        self.events += [
            ToolCallStart(call.index, call.id, call.name),
            ToolCallArgs(call.index, call.arguments_json),
            ToolCallEnd(call),
        ]

    def add_malformed(self, text: str, reason: str) -> None:
        self._content(text)
        self.events.append(MalformedCall(text, reason))

    def _scan(self, final: bool) -> None:
        self._content(self.buf)
        self.buf = ""

    def _content(self, text: str) -> None:
        text = self.trim.feed(text) if text else ""
        if text:
            if self.events and isinstance(self.events[-1], ContentDelta):
                self.events[-1] = ContentDelta(self.events[-1].text + text)
            else:
                self.events.append(ContentDelta(text))

    def take(self) -> list[ToolEvent]:
        """Events produced since the last call (for `add_call` made from outside)."""
        out, self.events = self.events, []
        return out

    def _text_until(self, marker: str, final: bool) -> bool:
        """Send content up to `marker` and drop the marker: True if it was found; otherwise
        send all but a possible start of it and return False."""
        i = self.buf.find(marker)
        if i >= 0:
            self._content(self.buf[:i])
            self.buf = self.buf[i + len(marker) :]
            return True
        keep = 0 if final else partial_suffix(self.buf, (marker,))
        self._content(self.buf[: len(self.buf) - keep])
        self.buf = self.buf[len(self.buf) - keep :]
        return False


class _TaggedParser(ToolCallParser):
    """Calls between an open and a close tag; `_decode` reads a body."""

    open_tag = ""
    close_tag = ""

    def __init__(self, id_factory: Callable[[], str] = new_call_id) -> None:
        super().__init__(id_factory)
        self.in_call = False

    def _scan(self, final: bool) -> None:
        while True:
            if not self.in_call:
                if not self._text_until(self.open_tag, final):
                    return
                self.in_call = True
            j = self.buf.find(self.close_tag)
            if j < 0 and not final:
                return
            body = self.buf if j < 0 else self.buf[:j]
            raw = self.open_tag + body + ("" if j < 0 else self.close_tag)
            self.buf = "" if j < 0 else self.buf[j + len(self.close_tag) :]
            self.in_call = False
            calls = self._decode(body)
            if calls is None:
                self.add_malformed(raw, "unterminated" if j < 0 else "unreadable body")
            else:
                for name, args in calls:
                    self.add_call(name, args)
            if j < 0:
                return

    def _decode(self, body: str) -> list[tuple[str, dict[str, Any]]] | None:
        raise NotImplementedError


_XML_FUNCTION = re.compile(r"<function=([^>\n]+)>(.*?)</function>", re.DOTALL)
_XML_PARAMETER = re.compile(r"<parameter=([^>\n]+)>(.*?)</parameter>", re.DOTALL)


def _xml_value(text: str, schema: Any) -> Any:
    """A parameter value: the template puts it between newlines and writes strings raw,
    objects and lists as JSON, other values through Jinja's `string` filter. A parameter whose
    `schema` declares a string is the text itself (`"42"` stays a string); others are JSON
    where they read as JSON, else the text."""
    text = text.removeprefix("\n").removesuffix("\n")
    if declares_string(schema):
        return text
    if isinstance(schema, dict) and schema.get("type") == "boolean" and text in ("True", "False"):
        return text == "True"  # how the template writes a boolean (Jinja's `string` filter)
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return text


def declares_string(schema: Any) -> bool:
    """A property schema whose values can only be strings (`type: string`, or an enum of
    strings without a type)."""
    if not isinstance(schema, dict):
        return False
    kind = schema.get("type")
    if kind is None and isinstance(schema.get("enum"), list) and schema["enum"]:
        return all(isinstance(v, str) for v in schema["enum"])
    return kind == "string" or kind == ["string"]


class HermesParser(_TaggedParser):
    open_tag = "<tool_call>"
    close_tag = "</tool_call>"

    def _decode(self, body: str) -> list[tuple[str, dict[str, Any]]] | None:
        body = body.strip()
        if body.startswith("<function="):
            calls, end = [], 0
            for m in _XML_FUNCTION.finditer(body):
                if body[end : m.start()].strip():
                    return None
                props = self.schemas.get(m.group(1).strip(), {}).get("properties", {})
                args = {
                    k.strip(): _xml_value(v, props.get(k.strip()))
                    for k, v in _XML_PARAMETER.findall(m.group(2))
                }
                call = normalize_call(m.group(1), args)
                if call is None:
                    return None
                calls.append(call)
                end = m.end()
            return calls if calls and not body[end:].strip() else None
        try:
            obj = json.loads(body)
        except (json.JSONDecodeError, RecursionError):
            return None
        call = call_from_object(obj)
        if call is None and isinstance(obj, dict) and "arguments" not in obj:
            call = normalize_call(obj.get("name"), {})  # `{"name": "now"}`: a call without args
        return None if call is None else [call]


class NemotronParser(_TaggedParser):
    """Nemotron-H's `<TOOLCALL>[{"name": ..., "arguments": {...}}, ...]</TOOLCALL>` (its
    template also writes arguments given as a string verbatim: decoded when JSON)."""

    open_tag = "<TOOLCALL>"
    close_tag = "</TOOLCALL>"

    def _decode(self, body: str) -> list[tuple[str, dict[str, Any]]] | None:
        try:
            return calls_from_json(json.loads(body))
        except json.JSONDecodeError:
            return None


class Gemma4Parser(_TaggedParser):
    open_tag = "<|tool_call>"
    close_tag = "<tool_call|>"

    def _decode(self, body: str) -> list[tuple[str, dict[str, Any]]] | None:
        calls, i = [], 0
        while True:
            while i < len(body) and body[i].isspace():
                i += 1
            if i == len(body):
                return calls or None
            if not body.startswith("call:", i):
                return None
            brace = body.find("{", i)
            if brace < 0:
                return None
            try:
                args, i = GemmaArgsReader(body).value(brace)
            except ValueError:
                return None
            call = normalize_call(_gemma_name(body, brace), args)
            if call is None:
                return None
            calls.append(call)


def _gemma_name(body: str, brace: int) -> str:
    start = body.rfind("call:", 0, brace)
    return body[start + len("call:") : brace]


_MISTRAL = "[TOOL_CALLS]"
_ARGS, _CALL_ID = "[ARGS]", "[CALL_ID]"
_NAME_RE = re.compile(r"[\w.\-]+")


class MistralParser(ToolCallParser):
    """`[TOOL_CALLS]` then a JSON list of calls, or `NAME[ARGS]{...}` (`[ARGS]` optional, as
    vLLM also accepts); several `[TOOL_CALLS]` may follow one another."""

    def __init__(self, id_factory: Callable[[], str] = new_call_id) -> None:
        super().__init__(id_factory)
        self.in_call = False

    def _scan(self, final: bool) -> None:
        while True:
            if not self.in_call:
                if not self._text_until(_MISTRAL, final):
                    return
                self.in_call = True
            done = self._call(final)
            if not done:
                if final:
                    self.in_call = False
                    self.add_malformed(_MISTRAL + self.buf, "unterminated")
                    self.buf = ""
                return
            self.in_call = False

    def _call(self, final: bool) -> bool:
        """Read one call group after the marker: False while it is incomplete."""
        s = self.buf.lstrip()
        if not s:
            return False
        if s[0] == "[":  # a name never starts with "[": the list form
            end = json_value_end(s)
            if end is None:
                return False
            try:
                calls = calls_from_json(json.loads(s[:end]))
            except (json.JSONDecodeError, RecursionError):
                calls = None
            if calls is None:
                self.add_malformed(_MISTRAL + s[:end], "not a list of calls")
            for call in calls or ():
                self.add_call(*call)
            self.buf = s[end:]
            return True
        m = _NAME_RE.match(s)
        name = m.group(0) if m else ""
        if not name:
            self.add_malformed(_MISTRAL, "no function name")
            return True
        rest = s[len(name) :].lstrip()
        if not rest or any(t.startswith(rest) for t in (_ARGS, _CALL_ID)):
            if final and not rest:
                self.add_call(name, {})  # `[TOOL_CALLS]name`: a call without arguments
                self.buf = ""
                return True
            return False
        if rest.startswith(_CALL_ID):
            j = rest.find(_ARGS)
            if j < 0:
                return False
            rest = rest[j:]
        if rest.startswith(_ARGS):
            rest = rest[len(_ARGS) :].lstrip()
            if not rest:
                return False
        head = _MISTRAL + s[: len(s) - len(rest)]
        if rest[0] != "{":
            self.add_malformed(head, "no arguments object")
            self.buf = rest
            return True
        end = json_value_end(rest)
        if end is None:
            return False
        try:
            call = normalize_call(name, json.loads(rest[:end]))
        except (json.JSONDecodeError, RecursionError):
            call = None
        if call is None:
            self.add_malformed(head + rest[:end], "arguments are not a JSON object")
        else:
            self.add_call(*call)
        self.buf = rest[end:]
        return True


_JSON_START = re.compile(r'\{\s*"|\[\s*\{')


def _json_start(s: str) -> bool | None:
    """Whether `s` opens a JSON object or a list of objects: None while undecided."""
    if _JSON_START.match(s):
        return True
    if not s or (s[0] in "{[" and not s[1:].strip()):
        return None
    return False


class JsonCallParser(ToolCallParser):
    """Calls written as JSON at the start of the answer, or after `tag` (`<|python_tag|>`).

    When the answer opens with `{"` or `[{` it is held until that JSON value closes: a value that
    is not calls is ordinary content (a JSON answer) and goes out unchanged. After a call, `;`
    and whitespace separate further calls (Llama 3.x writes them so).
    """

    def __init__(self, id_factory: Callable[[], str] = new_call_id, *, tag: str = "") -> None:
        super().__init__(id_factory)
        self.tag = tag
        self.state = "start"  # start | after (a call) | json | text
        self.tagged = False

    def _scan(self, final: bool) -> None:
        while True:
            if self.state == "text":
                if not self.tag:
                    self._content(self.buf)
                    self.buf = ""
                    return
                if not self._text_until(self.tag, final):
                    return
                self.state, self.tagged = "json", True
                continue
            s = self.buf.lstrip()
            if self.state == "json":
                if not self._json(s, final):
                    return
                continue
            if self.state == "after":
                s = s.lstrip("; \t\r\n")
            if self.tag and s.startswith(self.tag):
                self.buf, self.state, self.tagged = s[len(self.tag) :], "json", True
                continue
            opens = _json_start(s)
            if (opens is None or (self.tag and self.tag.startswith(s))) and not final:
                return
            if opens:
                self.buf, self.state = s, "json"
            else:
                self.buf = s if self.state == "after" else self.buf
                self.state = "text"

    def _json(self, s: str, final: bool) -> bool:
        """Read one JSON value at the front: False while it is incomplete."""
        if not s or s[0] not in "{[":
            if not s and not final:
                return False
            self.add_malformed(self.tag, "no JSON after the tag")  # e.g. a built-in tool call
            self.state = "text"
            return True
        end = json_value_end(s)
        if end is None:
            if not final:
                return False
            end = len(s)
        raw = self.buf[: len(self.buf) - len(s) + end]
        try:
            calls = calls_from_json(json.loads(s[:end]))
        except (json.JSONDecodeError, RecursionError):
            calls = None
        if calls is None:
            if self.tagged:
                self.add_malformed(self.tag + raw, "not a call")
            else:
                self._content(raw)
            self.buf, self.state = s[end:], "text"
        else:
            for call in calls:
                self.add_call(*call)
            self.buf, self.state = s[end:], "after"
        return True
