"""The served path under load: start `tsjax serve` (its defaults unless told otherwise) on a
free port, time it until `/health` answers, then drive N concurrent streaming Ollama chat
clients over loopback and measure what a user sees: wall time from the first request to the
last answer (prefill included), time to first token p50/p99, aggregate tokens/s, and the
server's resident memory (at ready, peak under load). `--engine` runs the same requests
through the engine in-process instead (same settings, prompts and sampling; no HTTP), which
tells the HTTP path's share from the engine's.

    python -m benchmarks.served                            # 16 clients x 64 tokens, 3 rounds
    python -m benchmarks.served --engine                   # the same, engine in-process
    python -m benchmarks.served -- --rows 16 --quant bf16  # flags after -- go to tsjax serve
    python -m benchmarks.served --url http://127.0.0.1:5000  # an already running server

Every request asks for `--tokens` tokens (`num_predict`) with the server's default sampling
(temperature 0.8, top-k 40, top-p 0.9, repeat penalty 1.1), so a request may stop early at an
end-of-generation token: tokens/s counts the tokens actually produced (`eval_count`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.memory import MB, PeakSampler, rss

TOPICS = (
    "the water cycle", "how bridges carry loads", "the history of the printing press",
    "why the sky is blue", "how vaccines train the immune system", "the rules of chess",
    "how a compiler works", "the life of honey bees", "plate tectonics", "how batteries store"
    " energy", "the causes of the seasons", "how airplanes fly", "the invention of paper",
    "how the heart pumps blood", "the phases of the moon", "why bread rises",
)  # fmt: skip


def prompt(i: int) -> str:
    """Client i's user message: distinct from its first words (no shared prefix beyond the
    chat template's own), about 60 tokens."""
    topic = TOPICS[i % len(TOPICS)]
    return (
        f"Request {i}. Explain {topic} to a curious twelve-year-old. Use plain words, give one "
        "concrete example from everyday life, and end with a question that invites them to "
        "look closer at the world around them. Keep it to a few short paragraphs."
    )


@dataclass
class Result:
    """One request as its client saw it (seconds from the round's start)."""

    ttft: float
    end: float
    tokens: int
    prompt_tokens: int
    lines: int


def percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def summarize(results: list[Result], wall: float) -> dict:
    tokens = sum(r.tokens for r in results)
    ttft = [r.ttft for r in results]
    return {
        "wall_s": wall,
        "tokens": tokens,
        "tok_s": tokens / wall,
        "ttft_p50": statistics.median(ttft),
        "ttft_p99": percentile(ttft, 0.99),
        "mean_tokens": tokens / len(results),
        "lines_per_request": statistics.mean(r.lines for r in results),
        "prompt_tokens": statistics.mean(r.prompt_tokens for r in results),
    }


# -- where the server's CPU time goes ------------------------------------------------------


def thread_cpu(pid: int | str = "self") -> dict[int, tuple[str, float]]:
    """CPU seconds (user + system) of each thread of a process: {tid: (comm, seconds)}.
    CPU time, unlike wall time, is little disturbed by other processes on a shared machine."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    base = f"/proc/{pid}/task"
    for tid in os.listdir(base):
        try:
            with open(f"{base}/{tid}/stat") as f:
                raw = f.read()
        except FileNotFoundError:
            continue
        comm = raw[raw.index("(") + 1 : raw.rindex(")")]
        fields = raw[raw.rindex(")") + 2 :].split()
        out[int(tid)] = (comm, (int(fields[11]) + int(fields[12])) / tick)
    return out


def cpu_groups(before: dict, after: dict, main_tid: int, names: dict[int, str]) -> dict:
    """CPU seconds spent between two `thread_cpu` snapshots, by thread: the main thread
    (event loop and HTTP), XLA's intra-op pool, and every other thread that used any (named
    by Python where `names` knows it)."""
    groups: dict[str, float] = {}
    for tid, (comm, secs) in after.items():
        spent = secs - before.get(tid, (comm, 0.0))[1]
        if spent <= 0:
            continue
        if tid == main_tid:
            key = "main thread (event loop, HTTP)"
        elif comm.endswith("XLAEigen"):
            key = "XLA intra-op pool (tf_XLAEigen)"
        else:
            key = f"thread {tid} {names.get(tid, comm)}"
        groups[key] = groups.get(key, 0.0) + spent
    return dict(sorted(groups.items(), key=lambda kv: -kv[1]))


def py_spy() -> Path | None:
    """The py-spy executable of this environment (its wheel's script), or None."""
    import shutil
    from importlib import metadata

    try:
        files = metadata.distribution("py-spy").files or []
        for f in files:
            if str(f).endswith("bin/py-spy"):
                return Path(str(f.locate())).resolve()
    except metadata.PackageNotFoundError:
        pass
    found = shutil.which("py-spy")
    return Path(found) if found else None


def python_thread_names(pid: int) -> dict[int, str]:
    """{native thread id: Python thread name} from `py-spy dump` (empty without py-spy)."""
    spy = py_spy()
    if spy is None:
        return {}
    try:
        text = subprocess.run(
            [str(spy), "dump", "--pid", str(pid)], capture_output=True, text=True, timeout=60
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    names = {}
    for line in text.splitlines():
        # Thread 12345 (active): "tsjax-engine"
        if line.startswith("Thread ") and '"' in line:
            head = line.split()[1]
            try:
                tid = int(head, 16) if head.startswith("0x") else int(head)
            except ValueError:
                continue
            names[tid] = line.split('"')[1]
    return names


def start_profile(pid: int, out: Path) -> subprocess.Popen | None:
    """`py-spy record` on the server, per thread, collapsed stacks (stopped with SIGINT)."""
    spy = py_spy()
    if spy is None:
        print("py-spy not installed: no profile", file=sys.stderr)
        return None
    cmd = [str(spy), "record", "--pid", str(pid), "--threads", "--rate", "50", "--format",
           "raw", "--output", str(out), "--nonblocking"]  # fmt: skip
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop_profile(proc: subprocess.Popen | None, out: Path) -> list[str]:
    """Stop py-spy and summarize its samples: by thread, then each thread's top functions
    (self time: the innermost Python frame) and top frames anywhere on the stack."""
    import signal

    if proc is None:
        return []
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
    if not out.exists():
        return ["(py-spy wrote no profile)"]
    return summarize_profile(out.read_text().splitlines())


def summarize_profile(lines: list[str], top: int = 12) -> list[str]:
    """Collapsed stacks ("thread;frame;...;frame count") -> per-thread sample shares."""
    by_thread: dict[str, float] = {}
    leaf: dict[str, dict[str, float]] = {}
    inclusive: dict[str, dict[str, float]] = {}
    for line in lines:
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        frames = stack.split(";")
        thread, n = frames[0], float(count)
        by_thread[thread] = by_thread.get(thread, 0.0) + n
        if len(frames) > 1:
            d = leaf.setdefault(thread, {})
            d[frames[-1]] = d.get(frames[-1], 0.0) + n
        seen = set()
        for f in frames[1:]:
            if f in seen:
                continue
            seen.add(f)
            d = inclusive.setdefault(thread, {})
            d[f] = d.get(f, 0.0) + n
    total = sum(by_thread.values()) or 1.0
    out = [f"py-spy: {total:.0f} samples (50/s, active threads only)"]
    for thread, n in sorted(by_thread.items(), key=lambda kv: -kv[1]):
        if n / total < 0.02:
            continue
        out.append(f"- {thread}: {n / total:.0%} of samples")
        for name, d in (("self", leaf), ("on stack", inclusive)):
            items = sorted(d.get(thread, {}).items(), key=lambda kv: -kv[1])[:top]
            for f, m in items:
                out.append(f"  - {name} {m / n:.0%} {f}")
    return out


# -- HTTP clients ---------------------------------------------------------------------------


async def http_one(client, url: str, model: str, i: int, tokens: int, t0: float) -> Result:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt(i)}],
        "stream": True,
        "options": {"num_predict": tokens},
    }
    ttft, lines, final = None, 0, {}
    async with client.stream("POST", f"{url}/api/chat", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line:
                continue
            obj = json.loads(line)
            if "queue_position" in obj:
                continue
            lines += 1
            if ttft is None and (obj.get("message") or {}).get("content"):
                ttft = time.perf_counter() - t0
            if obj.get("done"):
                final = obj
    end = time.perf_counter() - t0
    if "error" in final or not final:
        raise RuntimeError(f"request {i} failed: {final}")
    return Result(ttft or end, end, final["eval_count"], final["prompt_eval_count"], lines)


async def http_round(url: str, model: str, n: int, tokens: int, base: int) -> dict:
    import httpx

    limits = httpx.Limits(max_connections=n + 4, max_keepalive_connections=n + 4)
    async with httpx.AsyncClient(timeout=None, limits=limits) as client:
        t0 = time.perf_counter()
        res = await asyncio.gather(
            *(http_one(client, url, model, base + i, tokens, t0) for i in range(n))
        )
        return summarize(list(res), time.perf_counter() - t0)


# -- the server -----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    proc: subprocess.Popen
    url: str
    log: Path
    ready_s: float
    peak_startup: int
    cpu_ready: float = 0.0  # CPU seconds (all threads) the server had used when ready

    def model_name(self) -> str:
        import httpx

        return httpx.get(f"{self.url}/health", timeout=10).json()["model"]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def start_server(serve_args: list[str], timeout: float = 900.0) -> Server:
    """`tsjax serve` from this interpreter's environment on a free loopback port; returns
    once /health says ok (seconds from spawn, peak resident memory meanwhile)."""
    import httpx

    port = free_port()
    exe = Path(sys.executable).with_name("tsjax")
    log = Path(tempfile.mkstemp(prefix="tsjax-serve-", suffix=".log")[1])
    cmd = [str(exe), "serve", "--host", "127.0.0.1", "--port", str(port), *serve_args]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT)
    sampler = PeakSampler(proc.pid, interval=0.05).start()
    url = f"http://127.0.0.1:{port}"
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited ({proc.returncode}); log: {log}")
        if time.perf_counter() - t0 > timeout:
            proc.kill()
            raise RuntimeError(f"server not ready after {timeout:.0f}s; log: {log}")
        try:
            r = httpx.get(f"{url}/health", timeout=2)
            if r.status_code == 200:
                break
            if r.json().get("status") == "error":
                raise RuntimeError(f"server failed: {r.text}")
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    ready = time.perf_counter() - t0
    cpu = sum(secs for _, secs in thread_cpu(proc.pid).values())
    return Server(proc, url, log, ready, sampler.stop(), cpu)


def startup_line(log: Path) -> str:
    lines = [x for x in log.read_text().splitlines() if "tsjax serving" in x]
    return lines[-1].split(": ", 1)[-1] if lines else ""


# -- the engine in-process --------------------------------------------------------------------


def engine_runner(args, serve_args: list[str]):
    """The same requests through `serve.engine.Engine` built as `tsjax serve` builds it:
    returns (`run(n, base)`: one round of n clients, `stop()`, start-up figures)."""
    from serve.app import load_model
    from serve.engine import Engine, EventKind, GenerationRequest
    from serve.settings import add_serve_args, settings_from_args
    from tsjax.sampling import SamplingParams

    p = argparse.ArgumentParser()
    add_serve_args(p)
    s = settings_from_args(p.parse_args(serve_args))
    t0 = time.perf_counter()
    model = load_model(s)
    engine = Engine(model, decode_steps=s.decode_steps, prefill_chunk=s.prefill_chunk)
    engine.warmup()
    engine.start()
    info = {"ready_s": time.perf_counter() - t0, "rss_ready": rss()}
    info["dispatches"] = trace_dispatches(model.steps)
    sampling = SamplingParams(
        **{k: getattr(s, k) for k in SamplingParams.__dataclass_fields__ if hasattr(s, k)}
    )

    async def one(i: int, t0: float) -> Result:
        ids = model.render_chat([{"role": "user", "content": prompt(i)}])
        req = GenerationRequest(ids, sampling, args.tokens, stop=tuple(s.stop))
        ttft, lines, done = None, 0, None
        async for ev in engine.generate(req):
            if ev.kind is EventKind.TOKEN:
                lines += 1
                if ttft is None and ev.text:
                    ttft = time.perf_counter() - t0
            elif ev.kind in (EventKind.DONE, EventKind.ERROR):
                done = ev
        end = time.perf_counter() - t0
        assert done is not None and done.kind is EventKind.DONE, done
        return Result(ttft or end, end, done.stats.completion_tokens, len(ids), lines)

    async def round_(n: int, base: int) -> dict:
        t0 = time.perf_counter()
        res = await asyncio.gather(*(one(base + i, t0) for i in range(n)))
        return summarize(list(res), time.perf_counter() - t0)

    return (lambda n, base: asyncio.run(round_(n, base))), engine.stop, info


class DispatchTrace:
    """The engine's step calls, recorded by wrapping its `Steps` object's methods: what was
    dispatched (prefill prompts and token bucket, decode rows / bucket / step count, row
    swaps) and when, so a round's wall time can be split into its dispatches."""

    def __init__(self):
        self.calls: list[tuple[float, str, tuple]] = []
        self.compiles: list[tuple[str, float]] = []  # compiled (or cache-loaded) meanwhile
        self.enabled = False

    def wrap(self, steps, name: str, describe) -> None:
        fn = getattr(steps, name)

        def wrapped(*a, **k):
            if self.enabled:
                self.calls.append((time.perf_counter(), name, describe(steps, *a, **k)))
            return fn(*a, **k)

        setattr(steps, name, wrapped)

    def summary(self) -> list[str]:
        """Counts by kind and shape, and the mean time from each call to the next (for a
        decode, about its dispatch's run time, pipelining aside)."""
        from collections import defaultdict

        gaps: dict[tuple, list[float]] = defaultdict(list)
        for (t, name, desc), nxt in zip(self.calls, self.calls[1:] + [None], strict=True):
            gap = (nxt[0] - t) if nxt is not None and nxt[0] - t < 5 else float("nan")
            gaps[(name, desc)].append(gap)
        out = ["| call | shape | count | mean s to next call |", "|---|---|---|---|"]
        for (name, desc), g in sorted(gaps.items(), key=lambda kv: (kv[0][0], -len(kv[1]))):
            ok = [x for x in g if x == x]
            mean = f"{statistics.mean(ok):.3f}" if ok else "-"
            out.append(f"| {name} | {desc} | {len(g)} | {mean} |")
        if self.compiles:
            secs = sum(x for _, x in self.compiles)
            names = sorted({n for n, _ in self.compiles})
            out.append(f"compiled while serving: {len(self.compiles)} ({secs:.1f}s): {names}")
        return out


def trace_dispatches(steps) -> DispatchTrace:
    from tsjax.steps import bucket_for

    trace = DispatchTrace()

    def prefill(st, params, cache, sampler, prompts, rows, sampling, starts=None, *a, **k):
        t = bucket_for(max(len(p) for p in prompts), st.shapes.prefill_lens)
        attn = st.attn_len_for(min(max(starts or [0]) + t, st.shapes.max_len))
        return f"{len(prompts)} prompt(s), T bucket {t}, attn {attn}"

    def decode(st, params, cache, sampler, rows, tokens, max_pos, n_steps=1, *a, **k):
        b = bucket_for(max(rows) + 1, st.shapes.decode_batches)
        # a decode chained on the previous one's device tokens gets its `PendingTokens`
        fed = "host" if isinstance(tokens, (list, tuple)) else "device"
        attn = st.attn_len_for(max_pos + n_steps)
        return f"{len(rows)} rows in bucket {b}, {n_steps} steps, attn {attn}, fed {fed}"

    def swap(st, params, cache, sampler, pairs):
        return f"{len(pairs)} pairs"

    import jax

    def on_compile(event: str, secs: float, **kw) -> None:
        if trace.enabled and event == "/jax/core/compile/backend_compile_duration":
            trace.compiles.append((kw.get("fun_name", "?"), secs))

    jax.monitoring.register_event_duration_secs_listener(on_compile)
    trace.wrap(steps, "prefill", prefill)
    trace.wrap(steps, "decode", decode)
    trace.wrap(steps, "swap_rows", swap)
    return trace


# -- main -------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    serve_args: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, serve_args = argv[:i], argv[i + 1 :]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--concurrency", "-n", type=int, default=16)
    p.add_argument("--tokens", type=int, default=64, help="num_predict of every request")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--url", default=None, help="use this running server (no start-up figures)")
    p.add_argument("--pid", type=int, default=None, help="with --url: the server's pid")
    p.add_argument("--engine", action="store_true", help="engine in-process, no HTTP")
    p.add_argument("--profile", action="store_true", help="py-spy record the measured rounds")
    p.add_argument(
        "--startup", type=int, default=0, metavar="N",
        help="only start the server N times in a row (the first may fill the compilation"
        " cache): ready time, CPU seconds, resident memory, start-up line",
    )  # fmt: skip
    args = p.parse_args(argv)
    if args.startup:
        return startups(args.startup, serve_args)
    head = f"{args.concurrency} clients x {args.tokens} tokens, serve flags {serve_args or '-'}"
    server, stop, trace = None, None, None
    if args.engine:
        run, stop, info = engine_runner(args, serve_args)
        trace = info.pop("dispatches")
        pid: int | None = os.getpid()
        title = f"## engine in-process: {head}"
    else:
        if args.url is None:
            server = start_server(serve_args)
            url, pid = server.url, server.proc.pid
            print(f"server pid {pid} ready in {server.ready_s:.1f}s", file=sys.stderr)
            info = {"ready_s": server.ready_s, "cpu_ready_s": server.cpu_ready,
                    "rss_peak_startup": server.peak_startup}  # fmt: skip
            info["startup_line"] = startup_line(server.log)
        else:
            url, pid, info = args.url.rstrip("/"), args.pid, {}
        import httpx

        model = httpx.get(f"{url}/health", timeout=10).json()["model"]

        def run(n: int, base: int) -> dict:
            return asyncio.run(http_round(url, model, n, args.tokens, base))

        title = f"## tsjax serve over HTTP: {head}"
    try:
        rounds, extra = measure(args, run, pid, trace)
        info |= extra
    finally:
        if stop is not None:
            stop()
        if server is not None:
            server.stop()
    report(title, info, rounds)
    return 0


def startups(n: int, serve_args: list[str]) -> int:
    """Start `tsjax serve` n times in a row, each stopped once ready: a Markdown row each."""
    print("| start | ready s | CPU s at ready | resident at ready MB | peak MB | start-up line |")
    print("|---|---|---|---|---|---|")
    for i in range(n):
        server = start_server(serve_args)
        try:
            resident = rss(server.proc.pid)
            line = startup_line(server.log)
        finally:
            server.stop()
        print(f"| {i + 1} | {server.ready_s:.1f} | {server.cpu_ready:.1f} | {resident / MB:.0f}"
              f" | {server.peak_startup / MB:.0f} | {line} |", flush=True)  # fmt: skip
    return 0


def measure(args, run, pid: int | None, trace=None) -> tuple[list[dict], dict]:
    """One client first (anything lazy), then the measured rounds: their results, and the
    server's memory and CPU time by thread over them (when its pid is known)."""
    run(1, 1000)
    info: dict = {}
    if pid is None:
        return [run(args.concurrency, 100 * r) for r in range(args.rounds)], info
    info["rss_ready"] = rss(pid)
    names = python_thread_names(pid)
    profile_out = Path(tempfile.mkstemp(prefix="tsjax-pyspy-", suffix=".txt")[1])
    spy = start_profile(pid, profile_out) if args.profile else None
    sampler = PeakSampler(pid).start()
    if trace is not None:
        trace.enabled = True
    before = thread_cpu(pid)
    rounds = []
    for r in range(args.rounds):
        rounds.append(run(args.concurrency, 100 * r))
        print(f"round {r}: {rounds[-1]}", file=sys.stderr, flush=True)
    after = thread_cpu(pid)
    if trace is not None:
        trace.enabled = False
        info["dispatch_table"] = trace.summary()
    info["rss_peak_load"] = sampler.stop()
    info["rss_after"] = rss(pid)
    info["profile"] = stop_profile(spy, profile_out)
    tokens = sum(r["tokens"] for r in rounds)
    info["cpu"] = {
        k: (v, v / tokens * 1e3) for k, v in cpu_groups(before, after, pid, names).items()
    }
    return rounds, info


def report(title: str, info: dict, rounds: list[dict]) -> None:
    print(title)
    env = {k: os.environ.get(k, "") for k in ("XLA_FLAGS", "MALLOC_ARENA_MAX", "LD_PRELOAD")}
    print(f"env: {env}")
    for k, v in info.items():
        if k in ("cpu", "profile", "dispatch_table"):
            continue
        print(f"- {k}: {v / MB:.0f} MB" if k.startswith("rss") else f"- {k}: {v}")
    print("\n| round | wall s | tokens | tok/s | TTFT p50 s | TTFT p99 s | lines/request |")
    print("|---|---|---|---|---|---|---|")
    for i, r in enumerate(rounds):
        print(
            f"| {i} | {r['wall_s']:.2f} | {r['tokens']} | {r['tok_s']:.1f} | {r['ttft_p50']:.2f}"
            f" | {r['ttft_p99']:.2f} | {r['lines_per_request']:.1f} |"
        )
    print(f"median tok/s {statistics.median(r['tok_s'] for r in rounds):.1f}")
    if info.get("cpu"):
        total = sum(v for v, _ in info["cpu"].values())
        print("\n| thread | CPU s | CPU ms per token | share |\n|---|---|---|---|")
        for k, (v, per) in info["cpu"].items():
            print(f"| {k} | {v:.1f} | {per:.1f} | {v / total:.0%} |")
    if info.get("dispatch_table"):
        print("\nengine dispatches over the measured rounds:\n" + "\n".join(info["dispatch_table"]))
    if info.get("profile"):
        print("\n" + "\n".join(info["profile"]))


if __name__ == "__main__":
    sys.exit(main())


# -- `tsjax bench --http` ---------------------------------------------------------------------


def bench_http(args: argparse.Namespace) -> int:
    """`tsjax bench --http`: start `tsjax serve` with its defaults on the model (and
    `--quant` if given), drive it with `--clients` concurrent streaming Ollama chat clients of
    `--decode-tokens` tokens each over loopback, and alternate each round with llama.cpp's
    batched decode of as many sequences on the same file (greedy, a prompt of the same
    length; pure decode, the issue's reference). Prints a Markdown report: server ready time
    and resident memory, then per round the served tok/s (wall from the first request to the
    last answer, prefill and queueing included), TTFT p50/p99, llama.cpp's tok/s, the ratio."""
    import httpx

    from benchmarks.engine import bench_llama_cpp

    serve_args = ["--model", args.model] + (["--quant", args.quant] if args.quant else [])
    n, tokens = args.clients, args.decode_tokens
    load_avg = os.getloadavg()
    server = start_server(serve_args)
    rows: list[tuple[dict, dict | None]] = []
    ref, batched, close_ref = None, None, None
    try:
        url, pid = server.url, server.proc.pid
        model = httpx.get(f"{url}/health", timeout=10).json()["model"]
        info = {"ready_s": server.ready_s, "cpu_ready_s": server.cpu_ready,
                "rss_peak_startup": server.peak_startup,
                "startup_line": startup_line(server.log)}  # fmt: skip
        first = asyncio.run(http_round(url, model, 1, tokens, 1000))  # one client alone
        info["rss_ready"] = rss(pid)
        # the first round of N reaches shapes the warm-up left to first use: they are served
        # by bigger programs while their own compile in the background; measure once done
        t = time.perf_counter()
        info["first_round"] = asyncio.run(http_round(url, model, n, tokens, 2000))
        info["compiles_s"] = wait_compiled(url) + (time.perf_counter() - t)
        if not args.no_llama_cpp:
            ids = prompt_ids(args.model, first)
            if got := bench_llama_cpp(args, args.model, ids):
                ref, batched, close_ref = got
        sampler = PeakSampler(pid).start()
        cpu0 = sum(s for _, s in thread_cpu(pid).values())
        for r in range(max(1, args.repeats)):
            ours = asyncio.run(http_round(url, model, n, tokens, 100 * r))
            theirs = batched(n) if batched else None
            rows.append((ours, theirs))
            print(f"round {r}: {ours}", file=sys.stderr, flush=True)
        info["server_cpu_ms_per_token"] = (
            (sum(s for _, s in thread_cpu(pid).values()) - cpu0)
            * 1e3 / sum(o["tokens"] for o, _ in rows)
        )  # fmt: skip
        info["rss_peak_load"] = sampler.stop()
        info["rss_after"] = rss(pid)
        info["single_client"] = first
    finally:
        if close_ref is not None:
            close_ref()
        server.stop()
    print(http_report(args, info, rows, ref, load_avg))
    return 0


def wait_compiled(url: str, timeout: float = 900.0) -> float:
    """Wait until the server compiles nothing and defers nothing (its
    `tsjax_compiling_programs` and `tsjax_deferred_programs` gauges are 0); returns the
    seconds waited."""
    import httpx

    t0 = time.perf_counter()
    gauges = ("tsjax_compiling_programs ", "tsjax_deferred_programs ")
    while time.perf_counter() - t0 < timeout:
        text = httpx.get(f"{url}/metrics", timeout=30).text
        busy = [x for x in text.splitlines() if x.startswith(gauges)]
        if all(float(x.split()[1]) == 0 for x in busy):
            break
        time.sleep(1.0)
    return time.perf_counter() - t0


def prompt_ids(model: str, first: dict) -> list[int]:
    """Token ids of a prompt as long as the served ones (their `prompt_eval_count`), for
    llama.cpp's batched decode: the first client's prompt text, tokenized by tsjax and cut or
    repeated to that length."""
    from tsjax.gguf import GGUFFile
    from tsjax.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf(GGUFFile(model).metadata)
    ids = tok.encode(prompt(0))
    want = max(1, int(first.get("prompt_tokens", len(ids))))
    return (ids * (want // max(len(ids), 1) + 1))[:want]


def http_report(args, info: dict, rows: list, ref: dict | None, load_avg) -> str:
    out = [
        f"## `tsjax bench --http`: {args.clients} concurrent clients x {args.decode_tokens}"
        f" tokens on `tsjax serve` defaults{' --quant ' + args.quant if args.quant else ''}",
        f"model {Path(args.model).name}; load average at start {load_avg[0]:.1f}",
        f"- server ready in {info['ready_s']:.1f}s ({info['cpu_ready_s']:.1f} CPU s):"
        f" {info['startup_line']}",
        f"- server resident: peak during start-up {info['rss_peak_startup'] / MB:.0f} MB,"
        f" after one request {info['rss_ready'] / MB:.0f} MB, peak under load"
        f" {info['rss_peak_load'] / MB:.0f} MB, after {info['rss_after'] / MB:.0f} MB",
        f"- server CPU per generated token: {info['server_cpu_ms_per_token']:.1f} ms (all threads)",
        f"- one client alone: {info['single_client']['tok_s']:.1f} tok/s, TTFT"
        f" {info['single_client']['ttft_p50']:.2f}s",
        f"- first round of {args.clients} (shapes past the warm-up served by bigger programs"
        f" while theirs compile): {info['first_round']['tok_s']:.1f} tok/s, TTFT p50"
        f" {info['first_round']['ttft_p50']:.2f}s p99 {info['first_round']['ttft_p99']:.2f}s;"
        f" its compiles done {info['compiles_s']:.0f}s after it started",
    ]
    if ref is not None:
        out.append(f"- llama.cpp: llama-cpp-python {ref['version']}, {ref['threads']} threads,"
                   " batched greedy decode of as many sequences (after their prefill)")  # fmt: skip
    out += ["", "| round | served tok/s (wall incl. prefill) | TTFT p50 s | TTFT p99 s |"
            " llama.cpp batched tok/s | ratio |", "|---|---|---|---|---|---|"]  # fmt: skip
    ratios = []
    for i, (o, t) in enumerate(rows):
        theirs = t["aggregate_tok_s"] if t else None
        ratio = o["tok_s"] / theirs if theirs else None
        if ratio:
            ratios.append(ratio)
        out.append(f"| {i} | {o['tok_s']:.1f} | {o['ttft_p50']:.2f} | {o['ttft_p99']:.2f} |"
                   f" {f'{theirs:.1f}' if theirs else '-'} |"
                   f" {f'{ratio:.2f}x' if ratio else '-'} |")  # fmt: skip
    med = statistics.median(o["tok_s"] for o, _ in rows)
    line = f"median served {med:.1f} tok/s"
    if ratios:
        line += f"; median ratio {statistics.median(ratios):.2f}x llama.cpp"
    return "\n".join([*out, "", line])
