"""What every request must show before a handler runs: a local `Host` while the server is bound
to loopback, a JSON content type where a browser on another site could have sent it, the Web
UI's header or an API key for uploads, and a body within its size and shape limits.

The threats, and why each check answers one (README, "Security"):

* DNS rebinding: a page on `evil.example` whose name is re-pointed at 127.0.0.1 talks to the
  server as same-origin. Its requests still carry `Host: evil.example`, so while bound to
  loopback only localhost names, loopback addresses and `allowed_hosts` are served (403).
* Cross-site "simple" requests: any page can make a browser POST `text/plain`, form-encoded
  or multipart bodies without a CORS preflight. JSON endpoints take `application/json` (and
  `+json`); the types a simple request can carry (none, `text/plain`, form-encoded) only from
  clients that are not a browser on another site (no `Origin` naming another host, no
  `Sec-Fetch-Site: cross-site|same-site`), so `curl -d '{...}'`, which sends form-encoded,
  keeps working (415 otherwise).
* Cross-site uploads: a multipart form from any page would write files. `POST /api/upload`
  needs the `X-TSJAX-UI` header (a custom header, which a page on another site can only send
  after a CORS preflight, which only `cors_origins` pass), 403 otherwise; with API keys set,
  the key guard asks every upload for a key instead.
* Size: JSON bodies are cut off at `max_body_bytes` while they stream in, uploads at
  `max_upload_bytes` (413); a JSON body's nesting and element count are checked before it is
  decoded (`serve.bodies.check_shape`; in a worker thread when large), since decoding holds
  the GIL.

Rejections are rendered in the route's own error shape by the `reject` callable the app
passes in (this module knows no wire format).
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

from serve.bodies import check_shape
from serve.errors import ApiError
from serve.settings import Settings

Reject = Callable[[Any, Any, Any, ApiError], Awaitable[None]]
ASGI = Callable[[Any, Any, Any], Awaitable[None]]

UI_HEADER = "x-tsjax-ui"
UPLOAD = "upload"  # route handler `opt` key: a multipart upload route, not a JSON one
UPLOAD_OVERHEAD = 1 << 20  # multipart framing and form fields beside the file
_INLINE_SCAN = 256 * 1024  # bodies larger than this are shape-checked in a worker thread
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_SIMPLE_TYPES = frozenset({"", "text/plain", "application/x-www-form-urlencoded"})
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1", "localhost.localdomain"})


def is_loopback(host: str) -> bool:
    """Whether `host` (a name or an address) only ever means this machine."""
    name = host.strip("[]").lower().rstrip(".")
    if name in LOOPBACK_NAMES or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def host_name(header: str) -> str:
    """The name in a `Host` header, without its port: `[::1]:5000` -> `::1`."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def host_allowed(settings: Settings, header: str | None) -> bool:
    """The DNS rebinding check: bound to loopback (or given `allowed_hosts`), a request must
    name a local host or an allowed one (`.example.com` allows its subdomains too)."""
    allowed = [h.lower().rstrip(".") for h in settings.allowed_hosts]
    if "*" in allowed or header is None or not (is_loopback(settings.host) or allowed):
        return True
    name = host_name(header).rstrip(".")
    if is_loopback(name) or name in allowed:
        return True
    return any(a.startswith(".") and (name.endswith(a) or name == a[1:]) for a in allowed)


def _media(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def is_json(content_type: str | None) -> bool:
    media = _media(content_type)
    return media == "application/json" or (media.startswith("application/") and
                                            media.endswith("+json"))  # fmt: skip


def from_browser_elsewhere(headers: dict[str, str]) -> bool:
    """Whether a browser sent this on behalf of a page of another site (or an opaque one)."""
    if headers.get("sec-fetch-site") in ("cross-site", "same-site"):
        return True
    origin = headers.get("origin")
    if origin is None:
        return False
    return origin == "null" or urlsplit(origin).netloc.lower() != headers.get("host", "").lower()


def content_type_problem(headers: dict[str, str]) -> str | None:
    """Why a JSON endpoint refuses this body's content type, or None."""
    ctype = headers.get("content-type")
    if is_json(ctype):
        return None
    media = _media(ctype)
    if media in _SIMPLE_TYPES and not from_browser_elsewhere(headers):
        return None  # curl -d and other non-browser clients: the body is read as JSON
    got = f"'{media}'" if media else "none"
    if media in _SIMPLE_TYPES:
        return (f"a browser request from another site must send Content-Type: application/json "
                f"(got {got}), which needs the server's CORS approval")  # fmt: skip
    return f"send the body as JSON with Content-Type: application/json (got {got})"


def _has_body(headers: dict[str, str]) -> bool:
    length = headers.get("content-length")
    if length is not None:
        return length.strip() not in ("", "0")
    return "chunked" in headers.get("transfer-encoding", "").lower()


def _too_large(limit: int, setting: str, what: str) -> ApiError:
    return ApiError(413, f"{what} is larger than {limit} bytes ({setting})")


def _length(headers: dict[str, str]) -> int:
    try:
        return int(headers.get("content-length") or 0)
    except ValueError:
        return 0


async def _read_body(receive: Any, limit: int) -> list[dict[str, Any]]:
    """The request's messages up to the end of its body (at most `limit` body bytes, else a
    413 before reading more), or up to a disconnect."""
    messages, size = [], 0
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            return messages
        size += len(message.get("body", b""))
        if size > limit:
            raise _too_large(limit, "max_body_bytes", "the request body")
        if not message.get("more_body", False):
            return messages


def _replaying(receive: Any, messages: list[dict[str, Any]]) -> Any:
    """A `receive` that hands over the messages already read, then the real one's (a
    disconnect). The chunks are not joined here: Litestar joins them once."""
    queued = list(messages)

    async def replay() -> dict[str, Any]:
        return queued.pop(0) if queued else await receive()

    return replay


def _counting(receive: Any, limit: int) -> Any:
    """A `receive` that fails with a 413 once more than `limit` body bytes came in."""
    seen = 0

    async def counted() -> dict[str, Any]:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise _too_large(limit, "max_upload_bytes", "the upload")
        return message

    return counted


def middleware(settings: Settings, reject: Reject) -> Callable[[ASGI], ASGI]:
    """The guard as Litestar route middleware; `reject(scope, receive, send, error)` answers a
    refused request in the route's error shape."""

    def wrap(app: ASGI) -> ASGI:
        async def guarded(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            try:
                receive = await _admit(settings, scope, receive)
            except ApiError as e:
                await reject(scope, receive, send, e)
                return
            await app(scope, receive, send)

        return guarded

    return wrap


async def _admit(settings: Settings, scope: Any, receive: Any) -> Any:
    """Check one request; returns the `receive` the handler should use (or raises)."""
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
    if not host_allowed(settings, headers.get("host")):
        raise ApiError(403, f"Host '{headers.get('host')}' is not served here: only localhost "
                       "names, loopback addresses and allowed_hosts are (a guard against DNS "
                       "rebinding); add the name to allowed_hosts to serve it")  # fmt: skip
    if scope["method"] not in _BODY_METHODS:
        return receive
    handler = scope.get("route_handler")
    if handler is not None and handler.opt.get(UPLOAD):
        # with keys set, the key guard (serve/access.py) asks every upload for a valid key
        if not settings.api_key and not headers.get(UI_HEADER):
            raise ApiError(403, "uploads need the Web UI's X-TSJAX-UI header or an API key "
                           "(Authorization: Bearer <key>)")  # fmt: skip
        limit = settings.max_upload_bytes + UPLOAD_OVERHEAD
        if _length(headers) > limit:
            raise _too_large(settings.max_upload_bytes, "max_upload_bytes", "the upload")
        return _counting(receive, limit)
    if not _has_body(headers):
        return receive
    problem = content_type_problem(headers)
    if problem:
        raise ApiError(415, problem)
    limit = settings.max_body_bytes
    if _length(headers) > limit:
        raise _too_large(limit, "max_body_bytes", "the request body")
    messages = await _read_body(receive, limit)
    chunks = [m.get("body", b"") for m in messages if m["type"] == "http.request"]
    if sum(map(len, chunks)) <= _INLINE_SCAN:
        check_shape(chunks)
    else:  # numpy passes, mostly without the GIL: the event loop keeps serving
        await asyncio.to_thread(check_shape, chunks)
    return _replaying(receive, messages)
