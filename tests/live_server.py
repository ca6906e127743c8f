"""A real server for end-to-end tests: the app under uvicorn on a free loopback port, in a
thread, until its `/health` says it is ready (the official clients then talk to it over TCP)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx


def free_port() -> int:
    """A loopback port nobody listens on (for a server or a JAX coordinator)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthy(r: httpx.Response) -> bool:
    """Warm: 200. While loading the server answers 503 `loading`, never anything else."""
    if r.status_code == 200:
        return True
    assert r.json()["status"] == "loading", r.text
    return False


class LiveServer:
    """`app` served on `port` (default: a free one) from a daemon thread. `start` waits until
    `ready(/health response)` (default: `healthy`) or raises TimeoutError; `stop` asks uvicorn
    to exit and joins the thread."""

    def __init__(self, app: Any, port: int | None = None):
        import uvicorn

        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self, timeout: float = 300, ready: Callable[[httpx.Response], bool] = healthy) -> str:
        self.thread.start()
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                if ready(httpx.get(self.url + "/health", timeout=5)):
                    return self.url
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"the server at {self.url} did not become ready in {timeout} s")

    def stop(self, timeout: float = 30) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=timeout)
