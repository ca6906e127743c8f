"""Logit and greedy-token parity with transformers on the real GGUF models."""

from __future__ import annotations

import pytest
from conftest import all_logits, hf_reference, loaded_model, real_model_path, rel_err

from tsjax.generation import generate
from tsjax.sampling import SamplingParams

pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "Les émojis 🎉 et le 日本語 se mélangent\n\n    avec du code: x = [i**2 for i in range(10)]",
]

# From ../shared/models.md: transformers float32 greedy continuations, 16 new tokens.
CONTINUATIONS = {
    ("smollm2-135m", "The capital of France is"): " Paris.\n\nThe answer is: 2018-01",
    ("smollm2-135m", "def fibonacci(n):"): "\n    if n == 0:\n        return 1\n    return n * fib",
    (
        "gemma3-270m",
        "The capital of France is",
    ): " the capital of the country of France. It is the largest city in France and",
    (
        "gemma3-270m",
        "Once upon a time, in a small village,",
    ): " there lived a man named John. He was a hard-working, honest,",
}

MODELS = ["smollm2-135m", "gemma3-270m"]


@pytest.mark.parametrize("name", MODELS)
def test_last_position_logits_match_transformers(name):
    model = loaded_model(name, max_len=512)
    ref = hf_reference(real_model_path(name))
    for prompt in PROMPTS:
        ids = model.tokenizer.encode(prompt)
        assert ids == ref.tokenizer(prompt)["input_ids"], prompt
        ours, theirs = all_logits(model, ids), ref.logits(ids)
        for pos in (len(ids) - 1, len(ids) // 2):
            err = rel_err(ours[pos], theirs[pos])
            assert err < 1e-3, f"{name} {prompt!r} position {pos}: relative error {err:.2e}"


@pytest.mark.parametrize("name", MODELS)
def test_greedy_continuation_matches_transformers(name):
    model = loaded_model(name, max_len=512)
    ref = hf_reference(real_model_path(name))
    for (model_name, prompt), text in CONTINUATIONS.items():
        if model_name != name:
            continue
        ids = model.tokenizer.encode(prompt)
        res = generate(model, ids, sampling=SamplingParams.greedy(), max_tokens=16)
        assert res.tokens == ref.greedy(ids, 16), prompt
        assert res.text == text
