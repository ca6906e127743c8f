"""JSON request bodies into typed structs, strictly (integers are not floats' strings, booleans
are booleans), with a 400 that names the offending field as a JSON path.

The structs are msgspec's: decoding and validating a typical chat body takes 4 us, 4.6x less
than the same models in pydantic (README, "Request bodies"; `python -m benchmarks.validation`).
Handlers declare their body as `data: JSONBody[Body | None] = None` with
`dto=StrictBody[Body]`: Litestar then documents the struct in the OpenAPI schema (`/schema`)
and hands the raw bytes to `StrictBody`, which decodes them here, so the errors stay ours
(Litestar's own msgspec path converts leniently, "9" into 9, and answers in its own shape).

Before a body is decoded its shape is bounded (`check_shape`, which the request guard runs
for every JSON endpoint, in a worker thread for large bodies): at most `MAX_DEPTH` objects
and arrays inside one another and `MAX_ELEMENTS` of them and of the values they hold. Decoding
holds the GIL for its whole length, and 16 MiB of `[],` took the decoder over 6 s (most of it
in the garbage collector), during which no other request is served; deep nesting makes code
that walks values recursively (schema checks, `json.dumps`) fail.
"""

from __future__ import annotations

import re
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import msgspec
import numpy as np
from litestar import Request
from litestar.dto import AbstractDTO
from litestar.typing import FieldDefinition

from serve.errors import ApiError

T = TypeVar("T")

MAX_DEPTH = 128  # objects and arrays inside one another; a chat body needs about 10
MAX_ELEMENTS = 100_000  # objects, arrays and the values in them; ~20 ms to decode at worst
_SCAN_CHUNK = 1 << 20  # bytes per numpy pass: bounded scratch memory

_AT = re.compile(r" - at `\$\.?([^`]*)`$")
_MISSING = re.compile(r"missing required field `([^`]+)`")


def _param_of(message: str) -> str | None:
    """The JSON path msgspec names in a validation error (`$.messages[0].role` -> that)."""
    at = _AT.search(message)
    missing = _MISSING.search(message)
    if missing:
        return f"{at.group(1)}.{missing.group(1)}" if at and at.group(1) else missing.group(1)
    return at.group(1) if at and at.group(1) else None


@dataclass
class Shape:
    """How a JSON text nests: its deepest nesting of objects and arrays, and how many of them
    and of the values in them there are (commas plus containers: an upper bound that counts
    each value after the first of every object or array)."""

    depth: int = 0
    elements: int = 0


Body = bytes | Sequence[bytes]  # a body whole, or in the chunks it arrived in


def _parts(raw: Body) -> Sequence[bytes]:
    return [raw] if isinstance(raw, bytes) else raw


def scan(raw: Body) -> Shape:
    """The `Shape` of `raw`, ignoring brackets and commas inside strings (escapes included),
    in numpy passes of at most `_SCAN_CHUNK` bytes (most of which release the GIL), carrying
    the string, escape and depth state across passes and chunks. Malformed JSON scans to some
    shape; the decoder rejects it afterwards, stopping where it turns malformed."""
    in_string, odd_backslashes, depth = False, False, 0
    shape = Shape()
    for part in _parts(raw):
        for start in range(0, len(part), _SCAN_CHUNK):
            a = np.frombuffer(part, np.uint8, min(_SCAN_CHUNK, len(part) - start), start)
            idx = np.arange(len(a), dtype=np.int64)
            backslash = a == 92
            # the last position that is not a backslash, so each backslash knows its run
            # length (a run carried over from the previous pass counts with its parity)
            last = np.maximum.accumulate(np.where(backslash, -1 - int(odd_backslashes), idx))
            runs = np.where(backslash, idx - last, 0)
            before = np.empty_like(runs)
            before[0], before[1:] = int(odd_backslashes), runs[:-1]
            quotes = (a == 34) & (before % 2 == 0)
            outside = (np.cumsum(quotes, dtype=np.int64) + int(in_string)) % 2 == 0
            opens = ((a == 91) | (a == 123)) & outside
            closes = ((a == 93) | (a == 125)) & outside
            level = np.cumsum(opens.astype(np.int32) - closes, dtype=np.int64) + depth
            shape.depth = max(shape.depth, int(level.max()))
            commas = np.count_nonzero((a == 44) & outside)
            shape.elements += int(np.count_nonzero(opens)) + int(commas)
            in_string, odd_backslashes = not outside[-1], bool(runs[-1] % 2)
            depth = int(level[-1])
    return shape


def plainly_small(raw: Body) -> bool:
    """Whether `raw` cannot break the shape limits whatever its strings hold (counting every
    bracket and comma, in strings too): most bodies, decided in microseconds."""
    parts = _parts(raw)
    brackets = sum(p.count(b"[") + p.count(b"{") for p in parts)
    return brackets <= MAX_DEPTH and brackets + sum(p.count(b",") for p in parts) <= MAX_ELEMENTS


def check_shape(raw: Body) -> None:
    """A 400 when `raw` nests deeper than `MAX_DEPTH` or holds more than `MAX_ELEMENTS`."""
    if plainly_small(raw):
        return
    shape = scan(raw)
    if shape.depth > MAX_DEPTH:
        raise ApiError(400, f"the request body nests objects and arrays {shape.depth} levels "
                       f"deep; at most {MAX_DEPTH} are accepted")  # fmt: skip
    if shape.elements > MAX_ELEMENTS:
        raise ApiError(400, f"the request body holds more than {MAX_ELEMENTS} JSON values "
                       f"(about {shape.elements}); send fewer or larger ones")  # fmt: skip


def decode(raw: bytes, struct: type[T]) -> T:
    """`raw` as a `struct`, or a 400 naming what is wrong (empty, malformed, which field)."""
    if not raw.strip():
        raise ApiError(400, "the request body is empty; expected a JSON object")
    try:
        return msgspec.json.decode(raw, type=struct)
    except msgspec.ValidationError as e:
        param = _param_of(str(e))
        raise ApiError(400, f"invalid request: {e}", param=param) from e
    except msgspec.DecodeError as e:
        raise ApiError(400, f"malformed JSON body: {e}") from e
    except RecursionError as e:  # the decoder's own bound (about 1,000 levels), for bodies
        raise ApiError(400, "the request body is nested too deeply") from e  # not checked


async def decode_body(request: Request, struct: type[T]) -> T:
    """The request's JSON body as a `struct` (for handlers that read the body themselves)."""
    return decode(await request.body(), struct)


def required(data: T | None) -> T:
    """A `StrictBody` handler's body: Litestar passes None for an empty one."""
    if data is None:
        raise ApiError(400, "the request body is empty; expected a JSON object")
    return data


class StrictBody(AbstractDTO[T], Generic[T]):
    """A Litestar DTO that is only a decoder: the raw body through `decode` (strict, our 400s),
    and the struct itself as the OpenAPI request body. No field transfer, no renaming."""

    @classmethod
    def generate_field_definitions(cls, model_type: type[Any]) -> Generator[Any, None, None]:
        yield from ()  # nothing to transfer: decode() builds the struct itself

    @classmethod
    def detect_nested_field(cls, field_definition: FieldDefinition) -> bool:
        return False

    @classmethod
    def create_for_field_definition(
        cls, field_definition: FieldDefinition, handler_id: str, backend_cls: Any = None
    ) -> None:
        return None  # no transfer backend to build

    @classmethod
    def create_openapi_schema(
        cls, field_definition: FieldDefinition, handler_id: str, schema_creator: Any
    ) -> Any:
        return schema_creator.for_field_definition(FieldDefinition.from_annotation(cls.model_type))

    def decode_bytes(self, value: bytes) -> Any:
        return decode(value, self.model_type)

    def decode_builtins(self, value: dict[str, Any]) -> Any:
        try:
            return msgspec.convert(value, self.model_type)
        except msgspec.ValidationError as e:
            raise ApiError(400, f"invalid request: {e}", param=_param_of(str(e))) from e
