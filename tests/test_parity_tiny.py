"""Logit parity with transformers on tiny random-weight GGUF files, for every family.

The files are written by `gguf_factory` exactly as llama.cpp's converter lays them out; the
reference is transformers loading the very same file (with the config values it would
otherwise ignore filled in from the file, see `gguf_factory.hf_config_overrides`).
"""

from __future__ import annotations

import pytest
from conftest import all_logits, rel_err
from gguf_factory import reference_greedy, reference_logits, write_tiny_gguf

from tsjax.generation import generate
from tsjax.model import load
from tsjax.sampling import SamplingParams

pytestmark = pytest.mark.slow

CASES = [
    ("llama", "F32", {}),
    ("mistral", "F32", {}),
    ("qwen2", "F32", {}),
    ("qwen3", "F32", {}),
    ("gemma2", "F32", {}),
    ("gemma3", "F32", {}),
    ("llama", "Q8_0", {}),
    ("qwen2", "Q4_K", {"hidden_size": 256, "head_dim": 64}),
    ("gemma3", "Q6_K", {"hidden_size": 256}),
    ("gemma3", "F32", {"rope_scaling_factor": 8.0, "sliding_window_pattern": 3}),
]
PROMPT = [1, 5, 9, 42, 17, 3, 99, 23, 64, 7, 11, 80, 31, 2, 55, 90, 14, 6]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    out = {}
    for i, (arch, quant, over) in enumerate(CASES):
        out[i] = write_tiny_gguf(d / f"{arch}-{quant}-{i}.gguf", arch, quant=quant, **over)
    return out


@pytest.mark.parametrize(
    "case", range(len(CASES)), ids=[f"{a}-{q}-{i}" for i, (a, q, _) in enumerate(CASES)]
)
def test_all_position_logits_match(files, case):
    path = files[case]
    model = load(path, max_len=64, progress=False, quant="f32")
    ids = [t % model.config.vocab_size for t in PROMPT]
    ours = all_logits(model, ids)
    ref = reference_logits(path, ids)
    for pos in range(len(ids)):
        err = rel_err(ours[pos], ref[pos])
        assert err < 1e-3, f"{CASES[case]} position {pos}: relative error {err:.2e}"


@pytest.mark.parametrize("case", [3, 9], ids=lambda i: CASES[i][0])
def test_layer_layouts_agree(files, case):
    """The scanned, stacked-weights layout (the accelerator default) and the unrolled one
    (CPU's) compute the same logits, through prefill and multi-step decode."""
    runs = []
    for unrolled in (False, True):
        model = load(files[case], max_len=64, progress=False, unrolled=unrolled, quant="f32")
        assert ("layers" in model.params) != unrolled
        ids = [t % model.config.vocab_size for t in PROMPT]
        res = generate(
            model, ids, sampling=SamplingParams.greedy(), max_tokens=8, steps_per_dispatch=4
        )
        runs.append((res.tokens, all_logits(model, ids)))
    assert runs[0][0] == runs[1][0]
    assert rel_err(runs[0][1], runs[1][1]) < 1e-5


@pytest.mark.parametrize("case", [0, 2, 3, 4, 5], ids=lambda i: CASES[i][0])
def test_greedy_tokens_match(files, case):
    path = files[case]
    model = load(path, max_len=64, progress=False, quant="f32")
    ids = [t % model.config.vocab_size for t in PROMPT[:6]]
    res = generate(
        model, ids, sampling=SamplingParams.greedy(), max_tokens=16, steps_per_dispatch=4
    )
    want = reference_greedy(path, ids, 16)
    # An end-of-generation token ends ours early; the tokens before it must agree.
    assert res.tokens == want[: len(res.tokens)]
    assert len(res.tokens) == 16 or want[len(res.tokens)] in model.tokenizer.eog_ids
