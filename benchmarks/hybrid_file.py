"""The hybrid recurrent families' decode cost against a same-size dense model (issue 20), tsjax
and llama.cpp on the same files in the same run.

    python -m benchmarks.hybrid_file DIR [--families qwen35,nemotron_h] [--rows 16]

Writes (once; kept in DIR for reruns) random-weight Hugging Face checkpoints shaped like small
real models and converts them with llama.cpp's own converter (`tests/converter.py`) to Q8_0:
- `qwen35`: Qwen3.5-0.8B's text shape (`QWEN35`: 24 layers of D 1024, three Gated DeltaNet
  layers of 16 key and 16 value heads of 128 per attention layer, FFN 3584, vocabulary 248320);
- `qwen35-dense`: the same shape with every layer attention (Qwen3 architecture: the same
  heads, q/k norms, FFN and vocabulary), the "same-size dense model";
- `nemotron_h`: a Nemotron-H pattern (`M-M-M*-` x4: Mamba2, MLP, Mamba2, MLP, Mamba2, attention,
  MLP) scaled to D 1024 (`NEMOTRON`: Mamba2 32 heads of 64, 8 groups, state 128; relu^2 MLP 4096;
  GQA 8:2 of 128; vocabulary 131072);
- `nemotron_h-dense`: the same pattern with every Mamba2 layer an attention layer.

Then, for each file in turn, `tsjax bench`'s own measurements (`benchmarks.engine`: load,
warm-up of the shapes they reach (`lazy`), prefill of 128 tokens, single-stream decode of 64
tokens, and an aggregate decode round of `--rows` concurrent requests) and llama.cpp's on the
same file, and prints a table with each hybrid's decode rates over its dense twin's. Random
weights do not change the work: the recurrent layers' state update is the same computation
for any values.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

TESTS = Path(__file__).resolve().parent.parent / "tests"

# Qwen3.5-0.8B's text config (hub `config.json`, text_config).
QWEN35 = dict(
    hidden_size=1024, intermediate_size=3584, num_hidden_layers=24, num_attention_heads=8,
    num_key_value_heads=2, head_dim=256, linear_conv_kernel_dim=4, linear_key_head_dim=128,
    linear_value_head_dim=128, linear_num_key_heads=16, linear_num_value_heads=16,
    full_attention_interval=4, vocab_size=248320, tie_word_embeddings=True,
    max_position_embeddings=4096,
)  # fmt: skip
NEMOTRON_PATTERN = "M-M-M*-" * 4
NEMOTRON = dict(
    hidden_size=1024, intermediate_size=4096, num_attention_heads=8, num_key_value_heads=2,
    head_dim=128, mamba_num_heads=32, mamba_head_dim=64, ssm_state_size=128, n_groups=8,
    conv_kernel=4, chunk_size=128, use_conv_bias=True, vocab_size=131072,
    max_position_embeddings=4096,
)  # fmt: skip
FAMILIES = ("qwen35", "nemotron_h")


def _qwen35(hf: Path, dense: bool) -> dict:
    """A random Qwen3.5-0.8B-shaped checkpoint (or its dense twin) in `hf`; converter options."""
    import torch
    from hf_factory import randomize, save
    from hf_families import _qwen_tokenizer

    ids = _qwen_tokenizer(hf)
    special = dict(eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    torch.manual_seed(0)
    if dense:
        from transformers import Qwen3Config, Qwen3ForCausalLM

        keep = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings",
                "max_position_embeddings")  # fmt: skip
        cfg = Qwen3Config(**{k: QWEN35[k] for k in keep}, **special)
        model = Qwen3ForCausalLM(cfg)
        opts = dict(force_pre="qwen2")
    else:
        from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

        model = Qwen3_5ForCausalLM(Qwen3_5TextConfig(**QWEN35, **special))
        opts = dict(force_pre="qwen35", extra_args=("--no-mtp",))
    save(randomize(model), hf)
    return opts


def _nemotron(hf: Path, dense: bool) -> dict:
    """A random Nemotron-H-pattern checkpoint at D 1024 (or its dense twin) in `hf`."""
    import family_tokenizers as ft
    import torch
    from hf_factory import randomize, save
    from hf_families import _PATTERN, NEMOTRON_SPECIALS, _nemotron_hub_config
    from transformers import NemotronHConfig, NemotronHForCausalLM

    ids = ft.byte_bpe_tokenizer(
        hf, pre="tekken", specials=NEMOTRON_SPECIALS, bos="<s>", eos="<SPECIAL_12>",
        unk="<unk>", specials_first=True,
        template=ft.family_template("NVIDIA-Nemotron-Nano-v2.jinja"),
    )  # fmt: skip
    kinds = {v: k for k, v in _PATTERN.items()}
    pattern = NEMOTRON_PATTERN.replace("M", "*") if dense else NEMOTRON_PATTERN
    layers = [kinds[c] for c in pattern]
    cfg = NemotronHConfig(
        **NEMOTRON, layers_block_type=layers, bos_token_id=ids["<s>"],
        eos_token_id=ids["<SPECIAL_12>"], pad_token_id=ids["<unk>"],
    )  # fmt: skip
    torch.manual_seed(0)
    save(randomize(NemotronHForCausalLM(cfg)), hf)
    _nemotron_hub_config(hf, layers, moe=False)
    return dict(force_pre="tekken", raw_config=True)


def write(out: Path, name: str) -> Path:
    """`out/<name>-q8_0.gguf` (name: a family, or a family + "-dense"), built if missing."""
    import shutil

    import converter

    path = out / f"{name}-q8_0.gguf"
    if path.exists():
        return path
    family, dense = name.removesuffix("-dense"), name.endswith("-dense")
    hf = out / f"{name}-hf"
    shutil.rmtree(hf, ignore_errors=True)
    hf.mkdir(parents=True)
    build = {"qwen35": _qwen35, "nemotron_h": _nemotron}[family]
    opts = build(hf, dense)
    converter.convert([converter.ConvertJob(str(hf), str(path), "q8_0", **opts)], timeout=3600)
    shutil.rmtree(hf)  # the GGUF is what is measured; the checkpoint is ~4 GB of float32
    return path


def measure(path: Path, rows: int, llama: bool) -> dict:
    """`tsjax bench`'s engine measurements (and llama.cpp's) of one file, each in a child
    process: llama.cpp 0.3.36 aborts (GGML_ASSERT) in a batched decode of several sequences
    of a Nemotron-H file, which must not take the other measurements with it."""
    out = {"file_mb": path.stat().st_size / 1e6, "tsjax": _child("tsjax", path, rows)}
    if llama and "prompt_ids" in out["tsjax"]:
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump(out["tsjax"]["prompt_ids"], f)
        try:
            out["llama"] = _child("llama", path, rows, f.name)
        finally:
            os.unlink(f.name)
    return out


def _child(kind: str, path: Path, rows: int, *extra: str) -> dict:
    """Run `_measure(kind, ...)` in a child; its last JSON line (it prints one after each part),
    with "error" set if it died."""
    cmd = [sys.executable, "-m", "benchmarks.hybrid_file", "--child", kind, str(path), str(rows)]
    proc = subprocess.run([*cmd, *extra], capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    got = json.loads(lines[-1]) if lines else {}
    if proc.returncode:
        got["error"] = f"{kind} exited {proc.returncode}: {proc.stderr.strip()[-200:]}"
        print(got["error"], file=sys.stderr, flush=True)
    return got


def _args(path: str) -> SimpleNamespace:
    return SimpleNamespace(
        model=path, prompt_tokens=128, decode_tokens=64, decode_steps=4, quant="auto", threads=2
    )


def _measure(kind: str, path: str, rows: int, *extra: str) -> None:
    """In a child: tsjax's (`kind` "tsjax") or llama.cpp's ("llama"; `extra`: the prompt ids'
    JSON file) single-stream figures, printed as a JSON line, then again with the aggregate of
    a batched round of `rows` requests ("agg")."""
    from benchmarks.engine import bench_llama_cpp, bench_tsjax

    if kind == "tsjax":
        out, batched, close = bench_tsjax(_args(path), rows=rows, lazy=True)
    else:
        prompt = json.loads(Path(extra[0]).read_text())
        out, batched, close = bench_llama_cpp(_args(path), path, prompt)
    print(json.dumps(out), flush=True)
    try:
        out["agg"] = batched(rows)["aggregate_tok_s"]
    finally:
        close()
    print(json.dumps(out), flush=True)


def report(results: dict[str, dict], rows: int) -> str:
    """A Markdown table: one row per file, "-" where a measurement is missing (a child that
    died: its error follows the table)."""
    head = (
        f"| file | MB | format | tsjax prefill tok/s | decode 1 | decode {rows} rows | "
        f"llama.cpp decode 1 | decode {rows} | tsjax vs dense twin (1 / {rows}) |"
    )
    lines, errors = [head, "|" + "---|" * 9], []

    def fmt(v: float | None) -> str:
        return f"{v:.1f}" if v else "-"

    def ratio(a: dict, b: dict, key: str) -> str:
        return f"{a[key] / b[key]:.2f}x" if a.get(key) and b.get(key) else "-"

    for name, r in results.items():
        t, ref = r["tsjax"], r.get("llama", {})
        twin = results.get(f"{name}-dense", {}).get("tsjax")
        vs = f"{ratio(t, twin, 'decode_1_tok_s')} / {ratio(t, twin, 'agg')}" if twin else "-"
        lines.append(
            f"| {name} | {r['file_mb']:.0f} | {t.get('format', '-')} | "
            f"{fmt(t.get('prefill_tok_s'))} | {fmt(t.get('decode_1_tok_s'))} | "
            f"{fmt(t.get('agg'))} | {fmt(ref.get('decode_1_tok_s'))} | {fmt(ref.get('agg'))} | "
            f"{vs} |"
        )
        errors += [f"- {name}: {x['error']}" for x in (t, ref) if x.get("error")]
    return "\n".join(lines + ([""] + errors if errors else []))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        kind, path, rows, *extra = argv[1:]
        _measure(kind, path, int(rows), *extra)
        return 0
    p = argparse.ArgumentParser(prog="python -m benchmarks.hybrid_file", description=__doc__)
    p.add_argument("dir", type=Path, help="where the files are written (and kept)")
    p.add_argument("--families", default=",".join(FAMILIES))
    p.add_argument("--rows", type=int, default=16, help="concurrent requests of the batched round")
    p.add_argument("--no-llama-cpp", action="store_true")
    args = p.parse_args(argv)
    sys.path.insert(0, str(TESTS))  # the test factory's builders and llama.cpp's converter
    args.dir.mkdir(parents=True, exist_ok=True)
    names = [n for f in args.families.split(",") for n in (f, f"{f}-dense")]
    paths = {n: write(args.dir, n) for n in names}
    results = {}
    for name, path in paths.items():
        print(f"measuring {path.name}", file=sys.stderr, flush=True)
        results[name] = measure(path, args.rows, not args.no_llama_cpp)
        print(report(results, args.rows), flush=True)  # so far
    return 0


if __name__ == "__main__":
    sys.exit(main())
