"""The Web UI dialect (the reference server's browser protocol), one module per concern:

* `chat`: `POST /api/chat` without `model` (and `/api/webui/chat`), a turn streamed as SSE;
* `sessions`: the sessions API and the per-turn options a session keeps as defaults;
* `uploads`: `POST /api/upload` and the `/uploads/{name}` previews;
* `models`: the model panel (`GET /api/models`, `POST /api/models/load`);
* `errors`: the protocol's two error shapes.
"""

from __future__ import annotations

from typing import Any

from litestar import Router

from serve.protocols.webui import chat, models, sessions, uploads
from serve.sessions import SessionStore
from serve.settings import Settings
from serve.uploads import UploadStore

router = Router(
    path="/", route_handlers=[chat.router, sessions.router, models.router, uploads.router]
)


def state(settings: Settings) -> dict[str, Any]:
    """What create_app puts in app.state for this adapter: the session store, the upload
    directory (created private, or refused: ValueError), and the chat handler Ollama's
    `/api/chat` hands bodies without `model` to."""
    sessions = SessionStore.from_settings(settings)
    uploads = UploadStore.from_settings(settings, held=sessions.held)
    return {"sessions": sessions, "uploads": uploads, "webui_chat": chat.webui_chat}
