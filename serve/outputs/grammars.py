"""Grammars in a model's own output syntax: tool calls written the way its parser reads them, a
response format's JSON, and the reasoning block a thinking model may open first.

Each piece is an xgrammar structural-tag element (a dict); `answer_format` assembles the tree
and `GrammarFactory.structural` compiles it, so JSON bodies from two schemas (a call's
arguments and a response format) combine without their rule names colliding. Markers go
through `GrammarFactory.marker`: a marker that is one control token (`<|tool_call>`,
`[TOOL_CALLS]`, `<|channel|>`) is allowed as that token, which is what the model was trained
to emit; every other control token stays out of reach.

Per format (`OutputFormat.tools_name`), one call is:

* `json`: `{"name": NAME, "arguments": {...}}` (templates without tool syntax; one call).
* `hermes`: `<tool_call>\\n{"name": NAME, "arguments": {...}}\\n</tool_call>`, repeatable.
* `qwen-xml` (Qwen 3.5, Qwen3-Coder, Nemotron 3): `<tool_call>\\n<function=NAME>\\n` then
  `<parameter=KEY>\\nVALUE\\n</parameter>\\n` per argument in the schema's order (strings raw,
  other values JSON), `</function>\\n</tool_call>`, repeatable.
* `nemotron` (Nemotron-H Nano v2): `<TOOLCALL>[{"name": NAME, "arguments": {...}}, ...]
  </TOOLCALL>`.
* `llama3`: `{"name": NAME, "parameters": {...}}`, several separated by `; `.
* `gemma4`: `<|tool_call>call:NAME{...}<tool_call|>`, repeatable. The arguments are written as
  JSON, which `Gemma4Parser` reads as well as Gemma's own `<|"|>` strings and bare keys; the
  grammar does not produce the native spelling.
* `mistral`: `[TOOL_CALLS]NAME[ARGS]{...}`, repeatable (v11+ tokenizers), or
  `[TOOL_CALLS][{"name": NAME, "arguments": {...}}, ...]` for templates that write the list.
* `harmony`: `<|channel|>commentary to=functions.NAME <|constrain|>json<|message|>{...}`; one
  call per answer, which `<|call|>` (a stop token) ends.

String values may not contain the marker that would end the call early (`</tool_call>`,
`<tool_call|>`, Harmony's message ends). With thinking not switched off, an optional reasoning
block in the model's syntax comes first; a prompt that already opened it makes the block's end
mandatory. The constraint therefore applies from the first generated token and cannot be
skipped by a model that answers without reasoning.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from serve.outputs.toolcalls import declares_string

if TYPE_CHECKING:
    from serve.outputs.registry import OutputFormat
    from tsjax.grammar import GrammarFactory

Element = dict[str, Any]
Marker = Callable[[str], Element]
Json = Callable[[dict[str, Any]], Element]  # a JSON schema -> its element, the format's excludes


class UnsupportedFormat(ValueError):
    """The model's tool-call syntax has no grammar here."""


# -- structural-tag building blocks -----------------------------------------------------------


def text(value: str) -> Element:
    return {"type": "const_string", "value": value}


def seq(*parts: Element | None) -> Element:
    elements: list[Element] = []
    for p in parts:
        if p is None:
            continue
        elements += p["elements"] if p["type"] == "sequence" else [p]
    return elements[0] if len(elements) == 1 else {"type": "sequence", "elements": elements}


def one_of(parts: list[Element]) -> Element:
    return parts[0] if len(parts) == 1 else {"type": "or", "elements": parts}


def star(part: Element) -> Element:
    return {"type": "star", "content": part}


def optional(part: Element) -> Element:
    return {"type": "optional", "content": part}


def _char(c: str) -> str:
    return f"\\u{ord(c):04x}" if ord(c) < 0x10000 else f"\\U{ord(c):08x}"


def text_without(*markers: str) -> Element:
    """Any text that contains none of `markers` (and no control token): one rule per prefix
    of a marker matched so far, the automaton of a substring search (Aho-Corasick for
    several). xgrammar's own `any_text` with excludes lets control tokens through (0.2.8),
    so it is not used."""
    states = sorted({m[:k] for m in markers for k in range(len(m))}, key=len)
    index = {p: i for i, p in enumerate(states)}

    def step(seen: str) -> int | None:  # the state after `seen`; None: a marker completed
        if any(seen.endswith(m) for m in markers):
            return None
        return index[next(seen[j:] for j in range(len(seen) + 1) if seen[j:] in index)]

    chars = sorted(set("".join(markers)))
    rules = []
    for i, p in enumerate(states):
        alts = ['""', f"[^{''.join(_char(c) for c in chars)}] s0"]
        alts += [f'"{_char(c)}" s{j}' for c in chars if (j := step(p + c)) is not None]
        rules.append(f"s{i} ::= " + " | ".join(alts))
    return {"type": "grammar", "grammar": "root ::= s0\n" + "\n".join(rules)}


def call_object(name: str, parameters: dict[str, Any], key: str = "arguments") -> dict[str, Any]:
    """JSON schema of `{"name": NAME, key: <parameters>}`."""
    return {
        "type": "object",
        "properties": {"name": {"const": name}, key: parameters},
        "required": ["name", key],
        "additionalProperties": False,
    }


# -- tool-call syntaxes -----------------------------------------------------------------------


@dataclass(frozen=True)
class CallSyntax:
    """How one format writes calls: `call(mark, json, name, parameters)` is one call. Several
    are `call (sep call)*` wrapped in `group` (open, close); `sep=None`: one call only.
    `closers`: text no string inside the arguments may contain."""

    call: Callable[[Marker, Json, str, dict[str, Any]], Element]
    sep: str | None = None
    group: tuple[tuple[str, ...], str] | None = None
    closers: tuple[str, ...] = ()


_HARMONY_ENDS = ("<|end|>", "<|call|>", "<|return|>", "<|start|>")

_XML_ENDS = ("</parameter>", "</tool_call>")


def xml_parameters(json: Json, parameters: dict[str, Any]) -> Element | None:
    """A tool's arguments as Qwen's `<parameter=KEY>\\nVALUE\\n</parameter>\\n` list, valid
    under its `parameters` schema: its properties in the schema's order, the required ones
    present. A declared string is raw text (its enum, its length limits: then without `<`; a
    pattern as a regex), anything else JSON under its schema (`json`). A schema without
    properties takes any named parameters with raw values."""
    props = parameters.get("properties")
    if not isinstance(props, dict) or not props:
        if parameters.get("additionalProperties") is False or isinstance(props, dict):
            return None
        name = {"type": "grammar", "grammar": "root ::= [a-zA-Z_] [a-zA-Z0-9_]*"}
        free = seq(text("<parameter="), name, text(">\n"), text_without(*_XML_ENDS),
                   text("\n</parameter>\n"))  # fmt: skip
        return star(free)
    required = set(parameters.get("required") or ())
    parts = []
    for key, sub in props.items():
        one = seq(text(f"<parameter={key}>\n"), _xml_value(json, sub), text("\n</parameter>\n"))
        parts.append(one if key in required else optional(one))
    return seq(*parts)


def _xml_value(json: Json, schema: Any) -> Element:
    if not declares_string(schema):
        return json(schema if isinstance(schema, dict) else {})
    choices = schema.get("enum") or ([schema["const"]] if "const" in schema else None)
    if choices:
        return one_of([text(v) for v in choices])
    if "pattern" in schema:
        return {"type": "regex", "pattern": schema["pattern"].removeprefix("^").removesuffix("$")}
    lo, hi = schema.get("minLength", 0), schema.get("maxLength")
    if lo or hi is not None:
        count = f"{{{lo},{'' if hi is None else hi}}}"
        return {"type": "grammar", "grammar": f"root ::= [^<]{count}"}
    return text_without(*_XML_ENDS)


SYNTAXES: dict[str, CallSyntax] = {
    "json": CallSyntax(lambda m, j, n, p: j(call_object(n, p))),
    "hermes": CallSyntax(
        lambda m, j, n, p: seq(
            m("<tool_call>"), text("\n"), j(call_object(n, p)), text("\n"), m("</tool_call>")
        ),
        sep="\n",
        closers=("</tool_call>",),
    ),
    "qwen-xml": CallSyntax(
        lambda m, j, n, p: seq(
            m("<tool_call>"),
            text(f"\n<function={n}>\n"),
            xml_parameters(j, p),
            text("</function>\n"),
            m("</tool_call>"),
        ),
        sep="\n",
        closers=_XML_ENDS,
    ),
    "nemotron": CallSyntax(
        lambda m, j, n, p: j(call_object(n, p)),
        sep=", ",
        group=(("<TOOLCALL>", "["), "]</TOOLCALL>"),
        closers=("</TOOLCALL>",),
    ),
    "llama3": CallSyntax(lambda m, j, n, p: j(call_object(n, p, "parameters")), sep="; "),
    "gemma4": CallSyntax(
        lambda m, j, n, p: seq(m("<|tool_call>"), text(f"call:{n}"), j(p), m("<tool_call|>")),
        sep="",
        closers=("<tool_call|>",),
    ),
    "mistral": CallSyntax(
        lambda m, j, n, p: seq(m("[TOOL_CALLS]"), text(n), m("[ARGS]"), j(p)), sep=""
    ),
    "mistral-list": CallSyntax(
        lambda m, j, n, p: j(call_object(n, p)), sep=", ", group=(("[TOOL_CALLS]", "["), "]")
    ),
    "harmony": CallSyntax(
        lambda m, j, n, p: seq(
            m("<|channel|>"),
            text(f"commentary to=functions.{n} "),
            m("<|constrain|>"),
            text("json"),
            m("<|message|>"),
            j(p),
        ),
        closers=_HARMONY_ENDS,
    ),
}


def syntax_of(g: GrammarFactory, fmt: OutputFormat) -> CallSyntax:
    """The call syntax for a format; Mistral's form from the template, else the vocabulary
    (an `[ARGS]` token means a v11+ tokenizer, which writes `NAME[ARGS]{...}`)."""
    name = fmt.tools_name
    if name == "mistral":
        form = fmt.call_form or ("args" if g.tokenizer.id_of("[ARGS]") is not None else "list")
        name = "mistral" if form == "args" else "mistral-list"
    if name not in SYNTAXES:
        raise UnsupportedFormat(f"no grammar for the {fmt.tools_name} tool-call syntax")
    return SYNTAXES[name]


def calls_element(
    g: GrammarFactory,
    fmt: OutputFormat,
    tools: list[tuple[str, dict[str, Any]]],
    single: bool = False,
) -> Element:
    """One or more calls (one where the format allows only one, or `single`: the request
    named the function to call), each to one of `tools` ((name, parameters schema) pairs)
    with arguments valid under its parameters."""
    from tsjax.grammar import json_element

    syntax = syntax_of(g, fmt)

    def json(schema: dict[str, Any]) -> Element:
        return json_element(schema, excludes=syntax.closers)

    call = one_of([syntax.call(g.marker, json, n, p) for n, p in tools])
    if syntax.sep is None:
        return call
    more = star(seq(text(syntax.sep) if syntax.sep else None, call))
    calls = call if single else seq(call, more)
    if syntax.group is None:
        return calls
    head, close = syntax.group
    return seq(*[g.marker(h) for h in head], calls, text(close))


# -- reasoning blocks -------------------------------------------------------------------------


@dataclass(frozen=True)
class ThinkSyntax:
    """A reasoning block: `open` free text `close`, then up to `gap` whitespace characters.
    `answer`: what opens a plain answer (Harmony's final channel), block or not."""

    open: tuple[str, ...]
    close: tuple[str, ...]
    gap: int = 2
    answer: tuple[str, ...] = ()


THINKING: dict[str, ThinkSyntax] = {
    "think": ThinkSyntax(("<think>",), ("</think>",)),
    "magistral": ThinkSyntax(("[THINK]",), ("[/THINK]",)),
    "gemma4": ThinkSyntax(("<|channel>", "thought\n"), ("<channel|>",)),
    "harmony": ThinkSyntax(
        ("<|channel|>", "analysis", "<|message|>"),
        ("<|end|>", "<|start|>", "assistant"),
        gap=0,
        answer=("<|channel|>", "final", "<|message|>"),
    ),
}


def _closes_empty_block(prompt_text: str, syntax: ThinkSyntax) -> bool:
    """Whether the prompt ends with an empty block: the template switching thinking off (Gemma
    4's default, Qwen 3's enable_thinking=false), so no second block may follow."""
    head, close = prompt_text.rstrip(), "".join(syntax.close)
    return head.endswith(close) and head[: -len(close)].rstrip().endswith(
        "".join(syntax.open).rstrip()
    )


def reasoning_element(
    g: GrammarFactory, fmt: OutputFormat, think: bool | None, prompt_text: str
) -> Element | None:
    """The reasoning block that may (or, when the prompt opened it, must) come first; None
    when there is none (no reasoning syntax, thinking switched off, or a block whose end
    marker would stop generation, as Harmony's `<|end|>` does where it is a stop token)."""
    syntax = THINKING.get(fmt.reasoning_name)
    if syntax is None:
        return None
    inside = bool(prompt_text) and prompt_text.rstrip().endswith(syntax.open[0])
    if think is False and not inside:
        return None
    if _closes_empty_block(prompt_text, syntax):
        return None
    tok = g.tokenizer
    if any(tok.id_of(m) in tok.eog_ids for m in syntax.close if tok.id_of(m) is not None):
        return None
    opening = syntax.open[1:] if inside else syntax.open
    gap = (
        {"type": "grammar", "grammar": f"root ::= [ \\n]{{0,{syntax.gap}}}"} if syntax.gap else None
    )
    block = seq(
        *[g.marker(m) for m in opening],
        text_without(syntax.close[0]),
        *[g.marker(m) for m in syntax.close],
        gap,
    )
    return block if inside else optional(block)


# -- the whole answer -------------------------------------------------------------------------


def answer_format(
    g: GrammarFactory,
    fmt: OutputFormat,
    *,
    tools: list[tuple[str, dict[str, Any]]],
    output: tuple[dict[str, Any] | None, bool] | None,
    think: bool | None,
    prompt_text: str = "",
    single_call: bool = False,
) -> Element:
    """The structural tag an answer must match: an optional reasoning block, then a call to
    one of `tools` or, when `output` ((schema or None for any object, strict)) is given, JSON
    content valid under it; both given is the union that `tool_choice: "auto"` with a
    response format asks for. `single_call`: one call only (a named function was forced)."""
    from tsjax.grammar import json_element

    branches = []
    if tools:
        branches.append(calls_element(g, fmt, tools, single_call))
    if output is not None:
        schema, strict = output
        body = json_element(schema or {"type": "object"}, strict=strict and schema is not None)
        head = THINKING[fmt.reasoning_name].answer if fmt.reasoning_name in THINKING else ()
        branches.append(seq(*[g.marker(h) for h in head], body))
    if not branches:
        raise ValueError("nothing to constrain")
    return seq(reasoning_element(g, fmt, think, prompt_text), one_of(branches))
