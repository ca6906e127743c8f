"""The Web UI dialect: `POST /api/chat` (SSE), sessions, the model panel and uploads.

Wire shapes follow the reference server's browser protocol (`data: <json>` frames with no
`event:` lines: `queue_position`, `thinking`, `token`, then one `done` summary). Where the
reference loses information or trusts the client too much we do better and say so in the
README ("Differences from the reference server"): bad JSON is a 400 with a body, `tokenCount`
counts tokens, uploads and media paths can never leave the upload directory, and the default
answer length is bounded by the context window instead of failing.

Prefix reuse needs no help from this module beyond rendering: the engine picks the cache row
sharing the longest prefix. The session's tracked raw tokens make that prefix the whole previous
turn (see serve/sessions.py).
"""

from __future__ import annotations

import re
import secrets
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import jax
import msgspec
from litestar import Request, Response, Router, delete, get, post
from litestar.datastructures import UploadFile
from litestar.exceptions import HTTPException
from litestar.exceptions.http_exceptions import RequestEntityTooLarge
from litestar.params import FromPath
from litestar.response import File

from serve.engine import EventKind, FinishReason, GenerationRequest, Stats
from serve.outputs import ContentDelta, OutputEvent, ReasoningDelta, ToolCallEnd
from serve.protocols.common import (
    ApiError,
    Hub,
    check_model,
    decode_body,
    hub_of,
    make_request,
    sampling_params,
    stop_list,
)
from serve.protocols.features import (
    Reply,
    apply,
    constrain,
    normalize_tools,
    ollama_format,
    openai_format,
    plan_of,
    tool_choice_of,
    with_generic_tools,
)
from serve.sessions import (
    DEFAULT_ID,
    Session,
    SessionStore,
    TrackedMessage,
    Upload,
    created_iso,
)
from serve.streaming import sse_response
from tsjax.chat_template import TemplateError
from tsjax.model import Model

MAX_TEXT_FILE_CHARS = 8000  # text upload cap when no tokenizer is loaded (reference default)


class WebUIError(ApiError):
    """`{"error": "<message>"}`, the reference's shape for /api/chat and /api/upload."""


class OkError(ApiError):
    """`{"ok": false, "error": "<message>"}`, the shape of the session and model endpoints."""

    def response(self) -> Response:
        return Response({"ok": False, "error": self.message}, status_code=self.status)


# -- request bodies ---------------------------------------------------------------------------


class WebMessage(msgspec.Struct):
    role: str
    content: str | None = None
    imagePaths: list[str] | None = None  # noqa: N815 - the wire's camelCase
    audioPaths: list[str] | None = None  # noqa: N815
    textFilePaths: list[str] | None = None  # noqa: N815
    isVideo: bool = False  # noqa: N815
    thinking: str | None = None  # sent back by the UI; the spliced raw tokens carry it
    tool_calls: list[dict[str, Any]] | None = None


class TurnOptions(msgspec.Struct):
    """Per-turn knobs, also accepted by POST /api/sessions as the session's defaults.
    Both spellings are accepted; camelCase wins when both are given, as in the reference."""

    maxTokens: int | None = None  # noqa: N815
    think: bool | None = None
    temperature: float | None = None
    top_k: int | None = None
    topK: int | None = None  # noqa: N815
    top_p: float | None = None
    topP: float | None = None  # noqa: N815
    min_p: float | None = None
    minP: float | None = None  # noqa: N815
    repetition_penalty: float | None = None
    repetitionPenalty: float | None = None  # noqa: N815
    presence_penalty: float | None = None
    presencePenalty: float | None = None  # noqa: N815
    frequency_penalty: float | None = None
    frequencyPenalty: float | None = None  # noqa: N815
    seed: int | None = None
    stop: list[str] | None | msgspec.UnsetType = msgspec.UNSET

    def resolved(self) -> dict[str, Any]:
        """Given fields only, under the names `sampling_params` uses."""
        pairs = {
            "max_tokens": self.maxTokens,
            "think": self.think,
            "temperature": self.temperature,
            "top_k": _first(self.topK, self.top_k),
            "top_p": _first(self.topP, self.top_p),
            "min_p": _first(self.minP, self.min_p),
            "repeat_penalty": _first(self.repetitionPenalty, self.repetition_penalty),
            "presence_penalty": _first(self.presencePenalty, self.presence_penalty),
            "frequency_penalty": _first(self.frequencyPenalty, self.frequency_penalty),
            "seed": self.seed,
        }
        out = {k: v for k, v in pairs.items() if v is not None}
        if self.stop is not msgspec.UNSET:
            out["stop"] = self.stop
        return out


class ChatBody(TurnOptions, kw_only=True):
    messages: list[WebMessage]
    sessionId: str | None = None  # noqa: N815
    newChat: bool = False  # noqa: N815
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    format: str | dict[str, Any] | None = None  # Ollama's: "json" or a JSON schema
    response_format: dict[str, Any] | None = None  # OpenAI's
    model: str | None = None  # must be blank: models are chosen with /api/models/load
    backend: str | None = None


class LoadBody(msgspec.Struct):
    model: str | None = None
    backend: str | None = None
    mmproj: str | None = None


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


# -- the store and the upload directory -------------------------------------------------------


def sessions_of(request: Request) -> SessionStore:
    return request.app.state.sessions


def upload_dir(hub: Hub) -> Path:
    """`upload_dir` from the settings when defined, else a per-user temp folder."""
    configured = hub.settings.upload_dir
    path = Path(configured) if configured else Path(tempfile.gettempdir()) / "tsjax-uploads"
    path.mkdir(parents=True, exist_ok=True)
    return path.resolve()


def _inside(path: str, root: Path) -> Path | None:
    """`path` resolved, if it names a file directly inside `root` (no traversal, no links out)."""
    try:
        p = Path(path).resolve()
    except (OSError, RuntimeError, ValueError):
        return None
    return p if p.parent == root and p.is_file() else None


# -- prompt rendering with spliced raw tokens -------------------------------------------------

_PLACEHOLDER = "\ue000R{:04d}\ue000"
_PLACEHOLDER_RE = re.compile("\ue000R(\\d{4})\ue000")


def _matched_raw(messages: list[dict[str, Any]], tracked: list[TrackedMessage]) -> dict[int, list]:
    """Raw token ids for assistant turns inside the prefix that matches the tracked history.
    Assistant text is not compared: clients send back answers without their think blocks."""
    raws: dict[int, list[int]] = {}
    for i, (new, old) in enumerate(zip(messages, tracked, strict=False)):
        if new["role"] != old.role:
            break
        if new["role"] != "assistant" and new["content"] != old.content:
            break
        if new["role"] == "assistant" and old.raw:
            raws[i] = old.raw
    return raws


def render_turn(
    model: Model,
    messages: list[dict[str, Any]],
    tracked: list[TrackedMessage],
    *,
    think: bool | None,
    tools: list[dict[str, Any]] | None,
) -> tuple[list[int], str, dict[int, list[int]]]:
    """Prompt ids, the rendered text, and the spliced raw turns. Earlier assistant answers the
    session generated are replaced by their exact token ids, so the prompt starts with what the
    previous turn left in the cache."""
    if not messages:
        raise WebUIError(400, "messages must not be empty", param="messages")
    raws = _matched_raw(messages, tracked)
    msgs = [
        {"role": "assistant", "content": _PLACEHOLDER.format(i)} if i in raws else m
        for i, m in enumerate(messages)
    ]
    try:
        text = model.template.render(msgs, tools=tools or None, enable_thinking=think)
    except TemplateError as e:
        raise WebUIError(400, f"cannot render the conversation: {e}", param="messages") from e
    parts = _PLACEHOLDER_RE.split(text)
    if len(parts) != 2 * len(raws) + 1:  # the template dropped or repeated an answer
        ids = model.render_chat(messages, tools=tools or None, enable_thinking=think)
        return ids, model.template.render(messages, enable_thinking=think), {}
    tok = model.tokenizer
    add_bos = None if not model.template.bos_in_template else False
    ids: list[int] = []
    for j, part in enumerate(parts):
        if j % 2:
            ids.extend(raws[int(part)])
        elif j == 0 or part:
            last = j == len(parts) - 1
            ids.extend(tok.encode(part, add_bos=add_bos if j == 0 else False,
                                  add_eos=None if last else False, parse_special=True))  # fmt: skip
    return ids, text, raws


# -- /api/chat --------------------------------------------------------------------------------


def _user_media(body: ChatBody, root: Path) -> int:
    """Check every media path names an upload; return how many the model will not see
    (text-only models ignore media, as the reference does without a projector)."""
    count = 0
    for m in body.messages:
        for path in (m.imagePaths or []) + (m.audioPaths or []) + (m.textFilePaths or []):
            if _inside(path, root) is None:
                raise WebUIError(400, f"media path '{path}' is not a file uploaded to this server")
        count += len(m.imagePaths or []) + len(m.audioPaths or [])
    return count


def _attach_pending(messages: list[dict[str, Any]], pending: list[Upload], listed: set[str]) -> int:
    """Inline pending text uploads at the front of the last user message, as the UI does
    itself; returns the number of pending media files the model cannot see."""
    texts, media = [], 0
    for up in pending:
        if up.media_type == "text" and str(up.path) not in listed:
            body = up.path.read_text("utf-8", errors="replace")
            texts.append(f"[File: {up.file_name}]\n{body}\n[End of file]")
        elif up.media_type != "text":
            media += 1
    users = [m for m in messages if m["role"] == "user"]
    if texts and users:
        typed = users[-1]["content"]
        users[-1]["content"] = "\n\n".join(texts) + (f"\n\n{typed}" if typed else "")
    return media


def _done(
    stats: Stats | None, reason: FinishReason | None, session: Session, error: str | None,
    began: float, ignored_media: int,
) -> dict[str, Any]:  # fmt: skip
    """The terminal frame. tokenCount counts generated tokens (the reference counts pieces)."""
    s = stats or Stats()
    aborted = reason is FinishReason.ABORT
    elapsed = s.prefill_seconds + s.decode_seconds if stats else time.perf_counter() - began
    count = s.completion_tokens
    prompt, reused = (0, 0) if aborted else (s.prompt_tokens, s.cached_tokens)
    out = {
        "done": True,
        "tokenCount": count,
        "elapsed": round(elapsed, 3),
        "tokPerSec": round(count / elapsed, 2) if elapsed > 0 else 0.0,
        "aborted": aborted,
        "error": error,
        "sessionId": session.id,
        "promptTokens": prompt,
        "kvReusedTokens": reused,
        "kvReusePercent": round(100.0 * reused / prompt, 1) if prompt else 0.0,
        "finishReason": str(reason) if reason else ("error" if error else None),
        "ttft": round(s.first_token_seconds, 3),
    }
    if ignored_media:
        out["mediaIgnored"] = ignored_media  # text-only model: attachments were not seen
    return out


async def _turn(
    hub: Hub, req: GenerationRequest, session: Session, reply: Reply,
    history: list[TrackedMessage], ignored_media: int,
) -> AsyncIterator[dict[str, Any]]:  # fmt: skip
    """SSE frames for one turn; records the answer's raw tokens in the session at the end.
    Closing this iterator (client gone) closes the engine stream, which aborts the request.
    A structured answer that fails its format (only when cut off) reports it in `done`."""
    began = time.perf_counter()
    raw: list[int] = []
    pieces: list[str] = []
    stats, reason, error = None, None, None
    async with aclosing(hub.engine.generate(req)) as evs:  # type: ignore[union-attr]
        async for ev in evs:
            if ev.kind is EventKind.QUEUED:
                yield {"queue_position": ev.queue_position, "queue_pending": ev.queue_pending}
            elif ev.kind is EventKind.TOKEN:
                raw.extend(ev.token_ids)
                pieces.append(ev.text)
                for frame in _frames(reply.push(ev.text)):
                    yield frame
            else:
                stats, reason = ev.stats, ev.finish_reason
                error = (ev.error or "generation failed") if ev.kind is EventKind.ERROR else None
    if reason is not FinishReason.ABORT:
        for frame in _frames(reply.finish()):
            yield frame
        if error is None:
            error = reply.problem(reason is FinishReason.LENGTH)
    if error is None and reason is not FinishReason.ABORT and not session.disposed:
        kept = raw[: stats.completion_tokens] if stats else raw
        session.history = [*history, TrackedMessage("assistant", "".join(pieces), kept)]
    yield _done(stats, reason, session, error, began, ignored_media)


def _frames(events: list[OutputEvent]) -> list[dict[str, Any]]:
    """Parser events as the reference's frames: `thinking`, `token`, and `tool_calls` (flat
    `{name, arguments}` objects, plus the call `id`), one frame per event."""
    out: list[dict[str, Any]] = []
    for e in events:
        if isinstance(e, ReasoningDelta) and e.text:
            out.append({"thinking": e.text})
        elif isinstance(e, ContentDelta) and e.text:
            out.append({"token": e.text})
        elif isinstance(e, ToolCallEnd):
            c = e.call
            out.append({"tool_calls": [{"id": c.id, "name": c.name, "arguments": c.arguments}]})
    return out


async def webui_chat(request: Request) -> Response:
    """POST /api/chat without `model`: one streamed turn of a session's conversation."""
    hub = hub_of(request)
    body = await decode_body(request, ChatBody, WebUIError)
    if (body.model or "").strip() or (body.backend or "").strip():
        raise WebUIError(
            400,
            "Use /api/models/load to choose a model before chatting. "
            "Changing models during chat is not supported.",
        )
    store = sessions_of(request)
    session = store.get(body.sessionId)
    if session is None or session.disposed:
        raise WebUIError(404, f"Session '{body.sessionId}' not found or has been disposed.")
    if body.newChat:
        session.reset()
    model, engine = hub.live(WebUIError)
    ignored = _user_media(body, upload_dir(hub))
    opts = session.options | body.resolved()
    messages = [_message(m) for m in body.messages]
    listed = {p for m in body.messages for p in (m.textFilePaths or [])}
    ignored += _attach_pending(messages, session.take_pending(), listed)
    think = opts.get("think")
    tools = normalize_tools(body.tools, WebUIError)
    choice = tool_choice_of(body.tool_choice, tools, WebUIError)
    output = ollama_format(body.format, WebUIError) or openai_format(
        body.response_format, WebUIError
    )
    plan = plan_of(tools=tools, choice=choice, think=think, output=output, error=WebUIError)
    shown = with_generic_tools(messages, plan.template_tools, model.template.source)
    ids, text, raws = render_turn(
        model, shown, session.history, think=think, tools=plan.template_tools
    )
    sampling = sampling_params(hub.settings, **opts)
    stop = stop_list(hub.settings, opts.get("stop", msgspec.UNSET))
    # No maxTokens: answer until the window is full (the reference's 20000 fails instead).
    req = make_request(engine, ids, sampling, opts.get("max_tokens"), stop, WebUIError,
                       reuse_prefix=True)  # fmt: skip
    apply(await constrain(hub, plan, WebUIError, text), req)
    history = [TrackedMessage(m["role"], m["content"], raws.get(i)) for i, m in enumerate(shown)]
    reply = Reply(hub, plan, text)
    return sse_response(_turn(hub, req, session, reply, history, ignored))


def _message(m: WebMessage) -> dict[str, Any]:
    """Role and content; an assistant turn's tool calls too, so a tool loop renders."""
    msg: dict[str, Any] = {"role": m.role, "content": m.content or ""}
    if m.tool_calls:
        msg["tool_calls"] = m.tool_calls
    return msg


@post("/api/webui/chat", status_code=200)
async def chat_alias(request: Request) -> Response:
    """The same protocol at a path no Ollama client claims (for UIs that want certainty)."""
    return await webui_chat(request)


# -- sessions ---------------------------------------------------------------------------------


@post("/api/sessions", status_code=200)
async def create_session(request: Request) -> dict[str, Any]:
    """No body (reference), or a JSON object of TurnOptions used as the session's defaults."""
    options: dict[str, Any] = {}
    if (await request.body()).strip():
        options = (await decode_body(request, TurnOptions, WebUIError)).resolved()
    session = sessions_of(request).create(options)
    return {"sessionId": session.id, "createdAt": created_iso(session.created_at)}


@delete("/api/sessions/{sid:str}", status_code=200)
async def delete_session(request: Request, sid: FromPath[str]) -> dict[str, Any]:
    """Forget a session. A turn still streaming finishes but is no longer recorded."""
    if sid == DEFAULT_ID:
        raise OkError(400, "Cannot dispose the default session.")
    if sessions_of(request).remove(sid) is None:
        raise OkError(404, f"Session '{sid}' not found.")
    return {"ok": True, "sessionId": sid}


# -- models -----------------------------------------------------------------------------------


def _backend() -> str:
    return f"jax_{jax.default_backend()}"


_LABELS = {"cpu": "JAX CPU (XLA)", "gpu": "JAX GPU (XLA)", "tpu": "JAX TPU (XLA)"}


@get("/api/models")
async def list_models(request: Request) -> dict[str, Any]:
    """The model panel: the one hosted model, its architecture and the backend it runs on."""
    hub = hub_of(request)
    m = hub.model
    backend = _backend()
    return {
        "models": [m.name] if m else [],
        "mmProjModels": [],
        "loaded": m.name if m and hub.ready else None,
        "loadedMmProj": None,
        "loadedBackend": backend if hub.ready else None,
        "defaultBackend": backend,
        "supportedBackends": [
            {"value": backend, "label": _LABELS.get(jax.default_backend(), backend)}
        ],
        "architecture": m.config.architecture if m else None,
        "hostedModelPath": str(m.path.resolve()) if m else None,
        "hostedMmProjPath": None,
        "defaultMaxTokens": m.max_len if m else hub.settings.max_len,
        "contextLength": m.max_len if m else None,
        "status": "ready" if hub.ready else ("error" if hub.error else "loading"),
        "error": hub.error or None,
    }


def _backend_ok(requested: str | None) -> bool:
    """Blank, our canonical name, or the bare/ggml platform name (`cpu`, `ggml_cuda`)."""
    name = (requested or "").strip().lower()
    if not name:
        return True
    for prefix in ("jax_", "ggml_"):
        name = name.removeprefix(prefix)
    name = {"cuda": "gpu", "metal": "gpu"}.get(name, name)
    return name == jax.default_backend()


class _Status400(OkError):
    """check_model's not-hosted 404 becomes the reference's 400 for /api/models/load."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(400, message, param)


@post("/api/models/load", status_code=200)
async def load_model(request: Request) -> dict[str, Any]:
    """Only the hosted model can be "loaded": one model per process, compiled at startup. A
    matching request succeeds at once (weights on the device never change, so the reference's
    full reload would only cost time); anything else is a 400 that says how to switch."""
    hub = hub_of(request)
    body = await decode_body(request, LoadBody, OkError)
    if not (body.model or "").strip():
        raise OkError(400, "model is required")
    if not _backend_ok(body.backend):
        raise OkError(400, f"Backend '{body.backend}' is not supported on this machine.")
    model, _ = hub.live(OkError)
    check_model(body.model, model, _Status400)
    mmproj = (body.mmproj or "").strip()
    if mmproj and mmproj.lower() != "none":
        raise OkError(
            400,
            "This server was started without a multimodal projector; tsjax serves text-only "
            "models. Omit mmproj.",
        )
    return {"ok": True, "model": model.name, "loadedMmProj": None,
            "architecture": model.config.architecture, "reloaded": False}  # fmt: skip


# -- uploads ----------------------------------------------------------------------------------

_MEDIA = {
    "image": ".png .jpg .jpeg .gif .webp .bmp .heic .heif",
    "video": ".mp4 .mov .avi .mkv .webm",
    "audio": ".mp3 .wav .ogg .flac .m4a",
    "text": ".txt .csv .json .xml .md .log .py .js .ts .cs .java .cpp .c .h .html .css .yaml "
    ".yml .toml .ini .cfg .sh .bat .ps1 .rb .go .rs .swift .kt .sql .r .m .tex .rtf",
}
_KIND = {ext: kind for kind, exts in _MEDIA.items() for ext in exts.split()}
_EXT = re.compile(r"^\.[a-z0-9]{1,10}$")
_STORED = re.compile(r"^[0-9a-f]{32}(\.[a-z0-9]{1,10})?$")


def _base_name(name: str) -> str:
    """The last path component under either separator: what the user's file was called."""
    return PureWindowsPath(PurePosixPath(name or "").name).name.strip() or "upload"


def _truncate(hub: Hub, text: str) -> dict[str, Any]:
    """Text uploads are cut to half the context in tokens, or to characters with no model."""
    model = hub.model
    if model is None or not hub.ready:
        cut = text[:MAX_TEXT_FILE_CHARS]
        return {"textContent": cut, "truncated": len(cut) < len(text),
                "truncateLimit": MAX_TEXT_FILE_CHARS, "truncateUnit": "characters",
                "modelContextLimit": None, "originalTokenCount": None,
                "returnedTokenCount": None}  # fmt: skip
    tok, limit = model.tokenizer, max(1, model.max_len // 2)
    ids = tok.encode(text, add_bos=False, add_eos=False, parse_special=False)
    cut = tok.decode(ids[:limit]) if len(ids) > limit else text
    returned = len(tok.encode(cut, add_bos=False, add_eos=False, parse_special=False))
    return {"textContent": cut, "truncated": len(ids) > limit, "truncateLimit": limit,
            "truncateUnit": "tokens", "modelContextLimit": model.max_len,
            "originalTokenCount": len(ids), "returnedTokenCount": returned}  # fmt: skip


def _too_large(limit: int) -> WebUIError:
    return WebUIError(413, f"upload exceeds the limit of {limit} bytes (max_upload_bytes)")


@post("/api/upload", status_code=200)
async def upload(request: Request) -> dict[str, Any]:
    """Save the first file part under a random name in the upload directory (the client's
    file name only picks the extension, so no name can write elsewhere). With a `sessionId`
    form field the file also waits for that session's next turn."""
    hub = hub_of(request)
    limit = hub.settings.max_upload_bytes
    if request.content_type[0] != "multipart/form-data":
        raise WebUIError(400, "Expected multipart form data")
    if (request.content_length or 0) > limit:
        raise _too_large(limit)
    try:
        form = await request.form()
    except RequestEntityTooLarge as e:
        raise _too_large(limit) from e
    except UnicodeDecodeError as e:  # a part without a filename holding binary data
        raise WebUIError(400, "No file uploaded (the file part has no filename)") from e
    except HTTPException as e:  # e.g. no multipart boundary
        raise WebUIError(e.status_code, f"malformed multipart body: {e.detail}") from e
    file = next((v for v in form.values() if isinstance(v, UploadFile)), None)
    if file is None:
        raise WebUIError(400, "No file uploaded")
    session = None
    sid = form.get("sessionId")
    if isinstance(sid, str) and sid.strip():
        session = sessions_of(request).get(sid)
        if session is None:
            raise WebUIError(404, f"Session '{sid}' not found or has been disposed.")
    data = await file.read()
    if len(data) > limit:
        raise _too_large(limit)
    name = _base_name(file.filename)
    ext = Path(name).suffix.lower()
    ext = ext if _EXT.match(ext) else ""
    root = upload_dir(hub)
    dest = root / f"{secrets.token_hex(16)}{ext}"
    assert dest.resolve().parent == root  # by construction; guards future edits
    dest.write_bytes(data)
    kind = _KIND.get(ext, "unknown")
    out: dict[str, Any] = {"ok": True, "path": str(dest), "mediaType": kind, "fileName": name,
                           "size": len(data)}  # fmt: skip
    if kind == "text":
        out |= _truncate(hub, data.decode("utf-8-sig", errors="replace"))
        dest.write_text(out["textContent"], "utf-8")  # what the next turn will inline
    elif kind == "video":
        out |= {"frames": [], "framePaths": []}  # no frame extraction: text-only models
    if session is not None:
        session.pending.append(Upload(dest, kind, name))
        out["sessionId"] = session.id
    return out


@get("/uploads/{name:str}", include_in_schema=False)
async def uploaded(request: Request, name: FromPath[str]) -> File:
    """Previews for the UI. Only names this server generated are served."""
    root = upload_dir(hub_of(request))
    path = root / name if _STORED.match(name) else None
    if path is None or not path.is_file():
        raise WebUIError(404, "no such upload")
    return File(path)


router = Router(
    path="/",
    route_handlers=[
        chat_alias,
        create_session,
        delete_session,
        list_models,
        load_model,
        upload,
        uploaded,
    ],  # fmt: skip
)


def state(settings: Any) -> dict[str, Any]:
    """What create_app puts in app.state for this adapter."""
    return {"sessions": SessionStore.from_settings(settings), "webui_chat": webui_chat}
