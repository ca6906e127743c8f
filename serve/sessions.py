"""Web UI sessions: one conversation per browser tab, kept server-side between turns.

A session remembers the last turn's messages with the *raw token ids* of each assistant answer.
The next turn's prompt is rendered with those ids spliced in place of the answer text, so it
starts with exactly the tokens the engine left in a cache row and prefix reuse covers the whole
previous turn, even when the client sends back an edited or tag-stripped answer. The store also
holds per-session defaults (sampling, think, maxTokens) and uploads waiting for the next turn.

Sessions live in memory: idle ones expire after a TTL and the least recently used go first
when the store is full. The built-in `__default__` session (used when a request names none)
never expires and cannot be deleted, as in the reference server.
"""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

DEFAULT_ID = "__default__"


@dataclass
class TrackedMessage:
    """One message of the last turn; `raw` holds an assistant answer's generated token ids."""

    role: str
    content: str | list[Any]  # a list: text and image parts (`serve.translation.intent`)
    raw: list[int] | None = None


@dataclass
class Upload:
    """A file saved by /api/upload and waiting to be attached to the session's next turn."""

    path: Path
    media_type: str  # image | audio | video | text | unknown
    file_name: str
    # a video's frames, as images (serve/translation/video.py)
    frames: list[Path] = field(default_factory=list)


@dataclass
class Session:
    id: str
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    last_used: float = field(default_factory=time.monotonic)
    history: list[TrackedMessage] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)  # defaults for this session's turns
    pending: list[Upload] = field(default_factory=list)
    # Uploads this session holds (pending or used in a turn): never expired while it lives.
    held: set[Path] = field(default_factory=set)
    disposed: bool = False

    def reset(self) -> None:
        """Forget the conversation (a `newChat` turn); uploads and options stay."""
        self.history = []

    def take_pending(self) -> list[Upload]:
        out, self.pending = self.pending, []
        return out

    def dispose(self) -> None:
        """Clear everything and delete uploads nobody will use any more. Idempotent."""
        self.history = []
        for up in self.pending:
            up.path.unlink(missing_ok=True)
            for frame in up.frames:  # the folder itself goes with the upload TTL
                frame.unlink(missing_ok=True)
        self.pending = []
        self.held = set()  # files used in turns expire with the upload TTL from now on
        self.disposed = True


def created_iso(when: datetime) -> str:
    """ISO-8601 UTC with 7 fractional digits and a `Z`, the reference's `createdAt` format."""
    return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond:06d}0Z"


class SessionStore:
    """Thread-safe id -> Session map with TTL and size eviction."""

    def __init__(self, *, ttl_seconds: float = 3600.0, max_sessions: int = 256):
        self.ttl_seconds = ttl_seconds
        self.max_sessions = max(1, max_sessions)
        self._lock = threading.Lock()
        self._sessions: dict[str, Session] = {DEFAULT_ID: Session(DEFAULT_ID)}

    @classmethod
    def from_settings(cls, settings: Any) -> SessionStore:
        """Read `session_ttl_seconds` / `max_sessions` when the settings define them."""
        return cls(
            ttl_seconds=float(settings.session_ttl_seconds),
            max_sessions=int(settings.max_sessions),
        )

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)

    def create(self, options: dict[str, Any] | None = None) -> Session:
        with self._lock:
            self._evict(time.monotonic(), room_for=1)
            sid = secrets.token_hex(16)
            while sid in self._sessions:  # 128 random bits: never, but cheap to rule out
                sid = secrets.token_hex(16)
            session = Session(sid, options=dict(options or {}))
            self._sessions[sid] = session
            return session

    def get(self, sid: str | None) -> Session | None:
        """Blank -> the default session; unknown or expired -> None. Touches last-used."""
        key = sid.strip() if sid else ""
        with self._lock:
            now = time.monotonic()
            self._evict(now)
            session = self._sessions.get(key or DEFAULT_ID)
            if session is not None:
                session.last_used = now
            return session

    def held(self) -> set[Path]:
        """Every upload a live session holds (expired sessions are dropped first)."""
        with self._lock:
            self._evict(time.monotonic())
            return {p for s in self._sessions.values() for p in s.held}

    def remove(self, sid: str) -> Session | None:
        """Unregister and dispose; the default session is never removed (returns None)."""
        if sid == DEFAULT_ID:
            return None
        with self._lock:
            session = self._sessions.pop(sid, None)
        if session is not None:
            session.dispose()
        return session

    def _evict(self, now: float, room_for: int = 0) -> None:
        """Drop expired sessions, then the least recently used until `room_for` fits."""
        for sid, s in list(self._sessions.items()):
            if sid != DEFAULT_ID and now - s.last_used > self.ttl_seconds:
                self._sessions.pop(sid).dispose()
        victims = sorted(
            (s for s in self._sessions.values() if s.id != DEFAULT_ID), key=lambda s: s.last_used
        )
        excess = len(self._sessions) + room_for - self.max_sessions
        for s in victims[: max(0, excess)]:
            self._sessions.pop(s.id).dispose()
