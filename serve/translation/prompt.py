"""Prompt token ids for a request, written once: the model-name check, the chat template with
its BOS rule, raw prompts, the places of images (each a span of positions its embeddings will
fill: `tsjax.vision.prompt`), and the splicing of answers this server generated earlier
(their exact token ids instead of their re-tokenized text).

Splicing: an assistant turn the server generated comes back from the client as text, often
edited or without its reasoning block, and re-tokenizing it rarely gives the ids still sitting
in a cache row. Each such turn found again in the conversation (same roles and non-assistant
contents as the recorded `history`) is rendered as a placeholder, and the placeholder's place
in the token ids gets the recorded raw ids, so prefix reuse covers the whole previous turn.

Resume points: a model whose cache cannot rewind (recurrent layers) resumes a later request
only where it saved its state, so a chat prompt says where the next turn is likely to branch
off: where its last user message starts (an edited or regenerated question) and where the
generation prompt starts (the next turn, whatever the template makes of this answer: Qwen 3.5
drops its reasoning, so the rendering differs right after `<|im_start|>assistant`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from serve.errors import ApiError
from serve.sessions import TrackedMessage
from serve.translation.images import no_projector
from serve.translation.intent import message_images
from tsjax.chat_template import TemplateError
from tsjax.model import Model
from tsjax.vision.prompt import (
    AUDIO_MARK,
    IMAGE_MARK,
    count_marks,
    image_prompt,
    inline_images,
    wrapped_marks,
)


def model_names(model: Model) -> set[str]:
    """Every name the hosted model answers to, lower-cased: file name, its stem, catalog
    names and aliases of the catalog entry with that file name, and the full path."""
    from tsjax.catalog import CATALOG

    names = {model.name, model.path.stem, str(model.path)}
    for entry in CATALOG.values():
        if entry.filename == model.name:
            names.update((entry.name, *entry.aliases))
    return {n.lower() for n in names}


def check_model(requested: str, model: Model) -> None:
    """Blank -> 400; a name the hosted model doesn't answer to -> 404."""
    name = requested.strip()
    if not name:
        raise ApiError(400, "model is required", param="model")
    if name.lower() not in model_names(model):
        raise ApiError(
            404,
            f"model '{name}' is not hosted by this server (it serves '{model.name}'); "
            "restart tsjax serve with --model to change it",
            param="model",
        )


def max_prompt_chars(model: Model, tokens: int) -> int:
    """The most characters `tokens` tokens can stand for: no token is longer than the
    vocabulary's longest piece (in bytes, and a character is at least one byte), plus a
    margin for a SentencePiece space prefix."""
    return tokens * model.tokenizer.max_piece_bytes + 64


def check_length(model: Model, text: str, param: str) -> None:
    """A 400 for a prompt that cannot fit the context window whatever its tokens, decided
    from its length before tokenizing it (which costs about 4 s a megabyte)."""
    limit = max_prompt_chars(model, model.max_len)
    if len(text) > limit:
        raise ApiError(
            400,
            f"the prompt is {len(text)} characters long, more than a {model.max_len}-token "
            f"context window can hold ({limit} characters at most, at "
            f"{model.tokenizer.max_piece_bytes} per token); shorten it or start a new "
            "conversation",
            param=param,
        )


def encode(
    model: Model,
    text: str,
    specials: list[tuple[int, int]],
    *,
    first: bool = True,
    last: bool = True,
    lengths: list[int] | None = None,
) -> tuple[list[int], list[int]]:
    """Token ids of rendered template text, control tokens parsed only at `specials` (the ones
    the template wrote: control-token text from the request stays text), and where each
    image's span starts in them (one span per `IMAGE_MARK`, `tsjax.vision.prompt`). The BOS
    rule: a template that writes BOS itself gets none added, else the file's flag decides;
    only the `first` piece of a prompt can start with BOS, only the `last` can end with the
    file's EOS. `lengths`: the positions of each of the text's images
    (`PreparedImage.tokens`; None: the projector's fixed count)."""
    add_bos = (None if not model.template.bos_in_template else False) if first else False
    add_eos = None if last else False
    if count_marks(text):
        proj = model.projector
        assert proj is not None  # `chat_prompt` refused images without one
        audio = proj.audio.config if proj.audio is not None else None
        return image_prompt(model.tokenizer, text, proj.config, controls=specials,
                            add_bos=add_bos, add_eos=add_eos, lengths=lengths,
                            audio=audio)  # fmt: skip
    return model.tokenizer.encode_marked(text, specials, add_bos=add_bos, add_eos=add_eos), []


def raw_prompt(
    model: Model, text: str, images: int = 0, lengths: list[int] | None = None
) -> tuple[list[int], list[int]]:
    """A prompt sent as text, not messages: tokenized as given (the file's BOS flag), with
    `images` image spans before it (`lengths`: their positions, as `encode`). Returns (ids,
    where each image's span starts)."""
    if images and model.projector is None:
        raise ApiError(400, no_projector(model), param="images")
    check_length(model, text, "prompt")
    if count_marks(text):  # typed, not placed: it would open a span with no image
        raise ApiError(400, "the prompt contains a reserved media mark "
                       f"({IMAGE_MARK!r} or {AUDIO_MARK!r})", param="prompt")  # fmt: skip
    if lengths is None:  # no image, or a fixed-size projector's
        return model.tokenize_prompt(IMAGE_MARK * images + text)
    return model.tokenize_prompt(IMAGE_MARK * images + text, lengths=lengths)


def has_images(messages: list[dict[str, Any]]) -> bool:
    return bool(message_images(messages))


@dataclass
class Prompt:
    ids: list[int]
    # The rendered text (the output parser reads its end: a prompt that opened `<think>` means
    # the answer starts inside the reasoning block; spliced answers appear decoded, images as
    # the family's begin and end strings).
    text: str
    # The messages as rendered, with the raw ids of every spliced answer: what a stateful API
    # records to splice the next turn.
    turns: list[TrackedMessage]
    # Where each image's span starts in `ids`, in the order of the messages' images.
    image_starts: list[int] = field(default_factory=list)
    # Token positions a later request may resume from (see the module docstring); () when
    # not asked for or not found.
    resume_points: tuple[int, ...] = ()


_PLACEHOLDER = "\ue000R{:04d}\ue000"
_PLACEHOLDER_RE = re.compile("\ue000R(\\d{4})\ue000")


def _matched_raw(messages: list[dict[str, Any]], history: list[TrackedMessage]) -> dict[int, list]:
    """Raw token ids for assistant turns inside the prefix that matches the recorded history.
    Assistant text is not compared: clients send back answers without their think blocks."""
    raws: dict[int, list[int]] = {}
    for i, (new, old) in enumerate(zip(messages, history, strict=False)):
        if new.get("role") != old.role:
            break
        if new.get("role") != "assistant" and new.get("content") != old.content:
            break
        if new.get("role") == "assistant" and old.raw:
            raws[i] = old.raw
    return raws


def chat_prompt(
    model: Model,
    messages: list[dict[str, Any]],
    *,
    tools: list[dict[str, Any]] | None = None,
    think: bool | None = None,
    extra: dict[str, Any] | None = None,
    history: list[TrackedMessage] | None = None,
    resume_points: bool = False,
    lengths: list[int] | None = None,
) -> Prompt:
    """Messages through the model's chat template, with the answers of `history` spliced in
    as their raw ids and each image part's place made a span of image positions. A
    conversation the template rejects is a 400, and so are images for a model without a
    projector. `extra` are more template variables (`chat_template_kwargs`).
    `resume_points`: also find `Prompt.resume_points` (one more rendering, and the tokens of
    its last two turns). `lengths`: each image's positions, in order (`PreparedImage.tokens`;
    None: the projector's fixed count)."""
    media = message_images(messages)
    n_images = len(media)
    if n_images and model.projector is None:
        audio = any(m.kind == "audio" for m in media)
        raise ApiError(400, no_projector(model, audio), param="messages")
    kwargs = {k: v for k, v in (extra or {}).items() if k not in ("messages", "tools")}
    kwargs["enable_thinking"] = think
    # matched with their images (equal images compare equal), rendered with marks
    raws = _matched_raw(messages, history or [])
    inlined = inline_images(messages)  # image (audio) parts -> IMAGE_MARK (AUDIO_MARK)
    shown = [
        {"role": "assistant", "content": _PLACEHOLDER.format(i)} if i in raws else m
        for i, m in enumerate(inlined)
    ]
    shown = _thinking_switch(shown, think, model.template.source)
    controls = model.tokenizer.control_texts
    try:
        text, spans = model.template.render_marked(shown, controls, tools=tools or None, **kwargs)
        parts = _PLACEHOLDER_RE.split(text)
        if len(parts) != 2 * len(raws) + 1:  # the template dropped or repeated an answer
            raws, shown = {}, inlined
            text, spans = model.template.render_marked(
                inlined, controls, tools=tools or None, **kwargs
            )
            parts = [text]
    except TemplateError as e:
        raise ApiError(400, f"cannot render the conversation: {e}", param="messages") from e
    if count_marks(text) != n_images:  # a template that drops a message, or a typed mark
        raise ApiError(
            400,
            f"the chat template placed {count_marks(text)} of the conversation's"
            f" {n_images} image(s) and audio clip(s)",
            param="messages",
        )
    check_length(model, text, "messages")
    ids: list[int] = []
    starts: list[int] = []
    pos = 0  # where parts[j] starts in text
    for j, part in enumerate(parts):
        if j % 2:
            ids.extend(raws[int(part)])
            parts[j] = model.tokenizer.decode(raws[int(part)])
            pos += len(_PLACEHOLDER.format(int(part)))
            continue
        if j == 0 or part:
            inside = [(a - pos, b - pos) for a, b in spans if pos <= a and b <= pos + len(part)]
            mine = _lengths_of(lengths, len(starts), count_marks(part))
            got, where = encode(model, part, inside, first=j == 0, last=j == len(parts) - 1,
                                lengths=mine)  # fmt: skip
            starts += [len(ids) + w for w in where]
            ids.extend(got)
        pos += len(part)
    turns = [TrackedMessage(m.get("role", ""), m.get("content") or "", raws.get(i))
             for i, m in enumerate(messages)]  # fmt: skip
    points = ()
    if resume_points:
        points = _resume_points(model, shown, text, spans, ids, tools or None, kwargs, lengths)
    return Prompt(ids, shown_text(model, "".join(parts)), turns, starts, points)


def shown_text(model: Model, text: str) -> str:
    """Rendered text with each media mark spelled as the family wraps an image or a clip."""
    if not count_marks(text) or model.projector is None:
        return text
    return wrapped_marks(text, model.projector)


# the template reads the `enable_thinking` variable (not a namespace field of that name)
_READS_ENABLE_THINKING = re.compile(r"(?<![\w.])enable_thinking\b(?!\s*=[^=])")


def _thinking_switch(messages: list[dict[str, Any]], think: bool | None, source: str):
    """`messages` with thinking switched the way a template without `enable_thinking` reads
    it: Nemotron-H Nano v2's takes the last `/think` or `/no_think` in a user or system
    message (and removes it from the text it renders), so the last such message gets one."""
    if think is None or "/no_think" not in source or _READS_ENABLE_THINKING.search(source):
        return messages
    last = max((i for i, m in enumerate(messages) if m.get("role") in ("user", "system")
                and isinstance(m.get("content"), str)), default=None)  # fmt: skip
    if last is None:
        return messages
    switched = dict(messages[last])
    switched["content"] += " /think" if think else " /no_think"
    return [*messages[:last], switched, *messages[last + 1 :]]


def _lengths_of(lengths: list[int] | None, done: int, n: int) -> list[int] | None:
    """The positions of the n images after the first `done` (None stays None)."""
    return None if lengths is None else lengths[done : done + n]


def _resume_points(
    model: Model, shown, text: str, spans, ids, tools, kwargs, lengths=None
) -> tuple[int, ...]:
    """Token positions of `ids` where the generation prompt and the last user message start.

    The generation prompt: the conversation rendered without one is a prefix of `text` (the
    template is prefix-stable there). The last user message: the end of the last control token
    the template wrote before its content (rendering the conversation only up to that message
    would not do: templates render the turns before the last user message differently, e.g.
    Qwen 3.5 drops their reasoning). A place counts only where it starts a token: the tokens
    of the text from there are the end of `ids`. Saving a state elsewhere would be harmless
    (a state is only ever resumed under an equal token prefix), merely useless."""
    starts = set()
    try:
        head, _ = model.template.render_marked(
            shown, model.tokenizer.control_texts, tools=tools, add_generation_prompt=False,
            **kwargs,
        )  # fmt: skip
        if head and text.startswith(head):
            starts.add(len(head))
    except TemplateError:
        pass
    users = [m.get("content") for m in shown if m.get("role") == "user"]
    if users and isinstance(users[-1], str) and users[-1]:
        c = text.rfind(users[-1])
        starts.add(max((b for _, b in spans if b <= c), default=0) if c >= 0 else 0)
    points = set()
    for n in starts - {0}:
        if _PLACEHOLDER_RE.search(text, n):  # spliced raw ids: not the text's tokens
            continue
        inside = [(a - n, b - n) for a, b in spans if a >= n]
        k = count_marks(text[n:])  # the last k images and clips
        mine = _lengths_of(lengths, len(lengths) - k, k) if lengths else None
        tail, _ = encode(model, text[n:], inside, first=False, last=True, lengths=mine)
        if tail and len(tail) < len(ids) and ids[-len(tail) :] == tail:
            points.add(len(ids) - len(tail))
    return tuple(sorted(points))
