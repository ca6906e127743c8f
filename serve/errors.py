"""The server's one error type: raised neutrally anywhere below the adapters, rendered in each
API style's wire shape by its router's exception handler (see each module of serve/protocols).

An error knows its HTTP status, a message for people, the request field it is about (`param`,
a JSON path such as `messages[0].role`) and a `kind` that dialects with typed errors (OpenAI's
`type`, Anthropic's `error.type`) map to their own names. Nothing here knows a wire format.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorKind(StrEnum):
    INVALID_REQUEST = "invalid_request"  # 400: the request cannot be served as sent
    UNAUTHENTICATED = "unauthenticated"  # 401: no API key, or not one of the server's
    FORBIDDEN = "forbidden"  # 403: a host or a caller this server does not serve
    NOT_FOUND = "not_found"  # 404: a model, session or file that is not here
    TOO_LARGE = "too_large"  # 413: a body or upload over the configured limit
    INVALID_RESPONSE = "invalid_response"  # 422: the answer breaks what the request asked
    UNAVAILABLE = "unavailable"  # 503: the model is loading or failed to load
    INTERNAL = "internal"  # 500 and anything else: generation failed


_KIND_OF_STATUS = {
    400: ErrorKind.INVALID_REQUEST,
    401: ErrorKind.UNAUTHENTICATED,
    403: ErrorKind.FORBIDDEN,
    404: ErrorKind.NOT_FOUND,
    413: ErrorKind.TOO_LARGE,
    422: ErrorKind.INVALID_RESPONSE,
    503: ErrorKind.UNAVAILABLE,
}


class ApiError(Exception):
    """An HTTP error: status, message, the offending field if any, and its kind (by default
    the one its status implies; other 4xx statuses are invalid requests)."""

    def __init__(
        self, status: int, message: str, param: str | None = None, kind: ErrorKind | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        default = ErrorKind.INVALID_REQUEST if 400 <= status < 500 else ErrorKind.INTERNAL
        self.kind = kind or _KIND_OF_STATUS.get(status, default)
