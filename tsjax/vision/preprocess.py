"""Images -> the vision encoder's input, with Pillow, exactly as llama.cpp's mtmd does it.

1. Decode anything Pillow reads (the first frame of an animation), refusing what is not an
   image, is truncated, has no pixels, or is too big (Pillow's decompression-bomb limit,
   `Image.MAX_IMAGE_PIXELS`, and a longest side): each with an `ImageError` naming it.
2. Apply the EXIF orientation, as a browser shows the picture. (llama.cpp's stb_image ignores
   EXIF; for images without an orientation tag the two agree.)
3. RGB: alpha is dropped (not composited), palettes expanded, greyscale replicated, 16-bit
   samples keep their high byte, as stb_image's 3-channel load does.
4. Resize with the aspect ratio kept and letterbox onto the encoder's input (`ResizeSpec`):
   llama.cpp's `img_tool::resize` computes the scale and the scaled size in float32 and
   resamples with its port of Pillow's fixed-point separable filters, so `Image.resize` is the
   same computation, bit for bit. The input is the fixed image_size square, or for a
   dynamic-resolution family (Pixtral) a size of the image's own aspect ratio, each side a
   multiple of the pixels per token, within the family's token limits (`fit_size`).
5. x / 255, then (x - mean) / std per channel, in float32.
"""

from __future__ import annotations

import hashlib
import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from tsjax.vision.config import ResizeSpec, VisionConfig

ImageSource = bytes | bytearray | memoryview | str | Path | Image.Image

RESAMPLE = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


class ImageError(ValueError):
    """An image the server cannot use; the message says why (a client error, HTTP 400)."""


class NotAnImageError(ImageError):
    pass


class TruncatedImageError(ImageError):
    pass


class EmptyImageError(ImageError):
    pass


class ImageTooLargeError(ImageError):
    pass


@dataclass(frozen=True)
class ImageLimits:
    """max_pixels None: Pillow's `Image.MAX_IMAGE_PIXELS` when the image is opened."""

    max_side: int = 32768
    max_pixels: int | None = None


@dataclass(frozen=True)
class PreparedImage:
    """pixels: [H, W, 3] float32, normalized (the fixed [S, S, 3] of a fixed-size family).
    digest: sha256 of the letterboxed RGB bytes and their size (what the encoder sees; the key
    a prefix cache remembers the image by). size: the decoded image's (width, height) after
    EXIF orientation. tokens: the prompt positions its embeddings fill
    (`VisionConfig.positions`)."""

    pixels: np.ndarray
    digest: str
    size: tuple[int, int]
    tokens: int = 0


def open_image(source: ImageSource, limits: ImageLimits = ImageLimits()) -> Image.Image:
    """Decode `source` (encoded bytes, a file path, or a PIL image) into an RGB PIL image with
    its EXIF orientation applied. Raises an `ImageError` subclass naming the problem."""
    if isinstance(source, Image.Image):
        img = source
    else:
        data = _read(source)
        if not data:
            raise EmptyImageError("the image is empty (0 bytes)")
        try:
            # Pillow warns (DecompressionBombWarning) past MAX_IMAGE_PIXELS and raises past
            # twice that; `_check_size` below refuses the former before any pixel decodes.
            # (No warnings.catch_warnings: it swaps process-wide state, racing other threads.)
            img = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as e:
            raise ImageTooLargeError(f"the image is too large: {e}") from None
        except UnidentifiedImageError:
            kind = _sniff(data)
            if kind:
                raise NotAnImageError(
                    f"a corrupt or truncated {kind} image: its header is unreadable"
                ) from None
            raise NotAnImageError(
                f"not an image: the data ({len(data)} bytes) is in no format Pillow reads"
            ) from None
        except (OSError, SyntaxError, ValueError) as e:
            raise NotAnImageError(f"not a readable image: {e}") from None
    _check_size(img.size, limits)
    try:
        img.load()
    except Image.DecompressionBombError as e:
        raise ImageTooLargeError(f"the image is too large: {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        if "truncated" in str(e) or isinstance(e, EOFError):
            raise TruncatedImageError(f"the image is truncated: {e}") from None
        raise ImageError(f"cannot decode the {img.format or ''} image: {e}") from None
    img = _exif_upright(img)
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> "RGB", as stb_image's 3-channel load converts."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        a = np.asarray(img, dtype=np.float64 if img.mode == "F" else np.int64)
        if img.mode != "F":  # 16-bit samples (PNG greyscale opens as I or I;16): high byte
            a = a >> 8
        img = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "L")
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as e:
        raise ImageError(f"unsupported colour mode {img.mode}: {e}") from None


def scaled_size(width: int, height: int, target: int, pad: str) -> tuple[int, int]:
    """The size the image is resized to before a square letterbox (`scaled_box`)."""
    return scaled_box(width, height, target, target, pad)


def scaled_box(width: int, height: int, tw: int, th: int, pad: str) -> tuple[int, int]:
    """The size the image is resized to before the letterbox onto tw x th, in llama.cpp's
    float32 arithmetic (`img_tool::resize`): PAD_CEIL rounds up, PAD_NEAREST to nearest."""
    if pad == "none":
        return tw, th
    w, h = np.float32(width), np.float32(height)
    scale = min(np.float32(tw) / w, np.float32(th) / h)
    rnd = math.ceil if pad == "ceil" else _round_half_away
    return min(int(rnd(w * scale)), tw), min(int(rnd(h * scale)), th)


def resample(img: Image.Image, width: int, height: int, algo: str) -> Image.Image:
    """Resize as llama.cpp's `resize_pillow`: Pillow's separable fixed-point filters, the
    horizontal pass first, its output rounded to 8 bits, then the vertical pass. Pillow 13's
    own two-pass `resize` may run the vertical pass first, which moves some pixels by one
    level, so each pass is its own single-axis `resize` here."""
    filt = RESAMPLE[algo]
    if img.width != width:
        img = img.resize((width, img.height), filt)
    if img.height != height:
        img = img.resize((width, height), filt)
    return img


def letterbox(img: Image.Image, size: int | tuple[int, int], spec: ResizeSpec) -> Image.Image:
    """An RGB image -> an RGB image of `size` (a square side, or (width, height)): resized
    with the aspect ratio kept and centred on `spec.pad_color` (or stretched, pad "none")."""
    tw, th = (size, size) if isinstance(size, int) else size
    if img.size == (tw, th):
        return img.copy()
    nw, nh = scaled_box(img.width, img.height, tw, th, spec.pad)
    resized = resample(img, nw, nh, spec.algo)
    if spec.pad == "none":
        return resized
    if spec.pad == "ceil":
        left, top = (tw - nw) // 2, (th - nh) // 2
    else:
        left, top = _round_half_away((tw - nw) / 2), _round_half_away((th - nh) / 2)
    canvas = Image.new("RGB", (tw, th), spec.pad_color)
    canvas.paste(resized, (left, top))
    return canvas


def fit_size(width: int, height: int, cfg: VisionConfig) -> tuple[int, int]:
    """The (width, height) a dynamic-resolution family resizes an image to, in llama.cpp's
    float32 arithmetic (`img_tool::calc_size_preserved_ratio`, transformers' "smart resize"):
    each side rounded to a multiple of `cfg.align`; if that makes more than max_tokens
    tokens, both sides scaled down by one factor and floored, if fewer than min_tokens,
    scaled up and ceiled. An image so narrow that its short side would be under one token
    after scaling (an aspect ratio past max_tokens : 1) is an `ImageTooLargeError`: llama.cpp
    would give it more than max_tokens tokens."""
    align = cfg.align
    max_px, min_px = cfg.max_tokens * align**2, cfg.min_tokens * align**2
    w, h = np.float32(width), np.float32(height)

    def by(x, rnd) -> int:  # a multiple of align: x / align in float32, rounded in C's way
        return int(rnd(float(np.float32(x) / np.float32(align)))) * align

    wb = max(align, by(w, _round_half_away))
    hb = max(align, by(h, _round_half_away))
    if wb * hb > max_px:
        beta = np.sqrt(h * w / np.float32(max_px), dtype=np.float32)
        hb, wb = by(h / beta, math.floor), by(w / beta, math.floor)
        if min(hb, wb) < align:
            raise ImageTooLargeError(
                f"the image is {width}x{height}: an aspect ratio over {cfg.max_tokens}:1 is"
                " refused (its short side would be under one image token)"
            )
    elif min_px > 0 and wb * hb < min_px:
        beta = np.sqrt(np.float32(min_px) / (h * w), dtype=np.float32)
        hb, wb = by(h * beta, math.ceil), by(w * beta, math.ceil)
    return wb, hb


def budget_size(width: int, height: int, cfg: VisionConfig, tokens: int) -> tuple[int, int]:
    """The (width, height) a video frame is resized to when it may take at most `tokens`
    positions, as transformers' `Gemma4VideoProcessor` sizes frames (its `max_soft_tokens`,
    70): the image's aspect ratio scaled, up or down, to `tokens` tokens' worth of pixels,
    each side then floored to a multiple of `cfg.align`; a side that floors to nothing gets
    one token and the other side the whole ratio (at most `tokens`)."""
    align = cfg.align
    factor = math.sqrt(tokens * align**2 / (width * height))
    wb = math.floor(width * factor / align) * align
    hb = math.floor(height * factor / align) * align
    if hb == 0:
        hb, wb = align, min(math.floor(width / height), tokens) * align
    elif wb == 0:
        wb, hb = align, min(math.floor(height / width), tokens) * align
    return wb, hb


def normalize(img: Image.Image, mean, std) -> np.ndarray:
    """RGB image -> [H, W, 3] float32 (x / 255 - mean) / std, in float32 as llama.cpp."""
    x = np.asarray(img, dtype=np.uint8).astype(np.float32) / np.float32(255.0)
    return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def prepare_image(
    source: ImageSource,
    cfg: VisionConfig,
    limits: ImageLimits = ImageLimits(),
    max_tokens: int | None = None,
) -> PreparedImage:
    """Decode, orient, letterbox and normalize one image for a projector with config `cfg`.
    `max_tokens` (a dynamic family's video frame): sized by `budget_size` instead."""
    img = open_image(source, limits)
    if cfg.dynamic and max_tokens:
        target = budget_size(img.width, img.height, cfg, min(max_tokens, cfg.max_tokens))
    elif cfg.dynamic:
        target = fit_size(img.width, img.height, cfg)
    else:
        target = cfg.image_size
    boxed = letterbox(img, target, cfg.resize)
    raw = boxed.tobytes()
    digest = hashlib.sha256(f"{boxed.width}x{boxed.height}:".encode() + raw).hexdigest()
    pixels = normalize(boxed, cfg.image_mean, cfg.image_std)
    tokens = cfg.positions(boxed.height, boxed.width)
    return PreparedImage(pixels, digest, img.size, tokens)


_SIGNATURES = {
    b"\x89PNG\r\n\x1a\n": "PNG",
    b"\xff\xd8\xff": "JPEG",
    b"GIF87a": "GIF",
    b"GIF89a": "GIF",
    b"BM": "BMP",
}


def _sniff(data: bytes) -> str | None:
    """The format a file claims by its signature, for messages about ones Pillow refuses."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    return next((kind for sig, kind in _SIGNATURES.items() if data.startswith(sig)), None)


def _read(source) -> bytes:
    if isinstance(source, str | Path):
        try:
            return Path(source).read_bytes()
        except OSError as e:
            raise ImageError(f"cannot read image file {source}: {e.strerror or e}") from None
    return bytes(source)


def _check_size(size: tuple[int, int], limits: ImageLimits) -> None:
    w, h = size
    if w <= 0 or h <= 0:
        raise EmptyImageError(f"the image has no pixels ({w}x{h})")
    if max(w, h) > limits.max_side:
        raise ImageTooLargeError(
            f"the image is {w}x{h}: a side longer than {limits.max_side} pixels is refused"
        )
    cap = limits.max_pixels if limits.max_pixels is not None else Image.MAX_IMAGE_PIXELS
    if cap is not None and w * h > cap:
        raise ImageTooLargeError(
            f"the image is {w}x{h} = {w * h} pixels, over the {cap}-pixel limit"
            " (a possible decompression bomb)"
        )


def _exif_upright(img: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(img)
    except (SyntaxError, ValueError, OSError, KeyError, TypeError):
        return img  # unreadable EXIF: keep the stored orientation, as llama.cpp does


def _round_half_away(x: float) -> int:
    """C's std::round: halves away from zero (Python's round() goes to even)."""
    return int(math.floor(abs(x) + 0.5)) * (1 if x >= 0 else -1)
