"""The state every handler needs, one `Hub` per app: the settings, the model and engine once
loaded, readiness, and what is built once per model (its output syntax, its grammar compiler).

It sits below the adapters and the shared translation: `app.py` creates it, everything else
reads it (`hub_of(request)`), and nothing here knows an API style.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from litestar import Request

from serve.engine import Engine
from serve.engine.encoder import ImageEncoder
from serve.errors import ApiError
from serve.outputs import OutputFormat, select_format
from serve.settings import Settings
from tsjax.model import Model

if TYPE_CHECKING:
    from tsjax.grammar import GrammarFactory


@dataclass
class Hub:
    """What every handler needs: settings, the model and engine once loaded, and readiness."""

    settings: Settings
    model: Model | None = None
    engine: Engine | None = None
    encoder: ImageEncoder | None = None  # with a projector: images -> embeddings
    ready: bool = False
    error: str = ""  # why loading failed, if it did
    load_seconds: float = 0.0
    compile_seconds: float = 0.0
    started: float = field(default_factory=time.time)
    _format: Any = None
    _grammars: Any = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def output_format(self) -> OutputFormat:
        """The model's output syntax (reasoning and tool calls), chosen once per model."""
        if self._format is None:
            assert self.model is not None
            m = self.model
            self._format = select_format(m.config.architecture, m.template.source)
        return self._format

    def grammars(self) -> GrammarFactory:
        """The constraint compiler for the model's vocabulary, built on first use (reading
        the vocabulary takes a moment; most servers never need it)."""
        with self._lock:
            if self._grammars is None:
                from tsjax.grammar import GrammarFactory

                assert self.model is not None
                self._grammars = GrammarFactory(self.model.tokenizer, self.model.config.vocab_size)
            return self._grammars

    def live(self) -> tuple[Model, Engine]:
        """The model and engine, or a 503 while the model is still loading (or failed to)."""
        if not self.ready or self.model is None or self.engine is None:
            raise ApiError(503, self.error or "the model is still loading; retry shortly")
        return self.model, self.engine


def hub_of(request: Request) -> Hub:
    return request.app.state.hub
