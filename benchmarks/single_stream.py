"""Single-stream greedy decode, tsjax (each `--quants` format) and llama.cpp on the same GGUF,
alternating in one process, against the floor of each format (issue 16).

    python -m benchmarks.single_stream [--model smollm2-135m] [--quants auto,f32] [--rounds 3]

Each round generates `--tokens` tokens after a short prompt with every tsjax format (the
library's `stream`: one row, 4 decode steps per dispatch, as the engine runs one stream) and
with llama.cpp (llama-cpp-python, `Llama.generate`, greedy); decode tok/s excludes the prompt.
Printed: the best round (median beside it), and each tsjax format's floor: the params it reads
per token / the measured read bandwidth (`benchmarks.engine.read_bandwidth`).
"""

from __future__ import annotations

import argparse
import statistics
import time


def _tsjax_rate(model, ids: list[int], n: int) -> float:
    from tsjax.generation import stream
    from tsjax.sampling import SamplingParams

    t_first = None
    count = 0
    for _ in stream(model, ids, sampling=SamplingParams.greedy(), max_tokens=n):
        count += 1
        if t_first is None:
            t_first = time.perf_counter()
    return (count - 1) / (time.perf_counter() - t_first)


def _llama_rate(llm, ids: list[int], n: int) -> float:
    llm.reset()
    t_first, count = None, 0
    for _ in llm.generate(ids, top_k=1, temp=0.0, reset=True):
        count += 1
        if t_first is None:
            t_first = time.perf_counter()
        if count == n:
            break
    return (count - 1) / (time.perf_counter() - t_first)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.single_stream", description=__doc__)
    p.add_argument("--model", "-m", default="smollm2-135m")
    p.add_argument("--quants", default="auto,f32")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)

    from benchmarks.engine import read_bandwidth, read_per_token
    from tsjax.model import load

    quants = args.quants.split(",")
    models = {q: load(args.model, max_len=256, progress=False, quant=q) for q in quants}
    first = next(iter(models.values()))
    ids = first.tokenizer.encode("The history of rivers is the history of cities, because")
    for m in models.values():  # compile
        _tsjax_rate(m, ids, 4)
    from llama_cpp import Llama

    llm = Llama(model_path=str(first.path), n_ctx=256, n_threads=2, verbose=False)
    rates: dict[str, list[float]] = {name: [] for name in [*models, "llama.cpp"]}
    for _ in range(args.rounds):
        for name, m in models.items():
            rates[name].append(_tsjax_rate(m, ids, args.tokens))
        rates["llama.cpp"].append(_llama_rate(llm, ids, args.tokens))
    bw = read_bandwidth()
    ref = max(rates["llama.cpp"])
    print(f"\n{first.name}: {args.tokens} tokens greedy, best (median) of {args.rounds} rounds, "
          f"alternating; read bandwidth {bw / 1e9:.1f} GB/s")  # fmt: skip
    print("| | format | params MB | decode tok/s | vs llama.cpp | floor tok/s | of floor |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rates.items():
        best, med = max(r), statistics.median(r)
        if name == "llama.cpp":
            print(f"| llama.cpp | file | {first.path.stat().st_size / 1e6:.0f} | {best:.1f} "
                  f"({med:.1f}) | 1.00x | | |")  # fmt: skip
            continue
        m = models[name]
        floor = bw / read_per_token(m.params, m.config.moe)
        mb = m.load_stats.bytes_params / 1e6
        print(f"| tsjax --quant {name} | {m.quant} | {mb:.0f} | {best:.1f} ({med:.1f}) | "
              f"{best / ref:.2f}x | {floor:.0f} | {best / floor:.2f} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
