"""Gemma 4 text (the E-style dense model: per-layer inputs, KV sharing, double-wide MLP on the
shared layers; and the 26B-A4B-style MoE: dense MLP beside the experts, k = v global layers
with one KV head) against transformers on the HF weights of `hf_factory`'s tiny models
(converted by llama.cpp's own converter; transformers' GGUF loader cannot read them), with
llama.cpp as the optional second reference.

- Logits at every position of a 40-token prompt (five sliding windows of 8) within 1e-3
  relative of transformers, f32 files (measured ~2e-5); the q8_0 files against transformers
  given the file's own dequantized weights.
- Prefill + decode (3 steps a dispatch) and a prefix-reuse prefill give one full prefill's
  logits; greedy tokens equal transformers' greedy generation; the scanned layer loop (the
  accelerator layout: KV-shared segments reading a stacked source) equals the unrolled one.
- The shared layers keep no cache of their own (`SharedKV`).
- Tensor parallel over two (forced) CPU devices gives the single device's logits and tokens,
  with the layers' differing KV heads and MLP widths split the same way in every layer.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ATTENTION_ORDER_TOL, all_logits, rel_err
from hf_factory import TinyModel, build_all
from hf_reference import hf_logits, hf_model
from test_steps import GREEDY, check_prefill_then_decode

from tsjax.cache import SharedKV
from tsjax.generation import generate
from tsjax.gguf import GGUFFile
from tsjax.model import load
from tsjax.shapes import StepShapes

pytestmark = pytest.mark.slow

# Token ids from 25 up: below are Gemma 4's control and media tokens.
PROMPT = [2] + [(i * 37 + 11) % 480 + 25 for i in range(39)]
SHAPES = StepShapes.default(rows=4, max_len=64, min_prefill=16, min_attn=64)
NAMES = ("gemma4", "gemma4_moe")


@pytest.fixture(scope="module")
def tiny() -> dict[str, TinyModel]:
    return build_all(list(NAMES))


_models: dict = {}


def model_of(m: TinyModel, file: str = "f32", **kw):
    kw.setdefault("quant", "f32")  # compared with transformers' float32 logits
    key = (m.name, file, tuple(sorted(kw.items())))
    if key not in _models:
        _models[key] = load(m.gguf[file], progress=False, shapes=SHAPES, **kw)
    return _models[key]


def _worst(ours, ref) -> tuple[float, int]:
    errs = [rel_err(ours[p], ref[p]) for p in range(len(ref))]
    return max(errs), int(np.argmax(errs))


@pytest.mark.parametrize("name", NAMES)
def test_logits_match_transformers(tiny, name):
    m = tiny[name]
    err, where = _worst(all_logits(model_of(m), PROMPT), hf_logits(m, PROMPT))
    assert err < 1e-3, f"worst position {where}: {err:.2e}"


# GGUF tensor -> HF parameter (the text model's, under "model."), for the quantized ones.
_HF_NAMES = {
    "attn_q": "self_attn.q_proj.weight", "attn_k": "self_attn.k_proj.weight",
    "attn_v": "self_attn.v_proj.weight", "attn_output": "self_attn.o_proj.weight",
    "ffn_gate": "mlp.gate_proj.weight", "ffn_up": "mlp.up_proj.weight",
    "ffn_down": "mlp.down_proj.weight", "inp_gate": "per_layer_input_gate.weight",
    "proj": "per_layer_projection.weight", "ffn_gate_up_exps": "experts.gate_up_proj",
    "ffn_down_exps": "experts.down_proj", "token_embd": "embed_tokens.weight",
    "per_layer_token_embd": "embed_tokens_per_layer.weight",
    "per_layer_model_proj": "per_layer_model_projection.weight",
}  # fmt: skip


def _file_weights_in_hf(m: TinyModel, file: str) -> dict[str, np.ndarray]:
    """The HF state dict entries of every quantized (or f16) tensor of `m.gguf[file]`,
    dequantized by the gguf package (the converter writes Gemma 4's tensors in HF's own
    layout: gate_up fused gate rows first, experts [E, out, in])."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    g = GGUFFile(m.gguf[file])
    out: dict[str, np.ndarray] = {}
    for t in GGUFReader(str(g.path)).tensors:
        if t.tensor_type.name == "F32":
            continue
        w = dequantize(t.data, t.tensor_type).reshape(g.info(t.name).shape)
        parts = t.name.split(".")
        if parts[0] == "blk":
            out[f"model.layers.{parts[1]}.{_HF_NAMES[parts[2]]}"] = w
        else:
            out[f"model.{_HF_NAMES[parts[0]]}"] = w
    return out


@pytest.mark.parametrize("name", NAMES)
def test_q8_0_file_matches_transformers_on_its_weights(tiny, name):
    import torch

    m = tiny[name]
    hf = hf_model(m)
    original = {k: v.clone() for k, v in hf.state_dict().items()}
    weights = _file_weights_in_hf(m, "q8_0")
    state = hf.state_dict()
    assert all(state[k].shape == v.shape for k, v in weights.items())
    assert len(weights) >= 10  # embeddings and the layers' matrices
    try:
        hf.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()}, strict=False)
        ref = hf_logits(m, PROMPT)
    finally:
        hf.load_state_dict(original)
    err, where = _worst(all_logits(model_of(m, "q8_0"), PROMPT), ref)
    assert err < 1e-3, f"worst position {where}: {err:.2e}"


def test_llama_cpp_second_reference(tiny):
    """llama.cpp on the dense f32 file: transformers with llama.cpp's fp16 GELU table
    emulated agrees with it to ~1e-3, and tsjax (exact GELU, as transformers) to what that
    rounding makes of these tiny logits (measured 5e-3)."""
    from hf_reference import llama_cpp_gelu, llama_cpp_logits

    m = tiny["gemma4"]
    lc = llama_cpp_logits(m.gguf["f32"], PROMPT)
    with llama_cpp_gelu():
        rounded = hf_logits(m, PROMPT)
    assert _worst(rounded, lc)[0] < 3e-3
    assert _worst(all_logits(model_of(m), PROMPT), lc)[0] < 2e-2


# The tests below share compiled shapes: forward passes of 40 tokens (as above), prefills of
# 16 and 32 tokens, decode dispatches of 3 steps.


@pytest.mark.parametrize("name", NAMES)
def test_prefill_decode_and_prefix_reuse_equal_one_prefill(tiny, name):
    model = model_of(tiny[name])
    check_prefill_then_decode(model, PROMPT[:13], 9, 3)  # 13 + 27 tokens: past the window
    steps, params = model.steps, model.params
    cache, sampler = steps.new_cache(), steps.new_sampler()
    _, _, cache, sampler = steps.prefill(params, cache, sampler, [PROMPT[:24]], [2], [GREEDY])
    _, logits, cache, sampler = steps.prefill(
        params, cache, sampler, [PROMPT[24:]], [2], [GREEDY], starts=[24]
    )
    assert rel_err(logits[0], all_logits(model, PROMPT)[-1]) < 1e-4


def test_greedy_tokens_match_transformers(tiny):
    import torch

    m = tiny["gemma4"]
    ids = PROMPT[:10]
    res = generate(model_of(m), ids, sampling=GREEDY, max_tokens=16, steps_per_dispatch=3)
    with torch.no_grad():
        out = hf_model(m).generate(
            torch.tensor([ids]), max_new_tokens=16, do_sample=False,
            attention_mask=torch.ones((1, len(ids)), dtype=torch.long),
        )  # fmt: skip
    want = out[0, len(ids) :].tolist()
    assert res.tokens == want[: len(res.tokens)]
    assert len(res.tokens) == 16 or want[len(res.tokens)] in model_of(m).tokenizer.eog_ids


def test_scanned_layer_loop_agrees(tiny):
    """Each run of one layer kind stacked under an `nn.scan` (the accelerator layout): the
    KV-shared layers 5-7 read layer 3's keys inside the stacked sliding run 0-3 and layer 4's
    (a run of its own). Same logits and greedy tokens as the unrolled loop; the shared
    segments' cache holds no arrays in either layout."""
    import jax

    m = tiny["gemma4"]
    scanned, unrolled = model_of(m, unrolled=False), model_of(m)
    assert [s.name for s in scanned.steps.model.plan()] == [
        "layers_0_3", "layers_4_4", "layers_5_6", "layers_7_7",
    ]  # fmt: skip
    for model, sources in ((scanned, (3, 4)), (unrolled, (3, 3, 4))):
        shared = [s for s in model.steps.new_cache().layers if isinstance(s, SharedKV)]
        assert tuple(s.source for s in shared) == sources
        assert jax.tree.leaves(shared) == []
    assert rel_err(all_logits(scanned, PROMPT), all_logits(unrolled, PROMPT)) < ATTENTION_ORDER_TOL
    runs = [
        generate(x, PROMPT[:10], sampling=GREEDY, max_tokens=9, steps_per_dispatch=3).tokens
        for x in (scanned, unrolled)
    ]
    assert runs[0] == runs[1]


def test_tensor_parallel_matches_one_device(tiny):
    """tp=2 on two forced CPU devices (a subprocess: the device count is fixed when JAX starts)
    against this process's single-device run: all-position logits (`ATTENTION_ORDER_TOL`) and
    greedy tokens.
    What is split: query heads and the MLP width in every layer (128 and 256 wide: both halve);
    KV heads in the dense model (2 in every layer), not in the MoE (1 on its global layer,
    so no layer splits them)."""
    from test_sharding import _finish, _spawn

    files = {n: str(tiny[n].gguf["f32"]) for n in NAMES}
    proc = _spawn(["tp2", json.dumps(files)], 2, script=[__file__])
    single = {n: _tp_case(model_of(tiny[n])) for n in NAMES}
    rc, out, err = _finish(proc, 600)
    assert rc == 0, f"tp=2 worker failed ({rc}):\n{out}\n{err[-4000:]}"
    got = json.loads(out.strip().splitlines()[-1])
    for n in NAMES:
        assert rel_err(np.asarray(got[n]["logits"]), single[n]["logits"]) < ATTENTION_ORDER_TOL, n
        assert got[n]["tokens"] == single[n]["tokens"], n
    specs = {n: got[n]["specs"] for n in NAMES}
    for n in NAMES:
        assert "tp" in specs[n]["q"] and "tp" in specs[n]["up"] and "tp" in specs[n]["up_wide"]
    assert "tp" in specs["gemma4"]["k"] and "tp" not in specs["gemma4_moe"]["k"]


def _tp_case(model) -> dict:
    tokens = generate(model, PROMPT[:10], sampling=GREEDY, max_tokens=6, steps_per_dispatch=3)
    return {"logits": np.asarray(all_logits(model, PROMPT)), "tokens": list(tokens.tokens)}


def _tp_worker(files: dict[str, str]) -> None:
    out = {}
    for name, path in files.items():
        m = load(Path(path), progress=False, shapes=SHAPES, mesh="tp=2", quant="f32")
        res = _tp_case(m)
        last = m.params[f"layers_{m.config.n_layers - 1}"]
        spec = lambda x: str(x.sharding.spec)  # noqa: E731
        out[name] = {
            "logits": res["logits"].tolist(),
            "tokens": res["tokens"],
            "specs": {
                "q": spec(m.params["layers_0"]["attn"]["q"]["weight"]),
                "k": spec(m.params["layers_0"]["attn"]["k"]["weight"]),
                "up": spec(m.params["layers_0"]["mlp"]["up"]["weight"]),
                "up_wide": spec(last["mlp"]["up"]["weight"]),
            },
        }
    print(json.dumps(out))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    kind, arg = sys.argv[1:]
    assert kind == "tp2", kind
    _tp_worker(json.loads(arg))
