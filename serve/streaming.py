"""NDJSON and SSE writers: turn an async iterator of payloads into a streaming response.

The adapters produce plain objects; this module owns framing and headers. Aborting on client
disconnect works by closing: Litestar cancels the body iterator when the client goes away, and
the `finally` here closes the adapter's iterator, whose own `aclosing` closes
`Engine.generate`, which aborts the request and frees its cache row.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import msgspec
from litestar.response import Stream

_encoder = msgspec.json.Encoder()
DONE_SENTINEL = object()  # yield this from an SSE source to send `data: [DONE]`


async def _frames(source: AsyncIterator[Any], prefix: bytes, suffix: bytes) -> AsyncIterator[bytes]:
    try:
        async for obj in source:
            if obj is DONE_SENTINEL:
                yield b"data: [DONE]\n\n"
            else:
                yield prefix + _encoder.encode(obj) + suffix
    finally:
        await source.aclose()  # type: ignore[attr-defined]


def ndjson_response(source: AsyncIterator[Any]) -> Stream:
    """One JSON object per line (Ollama's streaming format)."""
    return Stream(
        _frames(source, b"", b"\n"),
        media_type="application/x-ndjson",
        headers={"Cache-Control": "no-cache"},
    )


def sse_response(source: AsyncIterator[Any]) -> Stream:
    """`data: <json>` events (OpenAI's streaming format); DONE_SENTINEL ends the stream."""
    return Stream(
        _frames(source, b"data: ", b"\n\n"),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "Connection": "keep-alive"},
    )


async def _typed_frames(source: AsyncIterator[dict[str, Any]]) -> AsyncIterator[bytes]:
    try:
        async for obj in source:
            yield b"event: " + obj["type"].encode() + b"\ndata: " + _encoder.encode(obj) + b"\n\n"
    finally:
        await source.aclose()  # type: ignore[attr-defined]


def typed_sse_response(source: AsyncIterator[dict[str, Any]]) -> Stream:
    """Named SSE events, `event: <type>` then `data: <json>`, each object's `type` naming its
    event (the OpenAI Responses and Anthropic Messages streams; no [DONE])."""
    return Stream(
        _typed_frames(source),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "Connection": "keep-alive"},
    )
