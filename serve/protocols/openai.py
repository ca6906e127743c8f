"""The OpenAI dialect: /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/models (and
one model).

Streams are SSE (`data: <json>` then `data: [DONE]`); errors are
`{"error": {"message", "type", "param", "code"}}`; usage reports cached prompt tokens in
`prompt_tokens_details.cached_tokens`. `n` answers are `choices[i]` (streamed chunks carry
their `index`); usage counts the prompt once and the answers' tokens together.
"""

from __future__ import annotations

import base64
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
from serve.engine import EventKind, FinishReason, Stats
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
from serve.translation import (
    Answer,
    Intent,
    Prepared,
    Reply,
    Sampling,
    complete_all,
    prepare,
    run_answers,
)
from serve.translation.embedding import embed, normalized
from serve.translation.images import content_part
from serve.translation.logprobs import entries, token_text, top_count
from serve.translation.options import effort_of, openai_format, openai_think, stop_of
from serve.translation.prompt import check_model
from serve.translation.reply import generation_failed
from tsjax.logprobs import TokenLogprob
from tsjax.tokenizer import Tokenizer

_TYPES = {
    ErrorKind.INVALID_REQUEST: "invalid_request_error",
    ErrorKind.UNAUTHENTICATED: "invalid_request_error",  # with code invalid_api_key, as OpenAI
    ErrorKind.FORBIDDEN: "permission_error",
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
    logprobs: bool | None = None
    top_logprobs: int | None = None
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
    logprobs: int | None = None  # alternatives per token (0-20); absent: no log-probabilities
    echo: bool = False


class EmbeddingBody(msgspec.Struct, kw_only=True):
    model: str
    input: str | list[Any]  # a string, strings, token ids, or lists of token ids
    encoding_format: str = "float"
    dimensions: int | None = None
    user: str | None = None


def _intent(body: _Sampling, max_tokens: int | None, least: int = 1, **given: Any) -> Intent:
    """The fields both endpoints share; `given` are the endpoint's own. `least`: the smallest
    max_tokens (0 where a text completion only scores its echoed prompt)."""
    if max_tokens is not None and max_tokens < least:
        raise ApiError(400, f"max_tokens must be at least {least}, got {max_tokens}",
                       "max_tokens")  # fmt: skip
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


def _usage(stats: list[Stats | None]) -> dict[str, Any]:
    """The answers' usage: the prompt (shared) once, their completion tokens together."""
    first = stats[0] or Stats()
    done = sum((s or Stats()).completion_tokens for s in stats)
    return {
        "prompt_tokens": first.prompt_tokens,
        "completion_tokens": done,
        "total_tokens": first.prompt_tokens + done,
        "prompt_tokens_details": {"cached_tokens": first.cached_tokens},
    }


def _finish(reason: FinishReason | None) -> str:
    return "length" if reason is FinishReason.LENGTH else "stop"


class _Shape:
    """What differs between chat and text completions: object names and the envelope."""

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


def _stream_error(message: str | None, kind: ErrorKind) -> dict[str, Any]:
    """An error frame inside an SSE stream (headers are already sent: no status code)."""
    return {"error": {"message": message, "type": _error_type(kind), "param": None, "code": None}}


# -- chat completions ----------------------------------------------------------------------


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


def _chat_logprobs(tok: Tokenizer, es: list[TokenLogprob], top: int) -> dict[str, Any]:
    return {"content": entries(tok, es, top), "refusal": None}


def _chunk(
    shape: _Shape, delta: dict[str, Any], finish: str | None = None, index: int = 0,
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:  # fmt: skip
    choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
    return shape.envelope([choice], chunk=True)


class _Held:
    """An answer's token log-probabilities not yet sent: each goes with the next chunk of
    that answer (text held back by a stop string or the parser comes later, or never)."""

    def __init__(self, tok: Tokenizer, top: int, asked: bool):
        self.tok, self.top, self.asked = tok, top, asked
        self.pending: list[TokenLogprob] = []

    def take(self) -> dict[str, Any] | None:
        if not self.asked or not self.pending:
            return None
        out, self.pending = _chat_logprobs(self.tok, self.pending, self.top), []
        return out


async def _chat_sse(
    hub: Hub, prep: Prepared, shape: _Shape, intent: Intent, include_usage: bool
) -> AsyncIterator[Any]:
    """Per answer: a role chunk, one delta per parser event (with the log-probabilities of
    the tokens behind it), the finish chunk; then usage if asked, and [DONE]. A structured
    answer that fails its schema (only possible when cut off) gets an error event before its
    finish chunk: the deltas were already sent, so a 422 is no longer possible."""
    replies, tok = prep.replies, prep.model.tokenizer
    held = [_Held(tok, intent.top_logprobs, intent.logprobs) for _ in replies]
    stats: list[Stats | None] = [None] * len(replies)
    for i in range(len(replies)):
        yield _chunk(shape, {"role": "assistant", "content": ""}, index=i)
    async with aclosing(hub.engine.generate(prep.request)) as evs:  # type: ignore[union-attr]
        async for ev in evs:
            i, reply = ev.index, replies[ev.index]
            held[i].pending.extend(ev.logprobs)
            if ev.kind is EventKind.TOKEN:
                for e in reply.push(ev.text):
                    if (delta := _delta(e)) is not None:
                        yield _chunk(shape, delta, index=i, logprobs=held[i].take())
            elif ev.kind is EventKind.DONE:
                for e in reply.finish():
                    if (delta := _delta(e)) is not None:
                        yield _chunk(shape, delta, index=i, logprobs=held[i].take())
                problem = reply.problem(ev.finish_reason is FinishReason.LENGTH)
                if problem:
                    yield _stream_error(problem, ErrorKind.INVALID_RESPONSE)
                finish = _chat_finish(reply, ev.finish_reason)
                yield _chunk(shape, {}, finish, index=i, logprobs=held[i].take())
                stats[i] = ev.stats
            elif ev.kind is EventKind.ERROR:
                yield _stream_error(ev.error, ErrorKind.INTERNAL)
    if include_usage:
        yield shape.envelope([], chunk=True) | {"usage": _usage(stats)}
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


async def _chat_respond(hub: Hub, prep: Prepared, intent: Intent, body: ChatBody) -> Response:
    shape = _Shape(True, prep.model.name)
    if body.stream:
        usage = bool(body.stream_options and body.stream_options.include_usage)
        return sse_response(_chat_sse(hub, prep, shape, intent, usage))
    answers = await complete_all(hub, prep.request, prep.replies)
    tok = prep.model.tokenizer
    choices = [
        {
            "index": a.index,
            "message": _message(reply),
            "logprobs": _chat_logprobs(tok, a.logprobs, intent.top_logprobs)
            if intent.logprobs
            else None,
            "finish_reason": _chat_finish(reply, a.final.finish_reason),
        }  # fmt: skip
        for a, reply in zip(answers, prep.replies, strict=True)
    ]
    usage = _usage([a.final.stats for a in answers])
    return Response(shape.envelope(choices, chunk=False) | {"usage": usage})


def _message_in(m: ChatMessage, i: int) -> dict[str, Any]:
    """A message for the template, its image parts decoded (data URLs) in their places."""
    msg = msgspec.structs.asdict(m)
    if isinstance(m.content, list):
        msg["content"] = [content_part(p, f"messages[{i}].content[{j}]")
                          for j, p in enumerate(m.content)]  # fmt: skip
    return msg


def _chat_intent(body: ChatBody) -> Intent:
    """The chat request in neutral terms. Extra template variables: `chat_template_kwargs`;
    `reasoning_effort` reaches templates that read it (`Intent.effort`)."""
    extra = dict(body.chat_template_kwargs or {})
    extra.pop("enable_thinking", None)
    limit = body.max_completion_tokens if body.max_tokens is None else body.max_tokens
    top = top_count(body.top_logprobs, "top_logprobs")
    if top and not body.logprobs:
        raise ApiError(400, "top_logprobs requires logprobs: true", "top_logprobs")
    return _intent(
        body,
        limit,
        messages=[_message_in(m, i) for i, m in enumerate(body.messages)],
        tools=body.tools,
        tool_choice=body.tool_choice,
        think=openai_think(body.think, body.reasoning_effort, body.chat_template_kwargs),
        effort=effort_of(body.reasoning_effort, "reasoning_effort"),
        output=openai_format(body.response_format),
        template_kwargs=extra,
        logprobs=bool(body.logprobs),
        top_logprobs=top,
    )


@post("/v1/chat/completions", status_code=200, dto=StrictBody[ChatBody], return_dto=None)
async def chat_completions(request: Request, data: JSONBody[ChatBody | None] = None) -> Response:
    hub, body = hub_of(request), required(data)
    intent = _chat_intent(body)
    prep = await prepare(hub, intent)
    return await _chat_respond(hub, prep, intent, body)


# -- text completions ----------------------------------------------------------------------


class _Legacy:
    """One answer's log-probabilities in the text-completion shape: `tokens`,
    `token_logprobs`, `top_logprobs` (per token a {text: logprob} of the `top` most likely and
    the chosen one) and `text_offset` (where each token's text starts in the returned text,
    the echoed prompt included)."""

    def __init__(self, tok: Tokenizer, top: int):
        self.tok, self.top = tok, top
        self.decoder = tok.incremental_decoder(skip_special=True)
        self.pos = 0

    def render(self, es: list[TokenLogprob | None], tokens: list[int]) -> dict[str, Any]:
        out: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                                     "text_offset": []}  # fmt: skip
        for e, t in zip(es, tokens, strict=True):
            out["tokens"].append(token_text(self.tok, t))
            out["text_offset"].append(self.pos)
            self.pos += len(self.decoder.push(t))
            out["token_logprobs"].append(None if e is None else e.logprob)
            if e is None:
                out["top_logprobs"].append(None)
                continue
            alts = {token_text(self.tok, i): lp for i, lp in e.top[: self.top]}
            alts.setdefault(token_text(self.tok, e.token), e.logprob)
            out["top_logprobs"].append(alts)
        return out


def _echo(prep: Prepared, answer_prompt: tuple | None, legacy: _Legacy | None):
    """The echoed prompt's text and log-probabilities (None without logprobs)."""
    ids = prep.request.prompt_ids
    scored = answer_prompt if answer_prompt is not None else (None,) * len(ids)
    return prep.prompt.text, None if legacy is None else legacy.render(list(scored), ids)


def _text_choice(index: int, text: str, logprobs: Any, finish: str | None) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}


def _merge(a: dict[str, Any] | None, b: dict[str, Any] | None) -> dict[str, Any] | None:
    if a is None or b is None:
        return a or b
    return {k: a[k] + b[k] for k in a}


async def _completion_sse(
    hub: Hub, prep: Prepared, shape: _Shape, body: CompletionBody, include_usage: bool
) -> AsyncIterator[Any]:
    """Per answer: its text (after the echoed prompt) with the log-probabilities of its
    tokens, then its finish chunk; usage if asked; [DONE]."""
    n, tok, top = prep.request.n, prep.model.tokenizer, top_count(body.logprobs, "logprobs")
    legacy = [_Legacy(tok, top) if body.logprobs is not None else None for _ in range(n)]
    started = [False] * n
    stats: list[Stats | None] = [None] * n
    async with aclosing(hub.engine.generate(prep.request)) as evs:  # type: ignore[union-attr]
        async for ev in evs:
            if ev.kind is EventKind.QUEUED:
                continue
            i, lg = ev.index, legacy[ev.index]
            text, lp = "", None
            if body.echo and not started[i]:  # the prompt first (offsets count from it)
                text, lp = _echo(prep, ev.prompt_logprobs, lg)
            started[i] = True
            text += ev.text
            if lg is not None:
                lp = _merge(lp, lg.render(list(ev.logprobs), [e.token for e in ev.logprobs]))
            if ev.kind is EventKind.ERROR:
                yield _stream_error(ev.error, ErrorKind.INTERNAL)
                continue
            if text or (lp and lp["tokens"]):
                yield shape.envelope([_text_choice(i, text, lp, None)], chunk=True)
            if ev.kind is EventKind.DONE:
                fin = _text_choice(i, "", None, _finish(ev.finish_reason))
                yield shape.envelope([fin], chunk=True)
                stats[i] = ev.stats
    if include_usage:
        yield shape.envelope([], chunk=True) | {"usage": _usage(stats)}
    yield DONE_SENTINEL


def _completion_choice(prep: Prepared, body: CompletionBody, a: Answer) -> dict[str, Any]:
    tok, top = prep.model.tokenizer, top_count(body.logprobs, "logprobs")
    legacy = _Legacy(tok, top) if body.logprobs is not None else None
    text, lp = a.text, None
    if body.echo:
        echoed, lp = _echo(prep, a.prompt_logprobs, legacy)
        text = echoed + text
    if legacy is not None:
        lp = _merge(lp, legacy.render(list(a.logprobs), [e.token for e in a.logprobs]))
    return _text_choice(a.index, text, lp, _finish(a.final.finish_reason))


async def _completion_respond(hub: Hub, prep: Prepared, body: CompletionBody) -> Response:
    shape = _Shape(False, prep.model.name)
    if body.stream:
        usage = bool(body.stream_options and body.stream_options.include_usage)
        return sse_response(_completion_sse(hub, prep, shape, body, usage))
    answers = await run_answers(hub.engine, prep.request)  # type: ignore[arg-type]
    for a in answers:
        if a.final.kind is EventKind.ERROR:
            raise generation_failed(hub, a.final)
    choices = [_completion_choice(prep, body, a) for a in answers]
    usage = _usage([a.final.stats for a in answers])
    return Response(shape.envelope(choices, chunk=False) | {"usage": usage})


def _completion_intent(body: CompletionBody) -> Intent:
    """A raw prompt. `logprobs: N` reports each token's log-probability with N alternatives;
    with `echo` the prompt comes back before the answer, its tokens' log-probabilities too,
    and max_tokens 0 only scores it."""
    prompt = body.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise ApiError(400, "exactly one prompt is supported", param="prompt")
        prompt = prompt[0]
    top = top_count(body.logprobs, "logprobs")
    scored = body.echo and (body.logprobs is not None or body.max_tokens == 0)
    return _intent(body, body.max_tokens, 0 if body.echo else 1, prompt=prompt,
                   logprobs=body.logprobs is not None, top_logprobs=top,
                   prompt_logprobs=scored)  # fmt: skip


@post("/v1/completions", status_code=200, dto=StrictBody[CompletionBody], return_dto=None)
async def completions(request: Request, data: JSONBody[CompletionBody | None] = None) -> Response:
    hub, body = hub_of(request), required(data)
    prep = await prepare(hub, _completion_intent(body))
    return await _completion_respond(hub, prep, body)


# -- embeddings ----------------------------------------------------------------------------


def _embedding_inputs(value: str | list[Any]) -> list[str] | list[list[int]]:
    """`input` as a list of strings or of token-id lists (one string, one id list, or a list
    of either), a 400 otherwise."""
    if isinstance(value, str):
        return [value]
    if value and all(isinstance(x, str) for x in value):
        return value
    if value and all(isinstance(x, int) and not isinstance(x, bool) for x in value):
        return [value]
    if value and all(isinstance(x, list) and x and all(
            isinstance(t, int) and not isinstance(t, bool) for t in x) for x in value):  # fmt: skip
        return value
    raise ApiError(400, "input must be a non-empty string, a list of strings, a list of token "
                   "ids or a list of token-id lists", param="input")  # fmt: skip


def _encoded(v: Any, fmt: str) -> Any:
    if fmt == "base64":  # little-endian float32, as OpenAI sends it
        return base64.b64encode(v.astype("<f4").tobytes()).decode("ascii")
    return v.astype(float).tolist()


@post("/v1/embeddings", status_code=200, dto=StrictBody[EmbeddingBody], return_dto=None)
async def embeddings(request: Request, data: JSONBody[EmbeddingBody | None] = None) -> Response:
    """Mean-pooled, L2-normalized final hidden states of the hosted model, one per input
    (`serve.translation.embedding`). An input longer than the window is a 400."""
    hub, body = hub_of(request), required(data)
    if body.encoding_format not in ("float", "base64"):
        raise ApiError(400, f"encoding_format must be float or base64, got "
                       f"{body.encoding_format!r}", param="encoding_format")  # fmt: skip
    items = _embedding_inputs(body.input)
    got = await embed(hub, body.model, items, truncate=False, dimensions=body.dimensions)
    data_ = [{"object": "embedding", "index": i,
              "embedding": _encoded(normalized(v), body.encoding_format)}
             for i, v in enumerate(got.vectors)]  # fmt: skip
    usage = {"prompt_tokens": got.prompt_tokens, "total_tokens": got.prompt_tokens}
    name = hub.model.name  # type: ignore[union-attr]
    return Response({"object": "list", "data": data_, "model": name, "usage": usage})


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
    route_handlers=[chat_completions, completions, embeddings, models, model],
    exception_handlers={ApiError: render_error},
)
