"""One engine for every API style: submit a request, stream its events, abort it."""

from serve.engine.engine import Engine
from serve.engine.types import (
    EventKind,
    FinishReason,
    GenerationRequest,
    Stats,
    TokenEvent,
)

__all__ = ["Engine", "EventKind", "FinishReason", "GenerationRequest", "Stats", "TokenEvent"]
