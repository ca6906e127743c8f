"""The Anthropic Messages dialect: `POST /v1/messages` and `POST /v1/messages/count_tokens`.

Requests carry `system` (a string or text blocks) and `messages` whose content is a string or
blocks: `text`, `image` (base64 or URL; carried as OpenAI chat's `image_url` part, the one
image shape every adapter hands the prompt), `tool_use`, `tool_result` (string or block
content, `is_error`), `thinking`. Answers are content blocks (`thinking` with a `signature`,
`text`, `tool_use` with a `toolu_` id and an `input` object), a `stop_reason` (`end_turn`,
`max_tokens`, `stop_sequence` with the `stop_sequence` that matched, `tool_use`,
`model_context_window_exceeded`) and `usage` with the prompt tokens read from the prefix cache
as `cache_read_input_tokens`.

Streams are SSE with named events: `message_start`, `ping`, per block `content_block_start`,
`content_block_delta` (`text_delta`, `thinking_delta`, `signature_delta`, `input_json_delta`),
`content_block_stop`, then `message_delta` (stop reason, final usage) and `message_stop`.
Errors are `{"type": "error", "error": {"type", "message"}}`, also as an `error` event inside
a stream.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import msgspec
from litestar import Request, Response, Router, post
from litestar.params import JSONBody

from serve.bodies import StrictBody, required
from serve.engine import EventKind, FinishReason, Stats, TokenEvent
from serve.errors import ApiError, ErrorKind
from serve.outputs import (
    ContentDelta,
    OutputEvent,
    ReasoningDelta,
    ToolCallArgs,
    ToolCallEnd,
    ToolCallStart,
)
from serve.state import Hub, hub_of
from serve.streaming import typed_sse_response
from serve.translation import Intent, OutputSpec, Prepared, Sampling, prepare, render, run_to_end
from serve.translation.images import content_part
from serve.translation.options import effort_of
from serve.translation.reply import generation_failed

# Anthropic's error types and the statuses its API sends them with (an unavailable model is
# Anthropic's `overloaded_error`, status 529, which its clients retry).
_ERRORS = {
    ErrorKind.INVALID_REQUEST: ("invalid_request_error", 400),
    ErrorKind.UNAUTHENTICATED: ("authentication_error", 401),
    ErrorKind.FORBIDDEN: ("permission_error", 403),
    ErrorKind.NOT_FOUND: ("not_found_error", 404),
    ErrorKind.TOO_LARGE: ("request_too_large", 413),
    ErrorKind.UNAVAILABLE: ("overloaded_error", 529),
}


def _error(kind: ErrorKind, message: str) -> dict[str, Any]:
    name = _ERRORS.get(kind, ("api_error", 500))[0]
    return {"type": "error", "error": {"type": name, "message": message}}


def render_error(_: Request, exc: ApiError) -> Response:
    """Anthropic's error shape; an unavailable model is Anthropic's 529, every other status is
    kept (a 415 or 405 stays what it is, typed as an invalid request)."""
    status = _ERRORS[exc.kind][1] if exc.kind is ErrorKind.UNAVAILABLE else exc.status
    return Response(_error(exc.kind, exc.message), status_code=status)


class Message(msgspec.Struct):
    role: str
    content: str | list[dict[str, Any]]


class ThinkingConfig(msgspec.Struct):
    type: str  # "enabled" (with budget_tokens), "adaptive": thinking on; "disabled": off
    budget_tokens: int | None = None  # accepted; max_tokens bounds the whole answer


class OutputConfig(msgspec.Struct):
    format: dict[str, Any] | None = None  # {"type": "json_schema", "schema": {...}}
    effort: str | None = None  # the reasoning effort (`Intent.effort`)


class CountBody(msgspec.Struct, kw_only=True):
    """What `count_tokens` reads: everything that makes the prompt."""

    model: str
    messages: list[Message]
    system: str | list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    thinking: ThinkingConfig | None = None
    output_config: OutputConfig | None = None


class MessagesBody(CountBody, kw_only=True):
    max_tokens: int
    stop_sequences: list[str] | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stream: bool = False
    metadata: dict[str, Any] | None = None


# -- the request ---------------------------------------------------------------------------------


def _image(block: dict[str, Any], param: str) -> dict[str, Any]:
    """An image block as OpenAI chat's `image_url` part (a data: URL for base64 sources)."""
    src = block.get("source")
    if isinstance(src, dict) and src.get("type") == "base64" and isinstance(src.get("data"), str):
        url = f"data:{src.get('media_type', 'image/png')};base64,{src['data']}"
    elif isinstance(src, dict) and src.get("type") == "url" and isinstance(src.get("url"), str):
        url = src["url"]
    else:
        raise ApiError(400, "an image block needs a base64 or url source", f"{param}.source")
    return content_part({"type": "image_url", "image_url": {"url": url}}, param)


def _part(block: dict[str, Any], param: str) -> dict[str, Any]:
    """A text or image block of a user turn or a tool result, as a chat content part."""
    kind = block.get("type")
    if kind == "text" and isinstance(block.get("text"), str):
        return {"type": "text", "text": block["text"]}
    if kind == "image":
        return _image(block, param)
    src = block.get("source")
    if kind == "document" and isinstance(src, dict) and src.get("type") == "text":
        return {"type": "text", "text": str(src.get("data", ""))}
    raise ApiError(400, f"content block type {kind!r} is not supported here (text, image, "
                   f"text documents, tool_result are)", f"{param}.type")  # fmt: skip


def _joined(parts: list[dict[str, Any]]) -> str | list[dict[str, Any]]:
    """Parts as a string when all are text (templates concatenate content), else the list."""
    if all(p["type"] == "text" for p in parts):
        return "\n".join(p["text"] for p in parts)
    return parts


def _blocks(content: str | list[dict[str, Any]], param: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    for i, block in enumerate(content):
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            raise ApiError(400, f"{param}[{i}] must be a content block with a type", param)
    return content


def _tool_result(block: dict[str, Any], param: str) -> dict[str, Any]:
    """A `tool_result` block as a `tool` turn; an error result says so in its text, the only
    place a chat template shows the model."""
    if not isinstance(block.get("tool_use_id"), str):
        raise ApiError(400, f"{param}.tool_use_id is required", f"{param}.tool_use_id")
    given = block.get("content", "")
    parts = [_part(b, f"{param}.content[{j}]") for j, b in enumerate(_blocks(given, param))]
    content = _joined(parts)
    if block.get("is_error") and isinstance(content, str):
        content = f"Error: {content}"
    return {"role": "tool", "tool_call_id": block["tool_use_id"], "content": content}


def _user_turns(blocks: list[dict[str, Any]], param: str) -> list[dict[str, Any]]:
    """One user message: its tool results as `tool` turns, its other blocks as user turns,
    in the order sent."""
    out: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    for j, block in enumerate(blocks):
        where = f"{param}[{j}]"
        if block["type"] == "tool_result":
            if parts:
                out.append({"role": "user", "content": _joined(parts)})
                parts = []
            out.append(_tool_result(block, where))
        else:
            parts.append(_part(block, where))
    if parts or not out:
        out.append({"role": "user", "content": _joined(parts) if parts else ""})
    return out


def _assistant_turn(blocks: list[dict[str, Any]], param: str) -> dict[str, Any]:
    """An assistant message: text, `thinking` as `reasoning_content` (templates that replay
    reasoning read it), `tool_use` as `tool_calls` with their input objects."""
    texts, thoughts, calls = [], [], []
    for j, block in enumerate(blocks):
        kind = block["type"]
        if kind == "text":
            texts.append(block.get("text", ""))
        elif kind == "thinking":
            thoughts.append(block.get("thinking", ""))
        elif kind == "tool_use":
            if not isinstance(block.get("id"), str) or not isinstance(block.get("name"), str):
                raise ApiError(400, f"{param}[{j}] needs id and name", f"{param}[{j}]")
            fn = {"name": block["name"], "arguments": block.get("input") or {}}
            calls.append({"id": block["id"], "type": "function", "function": fn})
        elif kind != "redacted_thinking":  # opaque: nothing a template could show
            raise ApiError(400, f"content block type {kind!r} is not supported in an "
                           f"assistant turn", f"{param}[{j}].type")  # fmt: skip
    msg: dict[str, Any] = {"role": "assistant", "content": "".join(texts)}
    if thoughts:
        msg["reasoning_content"] = "".join(thoughts)
    if calls:
        msg["tool_calls"] = calls
    return msg


def _messages(body: CountBody) -> list[dict[str, Any]]:
    msgs: list[dict[str, Any]] = []
    system = body.system
    if isinstance(system, list):
        system = "\n".join(str(b.get("text", "")) for b in system if isinstance(b, dict))
    if system:
        msgs.append({"role": "system", "content": system})
    for i, m in enumerate(body.messages):
        param = f"messages[{i}]"
        blocks = _blocks(m.content, f"{param}.content")
        if m.role == "user":
            msgs += _user_turns(blocks, f"{param}.content")
        elif m.role == "assistant":
            msgs.append(_assistant_turn(blocks, f"{param}.content"))
        else:
            raise ApiError(400, f"{param}.role must be user or assistant (system goes in the "
                           f"top-level system field)", f"{param}.role")  # fmt: skip
    return msgs


def _tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """Client tools (`name`, `description`, `input_schema`) as function tools. Anthropic's
    server tools (web search, code execution, ...) run on Anthropic's side: a 400 here."""
    if tools is None:
        return None
    out = []
    for i, tool in enumerate(tools):
        if tool.get("type", "custom") != "custom":
            raise ApiError(400, f"tools[{i}]: tool type {tool['type']!r} runs on Anthropic's "
                           f"servers and is not available here; declare client tools with "
                           f"name and input_schema", f"tools[{i}].type")  # fmt: skip
        fn = {"name": tool.get("name"), "description": tool.get("description"),
              "parameters": tool.get("input_schema")}  # fmt: skip
        out.append({"type": "function", "function": {k: v for k, v in fn.items() if v}})
    return out


def _tool_choice(choice: dict[str, Any] | None) -> str | dict[str, Any] | None:
    """`auto`, `any` (some tool: "required"), `tool` (that one), `none`."""
    if choice is None:
        return None
    kind = choice.get("type")
    if kind in ("auto", "none"):
        return kind
    if kind == "any":
        return "required"
    if kind == "tool" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise ApiError(400, 'tool_choice must be {"type": "auto" | "any" | "none"} or '
                   '{"type": "tool", "name": ...}', "tool_choice")  # fmt: skip


def _think(thinking: ThinkingConfig | None) -> bool | None:
    if thinking is None:
        return None  # the chat template's own default
    if thinking.type in ("enabled", "adaptive"):
        return True
    if thinking.type == "disabled":
        return False
    raise ApiError(400, f"thinking.type must be enabled, adaptive or disabled; got "
                   f"{thinking.type!r}", "thinking.type")  # fmt: skip


def _effort(config: OutputConfig | None) -> str | None:
    """`output_config.effort` ("low", "medium", "high", "max") for templates that read
    `reasoning_effort` (GPT-OSS's Harmony prompt); the thinking switch stays `thinking`'s."""
    return effort_of(config.effort if config else None, "output_config.effort")


def _output(config: OutputConfig | None) -> OutputSpec | None:
    fmt = config.format if config else None
    if fmt is None:
        return None
    if fmt.get("type") != "json_schema" or not isinstance(fmt.get("schema"), dict):
        raise ApiError(400, 'output_config.format must be {"type": "json_schema", "schema": '
                       '{...}}', "output_config.format")  # fmt: skip
    return OutputSpec(fmt["schema"], strict=True, param="output_config.format.schema")


def _intent(body: CountBody) -> Intent:
    config = body.output_config
    intent = Intent(model=body.model, messages=_messages(body), tools=_tools(body.tools),
                    tool_choice=_tool_choice(body.tool_choice), think=_think(body.thinking),
                    effort=_effort(config), output=_output(config))  # fmt: skip
    if isinstance(body, MessagesBody):
        if body.max_tokens < 1:
            raise ApiError(400, f"max_tokens must be at least 1, got {body.max_tokens}",
                           "max_tokens")  # fmt: skip
        intent.sampling = Sampling(temperature=body.temperature, top_p=body.top_p,
                                   top_k=body.top_k)  # fmt: skip
        intent.max_tokens = body.max_tokens
        if body.stop_sequences is not None:
            intent.stop = tuple(s for s in body.stop_sequences if s)
        intent.stream = body.stream
    return intent


# -- the answer as content blocks ----------------------------------------------------------------


def signature(thinking: str) -> str:
    """A thinking block's `signature`: the SHA-256 of its text, base64. Anthropic's are opaque
    and verified server-side; clients only replay them, and drop thinking blocks that have
    none, so every block gets one bound to its text."""
    return base64.b64encode(hashlib.sha256(thinking.encode()).digest()).decode()


def _tool_use_id(call_id: str) -> str:
    return "toolu_" + call_id.removeprefix("call_")


class _Blocks:
    """Content blocks built from the output parser's events, as the stream events that build
    them and as the final `content` list (streamed and whole answers share this builder).
    Whitespace between blocks is held back and only becomes text if text follows it."""

    def __init__(self) -> None:
        self.blocks: list[dict[str, Any]] = []
        self.open: dict[str, Any] | None = None
        self.args = ""  # the open tool_use block's argument JSON so far
        self.held = ""

    def feed(self, e: OutputEvent) -> list[dict[str, Any]]:
        if isinstance(e, ReasoningDelta):
            out = self._ensure({"type": "thinking", "thinking": "", "signature": ""})
            self.open["thinking"] += e.text  # type: ignore[index]
            return [*out, self._delta({"type": "thinking_delta", "thinking": e.text})]
        if isinstance(e, ContentDelta):
            if self._kind() != "text" and not (self.held + e.text).strip():
                self.held += e.text
                return []
            out = self._ensure({"type": "text", "text": ""})
            text, self.held = self.held + e.text, ""
            self.open["text"] += text  # type: ignore[index]
            return [*out, self._delta({"type": "text_delta", "text": text})]
        if isinstance(e, ToolCallStart):
            self.held = ""
            block = {"type": "tool_use", "id": _tool_use_id(e.id), "name": e.name, "input": {}}
            return [*self._close(), *self._start(block)]
        if isinstance(e, ToolCallArgs) and self._kind() == "tool_use":
            self.args += e.fragment
            return [self._delta({"type": "input_json_delta", "partial_json": e.fragment})]
        if isinstance(e, ToolCallEnd) and self._kind() == "tool_use":
            self.open["input"] = e.call.arguments  # type: ignore[index]
            return self._close()
        return []  # MalformedCall: its text already came as content

    def finish(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if self.held:
            out += self._ensure({"type": "text", "text": ""})
            self.open["text"] += self.held  # type: ignore[index]
            out.append(self._delta({"type": "text_delta", "text": self.held}))
            self.held = ""
        return out + self._close()

    def _kind(self) -> str | None:
        return self.open["type"] if self.open else None

    def _delta(self, delta: dict[str, Any]) -> dict[str, Any]:
        return {"type": "content_block_delta", "index": len(self.blocks), "delta": delta}

    def _start(self, block: dict[str, Any]) -> list[dict[str, Any]]:
        self.open, self.args = block, ""
        return [{"type": "content_block_start", "index": len(self.blocks),
                 "content_block": dict(block)}]  # fmt: skip

    def _ensure(self, empty: dict[str, Any]) -> list[dict[str, Any]]:
        if self._kind() == empty["type"]:
            return []
        return [*self._close(), *self._start(empty)]

    def _close(self) -> list[dict[str, Any]]:
        block, self.open = self.open, None
        if block is None:
            return []
        index = len(self.blocks)
        out = []
        if block["type"] == "thinking":
            block["signature"] = signature(block["thinking"])
            out.append(self._delta({"type": "signature_delta", "signature": block["signature"]}))
        self.blocks.append(block)
        return [*out, {"type": "content_block_stop", "index": index}]


# -- the message ---------------------------------------------------------------------------------


def _stop_reason(blocks: list[dict[str, Any]], final: TokenEvent, max_tokens: int) -> str:
    if any(b["type"] == "tool_use" for b in blocks):
        return "tool_use"
    if final.finish_reason is FinishReason.LENGTH:
        done = final.stats.completion_tokens if final.stats else 0
        return "max_tokens" if done >= max_tokens else "model_context_window_exceeded"
    return "stop_sequence" if final.stop_sequence else "end_turn"


def _usage(s: Stats | None) -> dict[str, Any]:
    """Anthropic counts prompt tokens in three parts that sum to the prompt: read from the
    cache, written to it at a `cache_control` breakpoint (none here: the prefix cache needs
    no breakpoints), and the rest (`input_tokens`)."""
    s = s or Stats()
    return {"input_tokens": s.prompt_tokens - s.cached_tokens, "output_tokens": s.completion_tokens,
            "cache_read_input_tokens": s.cached_tokens,
            "cache_creation_input_tokens": 0}  # fmt: skip


class _Shape:
    def __init__(self, body: MessagesBody, prep: Prepared):
        self.id = "msg_" + secrets.token_hex(12)
        self.body, self.prep = body, prep

    def message(self, content: list, final: TokenEvent | None) -> dict[str, Any]:
        """The message object: whole (final given) or as `message_start` announces it."""
        if final is None:
            usage = {"input_tokens": len(self.prep.prompt.ids), "output_tokens": 0}
            reason, stop = None, None
        else:
            usage = _usage(final.stats)
            reason = _stop_reason(content, final, self.body.max_tokens)
            stop = final.stop_sequence if reason == "stop_sequence" else None
        return {"id": self.id, "type": "message", "role": "assistant",
                "model": self.prep.model.name, "content": content, "stop_reason": reason,
                "stop_sequence": stop, "usage": usage}  # fmt: skip


async def _stream(hub: Hub, shape: _Shape) -> AsyncIterator[dict[str, Any]]:
    blocks, reply = _Blocks(), shape.prep.reply
    yield {"type": "message_start", "message": shape.message([], None)}
    yield {"type": "ping"}
    async with aclosing(hub.engine.generate(shape.prep.request)) as evs:  # type: ignore[union-attr]
        async for ev in evs:
            if ev.kind is EventKind.QUEUED:
                yield {"type": "ping"}  # waiting for a cache row: keep the connection alive
            elif ev.kind is EventKind.TOKEN:
                for e in reply.push(ev.text):
                    for out in blocks.feed(e):
                        yield out
            elif ev.kind is EventKind.DONE:
                for e in reply.finish():
                    for out in blocks.feed(e):
                        yield out
                for out in blocks.finish():
                    yield out
                truncated = ev.finish_reason is FinishReason.LENGTH
                problem = None if truncated else reply.problem()
                if problem:  # the blocks are out: the failure is the last event
                    yield _error(ErrorKind.INVALID_RESPONSE, problem)
                    return
                message = shape.message(blocks.blocks, ev)
                delta = {k: message[k] for k in ("stop_reason", "stop_sequence")}
                yield {"type": "message_delta", "delta": delta, "usage": message["usage"]}
                yield {"type": "message_stop"}
            elif ev.kind is EventKind.ERROR:
                yield _error(ErrorKind.INTERNAL, ev.error or "generation failed")


async def _whole(hub: Hub, shape: _Shape) -> dict[str, Any]:
    """A non-streamed answer: the blocks the stream would build. A failed generation is a
    500; an answer that breaks the format or tool choice without being cut off by max_tokens
    is a 422."""
    text, final = await run_to_end(hub.engine, shape.prep.request)  # type: ignore[arg-type]
    if final.kind is EventKind.ERROR:
        raise generation_failed(hub, final)
    reply, blocks = shape.prep.reply, _Blocks()
    for e in reply.push(text) + reply.finish():
        blocks.feed(e)
    blocks.finish()
    if final.finish_reason is not FinishReason.LENGTH and (problem := reply.problem()):
        raise ApiError(422, problem)
    return shape.message(blocks.blocks, final)


@post("/v1/messages", status_code=200, dto=StrictBody[MessagesBody], return_dto=None)
async def create_message(request: Request, data: JSONBody[MessagesBody | None] = None) -> Any:
    hub, body = hub_of(request), required(data)
    shape = _Shape(body, await prepare(hub, _intent(body)))
    if body.stream:
        return typed_sse_response(_stream(hub, shape))
    return Response(await _whole(hub, shape))


@post("/v1/messages/count_tokens", status_code=200, dto=StrictBody[CountBody], return_dto=None)
async def count_tokens(request: Request, data: JSONBody[CountBody | None] = None) -> dict:
    """The prompt's token count (system, messages, tools, thinking as they render)."""
    _, prompt = await render(hub_of(request), _intent(required(data)))
    return {"input_tokens": len(prompt.ids)}


router = Router(
    path="/",
    route_handlers=[create_message, count_tokens],
    exception_handlers={ApiError: render_error},
)
