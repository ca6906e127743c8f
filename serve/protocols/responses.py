"""The OpenAI Responses dialect: `POST /v1/responses` and `POST /v1/responses/input_tokens`.

Stateless: every request carries the whole conversation in `input` (a string, or items:
messages with `input_text`/`output_text`/`input_image` parts, `function_call`,
`function_call_output`, `reasoning`), nothing is stored, and `previous_response_id` (which
needs a stored response) is a 400 that says so. The answer is a list of output items:
`reasoning` (the model's thinking as `reasoning_text`), `message` (`output_text`) and
`function_call` (with the `call_id` a later `function_call_output` answers).

Streams are SSE with named events in the order the `openai` SDK accumulates
(`response.created`, `response.in_progress`, then per item `output_item.added`,
`content_part.added`, deltas, `..._text.done`, `content_part.done`, `output_item.done`, and
last `response.completed`, or `response.incomplete` when `max_output_tokens` cut the answer),
each with a `sequence_number`. Errors outside a stream are OpenAI's
`{"error": {"message", "type", "param", "code"}}` (app.py renders `/v1/*` errors with the
OpenAI adapter's renderer, so this module has none of its own).
"""

from __future__ import annotations

import itertools
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import msgspec
from litestar import Request, Response, Router, post
from litestar.params import JSONBody

from serve.bodies import StrictBody, required
from serve.engine import EventKind, FinishReason, Stats, TokenEvent
from serve.errors import ApiError
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
from serve.translation.options import effort_of, openai_think
from serve.translation.reply import generation_failed
from serve.translation.tools import normalize_tools


class TextConfig(msgspec.Struct):
    format: dict[str, Any] | None = None  # {"type": "text" | "json_object" | "json_schema", ...}
    verbosity: str | None = None  # accepted; the model's length is its own


class ReasoningConfig(msgspec.Struct):
    effort: str | None = None  # "none" switches thinking off, any other level on
    summary: str | None = None  # accepted: reasoning comes whole, as reasoning_text


class ResponsesBody(msgspec.Struct, kw_only=True):
    model: str
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # extensions, as on /v1/chat/completions
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None  # accepted; a forced choice yields one call
    text: TextConfig | None = None
    reasoning: ReasoningConfig | None = None
    stream: bool = False
    store: bool | None = None  # accepted; nothing is ever stored
    previous_response_id: str | None = None
    conversation: str | dict[str, Any] | None = None
    background: bool | None = None
    metadata: dict[str, str] | None = None


def _new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(16)


# -- the request ---------------------------------------------------------------------------------


def _text_format(fmt: dict[str, Any] | None) -> OutputSpec | None:
    """`text.format`: text (None), json_object, or json_schema (flat: `name`, `schema`,
    `strict` beside `type`, not wrapped as in chat's `response_format`)."""
    if fmt is None or fmt.get("type", "text") == "text":
        return None
    if fmt["type"] == "json_object":
        return OutputSpec(param="text.format")
    if fmt["type"] != "json_schema":
        raise ApiError(400, f"text.format.type must be text, json_object or json_schema; got "
                       f"{fmt['type']!r}", "text.format.type")  # fmt: skip
    if not isinstance(fmt.get("schema"), dict):
        raise ApiError(400, "text.format.schema must be a JSON schema object", "text.format.schema")
    name = fmt.get("name") if isinstance(fmt.get("name"), str) else ""
    strict = fmt.get("strict") is True
    return OutputSpec(fmt["schema"], strict=strict, name=name, param="text.format.schema")


def _part(part: Any, param: str) -> dict[str, Any]:
    """One content part as the chat template's messages carry it: text, an image as OpenAI
    chat's `image_url` part (one image shape for every adapter), or an audio clip."""
    kind = part.get("type") if isinstance(part, dict) else None
    if kind in ("input_text", "output_text", "text", "refusal"):
        text = part.get("text", part.get("refusal"))
        if not isinstance(text, str):
            raise ApiError(400, f"{param}.text must be a string", f"{param}.text")
        return {"type": "text", "text": text}
    if kind == "input_image":
        url = part.get("image_url")
        if not isinstance(url, str) or not url:
            raise ApiError(400, "input_image needs image_url (a data: or http URL); file_id "
                           "refers to stored files, which this server does not keep",
                           param)  # fmt: skip
        return content_part({"type": "image_url", "image_url": {"url": url}}, param)
    if kind == "input_audio":  # {"input_audio": {"data": <base64>, "format": "wav"}}
        return content_part(part, param)
    raise ApiError(400, f"content part type {kind!r} is not supported (input_text, output_text, "
                   f"input_image, input_audio are)", f"{param}.type")  # fmt: skip


def _content(content: Any, param: str) -> str | list[dict[str, Any]]:
    """A message's or a tool output's content: a string, or parts (a string when all are
    text, so templates that concatenate content see plain text)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ApiError(400, f"{param} must be a string or a list of parts", param)
    parts = [_part(p, f"{param}[{i}]") for i, p in enumerate(content)]
    if all(p["type"] == "text" for p in parts):
        return "\n".join(p["text"] for p in parts)
    return parts


def _reasoning_text(item: dict[str, Any]) -> str:
    """An earlier `reasoning` item's text: its reasoning_text content, else its summary."""
    parts = item.get("content") or item.get("summary") or []
    return "".join(p.get("text", "") for p in parts if isinstance(p, dict))


def _messages(body: ResponsesBody) -> list[dict[str, Any]]:
    """`instructions` and `input` as chat messages: roles kept (`developer` is the system
    role), consecutive `function_call` items joined into one assistant turn's `tool_calls`,
    `function_call_output` as `tool` turns, and `reasoning` items as the next assistant turn's
    `reasoning_content` (for templates that replay it)."""
    msgs: list[dict[str, Any]] = []
    if body.instructions:
        msgs.append({"role": "system", "content": body.instructions})
    if isinstance(body.input, str):
        return [*msgs, {"role": "user", "content": body.input}]
    thought = ""
    for i, item in enumerate(body.input):
        param = f"input[{i}]"
        kind = item.get("type", "message") if isinstance(item, dict) else None
        if kind == "message":
            role = {"developer": "system"}.get(item.get("role"), item.get("role"))
            if role not in ("user", "assistant", "system"):
                raise ApiError(400, f"{param}.role must be user, assistant, system or developer",
                               f"{param}.role")  # fmt: skip
            msg = {"role": role, "content": _content(item.get("content"), f"{param}.content")}
            if role == "assistant" and thought:
                msg["reasoning_content"], thought = thought, ""
            msgs.append(msg)
        elif kind == "function_call":
            if not isinstance(item.get("call_id"), str) or not isinstance(item.get("name"), str):
                raise ApiError(400, f"{param} needs call_id and name", param)
            fn = {"name": item["name"], "arguments": item.get("arguments") or "{}"}
            last = msgs[-1] if msgs else None
            if last is None or last["role"] != "assistant":
                last = {"role": "assistant", "content": ""}
                if thought:
                    last["reasoning_content"], thought = thought, ""
                msgs.append(last)
            call = {"id": item["call_id"], "type": "function", "function": fn}
            last.setdefault("tool_calls", []).append(call)
        elif kind == "function_call_output":
            if not isinstance(item.get("call_id"), str):
                raise ApiError(400, f"{param}.call_id is required", f"{param}.call_id")
            content = _content(item.get("output"), f"{param}.output")
            msgs.append({"role": "tool", "tool_call_id": item["call_id"], "content": content})
        elif kind == "reasoning":
            thought += _reasoning_text(item)
        else:
            raise ApiError(400, f"input item type {kind!r} is not supported (message, "
                           f"function_call, function_call_output, reasoning are; this server "
                           f"stores nothing to reference)", f"{param}.type")  # fmt: skip
    return msgs


def _refuse_state(body: ResponsesBody) -> None:
    """What needs responses kept on the server: a clear 400 instead of a silent answer without
    the earlier turns."""
    for name, value in (("previous_response_id", body.previous_response_id),
                        ("conversation", body.conversation)):  # fmt: skip
        if value:
            raise ApiError(400, f"{name} is not supported: this server keeps no responses "
                           f"(stateless, as with store: false); send the whole conversation in "
                           f"input, earlier output items included", name)  # fmt: skip
    if body.background:
        raise ApiError(400, "background responses are not supported: this server keeps no "
                       "responses to poll; use stream: true", "background")  # fmt: skip


def _intent(body: ResponsesBody) -> Intent:
    _refuse_state(body)
    if body.max_output_tokens is not None and body.max_output_tokens < 1:
        raise ApiError(400, f"max_output_tokens must be at least 1, got {body.max_output_tokens}",
                       "max_output_tokens")  # fmt: skip
    effort = body.reasoning.effort if body.reasoning else None
    sampling = Sampling(temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                        min_p=body.min_p, repeat_penalty=body.repetition_penalty,
                        presence_penalty=body.presence_penalty,
                        frequency_penalty=body.frequency_penalty, seed=body.seed)  # fmt: skip
    return Intent(
        model=body.model,
        messages=_messages(body),
        sampling=sampling,
        max_tokens=body.max_output_tokens,
        tools=body.tools,
        tool_choice=body.tool_choice,
        output=_text_format(body.text.format if body.text else None),
        think=openai_think(None, effort, None),
        effort=effort_of(effort, "reasoning.effort"),
        stream=body.stream,
    )


# -- the answer as output items ------------------------------------------------------------------


class _Items:
    """Output items built from the output parser's events, as the stream events that build
    them and as the final `output` list: streamed and whole responses go through the same
    builder, so they always agree. Whitespace between items (after a reasoning block, before
    a call) is held back, and only becomes a message if text follows it."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []  # closed items, in output order
        self.open: dict[str, Any] | None = None  # the item being streamed
        self.text = ""  # the open item's text so far
        self.held = ""

    def feed(self, e: OutputEvent) -> list[dict[str, Any]]:
        """The stream events (without sequence numbers) for one parser event."""
        if isinstance(e, ReasoningDelta):
            return [*self._ensure("reasoning"), self._text("response.reasoning_text.delta", e.text)]
        if isinstance(e, ContentDelta):
            if self._kind() != "message" and not (self.held + e.text).strip():
                self.held += e.text
                return []
            out = self._ensure("message")
            text, self.held = self.held + e.text, ""
            return [*out, self._text("response.output_text.delta", text)]
        if isinstance(e, ToolCallStart):
            out = self._close("completed")
            self.held = ""  # whitespace before a call belongs to no item
            return [*out, *self._add({"id": _new_id("fc_"), "type": "function_call",
                                      "status": "in_progress", "call_id": e.id, "name": e.name,
                                      "arguments": ""})]  # fmt: skip
        if isinstance(e, ToolCallArgs) and self._kind() == "function_call":
            self.open["arguments"] += e.fragment  # type: ignore[index]
            return [{"type": "response.function_call_arguments.delta", **self._where(),
                     "delta": e.fragment}]  # fmt: skip
        if isinstance(e, ToolCallEnd) and self._kind() == "function_call":
            self.open["arguments"] = e.call.arguments_json  # type: ignore[index]
            return self._close("completed")
        return []  # MalformedCall: its text already came as content

    def finish(self, complete: bool) -> list[dict[str, Any]]:
        """Close the last item (`incomplete` when the token limit cut it); an answer with no
        item at all gets an empty message, so `output_text` is always there."""
        out: list[dict[str, Any]] = []
        if self.held or not (self.items or self.open):
            out += self._ensure("message")
            if self.held:
                out.append(self._text("response.output_text.delta", self.held))
                self.held = ""
        return out + self._close("completed" if complete else "incomplete")

    def _kind(self) -> str | None:
        return self.open["type"] if self.open else None

    def _where(self) -> dict[str, Any]:
        return {"item_id": self.open["id"], "output_index": len(self.items)}  # type: ignore[index]

    def _text(self, kind: str, text: str) -> dict[str, Any]:
        """A text delta of the open item (reasoning or message), kept for its final part."""
        self.text += text
        more = {"logprobs": []} if kind == "response.output_text.delta" else {}
        return {"type": kind, **self._where(), "content_index": 0, "delta": text, **more}

    def _add(self, item: dict[str, Any]) -> list[dict[str, Any]]:
        self.open, self.text = item, ""
        added = {"type": "response.output_item.added", "output_index": len(self.items),
                 "item": dict(item)}  # fmt: skip
        if item["type"] == "function_call":
            return [added]
        return [added, {"type": "response.content_part.added", **self._where(),
                        "content_index": 0, "part": _part_of(item["type"], "")}]  # fmt: skip

    def _ensure(self, kind: str) -> list[dict[str, Any]]:
        """Open an item of `kind` unless one is open (closing the item before it)."""
        if self._kind() == kind:
            return []
        out = self._close("completed")
        if kind == "reasoning":
            item = {"id": _new_id("rs_"), "type": "reasoning", "summary": [], "content": [],
                    "status": "in_progress"}  # fmt: skip
        else:
            item = {"id": _new_id("msg_"), "type": "message", "status": "in_progress",
                    "role": "assistant", "content": []}  # fmt: skip
        return out + self._add(item)

    def _close(self, status: str) -> list[dict[str, Any]]:
        """The events that finish the open item, which joins `items`."""
        item, self.open = self.open, None
        if item is None:
            return []
        where = {"item_id": item["id"], "output_index": len(self.items)}
        item = {**item, "status": status}
        out: list[dict[str, Any]] = []
        if item["type"] == "function_call":
            out.append({"type": "response.function_call_arguments.done", **where,
                        "name": item["name"], "arguments": item["arguments"]})  # fmt: skip
        else:
            part = _part_of(item["type"], self.text)
            item["content"] = [part]
            if item["type"] == "reasoning":
                done = {"type": "response.reasoning_text.done", "text": self.text}
            else:
                done = {"type": "response.output_text.done", "text": self.text, "logprobs": []}
            out += [{**done, **where, "content_index": 0},
                    {"type": "response.content_part.done", **where, "content_index": 0,
                     "part": part}]  # fmt: skip
        self.items.append(item)
        return [*out, {"type": "response.output_item.done", "output_index": where["output_index"],
                       "item": item}]  # fmt: skip


def _part_of(item_type: str, text: str) -> dict[str, Any]:
    if item_type == "reasoning":
        return {"type": "reasoning_text", "text": text}
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


# -- the response object -------------------------------------------------------------------------


class _Shape:
    """The fields of one response object that echo the request and the settings it ran with."""

    def __init__(self, body: ResponsesBody, prep: Prepared):
        self.id = _new_id("resp_")
        self.created = int(time.time())
        self.body, self.prep = body, prep
        self.reasoning_text = ""

    def response(
        self, status: str, output: list, stats: Stats | None = None, error: dict | None = None
    ) -> dict[str, Any]:
        b, sampling = self.body, self.prep.request.sampling
        fmt = (b.text.format if b.text else None) or {"type": "text"}
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "background": False,
            "error": error,
            "incomplete_details": {"reason": "max_output_tokens"}
            if status == "incomplete"
            else None,
            "instructions": b.instructions,
            "max_output_tokens": b.max_output_tokens,
            "model": self.prep.model.name,
            "output": output,
            "parallel_tool_calls": b.parallel_tool_calls is not False,
            "previous_response_id": None,
            "reasoning": {"effort": b.reasoning.effort if b.reasoning else None, "summary": None},
            "store": False,
            "temperature": sampling.temperature,
            "text": {"format": fmt},
            "tool_choice": b.tool_choice or "auto",
            "tools": _tools_echo(b.tools),
            "top_p": sampling.top_p,
            "truncation": "disabled",
            "usage": None if stats is None else self.usage(stats),
            "metadata": b.metadata or {},
        }

    def usage(self, s: Stats) -> dict[str, Any]:
        """Token counts. `reasoning_tokens`: the reasoning text re-tokenized (the engine counts
        tokens, the parser splits text), at most the output tokens."""
        tok = self.prep.model.tokenizer
        thought = self.reasoning_text
        reasoning = len(tok.encode(thought, add_bos=False, add_eos=False, parse_special=False))
        return {
            "input_tokens": s.prompt_tokens,
            "input_tokens_details": {"cached_tokens": s.cached_tokens, "cache_write_tokens": 0},
            "output_tokens": s.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": min(reasoning, s.completion_tokens)},
            "total_tokens": s.prompt_tokens + s.completion_tokens,
        }


def _tools_echo(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """The request's tools in the Responses shape (flat function tools)."""
    out = []
    for given, tool in zip(tools or [], normalize_tools(tools), strict=True):
        fn = tool["function"]
        out.append({"type": "function", "name": fn["name"], "description": fn.get("description"),
                    "parameters": fn["parameters"], "strict": given.get("strict")})  # fmt: skip
    return out


def _status(final: TokenEvent) -> str:
    return "incomplete" if final.finish_reason is FinishReason.LENGTH else "completed"


async def _stream(hub: Hub, shape: _Shape) -> AsyncIterator[dict[str, Any]]:
    """Every event of one streamed response, numbered in order."""
    seq = itertools.count()
    items, reply = _Items(), shape.prep.reply

    def numbered(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{**ev, "sequence_number": next(seq)} for ev in events]

    for kind in ("response.created", "response.in_progress"):
        yield {"type": kind, "response": shape.response("in_progress", []),
               "sequence_number": next(seq)}  # fmt: skip
    async with aclosing(hub.engine.generate(shape.prep.request)) as evs:  # type: ignore[union-attr]
        async for ev in evs:
            if ev.kind is EventKind.TOKEN:
                for e in reply.push(ev.text):
                    for out in numbered(items.feed(e)):
                        yield out
            elif ev.kind is EventKind.DONE:
                for e in reply.finish():
                    for out in numbered(items.feed(e)):
                        yield out
                status = _status(ev)
                for out in numbered(items.finish(status == "completed")):
                    yield out
                shape.reasoning_text = reply.reasoning
                problem = None if status == "incomplete" else reply.problem()
                if problem:  # the deltas are out: the failure is the last event
                    yield _failure(shape, seq, problem, items.items, ev.stats)
                else:
                    yield {"type": f"response.{status}", "sequence_number": next(seq),
                           "response": shape.response(status, items.items, ev.stats)}  # fmt: skip
            elif ev.kind is EventKind.ERROR:
                yield {"type": "error", "code": "server_error", "message": ev.error,
                       "param": None, "sequence_number": next(seq)}  # fmt: skip
                yield _failure(shape, seq, ev.error or "generation failed", items.items, ev.stats)


def _failure(shape: _Shape, seq: Any, message: str, output: list, stats: Stats | None) -> dict:
    error = {"code": "server_error", "message": message}
    return {"type": "response.failed", "sequence_number": next(seq),
            "response": shape.response("failed", output, stats, error)}  # fmt: skip


async def _whole(hub: Hub, shape: _Shape) -> dict[str, Any]:
    """A non-streamed response: the same items the stream would build. A failed generation is
    a 500; an answer that breaks the format or tool choice without being cut off is a 422
    (one cut off by max_output_tokens is `incomplete`, as OpenAI answers)."""
    text, final = await run_to_end(hub.engine, shape.prep.request)  # type: ignore[arg-type]
    if final.kind is EventKind.ERROR:
        raise generation_failed(hub, final)
    reply, items = shape.prep.reply, _Items()
    for e in reply.push(text) + reply.finish():
        items.feed(e)
    status = _status(final)
    items.finish(status == "completed")
    problem = None if status == "incomplete" else reply.problem()
    if problem:
        raise ApiError(422, problem)
    shape.reasoning_text = reply.reasoning
    return shape.response(status, items.items, final.stats)


@post("/v1/responses", status_code=200, dto=StrictBody[ResponsesBody], return_dto=None)
async def create_response(request: Request, data: JSONBody[ResponsesBody | None] = None) -> Any:
    hub, body = hub_of(request), required(data)
    shape = _Shape(body, await prepare(hub, _intent(body)))
    if body.stream:
        return typed_sse_response(_stream(hub, shape))
    return Response(await _whole(hub, shape))


@post("/v1/responses/input_tokens", status_code=200, dto=StrictBody[ResponsesBody],
      return_dto=None)  # fmt: skip
async def input_tokens(request: Request, data: JSONBody[ResponsesBody | None] = None) -> dict:
    """How many tokens the request's input (instructions, items, tools) takes as a prompt."""
    _, prompt = await render(hub_of(request), _intent(required(data)))
    return {"object": "response.input_tokens", "input_tokens": len(prompt.ids)}


router = Router(path="/", route_handlers=[create_response, input_tokens])
