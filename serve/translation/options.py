"""Request options that API styles spell differently, read into the `Intent`'s terms once:
thinking (Ollama's `think` with effort levels; OpenAI's `reasoning_effort` and template
kwargs), response formats (OpenAI's `response_format`, Ollama's `format`) and stop strings.
Adapters that share a spelling share its reader; a bad value is a 400 naming the field.
"""

from __future__ import annotations

from typing import Any

import msgspec

from serve.errors import ApiError
from serve.translation.intent import OutputSpec


def think_of(value: Any, param: str = "think") -> bool | None:
    """Ollama's `think`: a boolean, or an effort level ("low", "medium", "high", "max", ...),
    which means on (`effort_of` reads the level). None leaves the template's own default."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _EFFORTS:
        return True
    if isinstance(value, str) and value.strip().lower() in ("none", "false", "off"):
        return False
    raise ApiError(
        400, f"{param} must be a boolean or one of {', '.join(_EFFORTS)}; got {value!r}", param
    )


# Effort levels the APIs spell -> what templates that read `reasoning_effort` take (GPT-OSS's
# Harmony system message knows low, medium and high).
_EFFORTS = {"minimal": "low", "low": "low", "medium": "medium", "high": "high", "xhigh": "high",
            "max": "high"}  # fmt: skip


def effort_of(value: Any, param: str = "think") -> str | None:
    """The reasoning effort a thinking field asks for (Ollama's and the Web UI's `think`,
    OpenAI's `reasoning_effort`): "low", "medium" or "high" for a level, None for a boolean,
    "none" or nothing (the template's default). Checked by `think_of` / `openai_think`."""
    if not isinstance(value, str):
        return None
    level = value.strip().lower()
    if level in ("none", "false", "off"):
        return None
    if level not in _EFFORTS:
        raise ApiError(400, f"{param} must be one of none, {', '.join(_EFFORTS)}; got {value!r}",
                       param)  # fmt: skip
    return _EFFORTS[level]


def openai_think(
    think: bool | None, reasoning_effort: str | None, template_kwargs: dict[str, Any] | None
) -> bool | None:
    """OpenAI's ways of asking: `chat_template_kwargs.enable_thinking` wins, then the `think`
    extension, then `reasoning_effort` (any value but "none" means on)."""
    kwargs = template_kwargs or {}
    if isinstance(kwargs.get("enable_thinking"), bool):
        return kwargs["enable_thinking"]
    if think is not None:
        return think
    if reasoning_effort is not None:
        return reasoning_effort.strip().lower() != "none"
    return None


def openai_format(rf: Any) -> OutputSpec | None:
    """OpenAI `response_format`: text (None), json_object, or json_schema."""
    if rf is None:
        return None
    param = "response_format"
    if not isinstance(rf, dict):
        raise ApiError(400, "response_format must be an object", param)
    kind = rf.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return OutputSpec(param=param)
    if kind != "json_schema":
        raise ApiError(400, f"response_format.type must be text, json_object or json_schema; "
                       f"got {kind!r}", "response_format.type")  # fmt: skip
    wrapper = rf.get("json_schema", rf)
    if not isinstance(wrapper, dict):
        raise ApiError(400, "response_format.json_schema must be an object",
                       "response_format.json_schema")  # fmt: skip
    schema = wrapper.get("schema")
    if not isinstance(schema, dict):
        raise ApiError(400, "response_format.json_schema.schema must be a JSON schema object",
                       "response_format.json_schema.schema")  # fmt: skip
    name = wrapper.get("name", "")
    return OutputSpec(schema, strict=wrapper.get("strict") is True,
                      name=name if isinstance(name, str) else "",
                      param="response_format.json_schema.schema")  # fmt: skip


def ollama_format(fmt: Any) -> OutputSpec | None:
    """Ollama `format`: "json" (any JSON object) or a JSON schema object; "" means none."""
    if fmt is None or fmt == "":
        return None
    if fmt == "json":
        return OutputSpec()
    if isinstance(fmt, dict):
        return OutputSpec(fmt)
    raise ApiError(400, f'format must be "json" or a JSON schema object; got {fmt!r}', "format")


def stop_of(stop: Any) -> tuple[str, ...] | None:
    """A request's `stop`: absent (UNSET) keeps the server's defaults (None), null clears them,
    a string or a list replaces them (empty strings dropped)."""
    if stop is msgspec.UNSET:
        return None
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,) if stop else ()
    return tuple(s for s in stop if s)
