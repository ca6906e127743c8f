"""The server in-process on a tiny random-weight model with a stub engine: the real HTTP stack,
guard, adapters, chat template, tokenizer and request checks, and nothing compiled, so a test
module starts it in a second or two. The stub answers every request with a few text pieces.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from gguf_factory import write_tiny_gguf

from serve.engine import Engine, EventKind, FinishReason, GenerationRequest, Stats, TokenEvent
from tsjax.logprobs import TokenLogprob
from tsjax.model import load
from tsjax.shapes import StepShapes

LOCAL = "http://127.0.0.1"  # a Host the server answers while bound to loopback (its default)
UI = {"X-TSJAX-UI": "1"}  # the Web UI's upload header


class StubEngine(Engine):
    """The engine's interface and request checks without compiled steps: each request streams
    `pieces` (at most max_tokens of them), then DONE."""

    pieces = ["Hello", ",", " world", "!"]

    def warmup(self) -> float:
        self.warm = True
        return 0.0

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    async def generate(self, req: GenerationRequest) -> AsyncIterator[TokenEvent]:
        """Every answer of `req` (n of them, by index); token log-probabilities (log 1/2,
        one alternative) when asked; for a prefill-only request, the prompt's entries and a
        unit embedding derived from its ids."""
        self.check(req)
        entry = TokenLogprob(1, -0.6931, ((1, -0.6931), (2, -0.6931)))
        prompt_lps = None
        if req.prompt_logprobs:
            prompt_lps = (None,) + (entry,) * (len(req.prompt_ids) - 1)
        if req.prefill_only:
            embedding = None
            if req.embed:
                v = np.cos(np.arange(self.model.config.dim) + sum(req.prompt_ids))
                embedding = (v / np.linalg.norm(v)).astype(np.float32)
            stats = Stats(prompt_tokens=len(req.prompt_ids))
            for i in range(req.n):
                yield TokenEvent(
                    EventKind.DONE, finish_reason=FinishReason.LENGTH, stats=stats, index=i,
                    prompt_logprobs=prompt_lps, embedding=embedding,
                )  # fmt: skip
            return
        sent = self.pieces[: req.max_tokens]
        for i in range(req.n):
            for j, piece in enumerate(sent):
                await asyncio.sleep(0)
                yield TokenEvent(
                    EventKind.TOKEN, text=piece, token_ids=(1,), index=i,
                    logprobs=(entry,) if req.logprobs else (),
                    prompt_logprobs=prompt_lps if j == 0 else None,
                )  # fmt: skip
            reason = FinishReason.LENGTH if len(sent) < len(self.pieces) else FinishReason.STOP
            stats = Stats(prompt_tokens=len(req.prompt_ids), completion_tokens=len(sent))
            yield TokenEvent(EventKind.DONE, finish_reason=reason, stats=stats, index=i)


def tiny_model(directory: Path, max_len: int = 256) -> Any:
    path = write_tiny_gguf(directory / "tiny.gguf", "llama")
    shapes = StepShapes.default(rows=2, max_len=max_len, min_prefill=16, min_attn=32)
    return load(path, progress=False, shapes=shapes, quant="f32")


@contextmanager
def tiny_client(model: Any, **settings: Any) -> Iterator[Any]:
    """A Litestar TestClient on the app over `model` and a stub engine, warm."""
    from litestar.testing import TestClient

    from serve.app import create_app
    from serve.settings import Settings

    s = Settings(model=str(model.path), **settings)
    with TestClient(create_app(s, engine=StubEngine(model)), base_url=LOCAL) as c:
        deadline = time.time() + 60
        while c.get("/health").status_code != 200:
            assert time.time() < deadline, c.get("/health").text
            time.sleep(0.02)
        yield c
