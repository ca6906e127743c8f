"""Who may call the server: optional API keys, and which browser origins may (CORS).

Keys (`api_key` setting, several allowed): when any is set, every route needs
`Authorization: Bearer KEY` or `x-api-key: KEY` (the OpenAI and Anthropic clients' headers),
except the routes marked public: `/health` (load balancers), the Web UI's static files (the
page asks for the key itself and sends it on every call), and `/metrics` unless the
`metrics_auth` setting asks for a key there too. The check is a Litestar guard, so a refusal
is an `ApiError(401)` that each API's router renders in its own error shape.

CORS is off unless `cors_origins` lists origins (`"*"`: any); preflights are answered by
Litestar's CORS middleware, with every request header allowed (the clients' `Authorization`,
`x-api-key`, `anthropic-version` and `x-stainless-*` headers among them).
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Any

from litestar.config.cors import CORSConfig
from litestar.connection import ASGIConnection

from serve.errors import ApiError
from serve.settings import Settings

# Route handlers say who may call them with `opt={ACCESS: ...}`: PUBLIC (no key), METRICS
# (no key unless metrics_auth). Everything else needs a key whenever keys are set.
ACCESS = "access"
PUBLIC = "public"
METRICS = "metrics"


def presented_key(headers: Any) -> str | None:
    """The key a request carries: `Authorization: Bearer KEY` (scheme case-insensitive) or
    `x-api-key: KEY`; None when it carries neither."""
    auth = headers.get("authorization")
    if auth:
        scheme, _, token = auth.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    key = headers.get("x-api-key")
    return key.strip() if key and key.strip() else None


def key_allowed(given: str, keys: list[bytes]) -> bool:
    """Whether `given` is one of `keys`, compared in constant time: every key is compared,
    whatever matched, so the time taken tells nothing about which key came close."""
    g = given.encode()
    found = False
    for key in keys:
        found |= hmac.compare_digest(g, key)
    return found


def guard(settings: Settings) -> Callable[[ASGIConnection, Any], None] | None:
    """The guard that enforces the settings' keys on every route, or None when no key is set
    (the server is open, as before)."""
    if not settings.api_key:
        return None
    keys = [k.encode() for k in settings.api_key]
    open_routes = {PUBLIC} if settings.metrics_auth else {PUBLIC, METRICS}

    def require_key(connection: ASGIConnection, handler: Any) -> None:
        if handler.opt.get(ACCESS) in open_routes or connection.scope.get("method") == "OPTIONS":
            return
        given = presented_key(connection.headers)
        if given is None:
            raise ApiError(401, "this server needs an API key: send it as 'Authorization: "
                           "Bearer <key>' or 'x-api-key: <key>'")  # fmt: skip
        if not key_allowed(given, keys):
            raise ApiError(401, "invalid API key")

    return require_key


def cors(settings: Settings) -> CORSConfig | None:
    """Litestar's CORS config for the allowed origins, or None (no CORS headers) by default."""
    if not settings.cors_origins:
        return None
    return CORSConfig(allow_origins=list(settings.cors_origins), allow_methods=["*"],
                      allow_headers=["*"], allow_credentials=False)  # fmt: skip
