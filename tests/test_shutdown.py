"""Shutdown of a real `tsjax serve` process: on SIGTERM it stops accepting at once, lets the
running streams go on for `shutdown_grace_s`, then ends each with its API's final frame and
exits; a second signal exits at once.

Both servers hold 4 rows x 512 positions, so every stream stays inside the positions the
warm-up compiles for (a stream crossing 512 positions can wait for a program compiled on
demand: seconds with no frame, which on a loaded machine fell inside the grace window this
test watches).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from conftest import real_model_path
from live_server import free_port

pytestmark = pytest.mark.slow

LONG = "Count from 1 to 1000, one number per line, and never stop early."
COUNTING = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,"  # a raw prompt the model keeps counting
STREAMS = [  # (path, body); greedy: sampled answers to LONG may end after 40 tokens
    ("/v1/chat/completions", {"model": "smollm2-135m", "stream": True, "max_tokens": 400,
                              "temperature": 0,
                              "messages": [{"role": "user", "content": LONG}]}),
    ("/api/generate", {"model": "smollm2-135m", "prompt": COUNTING, "raw": True,
                       "options": {"num_predict": 400, "temperature": 0}}),
    ("/api/webui/chat", {"maxTokens": 400, "temperature": 0,
                         "messages": [{"role": "user", "content": LONG}]}),
    ("/api/chat", {"model": "smollm2-135m", "messages": [{"role": "user", "content": LONG}],
                   "options": {"num_predict": 400, "temperature": 0}}),
]  # fmt: skip
# one stream per cache row: none waits in the queue (the OpenAI styles send nothing there)


def _serve(grace: float, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    tsjax = Path(sys.executable).with_name("tsjax")
    command = [str(tsjax)] if tsjax.exists() else [sys.executable, "-m", "serve"]
    flags = ["--model", str(real_model_path("smollm2-135m")), "--port", str(port),
             "--rows", "4", "--max-len", "512", "--shutdown-grace-s", str(grace)]  # fmt: skip
    proc = subprocess.Popen(
        [*command, *([] if command[-1] == "serve" else ["serve"]), *flags],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600
    while time.time() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise TimeoutError("the server did not become healthy")


class Client(threading.Thread):
    """One long stream, recording every frame and when it came."""

    def __init__(self, url: str, path: str, body: dict):
        super().__init__(daemon=True)
        self.url, self.path, self.body = url, path, body
        self.frames: list[tuple[float, str]] = []
        self.error: Exception | None = None

    def run(self) -> None:
        try:
            with httpx.Client(timeout=120) as c:
                with c.stream("POST", self.url + self.path, json=self.body) as r:
                    for line in r.iter_lines():
                        if line.strip():
                            self.frames.append((time.time(), line))
        except httpx.HTTPError as e:  # the second test cuts streams off
            self.error = e

    def parsed(self) -> list:
        out = []
        for _, line in self.frames:
            data = line[6:] if line.startswith("data: ") else line
            out.append(data if data == "[DONE]" else json.loads(data))
        return out


def _start_streams(url: str) -> list[Client]:
    clients = [Client(url, path, body) for path, body in STREAMS]
    for c in clients:
        c.start()
    deadline = time.time() + 120
    while not all(len(c.frames) >= 3 for c in clients):  # every one is answering
        assert time.time() < deadline, [len(c.frames) for c in clients]
        time.sleep(0.1)
    return clients


def ending(path: str, frames: list) -> str | None:
    """How a stream ended: "shutdown" (its API's error ending), "natural" (its own final frame:
    the answer was complete before the grace ran out), or None (cut off, no final frame)."""
    last = frames[-1]
    if path.startswith("/v1/"):
        if last != "[DONE]":
            return None
        err = frames[-2].get("error") if isinstance(frames[-2], dict) else None
        return "shutdown" if err and "server shutting down" in err["message"] else "natural"
    if last.get("done") is not True:
        return None
    if path == "/api/webui/chat":
        return "shutdown" if last["error"] == "server shutting down" else "natural"
    return "shutdown" if last.get("done_reason") == "error" and last["error"] else "natural"


def test_sigterm_gives_streams_their_grace_then_their_final_frames(tmp_path):
    grace = 3.0  # 400 greedy tokens take longer than this even on 4 rows; a stream must
    # show a frame between 1 s and grace - 0.5 s after the signal (a 0.5 s window missed it
    # once with a test run beside the server)
    proc, url = _serve(grace, tmp_path / "serve.log")
    try:
        clients = _start_streams(url)
        sent = time.time()
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(httpx.TransportError):  # no longer accepting
            httpx.get(url + "/health", timeout=2)
        proc.wait(timeout=grace + 30)
        took = time.time() - sent
        for c in clients:
            c.join(10)
        log = (tmp_path / "serve.log").read_text()
    finally:
        proc.kill()
    # bounded, with room for a loaded machine: uvicorn waits grace + 5 s, then cancels (12.4 s
    # seen beside a full test run)
    assert took < grace + 20, (took, log[-2000:])
    assert "grace period over" in log
    endings = {c.path: ending(c.path, c.parsed()) for c in clients}
    assert None not in endings.values(), endings  # every client saw its final frame
    assert "shutdown" in endings.values(), endings  # and 400-token answers outlast the grace
    for c in clients:
        during = [t for t, _ in c.frames if sent + 1 < t < sent + grace - 0.5]
        assert during or endings[c.path] == "natural", (c.path, "nothing during the grace")


def test_a_second_signal_exits_at_once(tmp_path):
    proc, url = _serve(60.0, tmp_path / "serve.log")
    try:
        clients = _start_streams(url)
        proc.send_signal(signal.SIGTERM)
        time.sleep(1.0)
        assert proc.poll() is None  # the streams have a minute to finish
        # COUNTING runs its 400 tokens; a greedy answer to LONG may end on its own first
        assert any(c.is_alive() for c in clients)
        assert all(c.is_alive() or ending(c.path, c.parsed()) == "natural" for c in clients)
        sent = time.time()
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=10)
        took = time.time() - sent
    finally:
        proc.kill()
    assert took < 3, took
    assert code == 128 + signal.SIGINT
