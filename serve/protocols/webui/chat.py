"""The Web UI's chat: `POST /api/chat` without `model` (and `/api/webui/chat`), one streamed
turn of a session's conversation as SSE.

Wire shapes follow the reference server's browser protocol (`data: <json>` frames with no
`event:` lines: `queue_position`, `thinking`, `token`, then one `done` summary). Where the
reference loses information or trusts the client too much we do better and say so in the
README ("Differences from the reference server"): bad JSON is a 400 with a body, `tokenCount`
counts tokens, media paths can never leave the upload directory, and the default answer length
is bounded by the context window instead of failing.

Prefix reuse needs no help from this module: the engine picks the cache row sharing the longest
prefix, and the session's recorded raw tokens, spliced in by the shared prompt rendering
(serve/translation/prompt.py), make that prefix the whole previous turn.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
from litestar import Request, Response, Router, post
from litestar.params import JSONBody

from serve.bodies import StrictBody, decode_body, required
from serve.engine import EventKind, FinishReason, GenerationRequest, Stats
from serve.errors import ApiError
from serve.outputs import ContentDelta, OutputEvent, ReasoningDelta, ToolCallEnd
from serve.protocols.webui.errors import render_error
from serve.protocols.webui.sessions import TurnOptions, sessions_of
from serve.protocols.webui.uploads import uploads_of
from serve.sessions import Session, TrackedMessage, Upload
from serve.settings import Settings
from serve.state import Hub, hub_of
from serve.streaming import sse_response
from serve.translation import Intent, Reply, Sampling, prepare
from serve.translation.intent import ImageInput, image_part
from serve.translation.options import ollama_format, openai_format, stop_of
from serve.translation.video import DEFAULT_MAX_FRAMES, frame_parts, max_frames
from serve.uploads import FRAMES_DIR, UploadStore
from tsjax.model import Model

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


# -- /api/chat --------------------------------------------------------------------------------


def _user_media(
    body: ChatBody, store: UploadStore, session: Session, sees: bool, hears: bool = False
) -> int:
    """Check every media path names an upload (the session holds it from now on, so it does
    not expire under the conversation); return how many the model will not see: audio for a
    model without an audio encoder, and images (video frames among them) for a model without
    a projector (ignored, as the reference does without one). `sees`: the model takes
    images; `hears`: audio (Gemma 4's projector)."""
    count = 0
    for m in body.messages:
        for path in (m.imagePaths or []) + (m.audioPaths or []) + (m.textFilePaths or []):
            found = store.inside(path)
            if found is None:
                raise ApiError(400, f"media path '{path}' is not a file uploaded to this server")
            session.held.add(found)
        images = m.imagePaths or []
        count += (0 if hears else len(m.audioPaths or [])) + (0 if sees else len(images))
    return count


def _attach_pending(
    messages: list[dict[str, Any]], pending: list[Upload], listed: set[str], media: _Media
) -> int:
    """Inline pending text uploads at the front of the last user message, as the UI does
    itself, and (for a model that sees) pending images and videos' frames (for one that
    hears, audio clips) not listed in a message before its text; returns the number of
    pending media files the model cannot see."""
    texts, images, ignored = [], [], 0
    for up in pending:
        if up.media_type == "text" and str(up.path) not in listed:
            body = up.path.read_text("utf-8", errors="replace")
            texts.append(f"[File: {up.file_name}]\n{body}\n[End of file]")
        elif up.media_type == "image" and media.sees:
            if str(up.path) not in listed:
                image = ImageInput(path=str(up.path), where=f"upload {up.file_name}")
                images.append(image_part(image))
        elif up.media_type == "video" and media.sees and up.frames:
            frames = [ImageInput(path=str(p), where=f"upload {up.file_name}") for p in up.frames
                      if str(p) not in listed]  # fmt: skip
            images += _image_parts(frames, True, media)
        elif up.media_type == "audio" and media.hears:
            if str(up.path) not in listed:
                clip = ImageInput(path=str(up.path), where=f"upload {up.file_name}", kind="audio")
                images.append(image_part(clip))
        elif up.media_type != "text":
            ignored += 1
    users = [m for m in messages if m["role"] == "user"]
    if texts and users:
        typed = _text_of(users[-1]["content"])
        joined = "\n\n".join(texts) + (f"\n\n{typed}" if typed else "")
        users[-1]["content"] = _with_text(users[-1]["content"], joined)
    if images and users:
        users[-1]["content"] = _with_parts(users[-1]["content"], images)
    return ignored


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "\n".join(p["text"] for p in content if p.get("type") == "text")


def _with_text(content: Any, text: str) -> Any:
    """Content with its text replaced by `text` (its images kept before it)."""
    if isinstance(content, str):
        return text
    images = [p for p in content if p.get("type") != "text"]
    return images + [{"type": "text", "text": text}]


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
    """POST /api/chat without `model` (Ollama's /api/chat hands such bodies over)."""
    return await chat_turn(request, await decode_body(request, ChatBody))


async def chat_turn(request: Request, body: ChatBody) -> Response:
    """One streamed turn of a session's conversation."""
    hub = hub_of(request)
    if (body.model or "").strip() or (body.backend or "").strip():
        raise ApiError(
            400,
            "Use /api/models/load to choose a model before chatting. "
            "Changing models during chat is not supported.",
        )
    store = sessions_of(request)
    session = store.get(body.sessionId)
    if session is None or session.disposed:
        raise ApiError(404, f"Session '{body.sessionId}' not found or has been disposed.")
    if body.newChat:
        session.reset()
    model, _ = hub.live()  # a 503 before the session's pending uploads are taken
    media = _Media.of(model, hub.settings)
    uploads = uploads_of(request)
    ignored = _user_media(body, uploads, session, media.sees, media.hears)
    messages = [_message(m, i, uploads, media) for i, m in enumerate(body.messages)]
    listed = {p for m in body.messages for p in (m.textFilePaths or []) + (m.imagePaths or [])}
    listed |= {p for m in body.messages for p in m.audioPaths or []}
    listed = {str(uploads.inside(p) or p) for p in listed}
    ignored += _attach_pending(messages, session.take_pending(), listed, media)
    prep = await prepare(hub, _intent(body, session, messages))
    turns = prep.prompt.turns
    return sse_response(_turn(hub, prep.request, session, prep.reply, turns, ignored))


def _intent(body: ChatBody, session: Session, messages: list[dict[str, Any]]) -> Intent:
    """The turn in neutral terms: the session's defaults under the turn's own options, and the
    session's history to splice. No maxTokens: answer until the window is full (the
    reference's 20000 fails instead)."""
    opts = session.options | body.resolved()
    sampling = Sampling(**{k: opts[k] for k in Sampling.__struct_fields__ if k in opts})
    return Intent(
        messages=messages,
        sampling=sampling,
        max_tokens=opts.get("max_tokens", 0),
        stop=stop_of(opts.get("stop", msgspec.UNSET)),
        tools=body.tools,
        tool_choice=body.tool_choice,
        output=ollama_format(body.format) or openai_format(body.response_format),
        think=opts.get("think"),
        effort=opts.get("effort"),
        history=session.history,
        stream=True,
    )


@dataclass(frozen=True)
class _Media:
    """How this model takes a message's media: `sees` images at all; `gemma4`: videos laid
    out as Gemma 4 takes them (timed frames, at most `limit` per video on every turn);
    `hears` audio clips (a projector with an audio encoder: Gemma 4's)."""

    sees: bool
    gemma4: bool = False
    limit: int = DEFAULT_MAX_FRAMES
    hears: bool = False

    @classmethod
    def of(cls, model: Model, settings: Settings) -> _Media:
        gemma4 = model.config.architecture == "gemma4"
        proj = model.projector
        limit = max_frames(settings.video_max_frames)
        return cls(proj is not None, gemma4, limit, proj is not None and proj.audio is not None)


def _message(m: WebMessage, i: int, uploads: UploadStore, media: _Media) -> dict[str, Any]:
    """Role and content (a model that sees gets the message's images, a video's frames among
    them, before its text, as the reference places them; one that hears, its audio clips
    after the images); an assistant turn's tool calls too, so a tool loop renders."""
    content: Any = m.content or ""
    parts: list[dict[str, Any]] = []
    if media.sees and m.imagePaths:
        images = [ImageInput(path=str(uploads.inside(p)), where=f"messages[{i}].imagePaths[{j}]")
                  for j, p in enumerate(m.imagePaths)]  # fmt: skip
        parts = _image_parts(images, m.isVideo, media)
    if media.hears and m.audioPaths:
        parts += [image_part(ImageInput(path=str(uploads.inside(p)), kind="audio",
                                        where=f"messages[{i}].audioPaths[{j}]"))
                  for j, p in enumerate(m.audioPaths)]  # fmt: skip
    content = _with_parts(content, parts)
    msg: dict[str, Any] = {"role": m.role, "content": content}
    if m.tool_calls:
        msg["tool_calls"] = m.tool_calls
    return msg


def _image_parts(images: list[ImageInput], video: bool, media: _Media) -> list[dict[str, Any]]:
    """A message's images as content parts. In a video message for Gemma 4, the frames (files
    in a frames directory: `serve.translation.video`) of each video follow the still images,
    timed and at most `media.limit` of them (`frame_parts`); other models take every frame as
    an image, as the reference does."""
    if not (video and media.gemma4):
        return [image_part(img) for img in images]
    stills: list[dict[str, Any]] = []
    videos: dict[Path, list[ImageInput]] = {}
    for img in images:
        folder = Path(img.path or "").parent
        if FRAMES_DIR.match(folder.name):
            videos.setdefault(folder, []).append(img)
        else:
            stills.append(image_part(img))
    timed = [frame_parts(frames, media.limit, gemma4=True) for frames in videos.values()]
    return stills + [part for parts in timed for part in parts]


def _with_parts(content: Any, parts: list[dict[str, Any]]) -> Any:
    """Content with media `parts` before its text (Web UI paths, as the reference puts them)."""
    if not parts:
        return content
    if isinstance(content, list):
        return parts + content
    return parts + ([{"type": "text", "text": content}] if content else [])


@post("/api/webui/chat", status_code=200, dto=StrictBody[ChatBody], return_dto=None)
async def chat_alias(request: Request, data: JSONBody[ChatBody | None] = None) -> Response:
    """The same protocol at a path no Ollama client claims (for UIs that want certainty)."""
    return await chat_turn(request, required(data))


router = Router(path="/", route_handlers=[chat_alias], exception_handlers={ApiError: render_error})
