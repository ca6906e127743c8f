"""The request log: every request's id, and one log line for every error answer.

The id is the client's `X-Request-Id` when it sends a sane one (letters, digits, `-_.:`, at
most 128 characters), else a fresh random one; it is echoed in the `X-Request-Id` response
header of every answer (streams and errors too), kept in a context variable while the request
runs (worker threads started through `Hub.offload` see it too), and stamped on every log record
as `request_id` (`install_log_ids`, which `tsjax serve` calls; structured handlers read it as a
record attribute). An answer with status 400 or more is logged with its id, method, path,
status and the error message from its body: INFO for client errors, ERROR for server errors
(DEBUG for `/health`'s 503 while the model loads: probes poll it).
"""

from __future__ import annotations

import json
import logging
import re
import secrets
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import Any

log = logging.getLogger("tsjax.serve.requests")

REQUEST_ID: ContextVar[str] = ContextVar("tsjax_request_id", default="-")
HEADER = b"x-request-id"
_SANE = re.compile(rb"^[A-Za-z0-9._:-]{1,128}$")
_KEPT = 2048  # bytes of an error body kept for its log line

ASGI = Callable[[Any, Any, Any], Awaitable[None]]


def request_id_of(scope: dict[str, Any]) -> str:
    """The client's request id if it sent a sane one, else a new one (16 hex digits)."""
    for name, value in scope.get("headers", ()):
        if name == HEADER and _SANE.match(value):
            return value.decode()
    return secrets.token_hex(8)


def error_message(body: bytes) -> str:
    """The message of an error body in any of the API styles' shapes (`{"error": "..."}`,
    `{"error": {"message": ...}}`), or the start of the body as text."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return body[:200].decode("utf-8", "replace")
    err = data.get("error") if isinstance(data, dict) else None
    if isinstance(err, dict):
        err = err.get("message")
    return str(err if err is not None else data)[:500]


async def serve(app: ASGI, scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Run `app` for one HTTP request with its id set, echoed and logged on errors."""
    rid = request_id_of(scope)
    token = REQUEST_ID.set(rid)
    scope.setdefault("state", {})["request_id"] = rid
    status, kept = 0, bytearray()

    async def tapped(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
            message["headers"] = [*message.get("headers", ()), (HEADER, rid.encode())]
        elif message["type"] == "http.response.body" and status >= 400 and len(kept) < _KEPT:
            kept.extend(message.get("body", b"")[: _KEPT - len(kept)])
        await send(message)

    try:
        await app(scope, receive, tapped)
    finally:
        if status >= 400:
            level = logging.ERROR if status >= 500 else logging.INFO
            method, path = scope.get("method", ""), scope.get("path", "")
            if path == "/health" and status == 503:
                level = logging.DEBUG  # "still loading" to a readiness probe: not an error
            log.log(level, "request_id=%s %s %s -> %d: %s", rid, method, path, status,
                    error_message(bytes(kept)),
                    extra={"status": status, "method": method, "path": path})  # fmt: skip
        REQUEST_ID.reset(token)


def install_log_ids() -> None:
    """Give every log record a `request_id` attribute (the current request's, or "-"), so a
    format string or a structured handler can show it."""
    previous = logging.getLogRecordFactory()
    if getattr(previous, "_tsjax_ids", False):
        return

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        if not hasattr(record, "request_id"):
            record.request_id = REQUEST_ID.get()
        return record

    factory._tsjax_ids = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)
