"""Gemma 4's gemma4v projector on the tiny random Gemma 4 E-model of `hf_factory` (one mmproj
with vision and audio; 2-layer tower, 16 px patches, 3 x 3 pooling, clipped linears,
standardisation): dynamic-resolution sizes (48 px a token, 70..1120 tokens), the image
embeddings against transformers (same pixels) and llama.cpp's mtmd (its own preprocessing),
and a prompt's logits against transformers with the image span bidirectional on the sliding
layers. Every image is non-square."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err
from hf_factory import build
from hf_reference import hf_image_features, hf_model, hf_multimodal_logits, pixel_inputs
from PIL import Image
from test_multimodal import _chat as chat
from test_multimodal import _forward
from vision_factory import MtmdCrashed, mtmd_image_embeddings, mtmd_prompt

from tsjax.gguf import GGUFFile
from tsjax.model import load
from tsjax.vision import load_projector
from tsjax.vision.config import ResizeSpec
from tsjax.vision.dynamic import bucket_of, pack
from tsjax.vision.preprocess import fit_size
from tsjax.vision.projector import PROJECTORS
from tsjax.vision.prompt import IMAGE_MARK, inline_images
from tsjax.vision.sharding import param_axes

pytestmark = pytest.mark.slow  # transformers + llama.cpp's converter build the model


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    smooth = np.stack([(xx * 3) % 256, (yy * 2) % 256, (xx + yy) % 256], -1)
    return ((smooth + rng.integers(0, 64, (h, w, 3))) % 256).astype(np.uint8)


# name -> (RGB image, the (width, height) llama.cpp resizes it to: 48 px a token)
IMAGES = {
    "as is 528x336": (_image(336, 528), (528, 336)),  # 11 x 7 = 77 tokens, no resize
    "small 200x90": (_image(90, 200, 1), (624, 288)),  # 4 x 2 tokens: scaled up to 13 x 6
}


@pytest.fixture(scope="module")
def tiny():
    return build("gemma4_vision_audio")


@pytest.fixture(scope="module")
def proj(tiny):
    return load_projector(tiny.mmproj["f32"])


@pytest.fixture(scope="module")
def model(tiny):
    return load(
        tiny.gguf["f32"], mmproj=tiny.mmproj["f32"].name, max_len=256, rows=1, progress=False,
        quant="f32",
    )  # fmt: skip


def test_config_from_mmproj(proj):
    """The vision half of a vision + audio file (its audio tensors are not the projector's)."""
    c = proj.config
    assert proj.metadata["clip.audio.projector_type"] == "gemma4a"
    assert (c.projector_type, c.patch_size, c.merge, c.align) == ("gemma4v", 16, 3, 48)
    assert (c.dim, c.ffn_dim, c.n_layers, c.n_heads, c.head_dim) == (32, 64, 2, 2, 16)
    assert (c.text_dim, c.activation, c.rope_theta, c.position_size) == (64, "gelu_tanh", 100, 64)
    assert c.clipped and c.standardize
    assert c.dynamic and (c.min_tokens, c.max_tokens, c.row_break) == (70, 1120, False)
    assert (c.image_begin, c.image_end, c.bidirectional) == ("<|image>", "<image|>", True)
    assert c.resize == ResizeSpec("bicubic", "ceil", (0, 0, 0))
    assert proj.token_buckets == (128, 256, 512, 1024, 1120)
    assert c.positions(336, 528) == 77
    family = PROJECTORS["gemma4v"]
    for path, leaf in jax.tree_util.tree_flatten_with_path(proj.params)[0]:
        keys = tuple(k.key for k in path)
        assert len(param_axes(family, keys)) == leaf.ndim, keys


def test_attention_in_query_blocks_is_exact():
    """Past `QUERY_BLOCKS_PAST` patches (Gemma 4's buckets of 512 tokens and up) attention runs
    in blocks of queries: the same values as in one piece, padding keys masked alike."""
    from tsjax.vision import vit

    p = vit.QUERY_BLOCKS_PAST + 5  # the last block mostly padding
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((1, p, 2, 8), np.float32)) for _ in range(3))
    mask = jnp.asarray(np.arange(p) < p - 300)[None]
    blocks = vit.full_attention(q, k, v, 0.3, mask)
    whole = vit._attention(q, k, v, 0.3, mask)
    assert blocks.shape == whole.shape == (1, p, 2, 8)
    np.testing.assert_allclose(np.asarray(blocks), np.asarray(whole), rtol=1e-5, atol=1e-6)


def test_fit_size(proj):
    for arr, want in IMAGES.values():
        h, w, _ = arr.shape
        assert fit_size(w, h, proj.config) == want, (w, h)
    assert fit_size(1500, 900, proj.config) == (1488, 912)  # 31 x 19 tokens: rounded only
    assert fit_size(3000, 1800, proj.config) == (2064, 1200)  # 63 x 38 > 1120: 43 x 25


def test_embeddings_match_transformers(tiny, proj):
    """Our whole encoder on our prepared pixels against transformers' Gemma4VisionModel +
    Gemma4MultimodalEmbedder on the same pixels."""
    for name, (arr, (w, h)) in IMAGES.items():
        img = proj.prepare(Image.fromarray(arr))
        assert img.pixels.shape == (h, w, 3), name
        (emb,) = proj.embed([img])
        assert emb.shape == (img.tokens, 64) and img.tokens == (h // 48) * (w // 48), name
        pixels = np.rint(img.pixels * 255).astype(np.uint8)  # x / 255 exactly: mean 0, std 1
        ref = hf_image_features(tiny, pixel_inputs(tiny, pixels))
        assert rel_err(emb, ref) < 1e-3, (name, rel_err(emb, ref))


def _copy(src, dst, *, flags=(), tensors=None):
    """A copy of the mmproj with boolean keys `flags` set true and `tensors` replaced."""
    import gguf

    r = gguf.GGUFReader(str(src))
    w = gguf.GGUFWriter(str(dst), "clip")
    for key, field in r.fields.items():
        if not key.startswith("GGUF.") and key != "general.architecture":
            sub = field.types[1] if len(field.types) > 1 else None
            w.add_key_value(key, field.contents(), field.types[0], sub)
    for key in flags:
        w.add_bool(key, True)
    for t in r.tensors:
        if t.name in (tensors or {}):
            w.add_tensor(t.name, tensors[t.name])
        else:
            w.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def _with_gelu_key(src, dst):
    """A copy of the mmproj with clip.use_gelu = true: llama.cpp then runs the tower's GELU
    in its tanh form, the model's (without the key, which Gemma 4's converter never writes,
    it runs quick GELU: 1.9e-2 away from transformers on this model)."""
    return _copy(src, dst, flags=["clip.use_gelu"])


def test_e2b_e4b_read_images_causally(tiny, tmp_path):
    """llama.cpp reads images causally for the text widths of E2B (1536) and E4B (2560) and
    bidirectionally for the others; the file says nothing else about it."""
    for width, bidirectional in [(1536, False), (2560, False), (5376, True)]:
        proj = np.zeros((width, 32), np.float32)
        path = _copy(tiny.mmproj["f32"], tmp_path / f"w{width}.gguf",
                     tensors={"mm.input_projection.weight": proj})  # fmt: skip
        cfg = PROJECTORS["gemma4v"].config(GGUFFile(path))
        assert (cfg.text_dim, cfg.bidirectional) == (width, bidirectional)


def _f16(x):
    return np.asarray(x, np.float16).astype(np.float32)


def test_embeddings_match_llama_cpp(tiny, proj, tmp_path):
    """llama.cpp's mtmd on the same RGB images, its own preprocessing: the same sizes and
    values. ggml's CPU convolution runs in float16 (im2col of the inputs, the kernel cast):
    2.6e-3 from ours (and transformers') as is; with our inputs 2x - 1 and patch kernel
    rounded to float16 alike, the rest of the graph agrees to 1e-4 (its GELU table aside)."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    mmproj = _with_gelu_key(tiny.mmproj["f32"], tmp_path / "mmproj-gelu.gguf")
    arrays = [a for a, _ in IMAGES.values()]
    try:
        refs = mtmd_image_embeddings(mmproj, tiny.gguf["f32"], arrays, tmp_path / "m.npz")
    except MtmdCrashed as e:
        pytest.skip(f"llama-cpp-python crashed (built for another CPU?): {e}")
    c = proj.config
    rounded = jax.tree_util.tree_map(lambda a: a, proj.params)
    w = rounded["tower"]["patch_embed"]["weight"]
    rounded["tower"]["patch_embed"]["weight"] = jnp.asarray(_f16(w))
    for (name, (arr, _)), ref in zip(IMAGES.items(), refs, strict=True):
        img = proj.prepare(Image.fromarray(arr))
        (ours,) = proj.embed([img])
        assert ours.shape == ref.shape == (img.tokens, 64), name
        assert rel_err(ours, ref) < 4e-3, (name, rel_err(ours, ref))
        x = (_f16(img.pixels * 2 - 1) + 1) / 2  # 2x - 1 of these is the float16 rounding
        inputs = [a[None] for a in pack(x, c, bucket_of(img.tokens, proj.token_buckets))]
        emulated = np.asarray(proj._forward(rounded, *inputs))[0, : img.tokens]
        assert rel_err(emulated, ref) < 1e-3, (name, rel_err(emulated, ref))


def _hf_ids(tiny, prompt) -> tuple[list[int], list[int]]:
    """Our prompt ids with each image's positions spelled <|image|> (transformers' image
    token), and the mm_token_type_ids marking them (its bidirectional blocks)."""
    ids, image = list(prompt.ids), tiny.special_ids["<|image|>"]
    types = [0] * len(ids)
    for span in prompt.spans:
        assert ids[span.start - 1] == tiny.special_ids["<|image>"]
        assert ids[span.end] == tiny.special_ids["<image|>"]
        ids[span.start : span.end] = [image] * span.length
        types[span.start : span.end] = [1] * span.length
    return ids, types


def test_logits_match_transformers(tiny, model):
    """One image inside the text: every position's logits against transformers with
    `use_bidirectional_attention = "vision"` (what llama.cpp does for every Gemma 4 but
    E2B/E4B: the image's tokens see each other on the sliding layers). The references differ
    from the causal run by far more than the tolerance, so the mask is pinned too."""
    import torch

    arr = IMAGES["as is 528x336"][0]
    msgs = [{"role": "system", "content": "Be brief."}, *chat("what is this", "<img>", "?")]
    prompt = model.chat_prompt(msgs, [Image.fromarray(arr)])
    (span,) = prompt.spans
    assert span.length == 77 and span.bidirectional
    ids, types = _hf_ids(tiny, prompt)
    inputs = pixel_inputs(tiny, arr)
    text_cfg = hf_model(tiny).config.get_text_config()
    causal = hf_multimodal_logits(tiny, ids, inputs)
    text_cfg.use_bidirectional_attention = "vision"
    try:
        ref = hf_multimodal_logits(tiny, ids, inputs, mm_token_type_ids=torch.tensor([types]))
    finally:
        text_cfg.use_bidirectional_attention = None
    ours = _forward(model, prompt)
    assert rel_err(ours, ref) < 1e-3, rel_err(ours, ref)
    assert rel_err(causal, ref) > 1e-2
    ours_causal = _forward(model, prompt, causal=True)
    assert rel_err(ours_causal, causal) < 1e-3


def test_layout_and_logits_match_llama_cpp(tiny, model, tmp_path):
    """llama.cpp's mtmd on the same GGUF pair and text: the same token sequence (<|image>,
    the image's tokens, <image|>) and last logits, within what its float16 GELU table (text,
    as `test_gemma4.test_llama_cpp_second_reference`: 2e-2) and convolution (image) make of
    these tiny logits: 1.3e-2 measured (transformers with the GELU table emulated: 1.2e-2).
    A causal image span is 0.45 away: llama.cpp reads this image bidirectionally too."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    arr = IMAGES["as is 528x336"][0]
    msgs = [{"role": "system", "content": "Be brief."}, *chat("describe", "<img>", "briefly")]
    text = model.template.render(inline_images(msgs))
    mmproj = _with_gelu_key(tiny.mmproj["f32"], tmp_path / "mmproj-gelu.gguf")
    try:
        seq, ref = mtmd_prompt(
            mmproj, tiny.gguf["f32"], text.replace(IMAGE_MARK, "<__media__>"), arr,
            tmp_path / "mtmd.npz",
        )  # fmt: skip
    except MtmdCrashed as e:
        pytest.skip(f"llama-cpp-python crashed (built for another CPU?): {e}")
    prompt = model.chat_prompt(msgs, [Image.fromarray(arr)])
    (span,) = prompt.spans
    assert [-1 if span.start <= i < span.end else t for i, t in enumerate(prompt.ids)] == seq
    assert rel_err(_forward(model, prompt)[-1], ref) < 2e-2
    assert rel_err(_forward(model, prompt, causal=True)[-1], ref) > 0.1
