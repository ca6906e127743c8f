"""Tiny random-weight GGUF files, and Hugging Face transformers' logits for them.

Some model families have no small real GGUF to test against. This module writes one in
seconds: a few layers of random weights, laid out and described exactly as llama.cpp's
``convert_hf_to_gguf.py`` would have written them from a Hugging Face checkpoint, plus a small
but valid tokenizer so that transformers agrees to load the file. `reference_logits` then runs
transformers' own implementation of the family on it, which is what our JAX models must match.

    path = write_tiny_gguf(tmp_path / "tiny.gguf", "gemma3", quant="Q8_0")
    want = reference_logits(path, [1, 5, 9, 42])          # float32 [T, V]
    ids = reference_greedy(path, [1, 5, 9, 42], n=8)      # 8 greedy continuations

Architectures (`ARCHS`): llama, mistral, qwen2, qwen3, gemma2, gemma3, phi3.

Quantization (`quant=`, or per tensor with ``tensor_quant={"blk.*.ffn_down.weight": "Q6_K"}``,
fnmatch patterns, first match wins): F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 through
``gguf.quants.quantize``, and Q4_K, Q6_K through encoders in this module (gguf 0.19 can dequantize
K-quants but not quantize them; ours are checked against its dequantizer). As llama.cpp does,
1-D tensors (norms, biases) stay F32, and a matrix whose row length is not a multiple of the
type's block falls back the way ``llama-quant.cpp`` does: Q4_K -> Q5_0, Q6_K -> Q8_0, then F16.
With the default hidden size 64 only rows of length ffn (``ffn_down``) can hold a K-quant block
of 256: pass ``hidden_size=256`` to put most matrices in the K-quant.

Metadata written, per architecture (``{a}`` is the ``general.architecture`` value). All files
also carry ``general.architecture``, ``general.name``, ``general.file_type``,
``general.quantization_version`` (quantized files only) and the tokenizer keys below.

============  =================================================================================
arch          keys (besides general.*, tokenizer.*)
============  =================================================================================
llama         {a}.context_length, embedding_length, block_count, feed_forward_length,
              attention.head_count, attention.head_count_kv, attention.layer_norm_rms_epsilon,
              attention.key_length, attention.value_length, rope.freq_base, vocab_size,
              rope.dimension_count
mistral       identical to llama, with ``general.architecture = "llama"``: llama.cpp converts
              MistralForCausalLM with its llama class (q/k permuted). Differences are only in
              values: GQA 4:1, rope base 1e6, SentencePiece vocab. transformers loads it as
              LlamaForCausalLM, as it does real Mistral GGUFs (it would pick MistralForCausalLM
              only for ``general.name == "mistral"`` exactly, and that path is broken with
              gguf 0.19: "Unknown gguf model_type: mistral"). Mistral's sliding window (v0.1)
              is written by no converter and used by neither llama.cpp nor this reference.
qwen2         {a}.context_length, embedding_length, block_count, feed_forward_length,
              attention.head_count, attention.head_count_kv, rope.freq_base,
              attention.layer_norm_rms_epsilon (no key_length: Qwen2 configs have no head_dim)
qwen3         qwen2's keys + attention.key_length, attention.value_length
gemma2        {a}.context_length, embedding_length, block_count, feed_forward_length,
              attention.head_count, attention.head_count_kv, attention.layer_norm_rms_epsilon,
              attention.key_length, attention.value_length, attn_logit_softcapping,
              final_logit_softcapping, attention.sliding_window.
              No rope.freq_base: the converter never writes one for gemma2 (base 10000).
gemma3        {a}.block_count, context_length, embedding_length, feed_forward_length,
              attention.head_count, attention.head_count_kv, rope.freq_base (global layers),
              rope.freq_base_swa (local layers; only newer converters write it, llama.cpp
              defaults to 10000), attention.layer_norm_rms_epsilon, attention.key_length,
              attention.value_length, attention.sliding_window; optionally
              final_logit_softcapping, rope.scaling.type + rope.scaling.factor (linear, as
              Gemma 3 4B+ use on global layers), attention.sliding_window_pattern (llama.cpp
              reads it if present, else 6; the converter does not write it for gemma3).
phi3          {a}.context_length, rope.scaling.original_context_length, embedding_length,
              feed_forward_length, block_count, attention.head_count, attention.head_count_kv,
              attention.layer_norm_rms_epsilon, rope.dimension_count, rope.freq_base,
              attention.sliding_window (both llama.cpp and transformers ignore it for phi3)
============  =================================================================================

Tokenizer keys: tokenizer.ggml.model ("gpt2" byte-level BPE for llama/qwen2/qwen3, "llama"
SentencePiece for mistral/gemma2/gemma3/phi3), .pre, .tokens, .token_type, .merges (BPE) or
.scores (SPM), .bos_token_id, .eos_token_id, .padding_token_id, .unknown_token_id (SPM),
.add_bos_token, .add_eos_token, and .add_space_prefix = false for gemma.

Tensors (GGUF names; ``N`` = layer): ``token_embd.weight``, ``output_norm.weight``,
``output.weight`` (only when untied: llama, mistral, phi3 by default; never gemma2, whose
llama.cpp graph always reuses token_embd), and per layer ``blk.N.attn_norm.weight``,
``blk.N.attn_{q,k,v,output}.weight``, ``blk.N.ffn_norm.weight``,
``blk.N.ffn_{gate,up,down}.weight``, plus:

- qwen2: ``blk.N.attn_{q,k,v}.bias``;
- qwen3, gemma3: ``blk.N.attn_q_norm.weight``, ``blk.N.attn_k_norm.weight`` ([head_dim]);
- gemma2, gemma3: ``blk.N.post_attention_norm.weight``, ``blk.N.post_ffw_norm.weight``. In
  gemma files ``ffn_norm`` is HF's ``pre_feedforward_layernorm`` and ``post_attention_norm`` is
  HF's ``post_attention_layernorm``; in llama/qwen/phi3 files ``ffn_norm`` is HF's
  ``post_attention_layernorm`` (the pre-MLP norm). Mind the name clash.
- phi3: fused ``blk.N.attn_qkv.weight`` ([(H + 2*KV)*D, E], rows q then k then v) instead of
  attn_q/k/v, and fused ``blk.N.ffn_up.weight`` ([2F, E], rows 0..F-1 the gate, F..2F-1 the up
  projection: ``h = silu(x @ up[:F].T) * (x @ up[F:].T)``), no ffn_gate.

Conventions. tests/test_gguf_factory.py checks them twice: against the weights transformers
loads, and with a float64 NumPy forward pass that reads only the GGUF file, follows the rules
below (llama.cpp's), and matches `reference_logits` to 2e-4 on every arch and option here.

1. Rotary layout. llama.cpp's converter permutes the rows of ``attn_q``/``attn_k`` for the
   llama architecture (llama and mistral files) so that llama.cpp's "normal" rope, which
   rotates adjacent pairs (x[2i], x[2i+1]), matches HF's rotate_half, which rotates
   (x[i], x[i + D/2]). Per head, GGUF row ``2i`` is HF row ``i`` and GGUF row ``2i+1`` is HF
   row ``i + D/2``: ``gguf = hf.reshape(H, 2, D/2, E).swapaxes(1, 2).reshape(H*D, E)``.
   transformers undoes this on load (``LlamaTensorProcessor``). So on a llama/mistral GGUF,
   either apply rope to interleaved pairs, or un-permute q/k once at load and use rotate_half.
   qwen2, qwen3, gemma2, gemma3 and phi3 files are NOT permuted (llama.cpp uses NEOX rope,
   i.e. rotate_half, for them); q/k norms are per head_dim and never permuted.
2. Gemma RMSNorm. HF computes ``x_normed * (1 + w)``; llama.cpp's converter stores ``1 + w``
   for every tensor whose name ends in ``norm.weight`` (attn_norm, post_attention_norm,
   ffn_norm, post_ffw_norm, output_norm, and gemma3's attn_q_norm/attn_k_norm), and
   transformers subtracts 1 on load (``Gemma2TensorProcessor``, used for gemma2 and gemma3).
   So a gemma GGUF norm is a plain multiplier: ``x_normed * w_gguf``, like llama's.
3. Gemma embeddings are scaled by ``sqrt(hidden_size)`` (HF and llama.cpp), in float32 here.
4. What transformers' GGUF loader (legacy path, ``modeling_gguf_pytorch_utils``) ignores, and
   falls back to config-class defaults for:
   - gemma2 ``attn_logit_softcapping`` / ``final_logit_softcapping`` (HF defaults 50.0 / 30.0);
   - gemma3 ``final_logit_softcapping`` (HF default None), ``rope.freq_base_swa`` (HF always
     10000), ``attention.sliding_window_pattern`` (HF always 6: layer i is global iff
     (i+1) % 6 == 0, like llama.cpp's default), ``rope.scaling.*`` (HF: no scaling at all,
     which is wrong for Gemma 3 4B+ GGUFs, whose global layers use linear factor 8);
   - gemma2/gemma3 query scaling: HF uses ``query_pre_attn_scalar ** -0.5`` with default 256;
     llama.cpp uses ``1/sqrt(key_length)`` (27B: ``1/sqrt(n_embd/n_head)``). Same for real
     2B/9B/1B/4B/12B files (key_length 256), different for tiny ones;
   - qwen3 ``attention.key_length``: HF's Qwen3Config keeps head_dim = 128 (true of every real
     Qwen3, not of a tiny one);
   - phi3 ``attention.sliding_window`` (llama.cpp disables phi3 SWA too).
   It does read: context_length, block_count, feed_forward_length, embedding_length,
   head_count(_kv), layer_norm_rms_epsilon, rope.freq_base (gemma3: global layers only),
   vocab_size (else len(tokens)), llama's rope.dimension_count as head_dim, gemma's
   key_length as head_dim and gemma's attention.sliding_window. The presence of
   ``output.weight`` decides tie_word_embeddings.
   `reference_logits` therefore builds the HF config with `hf_config_overrides(path)` applied:
   the values the file states for the items above, read the way llama.cpp reads them, so that
   HF runs the model the file describes. Pass ``llama_cpp_semantics=False`` to get
   transformers' plain GGUF behaviour instead (for a tiny qwen3 it refuses to load: q_proj
   shapes disagree with head_dim 128). The reference is float32, eager attention, no KV
   cache, and refuses a model in which transformers left any weight not taken from the file.
5. Layer kinds. gemma2: layer i slides iff i is even (pattern 2, HF and llama.cpp), and both
   kinds use rope base ``rope.freq_base`` (absent in real files: 10000). gemma3: layer i is
   global iff (i+1) % pattern == 0, pattern = ``attention.sliding_window_pattern`` or 6
   (llama.cpp: 0 = every layer slides, 1 = none; no ``attention.sliding_window`` or 0 = none);
   local layers use rope base ``rope.freq_base_swa`` (default 10000) and no rope scaling,
   global layers ``rope.freq_base`` (default 1e6) with the file's rope scaling. A sliding
   window W lets query q see keys k with q - W < k <= q (W keys, itself included), in both.
   Attention is scaled by 1/sqrt(head_dim) everywhere (gemma: see item 4).
6. Activations: llama/mistral/qwen*/phi3 SiLU-gated MLP; gemma2/gemma3 GELU (tanh
   approximation) gated MLP. qwen2 has q/k/v biases; nobody else here has biases.
"""

from __future__ import annotations

import fnmatch
import functools
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

ARCHS: tuple[str, ...] = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3")

# The GGUF `general.architecture` value for each factory arch.
GGUF_ARCH: dict[str, str] = {a: ("llama" if a == "mistral" else a) for a in ARCHS}

QUANT_TYPES: tuple[str, ...] = (
    "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q6_K",
)  # fmt: skip

# llama-quant.cpp's fallback for a row length that is not a multiple of the block size.
_FALLBACK: dict[str, str] = {"Q4_K": "Q5_0", "Q6_K": "Q8_0"}

_FILE_TYPE: dict[str, str] = {
    "F32": "ALL_F32", "F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16", "Q8_0": "MOSTLY_Q8_0",
    "Q4_0": "MOSTLY_Q4_0", "Q4_1": "MOSTLY_Q4_1", "Q5_0": "MOSTLY_Q5_0", "Q5_1": "MOSTLY_Q5_1",
    "Q4_K": "MOSTLY_Q4_K_S", "Q6_K": "MOSTLY_Q6_K",
}  # fmt: skip


@dataclass(frozen=True)
class TinySpec:
    """Hyperparameters of a tiny model. Every field can be overridden in `write_tiny_gguf`."""

    arch: str
    n_layers: int = 2
    hidden_size: int = 64
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int = 16
    ffn_size: int = 128
    vocab_size: int = 384
    context_length: int = 512
    rope_base: float = 10000.0
    rope_base_swa: float | None = None  # gemma3 local layers
    rope_scaling_factor: float | None = None  # gemma3 linear scaling of global layers
    rms_eps: float = 1e-5
    sliding_window: int | None = None  # gemma2/gemma3 (phi3: written, ignored by everyone)
    sliding_window_pattern: int | None = None  # gemma3: written only when set
    attn_softcap: float | None = None  # gemma2
    final_softcap: float | None = None  # gemma2 (always), gemma3 (written when set)
    tie_embeddings: bool = False
    std: float = 0.1  # weight standard deviation; norms are 1 + N(0, std) in HF terms
    tensor_quant: dict[str, str] = field(default_factory=dict)  # fnmatch pattern -> type

    @property
    def gguf_arch(self) -> str:
        return GGUF_ARCH[self.arch]


_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(rope_base=500000.0, rms_eps=1e-5),
    "mistral": dict(n_kv_heads=1, rope_base=1000000.0, rms_eps=1e-5),
    "qwen2": dict(rope_base=1000000.0, rms_eps=1e-6, tie_embeddings=True),
    "qwen3": dict(head_dim=32, rope_base=1000000.0, rms_eps=1e-6, tie_embeddings=True),
    "gemma2": dict(
        n_layers=4, head_dim=32, rms_eps=1e-6, sliding_window=4, attn_softcap=2.0,
        final_softcap=3.0, tie_embeddings=True, vocab_size=320,
    ),
    "gemma3": dict(
        n_layers=7, head_dim=32, rms_eps=1e-6, rope_base=1000000.0, rope_base_swa=10000.0,
        sliding_window=4, tie_embeddings=True, vocab_size=320,
    ),
    "phi3": dict(n_kv_heads=4, rms_eps=1e-5, sliding_window=2047),
}  # fmt: skip


def tiny_spec(arch: str, **overrides: Any) -> TinySpec:
    """The spec `write_tiny_gguf(path, arch, **overrides)` would use."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")
    names = {f.name for f in fields(TinySpec)} - {"arch"}
    unknown = set(overrides) - names
    if unknown:
        raise TypeError(f"unknown overrides {sorted(unknown)}; expected some of {sorted(names)}")
    spec = replace(TinySpec(arch=arch), **_DEFAULTS[arch])
    spec = replace(spec, **overrides)
    if arch == "gemma2" and spec.tie_embeddings is False:
        raise ValueError("gemma2 files are always tied (llama.cpp ignores output.weight)")
    if arch == "phi3" and spec.n_heads * spec.head_dim != spec.hidden_size:
        raise ValueError("phi3 needs n_heads * head_dim == hidden_size")
    if spec.head_dim % 2:
        raise ValueError("head_dim must be even (rotary pairs)")
    return spec


# --------------------------------------------------------------------------------------------
# Weights


def _norm(rng: np.random.Generator, n: int, std: float) -> np.ndarray:
    """An RMSNorm weight in HF terms for llama-like models: near 1."""
    return (1.0 + rng.normal(0.0, std, n)).astype(np.float32)


def hf_tensors(spec: TinySpec, seed: int = 0) -> dict[str, np.ndarray]:
    """The model's float32 weights in Hugging Face layout, keyed by GGUF tensor name.

    HF layout means: q/k rows in rotate_half order, gemma norms as the ``w`` of ``1 + w``.
    `gguf_tensors` turns these into what llama.cpp's converter would have written.
    """
    rng = np.random.default_rng(seed)
    s = spec
    E, H, KV, D, F, V = s.hidden_size, s.n_heads, s.n_kv_heads, s.head_dim, s.ffn_size, s.vocab_size
    gemma = s.arch in ("gemma2", "gemma3")

    def mat(rows: int, cols: int) -> np.ndarray:
        return rng.normal(0.0, s.std, (rows, cols)).astype(np.float32)

    def norm(n: int) -> np.ndarray:
        # Gemma stores w for a (1 + w) multiplier; keep the multiplier near 1 either way.
        return rng.normal(0.0, s.std, n).astype(np.float32) if gemma else _norm(rng, n, s.std)

    t: dict[str, np.ndarray] = {"token_embd.weight": mat(V, E)}
    for i in range(s.n_layers):
        p = f"blk.{i}."
        t[p + "attn_norm.weight"] = norm(E)
        if s.arch == "phi3":
            t[p + "attn_qkv.weight"] = mat((H + 2 * KV) * D, E)
        else:
            t[p + "attn_q.weight"] = mat(H * D, E)
            t[p + "attn_k.weight"] = mat(KV * D, E)
            t[p + "attn_v.weight"] = mat(KV * D, E)
        if s.arch == "qwen2":
            t[p + "attn_q.bias"] = rng.normal(0.0, s.std, H * D).astype(np.float32)
            t[p + "attn_k.bias"] = rng.normal(0.0, s.std, KV * D).astype(np.float32)
            t[p + "attn_v.bias"] = rng.normal(0.0, s.std, KV * D).astype(np.float32)
        if s.arch in ("qwen3", "gemma3"):
            t[p + "attn_q_norm.weight"] = norm(D)
            t[p + "attn_k_norm.weight"] = norm(D)
        t[p + "attn_output.weight"] = mat(E, H * D)
        if gemma:
            t[p + "post_attention_norm.weight"] = norm(E)
        t[p + "ffn_norm.weight"] = norm(E)
        if s.arch == "phi3":
            t[p + "ffn_up.weight"] = mat(2 * F, E)
        else:
            t[p + "ffn_gate.weight"] = mat(F, E)
            t[p + "ffn_up.weight"] = mat(F, E)
        t[p + "ffn_down.weight"] = mat(E, F)
        if gemma:
            t[p + "post_ffw_norm.weight"] = norm(E)
    t["output_norm.weight"] = norm(E)
    if not s.tie_embeddings:
        t["output.weight"] = mat(V, E)
    return t


def llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter permutation of q/k rows (HF rotate_half -> interleaved pairs)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def llama_unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of `llama_permute` (what transformers does on load)."""
    return (
        w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def gguf_tensors(spec: TinySpec, seed: int = 0) -> dict[str, np.ndarray]:
    """The float32 tensors as llama.cpp's converter would write them (before quantization)."""
    out = {}
    for name, w in hf_tensors(spec, seed).items():
        if spec.gguf_arch == "llama" and name.endswith("attn_q.weight"):
            w = llama_permute(w, spec.n_heads)
        elif spec.gguf_arch == "llama" and name.endswith("attn_k.weight"):
            w = llama_permute(w, spec.n_kv_heads)
        elif spec.arch in ("gemma2", "gemma3") and name.endswith("norm.weight"):
            w = w + np.float32(1.0)
        out[name] = np.ascontiguousarray(w, dtype=np.float32)
    return out


# --------------------------------------------------------------------------------------------
# Quantization


def _qtype(name: str):
    from gguf import GGMLQuantizationType

    return GGMLQuantizationType[name]


def tensor_qtype(name: str, shape: tuple[int, ...], quant: str, spec: TinySpec) -> str:
    """The GGML type a tensor is stored in, following llama.cpp's rules (see module doc)."""
    from gguf import GGML_QUANT_SIZES

    if len(shape) < 2:
        return "F32"
    want = quant
    for pattern, qt in spec.tensor_quant.items():
        if fnmatch.fnmatchcase(name, pattern):
            want = qt
            break
    if want not in QUANT_TYPES:
        raise ValueError(f"unsupported quant type {want!r}; expected one of {QUANT_TYPES}")
    while True:
        block = GGML_QUANT_SIZES[_qtype(want)][0]
        if shape[-1] % block == 0:
            return want
        want = _FALLBACK.get(want, "F16")


def _f16_bytes(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).view(np.uint8).reshape(*x.shape[:-1], x.shape[-1] * 2)


def _f16_ceil(x: np.ndarray) -> np.ndarray:
    """The smallest float16 value >= x (x >= 0), as float32."""
    h = x.astype(np.float16)
    h = np.where(h.astype(np.float32) < x, np.nextafter(h, np.float16(np.inf)), h)
    return h.astype(np.float32)


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    """Q4_K blocks for float32 rows (row length a multiple of 256): uint8 [rows, n*144].

    A plain min/max quantizer (not llama.cpp's iterative search): 8 sub-blocks of 32 with a
    6-bit scale and min each, relative to f16 super-block scales d and dmin. Scales and mins
    round up, so nothing clips: the error is at most half a sub-block step.
    """
    rows, cols = x.shape
    b = x.reshape(-1, 8, 32).astype(np.float32)
    mins = -np.minimum(b.min(axis=-1), 0.0)  # [n, 8], >= 0
    dmin = _f16_ceil(mins.max(axis=-1) / 63.0)  # [n]
    safe_dmin = np.where(dmin > 0, dmin, 1.0)[:, None]
    m = np.ceil(mins / safe_dmin).clip(0, 63).astype(np.uint8)
    off = dmin[:, None] * m  # >= mins
    need = (b.max(axis=-1) + off) / 15.0  # step that reaches the sub-block's max
    d = _f16_ceil(need.max(axis=-1) / 63.0)
    safe_d = np.where(d > 0, d, 1.0)[:, None]
    sc = np.ceil(need / safe_d).clip(0, 63).astype(np.uint8)
    step = (d[:, None] * sc)[..., None]
    q = np.rint((b + off[..., None]) / np.where(step > 0, step, 1.0))
    q = q.clip(0, 15).astype(np.uint8)  # [n, 8, 32]
    scales = np.zeros((b.shape[0], 12), np.uint8)
    scales[:, 0:4] = (sc[:, 0:4] & 63) | ((sc[:, 4:8] >> 4) << 6)
    scales[:, 4:8] = (m[:, 0:4] & 63) | ((m[:, 4:8] >> 4) << 6)
    scales[:, 8:12] = (sc[:, 4:8] & 0xF) | ((m[:, 4:8] & 0xF) << 4)
    # 4 chunks of 64 values; each 32-byte chunk holds sub-block 2j in the low nibbles and
    # sub-block 2j+1 in the high nibbles.
    qs = (q[:, 0::2, :] | (q[:, 1::2, :] << 4)).reshape(-1, 128)
    blocks = np.concatenate([_f16_bytes(d[:, None]), _f16_bytes(dmin[:, None]), scales, qs], axis=1)
    return blocks.reshape(rows, cols // 256 * 144)


def quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """Q6_K blocks for float32 rows (row length a multiple of 256): uint8 [rows, n*210].

    16 sub-blocks of 16 with an int8 scale each (0..127 here), relative to an f16 super-block
    d; quants in -31..31. Scales round up, so the error is at most half a sub-block step.
    """
    rows, cols = x.shape
    b = x.reshape(-1, 16, 16).astype(np.float32)
    need = np.abs(b).max(axis=-1) / 31.0  # [n, 16]
    d = _f16_ceil(need.max(axis=-1) / 127.0)
    safe_d = np.where(d > 0, d, 1.0)[:, None]
    sc = np.ceil(need / safe_d).clip(0, 127).astype(np.int8)
    step = (d[:, None] * sc.astype(np.float32))[..., None]
    q = np.rint(b / np.where(step > 0, step, 1.0))
    q = (q.clip(-32, 31) + 32).astype(np.uint8).reshape(-1, 2, 4, 32)  # [n, half, quarter, 32]
    # In each 128-value half: quarter 0 -> ql[0:32] low, 1 -> ql[32:64] low,
    # 2 -> ql[0:32] high, 3 -> ql[32:64] high; qh[l] holds bits 4-5 of quarters 0..3.
    lo = q & 0xF
    hi = q >> 4
    ql = np.concatenate([lo[:, :, 0] | (lo[:, :, 2] << 4), lo[:, :, 1] | (lo[:, :, 3] << 4)], -1)
    qh = hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)
    blocks = np.concatenate(
        [ql.reshape(-1, 128), qh.reshape(-1, 64), sc.view(np.uint8), _f16_bytes(d[:, None])],
        axis=1,
    )
    return blocks.reshape(rows, cols // 256 * 210)


def quantize(x: np.ndarray, qtype: str) -> np.ndarray:
    """Encode a float32 matrix as GGML `qtype` bytes (uint8 [rows, bytes]), or F32/F16 values."""
    from gguf import quants

    x = np.ascontiguousarray(x, dtype=np.float32)
    if qtype == "F32":
        return x
    if qtype == "F16":
        return x.astype(np.float16)
    if qtype == "Q4_K":
        return quantize_q4_k(x)
    if qtype == "Q6_K":
        return quantize_q6_k(x)
    return quants.quantize(x, _qtype(qtype))


def dequantize(data: np.ndarray, qtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """Decode what `quantize` wrote, with the gguf package's dequantizer (float32, `shape`)."""
    from gguf import quants

    if qtype in ("F32", "F16"):
        return np.asarray(data, dtype=np.float32).reshape(shape)
    return np.asarray(quants.dequantize(data, _qtype(qtype)), dtype=np.float32).reshape(shape)


# --------------------------------------------------------------------------------------------
# Tokenizers


def _bpe_vocab(spec: TinySpec) -> dict[str, Any]:
    """A byte-level BPE vocabulary: 256 byte tokens, merges, then control tokens at the end."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    if spec.arch == "llama":
        specials = [
            "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
            "<|eot_id|>",
        ]  # fmt: skip
        pre, bos, eos, pad = "llama-bpe", 0, 1, 1
    else:
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        pre, bos, eos, pad = "qwen2", 0, 2, 0  # Qwen: bos = pad = <|endoftext|>, no BOS added
    n_merges = spec.vocab_size - 256 - len(specials)
    if n_merges < 0:
        raise ValueError(f"vocab_size must be at least {256 + len(specials)} for {spec.arch}")
    alphabet = bytes_to_unicode()
    tokens = [alphabet[b] for b in range(256)]
    have = set(tokens)
    space = alphabet[ord(" ")]
    letters = "etaoinshrdlucmfwypvbgkjqxz"
    merges: list[str] = []
    firsts = [space, *letters]
    for a in firsts:
        for c in letters:
            if len(merges) == n_merges:
                break
            if a + c not in have:
                merges.append(f"{a} {c}")
                tokens.append(a + c)
                have.add(a + c)
    if len(merges) < n_merges:  # three-character tokens: "Ġ" + two letters
        for a in letters:
            for c in letters:
                if len(merges) == n_merges:
                    break
                merges.append(f"{space + a} {c}")
                tokens.append(space + a + c)
    if len(merges) < n_merges:
        raise ValueError(f"vocab_size {spec.vocab_size} too large for the tiny BPE vocab")
    first_special = len(tokens)
    tokens += specials
    types = [1] * first_special + [3] * len(specials)  # 1 NORMAL, 3 CONTROL
    return dict(
        model="gpt2", pre=pre, tokens=tokens, token_type=types, merges=merges,
        bos=first_special + bos, eos=first_special + eos, pad=first_special + pad, unk=None,
        add_bos=spec.arch == "llama", add_eos=False, add_space_prefix=None,
    )  # fmt: skip


def _spm_vocab(spec: TinySpec) -> dict[str, Any]:
    """A SentencePiece (llama tokenizer) vocabulary with byte fallback tokens and scores."""
    if spec.arch in ("gemma2", "gemma3"):
        head = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
        head_types = [3, 3, 3, 2, 4, 3, 3]  # 2 UNKNOWN, 3 CONTROL, 4 USER_DEFINED
        ids = dict(pad=0, eos=1, bos=2, unk=3)
        tail: list[str] = []
        add_space_prefix: bool | None = False
    else:  # mistral, phi3
        head = ["<unk>", "<s>", "</s>"]
        head_types = [2, 3, 3]
        ids = dict(unk=0, bos=1, eos=2, pad=0)
        tail = ["<|endoftext|>", "<|assistant|>", "<|end|>", "<|user|>"]
        tail = tail if spec.arch == "phi3" else []
        add_space_prefix = None
    tokens = list(head) + [f"<0x{b:02X}>" for b in range(256)]
    types = list(head_types) + [6] * 256  # 6 BYTE
    scores = [0.0] * len(tokens)
    pieces = ["\u2581", *"etaoinshrdlucmfwypvbgkjqxzETAOINSHRDLUCMFWYPVBGKJQXZ0123456789.,!?'"]
    letters = "etaoinshrdlucmfwypvbgkjqxz"
    pieces += ["\u2581" + c for c in letters]
    pieces += [a + c for a in letters for c in letters]
    n_pieces = spec.vocab_size - len(tokens) - len(tail)
    if n_pieces < 30:
        raise ValueError(f"vocab_size {spec.vocab_size} too small for the tiny SPM vocab")
    if n_pieces > len(pieces):
        raise ValueError(f"vocab_size {spec.vocab_size} too large for the tiny SPM vocab")
    for i, p in enumerate(pieces[:n_pieces]):
        tokens.append(p)
        types.append(1)
        scores.append(-float(i))
    if tail:
        ids["eos"] = len(tokens)
        ids["pad"] = len(tokens)
        tokens += tail
        types += [3, 4, 3, 4]
        scores += [0.0] * len(tail)
    return dict(
        model="llama", pre="default", tokens=tokens, token_type=types, scores=scores,
        bos=ids["bos"], eos=ids["eos"], pad=ids["pad"], unk=ids["unk"],
        add_bos=spec.arch != "phi3", add_eos=False, add_space_prefix=add_space_prefix,
    )  # fmt: skip


def tiny_vocab(spec: TinySpec) -> dict[str, Any]:
    """The tokenizer written for `spec`: tokens, token_type, merges or scores, special ids."""
    if spec.arch in ("llama", "qwen2", "qwen3"):
        vocab = _bpe_vocab(spec)
    else:
        vocab = _spm_vocab(spec)
    assert len(vocab["tokens"]) == spec.vocab_size, (len(vocab["tokens"]), spec.vocab_size)
    return vocab


# --------------------------------------------------------------------------------------------
# Writing


def _add_metadata(w, spec: TinySpec) -> None:
    from gguf import RopeScalingType

    s, a = spec, spec.gguf_arch
    w.add_context_length(s.context_length)
    w.add_embedding_length(s.hidden_size)
    w.add_block_count(s.n_layers)
    w.add_feed_forward_length(s.ffn_size)
    w.add_head_count(s.n_heads)
    w.add_head_count_kv(s.n_kv_heads)
    w.add_layer_norm_rms_eps(s.rms_eps)
    if s.arch != "qwen2":  # Qwen2 configs carry no head_dim, so no key_length is written
        w.add_key_length(s.head_dim)
        w.add_value_length(s.head_dim)
    if s.arch != "gemma2":  # the gemma2 converter never writes a rope base (10000)
        w.add_rope_freq_base(s.rope_base)
    if a == "llama":
        w.add_vocab_size(s.vocab_size)
        w.add_rope_dimension_count(s.head_dim)
    if s.arch == "phi3":
        w.add_rope_scaling_orig_ctx_len(s.context_length)
        w.add_rope_dimension_count(s.head_dim)
    if s.arch == "gemma2":
        w.add_attn_logit_softcapping(float(s.attn_softcap or 0.0))
        w.add_final_logit_softcapping(float(s.final_softcap or 0.0))
    if s.arch == "gemma3":
        if s.rope_scaling_factor is not None:
            w.add_rope_scaling_type(RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(s.rope_scaling_factor)
        if s.rope_base_swa is not None:
            w.add_rope_freq_base_swa(s.rope_base_swa)
        if s.final_softcap:
            w.add_final_logit_softcapping(s.final_softcap)
        if s.sliding_window_pattern is not None:
            w.add_sliding_window_pattern(s.sliding_window_pattern)
    if s.sliding_window is not None and s.arch in ("gemma2", "gemma3", "phi3"):
        w.add_sliding_window(s.sliding_window)


def _add_tokenizer(w, vocab: dict[str, Any]) -> None:
    w.add_tokenizer_model(vocab["model"])
    w.add_tokenizer_pre(vocab["pre"])
    w.add_token_list(vocab["tokens"])
    if "scores" in vocab:
        w.add_token_scores(vocab["scores"])
    w.add_token_types(vocab["token_type"])
    if "merges" in vocab:
        w.add_token_merges(vocab["merges"])
    w.add_bos_token_id(vocab["bos"])
    w.add_eos_token_id(vocab["eos"])
    if vocab["unk"] is not None:
        w.add_unk_token_id(vocab["unk"])
    w.add_pad_token_id(vocab["pad"])
    w.add_add_bos_token(vocab["add_bos"])
    w.add_add_eos_token(vocab["add_eos"])
    if vocab["add_space_prefix"] is not None:
        w.add_add_space_prefix(vocab["add_space_prefix"])


def write_tiny_gguf(
    path: str | Path, arch: str, *, seed: int = 0, quant: str = "F32", **overrides: Any
) -> Path:
    """Write a tiny random-weight GGUF model of family `arch`; return its path.

    `path` is the file to write, or an existing directory to write ``tiny-{arch}-{quant}.gguf``
    into. `overrides` are `TinySpec` fields (n_layers, hidden_size, head_dim, sliding_window,
    tensor_quant, ...). The same (arch, seed, overrides) always give the same weights.
    """
    import gguf

    if quant not in QUANT_TYPES:
        raise ValueError(f"unsupported quant {quant!r}; expected one of {QUANT_TYPES}")
    spec = tiny_spec(arch, **overrides)
    path = Path(path)
    if path.is_dir():
        path = path / f"tiny-{arch}-{quant.lower()}.gguf"
    path.parent.mkdir(parents=True, exist_ok=True)

    w = gguf.GGUFWriter(str(path), spec.gguf_arch)
    # Not "mistral": transformers would then try MistralForCausalLM, which its GGUF loader
    # cannot map with gguf 0.19 (no "mistral" in gguf.MODEL_ARCH_NAMES).
    w.add_name(f"tiny-{arch}")
    _add_metadata(w, spec)
    w.add_file_type(int(gguf.LlamaFileType[_FILE_TYPE[quant]]))
    if quant not in ("F32", "F16", "BF16"):
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_tokenizer(w, tiny_vocab(spec))

    for name, x in gguf_tensors(spec, seed).items():
        qt = tensor_qtype(name, x.shape, quant, spec)
        data = quantize(x, qt)
        if qt in ("F32", "F16"):
            w.add_tensor(name, data)
        else:
            w.add_tensor(name, data, raw_shape=data.shape, raw_dtype=_qtype(qt))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def expected_tensors(
    arch: str, *, seed: int = 0, quant: str = "F32", **overrides: Any
) -> dict[str, np.ndarray]:
    """What a reader should dequantize from `write_tiny_gguf(path, arch, seed=, quant=, ...)`.

    Recomputed (weights, quantization, then gguf's dequantizer), keyed by GGUF tensor name.
    """
    spec = tiny_spec(arch, **overrides)
    out = {}
    for name, x in gguf_tensors(spec, seed).items():
        qt = tensor_qtype(name, x.shape, quant, spec)
        out[name] = dequantize(quantize(x, qt), qt, x.shape)
    return out


# --------------------------------------------------------------------------------------------
# Reference (transformers)


def _gguf_metadata(path: Path) -> dict[str, Any]:
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(str(path))
    meta: dict[str, Any] = {}
    for key, f in reader.fields.items():
        if not f.types or f.types[0] == GGUFValueType.ARRAY:
            continue
        if f.types[0] == GGUFValueType.STRING:
            meta[key] = bytes(f.parts[-1]).decode()
        else:
            meta[key] = f.parts[-1][0].item()
    return meta


def hf_config_overrides(path: str | Path) -> dict[str, Any]:
    """HF config values this file states but transformers' GGUF loader does not read.

    Read the way llama.cpp reads them (module doc, item 4). Keys are HF config attributes.
    """
    meta = _gguf_metadata(Path(path))
    arch = meta["general.architecture"]

    def key(k: str, default: Any = None) -> Any:
        return meta.get(f"{arch}.{k}", default)

    out: dict[str, Any] = {}
    if arch == "qwen3" and key("attention.key_length") is not None:
        out["head_dim"] = key("attention.key_length")
    if arch in ("gemma2", "gemma3"):
        n_embd, n_head = key("embedding_length"), key("attention.head_count")
        n_layer = key("block_count")
        is_27b = (arch, n_layer) in (("gemma2", 46), ("gemma3", 62))
        out["query_pre_attn_scalar"] = n_embd // n_head if is_27b else key("attention.key_length")
    if arch == "gemma2":
        # llama.cpp: a missing or zero cap disables capping.
        out["attn_logit_softcapping"] = key("attn_logit_softcapping") or None
        out["final_logit_softcapping"] = key("final_logit_softcapping") or None
    if arch == "gemma3":
        out["final_logit_softcapping"] = key("final_logit_softcapping") or None
        pattern = key("attention.sliding_window_pattern", 6)
        n_layer = key("block_count")
        # llama.cpp's set_swa_pattern: layer i slides iff pattern == 0 or i % pattern < pattern - 1
        slides = [
            key("attention.sliding_window", 0) > 0 and (pattern == 0 or i % pattern < pattern - 1)
            for i in range(n_layer)
        ]
        out["layer_types"] = ["sliding_attention" if s else "full_attention" for s in slides]
        full: dict[str, Any] = {"rope_type": "default", "rope_theta": key("rope.freq_base", 1e6)}
        if key("rope.scaling.type") == "linear" and key("rope.scaling.factor"):
            full = {**full, "rope_type": "linear", "factor": float(key("rope.scaling.factor"))}
        out["rope_parameters"] = {
            "full_attention": full,
            "sliding_attention": {
                "rope_type": "default", "rope_theta": key("rope.freq_base_swa", 10000.0),
            },
        }  # fmt: skip
    return out


def _file_key(path: str | Path) -> tuple[str, int, int]:
    p = Path(path).resolve()
    st = p.stat()
    return (str(p), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=8)
def _load_hf(key: tuple[str, int, int], llama_cpp_semantics: bool):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(key[0])
    config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    if llama_cpp_semantics:
        overrides = hf_config_overrides(path)
        if overrides:
            d = config.to_dict()
            d.pop("transformers_version", None)
            d.update(overrides)
            config = type(config).from_dict(d)
    model, info = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, config=config, dtype=torch.float32,
        attn_implementation="eager", output_loading_info=True,
    )  # fmt: skip
    # A weight transformers did not take from the file would be random: refuse the model.
    problems = {k: v for k, v in info.items() if v and k != "error_msgs"}
    if problems or info.get("error_msgs"):
        raise RuntimeError(f"transformers did not load all of {path}: {info}")
    model.eval()
    return model


def hf_model(path: str | Path, *, llama_cpp_semantics: bool = True):
    """The transformers model for a GGUF file (float32, eager attention), cached per file."""
    return _load_hf(_file_key(path), llama_cpp_semantics)


def reference_logits(
    path: str | Path, token_ids: list[int], *, llama_cpp_semantics: bool = True
) -> np.ndarray:
    """transformers' float32 logits for every position of `token_ids`: [T, V]."""
    import torch

    model = hf_model(path, llama_cpp_semantics=llama_cpp_semantics)
    ids = torch.tensor([list(token_ids)], dtype=torch.long)
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=False)
    return out.logits[0].float().numpy()


def reference_greedy(
    path: str | Path, token_ids: list[int], n: int, *, llama_cpp_semantics: bool = True
) -> list[int]:
    """`n` greedy (argmax) continuation tokens of `token_ids`, recomputing the full prefix."""
    ids = list(token_ids)
    for _ in range(n):
        logits = reference_logits(path, ids, llama_cpp_semantics=llama_cpp_semantics)
        ids.append(int(np.argmax(logits[-1])))
    return ids[len(token_ids) :]


def write_shaped_gguf(path: str | Path, quant: str, *, seed: int = 0, **overrides: Any) -> Path:
    """Write a llama-architecture GGUF of any size (e.g. shaped like a 1.5-2B model) whose
    matrices are random blocks of `quant` ("Q8_0" or "Q4_K") written directly as bytes, tensor
    by tensor: no float copy of the model is ever made, so multi-GB files take seconds. Norms
    are float32 ones; the tokenizer is the tiny one (`overrides` are `TinySpec` fields; the
    vocabulary stays under ~960 tokens). Values are not a trained model's, only its shapes,
    types and magnitudes (weights within about +-0.05): for memory and speed measurements."""
    import gguf

    if quant not in ("Q8_0", "Q4_K"):
        raise ValueError(f"write_shaped_gguf writes Q8_0 or Q4_K, not {quant!r}")
    spec = tiny_spec("llama", **overrides)
    rng = np.random.default_rng(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(path), spec.gguf_arch)
    w.add_name(f"shaped-llama-{quant.lower()}")
    _add_metadata(w, spec)
    w.add_file_type(int(gguf.LlamaFileType[_FILE_TYPE[quant]]))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_tokenizer(w, tiny_vocab(spec))
    d, f, v = spec.hidden_size, spec.ffn_size, spec.vocab_size
    kv = spec.n_kv_heads * spec.head_dim
    q = spec.n_heads * spec.head_dim
    mats = {"token_embd.weight": (v, d), "output.weight": (v, d)}
    layer_mats = {"attn_q": (q, d), "attn_k": (kv, d), "attn_v": (kv, d), "attn_output": (d, q),
                  "ffn_gate": (f, d), "ffn_up": (f, d), "ffn_down": (d, f)}  # fmt: skip
    for i in range(spec.n_layers):
        for name, shape in layer_mats.items():
            mats[f"blk.{i}.{name}.weight"] = shape
        for norm in ("attn_norm", "ffn_norm"):
            w.add_tensor(f"blk.{i}.{norm}.weight", np.ones(d, np.float32))
    w.add_tensor("output_norm.weight", np.ones(d, np.float32))
    for name, (rows, cols) in mats.items():
        data = _random_blocks(rng, rows, cols, quant)
        w.add_tensor(name, data, raw_shape=data.shape, raw_dtype=_qtype(quant))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _random_blocks(rng: np.random.Generator, rows: int, cols: int, quant: str) -> np.ndarray:
    """uint8 [rows, bytes per row] of random `quant` blocks with small float16 scales."""
    if quant == "Q8_0":
        b = rng.integers(0, 256, (rows, cols // 32, 34), dtype=np.uint8)
        b[..., :2] = np.full((rows, cols // 32, 1), 3e-4, np.float16).view(np.uint8)
    else:  # Q4_K: d, dmin, 12 bytes of 6-bit scales and offsets, 128 bytes of nibbles
        b = rng.integers(0, 256, (rows, cols // 256, 144), dtype=np.uint8)
        b[..., :4] = np.full((rows, cols // 256, 2), [1e-4, 8e-4], np.float16).view(np.uint8)
    return b.reshape(rows, -1)
