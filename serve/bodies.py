"""JSON request bodies into typed structs, strictly (integers are not floats' strings, booleans
are booleans), with a 400 that names the offending field as a JSON path.
"""

from __future__ import annotations

import re
from typing import TypeVar

import msgspec
from litestar import Request

from serve.errors import ApiError

T = TypeVar("T")


_AT = re.compile(r" - at `\$\.?([^`]*)`$")
_MISSING = re.compile(r"missing required field `([^`]+)`")


def _param_of(message: str) -> str | None:
    """The JSON path msgspec names in a validation error (`$.messages[0].role` -> that)."""
    at = _AT.search(message)
    missing = _MISSING.search(message)
    if missing:
        return f"{at.group(1)}.{missing.group(1)}" if at and at.group(1) else missing.group(1)
    return at.group(1) if at and at.group(1) else None


async def decode_body(request: Request, struct: type[T]) -> T:
    """Parse and type-check the JSON body strictly (integers are not floats' strings, booleans
    are booleans); any failure is a 400 naming the offending field."""
    raw = await request.body()
    if not raw.strip():
        raise ApiError(400, "the request body is empty; expected a JSON object")
    try:
        return msgspec.json.decode(raw, type=struct)
    except msgspec.ValidationError as e:
        param = _param_of(str(e))
        raise ApiError(400, f"invalid request: {e}", param=param) from e
    except msgspec.DecodeError as e:
        raise ApiError(400, f"malformed JSON body: {e}") from e
