"""Streaming reasoning splitters: a model's text in, reasoning and answer pieces out.

Each family marks its chain of thought differently:

* `<think>` ... `</think>`: Qwen 3 / 3.5, Nemotron-H, DeepSeek-R1. Templates that end the
  generation prompt with `<think>` make the output start inside the block, so only the closing
  tag shows up (`inside=True`).
* `[THINK]` ... `[/THINK]`: Magistral (Mistral's reasoning models).
* Gemma 4: `<|channel>thought\\n` ... `<channel|>`; the channel name is not reasoning text.
* GPT-OSS Harmony: messages `<|channel|>analysis<|message|>...<|end|>` then
  `<|start|>assistant<|channel|>final<|message|>...`; a commentary message with a recipient
  (`to=functions.NAME`) is a tool call, reported whole as a `Channel.TOOL` delta.

`push(text)` returns the `Delta`s that became certain; a tag cut across pieces is held back
and never leaks into either field. `finish()` flushes what is left.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from serve.outputs.scanning import Trimmer, find_first, partial_suffix


class Channel(StrEnum):
    REASONING = "reasoning"
    CONTENT = "content"
    TOOL = "tool"  # Harmony only: a whole tool-call message body, `recipient` names the tool


@dataclass(frozen=True)
class Delta:
    channel: Channel
    text: str
    recipient: str = ""


class ReasoningSplitter(Protocol):
    def push(self, text: str) -> list[Delta]: ...
    def finish(self) -> list[Delta]: ...


def _merged(deltas: list[Delta]) -> list[Delta]:
    """Adjacent text of one channel as one delta: fewer, larger wire chunks."""
    out: list[Delta] = []
    for d in deltas:
        if not d.text and d.channel != Channel.TOOL:
            continue
        if out and out[-1].channel == d.channel and d.channel != Channel.TOOL:
            out[-1] = Delta(d.channel, out[-1].text + d.text)
        else:
            out.append(d)
    return out


class _State(StrEnum):
    START = "start"  # before any text: a block may open here
    OPENED = "opened"  # the prompt opened the block: a repeated open tag is dropped
    NAME = "name"  # just after the open tag: the channel name (Gemma's `thought`) is dropped
    REASONING = "reasoning"
    CONTENT = "content"


class TagSplitter:
    """Reasoning between an open and a close tag.

    `inside`: the prompt already opened the block. `reopen`: a block may open anywhere in the
    answer, not only at its start (Gemma 4 emits text before `<|channel>`). `name`: a channel
    name that follows the open tag and is not reasoning. `implicit_end`: markers that end the
    reasoning and start the answer with the marker kept, e.g. a tool call opened while the
    model was still thinking, so the tool-call parser still sees it.

    Whitespace next to the tags is trimmed: reasoning is stripped and the answer after the block
    left-stripped; answer text on both sides of a reopened block keeps one run of whitespace.
    """

    def __init__(
        self,
        open_tag: str,
        close_tag: str,
        *,
        inside: bool = False,
        reopen: bool = False,
        name: str = "",
        implicit_end: tuple[str, ...] = (),
    ) -> None:
        self.open, self.close, self.reopen, self.name = open_tag, close_tag, reopen, name
        self.implicit_end = implicit_end
        self.state = _State.OPENED if inside else _State.START
        self.buf = ""
        self.reasoning = Trimmer(lstrip=True)
        self.content = Trimmer(lstrip=True)

    def push(self, text: str) -> list[Delta]:
        self.buf += text
        return _merged(self._scan(final=False))

    def finish(self) -> list[Delta]:
        out = self._scan(final=True)
        out.append(Delta(Channel.CONTENT, self.content.flush()))
        return _merged(out)

    def _scan(self, final: bool) -> list[Delta]:
        out: list[Delta] = []
        while True:
            if self.state in (_State.START, _State.OPENED):
                stripped = self.buf.lstrip()
                if stripped.startswith(self.open):
                    self.buf = stripped[len(self.open) :]
                    self.state = _State.NAME if self.name else _State.REASONING
                elif self.open.startswith(stripped) and not final:
                    return out
                elif self.state == _State.OPENED:
                    self.state = _State.NAME if self.name else _State.REASONING
                else:
                    self.state = _State.CONTENT
            elif self.state == _State.NAME:
                if self.buf.startswith(self.name):
                    rest = self.buf[len(self.name) :]
                    if not rest and not final:
                        return out  # a newline may still follow the name
                    self.buf = rest[1:] if rest.startswith("\n") else rest
                    self.state = _State.REASONING
                elif self.name.startswith(self.buf) and not final:
                    return out
                else:
                    self.buf = "" if final and self.name.startswith(self.buf) else self.buf
                    self.state = _State.REASONING
            elif self.state == _State.REASONING:
                markers = (self.close, *self.implicit_end)
                i, marker = find_first(self.buf, markers)
                if i < 0:
                    keep = 0 if final else partial_suffix(self.buf, markers)
                    cut = len(self.buf) - keep
                    out.append(Delta(Channel.REASONING, self.reasoning.feed(self.buf[:cut])))
                    self.buf = self.buf[cut:]
                    return out
                out.append(Delta(Channel.REASONING, self.reasoning.feed(self.buf[:i])))
                self.reasoning = Trimmer(lstrip=True)  # drops the trailing whitespace held
                self.content.lstrip = True
                self.buf = self.buf[i + len(self.close) :] if marker == self.close else self.buf[i:]
                self.state = _State.CONTENT
            else:
                i = self.buf.find(self.open) if self.reopen else -1
                if i < 0:
                    reopenable = self.reopen and not final
                    keep = partial_suffix(self.buf, (self.open,)) if reopenable else 0
                    cut = len(self.buf) - keep
                    out.append(Delta(Channel.CONTENT, self.content.feed(self.buf[:cut])))
                    self.buf = self.buf[cut:]
                    return out
                out.append(Delta(Channel.CONTENT, self.content.feed(self.buf[:i])))
                self.buf = self.buf[i + len(self.open) :]
                self.state = _State.NAME if self.name else _State.REASONING


def think_splitter(*, inside: bool = False, implicit_end: tuple[str, ...] = ()) -> TagSplitter:
    """`<think>`...`</think>` (Qwen 3 / 3.5, Nemotron-H, DeepSeek-R1)."""
    return TagSplitter("<think>", "</think>", inside=inside, implicit_end=implicit_end)


def magistral_splitter(*, inside: bool = False) -> TagSplitter:
    """`[THINK]`...`[/THINK]` (Magistral; tokens of the v13 Tekken tokenizer)."""
    return TagSplitter("[THINK]", "[/THINK]", inside=inside, implicit_end=("[TOOL_CALLS]",))


def gemma4_splitter(*, inside: bool = False) -> TagSplitter:
    """Gemma 4's thought channel; a tool call opened while thinking ends the thought."""
    return TagSplitter(
        "<|channel>",
        "<channel|>",
        inside=inside,
        reopen=True,
        name="thought",
        implicit_end=("<|tool_call>",),
    )


# -- Harmony ----------------------------------------------------------------------------------

_START, _MESSAGE = "<|start|>", "<|message|>"
_BODY_ENDS = ("<|end|>", "<|call|>", "<|return|>", _START)
# What a header may begin with when `<|start|>assistant` was in the prompt (or left out).
_HEADER_STARTS = ("<|channel|>", "<|constrain|>", " to=", "to=", "assistant")
_CHANNEL_RE = re.compile(r"<\|channel\|>\s*([\w-]+)")
_RECIPIENT_RE = re.compile(r"to=([^\s<]+)")


class HarmonySplitter:
    """GPT-OSS Harmony messages routed by channel.

    `analysis` is reasoning; `final` and recipient-less `commentary` (tool preambles) are the
    answer; a message with a recipient (`to=functions.get_weather`, on either side of the
    channel) is a tool call, emitted once whole as `Delta(TOOL, body, recipient=name)` with
    `functions.` removed. `seeded`: the prompt ended with `<|start|>assistant`, so the output
    begins inside a header. Text that cannot be a header is treated as `final`, so a model that
    ignores the format still answers.
    """

    def __init__(self, *, seeded: bool = True) -> None:
        self.state = "header" if seeded else "between"
        self.after_start = False  # header opened by `<|start|>`: anything up to <|message|>
        self.buf = ""
        self.channel, self.recipient, self.tool_body = "final", "", ""

    def push(self, text: str) -> list[Delta]:
        self.buf += text
        return _merged(self._scan(final=False))

    def finish(self) -> list[Delta]:
        out = self._scan(final=True)
        if self.state == "header" and self.buf:
            out.append(Delta(Channel.CONTENT, self.buf))  # never became a header
        elif self.state == "body" and self.recipient:
            out.append(Delta(Channel.TOOL, self.tool_body, self.recipient))
        self.buf = ""
        return _merged(out)

    def _scan(self, final: bool) -> list[Delta]:
        out: list[Delta] = []
        while True:
            if self.state == "between":
                stripped = self.buf.lstrip()
                if stripped.startswith(_START):
                    self.buf, self.state, self.after_start = stripped[len(_START) :], "header", True
                elif not stripped or (_START.startswith(stripped) and not final):
                    return out
                else:
                    self.buf, self.state, self.after_start = stripped, "header", False
            elif self.state == "header":
                if not self.after_start:
                    stripped = self.buf.lstrip()
                    if not any(stripped.startswith(s) for s in _HEADER_STARTS):
                        if any(s.startswith(stripped) for s in _HEADER_STARTS) and not final:
                            return out
                        self._open("", "")  # plain text: the final answer
                        continue
                i = self.buf.find(_MESSAGE)
                if i < 0:
                    return out
                header, self.buf = self.buf[:i], self.buf[i + len(_MESSAGE) :]
                channel = _CHANNEL_RE.search(header)
                recipient = _RECIPIENT_RE.search(header)
                self._open(
                    channel.group(1) if channel else "final",
                    recipient.group(1) if recipient else "",
                )
            else:
                i, marker = find_first(self.buf, _BODY_ENDS)
                if i < 0:
                    keep = 0 if final else partial_suffix(self.buf, _BODY_ENDS)
                    self._body(self.buf[: len(self.buf) - keep], out)
                    self.buf = self.buf[len(self.buf) - keep :]
                    return out
                self._body(self.buf[:i], out)
                if self.recipient:
                    out.append(Delta(Channel.TOOL, self.tool_body, self.recipient))
                self.buf = self.buf[i + len(marker) :]
                self.state = "header" if marker == _START else "between"
                self.after_start = marker == _START

    def _open(self, channel: str, recipient: str) -> None:
        if recipient == "assistant":
            recipient = ""
        self.channel = channel or "final"
        self.recipient = recipient.removeprefix("functions.")
        self.tool_body, self.state = "", "body"

    def _body(self, text: str, out: list[Delta]) -> None:
        if self.recipient:
            self.tool_body += text
        elif self.channel == "analysis":
            out.append(Delta(Channel.REASONING, text))
        else:
            out.append(Delta(Channel.CONTENT, text))
