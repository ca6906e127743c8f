"""Images (and audio clips) in a prompt: where they go in the rendered text, and their
positions in the tokens. An audio clip is laid out as an image is, with `AUDIO_MARK` and its
encoder's begin and end strings (Gemma 4: `<|audio>` + the clip's tokens + `<audio|>`, every
30 s chunk's tokens in one span, as llama.cpp's mtmd lays it out); its span is causal.

The chat template renders `IMAGE_MARK` where an image goes (`inline_images`: an OpenAI image
part in its place among the text parts; Ollama's `images` before the message's text, as
Ollama and the reference server put them; no separator around an image). `image_prompt`
then tokenizes the text between the marks one piece at a time, as llama.cpp's mtmd does, and
puts each image's wrapped span in place of its mark: the family's begin string (Gemma 3:
`<start_of_image>`; Pixtral: none), the positions that the image's embeddings fill (a fixed
`tokens_per_image`, or for a dynamic-resolution family each prepared image's own
`PreparedImage.tokens`, which Pixtral's row breaks are part of), the end string
(`<end_of_image>`, `[IMG_END]`; no "\\n\\n" around it: llama.cpp's layout, not
transformers' processor's). The span positions hold `FILLER` as their token id: the
embeddings replace whatever the id would embed.

    text, controls = model.template.render_marked(
        inline_images(messages), model.tokenizer.control_texts
    )
    prepared = [proj.prepare(b) for b in images]
    ids, starts = image_prompt(model.tokenizer, text, proj.config, controls=controls,
                               lengths=[p.tokens for p in prepared])
    spans = image_spans(proj, prepared, starts)
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from tsjax.spans import EmbedSpan
from tsjax.vision.config import VisionConfig
from tsjax.vision.preprocess import PreparedImage

if TYPE_CHECKING:
    from tsjax.audio.gemma4a import AudioConfig
    from tsjax.audio.waveform import PreparedAudio
    from tsjax.tokenizer import Tokenizer
    from tsjax.vision.projector import Projector

#: Where an image goes in rendered prompt text: private-use characters that no tokenizer
#: merges with their neighbours (the text is split at them before tokenizing).
IMAGE_MARK = "\ue000image\ue001"
#: Where an audio clip goes (a projector with an audio encoder: Gemma 4's).
AUDIO_MARK = "\ue000audio\ue001"
_MARK = re.compile("\ue000(image|audio)\ue001")
#: The token id at an image's positions (any valid id: the embeddings replace it).
FILLER = 0


class NoProjectorError(ValueError):
    """Images for a model loaded without a projector."""

    def __init__(self, model: str):
        super().__init__(
            f"model {model} cannot take images: no multimodal projector is loaded (start the"
            " server with --mmproj <mmproj.gguf>, or load it with mmproj=...)"
        )


class NoAudioEncoderError(ValueError):
    """Audio for a model whose projector has no audio encoder."""

    def __init__(self, model: str):
        super().__init__(
            f"model {model} cannot take audio: its multimodal projector has no audio encoder"
            " (Gemma 4's mmproj files carry one)"
        )


class ImageCountError(ValueError):
    """The rendered prompt does not hold one mark per image (a template that drops messages,
    or the mark typed into the text)."""


_IMAGE_PARTS = frozenset({"image", "image_url", "input_image"})
_AUDIO_PARTS = frozenset({"audio", "input_audio"})


def inline_images(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Messages whose content-part lists hold images or audio clips, with that content made
    one string: `IMAGE_MARK` for each image part, `AUDIO_MARK` for each audio part and the
    text parts' text, consecutive text parts joined by a newline (as `ChatTemplate` joins
    them) and nothing between a medium and its neighbours, as Ollama (`[img-0]` + text), the
    reference server (`<start_of_image>` + text) and Gemma 3's own template over llama.cpp's
    parts (no separator) lay them out. Other messages are returned as they are."""
    out = []
    for m in messages:
        content = m.get("content")
        if not isinstance(content, list) or not any(_mark_of(p) for p in content):
            out.append(dict(m))
            continue
        text, prev_text = "", False
        for part in content:
            if _mark_of(part):
                text += _mark_of(part)
                prev_text = False
            else:
                piece = part if isinstance(part, str) else part.get("text")
                if not isinstance(piece, str):
                    raise ValueError(f"a content part of type {part.get('type')!r} has no text")
                text += ("\n" if prev_text else "") + piece
                prev_text = True
        out.append({**m, "content": text})
    return out


def _mark_of(part: Any) -> str:
    """The mark a content part stands for in the text ("" for a text part)."""
    if not isinstance(part, Mapping):
        return ""
    kind = part.get("type")
    return IMAGE_MARK if kind in _IMAGE_PARTS else AUDIO_MARK if kind in _AUDIO_PARTS else ""


def mark_kinds(text: str) -> list[str]:
    """The media marks of rendered text in order: "image" or "audio" each."""
    return [m.group(1) for m in _MARK.finditer(text)]


def image_prompt(
    tokenizer: Tokenizer,
    text: str,
    cfg: VisionConfig,
    *,
    controls: Sequence[tuple[int, int]] | None = None,
    add_bos: bool | None = None,
    add_eos: bool | None = False,
    lengths: Sequence[int] | None = None,
    audio: AudioConfig | None = None,
) -> tuple[list[int], list[int]]:
    """Rendered text with one `IMAGE_MARK` per image and one `AUDIO_MARK` per audio clip ->
    (token ids with each medium's span in place of its mark, the index in them where each
    one's embeddings start, in text order).

    `lengths`: the positions of each medium's embeddings, in order (`PreparedImage.tokens`,
    `PreparedAudio.tokens`); None: `cfg.tokens_per_image` each (images of a fixed-size
    family only). `audio`: the projector's audio encoder config (its begin and end strings
    wrap a clip: Gemma 4's `<|audio>` ... `<audio|>`); an audio mark without it is a
    ValueError.

    `controls`: the character spans of the control tokens the chat template wrote
    (`ChatTemplate.render_marked`; only those become control ids, `Tokenizer.encode_marked`);
    None parses control-token text anywhere (a raw prompt). BOS can only start the first
    piece, EOS only end the last (None: the file's flag)."""
    found = list(_MARK.finditer(text))
    marks = [m.start() for m in found]
    kinds = [m.group(1) for m in found]
    if lengths is None:
        lengths = [cfg.tokens_per_image] * len(marks)
    if len(lengths) != len(marks):
        raise ImageCountError(
            f"the prompt has {len(marks)} media place(s) for {len(lengths)} image(s) or clip(s)"
        )
    if "audio" in kinds and audio is None:
        raise ValueError("the prompt has an audio clip but the projector has no audio encoder")

    def piece(s: str | None) -> list[int]:
        return tokenizer.encode(s, add_bos=False, add_eos=False) if s else []

    wraps = {"image": (piece(cfg.image_begin), piece(cfg.image_end))}
    if audio is not None:
        wraps["audio"] = (piece(audio.audio_begin), piece(audio.audio_end))
    bounds = [0, *(m.end() for m in found)]
    ends = [*marks, len(text)]
    ids: list[int] = []
    starts: list[int] = []
    for i, (a, b) in enumerate(zip(bounds, ends, strict=True)):
        if i:
            begin, end = wraps[kinds[i - 1]]
            ids += begin
            starts.append(len(ids))
            ids += [FILLER] * lengths[i - 1]
            ids += end
        first, last = i == 0, i == len(marks)
        if not (text[a:b] or first or last):
            continue
        bos = add_bos if first else False
        eos = add_eos if last else False
        if controls is None:
            ids += tokenizer.encode(text[a:b], add_bos=bos, add_eos=eos, parse_special=True)
        else:
            inside = [(x - a, y - a) for x, y in controls if a <= x and y <= b]
            ids += tokenizer.encode_marked(text[a:b], inside, add_bos=bos, add_eos=eos)
    return ids, starts


def count_marks(text: str) -> int:
    """Media marks (images and audio clips) in rendered text."""
    return len(_MARK.findall(text))


def wrapped_marks(text: str, projector: Projector) -> str:
    """Rendered text with each mark spelled as the family wraps its medium (the begin and end
    strings, no content: what a reply parser reads of the prompt)."""
    cfg, audio = projector.config, projector.audio
    text = text.replace(IMAGE_MARK, (cfg.image_begin or "") + (cfg.image_end or ""))
    if audio is not None:
        text = text.replace(AUDIO_MARK, audio.config.audio_begin + audio.config.audio_end)
    return text


def image_spans(
    projector: Projector,
    images: Sequence[PreparedImage | PreparedAudio],
    starts: Sequence[int],
) -> list[EmbedSpan]:
    """Encode the images and audio clips (each distinct one once) and place them at `starts`
    (one start per medium, in prompt order, as `image_prompt` returns them)."""
    if len(images) != len(starts):
        raise ImageCountError(
            f"the prompt has {len(starts)} media place(s) for {len(images)} image(s) or clip(s)"
        )
    from tsjax.audio.waveform import PreparedAudio

    pictures = [m for m in images if not isinstance(m, PreparedAudio)]
    clips = [m for m in images if isinstance(m, PreparedAudio)]
    if clips and projector.audio is None:
        raise ValueError("audio clips for a projector without an audio encoder")
    embeds = iter(projector.embed(pictures))
    heard = iter(projector.audio.embed(clips) if clips else [])
    return [
        media_span(projector, s, next(heard) if isinstance(m, PreparedAudio) else next(embeds), m)
        for s, m in zip(starts, images, strict=True)
    ]


def media_span(
    projector: Projector, start: int, embeds, medium: PreparedImage | PreparedAudio
) -> EmbedSpan:
    """An image's or audio clip's span at `start` of its embeddings [positions, D]."""
    if isinstance(medium, PreparedImage):
        return image_span(projector.config, start, embeds, medium)
    assert projector.audio is not None
    return EmbedSpan(start, embeds, medium.digest, projector.audio.config.bidirectional)


def image_span(cfg: VisionConfig, start: int, embeds, image: PreparedImage) -> EmbedSpan:
    """One image's span at `start` of its embeddings [positions, D]: attending both ways
    where the family does, and for an M-RoPE family (Qwen 3.5) carrying the image's token
    grid (its positions are the grid's, `tsjax.spans`)."""
    grid = cfg.grid(*image.pixels.shape[:2]) if cfg.mrope else None
    return EmbedSpan(start, embeds, image.digest, cfg.bidirectional, grid)
