"""Pixtral, Mistral 3's projector, on the tiny random Mistral 3 of `hf_factory` (3-layer tower,
16 px patches, 2 x 2 patch merger, [IMG_BREAK] row breaks): dynamic-resolution preprocessing,
the image embeddings against transformers (the HF weights the mmproj was converted from, the
same pixels) and llama.cpp's mtmd (its own preprocessing and layout), a prompt's logits against
both, and the encoder's token buckets (compiled once, padding exact). Every image is
non-square (rows != cols), so the row-break layout is pinned."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from conftest import rel_err
from hf_factory import build
from hf_reference import hf_image_features, hf_model, hf_multimodal_logits
from PIL import Image
from test_multimodal import _chat as chat
from test_multimodal import _forward
from vision_factory import MtmdCrashed, mtmd_image_embeddings, mtmd_prompt

from tsjax.model import load
from tsjax.vision import ImageTooLargeError, load_projector
from tsjax.vision.config import ResizeSpec
from tsjax.vision.dynamic import pack, token_buckets
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


# name -> (RGB image, the (width, height) llama.cpp resizes it to: 32 px a token)
IMAGES = {
    "wide 130x70": (_image(70, 130), (128, 64)),  # 4 x 2 tokens, letterboxed 119 -> 128 wide
    "tall 60x150": (_image(150, 60, 1), (64, 160)),  # 2 x 5 tokens
    "small 20x10": (_image(10, 20, 2), (128, 64)),  # 1 token: scaled up to the 8 fewest
    "as is 128x96": (_image(96, 128, 3), (128, 96)),  # 4 x 3 tokens, no resize
}
LARGE = (_image(900, 1500, 4), (1312, 768))  # 47 x 28 tokens > 1024: scaled down to 41 x 24


def _chat(*parts) -> list[dict]:
    """`test_multimodal._chat` with a short system prompt (the template's default one is
    over 300 tokens)."""
    return [{"role": "system", "content": "Be brief."}, *chat(*parts)]


@pytest.fixture(scope="module")
def tiny():
    return build("mistral3")


@pytest.fixture(scope="module")
def proj(tiny):
    return load_projector(tiny.mmproj["f32"])


@pytest.fixture(scope="module")
def model(tiny):
    return load(
        tiny.gguf["f32"], mmproj=tiny.mmproj["f32"].name, max_len=256, rows=2, progress=False,
        quant="f32",
    )  # fmt: skip


def test_config_from_mmproj(proj):
    c = proj.config
    assert (c.projector_type, c.patch_size, c.merge, c.align) == ("pixtral", 16, 2, 32)
    assert (c.dim, c.ffn_dim, c.n_layers, c.n_heads, c.head_dim) == (32, 64, 3, 2, 16)
    assert (c.text_dim, c.activation, c.proj_bias) == (64, "silu", False)
    assert c.norm_eps == pytest.approx(1e-5) and c.rope_theta == 10000.0
    assert c.dynamic and (c.min_tokens, c.max_tokens, c.row_break) == (8, 1024, True)
    assert (c.image_begin, c.image_end, c.bidirectional) == (None, "[IMG_END]", False)
    assert c.resize == ResizeSpec("bicubic", "ceil", (0, 0, 0))
    assert proj.token_buckets == (8, 16, 32, 64, 128, 256, 512, 1024) == token_buckets(8, 1024)
    assert proj.buckets == (1,)
    assert c.max_positions == 2047 and c.positions(64, 128) == 2 * 4 + 1
    with pytest.raises(ValueError, match="variable"):
        _ = proj.tokens_per_image
    family = PROJECTORS["pixtral"]
    for path, leaf in jax.tree_util.tree_flatten_with_path(proj.params)[0]:
        keys = tuple(k.key for k in path)
        assert len(param_axes(family, keys)) == leaf.ndim, keys


def test_fit_size(proj):
    """llama.cpp's sizes (checked against mtmd by the shapes in the llama.cpp test)."""
    for arr, want in [*IMAGES.values(), LARGE]:
        h, w, _ = arr.shape
        assert fit_size(w, h, proj.config) == want, (w, h)
    with pytest.raises(ImageTooLargeError, match="aspect ratio"):
        fit_size(40000, 20, proj.config)  # would be 1250 x 1 tokens


def _split(emb: np.ndarray, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """Prompt embeddings -> (image tokens [rows*cols, D], the breaks [rows-1, D])."""
    is_break = (np.arange(len(emb)) + 1) % (cols + 1) == 0
    assert len(emb) == rows * cols + rows - 1 and is_break.sum() == rows - 1
    return emb[~is_break], emb[is_break]


def _hf_inputs(pixels: list[np.ndarray]) -> dict:
    """Prepared pixels [H, W, 3] each -> Mistral 3's pixel_values (zero-padded to the largest
    sides) and image_sizes."""
    import torch

    h, w = max(p.shape[0] for p in pixels), max(p.shape[1] for p in pixels)
    batch = np.zeros((len(pixels), 3, h, w), np.float32)
    for i, p in enumerate(pixels):
        batch[i, :, : p.shape[0], : p.shape[1]] = p.transpose(2, 0, 1)
    sizes = [list(p.shape[:2]) for p in pixels]
    return {"pixel_values": torch.from_numpy(batch), "image_sizes": torch.tensor(sizes)}


def test_embeddings_match_transformers(tiny, proj):
    """Our whole encoder on our prepared pixels against transformers' Pixtral tower + Mistral
    3 projector on the same pixels; the breaks are the text model's [IMG_BREAK] embedding."""
    brk_id = tiny.special_ids["[IMG_BREAK]"]
    brk = hf_model(tiny).get_input_embeddings().weight[brk_id].detach().numpy()
    for name, (arr, (w, h)) in IMAGES.items():
        img = proj.prepare(Image.fromarray(arr))
        assert img.pixels.shape == (h, w, 3), name
        (emb,) = proj.embed([img])
        rows, cols = h // 32, w // 32
        assert emb.shape == (img.tokens, 64) and img.tokens == rows * cols + rows - 1
        tokens, breaks = _split(emb, rows, cols)
        np.testing.assert_array_equal(breaks, np.broadcast_to(brk, breaks.shape))
        ref = hf_image_features(tiny, _hf_inputs([img.pixels]))
        assert rel_err(tokens, ref) < 1e-3, name


def test_embeddings_match_llama_cpp(tiny, proj, tmp_path):
    """llama.cpp's mtmd on the same RGB images and mmproj, preprocessing on its side: the same
    layout (rows of tokens, a break after each but the last) and values; the f16 file too.

    mtmd's break rows are an uninitialised tensor times 0 plus the embedding, NaN now and then
    (garbage NaN x 0): those are compared only where finite. The tokens differ by up to 8.5e-4
    (f32 file) because llama.cpp's projector GELU is the tanh form through an fp16 table and
    the model's (transformers') is erf, which tsjax runs."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    arrays = [a for a, _ in [*IMAGES.values(), LARGE]]
    for kind in ("f32", "f16"):
        p = proj if kind == "f32" else load_projector(tiny.mmproj[kind])
        ours = p.embed([p.prepare(Image.fromarray(a)) for a in arrays])
        try:
            ref = mtmd_image_embeddings(
                tiny.mmproj[kind], tiny.gguf["f32"], arrays, tmp_path / "m.npz"
            )
        except MtmdCrashed as e:
            pytest.skip(f"llama-cpp-python crashed (built for another CPU?): {e}")
        for (name, (_, (w, h))), o, r in zip(
            [*IMAGES.items(), ("large", LARGE)], ours, ref, strict=True
        ):
            assert o.shape == r.shape, f"{kind} {name}"
            tokens, breaks = _split(o, h // 32, w // 32)
            ref_tokens, ref_breaks = _split(r, h // 32, w // 32)
            assert np.isfinite(ref_tokens).all()
            assert rel_err(tokens, ref_tokens) < 1e-3, (
                f"{kind} {name}: {rel_err(tokens, ref_tokens):.2e}"
            )
            finite = np.isfinite(ref_breaks)
            np.testing.assert_array_equal(breaks[finite], ref_breaks[finite])


def test_buckets_compile_once_and_pad_exactly(proj):
    """The warm-up compiles every token bucket; then images of any size compile nothing, and
    an image padded to a larger bucket gives the same tokens (padding is masked out)."""
    before = proj.compiled_count()
    proj.warmup()
    compiled = proj.compiled_count()
    assert compiled - before <= len(proj.token_buckets)  # 8: (8, 16, ..., 1024)
    prepared = [proj.prepare(Image.fromarray(a)) for a, _ in IMAGES.values()]
    proj.embed(prepared)
    assert proj.compiled_count() == compiled
    img = prepared[0]  # 8 tokens: bucket 8, and padded into 64
    small = [a[None] for a in pack(img.pixels, proj.config, 8)]
    big = [a[None] for a in pack(img.pixels, proj.config, 64)]
    a = np.asarray(proj._forward(proj.params, *small))[0]
    b = np.asarray(proj._forward(proj.params, *big))[0, :8]
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _hf_ids(tiny, prompt, pixels) -> list[int]:
    """Our prompt ids with each image span spelled as Mistral 3's processor does: [IMG] per
    token, [IMG_BREAK] after each row but the last (its [IMG_END] is in our ids already)."""
    ids, sid = list(prompt.ids), tiny.special_ids
    for span, px in zip(prompt.spans, pixels, strict=True):
        cols = px.shape[1] // 32
        for j in range(span.length):
            ids[span.start + j] = sid["[IMG_BREAK]"] if (j + 1) % (cols + 1) == 0 else sid["[IMG]"]
        assert ids[span.end] == sid["[IMG_END]"]
    return ids


def test_logits_match_transformers(tiny, model):
    """Two images of different sizes inside the text (causal attention throughout, as the
    references): every position's logits."""
    arrays = [IMAGES["wide 130x70"][0], IMAGES["tall 60x150"][0]]
    msgs = _chat("what is in the picture", "<img>", "and in this one", "<img>", "compare")
    prompt = model.chat_prompt(msgs, [Image.fromarray(a) for a in arrays])
    pixels = [model.projector.prepare(Image.fromarray(a)).pixels for a in arrays]
    ids = _hf_ids(tiny, prompt, pixels)
    ref = hf_multimodal_logits(tiny, ids, _hf_inputs(pixels))
    assert rel_err(_forward(model, prompt), ref) < 1e-3


def test_layout_and_logits_match_llama_cpp(tiny, model, tmp_path):
    """llama.cpp's mtmd on the same GGUF pair and text: the same token sequence (the image's
    rows with their breaks, then [IMG_END]) and last logits."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    arr = IMAGES["tall 60x150"][0]
    msgs = _chat("describe the picture", "<img>", "in a few words")
    text = model.template.render(inline_images(msgs))
    try:
        seq, ref = mtmd_prompt(
            tiny.mmproj["f32"], tiny.gguf["f32"], text.replace(IMAGE_MARK, "<__media__>"), arr,
            tmp_path / "mtmd.npz",
        )  # fmt: skip
    except MtmdCrashed as e:
        pytest.skip(f"llama-cpp-python crashed (built for another CPU?): {e}")
    prompt = model.chat_prompt(msgs, [Image.fromarray(arr)])
    (span,) = prompt.spans
    assert span.length == 5 * 2 + 4
    assert [-1 if span.start <= i < span.end else t for i, t in enumerate(prompt.ids)] == seq
    logits = _forward(model, prompt)[-1]
    assert rel_err(logits, ref) < 1e-3
