"""What one request asks for, in no API style's terms: the `Intent` every adapter parses its
wire body into, and `prepare` (serve/translation/prepare.py) turns into an engine request.

A new request option is a field here, read where `prepare` uses it, and the line in each
adapter that reads its wire spelling.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec

from serve.sessions import TrackedMessage


class Sampling(msgspec.Struct, kw_only=True):
    """The sampling fields a request gave; None keeps the server's default. The names are
    `tsjax.sampling.SamplingParams`'s (a test keeps the two in step)."""

    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repeat_penalty: float | None = None
    repeat_last_n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None


@dataclass(frozen=True)
class ImageInput:
    """An image a request carries, not yet decoded: its bytes, or a file of this server's
    (a Web UI upload). `where` names the request field, for errors about it.

    In `Intent.messages` an image is a content part `{"type": "image", "image": ImageInput}`
    in its place among the message's text parts: adapters put Ollama's and the Web UI's
    per-message images before the text (as Ollama and the reference server do) and OpenAI's
    image parts where the client put them. Equal images compare equal (a conversation's
    earlier turns match the recorded history)."""

    data: bytes | None = None
    path: str | None = None
    where: str = "images"
    # the most positions it may take (a Gemma 4 video frame); None: the projector's sizing
    max_tokens: int | None = None
    # "audio": an audio clip riding the same path (OpenAI `input_audio` parts, Web UI
    # `audioPaths`), a content part `{"type": "audio", "audio": ImageInput}`
    kind: str = "image"

    def read(self) -> bytes:
        if self.data is not None:
            return self.data
        assert self.path is not None
        with open(self.path, "rb") as f:
            return f.read()


def image_part(image: ImageInput) -> dict[str, Any]:
    if image.kind == "audio":
        return {"type": "audio", "audio": image}
    return {"type": "image", "image": image}


def message_images(messages: list[dict[str, Any]]) -> list[ImageInput]:
    """The images and audio clips of `messages`, in prompt order (as the chat template meets
    them: one media mark each, `tsjax.vision.prompt`)."""
    out = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            out += [p[p["type"]] for p in content
                    if isinstance(p, dict) and p.get("type") in ("image", "audio")
                    and isinstance(p.get(p["type"]), ImageInput)]  # fmt: skip
    return out


@dataclass
class OutputSpec:
    """A structured-output request: any JSON object, or JSON valid under `schema`."""

    schema: dict[str, Any] | None = None  # None: any JSON object
    strict: bool = False
    name: str = ""
    param: str = "format"  # the request field it came from, for errors


class Intent(msgspec.Struct, kw_only=True):
    """One generation request, parsed from any API style.

    Either `messages` (a conversation for the model's chat template, as the template reads
    them: dicts with `role`, `content`, `tool_calls`, ...) or `prompt` (raw text, tokenized as
    given, special tokens included)."""

    messages: list[dict[str, Any]] | None = None
    prompt: str | None = None
    # The model the request names; None where the API names none (the Web UI chooses models
    # through /api/models/load).
    model: str | None = None
    sampling: Sampling = msgspec.field(default_factory=Sampling)
    max_tokens: int | None = None  # None: the server's default; 0 or less: until the window is full
    stop: tuple[str, ...] | None = None  # None: the server's default stop strings
    n: int = 1  # answers to the prompt (one prefill shared; `choices[i]`)
    logprobs: bool = False  # report each generated token's log-probabilities
    top_logprobs: int = 0  # with them, this many most likely alternatives (0-20)
    prompt_logprobs: bool = False  # report the prompt's too (a text completion's `echo`)
    # Tools as sent (`{"type":"function","function":{...}}` or the flat `{"name",...}` form)
    # and the choice ("auto", "none", "required", a name or `{"function":{"name"}}`):
    # checked and normalized by `prepare`.
    tools: list[Any] | None = None
    tool_choice: Any = None
    output: OutputSpec | None = None  # a response format: JSON, or JSON under a schema
    think: bool | None = None  # None: the chat template's own default
    # The reasoning effort ("low", "medium", "high"), given to the template as
    # `reasoning_effort` (GPT-OSS's Harmony prompt reads it); None: the template's default.
    effort: str | None = None
    template_kwargs: dict[str, Any] = msgspec.field(default_factory=dict)  # more template vars
    # Images of a raw `prompt` (placed before its text); a conversation's images are content
    # parts of its messages (see `ImageInput`).
    images: list[ImageInput] = msgspec.field(default_factory=list)
    # The conversation as this server last generated it (raw answer ids): answers found again
    # in `messages` are spliced in as those ids, so the prompt starts with the cached tokens.
    history: list[TrackedMessage] = msgspec.field(default_factory=list)
    reuse_prefix: bool = True  # may start from another request's cached prefix
    stream: bool = False
