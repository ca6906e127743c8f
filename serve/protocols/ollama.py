"""The Ollama dialect: /api/generate, /api/chat/ollama (and /api/chat with a `model`),
/api/embed (and the older /api/embeddings), /api/tags, /api/ps, /api/show, plus the /api/version
and /api/queue/status utilities.

Streams are NDJSON; durations are integer nanoseconds; errors are `{"error": "..."}`. With
`logprobs`, each line carries the log-probabilities of the tokens behind its text
(`logprobs: [{token, logprob, bytes, top_logprobs}]`), the final object all of them.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from datetime import UTC, datetime, timedelta
from typing import Any

import jax
import msgspec
from litestar import Request, Response, Router, get, post
from litestar.params import JSONBody

from serve.bodies import StrictBody, decode_body, required
from serve.engine import EventKind, FinishReason, Stats
from serve.errors import ApiError
from serve.outputs import ContentDelta, OutputEvent, ReasoningDelta, ToolCall, ToolCallEnd
from serve.state import Hub, hub_of
from serve.streaming import ndjson_response
from serve.translation import Intent, Prepared, Sampling, complete_all, prepare
from serve.translation.embedding import embed as embed_inputs
from serve.translation.embedding import normalized
from serve.translation.images import from_base64, with_images
from serve.translation.intent import ImageInput
from serve.translation.logprobs import entries, top_count
from serve.translation.options import effort_of, ollama_format, stop_of, think_of
from serve.translation.prompt import check_model
from tsjax.logprobs import TokenLogprob

VERSION = "0.1.0"


def render_error(_: Request, exc: ApiError) -> Response:
    """Ollama's error shape: `{"error": "<message>"}`."""
    return Response({"error": exc.message}, status_code=exc.status)


def ns(seconds: float) -> int:
    """Ollama reports durations as integer nanoseconds."""
    return int(seconds * 1e9)


class Options(msgspec.Struct):
    num_predict: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repeat_penalty: float | None = None
    repeat_last_n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None | msgspec.UnsetType = msgspec.UNSET
    num_ctx: int | None = None  # accepted; the window is fixed at startup


class GenerateBody(msgspec.Struct):
    model: str
    prompt: str | None = None
    system: str | None = None
    raw: bool = False
    stream: bool = True
    think: bool | str | None = None
    format: str | dict[str, Any] | None = None
    options: Options | None = None
    images: list[str] | None = None  # base64 images (need a server started with --mmproj)
    logprobs: bool = False
    top_logprobs: int | None = None


class Message(msgspec.Struct, omit_defaults=True):
    role: str = "user"
    content: str | None = ""
    images: list[str] | None = None
    thinking: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_name: str | None = None
    tool_call_id: str | None = None
    name: str | None = None


class ChatBody(msgspec.Struct):
    model: str
    messages: list[Message]
    stream: bool = True
    think: bool | str | None = None  # a boolean or an effort level ("low" ... "max")
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None  # OpenAI's field, honoured here too
    format: str | dict[str, Any] | None = None  # "json" or a JSON schema
    options: Options | None = None
    logprobs: bool = False
    top_logprobs: int | None = None


class EmbedBody(msgspec.Struct):
    model: str
    input: str | list[str] = ""
    truncate: bool = True
    dimensions: int | None = None
    options: Options | None = None  # accepted; pooling needs no sampling options
    keep_alive: str | int | float | None = None  # accepted; the model stays loaded


class EmbeddingsBody(msgspec.Struct):
    model: str
    prompt: str = ""
    options: Options | None = None
    keep_alive: str | int | float | None = None


class ShowBody(msgspec.Struct):
    model: str | None = None
    name: str | None = None  # older clients send `name`
    verbose: bool = False


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _intent(body: GenerateBody | ChatBody, **given: Any) -> Intent:
    """Fields both endpoints share: the model, the options, thinking, the format,
    log-probabilities (`top_logprobs` alternatives, 0-20, reported with `logprobs`)."""
    o = body.options or Options()
    sampling = Sampling(**{f: getattr(o, f) for f in Sampling.__struct_fields__})
    top = top_count(body.top_logprobs, "top_logprobs")
    return Intent(model=body.model, sampling=sampling, max_tokens=o.num_predict,
                  stop=stop_of(o.stop), think=think_of(body.think), effort=effort_of(body.think),
                  output=ollama_format(body.format), stream=body.stream,
                  logprobs=body.logprobs, top_logprobs=top, **given)  # fmt: skip


def _metrics(stats: Stats | None, reason: FinishReason | None, began: float) -> dict[str, Any]:
    """The final object's fields: done_reason, counts, nanosecond durations, cache hits."""
    s = stats or Stats()
    return {
        "done": True,
        "done_reason": "length" if reason is FinishReason.LENGTH else "stop",
        "total_duration": ns(time.perf_counter() - began),
        "load_duration": 0,  # the model stays loaded: no per-request load
        "prompt_eval_count": s.prompt_tokens,
        "prompt_eval_duration": ns(s.prefill_seconds),
        "eval_count": s.completion_tokens,
        "eval_duration": ns(s.decode_seconds),
        "prompt_cache_hit_tokens": s.cached_tokens,
        "prompt_cache_hit_ratio": round(s.cache_hit_ratio, 4),
    }


def _call(call: ToolCall) -> dict[str, Any]:
    """Ollama's shape: arguments as an object; `id` and `function.index` as Ollama sends."""
    fn = {"index": call.index, "name": call.name, "arguments": call.arguments}
    return {"id": call.id, "function": fn}


def _part(e: OutputEvent, body_key: str) -> dict[str, Any] | None:
    """One parser event as the fields of a streamed line: thinking apart from content, and a
    tool call whole once it is complete (as Ollama streams them)."""
    if body_key == "response":
        if isinstance(e, ReasoningDelta):
            return {"response": "", "thinking": e.text}
        if isinstance(e, ContentDelta):
            return {"response": e.text}
        return None
    msg: dict[str, Any] = {"role": "assistant", "content": ""}
    if isinstance(e, ReasoningDelta):
        msg["thinking"] = e.text
    elif isinstance(e, ContentDelta):
        msg["content"] = e.text
    elif isinstance(e, ToolCallEnd):
        msg["tool_calls"] = [_call(e.call)]
    else:
        return None
    return {"message": msg}


def _empty(body_key: str) -> Any:
    return "" if body_key == "response" else {"role": "assistant", "content": ""}


class _Logprobs:
    """The answer's token log-probabilities not yet sent (each line carries those of the
    tokens behind its text; text held back by a stop string or the parser comes later)."""

    def __init__(self, prep: Prepared, intent: Intent):
        self.tok, self.top, self.asked = prep.model.tokenizer, intent.top_logprobs, intent.logprobs
        self.pending: list[TokenLogprob] = []

    def take(self) -> dict[str, Any]:
        if not self.asked or not self.pending:
            return {}
        out, self.pending = entries(self.tok, self.pending, self.top), []
        return {"logprobs": out}


async def _stream(
    hub: Hub, prep: Prepared, intent: Intent, body_key: str, began: float
) -> AsyncIterator[dict[str, Any]]:
    """NDJSON objects for one request. `body_key` is "response" (generate) or "message"."""
    requested, reply = intent.model or "", prep.reply
    model = hub.model.name if hub.model else requested
    held = _Logprobs(prep, intent)
    async with aclosing(hub.engine.generate(prep.request)) as evs:  # type: ignore[union-attr]
        async for ev in evs:
            base = {"model": model, "created_at": _now()}
            held.pending.extend(ev.logprobs)
            if ev.kind is EventKind.QUEUED:
                yield {
                    **base,
                    "model": requested,
                    body_key: _empty(body_key),
                    "done": False,
                    "queue_position": ev.queue_position,
                    "queue_pending": ev.queue_pending,
                }
            elif ev.kind is EventKind.TOKEN:
                for e in reply.push(ev.text):
                    if (part := _part(e, body_key)) is not None:
                        yield {**base, **part, "done": False, **held.take()}
            elif ev.kind is EventKind.DONE:
                for e in reply.finish():
                    if (part := _part(e, body_key)) is not None:
                        yield {**base, **part, "done": False, **held.take()}
                problem = reply.problem(ev.finish_reason is FinishReason.LENGTH)
                if problem:  # a cut-off structured answer: the lines were already sent
                    yield {**base, body_key: _empty(body_key), "done": True,
                           "done_reason": "error", "error": problem}  # fmt: skip
                else:
                    yield {**base, body_key: _empty(body_key), **held.take(),
                           **_metrics(ev.stats, ev.finish_reason, began)}  # fmt: skip
            elif ev.kind is EventKind.ERROR:
                yield {**base, body_key: _empty(body_key), "done": True, "done_reason": "error",
                       "error": ev.error}  # fmt: skip


async def _respond(
    hub: Hub, prep: Prepared, intent: Intent, body_key: str, began: float
) -> Response:
    if intent.stream:
        return ndjson_response(_stream(hub, prep, intent, body_key, began))
    (answer,) = await complete_all(hub, prep.request, prep.replies)
    reply, final = prep.reply, answer.final
    body: dict[str, Any] = {"model": hub.model.name, "created_at": _now()}  # type: ignore[union-attr]
    if body_key == "response":
        body["response"] = reply.content
        if reply.reasoning:
            body["thinking"] = reply.reasoning
    else:
        msg: dict[str, Any] = {"role": "assistant", "content": reply.content}
        if reply.reasoning:
            msg["thinking"] = reply.reasoning
        if reply.calls:
            msg["tool_calls"] = [_call(c) for c in reply.calls]
        body["message"] = msg
    if intent.logprobs:
        body["logprobs"] = entries(prep.model.tokenizer, answer.logprobs, intent.top_logprobs)
    return Response(body | _metrics(final.stats, final.finish_reason, began))


def _images(images: list[str] | None, where: str) -> list[ImageInput]:
    """Base64 images; empty strings are skipped, as the reference server does."""
    return [from_base64(b, f"{where}[{i}]") for i, b in enumerate(images or []) if b]


def _generate_intent(body: GenerateBody) -> Intent:
    """A prompt through the chat template (with `system`), or as given with `raw`; images
    before the prompt's text. Never reuses a cached prefix, so each call stands alone."""
    prompt = body.prompt or ""
    images = _images(body.images, "images")
    if body.raw:
        return _intent(body, prompt=prompt, images=images, reuse_prefix=False)
    messages = [{"role": "user", "content": with_images(prompt, images)}]
    if body.system:
        messages.insert(0, {"role": "system", "content": body.system})
    return _intent(body, messages=messages, reuse_prefix=False)


@post("/api/generate", status_code=200, dto=StrictBody[GenerateBody], return_dto=None)
async def generate(request: Request, data: JSONBody[GenerateBody | None] = None) -> Response:
    """One-shot completion."""
    began = time.perf_counter()
    hub, body = hub_of(request), required(data)
    intent = _generate_intent(body)
    prep = await prepare(hub, intent)
    return await _respond(hub, prep, intent, "response", began)


async def ollama_chat(request: Request, body: ChatBody) -> Response:
    """Multi-turn chat; reuses the KV cache of an earlier turn with the same prefix."""
    began = time.perf_counter()
    hub = hub_of(request)
    messages = [_message_dict(m, i) for i, m in enumerate(body.messages)]
    intent = _intent(body, messages=messages, tools=body.tools, tool_choice=body.tool_choice)
    prep = await prepare(hub, intent)
    return await _respond(hub, prep, intent, "message", began)


def _message_dict(m: Message, i: int) -> dict[str, Any]:
    """A message for the template: Ollama names a tool result's tool `tool_name`; templates
    read `name`. Its `images` go before its text, as Ollama places them."""
    msg = msgspec.structs.asdict(m)
    if msg.get("tool_name") and not msg.get("name"):
        msg["name"] = msg["tool_name"]
    images = _images(msg.pop("images", None), f"messages[{i}].images")
    msg["content"] = with_images(msg.get("content"), images)
    return msg


@post("/api/chat/ollama", status_code=200, dto=StrictBody[ChatBody], return_dto=None)
async def chat_ollama(request: Request, data: JSONBody[ChatBody | None] = None) -> Response:
    return await ollama_chat(request, required(data))


class _Probe(msgspec.Struct):
    model: Any = msgspec.UNSET


@post("/api/chat", status_code=200)
async def chat(request: Request) -> Response:
    """Real Ollama clients post here with a `model`; answer them in Ollama form. Bodies
    without `model` belong to the Web UI protocol, if the app registered one in
    `app.state.webui_chat`."""
    raw = await request.body()
    try:
        has_model = msgspec.json.decode(raw, type=_Probe).model is not msgspec.UNSET
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        has_model = True  # let the Ollama parser produce the precise 400
    webui = getattr(request.app.state, "webui_chat", None)
    if not has_model and webui is not None:
        return await webui(request)
    return await ollama_chat(request, await decode_body(request, ChatBody))


def _modified(hub: Hub) -> str:
    path = hub.model.path  # type: ignore[union-attr]
    return datetime.fromtimestamp(path.stat().st_mtime, UTC).isoformat().replace("+00:00", "Z")


def _details(hub: Hub) -> dict[str, Any]:
    model = hub.model
    arch = model.config.architecture  # type: ignore[union-attr]
    meta = model.metadata  # type: ignore[union-attr]
    return {
        "parent_model": "",
        "format": "gguf",
        "family": arch,
        "families": [arch],
        "parameter_size": str(meta.get("general.size_label", "")),
        "quantization_level": model.path.stem.rsplit(".", 1)[-1],  # type: ignore[union-attr]
        # what the weights are held and multiplied in (tsjax.quants; the file's own type above)
        "weight_format": model.quant,  # type: ignore[union-attr]
    }


@get("/api/tags")
async def tags(request: Request) -> dict[str, Any]:
    hub = hub_of(request)
    if hub.model is None:
        return {"models": []}
    m = hub.model
    entry = {
        "name": m.path.stem,
        "model": m.name,
        "size": m.path.stat().st_size,
        "modified_at": _modified(hub),
        "digest": "",
        "details": _details(hub),
    }
    return {"models": [entry]}


# Ollama's expiry for a model kept loaded for good (keep_alive < 0): load time plus Go's
# longest duration (2^63 ns, ~292 years). Here a model stays until the server stops.
_FOREVER = timedelta(microseconds=2**63 // 1000)


@get("/api/ps")
async def ps(request: Request) -> dict[str, Any]:
    """The loaded model: `size` is what it holds in memory (weights and KV cache, from the
    engine's memory report), `size_vram` the part of it on accelerators (0 on CPU, so
    `ollama ps` says "100% CPU"), `context_length` the window; it never expires."""
    hub = hub_of(request)
    if not hub.ready or hub.model is None or hub.engine is None:
        return {"models": []}  # nothing is loaded yet
    m, report = hub.model, hub.engine.memory()
    on_device = sum(report.per_device.values()) if jax.default_backend() != "cpu" else 0
    loaded = datetime.fromtimestamp(hub.started, UTC) + timedelta(seconds=hub.load_seconds)
    entry = {
        "name": m.path.stem,
        "model": m.name,
        "size": report.params_bytes + report.cache_bytes,
        "digest": "",
        "details": _details(hub),
        "expires_at": (loaded + _FOREVER).isoformat().replace("+00:00", "Z"),
        "size_vram": on_device,
        "context_length": m.max_len,
    }
    return {"models": [entry]}


def _plain(value: Any) -> Any:
    """GGUF metadata values as JSON (numpy scalars to Python; long arrays elided)."""
    if hasattr(value, "item") and not isinstance(value, list | tuple):
        try:
            return value.item()
        except (ValueError, TypeError):
            return str(value)
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value] if len(value) <= 64 else []
    return value if isinstance(value, str | int | float | bool) or value is None else str(value)


@post("/api/show", status_code=200, dto=StrictBody[ShowBody], return_dto=None)
async def show(request: Request, data: JSONBody[ShowBody | None] = None) -> dict[str, Any]:
    hub, body = hub_of(request), required(data)
    requested = body.model or body.name or ""
    model, _ = hub.live()
    check_model(requested, model)
    s = hub.settings
    params = {"temperature": s.temperature, "top_k": s.top_k, "top_p": s.top_p,
              "repeat_penalty": s.repeat_penalty, "num_ctx": model.max_len}  # fmt: skip
    info = {k: _plain(v) for k, v in model.metadata.items() if k != "tokenizer.chat_template"}
    out = {
        "modelfile": "",
        "parameters": "\n".join(f"{k} {v}" for k, v in params.items()),
        "template": model.template.source,
        "details": _details(hub),
        "model_info": info | {"file": model.name, "size": model.path.stat().st_size},
        "capabilities": ["completion"],
        "modified_at": _modified(hub),
    }
    proj = model.projector
    if proj is not None:  # as Ollama: "vision", and the projector file's keys
        out["capabilities"].append("vision")
        if proj.audio is not None:  # Ollama's "audio" capability (types/model/capability.go)
            out["capabilities"].append("audio")
        out["projector_info"] = {k: _plain(v) for k, v in proj.metadata.items()} | {
            "file": proj.name,
            "size": proj.path.stat().st_size,
        }
        c = proj.config
        if c.dynamic:  # the image's own size decides; these bound it
            out["projector_info"] |= {
                "min_image_tokens": c.min_tokens,
                "max_image_tokens": c.max_tokens,
            }
        else:
            out["projector_info"]["tokens_per_image"] = c.tokens_per_image
    return out


@post("/api/embed", status_code=200, dto=StrictBody[EmbedBody], return_dto=None)
async def embed(request: Request, data: JSONBody[EmbedBody | None] = None) -> dict[str, Any]:
    """L2-normalized mean-pooled embeddings, one per input; `truncate` (default true) cuts an
    input to the context window, false makes a longer one a 400. No input: no embeddings
    (what Ollama answers to load a model)."""
    began = time.perf_counter()
    hub, body = hub_of(request), required(data)
    items = [body.input] if isinstance(body.input, str) else list(body.input)
    items = [x for x in items if x]  # Ollama skips empty strings
    if not items:
        model, _ = hub.live()
        check_model(body.model, model)
        return {"model": body.model, "embeddings": []}
    got = await embed_inputs(hub, body.model, items, truncate=body.truncate,
                             dimensions=body.dimensions)  # fmt: skip
    return {
        "model": body.model,
        "embeddings": [normalized(v).astype(float).tolist() for v in got.vectors],
        "total_duration": ns(time.perf_counter() - began),
        "load_duration": 0,  # the model stays loaded: no per-request load
        "prompt_eval_count": got.prompt_tokens,
    }


@post("/api/embeddings", status_code=200, dto=StrictBody[EmbeddingsBody], return_dto=None)
async def embeddings(
    request: Request, data: JSONBody[EmbeddingsBody | None] = None
) -> dict[str, Any]:
    """The older single-prompt form: `{"embedding": [...]}`, the mean-pooled vector as
    Ollama's returns it (not normalized); an empty prompt gives an empty vector. A prompt
    longer than the window is cut to it."""
    hub, body = hub_of(request), required(data)
    if not body.prompt:
        model, _ = hub.live()
        check_model(body.model, model)
        return {"embedding": []}
    got = await embed_inputs(hub, body.model, [body.prompt], truncate=True, param="prompt")
    return {"embedding": got.vectors[0].astype(float).tolist()}


@get("/api/version")
async def version() -> dict[str, str]:
    return {"version": VERSION}


@get("/api/queue/status")
async def queue_status(request: Request) -> dict[str, Any]:
    hub = hub_of(request)
    if hub.engine is None:
        return {"busy": False, "pending_requests": 0, "total_processed": 0}
    return hub.engine.status()


router = Router(
    path="/",
    route_handlers=[
        generate,
        chat_ollama,
        chat,
        embed,
        embeddings,
        tags,
        ps,
        show,
        version,
        queue_status,
    ],
    exception_handlers={ApiError: render_error},
)
