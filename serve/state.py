"""The state every handler needs, one `Hub` per app: the settings, the model and engine once
loaded, readiness, and what is built once per model (its output syntax, its grammar compiler).

It sits below the adapters and the shared translation: `app.py` creates it, everything else
reads it (`hub_of(request)`), and nothing here knows an API style.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from litestar import Request

from serve.engine import Engine
from serve.engine.encoder import ImageEncoder
from serve.errors import ApiError
from serve.outputs import OutputFormat, select_format
from serve.settings import Settings
from tsjax.model import Model

if TYPE_CHECKING:
    from tsjax.grammar import GrammarFactory

R = TypeVar("R")


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
    rows_choice: Any = None  # tsjax.capacity.RowsChoice: how the rows were chosen
    started: float = field(default_factory=time.time)
    draining: bool = False  # shutting down: no new generations
    _pool: ThreadPoolExecutor | None = None
    _format: Any = None
    _grammars: Any = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _pool_lock: threading.Lock = field(default_factory=threading.Lock)

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
        """The model and engine, or a 503 while the model is still loading (or failed to) and
        once the server is shutting down."""
        if self.draining:
            raise ApiError(503, "the server is shutting down")
        if not self.ready or self.model is None or self.engine is None:
            raise ApiError(503, self.error or "the model is still loading; retry shortly")
        return self.model, self.engine

    async def offload(self, fn: Callable[..., R], *args: Any) -> R:
        """`fn(*args)` in the prepare pool (`prepare_threads` threads), with this request's
        context (its id): work that would hold up the event loop, such as rendering a chat
        template and tokenizing, or copying an upload."""
        with self._pool_lock:
            if self._pool is None:
                n = self.settings.prepare_threads
                self._pool = ThreadPoolExecutor(n, thread_name_prefix="tsjax-prepare")
        call = functools.partial(contextvars.copy_context().run, fn, *args)
        return await asyncio.get_running_loop().run_in_executor(self._pool, call)

    def close(self) -> None:
        """Let the prepare pool's threads go (at shutdown)."""
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


def hub_of(request: Request) -> Hub:
    return request.app.state.hub
