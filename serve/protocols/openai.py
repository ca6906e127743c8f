"""The OpenAI dialect: /v1/chat/completions, /v1/completions, /v1/models (and one model).

Streams are SSE (`data: <json>` then `data: [DONE]`); errors are
`{"error": {"message", "type", "param", "code"}}`; usage reports cached prompt tokens in
`prompt_tokens_details.cached_tokens`.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from pathlib import Path
from typing import Any

import msgspec
from litestar import Request, Response, Router, get, post
from litestar.params import FromPath, JSONBody

from serve.bodies import StrictBody, required
from serve.engine import EventKind, FinishReason, GenerationRequest, Stats
from serve.errors import ApiError, ErrorKind
from serve.outputs import (
    ContentDelta,
    OutputEvent,
    ReasoningDelta,
    ToolCall,
    ToolCallArgs,
    ToolCallStart,
)
from serve.state import Hub, hub_of
from serve.streaming import DONE_SENTINEL, sse_response
from serve.translation import Intent, Prepared, Reply, Sampling, complete, prepare, run_to_end
from serve.translation.images import content_part
from serve.translation.options import openai_format, openai_think, stop_of
from serve.translation.prompt import check_model

_TYPES = {
    ErrorKind.INVALID_REQUEST: "invalid_request_error",
    ErrorKind.UNAUTHENTICATED: "invalid_request_error",  # with code invalid_api_key, as OpenAI
    ErrorKind.NOT_FOUND: "not_found_error",
    ErrorKind.INVALID_RESPONSE: "invalid_response_error",
    ErrorKind.UNAVAILABLE: "unavailable_error",
}


def render_error(_: Request, exc: ApiError) -> Response:
    """OpenAI's error shape, with `type` named from the error's kind as Ollama's /v1 does."""
    code = "invalid_api_key" if exc.kind is ErrorKind.UNAUTHENTICATED else None
    err = {"message": exc.message, "type": _error_type(exc.kind), "param": exc.param, "code": code}
    return Response({"error": err}, status_code=exc.status)


def _error_type(kind: ErrorKind) -> str:
    return _TYPES.get(kind, "api_error")


class StreamOptions(msgspec.Struct):
    include_usage: bool = False


class ChatMessage(msgspec.Struct, omit_defaults=True):
    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None  # earlier reasoning, for templates that replay it
    reasoning: str | None = None


class _Sampling(msgspec.Struct):
    """Fields both endpoints share. top_k, min_p and repetition_penalty are extensions."""

    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    n: int | None = None
    stop: str | list[str] | None | msgspec.UnsetType = msgspec.UNSET


class ChatBody(_Sampling, kw_only=True):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None  # accepted; a forced choice yields one call
    response_format: dict[str, Any] | None = None
    think: bool | None = None  # extension (the reference's name)
    reasoning_effort: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None


class CompletionBody(_Sampling, kw_only=True):
    prompt: str | list[str]


def _intent(body: _Sampling, max_tokens: int | None, **given: Any) -> Intent:
    """The fields both endpoints share; `given` are the endpoint's own."""
    if max_tokens is not None and max_tokens < 1:
        raise ApiError(400, f"max_tokens must be at least 1, got {max_tokens}", "max_tokens")
    sampling = Sampling(
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        min_p=body.min_p,
        repeat_penalty=body.repetition_penalty,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        seed=body.seed,
    )
    return Intent(model=body.model, sampling=sampling, max_tokens=max_tokens,
                  stop=stop_of(body.stop), n=1 if body.n is None else body.n,
                  stream=body.stream, **given)  # fmt: skip


def _usage(stats: Stats | None) -> dict[str, Any]:
    s = stats or Stats()
    return {
        "prompt_tokens": s.prompt_tokens,
        "completion_tokens": s.completion_tokens,
        "total_tokens": s.prompt_tokens + s.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": s.cached_tokens},
    }


def _finish(reason: FinishReason | None) -> str:
    return "length" if reason is FinishReason.LENGTH else "stop"


class _Shape:
    """What differs between chat and text completions: object names and the choice body."""

    def __init__(self, chat: bool, model: str):
        self.chat = chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.model = model

    def envelope(self, choices: list[dict[str, Any]], chunk: bool) -> dict[str, Any]:
        kind = "chat.completion" if self.chat else "text_completion"
        obj = f"{kind}.chunk" if chunk and self.chat else kind
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "choices": choices}  # fmt: skip

    def choice(self, text: str | None, finish: str | None, *, delta: bool, role=False) -> dict:
        if not self.chat:
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        key = "delta" if delta else "message"
        msg: dict[str, Any] = {"role": "assistant"} if role or not delta else {}
        if text is not None:
            msg["content"] = text
        return {"index": 0, key: msg, "logprobs": None, "finish_reason": finish}


async def _sse(hub: Hub, req: GenerationRequest, shape: _Shape, include_usage: bool):
    """Role-first chunk, content deltas, a finish chunk, optional usage chunk, [DONE]."""
    if shape.chat:
        yield shape.envelope([shape.choice("", None, delta=True, role=True)], chunk=True)
    async with aclosing(hub.engine.generate(req)) as evs:  # type: ignore[union-attr]
        async for ev in evs:
            if ev.kind is EventKind.TOKEN and ev.text:
                yield shape.envelope([shape.choice(ev.text, None, delta=True)], chunk=True)
            elif ev.kind is EventKind.DONE:
                fin = shape.choice(None, _finish(ev.finish_reason), delta=True)
                yield shape.envelope([fin], chunk=True)
                if include_usage:
                    yield shape.envelope([], chunk=True) | {"usage": _usage(ev.stats)}
            elif ev.kind is EventKind.ERROR:
                yield _stream_error(ev.error, ErrorKind.INTERNAL)
    yield DONE_SENTINEL


async def _respond(hub: Hub, req: GenerationRequest, body: _Sampling, chat: bool) -> Response:
    shape = _Shape(chat, hub.model.name)  # type: ignore[union-attr]
    if body.stream:
        usage = bool(body.stream_options and body.stream_options.include_usage)
        source: AsyncIterator[Any] = _sse(hub, req, shape, usage)
        return sse_response(source)
    text, final = await run_to_end(hub.engine, req)  # type: ignore[arg-type]
    if final.kind is EventKind.ERROR:
        raise ApiError(500, final.error or "generation failed")
    choice = shape.choice(text, _finish(final.finish_reason), delta=False)
    return Response(shape.envelope([choice], chunk=False) | {"usage": _usage(final.stats)})


def _stream_error(message: str | None, kind: ErrorKind) -> dict[str, Any]:
    """An error frame inside an SSE stream (headers are already sent: no status code)."""
    return {"error": {"message": message, "type": _error_type(kind), "param": None, "code": None}}


def _tool_call(call: ToolCall) -> dict[str, Any]:
    return {"id": call.id, "type": "function",
            "function": {"name": call.name, "arguments": call.arguments_json}}  # fmt: skip


def _delta(e: OutputEvent) -> dict[str, Any] | None:
    """One parser event as a chat delta: reasoning under both names clients read
    (`reasoning_content`: llama.cpp/SGLang/vLLM; `reasoning`: Ollama/new vLLM), content, and
    tool calls keyed by `index` (the first delta of a call carries id, type and name)."""
    if isinstance(e, ReasoningDelta):
        return {"reasoning_content": e.text, "reasoning": e.text}
    if isinstance(e, ContentDelta):
        return {"content": e.text}
    if isinstance(e, ToolCallStart):
        call = {"index": e.index, "id": e.id, "type": "function",
                "function": {"name": e.name, "arguments": ""}}  # fmt: skip
        return {"tool_calls": [call]}
    if isinstance(e, ToolCallArgs):
        return {"tool_calls": [{"index": e.index, "function": {"arguments": e.fragment}}]}
    return None  # ToolCallEnd (already streamed) and MalformedCall (its text went as content)


def _chat_finish(reply: Reply, reason: FinishReason | None) -> str:
    return "tool_calls" if reply.calls else _finish(reason)


def _chunk(shape: _Shape, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    return shape.envelope([choice], chunk=True)


async def _chat_sse(
    hub: Hub, req: GenerationRequest, shape: _Shape, reply: Reply, include_usage: bool
) -> AsyncIterator[Any]:
    """Role chunk, one delta per parser event, the finish chunk, usage if asked, [DONE]. A
    structured answer that fails its schema (only possible when cut off) ends with an error
    event before [DONE]: the deltas were already sent, so a 422 is no longer possible."""
    yield _chunk(shape, {"role": "assistant", "content": ""})
    async with aclosing(hub.engine.generate(req)) as evs:  # type: ignore[union-attr]
        async for ev in evs:
            if ev.kind is EventKind.TOKEN:
                for e in reply.push(ev.text):
                    if (delta := _delta(e)) is not None:
                        yield _chunk(shape, delta)
            elif ev.kind is EventKind.DONE:
                for e in reply.finish():
                    if (delta := _delta(e)) is not None:
                        yield _chunk(shape, delta)
                problem = reply.problem(ev.finish_reason is FinishReason.LENGTH)
                if problem:
                    yield _stream_error(problem, ErrorKind.INVALID_RESPONSE)
                yield _chunk(shape, {}, _chat_finish(reply, ev.finish_reason))
                if include_usage:
                    yield shape.envelope([], chunk=True) | {"usage": _usage(ev.stats)}
            elif ev.kind is EventKind.ERROR:
                yield _stream_error(ev.error, ErrorKind.INTERNAL)
    yield DONE_SENTINEL


def _message(reply: Reply) -> dict[str, Any]:
    """The whole answer: content (null only beside tool calls, as OpenAI sends it),
    reasoning under both names, tool calls with JSON-string arguments."""
    msg: dict[str, Any] = {"role": "assistant",
                           "content": reply.content or (None if reply.calls else "")}  # fmt: skip
    if reply.reasoning:
        msg["reasoning_content"] = msg["reasoning"] = reply.reasoning
    if reply.calls:
        msg["tool_calls"] = [_tool_call(c) for c in reply.calls]
    return msg


async def _chat_respond(hub: Hub, prep: Prepared, body: ChatBody) -> Response:
    req, reply = prep.request, prep.reply
    shape = _Shape(True, prep.model.name)
    if body.stream:
        usage = bool(body.stream_options and body.stream_options.include_usage)
        return sse_response(_chat_sse(hub, req, shape, reply, usage))
    final = await complete(hub, req, reply)
    choice = {"index": 0, "message": _message(reply), "logprobs": None,
              "finish_reason": _chat_finish(reply, final.finish_reason)}  # fmt: skip
    return Response(shape.envelope([choice], chunk=False) | {"usage": _usage(final.stats)})


def _message_in(m: ChatMessage, i: int) -> dict[str, Any]:
    """A message for the template, its image parts decoded (data URLs) in their places."""
    msg = msgspec.structs.asdict(m)
    if isinstance(m.content, list):
        msg["content"] = [content_part(p, f"messages[{i}].content[{j}]")
                          for j, p in enumerate(m.content)]  # fmt: skip
    return msg


def _chat_intent(body: ChatBody) -> Intent:
    """The chat request in neutral terms. Extra template variables: `chat_template_kwargs`,
    and `reasoning_effort` for templates that read it."""
    extra = dict(body.chat_template_kwargs or {})
    extra.pop("enable_thinking", None)
    if body.reasoning_effort and body.reasoning_effort.lower() != "none":
        extra.setdefault("reasoning_effort", body.reasoning_effort)
    limit = body.max_completion_tokens if body.max_tokens is None else body.max_tokens
    return _intent(
        body,
        limit,
        messages=[_message_in(m, i) for i, m in enumerate(body.messages)],
        tools=body.tools,
        tool_choice=body.tool_choice,
        think=openai_think(body.think, body.reasoning_effort, body.chat_template_kwargs),
        output=openai_format(body.response_format),
        template_kwargs=extra,
    )


@post("/v1/chat/completions", status_code=200, dto=StrictBody[ChatBody], return_dto=None)
async def chat_completions(request: Request, data: JSONBody[ChatBody | None] = None) -> Response:
    hub, body = hub_of(request), required(data)
    prep = await prepare(hub, _chat_intent(body))
    return await _chat_respond(hub, prep, body)


def _completion_intent(body: CompletionBody) -> Intent:
    prompt = body.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise ApiError(400, "exactly one prompt is supported", param="prompt")
        prompt = prompt[0]
    return _intent(body, body.max_tokens, prompt=prompt)


@post("/v1/completions", status_code=200, dto=StrictBody[CompletionBody], return_dto=None)
async def completions(request: Request, data: JSONBody[CompletionBody | None] = None) -> Response:
    hub, body = hub_of(request), required(data)
    prep = await prepare(hub, _completion_intent(body))
    return await _respond(hub, prep.request, body, chat=False)


def _model_entry(path: Path) -> dict[str, Any]:
    return {"id": path.stem, "object": "model", "created": int(path.stat().st_mtime),
            "owned_by": "local"}  # fmt: skip


@get("/v1/models")
async def models(request: Request) -> dict[str, Any]:
    hub = hub_of(request)
    if hub.model is None:
        return {"object": "list", "data": []}
    return {"object": "list", "data": [_model_entry(hub.model.path)]}


@get("/v1/models/{model:str}")
async def model(request: Request, model: FromPath[str]) -> dict[str, Any]:
    """The hosted model under any name it answers to (its id is the file's stem); a 404 for
    any other (a 503 while loading, when the names are not known yet)."""
    hosted, _ = hub_of(request).live()
    check_model(model, hosted)
    return _model_entry(hosted.path)


router = Router(
    path="/",
    route_handlers=[chat_completions, completions, models, model],
    exception_handlers={ApiError: render_error},
)
