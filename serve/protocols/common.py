"""Translation every API style shares, written once: request bodies to typed structs, sampling
options to `SamplingParams`, messages to prompt ids, model-name matching, and errors.

Each adapter supplies only its wire format: an `ApiError` subclass that knows how to render
itself, and the field names of its dialect.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec
from litestar import Request, Response

from serve.engine import Engine, EventKind, GenerationRequest, TokenEvent
from serve.outputs import OutputFormat, select_format
from serve.settings import Settings
from tsjax.chat_template import TemplateError
from tsjax.generation import PromptTooLongError
from tsjax.model import Model
from tsjax.sampling import SamplingParams

if TYPE_CHECKING:
    from tsjax.grammar import GrammarFactory

T = TypeVar("T")


@dataclass
class Hub:
    """What every handler needs: settings, the model and engine once loaded, and readiness."""

    settings: Settings
    model: Model | None = None
    engine: Engine | None = None
    ready: bool = False
    error: str = ""  # why loading failed, if it did
    load_seconds: float = 0.0
    compile_seconds: float = 0.0
    started: float = field(default_factory=time.time)
    _format: Any = None
    _grammars: Any = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def output_format(self) -> OutputFormat:
        """The model's output syntax (reasoning and tool calls), chosen once per model."""
        if self._format is None:
            assert self.model is not None
            m = self.model
            self._format = select_format(m.config.architecture, m.template.source)
        return self._format

    def grammars(self) -> GrammarFactory:
        """The constraint compiler for the model's vocabulary, built on first use (reading
        the vocabulary takes a moment; most servers never need it)."""
        with self._lock:
            if self._grammars is None:
                from tsjax.grammar import GrammarFactory

                assert self.model is not None
                self._grammars = GrammarFactory(self.model.tokenizer, self.model.config.vocab_size)
            return self._grammars

    def live(self, error: type[ApiError]) -> tuple[Model, Engine]:
        """The model and engine, or a 503 in the caller's dialect while still warming up."""
        if not self.ready or self.model is None or self.engine is None:
            why = self.error or "the model is still loading; retry shortly"
            raise error(503, why)
        return self.model, self.engine


def hub_of(request: Request) -> Hub:
    return request.app.state.hub


class ApiError(Exception):
    """An error with an HTTP status, rendered by the subclass in its protocol's shape."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param

    def response(self) -> Response:
        return Response({"error": self.message}, status_code=self.status)


_AT = re.compile(r" - at `\$\.?([^`]*)`$")
_MISSING = re.compile(r"missing required field `([^`]+)`")


def _param_of(message: str) -> str | None:
    """The JSON path msgspec names in a validation error (`$.messages[0].role` -> that)."""
    at = _AT.search(message)
    missing = _MISSING.search(message)
    if missing:
        return f"{at.group(1)}.{missing.group(1)}" if at and at.group(1) else missing.group(1)
    return at.group(1) if at and at.group(1) else None


async def decode_body(request: Request, struct: type[T], error: type[ApiError]) -> T:
    """Parse and type-check the JSON body strictly (integers are not floats' strings, booleans
    are booleans); any failure is a 400 naming the offending field."""
    raw = await request.body()
    if not raw.strip():
        raise error(400, "the request body is empty; expected a JSON object")
    try:
        return msgspec.json.decode(raw, type=struct)
    except msgspec.ValidationError as e:
        param = _param_of(str(e))
        raise error(400, f"invalid request: {e}", param=param) from e
    except msgspec.DecodeError as e:
        raise error(400, f"malformed JSON body: {e}") from e


def model_names(model: Model) -> set[str]:
    """Every name the hosted model answers to, lower-cased: file name, its stem, catalog
    names and aliases of the catalog entry with that file name, and the full path."""
    from tsjax.catalog import CATALOG

    names = {model.name, model.path.stem, str(model.path)}
    for entry in CATALOG.values():
        if entry.filename == model.name:
            names.update((entry.name, *entry.aliases))
    return {n.lower() for n in names}


def check_model(requested: str, model: Model, error: type[ApiError]) -> None:
    """Blank -> 400; a name the hosted model doesn't answer to -> 404."""
    name = requested.strip()
    if not name:
        raise error(400, "model is required", param="model")
    if name.lower() not in model_names(model):
        raise error(
            404,
            f"model '{name}' is not hosted by this server (it serves '{model.name}'); "
            "restart tsjax serve with --model to change it",
            param="model",
        )


SAMPLING_FIELDS = SamplingParams.__dataclass_fields__


def sampling_params(settings: Settings, **given: Any) -> SamplingParams:
    """Server defaults, overridden by the request's fields that are present (not None)."""
    values = {name: getattr(settings, name) for name in SAMPLING_FIELDS}
    values.update({k: v for k, v in given.items() if v is not None and k in SAMPLING_FIELDS})
    return SamplingParams(**values)


def stop_list(settings: Settings, stop: Any) -> tuple[str, ...]:
    """A request's stop replaces the defaults; absent (UNSET) keeps them; null clears them."""
    if stop is msgspec.UNSET:
        return tuple(settings.stop)
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,) if stop else ()
    return tuple(s for s in stop if s)


IMAGE_PART_TYPES = {"image_url", "image", "input_image"}


def _has_image(message: dict[str, Any]) -> bool:
    """Ollama's per-message `images`, or an OpenAI content part carrying an image."""
    if message.get("images"):
        return True
    content = message.get("content")
    return isinstance(content, list) and any(
        isinstance(p, dict) and p.get("type") in IMAGE_PART_TYPES for p in content
    )


def reject_images(model: Model, error: type[ApiError], param: str) -> None:
    """The hosted families are text-only (no vision encoder is loaded), so an image cannot be
    used: say so instead of silently answering without it."""
    raise error(
        400,
        f"model {model.name} ({model.config.architecture}) cannot take image input: "
        "it has no vision encoder; send text only",
        param=param,
    )


def chat_prompt(
    model: Model,
    messages: list[dict[str, Any]],
    error: type[ApiError],
    *,
    tools: list[dict[str, Any]] | None = None,
    think: bool | None = None,
    extra: dict[str, Any] | None = None,
) -> tuple[list[int], str]:
    """Messages through the model's chat template: the prompt ids and the rendered text (the
    output parser reads its end: a prompt that opened `<think>` means the answer starts inside
    the reasoning block). A conversation the template rejects is a 400. `extra` are more
    template variables (`chat_template_kwargs`)."""
    if not messages:
        raise error(400, "messages must not be empty", param="messages")
    if any(_has_image(m) for m in messages):
        reject_images(model, error, "messages")
    kwargs = {k: v for k, v in (extra or {}).items() if k not in ("messages", "tools")}
    kwargs["enable_thinking"] = think
    try:
        text = model.template.render(messages, tools=tools or None, **kwargs)
    except TemplateError as e:
        raise error(400, f"cannot render the conversation: {e}", param="messages") from e
    add_bos = None if not model.template.bos_in_template else False
    return model.tokenizer.encode(text, add_bos=add_bos, parse_special=True), text


def make_request(
    engine: Engine,
    prompt_ids: list[int],
    sampling: SamplingParams,
    max_tokens: int | None,
    stop: tuple[str, ...],
    error: type[ApiError],
    *,
    reuse_prefix: bool,
) -> GenerationRequest:
    """A checked engine request: bad sampling values or a prompt over the window are 400s
    here, before anything is queued or streamed. max_tokens <= 0 means "until the window is
    full" (Ollama's -1)."""
    room = engine.model.max_len - len(prompt_ids)
    budget = room if max_tokens is None or max_tokens <= 0 else max_tokens
    req = GenerationRequest(
        prompt_ids, sampling, max_tokens=max(budget, 1), stop=stop, reuse_prefix=reuse_prefix
    )
    try:
        engine.check(req)
    except PromptTooLongError as e:
        raise error(
            400, f"{e}: shorten the conversation or start a new one", param="messages"
        ) from e
    except ValueError as e:
        raise error(400, str(e)) from e
    return req


async def run_to_end(engine: Engine, req: GenerationRequest) -> tuple[str, TokenEvent]:
    """Generate without streaming: the whole text and the final (DONE or ERROR) event."""
    pieces: list[str] = []
    final = TokenEvent(EventKind.ERROR, error="no result")
    async with aclosing(engine.generate(req)) as events:
        async for ev in events:
            if ev.kind is EventKind.TOKEN:
                pieces.append(ev.text)
            elif ev.kind in (EventKind.DONE, EventKind.ERROR):
                final = ev
    return "".join(pieces), final


def events(engine: Engine, req: GenerationRequest) -> AsyncIterator[TokenEvent]:
    """The engine's event stream, for adapters to wrap in `aclosing`."""
    return engine.generate(req)


def ns(seconds: float) -> int:
    """Ollama reports durations as integer nanoseconds."""
    return int(seconds * 1e9)
