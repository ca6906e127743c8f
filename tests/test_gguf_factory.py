"""Tests for tests/gguf_factory.py: tiny GGUF files that transformers and our reader both load.

Besides checking that the files load, `_numpy_forward` recomputes the logits from the GGUF
tensors alone, with llama.cpp's conventions as gguf_factory's docstring states them
(interleaved rope on llama files, gemma norms as plain multipliers, 1/sqrt(key_length) query
scale, sliding-window pattern, local rope base, soft-capping). Agreement with transformers
shows those statements are what the reference actually computes.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from gguf_factory import (  # noqa: E402
    ARCHS,
    expected_tensors,
    gguf_tensors,
    hf_model,
    hf_tensors,
    llama_permute,
    llama_unpermute,
    quantize,
    reference_greedy,
    reference_logits,
    tensor_qtype,
    tiny_spec,
    write_tiny_gguf,
)

from tsjax.gguf import GGUFFile  # noqa: E402

PROMPT = [3, 17, 42, 99, 5, 250, 8, 64, 77, 31, 200, 11, 150, 23, 9, 120]  # 16 tokens


# --------------------------------------------------------------------------------------------
# An independent float64 forward pass from the GGUF file, in llama.cpp's terms.


def _numpy_forward(path, ids: list[int]) -> np.ndarray:
    f = GGUFFile(path)
    a = f.architecture

    def k(key, default=None):
        return f.metadata.get(f"{a}.{key}", default)

    def t(name):
        return f.tensor(name).astype(np.float64)

    E, H, KV, L = (
        k("embedding_length"),
        k("attention.head_count"),
        k("attention.head_count_kv"),
        k("block_count"),
    )
    D = k("attention.key_length", E // H)
    eps = k("attention.layer_norm_rms_epsilon")
    gemma = a in ("gemma2", "gemma3")
    T = len(ids)
    pos = np.arange(T, dtype=np.float64)

    def rms(v, w):
        return v / np.sqrt(np.mean(v * v, axis=-1, keepdims=True) + eps) * w

    def rope(x, base, scale):  # x [T, h, D]
        inv = base ** (-np.arange(0, D, 2, dtype=np.float64) / D)
        ang = (pos / scale)[:, None] * inv[None, :]
        cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
        if a == "llama":  # permuted rows: rotate adjacent pairs
            x0, x1 = x[..., 0::2], x[..., 1::2]
            out = np.empty_like(x)
            out[..., 0::2] = x0 * cos - x1 * sin
            out[..., 1::2] = x0 * sin + x1 * cos
            return out
        x0, x1 = x[..., : D // 2], x[..., D // 2 :]
        return np.concatenate([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)

    window = k("attention.sliding_window", 0) or 0
    if a == "gemma2":
        slides = [i % 2 == 0 for i in range(L)]
    elif a == "gemma3" and window > 0:
        p = k("attention.sliding_window_pattern", 6)
        slides = [p == 0 or i % p < p - 1 for i in range(L)]
    else:
        slides = [False] * L
    base = k("rope.freq_base", 10000.0)
    base_swa = k("rope.freq_base_swa", base if a == "gemma2" else 10000.0)
    factor = k("rope.scaling.factor", 1.0) if k("rope.scaling.type") == "linear" else 1.0
    softcap = k("attn_logit_softcapping") or None

    x = t("token_embd.weight")[ids]
    if gemma:
        x = x * np.sqrt(E)
    qi, ki = np.arange(T)[:, None], np.arange(T)[None, :]
    for i in range(L):
        p = f"blk.{i}."
        h = rms(x, t(p + "attn_norm.weight"))
        if a == "phi3":
            qkv = h @ t(p + "attn_qkv.weight").T
            q, kk, v = np.split(qkv, [H * D, H * D + KV * D], axis=-1)
        else:
            q, kk, v = (h @ t(p + f"attn_{n}.weight").T for n in "qkv")
            if f.has_tensor(p + "attn_q.bias"):
                q = q + t(p + "attn_q.bias")
                kk = kk + t(p + "attn_k.bias")
                v = v + t(p + "attn_v.bias")
        q, kk, v = q.reshape(T, H, D), kk.reshape(T, KV, D), v.reshape(T, KV, D)
        if f.has_tensor(p + "attn_q_norm.weight"):
            q = rms(q, t(p + "attn_q_norm.weight"))
            kk = rms(kk, t(p + "attn_k_norm.weight"))
        if slides[i]:
            q, kk = rope(q, base_swa, 1.0), rope(kk, base_swa, 1.0)
        else:
            q, kk = rope(q, base, factor), rope(kk, base, factor)
        kk, v = np.repeat(kk, H // KV, axis=1), np.repeat(v, H // KV, axis=1)
        s = np.einsum("qhd,khd->hqk", q, kk) / np.sqrt(D)
        if softcap:
            s = softcap * np.tanh(s / softcap)
        allowed = ki <= qi
        if slides[i]:
            allowed &= qi - ki < window
        s = np.where(allowed[None], s, -np.inf)
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        o = np.einsum("hqk,khd->qhd", s, v).reshape(T, H * D) @ t(p + "attn_output.weight").T
        if gemma:
            o = rms(o, t(p + "post_attention_norm.weight"))
        x = x + o
        h = rms(x, t(p + "ffn_norm.weight"))
        if a == "phi3":
            g, u = np.split(h @ t(p + "ffn_up.weight").T, 2, axis=-1)
        else:
            g, u = h @ t(p + "ffn_gate.weight").T, h @ t(p + "ffn_up.weight").T
        if gemma:
            act = 0.5 * g * (1 + np.tanh(np.sqrt(2 / np.pi) * (g + 0.044715 * g**3)))
        else:
            act = g / (1 + np.exp(-g))
        o = (act * u) @ t(p + "ffn_down.weight").T
        if gemma:
            o = rms(o, t(p + "post_ffw_norm.weight"))
        x = x + o
    x = rms(x, t("output_norm.weight"))
    out = t("output.weight") if f.has_tensor("output.weight") else t("token_embd.weight")
    logits = x @ out.T
    if cap := k("final_logit_softcapping"):
        logits = cap * np.tanh(logits / cap)
    return logits


# --------------------------------------------------------------------------------------------


def test_llama_permute_round_trip():
    w = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)  # 2 heads of head_dim 4
    p = llama_permute(w, 2)
    # Per head, GGUF row 2i is HF row i and row 2i+1 is HF row i + D/2.
    np.testing.assert_array_equal(p[:4], w[[0, 2, 1, 3]])
    np.testing.assert_array_equal(llama_unpermute(p, 2), w)


@pytest.mark.parametrize("qtype,sub", [("Q4_K", 32), ("Q6_K", 16)])
def test_k_quant_encoders(qtype, sub):
    """Our K-quant encoders decode (with gguf's dequantizer) to within ~half a step."""
    from gguf import GGMLQuantizationType, quants

    rng = np.random.default_rng(1)
    x = rng.normal(0, 0.1, (6, 512)).astype(np.float32)
    x[0, :256] = np.abs(x[0, :256]) + 0.2  # a block without negatives
    x[1] = 0.0  # an all-zero row
    x[2, :32] = 0.0  # all-zero sub-blocks
    y = quants.dequantize(quantize(x, qtype), GGMLQuantizationType[qtype]).reshape(x.shape)
    xb, yb = x.reshape(-1, sub), y.reshape(-1, sub)
    if qtype == "Q4_K":  # 16 levels spanning [min(0, lo), hi]
        step = (xb.max(-1) - np.minimum(xb.min(-1), 0)) / 15
    else:  # symmetric, quants -31..31
        step = np.abs(xb).max(-1) / 31
    assert np.all(np.abs(yb - xb).max(-1) <= 0.55 * step + 1e-7)
    np.testing.assert_array_equal(y[1], 0.0)
    np.testing.assert_array_equal(y[2, :32], 0.0)


def test_fallback_types():
    spec = tiny_spec("llama")
    assert tensor_qtype("blk.0.attn_norm.weight", (64,), "Q4_K", spec) == "F32"
    assert tensor_qtype("blk.0.attn_q.weight", (64, 64), "Q4_K", spec) == "Q5_0"
    assert tensor_qtype("blk.0.ffn_down.weight", (64, 256), "Q4_K", spec) == "Q4_K"
    assert tensor_qtype("blk.0.attn_q.weight", (64, 64), "Q6_K", spec) == "Q8_0"
    spec = tiny_spec("llama", tensor_quant={"output.weight": "Q6_K", "blk.*": "Q8_0"})
    assert tensor_qtype("output.weight", (384, 256), "Q4_K", spec) == "Q6_K"
    assert tensor_qtype("blk.1.ffn_down.weight", (64, 256), "Q4_K", spec) == "Q8_0"


_EXPECTED_META = {
    "llama": {"llama.rope.dimension_count": 16, "llama.vocab_size": 384},
    "mistral": {"llama.attention.head_count_kv": 1, "llama.rope.freq_base": 1e6},
    "qwen2": {"qwen2.rope.freq_base": 1e6},
    "qwen3": {"qwen3.attention.key_length": 32},
    "gemma2": {
        "gemma2.attention.sliding_window": 4,
        "gemma2.attn_logit_softcapping": 2.0,
        "gemma2.final_logit_softcapping": 3.0,
        "gemma2.attention.key_length": 32,
    },
    "gemma3": {
        "gemma3.attention.sliding_window": 4,
        "gemma3.rope.freq_base": 1e6,
        "gemma3.rope.freq_base_swa": 1e4,
        "gemma3.block_count": 7,
    },
    "phi3": {"phi3.rope.dimension_count": 16, "phi3.attention.sliding_window": 2047},
}


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_model(tmp_path, arch):
    t0 = time.perf_counter()
    path = write_tiny_gguf(tmp_path / f"{arch}.gguf", arch)
    spec = tiny_spec(arch)

    # Our reader: metadata and an exact F32 round trip of every tensor.
    f = GGUFFile(path)
    assert f.architecture == spec.gguf_arch
    for key, want in _EXPECTED_META[arch].items():
        assert f.meta(key) == pytest.approx(want), key
    assert len(f.meta("tokenizer.ggml.tokens")) == spec.vocab_size
    written = gguf_tensors(spec)
    assert sorted(f.tensor_names()) == sorted(written)
    for name, w in written.items():
        assert f.info(name).qtype == "F32"
        np.testing.assert_array_equal(f.tensor(name), w, err_msg=name)

    # transformers: loads, un-permutes q/k (llama), subtracts 1 from gemma norms.
    logits = reference_logits(path, PROMPT)
    assert logits.shape == (len(PROMPT), spec.vocab_size)
    assert logits.dtype == np.float32
    assert np.isfinite(logits).all()
    assert logits.std() > 0.3, logits.std()
    assert np.ptp(logits, axis=1).min() > 1.0  # every position discriminates between tokens
    sd = {k: v.numpy() for k, v in hf_model(path).state_dict().items()}
    hf = hf_tensors(spec)
    np.testing.assert_allclose(sd["model.embed_tokens.weight"], hf["token_embd.weight"])
    if spec.gguf_arch == "llama":
        np.testing.assert_allclose(
            sd["model.layers.0.self_attn.k_proj.weight"], hf["blk.0.attn_k.weight"]
        )
    if arch.startswith("gemma"):
        np.testing.assert_allclose(
            sd["model.layers.0.post_feedforward_layernorm.weight"],
            hf["blk.0.post_ffw_norm.weight"],
            atol=1e-6,
        )

    # The conventions in gguf_factory's docstring reproduce transformers' logits.
    np.testing.assert_allclose(_numpy_forward(path, PROMPT), logits, atol=2e-4, rtol=1e-4)
    print(f"{arch}: {time.perf_counter() - t0:.2f}s")


@pytest.mark.parametrize(
    "arch,quant,overrides",
    [
        ("llama", "Q8_0", {}),
        ("qwen3", "Q4_0", {}),
        ("gemma3", "Q4_K", {"hidden_size": 256, "n_layers": 6, "head_dim": 64}),
        ("mistral", "Q6_K", {"hidden_size": 256, "tensor_quant": {"token_embd.weight": "F16"}}),
    ],
)
def test_quantized_model(tmp_path, arch, quant, overrides):
    path = write_tiny_gguf(tmp_path, arch, quant=quant, seed=3, **overrides)
    spec = tiny_spec(arch, **overrides)
    f = GGUFFile(path)
    want = expected_tensors(arch, quant=quant, seed=3, **overrides)
    qtypes = set()
    for name, w in want.items():
        qt = f.info(name).qtype
        assert qt == tensor_qtype(name, w.shape, quant, spec)
        qtypes.add(qt)
        np.testing.assert_array_equal(f.tensor(name), w, err_msg=name)
    assert quant in qtypes
    logits = reference_logits(path, PROMPT)
    assert np.isfinite(logits).all() and logits.std() > 0.3
    np.testing.assert_allclose(_numpy_forward(path, PROMPT), logits, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "overrides",
    [
        {"rope_scaling_factor": 8.0, "rope_base_swa": 500.0, "final_softcap": 2.5},
        {"sliding_window_pattern": 3, "n_layers": 6, "sliding_window": 6},
    ],
)
def test_gemma3_options(tmp_path, overrides):
    """Optional gemma3 keys (rope scaling, local base, final cap, pattern) reach the reference."""
    path = write_tiny_gguf(tmp_path, "gemma3", **overrides)
    logits = reference_logits(path, PROMPT)
    np.testing.assert_allclose(_numpy_forward(path, PROMPT), logits, atol=2e-4, rtol=1e-4)
    if "final_softcap" in overrides:
        assert np.abs(logits).max() < 2.5
    else:
        kinds = hf_model(path).config.layer_types
        assert kinds == ["sliding_attention", "sliding_attention", "full_attention"] * 2


@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_sliding_window_is_exercised(tmp_path, arch):
    """With a 4-token window, a 16-token prompt sees different logits than with no window."""
    small = reference_logits(write_tiny_gguf(tmp_path / "w4.gguf", arch), PROMPT)
    big = reference_logits(write_tiny_gguf(tmp_path / "w64.gguf", arch, sliding_window=64), PROMPT)
    np.testing.assert_allclose(small[:4], big[:4], atol=1e-5)
    assert np.abs(small[4:] - big[4:]).max() > 1e-2


def test_plain_transformers_ignores_gemma2_caps(tmp_path):
    """transformers' GGUF loader alone uses HF defaults (caps 50/30, scalar 256): different."""
    path = write_tiny_gguf(tmp_path, "gemma2")
    plain = reference_logits(path, PROMPT, llama_cpp_semantics=False)
    assert hf_model(path, llama_cpp_semantics=False).config.final_logit_softcapping == 30.0
    assert np.abs(plain - reference_logits(path, PROMPT)).max() > 1e-2


def test_reference_greedy(tmp_path):
    path = write_tiny_gguf(tmp_path, "qwen2")
    out = reference_greedy(path, PROMPT[:5], 6)
    assert len(out) == 6 and all(0 <= i < 384 for i in out)
    assert out[0] == int(np.argmax(reference_logits(path, PROMPT[:5])[-1]))
    assert out[1] == int(np.argmax(reference_logits(path, PROMPT[:5] + out[:1])[-1]))


@pytest.mark.parametrize("arch", ARCHS)
def test_tokenizer_loads(tmp_path, arch):
    from transformers import AutoTokenizer

    path = write_tiny_gguf(tmp_path, arch)
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    ids = tok("the cat sat", add_special_tokens=False)["input_ids"]
    assert ids and all(0 <= i < tiny_spec(arch).vocab_size for i in ids)
    assert tok.decode(ids).strip() == "the cat sat"
