"""A random GPT-OSS-architecture GGUF shaped like a small real MoE, for `tsjax bench`
(tsjax against llama.cpp on the same file): MXFP4 experts as the real files ship them, the
rest float32, a byte-level vocabulary padded with reserved tokens to a realistic size.

    python -m benchmarks.moe_file /tmp/moe.gguf [--layers 12 --dim 1024 --experts 8 ...]
    tsjax bench --model /tmp/moe.gguf --concurrency 1,4,16 --no-cold-start

Weights are random (N(0, 0.02), MXFP4 codes uniform with a scale of 2**-8), so the text is
nonsense; what is measured is the work, which random weights do not change: every token
routes to `--used` of `--experts` experts per layer like a trained model's.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from tsjax import mxfp4

SPECIALS = ["<|startoftext|>", "<|endoftext|>", "<|return|>", "<|constrain|>", "<|channel|>",
            "<|start|>", "<|end|>", "<|message|>", "<|call|>"]  # fmt: skip


def _byte_tokens() -> list[str]:
    """GPT-2's byte-to-unicode table: the 256 single-byte tokens of a byte-level BPE."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def write(
    path: Path, layers: int, dim: int, heads: int, kv_heads: int, head_dim: int,
    experts: int, used: int, ffn: int, vocab: int, window: int, seed: int,
) -> None:  # fmt: skip
    """Write the random GPT-OSS-architecture GGUF (shapes as the arguments say) to `path`."""
    import gguf

    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "gpt-oss")
    arch = "gpt-oss"
    w.add_uint32(f"{arch}.block_count", layers)
    w.add_uint32(f"{arch}.context_length", 131072)
    w.add_uint32(f"{arch}.embedding_length", dim)
    w.add_uint32(f"{arch}.feed_forward_length", ffn)
    w.add_uint32(f"{arch}.attention.head_count", heads)
    w.add_uint32(f"{arch}.attention.head_count_kv", kv_heads)
    w.add_uint32(f"{arch}.attention.key_length", head_dim)
    w.add_uint32(f"{arch}.attention.value_length", head_dim)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_uint32(f"{arch}.attention.sliding_window", window)
    w.add_uint32(f"{arch}.expert_count", experts)
    w.add_uint32(f"{arch}.expert_used_count", used)
    w.add_uint32(f"{arch}.expert_feed_forward_length", ffn)
    w.add_float32(f"{arch}.rope.freq_base", 150000.0)
    w.add_string(f"{arch}.rope.scaling.type", "yarn")
    w.add_float32(f"{arch}.rope.scaling.factor", 32.0)
    w.add_uint32(f"{arch}.rope.scaling.original_context_length", 4096)
    w.add_float32(f"{arch}.rope.scaling.yarn_beta_fast", 32.0)
    w.add_float32(f"{arch}.rope.scaling.yarn_beta_slow", 1.0)
    w.add_uint32("general.file_type", 38)  # MOSTLY_MXFP4_MOE
    # llama.cpp refuses a BPE vocabulary without merges: one real merge (space + "t")
    tokens = _byte_tokens() + SPECIALS + ["\u0120t"]
    types = [1] * 256 + [3] * len(SPECIALS) + [1]
    tokens += [f"<|reserved_{i}|>" for i in range(vocab - len(tokens))]
    types += [3] * (vocab - len(types))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-4o")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(["\u0120 t"])
    w.add_bos_token_id(256)
    w.add_eos_token_id(258)
    w.add_pad_token_id(257)

    def normal(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape, np.float32) * 0.02).astype(np.float32)

    def experts_mxfp4(name: str, out: int, inp: int) -> None:
        g = inp // mxfp4.BLOCK
        scales = np.full((experts, out, g), 120, np.uint8)
        nibbles = rng.integers(0, 256, (experts, out, g, 16), dtype=np.uint8)
        w.add_tensor(name, mxfp4.pack(scales, nibbles), raw_dtype=gguf.GGMLQuantizationType.MXFP4)

    w.add_tensor("token_embd.weight", normal(vocab, dim))
    w.add_tensor("output_norm.weight", np.ones(dim, np.float32))
    w.add_tensor("output.weight", normal(vocab, dim))
    for i in range(layers):
        b = f"blk.{i}."
        w.add_tensor(b + "attn_norm.weight", np.ones(dim, np.float32))
        w.add_tensor(b + "post_attention_norm.weight", np.ones(dim, np.float32))
        for name, out in (("attn_q", heads), ("attn_k", kv_heads), ("attn_v", kv_heads)):
            w.add_tensor(b + name + ".weight", normal(out * head_dim, dim))
            w.add_tensor(b + name + ".bias", normal(out * head_dim))
        w.add_tensor(b + "attn_output.weight", normal(dim, heads * head_dim))
        w.add_tensor(b + "attn_output.bias", normal(dim))
        w.add_tensor(b + "attn_sinks.weight", normal(heads))
        w.add_tensor(b + "ffn_gate_inp.weight", normal(experts, dim) * 50)  # decisive routing
        w.add_tensor(b + "ffn_gate_inp.bias", normal(experts))
        experts_mxfp4(b + "ffn_gate_exps.weight", ffn, dim)
        experts_mxfp4(b + "ffn_up_exps.weight", ffn, dim)
        experts_mxfp4(b + "ffn_down_exps.weight", dim, ffn)
        for name, out in (("ffn_gate_exps", ffn), ("ffn_up_exps", ffn), ("ffn_down_exps", dim)):
            w.add_tensor(b + name + ".bias", normal(experts, out))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("path", type=Path)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--used", type=int, default=2)
    p.add_argument("--ffn", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--window", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    write(a.path, a.layers, a.dim, a.heads, a.kv_heads, a.head_dim, a.experts, a.used, a.ffn,
          a.vocab, a.window, a.seed)  # fmt: skip
    print(a.path)


if __name__ == "__main__":
    main()
