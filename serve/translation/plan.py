"""What one request asks of the output, and the grammar constraint that enforces it.

* `Plan`: thinking on or off, which tools reach the template, the tool choice, a response
  schema, and the constraint. Everything that can be wrong with these (an unknown forced tool,
  an invalid schema) is a 400 raised while planning, before anything is queued: a grammar that
  cannot be built never "fails open" into unconstrained text (llama.cpp#19051).
* Constraints are written in the model's own output syntax (serve/outputs/grammars.py): a
  forced tool call (`tool_choice: "required"` or a named function) is a grammar for calls in
  the syntax the model's parser reads, for every syntax we parse (generic JSON, Hermes, Llama 3,
  Gemma 4, Mistral, Harmony), with arguments valid under the tool's parameters. A response
  format under `tool_choice: "auto"` with tools is the union: a valid call, or content valid
  under the format.
* With thinking not switched off, the grammar begins with an optional reasoning block in the
  model's syntax (a mandatory block end when the prompt opened it), so the model still reasons
  freely, the JSON lands in `content` (ollama#10929, vllm#50948), and a model that answers
  without reasoning is constrained from its first token instead of never (the constraint used
  to wait for the block's end marker).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from serve.errors import ApiError
from serve.outputs import OutputFormat
from serve.outputs.grammars import UnsupportedFormat, answer_format, call_object
from serve.state import Hub
from serve.translation.intent import OutputSpec

# Objects and arrays inside one another in a JSON schema. Checking a schema against its
# metaschema recurses about five Python frames a level: 200 levels exhausted the recursion
# limit (a 500); real schemas rarely go past 10.
MAX_SCHEMA_DEPTH = 64


def nesting(value: Any) -> int:
    """How many objects and arrays `value` nests inside one another (iterative: any depth)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, depth = stack.pop()
        children = v.values() if isinstance(v, dict) else v if isinstance(v, list) else None
        if children is None:
            continue
        deepest = max(deepest, depth)
        stack.extend((c, depth + 1) for c in children if isinstance(c, dict | list))
    return deepest


def check_schema_depth(schema: Any, param: str) -> None:
    """A 400 naming `param` for a schema nested deeper than MAX_SCHEMA_DEPTH."""
    depth = nesting(schema)
    if depth > MAX_SCHEMA_DEPTH:
        raise ApiError(400, f"the JSON schema in {param} nests {depth} levels deep; at most "
                       f"{MAX_SCHEMA_DEPTH} are accepted", param)  # fmt: skip


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
) -> Plan:
    """The request's plan, before any grammar is built. `tool_choice: "none"` hides the tools
    from the template and turns tool parsing off. Every schema (the response format's, each
    tool's parameters) is bounded in depth here, for every API style."""
    if output is not None and output.schema is not None:
        check_schema_depth(output.schema, output.param)
    for i, tool in enumerate(tools):
        check_schema_depth(tool["function"]["parameters"], f"tools[{i}].function.parameters")
    if output is not None and choice not in ("auto", "none"):
        why = "the answer would have to be both a call and the format"
        raise ApiError(400, f"a response format cannot be combined with a forced tool_choice: "
                       f"{why}", "tool_choice")  # fmt: skip
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
    single = plan.forced and plan.choice != "required"  # a named function: one call to it
    tree = answer_format(grammars, fmt, tools=tools, output=output, think=plan.think,
                         prompt_text=prompt_text, single_call=single)  # fmt: skip
    return grammars.structural(tree)


async def constrain(hub: Hub, plan: Plan, prompt_text: str = "") -> Plan:
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
        raise ApiError(400, f"tool_choice {plan.choice!r} with this model's tool-call syntax "
                       f"cannot be enforced ({e}); use tool_choice \"auto\" without a "
                       f"response format", "tool_choice") from e  # fmt: skip
    except (GrammarError, ValueError) as e:
        param = "tools" if plan.forced or plan.output is None else plan.output.param
        raise ApiError(400, f"invalid {'tool parameters' if plan.forced else 'schema'}: {e}",
                       param) from e  # fmt: skip
    return plan


def apply(plan: Plan, req: Any) -> Any:
    """Put the plan's constraint on an engine request."""
    req.constraint = plan.constraint
    return req
