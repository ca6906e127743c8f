"""Tools as chat templates read them, written once for every API style: the tool list
normalized and checked, the tool choice, and for templates without tool syntax the generic
prompt that shows the model the tools and the JSON call format.
"""

from __future__ import annotations

import json
from typing import Any

from serve.errors import ApiError


def normalize_tools(raw: list[Any] | None) -> list[dict[str, Any]]:
    """Tools as `{"type":"function","function":{"name","description","parameters"}}`, the shape
    chat templates iterate. The flat `{"name", "parameters"}` form is accepted too. A tool
    without a name, or with parameters that are not an object schema, is a 400."""
    out: list[dict[str, Any]] = []
    for i, tool in enumerate(raw or []):
        if not isinstance(tool, dict):
            raise ApiError(400, f"tools[{i}] must be an object", f"tools[{i}]")
        kind = tool.get("type", "function")
        if kind != "function":
            raise ApiError(400, f"tools[{i}].type {kind!r} is not supported; use \"function\"",
                           f"tools[{i}].type")  # fmt: skip
        fn = tool.get("function", tool if "name" in tool else None)
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ApiError(400, f"tools[{i}].function.name is required", f"tools[{i}].function")
        params = fn.get("parameters")
        if params is None:
            params = {"type": "object", "properties": {}}
        if not isinstance(params, dict):
            raise ApiError(400, f"tools[{i}].function.parameters must be a JSON schema object",
                           f"tools[{i}].function.parameters")  # fmt: skip
        entry = {"name": fn["name"], "parameters": params}
        if fn.get("description"):
            entry["description"] = fn["description"]
        out.append({"type": "function", "function": entry})
    names = [t["function"]["name"] for t in out]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise ApiError(400, f"tool name {dup!r} is declared twice", "tools")
    return out


def tool_choice_of(choice: Any, tools: list[dict[str, Any]]) -> str:
    """The choice: "auto", "none", "required", or the one function that must be called."""
    if choice is None:
        return "auto"
    name = None
    if isinstance(choice, str):
        if choice not in ("auto", "none", "required"):
            raise ApiError(400, f"tool_choice must be auto, none, required or a function; "
                           f"got {choice!r}", "tool_choice")  # fmt: skip
        if choice == "required" and not tools:
            raise ApiError(400, 'tool_choice "required" needs at least one tool', "tool_choice")
        return choice
    if isinstance(choice, dict):
        fn = choice.get("function", choice)
        name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str) or not name:
        raise ApiError(400, 'tool_choice must be a string or {"type":"function","function":'
                       '{"name":...}}', "tool_choice")  # fmt: skip
    if name not in {t["function"]["name"] for t in tools}:
        raise ApiError(400, f"tool_choice names {name!r}, which is not among the tools",
                       "tool_choice")  # fmt: skip
    return name


# -- prompts for templates without tool syntax ------------------------------------------------

GENERIC_TOOL_PROMPT = (
    "You can call these tools (JSON schemas of their parameters):\n{tools}\n\n"
    "To call a tool, answer with only a JSON object "
    '{{"name": <tool name>, "arguments": <object matching its parameters>}} and nothing else. '
    "Tool results come back in messages with the role tool. If no tool is needed, answer "
    "normally."
)


def with_generic_tools(
    messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, template_source: str
) -> list[dict[str, Any]]:
    """Messages a template without tool syntax can still show the model: the tool list and the
    generic JSON call format as system text (templates that never read `tools` drop them), and
    an earlier assistant call as that JSON in its content (they drop `tool_calls` too). Tool
    results render as ordinary `tool` turns. Templates that handle tools are left alone."""
    out = list(messages)
    if tools and "tools" not in template_source:
        listed = json.dumps([t["function"] for t in tools], ensure_ascii=False)
        note = GENERIC_TOOL_PROMPT.format(tools=listed)
        if out and out[0].get("role") == "system" and isinstance(out[0].get("content"), str):
            out[0] = {**out[0], "content": f"{out[0]['content'].rstrip()}\n\n{note}"}
        else:
            out.insert(0, {"role": "system", "content": note})
    if "tool_calls" not in template_source:
        for i, m in enumerate(out):
            if m.get("role") == "assistant" and m.get("tool_calls"):
                calls = [_call_json(c) for c in m["tool_calls"]]
                text = json.dumps(calls[0] if len(calls) == 1 else calls, ensure_ascii=False)
                content = m.get("content") if isinstance(m.get("content"), str) else ""
                out[i] = {**m, "content": f"{content}\n{text}" if content else text}
    return out


def _call_json(call: Any) -> dict[str, Any]:
    fn = call.get("function", call) if isinstance(call, dict) else {}
    args = fn.get("arguments", {}) if isinstance(fn, dict) else {}
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except (json.JSONDecodeError, RecursionError):
            pass
    return {"name": fn.get("name", "") if isinstance(fn, dict) else "", "arguments": args}
