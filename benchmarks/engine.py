"""`tsjax bench`: prefill, single-stream and batched decode, time to first token under load,
and cold start, for one GGUF model; with llama-cpp-python installed (the `bench` extra), the
same measurements of llama.cpp on the same file in the same run, and the ratios.

Prints a Markdown report (paste it into BENCHMARKS.md) with the exact command and the floor
for single-stream decode: bytes of weights read per token / measured memory read bandwidth.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence

import numpy as np

from tsjax.cli import Command
from tsjax.quants import QUANT_CHOICES, QUANT_HELP
from tsjax.residency import peak_resident_bytes, release_free_memory, resident_bytes


def add_bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=None, help="catalog name or .gguf path")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--concurrency", default="1,4,16,32", help="comma-separated request counts")
    p.add_argument("--decode-steps", type=int, default=4, help="decode steps per dispatch")
    p.add_argument("--quant", choices=QUANT_CHOICES, default="auto", help=QUANT_HELP)
    p.add_argument("--no-llama-cpp", action="store_true", help="skip the llama.cpp comparison")
    p.add_argument("--no-cold-start", action="store_true", help="skip the cold-start runs")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="llama.cpp threads")
    p.add_argument(
        "--http",
        action="store_true",
        help="the served path: start `tsjax serve` with its defaults and drive it with"
        " --clients concurrent HTTP clients (llama.cpp batched decode alongside)",
    )
    p.add_argument("--clients", type=int, default=16, help="with --http: concurrent clients")
    p.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="rounds per concurrency, tsjax and llama.cpp alternating; medians are reported",
    )


def read_bandwidth(n_bytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes/s of a streaming read (numpy sum over a buffer far larger than the caches)."""
    a = np.ones(n_bytes // 4, np.float32)
    a.sum()
    best = min(_timed(a.sum) for _ in range(repeats))
    return n_bytes / best


# The routed experts' matrices under a MoE block ("moe"): a token reads top_k of n_experts.
_EXPERT_LEAVES = frozenset({"gate", "up", "down", "gate_up", "gate_bias", "up_bias", "down_bias"})


def read_per_token(params, moe=None) -> int:
    """Bytes of `params` one decode token reads: all of them, except that of a mixture of
    experts' routed matrices only `top_k / n_experts` (`moe`: the family's `MoESpec`; the
    router and any shared expert are read whole). The floor of a single stream is this over
    the read bandwidth."""
    import jax

    total = 0.0
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        keys = [getattr(k, "key", None) for k in path]
        routed = moe is not None and any(
            a == "moe" and b in _EXPERT_LEAVES for a, b in zip(keys, keys[1:], strict=False)
        )
        total += leaf.nbytes * (moe.top_k / moe.n_experts if routed else 1.0)
    return int(total)


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


def bench_tsjax(
    args, rows: int, lazy: bool = False
) -> tuple[dict, Callable[[int], dict], Callable[[], None]]:
    """Load, warm up, then prefill and single-stream decode; returns (results, `load(c)`: one
    round of c concurrent requests, `close()`). `lazy`: compile only the shapes the
    measurements reach (the server's lazy programs, then one unmeasured pass of each
    measurement and a wait for its background compiles) instead of every shape up front,
    which takes many minutes for a model of a billion parameters."""
    from serve.engine import Engine, EventKind, GenerationRequest
    from tsjax.model import load
    from tsjax.sampling import SamplingParams

    t0 = time.perf_counter()
    max_len = max(512, args.prompt_tokens + args.decode_tokens + 16)
    model = load(
        args.model, rows=rows, max_len=max_len, progress=sys.stderr.isatty(), quant=args.quant
    )
    load_s = time.perf_counter() - t0
    engine = Engine(model, decode_steps=args.decode_steps, prefill_chunk=512)
    model.steps.lazy = lazy
    compile_s = engine.warmup()
    release_free_memory()  # as the server does after its warm-up
    engine.start()
    prompt = _prompt(model.tokenizer, args.prompt_tokens)
    out: dict = {
        "rss_warm": resident_bytes(),
        "load_s": load_s,
        "compile_s": compile_s,
        "param_bytes": model.load_stats.bytes_params,
        "read_bytes": read_per_token(model.params, model.config.moe),
        "format": model.quant,
        "rows": rows,
        "prompt_ids": prompt,
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
        """Aggregate decode rate while all n requests are decoding, as llama.cpp's is taken
        (`llama_cpp_batched`: every decode step after the last prompt is prefilled): tokens
        emitted after the last request's first token up to the last token, over that time.
        If a request stopped before `decode_tokens` (an end-of-generation token), the window
        ends with the first request's end instead, so that all n decode throughout it."""
        trace: list = []
        res = await asyncio.gather(*(one(i, args.decode_tokens, trace) for i in range(n)))
        start, end = decode_window(
            [r[2] for r in res],
            [r[3] for r in res],
            max(t for t, _ in trace),
            all(r[1] == args.decode_tokens for r in res),
        )
        if end - start < 0.5:  # too short a window: fall back to the whole run
            start, end = min(t for t, _ in trace), max(r[3] for r in res)
        toks = sum(k for t, k in trace if start < t <= end)
        return res, toks / (end - start)

    if lazy:  # every shape the measurements reach, compiled before they run
        t = time.perf_counter()
        asyncio.run(one(0, args.decode_tokens))
        asyncio.run(load_test(rows))
        model.steps.programs.idle()
        out["compile_s"] += time.perf_counter() - t
    # Prefill: one request, max_tokens=1, so its time is the prompt's.
    asyncio.run(one(0, 1))
    stats = [asyncio.run(one(i, 1))[0] for i in range(3)]  # (stats, n, first, end)
    out["prefill_tok_s"] = args.prompt_tokens / min(s.prefill_seconds for s in stats)
    # Single-stream decode.
    s, n, _, _ = asyncio.run(one(1, args.decode_tokens))
    out["decode_1_tok_s"] = (n - 1) / s.decode_seconds
    out["load"] = {}

    def load(c: int) -> dict:
        res, rate = asyncio.run(load_test(c))
        ttft = sorted(r[0].first_token_seconds for r in res)
        return {
            "aggregate_tok_s": rate,
            "ttft_p50": statistics.median(ttft),
            "ttft_p99": ttft[min(len(ttft) - 1, int(round(0.99 * (len(ttft) - 1))))],
        }

    return out, load, engine.stop


def decode_window(
    firsts: list[float], ends: list[float], last_token: float, all_full: bool
) -> tuple[float, float]:
    """The load test's (start, end): from the last request's first token (every prompt is
    prefilled) to the last token when every request ran to its token limit, else to the first
    request's end (after it, fewer than all were decoding)."""
    return max(firsts), (last_token if all_full else min(ends))


LLAMA_CPP_LOGGER = "llama-cpp-python"

#: One token of a llama.cpp batch: (token id, position, sequence id, whether to output logits).
BatchEntry = tuple[int, int, int, bool]


def distinct_prompts(prompt: Sequence[int], n: int) -> list[list[int]]:
    """n copies of `prompt`, the i-th starting with token `prompt[7 i mod len]` instead of its
    first token: the same scheme as tsjax's load test, so both sides process the same tokens."""
    p = list(prompt)
    return [[p[(i * 7) % len(p)]] + p[1:] for i in range(n)]


def prefill_chunks(prompts: Sequence[Sequence[int]], n_batch: int) -> list[list[BatchEntry]]:
    """All prompts' tokens (prompt i is sequence i, from position 0), prompt after prompt, cut
    into `llama_decode` batches of at most `n_batch` tokens; logits only for each prompt's last
    token, which gives that sequence's first generated token."""
    flat = [
        (tok, pos, seq, pos == len(p) - 1)
        for seq, p in enumerate(prompts)
        for pos, tok in enumerate(p)
    ]
    return [flat[i : i + n_batch] for i in range(0, len(flat), n_batch)]


def decode_entries(tokens: Sequence[int], pos: int) -> list[BatchEntry]:
    """One decode step of every sequence: token i at position `pos` of sequence i, with logits."""
    return [(tok, pos, seq, True) for seq, tok in enumerate(tokens)]


def fill_batch(batch, entries: Sequence[BatchEntry]) -> list[tuple[int, int]]:
    """Write `entries` into a `llama_batch` (one sequence id per token) and return
    (sequence id, index in the batch) of each token whose logits are requested, which is the
    index `llama_get_logits_ith` takes."""
    outputs = []
    for i, (tok, pos, seq, logits) in enumerate(entries):
        batch.token[i] = tok
        batch.pos[i] = pos
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = seq
        batch.logits[i] = 1 if logits else 0
        if logits:
            outputs.append((seq, i))
    batch.n_tokens = len(entries)
    return outputs


def llama_cpp_batched(
    model,
    n_vocab: int,
    prompt: Sequence[int],
    n: int,
    decode_tokens: int,
    threads: int,
    n_batch: int = 512,
) -> dict:
    """llama.cpp batched greedy decode of n independent sequences of `prompt` (distinct first
    tokens, nothing shared), in a fresh context with `n_seq_max=n` and a KV cache sized for n.

    The n prompts are prefilled together (batches of `n_batch` tokens); then every
    `llama_decode` call carries one token of each sequence, and each sequence's next token is
    the argmax of its logits (numpy), until each sequence has `decode_tokens` tokens. Returns
    `prefill_tok_s` (n prompts' tokens / prefill time), `aggregate_tok_s` (tokens of the
    steady decode, after all prompts are prefilled / its time), `median_step_tok_s` (n / the
    median decode step's time: the same rate without the steps another process slowed down)
    and `tokens` (each sequence's generated ids, for checking)."""
    import llama_cpp

    per_seq = -(-(len(prompt) + decode_tokens + 16) // 256) * 256
    cparams = llama_cpp.llama_context_default_params()
    cparams.n_ctx = n * per_seq
    cparams.n_batch = cparams.n_ubatch = n_batch
    cparams.n_seq_max = n
    cparams.n_threads = cparams.n_threads_batch = threads
    ctx = llama_cpp.llama_init_from_model(model, cparams)
    if not ctx:
        raise RuntimeError(f"llama.cpp: could not create a context for {n} sequences")
    batch = llama_cpp.llama_batch_init(max(n_batch, n), 0, 1)
    next_tok = [0] * n
    generated: list[list[int]] = [[] for _ in range(n)]

    def run(entries: Sequence[BatchEntry]) -> None:
        outputs = fill_batch(batch, entries)
        rc = llama_cpp.llama_decode(ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc} ({n} sequences)")
        for seq, i in outputs:
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, i), (n_vocab,))
            next_tok[seq] = int(logits.argmax())
            generated[seq].append(next_tok[seq])

    try:
        t0 = time.perf_counter()
        for chunk in prefill_chunks(distinct_prompts(prompt, n), n_batch):
            run(chunk)
        t1 = time.perf_counter()
        steps = max(1, decode_tokens - 1)  # the first token came from the prefill
        step_s = []
        for k in range(steps):
            t = time.perf_counter()
            run(decode_entries(next_tok, len(prompt) + k))
            step_s.append(time.perf_counter() - t)
        t2 = time.perf_counter()
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)
    return {
        "prefill_tok_s": n * len(prompt) / (t1 - t0),
        "aggregate_tok_s": n * steps / (t2 - t1),
        "median_step_tok_s": n / statistics.median(step_s),
        "tokens": generated,
    }


def bench_llama_cpp(
    args: argparse.Namespace, path: str, prompt: Sequence[int]
) -> tuple[dict, Callable[[int], dict], Callable[[], None]] | None:
    """llama.cpp (llama-cpp-python) on the same GGUF and prompt tokens: prefill and
    single-stream decode through the `Llama` class; returns (results, `batched(c)`: one round
    of batched decode of c sequences through the low-level API, `close()`). None if
    llama-cpp-python is not installed."""
    try:
        import llama_cpp
        from llama_cpp import Llama
    except ImportError:
        return None
    ids = list(prompt)
    llm = Llama(
        model_path=path,
        n_ctx=max(512, len(ids) + args.decode_tokens + 16),
        n_threads=args.threads,
        n_threads_batch=args.threads,
        n_batch=512,
        verbose=False,
        logits_all=False,
    )
    logging.getLogger(LLAMA_CPP_LOGGER).setLevel(logging.ERROR)
    out: dict = {"version": llama_cpp.__version__, "threads": args.threads, "batched": {}}
    try:
        times = []
        for _ in range(3):
            llm.reset()
            t = time.perf_counter()
            llm.eval(ids)
            times.append(time.perf_counter() - t)
        out["prefill_tok_s"] = len(ids) / min(times)
        llm.reset()
        llm.eval(ids)
        t = time.perf_counter()
        n = 0
        for _ in range(args.decode_tokens):
            tok = llm.sample(temp=0.0)
            llm.eval([tok])
            n += 1
        out["decode_1_tok_s"] = n / (time.perf_counter() - t)
    except BaseException:
        llm.close()
        raise
    model, n_vocab = llm.model, llm.n_vocab()

    def batched(c: int) -> dict:
        return llama_cpp_batched(model, n_vocab, ids, c, args.decode_tokens, args.threads)

    return out, batched, llm.close


def cold_start(model: str | None, cache_dir: str | None, quant: str | None = None) -> float:
    """Seconds from process start to the first generated token (`tsjax generate -n 1`)."""
    env = dict(os.environ)
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    env["TSJAX_COMPILATION_CACHE"] = "off"
    if cache_dir:
        env["JAX_COMPILATION_CACHE_DIR"] = cache_dir
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
        env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    cmd = [sys.executable, "-m", "tsjax.cli", "generate", "-n", "1", "--raw", "Hello"]
    if model:
        cmd[4:4] = ["--model", model]
    if quant:
        cmd[4:4] = ["--quant", quant]
    t = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    return time.perf_counter() - t


def cmd_bench(args: argparse.Namespace) -> int:
    from tsjax.catalog import resolve_model

    path = str(resolve_model(args.model))
    args.model = path
    if args.http:
        from benchmarks.served import bench_http

        return bench_http(args)
    load_avg = os.getloadavg()
    bw = read_bandwidth()
    conc = [int(x) for x in args.concurrency.split(",")]
    ours, load, close_ours = bench_tsjax(args, rows=max(conc))
    ref, batched, close_ref = None, None, None
    try:
        if not args.no_llama_cpp and (got := bench_llama_cpp(args, path, ours["prompt_ids"])):
            ref, batched, close_ref = got
        # Each concurrency in rounds, tsjax then llama.cpp, so that a slow spell of this
        # shared machine hits both; the report gives each one's median round.
        for c in conc:
            rounds = [(load(c), batched and batched(c)) for _ in range(max(1, args.repeats))]
            ours["load"][c] = median_round([a for a, _ in rounds])
            if ref is not None:
                ref["batched"][c] = median_round([b for _, b in rounds])
                ours["load"][c]["round_ratios"] = [
                    a["aggregate_tok_s"] / b["aggregate_tok_s"] for a, b in rounds
                ]
        ours["rss_end"], ours["rss_peak"] = resident_bytes(), peak_resident_bytes()
    finally:
        close_ours()
        if close_ref is not None:
            close_ref()
    cold = {}
    if not args.no_cold_start:
        cold["no cache"] = cold_start(path, None, args.quant)
        with tempfile.TemporaryDirectory() as d:
            cold_start(path, d, args.quant)  # fill the persistent cache
            cold["persistent cache"] = cold_start(path, d, args.quant)
    command = getattr(args, "report_command", None)  # set by `python -m benchmarks.engine`
    print(report(args, path, bw, ours, ref, cold, command, load_avg=load_avg))
    return 0


def median_round(rounds: list[dict]) -> dict:
    """The round with the median aggregate rate (the lower one of an even count), with every
    round's rate under "rounds"."""
    rates = [r["aggregate_tok_s"] for r in rounds]
    mid = sorted(rounds, key=lambda r: r["aggregate_tok_s"])[(len(rounds) - 1) // 2]
    return {**mid, "rounds": rates}


def bench_command(argv: Sequence[str]) -> str:
    """The command line as typed, `tsjax bench ...` (argv is sys.argv: program, 'bench', ...)."""
    return shlex.join(["tsjax", "bench", *argv[2:]])


def _spread(ratios: list[float] | None) -> str:
    """The range of several rounds' ratios, e.g. " (rounds 1.31-1.52x)"; empty for one."""
    if not ratios or len(ratios) < 2:
        return ""
    return f" (rounds {min(ratios):.2f}-{max(ratios):.2f}x)"


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def report(
    args: argparse.Namespace,
    path: str,
    bw: float,
    ours: dict,
    ref: dict | None,
    cold: dict[str, float],
    command: str | None = None,
    load_avg: tuple[float, float, float] | None = None,
) -> str:
    """The Markdown report: settings, then one row per metric with tsjax, llama.cpp and the
    ratio tsjax / llama.cpp (prefill, single-stream decode, aggregate decode at each
    concurrency against llama.cpp's batched decode of as many sequences), then cold start."""
    floor = ours.get("read_bytes", ours["param_bytes"]) / bw
    fmt = ours.get("format") or args.quant or "f32"
    held = {"bf16": "bf16 (+ float32 embedding)", "int8": "int8 (+ float32 embedding)"}
    cmd = command if command is not None else bench_command(sys.argv)
    lines = [
        f"### {os.path.basename(path)} on {platform.machine()}, {os.cpu_count()} cores",
        "",
        f"Command: `{cmd}`  ",
        f"Settings: {args.prompt_tokens} prompt tokens, {args.decode_tokens} tokens per request,"
        f" concurrency {args.concurrency}, greedy;"
        f" {args.repeats} round(s) per concurrency, tsjax and llama.cpp"
        " alternating, median round reported.  ",
    ]
    if load_avg is not None:
        lines.append(f"Load average at start: {' '.join(f'{x:.2f}' for x in load_avg)}.  ")
    lines += [
        f"Read bandwidth {bw / 1e9:.1f} GB/s;"
        f" {held.get(fmt, fmt)} params"
        f" {ours['param_bytes'] / 1e6:.0f} MB"
        + (
            f", {ours['read_bytes'] / 1e6:.0f} MB of them read per token (top-k of the experts)"
            if ours.get("read_bytes", ours["param_bytes"]) != ours["param_bytes"]
            else ""
        )
        + f" -> single-stream decode floor {floor * 1e3:.1f} ms/token ({1 / floor:.1f} tok/s).  ",
        f"tsjax: load {ours['load_s']:.1f} s, compile (warm-up) {ours['compile_s']:.1f} s,"
        f" {ours['rows']} decode rows, {args.decode_steps} steps per dispatch, XLA CPU threads"
        " (its default: all cores); its aggregate is the decode after the last request's first"
        " token (all prompts prefilled) to the last token.  ",
    ]
    if ours.get("rss_warm"):
        lines.append(
            f"tsjax resident memory (this process; llama.cpp's model too once loaded):"
            f" {ours['rss_warm'] / 2**20:.0f} MiB after warm-up,"
            f" {ours.get('rss_end', 0) / 2**20:.0f} MiB after the rounds,"
            f" peak {ours.get('rss_peak', 0) / 2**20:.0f} MiB.  "
        )
    if ref is not None:
        lines.append(
            f"llama.cpp: llama-cpp-python {ref['version']}, n_threads = n_threads_batch ="
            f" {ref['threads']}; prefill and 1-stream decode through `Llama` (llama-cpp-python"
            " defaults), batched decode through `llama_decode` with one token per sequence per"
            " call, a context per concurrency (n_seq_max = N, llama.cpp defaults), argmax in"
            " numpy; its aggregate is the steady decode after all N prompts are prefilled (its"
            " median step, N tokens / the median `llama_decode` step, is less sensitive to other"
            " processes on the machine)."
        )
    lines += [
        "",
        "| metric | tsjax | llama.cpp | ratio (tsjax / llama.cpp) |",
        "|---|---|---|---|",
    ]

    def row(name, a, b, a_note: str = "", b_note: str = "", r_note: str = ""):
        a_s = f"{a:.1f} tok/s{a_note}" if a else "-"
        b_s = f"{b:.1f} tok/s{b_note}" if b else "-"
        lines.append(f"| {name} | {a_s} | {b_s} | {_ratio(a, b)}{r_note} |")

    row(
        f"prefill ({args.prompt_tokens} tokens)",
        ours["prefill_tok_s"],
        ref and ref["prefill_tok_s"],
    )
    row("decode, 1 stream", ours["decode_1_tok_s"], ref and ref["decode_1_tok_s"])
    lines.append(
        f"| decode 1 stream vs its floor ({fmt}) | {ours['decode_1_tok_s'] * floor:.2f}"
        " of floor speed | | |"
    )
    batched = (ref or {}).get("batched", {})
    for c in sorted(set(ours["load"]) | set(batched)):
        m, b = ours["load"].get(c), batched.get(c)
        a_note = (
            f" (TTFT p50 {m['ttft_p50'] * 1e3:.0f} ms, p99 {m['ttft_p99'] * 1e3:.0f} ms)"
            if m
            else ""
        )
        b_note = (
            f" batched (median step {b['median_step_tok_s']:.1f} tok/s;"
            f" prefill of {c} prompt{'s' if c > 1 else ''} {b['prefill_tok_s']:.1f} tok/s)"
            if b
            else ""
        )
        row(
            f"aggregate decode, {c} concurrent",
            m and m["aggregate_tok_s"],
            b and b["aggregate_tok_s"],
            a_note,
            b_note,
            _spread(m and m.get("round_ratios")),
        )
    for k, v in cold.items():
        lines.append(f"| cold start to first token, {k} | {v:.1f} s | | |")
    if ref is None and not args.no_llama_cpp:
        lines.append("\nllama-cpp-python is not installed (`pip install -e .[bench]`): no ratios.")
    return "\n".join(lines)


command = Command(
    help="benchmark a model (and llama.cpp on the same file)",
    add_args=add_bench_args,
    run=cmd_bench,
)  # `tsjax bench`, through the tsjax.commands entry point


def main(argv: list[str] | None = None) -> int:
    """`python -m benchmarks.engine [flags]`: the same run as `tsjax bench [flags]`."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.engine", description=__doc__)
    add_bench_args(p)
    args = p.parse_args(argv)
    given = sys.argv[1:] if argv is None else argv
    args.report_command = shlex.join(["python", "-m", "benchmarks.engine", *given])
    return cmd_bench(args)


if __name__ == "__main__":
    raise SystemExit(main())
