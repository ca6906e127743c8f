"""Gemma 3's projector: mmproj loading, preprocessing as llama.cpp does it, and image
embeddings against transformers (the HF weights the mmproj was converted from) and llama.cpp's
mtmd (the same mmproj), on non-square images so that the letterbox is exercised."""

from __future__ import annotations

import importlib.util
import io
import math
import struct
import zlib

import jax
import numpy as np
import pytest
from conftest import rel_err
from PIL import Image
from vision_factory import (
    IMAGE_MEAN,
    IMAGE_STD,
    TEXT_DIM,
    TOKENS_PER_IMAGE,
    VISION,
    MtmdCrashed,
    hf_image_features,
    mtmd_image_embeddings,
)

from tsjax.gguf import GGUFError
from tsjax.vision import (
    EmptyImageError,
    ImageError,
    ImageTooLargeError,
    NotAnImageError,
    TruncatedImageError,
    load_projector,
    open_image,
)
from tsjax.vision.config import ResizeSpec
from tsjax.vision.preprocess import letterbox, normalize, scaled_size
from tsjax.vision.sharding import VisionShardingPlan, param_axes

pytestmark = pytest.mark.slow  # transformers + llama.cpp's converter build the model

SIZE = VISION["image_size"]


def _images() -> dict[str, np.ndarray]:
    """RGB uint8 [H, W, 3]: wide and tall (letterboxed both ways), smaller and larger than the
    input (resampled up and down), and one already the input's size (no resize)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:77, 0:30]
    gradient = np.stack([xx * 8.1 % 256, yy * 3.3 % 256, (xx + yy) * 2.2 % 256], -1)
    return {
        "wide 90x40": rng.integers(0, 256, (40, 90, 3), dtype=np.uint8),
        "tall 30x77": gradient.astype(np.uint8),
        "small 7x5": rng.integers(0, 256, (5, 7, 3), dtype=np.uint8),
        "large 150x101": rng.integers(0, 256, (101, 150, 3), dtype=np.uint8),
        "square 56x56": rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8),
        # float32 sizing: 13 * float32(56/26) rounds above 28, so llama.cpp resizes to 29x56
        "f32-sized 13x26": rng.integers(0, 256, (26, 13, 3), dtype=np.uint8),
    }


IMAGES = _images()


@pytest.fixture(scope="module")
def tiny(tiny_vision):
    return tiny_vision


@pytest.fixture(scope="module")
def proj(tiny):
    return load_projector(tiny.mmproj, buckets=(1, 2, 4, 8))


# -- an independent reference of the preprocessing (numpy, from llama.cpp's description) ------


def _ref_weights(n_in: int, n_out: int) -> list[tuple[int, np.ndarray]]:
    """Bilinear (triangle) filter taps per output pixel, widened when downsampling, in
    llama.cpp's `resize_pillow` fixed point (22 fractional bits)."""
    scale = n_in / n_out
    fs = max(scale, 1.0)
    support = fs
    out = []
    for i in range(n_out):
        centre = (i + 0.5) * scale
        lo = max(int(centre - support + 0.5), 0)
        hi = min(int(centre + support + 0.5), n_in)
        w = [max(0.0, 1.0 - abs((j + lo - centre + 0.5) * (1.0 / fs))) for j in range(hi - lo)]
        total = sum(w)  # left to right, as the C loop
        k = [math.trunc(v / total * (1 << 22) + 0.5) for v in w]
        out.append((lo, np.array(k, np.int64)))
    return out


def _ref_pass(a: np.ndarray, n_out: int, axis: int) -> np.ndarray:
    a = np.moveaxis(a, axis, 0).astype(np.int64)
    res = np.empty((n_out,) + a.shape[1:], np.int64)
    for i, (lo, k) in enumerate(_ref_weights(a.shape[0], n_out)):
        acc = (1 << 21) + np.tensordot(k, a[lo : lo + len(k)], axes=(0, 0))
        res[i] = np.clip(acc >> 22, 0, 255)
    return np.moveaxis(res, 0, axis).astype(np.uint8)


def _ref_letterbox(img: np.ndarray, size: int) -> np.ndarray:
    """llama.cpp's fixed-size preprocessing (PAD_CEIL, black): scale and sizes in float32,
    horizontal pass, then vertical, centred by integer division."""
    h, w, _ = img.shape
    if (h, w) == (size, size):
        return img.copy()
    s = min(np.float32(size) / np.float32(w), np.float32(size) / np.float32(h))
    nw = min(int(np.ceil(np.float32(w) * s)), size)
    nh = min(int(np.ceil(np.float32(h) * s)), size)
    r = img if nw == w else _ref_pass(img, nw, 1)
    r = r if nh == h else _ref_pass(r, nh, 0)
    out = np.zeros((size, size, 3), np.uint8)
    top, left = (size - nh) // 2, (size - nw) // 2
    out[top : top + nh, left : left + nw] = r
    return out


def _hf_pixels(boxed: np.ndarray) -> np.ndarray:
    """transformers' Gemma 3 image processor on an image already at the input size:
    rescale and normalize only. Returns [S, S, 3]."""
    from transformers import Gemma3ImageProcessorPil

    proc = Gemma3ImageProcessorPil(
        size={"height": SIZE, "width": SIZE},
        image_mean=IMAGE_MEAN,
        image_std=IMAGE_STD,
        do_pan_and_scan=False,
    )
    pv = proc(Image.fromarray(boxed), return_tensors="np")["pixel_values"][0]
    return np.asarray(pv, np.float32).transpose(1, 2, 0)


# -- the projector ---------------------------------------------------------------------------


def test_config_from_mmproj(proj):
    c = proj.config
    assert (c.projector_type, c.image_size, c.patch_size) == ("gemma3", SIZE, VISION["patch_size"])
    assert (c.dim, c.ffn_dim, c.n_layers) == (32, 48, 2)
    assert (c.n_heads, c.head_dim, c.text_dim) == (2, 16, TEXT_DIM)
    assert c.merge == 2 and c.tokens_per_image == TOKENS_PER_IMAGE == proj.tokens_per_image
    assert c.activation == "gelu_tanh" and c.norm_eps == pytest.approx(1e-6)
    np.testing.assert_allclose(c.image_mean, IMAGE_MEAN, rtol=1e-6)
    np.testing.assert_allclose(c.image_std, IMAGE_STD, rtol=1e-6)
    assert c.resize == ResizeSpec("bilinear", "ceil", (0, 0, 0))
    assert (c.image_begin, c.image_end, c.bidirectional) == (
        "<start_of_image>",
        "<end_of_image>",
        True,
    )


def test_embeddings_match_transformers(tiny, proj):
    """The whole path (Pillow decode, letterbox, normalize, encoder) against independent
    references: the numpy letterbox, transformers' normalization and its Gemma 3 tower +
    projector on the HF weights."""
    ours = np.asarray(proj.encode_images([Image.fromarray(a) for a in IMAGES.values()]))
    assert ours.shape == (len(IMAGES), TOKENS_PER_IMAGE, TEXT_DIM)
    ref_pixels = np.stack([_hf_pixels(_ref_letterbox(a, SIZE)) for a in IMAGES.values()])
    ref = hf_image_features(tiny.hf_dir, ref_pixels)
    for name, o, r in zip(IMAGES, ours, ref, strict=True):
        assert rel_err(o, r) < 1e-3, name


def test_embeddings_match_llama_cpp(tiny, proj, tmp_path):
    """Same mmproj, same RGB pixels: llama.cpp's mtmd preprocesses and encodes on its side.
    Also the f16 file (real mmproj files are f16)."""
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python is not installed (pip install '.[bench]')")
    arrays = list(IMAGES.values())
    for path in (tiny.mmproj, tiny.mmproj_f16):
        p = proj if path == tiny.mmproj else load_projector(path)
        ours = np.asarray(p.encode_images([Image.fromarray(a) for a in arrays]))
        try:
            ref = mtmd_image_embeddings(path, tiny.text_gguf, arrays, tmp_path / "mtmd.npz")
        except MtmdCrashed as e:
            pytest.skip(f"llama-cpp-python crashed (built for another CPU? rebuild portable): {e}")
        for name, o, r in zip(IMAGES, ours, ref, strict=True):
            assert r.shape == o.shape, name
            assert rel_err(o, r) < 1e-3, f"{path.name}: {name}"


def test_encode_buckets(proj):
    """Image counts pad to a bucket (one compile each); padding never leaks into real rows;
    batches past the largest bucket run in chunks."""
    px = np.stack([proj.prepare(Image.fromarray(a)).pixels for a in IMAGES.values()])
    px = np.concatenate([px, px])[:9]  # 9 images: a chunk of 8 and one of 1
    fwd = proj._forward
    before = fwd._cache_size()
    one = np.asarray(proj.encode(px[:1]))
    np.testing.assert_array_equal(np.asarray(proj.encode(px[:1])), one)
    three = np.asarray(proj.encode(px[:3]))
    nine = np.asarray(proj.encode(px))
    assert fwd._cache_size() - before <= 3  # buckets 1, 4 and 8, each compiled once
    assert three.shape == (3, TOKENS_PER_IMAGE, TEXT_DIM) and nine.shape[0] == 9
    np.testing.assert_allclose(three[0], one[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(nine[:3], three, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(nine[len(IMAGES) :], nine[: 9 - len(IMAGES)], rtol=1e-5, atol=1e-6)
    assert proj.encode(px[:0]).shape == (0, TOKENS_PER_IMAGE, TEXT_DIM)
    with pytest.raises(ValueError, match="pixels must be"):
        proj.encode(px[:, :10])


def test_param_axes_and_sharded_load(tiny, proj):
    from tsjax.vision.projector import PROJECTORS

    family = PROJECTORS["gemma3"]
    for path, leaf in jax.tree_util.tree_flatten_with_path(proj.params)[0]:
        keys = tuple(k.key for k in path)
        assert len(param_axes(family, keys)) == leaf.ndim, keys
    abstract = jax.sharding.AbstractMesh((2, 2), ("dp", "tp"))
    plan = VisionShardingPlan(abstract, proj.config)
    q = plan.named(param_axes(family, ("vit", "layers", "attn", "q", "weight")))
    assert tuple(q.spec) == (None, "tp")  # [L, N*H, D]: heads over tp
    down = plan.named(param_axes(family, ("vit", "layers", "mlp", "down", "weight")))
    assert tuple(down.spec) == (None, None, "tp")  # [L, D, F]: row-split
    assert tuple(plan.images(4).spec) == ("dp",) and tuple(plan.images(3).spec) == ()
    mesh = jax.make_mesh((1, 1), ("dp", "tp"))
    sharded = load_projector(
        tiny.mmproj, device_put=VisionShardingPlan(mesh, proj.config).device_put
    )
    px = proj.prepare(Image.fromarray(IMAGES["wide 90x40"])).pixels[None]
    np.testing.assert_allclose(
        np.asarray(sharded.encode(px)), np.asarray(proj.encode(px)), rtol=1e-6, atol=1e-7
    )


# -- preprocessing ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "w,h", [(90, 40), (30, 77), (7, 5), (150, 101), (37, 100), (56, 20), (300, 13), (1, 1)]
)
def test_letterbox_matches_reference(w, h):
    img = np.random.default_rng(w * 1000 + h).integers(0, 256, (h, w, 3), dtype=np.uint8)
    ours = np.asarray(letterbox(Image.fromarray(img), SIZE, ResizeSpec()))
    np.testing.assert_array_equal(ours, _ref_letterbox(img, SIZE))


def test_scaled_size_uses_float32_arithmetic():
    # llama.cpp computes in float32: 600 * (896/800) is 672.0 there (672.0000000000001 in
    # float64, whose ceil is 673) and 13 * (56/26) is 28.000002 (28.0 in float64)
    assert scaled_size(800, 600, 896, "ceil") == (896, 672)
    assert scaled_size(13, 26, SIZE, "ceil") == (29, SIZE)
    assert scaled_size(96, 48, 64, "ceil") == (64, 32)
    assert scaled_size(100, 37, 64, "ceil") == (64, 24)
    assert scaled_size(5, 7, 896, "ceil") == (640, 896)
    assert scaled_size(96, 48, 64, "nearest") == (64, 32)


def test_normalize_is_float32():
    img = np.random.default_rng(3).integers(0, 256, (4, 6, 3), dtype=np.uint8)
    mean, std = np.float32(IMAGE_MEAN), np.float32(IMAGE_STD)
    want = (img.astype(np.float32) / np.float32(255) - mean) / std
    np.testing.assert_array_equal(normalize(Image.fromarray(img), IMAGE_MEAN, IMAGE_STD), want)


def _encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def test_colour_modes_become_rgb():
    rng = np.random.default_rng(4)
    rgba = rng.integers(0, 256, (6, 5, 4), dtype=np.uint8)
    # alpha dropped, not composited (stb_image's 3-channel load)
    got = np.asarray(open_image(_encode(Image.fromarray(rgba, "RGBA"))))
    np.testing.assert_array_equal(got, rgba[..., :3])
    grey = rgba[..., 0]
    np.testing.assert_array_equal(
        np.asarray(open_image(_encode(Image.fromarray(grey, "L")))),
        np.repeat(grey[..., None], 3, 2),
    )
    la = Image.fromarray(rgba[..., :2].copy(), "LA")
    np.testing.assert_array_equal(np.asarray(open_image(_encode(la)))[..., 1], rgba[..., 0])
    pal = Image.fromarray(rgba[..., :3].copy()).convert("P", palette=Image.Palette.ADAPTIVE)
    np.testing.assert_array_equal(
        np.asarray(open_image(_encode(pal))), np.asarray(pal.convert("RGB"))
    )
    deep = (rng.integers(0, 65536, (6, 5))).astype(np.uint16)  # 16-bit greyscale PNG
    got = np.asarray(open_image(_encode(Image.fromarray(deep))))
    np.testing.assert_array_equal(got[..., 0], (deep >> 8).astype(np.uint8))
    cmyk = Image.fromarray(rgba, "RGBA").convert("CMYK")
    assert open_image(_encode(cmyk, "TIFF")).mode == "RGB"


def test_exif_orientation_is_applied():
    img = np.random.default_rng(5).integers(0, 256, (4, 7, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display it turned 90 degrees clockwise
    data = _encode(Image.fromarray(img), exif=exif)
    got = np.asarray(open_image(data))
    np.testing.assert_array_equal(got, np.rot90(img, k=-1))


def _png_with_size(png: bytes, w: int, h: int) -> bytes:
    """The PNG with its IHDR claiming w x h (pixel data unchanged)."""
    chunk = b"IHDR" + struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return png[:8] + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk)) + png[33:]


_NOISE = Image.fromarray(np.random.default_rng(6).integers(0, 256, (60, 80, 3), dtype=np.uint8))
_PNG, _JPEG = _encode(_NOISE), _encode(_NOISE, "JPEG", quality=90)


@pytest.mark.parametrize(
    "data,error,words",
    [
        (b"", EmptyImageError, "empty"),
        (b"hello, not a picture " * 20, NotAnImageError, "no format"),
        (_PNG[: len(_PNG) // 2], TruncatedImageError, "truncated"),
        (_JPEG[: len(_JPEG) // 2], TruncatedImageError, "truncated"),
        (_png_with_size(_PNG, 0, 60), NotAnImageError, "corrupt or truncated PNG"),
        (_png_with_size(_PNG, 100_000, 100_000), ImageTooLargeError, "too large"),
        (_encode(Image.new("L", (40_000, 1))), ImageTooLargeError, "longer than"),
    ],
    ids=["empty", "text", "png-truncated", "jpeg-truncated", "zero-width", "bomb", "absurd"],
)
def test_bad_images_are_refused(proj, data, error, words):
    with pytest.raises(error, match=words) as e:
        proj.prepare(data)
    assert isinstance(e.value, ImageError) and isinstance(e.value, ValueError)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_decompression_bomb_limit_is_pillows(monkeypatch, proj):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)  # 80x60 = 4800: over, under twice
    with pytest.raises(ImageTooLargeError, match="decompression bomb"):
        proj.prepare(_PNG)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)  # over twice: Pillow's own error
    with pytest.raises(ImageTooLargeError, match="too large"):
        proj.prepare(_PNG)


def test_other_formats_decode(proj):
    for fmt in ("GIF", "WEBP", "BMP", "JPEG"):
        assert proj.prepare(_encode(_NOISE, fmt)).size == (80, 60), fmt
    a, b = proj.prepare(_PNG), proj.prepare(_encode(_NOISE, "BMP"))
    assert a.digest == b.digest  # same pixels, same cache key
    assert a.digest != proj.prepare(_JPEG).digest


# -- bad projector files ---------------------------------------------------------------------


def _rewrite(src, dst, *, kv=None, drop=(), add=None):
    """A copy of the GGUF `src` with metadata values replaced, tensors dropped or added."""
    import gguf

    r = gguf.GGUFReader(str(src))
    w = gguf.GGUFWriter(str(dst), "clip")
    for key, field in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        sub = field.types[1] if len(field.types) > 1 else None
        w.add_key_value(key, (kv or {}).get(key, field.contents()), field.types[0], sub)
    for t in r.tensors:
        if t.name not in drop:
            w.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    for name, arr in (add or {}).items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def test_bad_projector_files(tiny, tmp_path):
    with pytest.raises(GGUFError, match="not a multimodal projector"):
        load_projector(tiny.text_gguf)
    other = _rewrite(tiny.mmproj, tmp_path / "q.gguf", kv={"clip.projector_type": "qwen3vl"})
    # (the list grows with the families: Pixtral after Gemma 3, sorted)
    with pytest.raises(
        GGUFError, match=r"'qwen3vl' is not supported \(supported: gemma3, gemma4v, pixtral"
    ):
        load_projector(other)
    missing = _rewrite(tiny.mmproj, tmp_path / "m.gguf", drop={"v.blk.1.attn_k.bias"})
    with pytest.raises(GGUFError, match=r"missing tensors \['v.blk.1.attn_k.bias'\]"):
        load_projector(missing)
    extra = _rewrite(
        tiny.mmproj, tmp_path / "e.gguf", add={"v.pre_ln.weight": np.ones(32, np.float32)}
    )
    with pytest.raises(GGUFError, match=r"v.pre_ln.weight.*not supported"):
        load_projector(extra)
    plain = load_projector(tiny.mmproj)
    assert plain.buckets == ((1,) if jax.default_backend() == "cpu" else (1, 2, 4, 8))
    with pytest.raises(GGUFError, match="belongs to another model"):
        plain.check_text_dim(640)
