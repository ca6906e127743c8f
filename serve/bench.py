"""`tsjax bench`: prefill, single-stream and batched decode, time to first token under load,
and cold start, for one GGUF model; with llama-cpp-python installed (the `bench` extra), the
same measurements of llama.cpp on the same file in the same run, and the ratios.

Prints a Markdown report (paste it into BENCHMARKS.md) with the exact command and the floor
for single-stream decode: bytes of weights read per token / measured memory read bandwidth.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np


def add_bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=None, help="catalog name or .gguf path")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--concurrency", default="1,4,16,32", help="comma-separated request counts")
    p.add_argument("--decode-steps", type=int, default=4, help="decode steps per dispatch")
    p.add_argument("--no-llama-cpp", action="store_true", help="skip the llama.cpp comparison")
    p.add_argument("--no-cold-start", action="store_true", help="skip the cold-start runs")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="llama.cpp threads")


def read_bandwidth(n_bytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes/s of a streaming read (numpy sum over a buffer far larger than the caches)."""
    a = np.ones(n_bytes // 4, np.float32)
    a.sum()
    best = min(_timed(a.sum) for _ in range(repeats))
    return n_bytes / best


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _prompt(tokenizer, n: int) -> list[int]:
    text = (
        "The history of computing is a story of abstractions layered on abstractions, "
        "from switches to gates, from gates to instructions, from instructions to languages. "
    ) * 40
    ids = tokenizer.encode(text, add_bos=False)
    return ids[:n]


def bench_tsjax(args, rows: int) -> dict:
    from serve.engine import Engine, EventKind, GenerationRequest
    from tsjax.model import load
    from tsjax.sampling import SamplingParams

    t0 = time.perf_counter()
    max_len = max(512, args.prompt_tokens + args.decode_tokens + 16)
    model = load(args.model, rows=rows, max_len=max_len, progress=sys.stderr.isatty())
    load_s = time.perf_counter() - t0
    engine = Engine(model, decode_steps=args.decode_steps, prefill_chunk=512)
    compile_s = engine.warmup()
    engine.start()
    prompt = _prompt(model.tokenizer, args.prompt_tokens)
    out: dict = {
        "load_s": load_s,
        "compile_s": compile_s,
        "param_bytes": model.load_stats.bytes_params,
        "rows": rows,
    }

    async def one(i: int, n_tokens: int, trace: list | None = None):
        # Distinct first token per request, so no request reuses another's prefix.
        p = [prompt[(i * 7) % len(prompt)]] + prompt[1:]
        req = GenerationRequest(p, SamplingParams.greedy(), n_tokens, reuse_prefix=False)
        done, first = None, None
        async for ev in engine.generate(req):
            if ev.kind is EventKind.TOKEN and trace is not None:
                trace.append((time.perf_counter(), len(ev.token_ids)))
                first = first or time.perf_counter()
            if ev.kind is EventKind.DONE:
                done = ev
        return done.stats, done.stats.completion_tokens, first, time.perf_counter()

    async def load_test(n: int):
        """Aggregate decode rate while all n requests are decoding: tokens emitted between
        the last request's first token and the first request's end, over that window."""
        trace: list = []
        res = await asyncio.gather(*(one(i, args.decode_tokens, trace) for i in range(n)))
        start = max(r[2] for r in res)
        end = min(r[3] for r in res)
        if end - start < 0.5:  # too short a window: fall back to the whole run
            start, end = min(t for t, _ in trace), max(r[3] for r in res)
        toks = sum(k for t, k in trace if start < t <= end)
        return res, toks / (end - start)

    # Prefill: one request, max_tokens=1, so its time is the prompt's.
    asyncio.run(one(0, 1))
    stats = [asyncio.run(one(i, 1))[0] for i in range(3)]  # (stats, n, first, end)
    out["prefill_tok_s"] = args.prompt_tokens / min(s.prefill_seconds for s in stats)
    # Single-stream decode.
    s, n, _, _ = asyncio.run(one(1, args.decode_tokens))
    out["decode_1_tok_s"] = (n - 1) / s.decode_seconds
    out["load"] = {}
    for c in [int(x) for x in args.concurrency.split(",")]:
        if c > rows:
            continue
        res, rate = asyncio.run(load_test(c))
        ttft = sorted(r[0].first_token_seconds for r in res)
        out["load"][c] = {
            "aggregate_tok_s": rate,
            "ttft_p50": statistics.median(ttft),
            "ttft_p99": ttft[min(len(ttft) - 1, int(round(0.99 * (len(ttft) - 1))))],
        }
    engine.stop()
    return out


def bench_llama_cpp(args, path: str, prompt_tokens: int) -> dict | None:
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(
        model_path=path,
        n_ctx=max(512, prompt_tokens + args.decode_tokens + 16),
        n_threads=args.threads,
        n_batch=512,
        verbose=False,
        logits_all=False,
    )
    text = "The history of computing is a story of abstractions layered on abstractions. " * 40
    ids = llm.tokenize(text.encode(), add_bos=False)[:prompt_tokens]
    out = {}
    times = []
    for _ in range(3):
        llm.reset()
        t = time.perf_counter()
        llm.eval(ids)
        times.append(time.perf_counter() - t)
    out["prefill_tok_s"] = prompt_tokens / min(times)
    llm.reset()
    llm.eval(ids)
    t = time.perf_counter()
    n = 0
    for _ in range(args.decode_tokens):
        tok = llm.sample(temp=0.0)
        llm.eval([tok])
        n += 1
    out["decode_1_tok_s"] = n / (time.perf_counter() - t)
    return out


def cold_start(model: str | None, cache_dir: str | None) -> float:
    """Seconds from process start to the first generated token (`tsjax generate -n 1`)."""
    env = dict(os.environ)
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    if cache_dir:
        env["JAX_COMPILATION_CACHE_DIR"] = cache_dir
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
        env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    cmd = [sys.executable, "-m", "tsjax.cli", "generate", "-n", "1", "--raw", "Hello"]
    if model:
        cmd[4:4] = ["--model", model]
    t = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    return time.perf_counter() - t


def cmd_bench(args: argparse.Namespace) -> int:
    from tsjax.catalog import resolve_model

    path = str(resolve_model(args.model))
    args.model = path
    bw = read_bandwidth()
    conc = [int(x) for x in args.concurrency.split(",")]
    ours = bench_tsjax(args, rows=max(conc))
    ref = None if args.no_llama_cpp else bench_llama_cpp(args, path, args.prompt_tokens)
    cold = {}
    if not args.no_cold_start:
        cold["no cache"] = cold_start(path, None)
        with tempfile.TemporaryDirectory() as d:
            cold_start(path, d)  # fill the persistent cache
            cold["persistent cache"] = cold_start(path, d)
    print(report(args, path, bw, ours, ref, cold))
    return 0


def report(args, path, bw, ours, ref, cold) -> str:
    floor = ours["param_bytes"] / bw
    cmd = "tsjax bench " + " ".join(a for a in sys.argv[2:])
    lines = [
        f"### {os.path.basename(path)} on {platform.machine()}, {os.cpu_count()} cores",
        "",
        f"Command: `{cmd.strip()}`  ",
        f"Read bandwidth {bw / 1e9:.1f} GB/s; float32 params {ours['param_bytes'] / 1e6:.0f} MB"
        f" -> single-stream decode floor {floor * 1e3:.1f} ms/token ({1 / floor:.1f} tok/s).  ",
        f"Load {ours['load_s']:.1f} s, compile (warm-up) {ours['compile_s']:.1f} s,"
        f" {ours['rows']} decode rows, {args.decode_steps} steps per dispatch.",
        "",
        "| metric | tsjax | llama.cpp | ratio |",
        "|---|---|---|---|",
    ]

    def row(name, a, b, unit="tok/s"):
        r = f"{a / b:.2f}x" if b else "-"
        bs = f"{b:.1f} {unit}" if b else "-"
        lines.append(f"| {name} | {a:.1f} {unit} | {bs} | {r} |")

    row(
        f"prefill ({args.prompt_tokens} tokens)",
        ours["prefill_tok_s"],
        ref and ref["prefill_tok_s"],
    )
    row("decode, 1 stream", ours["decode_1_tok_s"], ref and ref["decode_1_tok_s"])
    lines.append(
        f"| decode 1 stream vs float32 floor | {ours['decode_1_tok_s'] * floor:.2f}"
        " of floor speed | | |"
    )
    for c, m in ours["load"].items():
        lines.append(
            f"| aggregate decode, {c} concurrent | {m['aggregate_tok_s']:.1f} tok/s"
            f" (TTFT p50 {m['ttft_p50'] * 1e3:.0f} ms, p99 {m['ttft_p99'] * 1e3:.0f} ms)"
            " | | |"
        )
    for k, v in cold.items():
        lines.append(f"| cold start to first token, {k} | {v:.1f} s | | |")
    if ref is None and not args.no_llama_cpp:
        lines.append("\nllama-cpp-python is not installed (`pip install -e .[bench]`): no ratios.")
    return "\n".join(lines)
