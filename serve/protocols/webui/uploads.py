"""The Web UI's uploads: `POST /api/upload` saves a file under a random name in the upload
directory (and queues it for a session's next turn), `GET /uploads/{name}` serves previews.
Names the client sends only pick the extension, so no upload can land outside the directory,
and only names this server generated are ever served back.
"""

from __future__ import annotations

import re
import secrets
import tempfile
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from litestar import Request, Router, get, post
from litestar.datastructures import UploadFile
from litestar.exceptions import HTTPException
from litestar.exceptions.http_exceptions import RequestEntityTooLarge
from litestar.params import FromPath
from litestar.response import File

from serve.errors import ApiError
from serve.protocols.webui.errors import render_error
from serve.protocols.webui.sessions import sessions_of
from serve.sessions import Upload
from serve.state import Hub, hub_of

MAX_TEXT_FILE_CHARS = 8000  # text upload cap when no tokenizer is loaded (reference default)


def upload_dir(hub: Hub) -> Path:
    """`upload_dir` from the settings when defined, else a per-user temp folder."""
    configured = hub.settings.upload_dir
    path = Path(configured) if configured else Path(tempfile.gettempdir()) / "tsjax-uploads"
    path.mkdir(parents=True, exist_ok=True)
    return path.resolve()


def inside(path: str, root: Path) -> Path | None:
    """`path` resolved, if it names a file directly inside `root` (no traversal, no links out)."""
    try:
        p = Path(path).resolve()
    except (OSError, RuntimeError, ValueError):
        return None
    return p if p.parent == root and p.is_file() else None


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


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"upload exceeds the limit of {limit} bytes (max_upload_bytes)")


@post("/api/upload", status_code=200)
async def upload(request: Request) -> dict[str, Any]:
    """Save the first file part under a random name in the upload directory (the client's
    file name only picks the extension, so no name can write elsewhere). With a `sessionId`
    form field the file also waits for that session's next turn."""
    hub = hub_of(request)
    limit = hub.settings.max_upload_bytes
    if request.content_type[0] != "multipart/form-data":
        raise ApiError(400, "Expected multipart form data")
    if (request.content_length or 0) > limit:
        raise _too_large(limit)
    try:
        form = await request.form()
    except RequestEntityTooLarge as e:
        raise _too_large(limit) from e
    except UnicodeDecodeError as e:  # a part without a filename holding binary data
        raise ApiError(400, "No file uploaded (the file part has no filename)") from e
    except HTTPException as e:  # e.g. no multipart boundary
        raise ApiError(e.status_code, f"malformed multipart body: {e.detail}") from e
    file = next((v for v in form.values() if isinstance(v, UploadFile)), None)
    if file is None:
        raise ApiError(400, "No file uploaded")
    session = None
    sid = form.get("sessionId")
    if isinstance(sid, str) and sid.strip():
        session = sessions_of(request).get(sid)
        if session is None:
            raise ApiError(404, f"Session '{sid}' not found or has been disposed.")
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
        raise ApiError(404, "no such upload")
    return File(path)


router = Router(
    path="/", route_handlers=[upload, uploaded], exception_handlers={ApiError: render_error}
)
