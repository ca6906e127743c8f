"""int8 weights (tsjax.quantize): the arithmetic of one smoothed matmul, every layout on tiny
models, and the accuracy cost on the real default model against its float32 logits."""

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


@pytest.mark.parametrize("arch,unrolled", [("llama", True), ("gemma3", True), ("qwen3", False)])
def test_tiny_int8_models_follow_float(tmp_path, arch, unrolled):
    """Both layer layouts, tied (llama, gemma3) and untied (qwen3) output projections: int8
    logits stay near the float ones and decoding runs through the padded int8 buckets."""
    path = write_tiny_gguf(tmp_path / f"{arch}.gguf", arch, tie_embeddings=arch != "qwen3")  # noqa: E501
    runs = {}
    for quant in (None, "int8"):
        model = load(path, max_len=64, progress=False, unrolled=unrolled, quant=quant)
        ids = [t % model.config.vocab_size for t in PROMPT]
        res = generate(model, ids[:6], sampling=SamplingParams.greedy(), max_tokens=6)
        runs[quant] = (all_logits(model, ids), res.tokens, model)
    int8_model = runs["int8"][2]
    kernel = (int8_model.params.get("layers") or int8_model.params["layers_0"])["mlp"]["up"]
    assert kernel["kernel"].dtype == jnp.int8 and "input_scale" in kernel
    assert int8_model.params["lm_head"]["kernel"].dtype == jnp.int8
    assert min(int8_model.steps.shapes.decode_batches) >= 4
    assert rel_err(runs["int8"][0], runs[None][0]) < 0.1  # random weights: wiring, not accuracy
    assert len(runs["int8"][1]) == 6


def _log_softmax(a):
    a = a - a.max(-1, keepdims=True)
    return a - np.log(np.exp(a).sum(-1, keepdims=True))


@pytest.mark.slow
def test_real_model_int8_accuracy(smollm_path):
    """SmolLM2 on 256 tokens of English prose (not the calibration text): the next-token
    distribution moves by a mean KL under 0.03 nats (measured 0.019; unsmoothed per-row int8
    0.05; llama.cpp's own Q4_1 x Q8 kernels 0.004) and the top token agrees 88%+ of the time
    (measured 92%)."""
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
    for quant in (None, "int8"):
        model = load(smollm_path, max_len=512, progress=False, quant=quant)
        ids = model.tokenizer.encode(text)[:256]
        logits[quant] = all_logits(model, ids)
    p, q = _log_softmax(logits[None]), _log_softmax(logits["int8"])
    kl = float((np.exp(p) * (p - q)).sum(-1).mean())
    agree = float(np.mean(logits[None].argmax(-1) == logits["int8"].argmax(-1)))
    print(f"int8 vs float32: mean KL {kl:.4f}, top-1 agreement {agree:.3f} on {len(ids)} tokens")
    assert kl < 0.03
    assert agree > 0.88
