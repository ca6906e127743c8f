"""Chat prompts from a GGUF file's `tokenizer.chat_template`, with built-in fallbacks per family.

An instruct model only answers well when its prompt matches the format it was trained on, byte for
byte. GGUF files carry the Hugging Face Jinja2 template for that format, so we render it the way
`transformers`' `apply_chat_template` does: same Jinja settings (`trim_blocks`, `lstrip_blocks`,
loop controls), same globals (`raise_exception`, `strftime_now`, `namespace`, `dict`) and the same
`tojson` filter, so that a prompt built here tokenizes to the ids the model saw in training.

Templates come from downloaded files, i.e. they are untrusted code: they run in Jinja's immutable
sandbox, and an attempt to reach Python internals fails at once with `TemplateError` instead of
rendering an empty string as stock Jinja would.

Files without a template (e.g. some Gemma 3 conversions) get a built-in one chosen from the
architecture: Gemma turns, Llama 3 headers, or ChatML.

`ChatTemplate.tokenize(tokenizer, messages)` turns a conversation into prompt ids: only the
control tokens the template itself writes become control ids; control-token text anywhere in the
request (content, tools, results, arguments, kwargs) is tokenized as text, so a client cannot
close its turn and forge another (see tsjax.chat_markers).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import cache, cached_property, lru_cache
from typing import TYPE_CHECKING, Any

import jinja2
import jinja2.ext
import numpy as np
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace

from tsjax.chat_markers import marked_template

if TYPE_CHECKING:
    from tsjax.tokenizer import Tokenizer


class TemplateError(ValueError):
    """A chat template that does not compile, rejects the conversation, or breaks the sandbox.

    The message names the template's origin ("GGUF chat template", "built-in gemma template") so a
    server can report which one failed; a conversation the template rejects (e.g. roles that do
    not alternate) is a client error, not a server bug.
    """


# ----------------------------------------------------------------------------- built-in templates

# Gemma (1, 2, 3): no system role; the system prompt is folded into the first user turn followed by
# a blank line, as Google's Gemma 3 template does. Turns are trimmed; "assistant" is "model".
GEMMA_TEMPLATE = """\
{{- bos_token -}}
{%- if messages and messages[0].role == 'system' -%}
    {%- set first_user_prefix = messages[0].content + '\\n\\n' -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = '' -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message.role == 'user') != (loop.index0 % 2 == 0) -%}
        {{- raise_exception('Conversation roles must alternate'
                            ' user/assistant/user/assistant/...') -}}
    {%- endif -%}
    {%- set role = 'model' if message.role == 'assistant' else message.role -%}
    {{- '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') -}}
    {{- message.content | trim -}}
    {{- '<end_of_turn>\\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<start_of_turn>model\\n' -}}
{%- endif -%}
"""

# Llama 3: header-delimited turns, contents trimmed, BOS first. Tools and tool calls follow the
# Llama 3.1 JSON convention ({"name": ..., "parameters": ...}, results under the "ipython" role).
LLAMA3_TEMPLATE = """\
{{- bos_token -}}
{%- set has_system = messages and messages[0].role == 'system' -%}
{%- if has_system or tools -%}
    {{- '<|start_header_id|>system<|end_header_id|>\\n\\n' -}}
    {%- if has_system -%}
        {{- messages[0].content | trim -}}
    {%- endif -%}
    {%- if tools -%}
        {%- if has_system and messages[0].content | trim -%}
            {{- '\\n\\n' -}}
        {%- endif -%}
        {{- 'You have access to the following functions. To call a function, respond with JSON'
            ' for a function call in the form {"name": function name, "parameters": dictionary'
            ' of argument name and its value}. Do not use variables.\\n\\n' -}}
        {%- for tool in tools -%}
            {{- tool | tojson(indent=4) -}}
            {{- '\\n\\n' -}}
        {%- endfor -%}
    {%- endif -%}
    {{- '<|eot_id|>' -}}
{%- endif -%}
{%- for message in (messages[1:] if has_system else messages) -%}
    {%- set role = 'ipython' if message.role == 'tool' else message.role -%}
    {{- '<|start_header_id|>' + role + '<|end_header_id|>\\n\\n' -}}
    {%- if message.tool_calls -%}
        {%- for call in message.tool_calls -%}
            {{- '{"name": "' + call.function.name + '", "parameters": ' -}}
            {%- if call.function.arguments is string -%}
                {{- call.function.arguments -}}
            {%- else -%}
                {{- call.function.arguments | tojson -}}
            {%- endif -%}
            {{- '}' -}}
        {%- endfor -%}
    {%- else -%}
        {{- message.content | trim -}}
    {%- endif -%}
    {{- '<|eot_id|>' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
{%- endif -%}
"""

# ChatML (Qwen 2/2.5/3 and the generic default). Tools use the Hermes/Qwen convention: signatures in
# the system turn inside <tools>, calls as <tool_call> JSON, results as user <tool_response> blocks.
_CHATML_BODY = """\
{%- if tools -%}
    {{- '<|im_start|>system\\n' -}}
    {%- if messages and messages[0].role == 'system' -%}
        {{- messages[0].content + '\\n\\n' -}}
    {%- endif -%}
    {{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n'
        'You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' -}}
    {%- for tool in tools -%}
        {{- '\\n' + (tool | tojson) -}}
    {%- endfor -%}
    {{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and'
        ' arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{"name":'
        ' <function-name>, "arguments": <args-json-object>}\\n</tool_call><|im_end|>\\n' -}}
{%- elif messages and messages[0].role == 'system' -%}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' -}}
{%- endif -%}
{%- for message in messages -%}
    {%- if message.role == 'system' and loop.first -%}
    {%- elif message.role == 'tool' -%}
        {%- if loop.first or messages[loop.index0 - 1].role != 'tool' -%}
            {{- '<|im_start|>user' -}}
        {%- endif -%}
        {{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' -}}
        {%- if loop.last or messages[loop.index0 + 1].role != 'tool' -%}
            {{- '<|im_end|>\\n' -}}
        {%- endif -%}
    {%- else -%}
        {{- '<|im_start|>' + message.role + '\\n' + message.content -}}
        {%- for call in (message.tool_calls or []) -%}
            {%- if message.content or not loop.first -%}
                {{- '\\n' -}}
            {%- endif -%}
            {{- '<tool_call>\\n{"name": "' + call.function.name + '", "arguments": ' -}}
            {%- if call.function.arguments is string -%}
                {{- call.function.arguments -}}
            {%- else -%}
                {{- call.function.arguments | tojson -}}
            {%- endif -%}
            {{- '}\\n</tool_call>' -}}
        {%- endfor -%}
        {{- '<|im_end|>\\n' -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|im_start|>assistant\\n' -}}
"""
CHATML_TEMPLATE = _CHATML_BODY + "{%- endif -%}\n"
# Qwen 3 adds the "no thinking" switch: an empty think block when enable_thinking is False.
QWEN3_TEMPLATE = (
    _CHATML_BODY
    + """\
    {%- if enable_thinking is defined and enable_thinking is false -%}
        {{- '<think>\\n\\n</think>\\n\\n' -}}
    {%- endif -%}
{%- endif -%}
"""
)

BUILTIN_TEMPLATES: dict[str, str] = {
    "gemma": GEMMA_TEMPLATE,
    "llama3": LLAMA3_TEMPLATE,
    "chatml": CHATML_TEMPLATE,
    "qwen3": QWEN3_TEMPLATE,
}

# Token strings a built-in template needs when the caller knows none (metadata overrides them).
_BUILTIN_SPECIAL_TOKENS: dict[str, dict[str, str]] = {
    "gemma": {"bos_token": "<bos>", "eos_token": "<eos>"},
    "llama3": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
    "chatml": {"bos_token": "", "eos_token": "<|im_end|>"},
    "qwen3": {"bos_token": "", "eos_token": "<|im_end|>"},
}

_GEMMA_ARCHITECTURES = frozenset({"gemma", "gemma2", "gemma3", "gemma3n"})
_QWEN3_ARCHITECTURES = frozenset({"qwen3", "qwen3moe"})
_LLAMA3_MARKER = "<|start_header_id|>"

# GGUF metadata key suffix -> template variable, as transformers' special_tokens_map names them.
_SPECIAL_TOKEN_KEYS = {
    "bos_token_id": "bos_token",
    "eos_token_id": "eos_token",
    "unknown_token_id": "unk_token",
    "padding_token_id": "pad_token",
    "seperator_token_id": "sep_token",  # sic: llama.cpp's spelling
    "cls_token_id": "cls_token",
    "mask_token_id": "mask_token",
    "eot_token_id": "eot_token",
}


def builtin_family(architecture: str | None, tokens: Sequence[str] | None = None) -> str:
    """The built-in template for a file without one: by architecture, with the vocab to tell
    Llama 3 (header tokens) from older Llama-architecture models, which get ChatML."""
    arch = (architecture or "").lower()
    if arch in _GEMMA_ARCHITECTURES:
        return "gemma"
    if arch in _QWEN3_ARCHITECTURES:
        return "qwen3"
    if arch == "llama" and tokens is not None and _LLAMA3_MARKER in tokens:
        return "llama3"
    return "chatml"


def special_tokens_from_metadata(metadata: Mapping[str, Any]) -> dict[str, str]:
    """`bos_token`, `eos_token`, ... as strings, from the GGUF token ids and vocab.

    Templates print these variables (`{{ bos_token }}`), so they must be the token's text.
    """
    tokens = metadata.get("tokenizer.ggml.tokens")
    out: dict[str, str] = {}
    if tokens is None:
        return out
    for suffix, name in _SPECIAL_TOKEN_KEYS.items():
        idx = metadata.get(f"tokenizer.ggml.{suffix}")
        if idx is None:
            continue
        idx = int(idx)
        if 0 <= idx < len(tokens):
            out[name] = str(tokens[idx])
    return out


# ----------------------------------------------------------------------------- message shape


def normalize_messages(
    messages: Sequence[Mapping[str, Any]], *, image_placeholder: str | None = None
) -> list[dict[str, Any]]:
    """OpenAI/Ollama-shaped messages reduced to what chat templates expect.

    Templates concatenate `message.content` as a string and iterate or `tojson` tool-call
    arguments as a mapping, so: keys set to None are dropped (templates test for presence, and
    OpenAI clients send `content: null` next to tool calls) and content becomes a string ("" when
    absent); content-part lists become text joined by newlines, each image part becoming
    `image_placeholder` (dropped when None); tool-call arguments sent as a JSON string are parsed
    to a dict (left as the string when it is not a JSON object); reasoning sent as `thinking` or
    `reasoning` is also offered as `reasoning_content`; a tool result without `name` gets the
    name of the call its `tool_call_id` answers.
    """
    out: list[dict[str, Any]] = []
    call_names: dict[str, str] = {}
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise TemplateError(f"message {i} is a {type(message).__name__}, not an object")
        msg = {str(k): v for k, v in message.items() if v is not None}
        role = msg.get("role")
        if not isinstance(role, str) or not role:
            raise TemplateError(f"message {i} has no role")
        msg["content"] = _content_text(msg.get("content"), image_placeholder, i)
        for key in ("reasoning_content", "thinking", "reasoning"):
            if isinstance(msg.get(key), str):
                msg.setdefault("reasoning_content", msg[key])
                break
        if "tool_calls" in msg:
            calls = msg["tool_calls"]
            if not isinstance(calls, Sequence) or isinstance(calls, str):
                raise TemplateError(f"message {i}: tool_calls must be a list")
            msg["tool_calls"] = [_normalize_tool_call(c, i) for c in calls]
            for call in msg["tool_calls"]:
                if isinstance(call.get("id"), str):
                    call_names[call["id"]] = call["function"]["name"]
        if role == "tool" and "name" not in msg and msg.get("tool_call_id") in call_names:
            msg["name"] = call_names[msg["tool_call_id"]]
        out.append(msg)
    return out


_TEXT_PARTS = frozenset({"text", "input_text", "output_text"})
_IMAGE_PARTS = frozenset({"image", "image_url", "input_image"})
_AUDIO_PARTS = frozenset({"input_audio", "audio"})


def _content_text(content: Any, image_placeholder: str | None, i: int) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Mapping):  # a single part sent without the list
        content = [content]
    if not isinstance(content, Sequence):
        raise TemplateError(f"message {i}: content must be a string or a list of parts")
    pieces: list[str] = []
    for part in content:
        if isinstance(part, str):
            pieces.append(part)
            continue
        if not isinstance(part, Mapping):
            raise TemplateError(f"message {i}: content part {part!r} is not an object")
        kind = part.get("type", "text" if "text" in part else None)
        if kind in _TEXT_PARTS:
            text = part.get("text")
            if not isinstance(text, str):
                raise TemplateError(f"message {i}: text part without a text string")
            pieces.append(text)
        elif kind in _IMAGE_PARTS:
            if image_placeholder:
                pieces.append(image_placeholder)
        elif kind in _AUDIO_PARTS:
            raise TemplateError(
                f"message {i}: unsupported content part type {kind!r}: audio input is not"
                " supported (no audio encoder: the gemma4a half of a Gemma 4 mmproj is not loaded)"
            )
        else:
            raise TemplateError(f"message {i}: unsupported content part type {kind!r}")
    return "\n".join(pieces)


def _normalize_tool_call(call: Any, i: int) -> dict[str, Any]:
    if not isinstance(call, Mapping):
        raise TemplateError(f"message {i}: tool call {call!r} is not an object")
    call = {k: v for k, v in call.items() if v is not None}
    function = call.get("function")
    if function is None and "name" in call:  # flat {name, arguments}, as some clients send
        function = {"name": call.pop("name"), "arguments": call.pop("arguments", None)}
    if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
        raise TemplateError(f"message {i}: tool call without function.name")
    function = {k: v for k, v in function.items() if v is not None}
    function["arguments"] = _arguments(function.get("arguments"))
    call["function"] = function
    call.setdefault("type", "function")
    return call


def _arguments(arguments: Any) -> Any:
    if arguments is None:
        return {}
    if isinstance(arguments, str):
        if not arguments.strip():
            return {}
        try:
            parsed = json.loads(arguments)
        except (json.JSONDecodeError, RecursionError):
            return arguments  # a model's malformed call replayed: keep it as the model wrote it
        return parsed if isinstance(parsed, dict) else arguments
    if isinstance(arguments, Mapping):
        return dict(arguments)
    return arguments


def _plain(value: Any) -> Any:
    """Rebuild template inputs from plain JSON types.

    Objects the sandbox does not know (numpy scalars, pydantic models, str subclasses) may carry
    methods a template could call; templates only need JSON data, so anything else becomes an
    inert "<TypeName>" string.
    """
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, np.generic):
        return _plain(value.item())
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


# ----------------------------------------------------------------------------- Jinja environment


class _RaisedByTemplate(Exception):
    """`raise_exception(msg)` called by a template; rewrapped with the template's name."""


class _Sandbox(ImmutableSandboxedEnvironment):
    """Fail on unsafe attribute access instead of returning an Undefined that prints as "".

    Stock Jinja only raises once the Undefined is used further; `{{ x.__class__ }}` would render
    silently. No legitimate chat template touches underscore attributes.
    """

    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        raise SecurityError(
            f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe"
        )


def _check_namespace_name(name: Any) -> None:
    if isinstance(name, str) and name.startswith("_"):
        raise SecurityError(f"namespace attribute {name!r} starts with an underscore")


class _TemplateNamespace(Namespace):
    """`namespace()` that refuses underscore names, as transformers' does."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: B902 - Namespace's own signature
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _check_namespace_name(name)
        Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _check_namespace_name(name)
        Namespace.__setitem__(self, name, value)


class _TemplateDict:
    """`dict(...)` for templates without handing them the `dict` type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


def _raise_exception(message: Any) -> None:
    raise _RaisedByTemplate(str(message))


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | str | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    """transformers' `tojson`: plain `json.dumps`, no HTML escaping, non-ASCII kept as is."""
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@cache
def _environment() -> _Sandbox:
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _TemplateNamespace
    env.globals["dict"] = _TemplateDict()
    return env


@lru_cache(maxsize=32)
def _compile(source: str) -> jinja2.Template:
    return _environment().from_string(source)


# ----------------------------------------------------------------------------- ChatTemplate


class ChatTemplate:
    """A compiled chat template plus the special-token strings it prints.

    `name` says where the template came from ("GGUF chat template", "built-in gemma template") and
    prefixes every error. `tool_use`, when set, is a second template that GGUF files may carry as
    `tokenizer.chat_template.tool_use`; it renders requests that pass tools, as transformers does.
    """

    def __init__(
        self,
        source: str,
        *,
        name: str = "chat template",
        special_tokens: Mapping[str, str] | None = None,
        tool_use: ChatTemplate | None = None,
    ) -> None:
        self.source = source
        self.name = name
        self.special_tokens: dict[str, str] = dict(special_tokens or {})
        self.tool_use = tool_use
        try:
            self._template = _compile(source)
        except jinja2.TemplateSyntaxError as e:
            raise TemplateError(f"{name} has a syntax error at line {e.lineno}: {e.message}") from e
        except jinja2.TemplateError as e:
            raise TemplateError(f"{name} does not compile: {e}") from e

    @classmethod
    def from_string(
        cls,
        source: str,
        *,
        name: str = "chat template",
        special_tokens: Mapping[str, str] | None = None,
    ) -> ChatTemplate:
        """A template given as text (a user override, or a test fixture)."""
        return cls(source, name=name, special_tokens=special_tokens)

    @classmethod
    def builtin(cls, family: str, special_tokens: Mapping[str, str] | None = None) -> ChatTemplate:
        """One of `BUILTIN_TEMPLATES` ("gemma", "llama3", "chatml", "qwen3")."""
        if family not in BUILTIN_TEMPLATES:
            raise TemplateError(
                f"no built-in chat template {family!r}; known: {', '.join(BUILTIN_TEMPLATES)}"
            )
        tokens = {**_BUILTIN_SPECIAL_TOKENS[family], **(special_tokens or {})}
        return cls(
            BUILTIN_TEMPLATES[family], name=f"built-in {family} template", special_tokens=tokens
        )

    @classmethod
    def from_metadata(
        cls,
        metadata: Mapping[str, Any],
        architecture: str | None = None,
        *,
        special_tokens: Mapping[str, str] | None = None,
    ) -> ChatTemplate:
        """The file's `tokenizer.chat_template` if it has one, else the family's built-in.

        `architecture` defaults to `general.architecture`; `special_tokens` override the strings
        found from the vocab (e.g. when the tokenizer knows better).
        """
        tokens = {**special_tokens_from_metadata(metadata), **(special_tokens or {})}
        source = metadata.get("tokenizer.chat_template")
        if isinstance(source, str) and source.strip():
            tool_use = None
            tool_source = metadata.get("tokenizer.chat_template.tool_use")
            if isinstance(tool_source, str) and tool_source.strip():
                tool_use = cls(
                    tool_source, name="GGUF tool_use chat template", special_tokens=tokens
                )
            return cls(source, name="GGUF chat template", special_tokens=tokens, tool_use=tool_use)
        arch = architecture or metadata.get("general.architecture")
        family = builtin_family(
            arch if isinstance(arch, str) else None, metadata.get("tokenizer.ggml.tokens")
        )
        return cls.builtin(family, tokens)

    @property
    def bos_token(self) -> str:
        return self.special_tokens.get("bos_token") or ""

    @cached_property
    def bos_in_template(self) -> bool:
        """Whether rendered prompts already begin with the BOS string.

        When True the tokenizer must not add BOS again (a doubled BOS degrades output). Found by
        rendering a one-message conversation; a template that rejects that probe is judged by
        whether its text mentions `bos_token` at all.
        """
        bos = self.bos_token
        if not bos:
            return False
        try:
            probe = self.render([{"role": "user", "content": "Hello"}])
        except TemplateError:
            return "bos_token" in self.source or bos in self.source
        return probe.startswith(bos)

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        enable_thinking: bool | None = None,
        image_placeholder: str | None = None,
        **extra: Any,
    ) -> str:
        """The prompt text for `messages`. To tokenize a conversation, use `tokenize`: this text
        alone does not tell the template's control tokens from the same text in a message.

        `enable_thinking` is left undefined in the template when None, so templates that default
        it themselves (`{% if enable_thinking is not defined %}`) keep their default. `extra`
        kwargs become template variables (e.g. `date_string`, `reasoning_effort`) and may override
        the special-token strings, as in transformers.
        """
        if tools and self.tool_use is not None:
            return self.tool_use.render(
                messages,
                tools=tools,
                add_generation_prompt=add_generation_prompt,
                enable_thinking=enable_thinking,
                image_placeholder=image_placeholder,
                **extra,
            )
        context = self._context(
            messages, tools, add_generation_prompt, enable_thinking, image_placeholder, extra
        )
        return self._run(self._template, context)

    def render_marked(
        self,
        messages: Sequence[Mapping[str, Any]],
        controls: frozenset[str],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        enable_thinking: bool | None = None,
        image_placeholder: str | None = None,
        **extra: Any,
    ) -> tuple[str, list[tuple[int, int]]]:
        """`render`'s text, and the (start, end) character spans of the control tokens (texts
        among `controls`, e.g. `Tokenizer.control_texts`) that the template itself wrote.

        Control-token text that comes from the request (message content, tool definitions,
        results and arguments, names, `extra`) is never in a span (see tsjax.chat_markers).
        """
        if tools and self.tool_use is not None:
            return self.tool_use.render_marked(
                messages,
                controls,
                tools=tools,
                add_generation_prompt=add_generation_prompt,
                enable_thinking=enable_thinking,
                image_placeholder=image_placeholder,
                **extra,
            )
        trusted = {k: v for k, v in self.special_tokens.items() if k not in extra}
        marked = marked_template(
            _environment(), self.source, controls, tuple(sorted(trusted.values()))
        )
        context = self._context(
            messages, tools, add_generation_prompt, enable_thinking, image_placeholder, extra
        )
        client = [v for k, v in context.items() if k not in trusted]
        markers = marked.choose_markers(client)
        if markers is None:
            raise TemplateError(
                f"{self.name}: the request uses every private-use code point, leaving none to "
                "mark the template's control tokens with"
            )
        context.update({k: marked.mark(v, markers) for k, v in trusted.items()})
        context.update(marked.variables(markers))
        try:
            output = self._run(marked.template, context)
        except TemplateError as e:
            raise TemplateError(marked.restore(str(e), markers)) from e.__cause__
        return marked.unmark(output, markers)

    def tokenize(
        self,
        tokenizer: Tokenizer,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        enable_thinking: bool | None = None,
        image_placeholder: str | None = None,
        **extra: Any,
    ) -> tuple[list[int], str]:
        """The prompt ids [T] and text for `messages`: the template's own control tokens are
        control ids, and everything the request supplied is tokenized as text, so control-token
        text typed in a message cannot open or close a turn. Ids are `encode(text)`'s when the
        request has no control-token text. BOS is added unless the template writes it.
        Arguments as in `render`.
        """
        text, spans = self.render_marked(
            messages,
            tokenizer.control_texts,
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            enable_thinking=enable_thinking,
            image_placeholder=image_placeholder,
            **extra,
        )
        add_bos = None if not self.bos_in_template else False
        return tokenizer.encode_marked(text, spans, add_bos=add_bos), text

    def _context(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None,
        add_generation_prompt: bool,
        enable_thinking: bool | None,
        image_placeholder: str | None,
        extra: Mapping[str, Any],
    ) -> dict[str, Any]:
        msgs = normalize_messages(messages, image_placeholder=image_placeholder)
        context: dict[str, Any] = dict(self.special_tokens)
        context.update(_plain(extra))
        context["messages"] = _plain(msgs)
        context["tools"] = _plain(list(tools)) if tools is not None else None
        context["add_generation_prompt"] = bool(add_generation_prompt)
        if enable_thinking is not None:
            context["enable_thinking"] = bool(enable_thinking)
        return context

    def _run(self, template: jinja2.Template, context: dict[str, Any]) -> str:
        try:
            return template.render(context)
        except _RaisedByTemplate as e:
            raise TemplateError(f"{self.name} rejected the conversation: {e}") from e
        except SecurityError as e:
            raise TemplateError(f"{self.name} attempted an unsafe operation: {e}") from e
        except jinja2.TemplateError as e:
            raise TemplateError(f"{self.name} failed to render: {e}") from e
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
            # e.g. `'x' + none` or `messages[0]` on an empty list inside the template
            raise TemplateError(f"{self.name} failed to render: {type(e).__name__}: {e}") from e

    def __repr__(self) -> str:
        return f"ChatTemplate({self.name!r}, {len(self.source)} chars)"
