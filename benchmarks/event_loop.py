"""Whether a large request freezes the server: `/health` latency and the server's memory while
one big body is being prepared, against a real `tsjax serve` process.

    python -m benchmarks.event_loop [--tsjax PATH] [--model smollm2-135m] [--cases a,b]

Starts `tsjax serve` (the one beside this Python, or `--tsjax`, e.g. another checkout's venv
to compare), waits until it is warm, then for each case posts one body while a thread polls
`/health` every 10 ms, and reports the slowest `/health` answer during the request, the
request's status and time, and the server's resident memory before and after (VmRSS) and at
its peak (VmHWM, which only grows). Cases: `prompt10` (a 10 MB chat message), `body42` (a
42 MB generate prompt), `arrays15` (15 MB of `[],` inside `response_format`).
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

CASES = {
    "prompt10": ("/v1/chat/completions", lambda m: {
        "model": m, "messages": [{"role": "user", "content": "word " * 2_000_000}]}),
    "body42": ("/api/generate", lambda m: {"model": m, "prompt": "word " * 8_400_000,
                                            "stream": False}),
    "arrays15": ("/v1/chat/completions", lambda m: {
        "model": m, "messages": [{"role": "user", "content": "hi"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
            "enum": [[]] * 5_000_000}}}}),
}  # fmt: skip


def _memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of `pid` in MiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) // 1024
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(tsjax: str, model: str) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    argv = [tsjax, "serve", "--model", model, "--host", "127.0.0.1", "--port", str(port),
            "--rows", "2", "--max-len", "1024"]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 900
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{tsjax} serve exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise TimeoutError("the server did not become healthy")


def measure(url: str, pid: int, path: str, body: bytes) -> dict[str, object]:
    """One request with /health polled beside it."""
    before = _memory(pid)
    result: dict[str, object] = {}

    def post() -> None:
        t = time.perf_counter()
        try:
            r = httpx.post(url + path, content=body, timeout=600,
                           headers={"Content-Type": "application/json"})  # fmt: skip
            result["status"] = r.status_code
        except httpx.HTTPError as e:
            result["status"] = type(e).__name__
        result["seconds"] = time.perf_counter() - t

    thread = threading.Thread(target=post)
    thread.start()
    slowest = 0.0
    with httpx.Client(timeout=600) as c:
        while thread.is_alive():
            t = time.perf_counter()
            c.get(url + "/health")
            slowest = max(slowest, time.perf_counter() - t)
            time.sleep(0.01)
    thread.join()
    after = _memory(pid)
    return result | {"health_max_ms": round(slowest * 1000), "rss_before": before["VmRSS"],
                     "rss_after": after["VmRSS"], "rss_peak": after["VmHWM"]}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tsjax", default=str(Path(sys.executable).with_name("tsjax")))
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--cases", default=",".join(CASES))
    args = p.parse_args(argv)
    proc, url = _start(args.tsjax, args.model)
    try:
        print(f"{args.tsjax}: warm at {url}")
        print(
            "| case | bytes | status | seconds | slowest /health (ms) | RSS before / after / "
            "peak (MiB) |\n|---|---|---|---|---|---|"
        )
        for name in args.cases.split(","):
            path, make = CASES[name]
            body = json.dumps(make(args.model)).encode()
            m = measure(url, proc.pid, path, body)
            print(
                f"| {name} | {len(body):,} | {m['status']} | {m['seconds']:.2f} | "
                f"{m['health_max_ms']} | {m['rss_before']} / {m['rss_after']} / "
                f"{m['rss_peak']} |",
                flush=True,
            )
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
