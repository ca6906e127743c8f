"""The reference server's two error shapes for its browser protocol: `{"error": "<message>"}`
for the chat and upload endpoints, `{"ok": false, "error": "<message>"}` for the session and
model endpoints. Each router of this package renders `ApiError` with one of them.
"""

from __future__ import annotations

from litestar import Request, Response

from serve.errors import ApiError


def render_error(_: Request, exc: ApiError) -> Response:
    return Response({"error": exc.message}, status_code=exc.status)


def render_ok_error(_: Request, exc: ApiError) -> Response:
    return Response({"ok": False, "error": exc.message}, status_code=exc.status)
