"""Which output format a model speaks, chosen from its architecture and chat template.

The template is the best evidence: it is what taught the adapter's prompt the tool syntax, so
its markers decide. The architecture fills in when a file carries no template (the built-in
fallbacks of tsjax.chat_template). A format is cheap and immutable; `parser()` makes the
per-request state.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field

from serve.outputs.reasoning import (
    Channel,
    HarmonySplitter,
    ReasoningSplitter,
    gemma4_splitter,
    magistral_splitter,
    think_splitter,
)
from serve.outputs.toolcalls import (
    ContentDelta,
    Gemma4Parser,
    HermesParser,
    JsonCallParser,
    MalformedCall,
    MistralParser,
    NemotronParser,
    ToolCall,
    ToolCallEnd,
    ToolCallParser,
    ToolEvent,
    new_call_id,
    normalize_call,
)

_THINK_ARCHS = ("qwen3", "qwen35", "qwen3next", "qwen3vl", "nemotron_h", "deepseek")
_HARMONY_ARCHS = ("gptoss", "gpt-oss")


@dataclass(frozen=True)
class ReasoningDelta:
    text: str


OutputEvent = ReasoningDelta | ToolEvent


@dataclass
class ParsedOutput:
    """The whole-response view of a parser's events: the one fold every consumer uses."""

    reasoning: str = ""
    content: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    malformed: list[MalformedCall] = field(default_factory=list)

    def add(self, events: list[OutputEvent]) -> list[OutputEvent]:
        """Fold `events` in; returns them unchanged so a streamer can forward them."""
        for e in events:
            if isinstance(e, ReasoningDelta):
                self.reasoning += e.text
            elif isinstance(e, ContentDelta):
                self.content += e.text
            elif isinstance(e, ToolCallEnd):
                self.tool_calls.append(e.call)
            elif isinstance(e, MalformedCall):
                self.malformed.append(e)
        return events


def collect_output(events: list[OutputEvent]) -> ParsedOutput:
    """Fold streamed events into the whole-response view."""
    out = ParsedOutput()
    out.add(events)
    return out


class OutputParser:
    """Reasoning split first, then tool calls read from the answer part. One per request."""

    def __init__(self, reasoning: ReasoningSplitter | None, tools: ToolCallParser) -> None:
        self.reasoning = reasoning
        self.tools = tools

    def push(self, text: str) -> list[OutputEvent]:
        if self.reasoning is None:
            return list(self.tools.push(text))
        return self._route(self.reasoning.push(text))

    def finish(self) -> list[OutputEvent]:
        events = self._route(self.reasoning.finish()) if self.reasoning else []
        return events + list(self.tools.finish())

    def parse(self, text: str) -> ParsedOutput:
        """Whole-text parse of a fresh parser's output (non-streaming replies)."""
        return collect_output(self.push(text) + self.finish())

    def _route(self, deltas: list) -> list[OutputEvent]:
        out: list[OutputEvent] = []
        for d in deltas:
            if d.channel == Channel.REASONING:
                out.append(ReasoningDelta(d.text))
            elif d.channel == Channel.CONTENT:
                out += self.tools.push(d.text)
            else:  # a whole Harmony tool message: JSON arguments
                out += self.tools.push("")
                self._harmony_call(d.recipient, d.text, out)
        return out

    def _harmony_call(self, name: str, body: str, out: list[OutputEvent]) -> None:
        try:
            call = normalize_call(name, json.loads(body) if body.strip() else {})
        except (json.JSONDecodeError, RecursionError):
            call = None
        if call is None:
            self.tools.add_malformed(body, f"arguments for {name} are not a JSON object")
        else:
            self.tools.add_call(*call)
        out += self.tools.take()


def _prompt_opens(prompt_text: str, tag: str) -> bool:
    return prompt_text.rstrip().endswith(tag)


@dataclass(frozen=True)
class OutputFormat:
    """A model's output syntax: names for logs and /api/show, factories for the parsers."""

    reasoning_name: str
    tools_name: str
    make_reasoning: Callable[[str], ReasoningSplitter | None]
    make_tools: Callable[[Callable[[], str]], ToolCallParser]
    # Which of a syntax's forms the template writes, where the parser reads several (Mistral:
    # "args" for `NAME[ARGS]{...}`, "list" for a JSON list); "" when the template cannot tell.
    call_form: str = ""

    def parser(
        self,
        prompt_text: str = "",
        *,
        tools: bool = True,
        id_factory=new_call_id,
        schemas: dict[str, dict] | None = None,
    ) -> OutputParser:
        """A fresh parser for one response. `prompt_text`: the rendered prompt, whose end
        tells whether the output starts inside a reasoning block. `tools=False` (no tools in
        the request) leaves the answer untouched apart from reasoning. `schemas`: the tools'
        parameter schemas by name (read by formats whose values are untyped text)."""
        tool_parser = self.make_tools(id_factory) if tools else ToolCallParser(id_factory)
        tool_parser.schemas = dict(schemas or {})
        return OutputParser(self.make_reasoning(prompt_text), tool_parser)


def _no_reasoning(prompt_text: str) -> None:
    return None


def _think(implicit_end: tuple[str, ...]) -> Callable[[str], ReasoningSplitter]:
    return lambda p: think_splitter(inside=_prompt_opens(p, "<think>"), implicit_end=implicit_end)


def select_format(architecture: str, template_source: str) -> OutputFormat:
    """The output format for a model, from its GGUF `general.architecture` and template."""
    arch = (architecture or "").lower()
    tmpl = template_source or ""
    if "<|start|>assistant<|channel|>" in tmpl or "<|channel|>" in tmpl or arch in _HARMONY_ARCHS:
        return OutputFormat(
            "harmony",
            "harmony",
            lambda p: HarmonySplitter(seeded=not p or _prompt_opens(p, "<|start|>assistant")),
            ToolCallParser,
        )
    if "<|channel>" in tmpl or "<|tool_call>" in tmpl or arch == "gemma4":
        return OutputFormat(
            "gemma4",
            "gemma4",
            lambda p: gemma4_splitter(inside=_prompt_opens(p, "<|channel>")),
            Gemma4Parser,
        )
    if "[TOOL_CALLS]" in tmpl or arch in ("mistral3",):
        reasoning = "[THINK]" in tmpl
        return OutputFormat(
            "magistral" if reasoning else "none",
            "mistral",
            (lambda p: magistral_splitter(inside=_prompt_opens(p, "[THINK]")))
            if reasoning
            else _no_reasoning,
            MistralParser,
            "args" if "[ARGS]" in tmpl else "list" if "[TOOL_CALLS]" in tmpl else "",
        )
    think_arch = any(arch.startswith(a) for a in _THINK_ARCHS)
    thinks = "<think>" in tmpl or "</think>" in tmpl or think_arch
    if "<TOOLCALL>" in tmpl:
        tools_name, make_tools = "nemotron", NemotronParser
    elif "<function=" in tmpl and "<parameter=" in tmpl:  # Qwen 3.5, Qwen3-Coder, Nemotron 3
        tools_name, make_tools = "qwen-xml", HermesParser
    elif "<tool_call>" in tmpl or think_arch:
        tools_name, make_tools = "hermes", HermesParser
    elif "<|python_tag|>" in tmpl or "<|start_header_id|>" in tmpl:
        tools_name = "llama3"

        def make_tools(id_factory: Callable[[], str]) -> ToolCallParser:
            return JsonCallParser(id_factory, tag="<|python_tag|>")
    else:
        tools_name, make_tools = "json", JsonCallParser
    # a call opened inside an unclosed reasoning block ends the block
    implicit = {"hermes": ("<tool_call>",), "qwen-xml": ("<tool_call>",),
                "nemotron": ("<TOOLCALL>",)}.get(tools_name, ())  # fmt: skip
    return OutputFormat(
        "think" if thinks else "none",
        tools_name,
        _think(implicit) if thinks else _no_reasoning,
        make_tools,
    )


def select_parsers(
    architecture: str,
    template_source: str,
    *,
    prompt_text: str = "",
    tools: bool = True,
    id_factory: Callable[[], str] = new_call_id,
) -> OutputParser:
    """A fresh `OutputParser` (reasoning + tool calls) for one response of this model."""
    return select_format(architecture, template_source).parser(
        prompt_text, tools=tools, id_factory=id_factory
    )
