"""Thinking, tool calling and structured outputs, shared by every API style.

The adapters only read their dialect's fields and write their dialect's shapes; what those
fields mean is decided here once:

* `Plan`: what one request asks for (thinking on or off, which tools reach the template, the
  tool choice, a response schema) and the grammar `Constraint` that enforces it. Everything that
  can be wrong with a request (an unknown forced tool, an invalid schema) is a 400 raised while
  planning, before anything is queued: a grammar that cannot be built never "fails open" into
  unconstrained text (llama.cpp#19051).
* `Reply`: one response's parser state. It feeds each engine text piece through the model's
  output parser (serve/outputs) and keeps the whole-response view, so adapters can emit one
  wire delta per parser event while streaming and the full fields at the end. `problem()` checks
  the finished answer against what was asked (JSON that validates, a forced call whose arguments
  validate); adapters turn a problem into a 422.

Constraints are written in the model's own output syntax (serve/outputs/grammars.py): a forced
tool call (`tool_choice: "required"` or a named function) is a grammar for calls in the syntax
the model's parser reads, for every syntax we parse (generic JSON, Hermes, Llama 3, Gemma 4,
Mistral, Harmony), with arguments valid under the tool's parameters. A response format under
`tool_choice: "auto"` with tools is the union: a valid call, or content valid under the format.

With thinking not switched off, the grammar begins with an optional reasoning block in the
model's syntax (a mandatory block end when the prompt opened it), so the model still reasons
freely, the JSON lands in `content` (ollama#10929, vllm#50948), and a model that answers without
reasoning is constrained from its first token instead of never (the constraint used to wait
for the block's end marker).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from serve.outputs import (
    MalformedCall,
    OutputEvent,
    OutputFormat,
    ParsedOutput,
    ToolCall,
)
from serve.outputs.grammars import UnsupportedFormat, answer_format, call_object

if TYPE_CHECKING:
    from serve.protocols.common import ApiError, Hub


# -- request fields -----------------------------------------------------------------------------


def think_of(value: Any, error: type[ApiError], param: str = "think") -> bool | None:
    """Ollama's `think`: a boolean, or an effort level ("low", "medium", "high", "max"),
    which means on. None leaves the template's own default."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("low", "medium", "high", "max"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("none", "false", "off"):
        return False
    raise error(
        400, f"{param} must be a boolean or one of low, medium, high, max; got {value!r}", param
    )


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


def normalize_tools(raw: list[Any] | None, error: type[ApiError]) -> list[dict[str, Any]]:
    """Tools as `{"type":"function","function":{"name","description","parameters"}}`, the shape
    chat templates iterate. The flat `{"name", "parameters"}` form is accepted too. A tool
    without a name, or with parameters that are not an object schema, is a 400."""
    out: list[dict[str, Any]] = []
    for i, tool in enumerate(raw or []):
        if not isinstance(tool, dict):
            raise error(400, f"tools[{i}] must be an object", f"tools[{i}]")
        kind = tool.get("type", "function")
        if kind != "function":
            raise error(400, f"tools[{i}].type {kind!r} is not supported; use \"function\"",
                        f"tools[{i}].type")  # fmt: skip
        fn = tool.get("function", tool if "name" in tool else None)
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise error(400, f"tools[{i}].function.name is required", f"tools[{i}].function")
        params = fn.get("parameters")
        if params is None:
            params = {"type": "object", "properties": {}}
        if not isinstance(params, dict):
            raise error(400, f"tools[{i}].function.parameters must be a JSON schema object",
                        f"tools[{i}].function.parameters")  # fmt: skip
        entry = {"name": fn["name"], "parameters": params}
        if fn.get("description"):
            entry["description"] = fn["description"]
        out.append({"type": "function", "function": entry})
    names = [t["function"]["name"] for t in out]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise error(400, f"tool name {dup!r} is declared twice", "tools")
    return out


def tool_choice_of(choice: Any, tools: list[dict[str, Any]], error: type[ApiError]) -> str:
    """The choice: "auto", "none", "required", or the one function that must be called."""
    if choice is None:
        return "auto"
    name = None
    if isinstance(choice, str):
        if choice not in ("auto", "none", "required"):
            raise error(400, f"tool_choice must be auto, none, required or a function; "
                        f"got {choice!r}", "tool_choice")  # fmt: skip
        if choice == "required" and not tools:
            raise error(400, 'tool_choice "required" needs at least one tool', "tool_choice")
        return choice
    if isinstance(choice, dict):
        fn = choice.get("function", choice)
        name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str) or not name:
        raise error(400, 'tool_choice must be a string or {"type":"function","function":'
                    '{"name":...}}', "tool_choice")  # fmt: skip
    if name not in {t["function"]["name"] for t in tools}:
        raise error(400, f"tool_choice names {name!r}, which is not among the tools",
                    "tool_choice")  # fmt: skip
    return name


@dataclass
class OutputSpec:
    """A structured-output request: any JSON object, or JSON valid under `schema`."""

    schema: dict[str, Any] | None = None  # None: any JSON object
    strict: bool = False
    name: str = ""


def openai_format(rf: Any, error: type[ApiError]) -> OutputSpec | None:
    """OpenAI `response_format`: text (None), json_object, or json_schema."""
    if rf is None:
        return None
    param = "response_format"
    if not isinstance(rf, dict):
        raise error(400, "response_format must be an object", param)
    kind = rf.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return OutputSpec()
    if kind != "json_schema":
        raise error(400, f"response_format.type must be text, json_object or json_schema; "
                    f"got {kind!r}", "response_format.type")  # fmt: skip
    wrapper = rf.get("json_schema", rf)
    if not isinstance(wrapper, dict):
        raise error(400, "response_format.json_schema must be an object",
                    "response_format.json_schema")  # fmt: skip
    schema = wrapper.get("schema")
    if not isinstance(schema, dict):
        raise error(400, "response_format.json_schema.schema must be a JSON schema object",
                    "response_format.json_schema.schema")  # fmt: skip
    return OutputSpec(schema, strict=wrapper.get("strict") is True, name=wrapper.get("name", ""))


def ollama_format(fmt: Any, error: type[ApiError]) -> OutputSpec | None:
    """Ollama `format`: "json" (any JSON object) or a JSON schema object; "" means none."""
    if fmt is None or fmt == "":
        return None
    if fmt == "json":
        return OutputSpec()
    if isinstance(fmt, dict):
        return OutputSpec(fmt)
    raise error(400, f'format must be "json" or a JSON schema object; got {fmt!r}', "format")


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
        except json.JSONDecodeError:
            pass
    return {"name": fn.get("name", "") if isinstance(fn, dict) else "", "arguments": args}


# -- the plan -----------------------------------------------------------------------------------


@dataclass
class Plan:
    """What one request asks of the output, and the constraint that enforces it."""

    think: bool | None = None
    tools: list[dict[str, Any]] = field(default_factory=list)  # what the template sees
    choice: str = "auto"
    output: OutputSpec | None = None
    constraint: Any = None  # a fresh tsjax.grammar.Constraint, or None

    @property
    def parse_tools(self) -> bool:
        return bool(self.tools)

    @property
    def forced(self) -> bool:
        return self.choice not in ("auto", "none")

    @property
    def template_tools(self) -> list[dict[str, Any]] | None:
        return self.tools or None

    def parameters_of(self, name: str) -> dict[str, Any] | None:
        for t in self.tools:
            if t["function"]["name"] == name:
                return t["function"]["parameters"]
        return None


def plan_of(
    *,
    tools: list[dict[str, Any]],
    choice: str,
    think: bool | None,
    output: OutputSpec | None,
    error: type[ApiError],
) -> Plan:
    """The request's plan, before any grammar is built. `tool_choice: "none"` hides the tools
    from the template and turns tool parsing off."""
    if output is not None and choice not in ("auto", "none"):
        why = "the answer would have to be both a call and the format"
        raise error(400, f"a response format cannot be combined with a forced tool_choice: {why}",
                    "tool_choice")  # fmt: skip
    return Plan(think=think, tools=[] if choice == "none" else tools, choice=choice, output=output)


def call_schema(plan: Plan) -> dict[str, Any]:
    """JSON schema of one call `{"name", "arguments"}` to a tool the choice allows."""
    variants = [call_object(n, p) for n, p in callable_tools(plan)]
    return variants[0] if len(variants) == 1 else {"anyOf": variants}


def callable_tools(plan: Plan) -> list[tuple[str, dict[str, Any]]]:
    """(name, parameters) of the tools the grammar lets the answer call: the forced one, all
    of them for "required", all of them beside a response format under "auto", else none."""
    if plan.forced:
        names = [t["function"]["name"] for t in plan.tools]
        names = names if plan.choice == "required" else [plan.choice]
    elif plan.output is not None and plan.choice == "auto":
        names = [t["function"]["name"] for t in plan.tools]
    else:
        names = []
    return [(n, plan.parameters_of(n) or {}) for n in names]


def _build_constraint(hub: Hub, plan: Plan, fmt: OutputFormat, prompt_text: str) -> Any:
    """Blocking: compile the grammar for the plan (None when nothing is enforced)."""
    from tsjax.grammar import GrammarError, check_schema

    tools = callable_tools(plan)
    if not tools and plan.output is None:
        return None
    if tools:
        try:
            check_schema(call_schema(plan) if plan.forced else {"anyOf": [p for _, p in tools]})
        except GrammarError as e:
            raise ValueError(f"tool parameters: {e}") from e
    output = None if plan.output is None else (plan.output.schema, plan.output.strict)
    grammars = hub.grammars()
    tree = answer_format(grammars, fmt, tools=tools, output=output, think=plan.think,
                         prompt_text=prompt_text)  # fmt: skip
    return grammars.structural(tree)


async def constrain(hub: Hub, plan: Plan, error: type[ApiError], prompt_text: str = "") -> Plan:
    """Build the plan's constraint (off the event loop: compiling a schema takes a while). An
    invalid schema, or a tool syntax without a grammar, is a 400 naming the problem.
    `prompt_text`: the rendered prompt, whose end tells whether it opened a reasoning block."""
    from tsjax.grammar import GrammarError

    if not plan.forced and plan.output is None:
        return plan
    fmt = hub.output_format()
    try:
        plan.constraint = await asyncio.to_thread(_build_constraint, hub, plan, fmt, prompt_text)
    except UnsupportedFormat as e:
        raise error(400, f"tool_choice {plan.choice!r} with this model's tool-call syntax "
                    f"cannot be enforced ({e}); use tool_choice \"auto\" without a "
                    f"response format", "tool_choice") from e  # fmt: skip
    except (GrammarError, ValueError) as e:
        param = "tools" if plan.forced else "format"
        raise error(400, f"invalid {'tool parameters' if plan.forced else 'schema'}: {e}",
                    param) from e  # fmt: skip
    return plan


def apply(plan: Plan, req: Any) -> Any:
    """Put the plan's constraint on an engine request."""
    req.constraint = plan.constraint
    return req


# -- the reply ----------------------------------------------------------------------------------


class Reply:
    """One response through the model's output parser: the events for streaming, and the
    whole-response view (reasoning, content, calls) for the final fields and validation."""

    def __init__(self, hub: Hub, plan: Plan, prompt_text: str) -> None:
        self.plan = plan
        self.parser = hub.output_format().parser(prompt_text, tools=plan.parse_tools)
        self.parsed = ParsedOutput()

    @property
    def reasoning(self) -> str:
        return self.parsed.reasoning

    @property
    def content(self) -> str:
        return self.parsed.content

    @property
    def calls(self) -> list[ToolCall]:
        return self.parsed.tool_calls

    @property
    def malformed(self) -> list[MalformedCall]:
        return self.parsed.malformed

    def push(self, text: str) -> list[OutputEvent]:
        return self.parsed.add(self.parser.push(text)) if text else []

    def finish(self) -> list[OutputEvent]:
        return self.parsed.add(self.parser.finish())

    def parse(self, text: str) -> None:
        """The whole text at once (non-streaming replies)."""
        self.push(text)
        self.finish()

    def problem(self, truncated: bool = False) -> str | None:
        """Why the finished answer does not meet the request, or None. `truncated`: the token
        budget ended it, which is the usual reason JSON is incomplete."""
        plan = self.plan
        cut = " (the answer was cut off by the token limit; raise max_tokens)" if truncated else ""
        if plan.forced and not self.calls:
            return f"the model did not produce the required tool call{cut}"
        if self.calls and (plan.forced or plan.output is not None):
            allowed = dict(callable_tools(plan))  # what the grammar allowed, checked again
            for call in self.calls:
                if call.name not in allowed:
                    return f"the model called {call.name!r}, which the tool_choice does not allow"
                err = schema_error(call.arguments, allowed[call.name])
                if err:
                    return f"arguments of {call.name!r} do not match its parameters: {err}"
            return None
        if plan.output is None:
            return None
        try:
            value = json.loads(self.content)
        except json.JSONDecodeError as e:
            return f"the answer is not valid JSON: {e}{cut}"
        if plan.output.schema is None:
            return None if isinstance(value, dict) else "the answer is not a JSON object"
        return schema_error(value, plan.output.schema)


async def complete(hub: Hub, req: Any, reply: Reply, error: type[ApiError]) -> Any:
    """Run a non-streamed request to its end and parse the answer into `reply`. A failed
    generation is a 500; an answer that breaks what was asked (JSON that does not validate, a
    forced call that is missing) is a 422. Returns the engine's final event."""
    from serve.engine import EventKind, FinishReason
    from serve.protocols.common import run_to_end

    text, final = await run_to_end(hub.engine, req)  # type: ignore[arg-type]
    if final.kind is EventKind.ERROR:
        raise error(500, final.error or "generation failed")
    reply.parse(text)
    problem = reply.problem(final.finish_reason is FinishReason.LENGTH)
    if problem:
        raise error(422, problem)
    return final


def schema_error(value: Any, schema: dict[str, Any]) -> str | None:
    """The first way `value` fails `schema` (with its JSON path), or None."""
    import jsonschema

    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    err = jsonschema.exceptions.best_match(cls(schema).iter_errors(value))
    if err is None:
        return None
    where = "/".join(str(p) for p in err.absolute_path) or "(root)"
    return f"at {where}: {err.message}"
