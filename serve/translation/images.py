"""Images in requests, written once: their wire spellings decoded into `ImageInput`s (Ollama's
base64 strings, OpenAI's data URLs, Web UI upload paths), then, for a model with a projector,
decoded and preprocessed (`tsjax.vision.Projector.prepare`, off the event loop) and encoded by
the server's `ImageEncoder` into the embedded spans of the prompt. Audio clips (OpenAI's
`input_audio` parts, Web UI audio uploads) take the same path with `kind="audio"`, prepared
by the projector's audio encoder (`tsjax.audio`); a model without one answers 400.

Every problem is a 400 naming the field: bad base64, a URL this server will not fetch (it has
no internet access: `http(s)` image URLs are refused), a file that is not an image, a
truncated or absurdly large one, images for a model started without `--mmproj`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
from collections.abc import Sequence
from typing import Any

from serve.errors import ApiError
from serve.translation.intent import ImageInput, image_part
from tsjax.model import Model
from tsjax.spans import EmbedSpan
from tsjax.vision.prompt import media_span

_DATA_URL = re.compile(r"^data:([^;,]*)((?:;[^;,]*)*),(.*)$", re.DOTALL)


def decode_base64(text: str, where: str, what: str = "image") -> bytes:
    """Standard or URL-safe base64, whitespace and missing padding tolerated."""
    compact = re.sub(r"\s+", "", text)
    compact += "=" * (-len(compact) % 4)
    try:
        alt = b"-_" if ("-" in compact or "_" in compact) else None
        return base64.b64decode(compact, altchars=alt, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{where}: the {what} is not valid base64", param=where) from None


def from_base64(text: str, where: str) -> ImageInput:
    """Ollama's spelling: a base64 string (a data URL is accepted too)."""
    if text.startswith("data:"):
        return from_url(text, where)
    return ImageInput(data=decode_base64(text, where), where=where)


def from_url(url: str, where: str) -> ImageInput:
    """OpenAI's spelling: a `data:` URL. Remote URLs are refused: this server fetches nothing."""
    m = _DATA_URL.match(url.strip())
    if m is None:
        scheme = url.split(":", 1)[0].lower() if ":" in url else ""
        if scheme in ("http", "https"):
            raise ApiError(
                400,
                f"{where}: image URLs are not fetched (this server has no internet access);"
                " send the image inline as a data URL (data:image/png;base64,...)",
                param=where,
            )
        raise ApiError(400, f"{where}: an image must be a data URL (data:<type>;base64,...)",
                       param=where)  # fmt: skip
    mime, params, payload = m.groups()
    if mime and not mime.lower().startswith("image/"):
        raise ApiError(400, f"{where}: a {mime} data URL is not an image", param=where)
    if ";base64" not in params.lower():
        raise ApiError(400, f"{where}: the image data URL must be base64 encoded", param=where)
    return ImageInput(data=decode_base64(payload, where), where=where)


def content_part(part: Any, where: str) -> Any:
    """An OpenAI-style content part with its image decoded (`image_url`, the Responses API's
    `input_image`, and a `{"type": "image", "source": {"type": "base64", ...}}` block); other
    parts unchanged."""
    if not isinstance(part, dict):
        return part
    kind = part.get("type")
    if kind in ("image_url", "input_image"):
        url = part.get("image_url")
        if isinstance(url, dict):
            url = url.get("url")
        if not isinstance(url, str) or not url:
            raise ApiError(400, f"{where}: the image part has no URL", param=where)
        return image_part(from_url(url, where))
    if kind == "input_audio":
        return image_part(audio_input(part.get("input_audio"), where))
    if kind == "image" and "image" not in part:
        source = part.get("source")
        if isinstance(source, dict) and source.get("type") == "base64":
            return image_part(from_base64(str(source.get("data", "")), where))
        if isinstance(source, dict) and source.get("type") == "url":
            return image_part(from_url(str(source.get("url", "")), where))
        raise ApiError(400, f"{where}: the image part has no base64 source", param=where)
    return part


# what OpenAI's `input_audio.format` may say (the SDK's "wav" and "mp3", and the names of
# what PyAV decodes); the bytes decide how they are read
AUDIO_FORMATS = frozenset({"wav", "mp3", "flac", "ogg", "opus", "m4a", "aac", "webm", "pcm16"})


def audio_input(spec: Any, where: str) -> ImageInput:
    """OpenAI's `{"data": <base64>, "format": "wav"}` (chat and Responses `input_audio`)."""
    if not isinstance(spec, dict) or not isinstance(spec.get("data"), str) or not spec["data"]:
        raise ApiError(400, f"{where}: input_audio needs data (base64 audio) and format",
                       param=where)  # fmt: skip
    fmt = spec.get("format")
    if fmt is not None and (not isinstance(fmt, str) or fmt.lower() not in AUDIO_FORMATS):
        raise ApiError(400, f"{where}: input_audio.format {fmt!r} is not one of "
                       f"{', '.join(sorted(AUDIO_FORMATS))}", param=where)  # fmt: skip
    data = decode_base64(spec["data"], where, "audio")
    return ImageInput(data=data, where=where, kind="audio")


def with_images(content: Any, images: Sequence[ImageInput]) -> Any:
    """Content with `images` before its text (Ollama's per-message `images`, Web UI paths)."""
    if not images:
        return content
    text = content if isinstance(content, str) else ""
    parts = [image_part(img) for img in images]
    if isinstance(content, list):
        return parts + content
    return parts + ([{"type": "text", "text": text}] if text else [])


async def prepare_images(model: Model, images: Sequence[ImageInput]):
    """Decode and preprocess each image for the model's projector, in a worker thread (Pillow
    decoding and resampling are CPU work). A bad image is a 400 naming its field and what is
    wrong with it; images for a model without a projector are a 400 saying how to add one."""
    if not images:
        return []
    proj = model.projector
    if proj is None:
        audio = any(img.kind == "audio" for img in images)
        raise ApiError(400, no_projector(model, audio), param=images[0].where)
    deaf = next((img for img in images if img.kind == "audio" and proj.audio is None), None)
    if deaf is not None:
        raise ApiError(400, no_audio_encoder(model), param=deaf.where)
    from tsjax.audio import AudioError
    from tsjax.vision import ImageError

    def run():
        out = []
        for img in images:
            try:
                if img.kind == "audio":
                    out.append(proj.audio.prepare(img.read()))
                else:
                    out.append(proj.prepare(img.read(), img.max_tokens))
            except (ImageError, AudioError) as e:
                raise ApiError(400, f"{img.where}: {e}", param=img.where) from e
            except OSError as e:
                msg = f"{img.where}: cannot read the {img.kind}: {e}"
                raise ApiError(400, msg, param=img.where) from e
        return out

    return await asyncio.to_thread(run)


def no_projector(model: Model, audio: bool = False) -> str:
    what = "audio" if audio else "image"
    return (
        f"model {model.name} ({model.config.architecture}) cannot take {what} input: the server"
        " was started without a multimodal projector; restart it with --mmproj <mmproj.gguf>"
        f" (the projector file made for this model) to send {what}s"
    )


def no_audio_encoder(model: Model) -> str:
    return (
        f"model {model.name} ({model.config.architecture}) cannot take audio input: its"
        " multimodal projector has no audio encoder (Gemma 4's mmproj files carry one)"
    )


async def embedded_spans(hub, prepared, starts: Sequence[int]) -> tuple[EmbedSpan, ...]:
    """The images' embeddings (the server's encoder: each distinct image once, batched with
    other requests' images) placed at `starts`."""
    if not prepared:
        return ()
    assert hub.encoder is not None and hub.model is not None
    embeds = await hub.encoder.embed(prepared)
    proj = hub.model.projector
    return tuple(
        media_span(proj, s, e, img) for s, e, img in zip(starts, embeds, prepared, strict=True)
    )
