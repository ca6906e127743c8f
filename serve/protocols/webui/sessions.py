"""The Web UI's sessions API: `POST /api/sessions` (with optional per-session defaults) and
`DELETE /api/sessions/{id}`. The store itself is serve/sessions.py."""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Request, Router, delete, post
from litestar.params import FromPath

from serve.bodies import decode_body
from serve.errors import ApiError
from serve.protocols.webui.errors import render_error, render_ok_error
from serve.sessions import DEFAULT_ID, SessionStore, created_iso
from serve.translation.options import effort_of, think_of


class TurnOptions(msgspec.Struct):
    """Per-turn knobs, also accepted by POST /api/sessions as the session's defaults.
    Both spellings are accepted; camelCase wins when both are given, as in the reference."""

    maxTokens: int | None = None  # noqa: N815
    think: bool | str | None = None  # or an effort level ("low", "medium", "high")
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
        """Given fields only, under the names of the neutral request (`Intent`, `Sampling`)."""
        pairs = {
            "max_tokens": self.maxTokens,
            "think": think_of(self.think),
            "effort": effort_of(self.think),
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


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def sessions_of(request: Request) -> SessionStore:
    return request.app.state.sessions


# A bad body here is a plain `{"error"}`, as the reference's body-taking endpoints answer.
@post("/api/sessions", status_code=200, exception_handlers={ApiError: render_error})
async def create_session(request: Request) -> dict[str, Any]:
    """No body (reference), or a JSON object of TurnOptions used as the session's defaults."""
    options: dict[str, Any] = {}
    if (await request.body()).strip():
        options = (await decode_body(request, TurnOptions)).resolved()
    session = sessions_of(request).create(options)
    return {"sessionId": session.id, "createdAt": created_iso(session.created_at)}


@delete("/api/sessions/{sid:str}", status_code=200)
async def delete_session(request: Request, sid: FromPath[str]) -> dict[str, Any]:
    """Forget a session. A turn still streaming finishes but is no longer recorded."""
    if sid == DEFAULT_ID:
        raise ApiError(400, "Cannot dispose the default session.")
    if sessions_of(request).remove(sid) is None:
        raise ApiError(404, f"Session '{sid}' not found.")
    return {"ok": True, "sessionId": sid}


router = Router(
    path="/",
    route_handlers=[create_session, delete_session],
    exception_handlers={ApiError: render_ok_error},
)
