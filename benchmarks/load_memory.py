"""Resident memory of a loaded model per weight format, and of a generated 1.5-2B-shaped one
(issue 16: "loading streams into the narrow format", "a bigger model").

    python -m benchmarks.load_memory [--model smollm2-135m] [--quants f32,auto]
    python -m benchmarks.load_memory --shaped DIR [--layers 28 --dim 2048 --ffn 8192]

Each (file, format) runs in a fresh process: `tsjax.load` (one row, `--max-len` positions),
then a greedy generation of `--tokens` tokens (compiles one prefill and one decode program).
Printed per run, from /proc/self/status: the peak resident size during the load (VmHWM right
after it: the narrow params plus one tensor is the goal, never a float copy of the model),
resident after the load and after generating, split into anonymous memory and file pages
(the GGUF stays memory-mapped) and after glibc's `malloc_trim(0)` (what the server does after
warm-up: freed compile-time memory handed back), next to the file size, the params held and
the KV cache.
`--shaped DIR` first writes llama-architecture files of random Q8_0 and Q4_K blocks shaped
like a 1.5-2B model into DIR (`tests/gguf_factory.write_shaped_gguf`, kept for reruns) and
measures those; the goal there is resident <= 1.3 x (file + KV cache).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1] / "tests"


def _status() -> dict[str, float]:
    """VmHWM, VmRSS, RssAnon, RssFile of this process, in MB."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) / 1024
    return out


def child(path: str, quant: str, max_len: int, tokens: int) -> dict:
    """One measurement, in this (fresh) process."""
    import jax

    from tsjax.generation import generate
    from tsjax.model import load
    from tsjax.sampling import SamplingParams

    t0 = time.perf_counter()
    model = load(path, max_len=max_len, progress=False, quant=quant)
    loaded, load_s = _status(), time.perf_counter() - t0
    runner = model.runner()
    runner.reset()
    cache_mb = sum(x.nbytes for x in jax.tree_util.tree_leaves(runner._cache)) / 1e6
    del runner
    t0 = time.perf_counter()
    ids = model.tokenizer.encode("The river carried sand and silt down to the sea")
    generate(model, ids, sampling=SamplingParams.greedy(), max_tokens=tokens)
    served = _status()
    trimmed = _status() if _malloc_trim() else served
    return {
        "file": Path(path).name,
        "format": model.quant,
        "file_MB": Path(path).stat().st_size / 1e6,
        "params_MB": model.load_stats.bytes_params / 1e6,
        "cache_MB": cache_mb,
        "load_s": load_s,
        "generate_s": time.perf_counter() - t0,
        "load_peak_MB": loaded["VmHWM"],
        "loaded_MB": loaded["VmRSS"],
        "loaded_file_pages_MB": loaded["RssFile"],
        "served_MB": served["VmRSS"],
        "served_anon_MB": served["RssAnon"],
        "served_file_pages_MB": served["RssFile"],
        "peak_MB": served["VmHWM"],
        "trimmed_MB": trimmed["VmRSS"],
    }


def _malloc_trim() -> bool:
    """Hand glibc's free arena memory back (what `tsjax serve` does after warm-up)."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        return False
    return True


def _run(path: str, quant: str, args) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.load_memory", "--child", path, quant,
           str(args.max_len), str(args.tokens)]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _shaped(args) -> list[str]:
    sys.path.insert(0, str(TESTS))  # the test factory writes the files
    from gguf_factory import write_shaped_gguf

    paths = []
    for quant in ("Q8_0", "Q4_K"):
        path = Path(args.shaped) / f"shaped-{args.layers}x{args.dim}-{quant.lower()}.gguf"
        if not path.exists():
            t = time.perf_counter()
            write_shaped_gguf(path, quant, n_layers=args.layers, hidden_size=args.dim,
                              ffn_size=args.ffn, n_heads=args.dim // 64, n_kv_heads=8,
                              head_dim=64, vocab_size=960, context_length=4096)  # fmt: skip
            print(f"wrote {path} ({path.stat().st_size / 1e9:.2f} GB) in "
                  f"{time.perf_counter() - t:.0f} s", flush=True)  # fmt: skip
        paths.append(str(path))
    return paths


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        path, quant, max_len, tokens = argv[1:5]
        print(json.dumps(child(path, quant, int(max_len), int(tokens))))
        return 0
    p = argparse.ArgumentParser(prog="python -m benchmarks.load_memory", description=__doc__)
    p.add_argument("--model", "-m", default="smollm2-135m")
    p.add_argument("--quants", default="f32,auto")
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--tokens", type=int, default=8)
    p.add_argument("--shaped", default=None, help="write and measure 1.5-2B-shaped files here")
    p.add_argument("--layers", type=int, default=28)
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--ffn", type=int, default=8192)
    args = p.parse_args(argv)
    if args.shaped:
        runs = [(path, "auto") for path in _shaped(args)]
    else:
        from tsjax.catalog import resolve_model

        path = str(resolve_model(args.model))
        runs = [(path, q) for q in args.quants.split(",")]
    print(
        "| file | format | file MB | params MB | KV cache MB | load peak MB | after load MB "
        "(file pages) | after generating MB (anon / file pages) | peak MB | after malloc_trim "
        "MB | resident / (file + cache), trimmed |"
    )
    print("|---" * 11 + "|")
    for path, quant in runs:
        r = _run(path, quant, args)
        ratio = r["served_MB"] / (r["file_MB"] + r["cache_MB"])
        trimmed = r["trimmed_MB"] / (r["file_MB"] + r["cache_MB"])
        print(f"| {r['file']} | {r['format']} | {r['file_MB']:.0f} | {r['params_MB']:.0f} | "
              f"{r['cache_MB']:.0f} | {r['load_peak_MB']:.0f} | {r['loaded_MB']:.0f} "
              f"({r['loaded_file_pages_MB']:.0f}) | {r['served_MB']:.0f} "
              f"({r['served_anon_MB']:.0f} / {r['served_file_pages_MB']:.0f}) | "
              f"{r['peak_MB']:.0f} | {r['trimmed_MB']:.0f} | {ratio:.2f}, {trimmed:.2f} |",
              flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
