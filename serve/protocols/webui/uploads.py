"""The Web UI's uploads: `POST /api/upload` saves a file under a random name in the upload
directory (and queues it for a session's next turn), `GET /uploads/{name}` serves previews.
Names the client sends only pick the extension, so no upload can land outside the directory,
and only names this server generated are ever served back. The directory itself (private
files, the quota, the expiry of files no session holds) is serve/uploads.py's; the request
guard admits an upload only with the Web UI's `X-TSJAX-UI` header or an API key.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from litestar import Request, Router, get, post
from litestar.datastructures import UploadFile
from litestar.exceptions import HTTPException
from litestar.exceptions.http_exceptions import RequestEntityTooLarge
from litestar.params import FromPath
from litestar.response import File
from multipart import ParserLimitReached

from serve.errors import ApiError
from serve.guard import UPLOAD
from serve.protocols.webui.errors import render_error
from serve.protocols.webui.sessions import sessions_of
from serve.sessions import Upload
from serve.state import Hub, hub_of
from serve.translation.prompt import max_prompt_chars
from serve.translation.video import VideoError, extract_frames, frame_name, max_frames
from serve.uploads import UploadStore
from tsjax.model import Model

MAX_TEXT_FILE_CHARS = 8000  # text upload cap when no tokenizer is loaded (reference default)
MAX_NAME_CHARS = 255  # a file name, as most file systems allow


def uploads_of(request: Request) -> UploadStore:
    return request.app.state.uploads


_MEDIA = {
    "image": ".png .jpg .jpeg .gif .webp .bmp .heic .heif",
    "video": ".mp4 .mov .avi .mkv .webm",
    "audio": ".mp3 .wav .ogg .flac .m4a",
    "text": ".txt .csv .json .xml .md .log .py .js .ts .cs .java .cpp .c .h .html .css .yaml "
    ".yml .toml .ini .cfg .sh .bat .ps1 .rb .go .rs .swift .kt .sql .r .m .tex .rtf",
}
_KIND = {ext: kind for kind, exts in _MEDIA.items() for ext in exts.split()}
_EXT = re.compile(r"^\.[a-z0-9]{1,10}$")


def _base_name(name: str) -> str:
    """The last path component under either separator: what the user's file was called."""
    return PureWindowsPath(PurePosixPath(name or "").name).name.strip() or "upload"


def _read_text(file: UploadFile, chars: int) -> tuple[str, bool]:
    """The file's first `chars` characters at most (reading 4 bytes a character, the most
    UTF-8 takes), and whether there was more. Blocking."""
    file.file.seek(0)
    data = file.file.read(4 * chars + 4)
    more = bool(file.file.read(1))
    text = data.decode("utf-8-sig", errors="replace")
    return text[:chars], more or len(text) > chars


def _truncate(model: Model | None, file: UploadFile) -> dict[str, Any]:
    """Text uploads are cut to half the context in tokens, or to characters with no model.
    Blocking (tokenizing): run through `Hub.offload`. Only as many characters as could make
    the limit are read and tokenized (`max_prompt_chars`); when the file had more, its token
    count is unknown (`originalTokenCount` null) and it is truncated."""
    if model is None:
        cut, more = _read_text(file, MAX_TEXT_FILE_CHARS)
        return {"textContent": cut, "truncated": more,
                "truncateLimit": MAX_TEXT_FILE_CHARS, "truncateUnit": "characters",
                "modelContextLimit": None, "originalTokenCount": None,
                "returnedTokenCount": None}  # fmt: skip
    tok, limit = model.tokenizer, max(1, model.max_len // 2)
    text, more = _read_text(file, max_prompt_chars(model, limit + 16))
    ids = tok.encode(text, add_bos=False, add_eos=False, parse_special=False)
    cut = tok.decode(ids[:limit]) if len(ids) > limit else text
    returned = len(tok.encode(cut, add_bos=False, add_eos=False, parse_special=False))
    return {"textContent": cut, "truncated": more or len(ids) > limit, "truncateLimit": limit,
            "truncateUnit": "tokens", "modelContextLimit": model.max_len,
            "originalTokenCount": None if more else len(ids),
            "returnedTokenCount": returned}  # fmt: skip


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"the upload is larger than {limit} bytes (max_upload_bytes)")


def _multipart_error(e: HTTPException) -> ApiError:
    """Litestar's multipart errors in our terms: a part header over the parser's 4 KiB limit
    (a file name that long) is a 400 that says so, not "Request Entity Too Large"."""
    cause = e.__context__
    if isinstance(cause, ParserLimitReached) and "header" in str(cause):
        return ApiError(400, f"a form part's header is too long ({cause}): file names are "
                        f"limited to {MAX_NAME_CHARS} characters", "fileName")  # fmt: skip
    if isinstance(cause, ParserLimitReached):
        return ApiError(400, f"the multipart body has too many parts ({cause})")
    return ApiError(e.status_code, f"malformed multipart body: {e.detail}")


async def _form(request: Request, limit: int) -> Any:
    """The multipart form, with Litestar's errors as ours."""
    if request.content_type[0] != "multipart/form-data":
        raise ApiError(400, "Expected multipart form data")
    try:
        return await request.form()
    except RequestEntityTooLarge as e:
        raise _too_large(limit) from e
    except UnicodeDecodeError as e:  # a part without a filename holding binary data
        raise ApiError(400, "No file uploaded (the file part has no filename)") from e
    except HTTPException as e:  # no multipart boundary, a header over the parser's limit
        raise _multipart_error(e) from e


@post("/api/upload", status_code=200, opt={UPLOAD: True})
async def upload(request: Request) -> dict[str, Any]:
    """Save the first file part under a random name in the upload directory (the client's
    file name only picks the extension, so no name can write elsewhere). With a `sessionId`
    form field the file also waits for that session's next turn."""
    hub, store = hub_of(request), uploads_of(request)
    limit = hub.settings.max_upload_bytes
    form = await _form(request, limit)
    file = next((v for v in form.values() if isinstance(v, UploadFile)), None)
    if file is None:
        raise ApiError(400, "No file uploaded")
    session = None
    sid = form.get("sessionId")
    if isinstance(sid, str) and sid.strip():
        session = sessions_of(request).get(sid)
        if session is None:
            raise ApiError(404, f"Session '{sid}' not found or has been disposed.")
    name = _base_name(file.filename)
    if len(name) > MAX_NAME_CHARS:
        raise ApiError(400, f"the file name is too long ({len(name)} characters; at most "
                       f"{MAX_NAME_CHARS})", "fileName")  # fmt: skip
    size = await hub.offload(_size, file)
    if size > limit:
        raise _too_large(limit)
    ext = Path(name).suffix.lower()
    ext = ext if _EXT.match(ext) else ""
    dest = await hub.offload(store.save, file.file, size, ext)
    kind = _KIND.get(ext, "unknown")
    out: dict[str, Any] = {"ok": True, "path": str(dest), "mediaType": kind, "fileName": name,
                           "size": size}  # fmt: skip
    if kind == "text":
        model = hub.model if hub.ready else None
        out |= await hub.offload(_truncate, model, file)
        await hub.offload(store.rewrite, dest, out["textContent"])  # what a turn will inline
    frames: list[Path] = []
    if kind == "video":
        frames = await _video_frames(hub, store, dest)
        out |= {"frames": [p.name for p in frames], "framePaths": [str(p) for p in frames]}
    if session is not None:
        session.pending.append(Upload(dest, kind, name, frames))
        session.held.update([dest, *frames])
        out["sessionId"] = session.id
    return out


async def _video_frames(hub: Hub, store: UploadStore, video: Path) -> list[Path]:
    """Decode the frames a video is shown as (serve/translation/video.py) into a frames
    directory of the store. A video that cannot be read is a 400 (the reference answers 500)
    and is deleted."""
    limit = max_frames(hub.settings.video_max_frames)
    try:
        frames = await hub.offload(extract_frames, video, limit)
        named = [(frame_name(i + 1, f.seconds), f.png) for i, f in enumerate(frames)]
        return await hub.offload(store.save_frames, named)
    except VideoError as e:
        video.unlink(missing_ok=True)
        raise ApiError(400, f"the video cannot be used: {e}", "file") from e
    except ApiError:
        video.unlink(missing_ok=True)
        raise


def _size(file: UploadFile) -> int:
    """The spooled file's size, left at its start. Blocking."""
    size = file.file.seek(0, 2)
    file.file.seek(0)
    return size


@get("/uploads/{name:str}", include_in_schema=False)
async def uploaded(request: Request, name: FromPath[str]) -> File:
    """Previews for the UI. Only names this server generated are served."""
    path = uploads_of(request).find(name)
    if path is None:
        raise ApiError(404, "no such upload")
    return File(path)


router = Router(
    path="/", route_handlers=[upload, uploaded], exception_handlers={ApiError: render_error}
)
