"""`tsjax bench`'s pure parts: llama.cpp batch bookkeeping and the report, with fakes.

No timing here: the benchmark itself is a script (`tsjax bench`), not a test.
"""

from __future__ import annotations

import argparse
from types import SimpleNamespace

import numpy as np

from benchmarks.engine import (
    add_bench_args,
    bench_command,
    decode_entries,
    decode_window,
    distinct_prompts,
    fill_batch,
    median_round,
    prefill_chunks,
    report,
)


def test_distinct_prompts_share_all_but_the_first_token():
    prompt = list(range(100, 110))
    ps = distinct_prompts(prompt, 3)
    assert [p[0] for p in ps] == [100, 107, 104]  # prompt[(7 i) % 10]
    assert all(p[1:] == prompt[1:] and len(p) == len(prompt) for p in ps)


def test_prefill_chunks_cover_every_token_once_with_logits_at_prompt_ends():
    prompts = [[1, 2, 3], [4, 5, 6, 7], [8]]
    chunks = prefill_chunks(prompts, n_batch=3)
    assert [len(c) for c in chunks] == [3, 3, 2]
    flat = [e for c in chunks for e in c]
    assert [(tok, pos, seq) for tok, pos, seq, _ in flat] == [
        (1, 0, 0), (2, 1, 0), (3, 2, 0),
        (4, 0, 1), (5, 1, 1), (6, 2, 1), (7, 3, 1),
        (8, 0, 2),
    ]  # fmt: skip
    assert [(tok, seq) for tok, _, seq, out in flat if out] == [(3, 0), (7, 1), (8, 2)]


def test_decode_entries_one_token_per_sequence_at_the_same_position():
    assert decode_entries([9, 8, 7], 5) == [(9, 5, 0, True), (8, 5, 1, True), (7, 5, 2, True)]


def _fake_batch(n: int) -> SimpleNamespace:
    """Stands in for a `llama_batch` from `llama_batch_init(n, 0, 1)`: same fields, lists."""
    return SimpleNamespace(
        n_tokens=0,
        token=[-1] * n,
        pos=[-1] * n,
        n_seq_id=[-1] * n,
        seq_id=[[-1] for _ in range(n)],
        logits=[-1] * n,
    )


def test_fill_batch_writes_fields_and_returns_logit_indices():
    batch = _fake_batch(8)
    chunk = prefill_chunks([[1, 2], [3, 4, 5]], n_batch=8)[0]
    outputs = fill_batch(batch, chunk)
    assert batch.n_tokens == 5
    assert batch.token[:5] == [1, 2, 3, 4, 5]
    assert batch.pos[:5] == [0, 1, 0, 1, 2]
    assert batch.n_seq_id[:5] == [1] * 5
    assert [s[0] for s in batch.seq_id[:5]] == [0, 0, 1, 1, 1]
    assert batch.logits[:5] == [0, 1, 0, 0, 1]
    assert outputs == [(0, 1), (1, 4)]  # (sequence, index for llama_get_logits_ith)
    # A decode step reuses the batch: fewer tokens, every one with logits.
    outputs = fill_batch(batch, decode_entries([11, 12], 3))
    assert batch.n_tokens == 2 and batch.pos[:2] == [3, 3] and batch.logits[:2] == [1, 1]
    assert outputs == [(0, 0), (1, 1)]


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_bench_args(p)
    return p.parse_args(list(argv))


def _ours() -> dict:
    load = {
        c: {"aggregate_tok_s": r, "ttft_p50": 0.1, "ttft_p99": 0.2}
        for c, r in [(1, 30.0), (4, 100.0), (16, 300.0)]
    }
    return {
        "load_s": 1.0,
        "compile_s": 2.0,
        "param_bytes": 500e6,
        "rows": 16,
        "prefill_tok_s": 600.0,
        "decode_1_tok_s": 40.0,
        "load": load,
        "rss_warm": 900 * 2**20,
        "rss_end": 1000 * 2**20,
        "rss_peak": 1200 * 2**20,
    }


def _ref() -> dict:
    batched = {
        c: {"aggregate_tok_s": r, "median_step_tok_s": r + 1, "prefill_tok_s": 300.0}
        for c, r in [(1, 150.0), (4, 200.0), (16, 250.0)]
    }
    return {
        "version": "0.3.36",
        "threads": 2,
        "prefill_tok_s": 300.0,
        "decode_1_tok_s": 125.0,
        "batched": batched,
    }


def test_report_has_command_threads_version_and_a_ratio_per_concurrency():
    args = _args("--concurrency", "1,4,16", "--threads", "2")
    cmd = bench_command(["tsjax", "bench", "--concurrency", "1,4,16", "--threads", "2"])
    assert cmd == "tsjax bench --concurrency 1,4,16 --threads 2"
    text = report(args, "/x/m.gguf", 25e9, _ours(), _ref(), {"no cache": 4.0}, cmd, (1, 2, 3))
    assert f"Command: `{cmd}`" in text
    assert "llama-cpp-python 0.3.36" in text and "n_threads_batch = 2" in text
    assert "Load average at start: 1.00 2.00 3.00" in text
    assert "900 MiB after warm-up, 1000 MiB after the rounds, peak 1200 MiB" in text
    rows = {r.split(" | ")[0].lstrip("| "): r for r in text.splitlines() if r.startswith("| ")}
    assert rows["prefill (128 tokens)"].endswith("| 2.00x |")
    assert rows["decode, 1 stream"].endswith("| 0.32x |")
    assert rows["aggregate decode, 1 concurrent"].endswith("| 0.20x |")
    assert rows["aggregate decode, 4 concurrent"].endswith("| 0.50x |")
    row16 = rows["aggregate decode, 16 concurrent"]
    assert "250.0 tok/s batched (median step 251.0 tok/s; prefill of 16 prompts 300.0" in row16
    assert row16.endswith("| 1.20x |")
    assert "cold start to first token, no cache" in rows
    assert "not installed" not in text


def test_rounds_report_the_median_round_and_the_spread_of_ratios():
    """Several rounds per concurrency: the report's rate is the median round's (with that
    round's TTFT), and the ratio cell shows the range of the rounds' own ratios."""
    rounds = [
        {"aggregate_tok_s": r, "ttft_p50": t, "ttft_p99": t}
        for r, t in [(300, 1.0), (240, 2.0), (330, 3.0)]
    ]
    mid = median_round(rounds)
    assert mid["aggregate_tok_s"] == 300 and mid["ttft_p50"] == 1.0
    assert mid["rounds"] == [300, 240, 330]
    assert median_round(rounds[:2])["aggregate_tok_s"] == 240  # even count: the lower
    ours = _ours()
    ours["load"][16] = {**mid, "round_ratios": [1.2, 1.05, 1.4]}
    args = _args("--concurrency", "1,4,16", "--repeats", "3")
    text = report(args, "/x/m.gguf", 25e9, ours, _ref(), {}, "tsjax bench", None)
    row16 = next(r for r in text.splitlines() if r.startswith("| aggregate decode, 16"))
    assert row16.endswith("| 1.20x (rounds 1.05-1.40x) |")
    assert "3 round(s) per concurrency, tsjax and llama.cpp alternating" in text


def test_decode_window_matches_llama_cpps_when_every_request_runs_full():
    """The load test's window starts when every prompt is prefilled (the last first token)
    and ends with the last token, like llama.cpp's decode after its prefill; a request that
    stopped early ends it at the first request's end instead."""
    firsts, ends = [1.0, 1.5, 2.0], [5.0, 5.1, 5.2]
    assert decode_window(firsts, ends, 5.15, all_full=True) == (2.0, 5.15)
    assert decode_window(firsts, ends, 5.15, all_full=False) == (2.0, 5.0)


def test_report_without_llama_cpp_has_no_ratios():
    args = _args("--concurrency", "1,4,16")
    text = report(args, "/x/m.gguf", 25e9, _ours(), None, {}, "tsjax bench", None)
    assert "llama-cpp-python is not installed" in text
    agg = [r for r in text.splitlines() if r.startswith("| aggregate decode")]
    assert len(agg) == 3 and all(r.endswith("| - | - |") for r in agg)
    # A concurrency llama.cpp measured but tsjax did not still gets its row.
    ref = _ref()
    ref["batched"][32] = {
        "aggregate_tok_s": 270.0,
        "median_step_tok_s": 271.0,
        "prefill_tok_s": 280.0,
    }
    text = report(args, "/x/m.gguf", 25e9, _ours(), ref, {}, "tsjax bench", None)
    assert "| aggregate decode, 32 concurrent | - | 270.0 tok/s batched" in text


def test_accuracy_comparison_measures_what_it_says():
    from benchmarks.accuracy import compare

    rng = np.random.default_rng(0)
    ref = rng.standard_normal((5, 40)).astype(np.float32)
    assert compare(ref, ref)[0] < 1e-9 and compare(ref, ref)[2] == 1.0
    shifted = ref.copy()
    shifted[:, 0] += 50.0  # every row's top token becomes 0
    mean, worst, agree = compare(ref, shifted)
    assert mean > 1.0 and worst >= mean
    assert agree == np.mean(ref.argmax(-1) == 0)
