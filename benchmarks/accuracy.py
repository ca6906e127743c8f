"""How far bf16 and int8 weights (and llama.cpp) move the next-token distribution from float32.

    python -m benchmarks.accuracy [--model smollm2-135m] [--tokens 256] [--text FILE]

Runs one text (default: this repository's README, which is not the calibration text) through
the float32 model, the `--quant bf16` and `--quant int8` models and, with the `bench` extra
installed, llama.cpp
on the same GGUF and the same tokens (llama-cpp-python, `logits_all=True`), and prints each
one's mean and max KL divergence from the float32 next-token distribution and how often its
top token agrees. The README's "Narrower weights" table comes from this script.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

README = Path(__file__).resolve().parent.parent / "README.md"


def _log_softmax(a: np.ndarray) -> np.ndarray:
    a = a - a.max(-1, keepdims=True)
    return a - np.log(np.exp(a).sum(-1, keepdims=True))


def compare(ref: np.ndarray, other: np.ndarray) -> tuple[float, float, float]:
    """(mean KL, max KL, top-1 agreement) of `other` against `ref`, both [T, V] logits."""
    p, q = _log_softmax(ref.astype(np.float64)), _log_softmax(other.astype(np.float64))
    kl = (np.exp(p) * (p - q)).sum(-1)
    return float(kl.mean()), float(kl.max()), float(np.mean(ref.argmax(-1) == other.argmax(-1)))


def _logits(model, ids: list[int]) -> np.ndarray:
    import jax.numpy as jnp

    s = model.steps
    return np.asarray(
        s.forward_fn(
            model.params,
            s.new_cache(),
            jnp.asarray([ids], jnp.int32),
            jnp.zeros((1,), jnp.int32),
            attn_len=s.attn_len_for(len(ids)),
        )[0]
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.accuracy", description=__doc__)
    p.add_argument("--model", "-m", default=None)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--text", type=Path, default=README)
    args = p.parse_args(argv)

    from tsjax.model import load

    runs: dict[str, np.ndarray] = {}
    ids: list[int] = []
    path = None
    for quant in (None, "bf16", "int8"):
        model = load(args.model, max_len=max(512, args.tokens), progress=False, quant=quant)
        ids = model.tokenizer.encode(args.text.read_text())[: args.tokens]
        runs[quant or "float32"] = _logits(model, ids)
        path = model.path
    try:
        from llama_cpp import Llama
    except ImportError:
        print("(llama-cpp-python not installed: no llama.cpp row)")
    else:
        llm = Llama(model_path=str(path), n_ctx=max(512, args.tokens), logits_all=True,
                    verbose=False)  # fmt: skip
        llm.eval(ids)
        runs["llama.cpp"] = np.array(llm.scores[: len(ids)])
    print(f"{Path(path).name}, {len(ids)} tokens of {args.text.name}, against float32:")
    print("| | mean KL (nats) | max KL | top-1 agreement |\n|---|---|---|---|")
    for name, logits in runs.items():
        if name != "float32":
            mean, worst, agree = compare(runs["float32"], logits)
            print(f"| {name} | {mean:.4f} | {worst:.3f} | {agree:.1%} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
