"""One engine for every API style: submit a request, stream its events, abort it.

Imported lazily, like `tsjax`'s public surface: `serve.engine.scheduler` is plain Python and
must stay importable without JAX (tests/test_engine.py checks), which an eager import of the
engine here would defeat."""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Engine": "serve.engine.engine",
    "EventKind": "serve.engine.types",
    "FinishReason": "serve.engine.types",
    "GenerationRequest": "serve.engine.types",
    "Stats": "serve.engine.types",
    "TokenEvent": "serve.engine.types",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'serve.engine' has no attribute {name!r}")
