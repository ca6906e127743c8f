"""GPT-OSS and Mistral 3 (text) against transformers on the HF weights of the tiny random
models of `hf_factory` (converted by llama.cpp's own converter; transformers' GGUF loader
cannot read either family), with llama.cpp as the optional second reference.

- Logits at every position of a prompt longer than GPT-OSS's sliding window (8) and Mistral
  3's original context (16, where its attention temperature steps): the f32 files and
  GPT-OSS's MXFP4 file (experts exactly the HF weights) within 1e-3 (measured ~1e-6).
- The q8_0 files against transformers given the file's own (dequantized) weights: the
  quantized tensors are read right, 3-D expert matrices included.
- Prefill + decode (several steps per dispatch) and a prefix-reuse prefill give one full
  prefill's logits; greedy tokens equal transformers' greedy generation; GPT-OSS's scanned
  layer loop (the accelerator layout, its MoE layer kind stacked) equals the unrolled one.
- The narrow expert formats decode to the float experts exactly: bf16 bits and int8 blocks
  from MXFP4, int8 blocks from Q8_0.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import all_logits, rel_err
from hf_factory import TinyModel, build_all
from hf_reference import hf_logits, hf_model
from test_steps import GREEDY, check_prefill_then_decode

from tsjax.generation import generate
from tsjax.gguf import GGUFFile
from tsjax.layers.experts import all_experts
from tsjax.model import load
from tsjax.quantize import expert_params
from tsjax.shapes import StepShapes

pytestmark = pytest.mark.slow

# 40 tokens: five GPT-OSS windows, and Mistral 3's temperature steps at 16 and 32.
PROMPT = [(i * 37 + 11) % 500 + 1 for i in range(40)]
SHAPES = StepShapes.default(rows=4, max_len=64, min_prefill=16, min_attn=64)
BOS = {"gpt_oss": 503, "mistral3": 1}


@pytest.fixture(scope="module")
def tiny() -> dict[str, TinyModel]:
    return build_all(["gpt_oss", "mistral3"])


_models: dict = {}


def model_of(m: TinyModel, file: str, **kw):
    kw.setdefault("quant", "f32")  # exact float weights: the comparisons are tight
    key = (m.name, file, tuple(sorted(kw.items())))
    if key not in _models:
        _models[key] = load(m.gguf[file], progress=False, shapes=SHAPES, **kw)
    return _models[key]


def prompt(name: str, n: int = len(PROMPT)) -> list[int]:
    return [BOS[name], *PROMPT[: n - 1]]


@pytest.mark.parametrize(
    "name,file", [("gpt_oss", "f32"), ("gpt_oss", "mxfp4"), ("mistral3", "f32")]
)
def test_logits_match_transformers(tiny, name, file):
    m = tiny[name]
    ids = prompt(name)
    ours, ref = all_logits(model_of(m, file), ids), hf_logits(m, ids)
    errs = [rel_err(ours[p], ref[p]) for p in range(len(ids))]
    assert max(errs) < 1e-3, f"worst position {int(np.argmax(errs))}: {max(errs):.2e}"


def _file_weights_in_hf(m: TinyModel, file: str) -> dict[str, np.ndarray]:
    """The HF state dict entries of every quantized tensor of `m.gguf[file]`, dequantized by
    the gguf package and mapped back to the HF layout (un-permuted q/k for Mistral 3,
    re-interleaved gate/up and [E, in, out] experts for GPT-OSS)."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    g = GGUFFile(m.gguf[file])
    heads = (m.text_config["num_attention_heads"], m.text_config["num_key_value_heads"])
    state = {k: v.detach().numpy().copy() for k, v in hf_model(m).state_dict().items()}
    lm = "model.language_model." if m.name == "mistral3" else "model."
    names = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
             "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
             "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj"}  # fmt: skip
    out: dict[str, np.ndarray] = {}
    for t in GGUFReader(str(g.path)).tensors:
        if t.tensor_type.name != "Q8_0":
            continue
        w = dequantize(t.data, t.tensor_type).reshape(g.info(t.name).shape)
        if t.name == "token_embd.weight":
            out[lm + "embed_tokens.weight"] = w
            continue
        if t.name == "output.weight":
            out["lm_head.weight"] = w
            continue
        _, i, kind, _ = t.name.split(".")
        layer = f"{lm}layers.{i}."
        if kind in ("attn_q", "attn_k") and m.name == "mistral3":
            n = heads[kind == "attn_k"]  # llama.cpp's permute, undone
            w = w.reshape(n, w.shape[0] // n // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)
        if kind in ("ffn_gate_exps", "ffn_up_exps"):
            key = layer + "mlp.experts.gate_up_proj"
            gate_up = out.get(key, state[key])
            gate_up[:, :, 0 if kind == "ffn_gate_exps" else 1 :: 2] = w.transpose(0, 2, 1)
            out[key] = gate_up
        elif kind == "ffn_down_exps":
            out[layer + "mlp.experts.down_proj"] = w.transpose(0, 2, 1)
        else:
            out[layer + names[kind] + ".weight"] = w
    return out


@pytest.mark.parametrize("name", ["gpt_oss", "mistral3"])
def test_q8_0_file_matches_transformers_on_its_weights(tiny, name):
    import torch

    m = tiny[name]
    ids = prompt(name)
    hf = hf_model(m)
    original = {k: v.clone() for k, v in hf.state_dict().items()}
    weights = _file_weights_in_hf(m, "q8_0")
    assert len(weights) >= 5  # embeddings, output and the layers' matrices
    try:
        hf.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()}, strict=False)
        ref = hf_logits(m, ids)
    finally:
        hf.load_state_dict(original)
    ours = all_logits(model_of(m, "q8_0"), ids)
    errs = [rel_err(ours[p], ref[p]) for p in range(len(ids))]
    assert max(errs) < 1e-3, f"worst position {int(np.argmax(errs))}: {max(errs):.2e}"


def test_llama_cpp_second_reference(tiny):
    """llama.cpp on the same f32 files. Mistral 3 agrees as closely as transformers does;
    GPT-OSS differs from both by llama.cpp's rounding of the YaRN ramp (it always truncates;
    transformers and tsjax follow gpt-oss's `truncate: false`), ~1e-3 here."""
    from hf_reference import llama_cpp_logits

    for name, bound in (("mistral3", 1e-5), ("gpt_oss", 5e-3)):
        m = tiny[name]
        ids = prompt(name)
        lc = llama_cpp_logits(m.gguf["f32"], ids)
        ours = all_logits(model_of(m, "f32"), ids)
        ref = hf_logits(m, ids)
        ours_lc = max(rel_err(ours[p], lc[p]) for p in range(len(ids)))
        ref_lc = max(rel_err(ref[p], lc[p]) for p in range(len(ids)))
        assert ours_lc < bound and ref_lc < bound, (name, ours_lc, ref_lc)
        assert (ours.argmax(-1) == lc.argmax(-1)).all()


# The tests below share compiled shapes: forward passes of 40 tokens (as above), prefills of
# 16 and 32, decode dispatches of 3 steps.


@pytest.mark.parametrize("name,file", [("gpt_oss", "mxfp4"), ("mistral3", "f32")])
def test_prefill_decode_and_prefix_reuse_equal_one_prefill(tiny, name, file):
    model = model_of(tiny[name], file)
    check_prefill_then_decode(model, prompt(name, 13), 9, 3)  # 13 + 27 tokens
    steps, params = model.steps, model.params
    seq = prompt(name)
    cache, sampler = steps.new_cache(), steps.new_sampler()
    _, _, cache, sampler = steps.prefill(params, cache, sampler, [seq[:24]], [2], [GREEDY])
    _, logits, cache, sampler = steps.prefill(
        params, cache, sampler, [seq[24:]], [2], [GREEDY], starts=[24]
    )
    assert rel_err(logits[0], all_logits(model, seq)[-1]) < 1e-4


@pytest.mark.parametrize("name,file", [("gpt_oss", "mxfp4"), ("mistral3", "f32")])
def test_greedy_tokens_match_transformers(tiny, name, file):
    import torch

    m = tiny[name]
    ids = prompt(name, 10)
    res = generate(model_of(m, file), ids, sampling=GREEDY, max_tokens=16, steps_per_dispatch=3)
    with torch.no_grad():
        out = hf_model(m).generate(
            torch.tensor([ids]), max_new_tokens=16, do_sample=False,
            attention_mask=torch.ones((1, len(ids)), dtype=torch.long),
        )  # fmt: skip
    want = out[0, len(ids) :].tolist()
    assert res.tokens == want[: len(res.tokens)]
    eog = model_of(m, file).tokenizer.eog_ids
    assert len(res.tokens) == 16 or want[len(res.tokens)] in eog


def test_scanned_layer_loop_agrees(tiny):
    """GPT-OSS's layer kind stacked under one `nn.scan` (the accelerator layout): the same
    logits as the unrolled loop, and the same greedy tokens."""
    m = tiny["gpt_oss"]
    scanned = model_of(m, "mxfp4", unrolled=False)
    assert "layers" in scanned.params and "moe" in scanned.params["layers"]
    unrolled = model_of(m, "mxfp4")
    ids = prompt("gpt_oss")
    assert rel_err(all_logits(scanned, ids), all_logits(unrolled, ids)) < 1e-5
    runs = [
        generate(x, ids[:10], sampling=GREEDY, max_tokens=9, steps_per_dispatch=3).tokens
        for x in (scanned, unrolled)
    ]
    assert runs[0] == runs[1]


def _experts(params) -> dict:
    return {k: v["moe"] for k, v in params.items() if k.startswith("layers_")}


@pytest.mark.parametrize("file", ["mxfp4", "q8_0"])
def test_narrow_expert_formats_are_exact(tiny, file):
    """MXFP4 values fit bfloat16 and int8 blocks exactly; Q8_0 blocks come back as int8 blocks
    with their own scales. So the narrow formats change no expert weight of these files."""
    model = model_of(tiny["gpt_oss"], file)
    float_experts = _experts(model.params)
    for quant in ("bf16", "int8") if file == "mxfp4" else ("int8",):
        narrow = _experts(expert_params(model.params, quant))
        for layer, moe in narrow.items():
            for proj in ("gate", "up", "down"):
                got = np.asarray(all_experts(moe[proj], np.float32), np.float32)
                want = np.asarray(float_experts[layer][proj]["weight"])
                np.testing.assert_array_equal(got, want, err_msg=f"{quant} {layer} {proj}")
        assert moe["router"]["weight"].dtype == np.float32  # routing stays float32
