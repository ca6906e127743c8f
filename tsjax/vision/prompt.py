"""Images in a prompt: where they go in the rendered text, and their positions in the tokens.

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

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from tsjax.spans import EmbedSpan
from tsjax.vision.config import VisionConfig
from tsjax.vision.preprocess import PreparedImage

if TYPE_CHECKING:
    from tsjax.tokenizer import Tokenizer
    from tsjax.vision.projector import Projector

#: Where an image goes in rendered prompt text: private-use characters that no tokenizer
#: merges with their neighbours (the text is split at them before tokenizing).
IMAGE_MARK = "\ue000image\ue001"
#: The token id at an image's positions (any valid id: the embeddings replace it).
FILLER = 0


class NoProjectorError(ValueError):
    """Images for a model loaded without a projector."""

    def __init__(self, model: str):
        super().__init__(
            f"model {model} cannot take images: no multimodal projector is loaded (start the"
            " server with --mmproj <mmproj.gguf>, or load it with mmproj=...)"
        )


class ImageCountError(ValueError):
    """The rendered prompt does not hold one mark per image (a template that drops messages,
    or the mark typed into the text)."""


_IMAGE_PARTS = frozenset({"image", "image_url", "input_image"})


def inline_images(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Messages whose content-part lists hold images, with that content made one string:
    `IMAGE_MARK` for each image part and the text parts' text, consecutive text parts joined
    by a newline (as `ChatTemplate` joins them) and nothing between an image and its
    neighbours, as Ollama (`[img-0]` + text), the reference server (`<start_of_image>` +
    text) and Gemma 3's own template over llama.cpp's parts (no separator) lay them out.
    Other messages are returned as they are."""
    out = []
    for m in messages:
        content = m.get("content")
        if not isinstance(content, list) or not any(_is_image(p) for p in content):
            out.append(dict(m))
            continue
        text, prev_text = "", False
        for part in content:
            if _is_image(part):
                text += IMAGE_MARK
                prev_text = False
            else:
                piece = part if isinstance(part, str) else part.get("text")
                if not isinstance(piece, str):
                    raise ValueError(f"a content part of type {part.get('type')!r} has no text")
                text += ("\n" if prev_text else "") + piece
                prev_text = True
        out.append({**m, "content": text})
    return out


def _is_image(part: Any) -> bool:
    return isinstance(part, Mapping) and part.get("type") in _IMAGE_PARTS


def image_prompt(
    tokenizer: Tokenizer,
    text: str,
    cfg: VisionConfig,
    *,
    controls: Sequence[tuple[int, int]] | None = None,
    add_bos: bool | None = None,
    add_eos: bool | None = False,
    lengths: Sequence[int] | None = None,
) -> tuple[list[int], list[int]]:
    """Rendered text with one `IMAGE_MARK` per image -> (token ids with each image's span
    in place of its mark, the index in them where each image's embeddings start).

    `lengths`: the positions of each image's embeddings, in order (`PreparedImage.tokens`);
    None: `cfg.tokens_per_image` each (a fixed-size family only).

    `controls`: the character spans of the control tokens the chat template wrote
    (`ChatTemplate.render_marked`; only those become control ids, `Tokenizer.encode_marked`);
    None parses control-token text anywhere (a raw prompt). BOS can only start the first
    piece, EOS only end the last (None: the file's flag)."""
    marks = [i for i in range(len(text)) if text.startswith(IMAGE_MARK, i)]
    if lengths is None:
        lengths = [cfg.tokens_per_image] * len(marks)
    if len(lengths) != len(marks):
        raise ImageCountError(
            f"the prompt has {len(marks)} image place(s) for {len(lengths)} image(s)"
        )
    bounds = [0, *(m + len(IMAGE_MARK) for m in marks)]
    ends = [*marks, len(text)]
    begin = (
        tokenizer.encode(cfg.image_begin, add_bos=False, add_eos=False) if cfg.image_begin else []
    )
    end = tokenizer.encode(cfg.image_end, add_bos=False, add_eos=False) if cfg.image_end else []
    ids: list[int] = []
    starts: list[int] = []
    for i, (a, b) in enumerate(zip(bounds, ends, strict=True)):
        if i:
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
    return text.count(IMAGE_MARK)


def image_spans(
    projector: Projector, images: Sequence[PreparedImage], starts: Sequence[int]
) -> list[EmbedSpan]:
    """Encode the images (each distinct one once) and place them at `starts` (one start per
    image, in prompt order, as `image_prompt` returns them)."""
    if len(images) != len(starts):
        raise ImageCountError(
            f"the prompt has {len(starts)} image place(s) for {len(images)} image(s)"
        )
    embeds = projector.embed(images)
    return [
        image_span(projector.config, s, e, img)
        for s, e, img in zip(starts, embeds, images, strict=True)
    ]


def image_span(cfg: VisionConfig, start: int, embeds, image: PreparedImage) -> EmbedSpan:
    """One image's span at `start` of its embeddings [positions, D]: attending both ways
    where the family does, and for an M-RoPE family (Qwen 3.5) carrying the image's token
    grid (its positions are the grid's, `tsjax.spans`)."""
    grid = cfg.grid(*image.pixels.shape[:2]) if cfg.mrope else None
    return EmbedSpan(start, embeds, image.digest, cfg.bidirectional, grid)
