"""How far each weight format moves the next-token distribution from float32, on both real
models (issue 16's decision table; the method of `benchmarks.accuracy`).

    python -m benchmarks.format_accuracy [--models smollm2-135m,gemma3-270m] [--tokens 256]
                                         [--quants bf16,int8,q8,q4] [--text FILE]

For each model: this repository's README (not the int8 calibration text), its first
`--tokens` tokens, through the float32 model and each `--quant` format, and through llama.cpp
on the same GGUF and tokens when llama-cpp-python is installed. Prints mean / max KL from the
float32 distribution, top-1 agreement, and the params held (MB).
"""

from __future__ import annotations

import argparse
import gc
from pathlib import Path

import jax
import numpy as np

from benchmarks.accuracy import README, _logits, compare


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--models", default="smollm2-135m,gemma3-270m")
    p.add_argument("--quants", default="bf16,int8,q8,q4")
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--text", type=Path, default=README)
    p.add_argument("--no-llama", action="store_true", help="skip the llama.cpp row")
    args = p.parse_args(argv)

    from tsjax.model import load

    for name in args.models.split(","):
        runs: dict[str, tuple[np.ndarray, float]] = {}
        ids: list[int] = []
        path = None
        for quant in [None, *args.quants.split(",")]:
            model = load(name, max_len=max(512, args.tokens), progress=False, quant=quant)
            ids = model.tokenizer.encode(args.text.read_text())[: args.tokens]
            held = sum(x.nbytes for x in jax.tree_util.tree_leaves(model.params)) / 1e6
            runs[quant or "float32"] = (_logits(model, ids), held)
            path = model.path
            del model
            gc.collect()
        try:
            if args.no_llama:
                raise ImportError
            from llama_cpp import Llama
        except ImportError:
            print("(no llama.cpp row: --no-llama, or llama-cpp-python not installed)")
        else:
            llm = Llama(model_path=str(path), n_ctx=max(512, args.tokens), logits_all=True,
                        verbose=False)  # fmt: skip
            llm.eval(ids)
            runs["llama.cpp"] = (np.array(llm.scores[: len(ids)]), path.stat().st_size / 1e6)
            del llm
        print(f"\n{Path(path).name}, {len(ids)} tokens of {args.text.name}, against float32:")
        print("| format | mean KL (nats) | max KL | top-1 agreement | MB held |")
        print("|---|---|---|---|---|")
        ref = runs["float32"][0]
        for fmt, (logits, held) in runs.items():
            mean, worst, agree = compare(ref, logits)
            what = "file" if fmt == "llama.cpp" else "params"
            print(f"| {fmt} | {mean:.4f} | {worst:.3f} | {agree:.1%} | {held:.0f} ({what}) |",
                  flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
