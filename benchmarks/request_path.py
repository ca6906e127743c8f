"""Which server modules one OpenAI chat request passes through, and how often it comes back.

    python -m benchmarks.request_path [--model smollm2-135m] [-v]

Not a timing: a structure measurement. One non-streamed `/v1/chat/completions` request runs
through the OpenAI router in-process (the real model's template and tokenizer; a fake engine
that answers three text pieces, so nothing compiles) under `sys.setprofile`. Every time the
innermost server module on the stack changes (a call into another module, or a return to one)
the new module is recorded; consecutive repeats collapse. The report counts, per view, the
modules entered, how many times, and how many of those entries return to a module the request
had already left (entries minus distinct modules). Views: every serve/ module; the adapters and
shared translation only (serve/outputs and serve/engine left out); and layers (adapter, shared
translation, outputs, engine). `-v` prints the sequences.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SHARED = ("serve.translation", "serve.protocols.common", "serve.protocols.features",
          "serve.bodies", "serve.state", "serve.errors")  # fmt: skip


class _FakeEngine:
    """The engine's two calls an adapter makes: `check` and `generate`."""

    def __init__(self, model: Any, pieces: list[str]):
        self.model, self.pieces = model, pieces

    def check(self, req: Any) -> None:
        pass

    async def generate(self, req: Any):
        from serve.engine.types import EventKind, FinishReason, Stats, TokenEvent

        for p in self.pieces:
            yield TokenEvent(EventKind.TOKEN, text=p, token_ids=(1,))
        stats = Stats(prompt_tokens=3, completion_tokens=len(self.pieces))
        yield TokenEvent(EventKind.DONE, finish_reason=FinishReason.STOP, stats=stats)


def _layer(module: str) -> str:
    if module.startswith(SHARED):
        return "shared translation"
    if module.startswith("serve.protocols"):
        return "adapter"
    return module.split(".")[1]  # outputs, engine


def trace(model_name: str | None) -> list[str]:
    """The innermost serve/ module each time it changes, for one chat request."""
    import httpx
    from litestar import Litestar
    from litestar.datastructures import State

    from serve.protocols import openai
    from serve.settings import Settings
    from tsjax.model import load

    if (ROOT / "serve" / "state.py").is_file():
        from serve.state import Hub
    else:  # the layout before serve/state.py (copy this file into an older checkout to compare)
        from serve.protocols.common import Hub  # type: ignore[no-redef]

    model = load(model_name, max_len=512, progress=False)
    hub = Hub(Settings())
    hub.model, hub.engine, hub.ready = model, _FakeEngine(model, ["Hel", "lo", "!"]), True
    app = Litestar(route_handlers=[openai.router], state=State({"hub": hub}))
    body = {"model": model.name, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}
    serve_dir = str(ROOT / "serve") + "/"
    timeline: list[str] = []
    stack: list[str | None] = []

    def profile(frame: Any, event: str, arg: Any) -> None:
        if event == "call":
            path = frame.f_code.co_filename
            rel = Path(path).relative_to(ROOT) if path.startswith(serve_dir) else None
            stack.append(str(rel.with_suffix("")).replace("/", ".") if rel else None)
        elif event == "return" and stack:
            stack.pop()
        else:
            return
        now = next((m for m in reversed(stack) if m), None)
        if now and (not timeline or timeline[-1] != now):
            timeline.append(now)

    async def post() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            await c.post("/v1/chat/completions", json=body)  # first-use caches out of the way
            sys.setprofile(profile)
            try:
                return await c.post("/v1/chat/completions", json=body)
            finally:
                sys.setprofile(None)

    r = asyncio.run(post())
    assert r.status_code == 200, r.text
    return timeline


def report(timeline: list[str], verbose: bool) -> None:
    views: list[tuple[str, Callable[[str], str | None]]] = [
        ("every server module", lambda m: m.removeprefix("serve.")),
        ("adapters and shared translation (no outputs/, engine/)",
         lambda m: None if m.startswith(("serve.outputs", "serve.engine"))
         else m.removeprefix("serve.")),
        ("layers", _layer),
    ]  # fmt: skip
    for label, name in views:
        seq = [n for m in timeline if (n := name(m))]
        seq = [n for i, n in enumerate(seq) if i == 0 or seq[i - 1] != n]
        counts = Counter(seq)
        print(f"{label}: {len(counts)} entered {len(seq)} times, "
              f"{len(seq) - len(counts)} returns to one already left")  # fmt: skip
        print("  " + ", ".join(f"{m} {n}" for m, n in counts.most_common()))
        if verbose:
            print("  " + " -> ".join(seq))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.request_path", description=__doc__)
    p.add_argument("--model", "-m", default=None, help="catalog name or .gguf path")
    p.add_argument("-v", "--verbose", action="store_true", help="print the sequences")
    args = p.parse_args(argv)
    report(trace(args.model), args.verbose)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
