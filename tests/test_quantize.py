"""Narrower weights (tsjax.quantize): the arithmetic of one smoothed int8 matmul, bf16 and int8
on every layout of tiny models, and the accuracy cost of each on the real default model against
its float32 logits."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import all_logits, rel_err
from gguf_factory import write_tiny_gguf

from tsjax.generation import generate
from tsjax.layers.linear import int8_matmul
from tsjax.model import load
from tsjax.quantize import _quantize
from tsjax.sampling import SamplingParams

PROMPT = [1, 5, 9, 42, 17, 3, 99, 23, 64, 7, 11, 80, 31, 2, 55, 90, 14, 6]


def test_smoothed_int8_matmul_tracks_float():
    """An input with one channel 50x the rest: per-row int8 alone loses the small channels;
    smoothing by the calibrated magnitudes keeps the product close."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 32)).astype(np.float32) * 0.1
    x = rng.standard_normal((8, 64)).astype(np.float32)
    x[:, 3] *= 50.0
    want = x @ w
    amax = np.abs(x).max(0)
    q, scale, smooth = _quantize(jnp.asarray(w), jnp.asarray(amax), 0.5)
    got = np.asarray(int8_matmul(jnp.asarray(x) * smooth, q, scale))
    plain_q, plain_scale, _ = _quantize(jnp.asarray(w), jnp.ones(64), 0.0)
    plain = np.asarray(int8_matmul(jnp.asarray(x), plain_q, plain_scale))
    assert q.dtype == jnp.int8 and scale.shape == (32,) and smooth.shape == (64,)
    assert rel_err(got, want) < 0.02
    assert rel_err(got, want) < rel_err(plain, want) / 2


@pytest.mark.parametrize("quant", ["bf16", "int8"])
@pytest.mark.parametrize("arch,unrolled", [("llama", True), ("gemma3", True), ("qwen3", False)])
def test_tiny_narrow_models_follow_float(tmp_path, arch, unrolled, quant):
    """Both layer layouts, tied (llama, gemma3) and untied (qwen3) output projections: bf16 and
    int8 logits stay near the float ones and decoding runs through the padded buckets."""
    path = write_tiny_gguf(tmp_path / f"{arch}.gguf", arch, tie_embeddings=arch != "qwen3")  # noqa: E501
    runs = {}
    for q in (None, quant):
        model = load(path, max_len=64, progress=False, unrolled=unrolled, quant=q)
        ids = [t % model.config.vocab_size for t in PROMPT]
        res = generate(model, ids[:6], sampling=SamplingParams.greedy(), max_tokens=6)
        runs[q] = (all_logits(model, ids), res.tokens, model)
    narrow = runs[quant][2]
    up = (narrow.params.get("layers") or narrow.params["layers_0"])["mlp"]["up"]
    head = narrow.params["lm_head"]
    if quant == "int8":
        assert up["kernel"].dtype == jnp.int8 and "input_scale" in up
        assert head["kernel"].dtype == jnp.int8
        assert min(narrow.steps.shapes.decode_batches) >= 4
        assert rel_err(runs[quant][0], runs[None][0]) < 0.1  # random weights: wiring
    else:
        assert up["weight"].dtype == jnp.bfloat16 and head["weight"].dtype == jnp.bfloat16
        # the lookup table stays float (XLA:CPU has no bfloat16 gather)
        assert narrow.params["embed"]["embedding"].dtype == jnp.float32
        assert min(narrow.steps.shapes.decode_batches) >= 2
        assert rel_err(runs[quant][0], runs[None][0]) < 0.02
    assert len(runs[quant][1]) == 6


def _log_softmax(a):
    a = a - a.max(-1, keepdims=True)
    return a - np.log(np.exp(a).sum(-1, keepdims=True))


@pytest.mark.slow
def test_real_model_narrow_accuracy(smollm_path):
    """SmolLM2 on 256 tokens of English prose (not the int8 calibration text), against the
    float32 next-token distribution: bf16 moves it by a mean KL under 0.002 nats (measured
    0.0002) with the top token agreeing 98%+ of the time (measured 100%); int8 by a mean KL
    under 0.03 (measured 0.019; unsmoothed per-row int8 0.05; llama.cpp's own Q4_1 x Q8
    kernels 0.004), agreeing 88%+ (measured 92%)."""
    text = (
        "Rivers shape the land they cross. Over thousands of years a river cuts its valley, "
        "carries sand and silt downstream, and builds plains and deltas where it slows. "
        "People have always settled along rivers, for water, for food and for travel; the "
        "first cities grew on the banks of the Tigris, the Euphrates, the Nile and the Indus. "
        "Today rivers still carry goods, turn turbines and water fields, but dams and "
        "pollution have changed many of them beyond recognition. Restoring a river means "
        "more than cleaning its water: it means giving it room to flood, to move and to "
        "feed the wetlands around it, so that fish can migrate and birds can nest again."
    )
    logits = {}
    for quant in (None, "bf16", "int8"):
        model = load(smollm_path, max_len=512, progress=False, quant=quant)
        ids = model.tokenizer.encode(text)[:256]
        logits[quant] = all_logits(model, ids)
    p = _log_softmax(logits[None])
    bounds = {"bf16": (0.002, 0.98), "int8": (0.03, 0.88)}
    for quant, (max_kl, min_agree) in bounds.items():
        q = _log_softmax(logits[quant])
        kl = float((np.exp(p) * (p - q)).sum(-1).mean())
        agree = float(np.mean(logits[None].argmax(-1) == logits[quant].argmax(-1)))
        print(f"{quant} vs float32: mean KL {kl:.4f}, top-1 agreement {agree:.3f}")
        assert kl < max_kl, quant
        assert agree > min_agree, quant
