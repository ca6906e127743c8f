"""One response through the model's output parser, for every API style.

`Reply` feeds each engine text piece through the model's output parser (serve/outputs) and
keeps the whole-response view, so adapters emit one wire delta per parser event while streaming
and the full fields at the end. `problem()` checks the finished answer against what was asked
(JSON that validates, a forced call whose arguments validate); `complete` runs a non-streamed
request and turns a problem into a 422 (`complete_all` for a request's `n` answers).
"""

from __future__ import annotations

import json
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from serve.engine import Engine, EventKind, FinishReason, GenerationRequest, TokenEvent
from serve.errors import ApiError
from serve.outputs import MalformedCall, OutputEvent, ParsedOutput, ToolCall
from serve.state import Hub
from serve.translation.plan import Plan, callable_tools
from tsjax.logprobs import TokenLogprob


class Reply:
    """One response through the model's output parser: the events for streaming, and the
    whole-response view (reasoning, content, calls) for the final fields and validation."""

    def __init__(self, hub: Hub, plan: Plan, prompt_text: str) -> None:
        self.plan = plan
        schemas = {t["function"]["name"]: t["function"].get("parameters") or {} for t in plan.tools}
        self.parser = hub.output_format().parser(
            prompt_text, tools=plan.parse_tools, schemas=schemas
        )
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
        except (json.JSONDecodeError, RecursionError) as e:
            return f"the answer is not valid JSON: {e}{cut}"
        if plan.output.schema is None:
            return None if isinstance(value, dict) else "the answer is not a JSON object"
        return schema_error(value, plan.output.schema)


@dataclass
class Answer:
    """One answer of a finished request: its text, its final (DONE or ERROR) event, its
    tokens' log-probabilities (if asked) and the prompt's (if asked)."""

    index: int
    text: str = ""
    final: TokenEvent = field(
        default_factory=lambda: TokenEvent(EventKind.ERROR, error="no result")
    )
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None


async def complete(hub: Hub, req: GenerationRequest, reply: Reply) -> TokenEvent:
    """Run a non-streamed request to its end and parse the answer into `reply`. A failed
    generation is a 500; an answer that breaks what was asked (JSON that does not validate, a
    forced call that is missing) is a 422. Returns the engine's final event."""
    return (await complete_all(hub, req, [reply]))[0].final


async def complete_all(hub: Hub, req: GenerationRequest, replies: list[Reply]) -> list[Answer]:
    """`complete` for each of a request's answers (`replies[i]` parses answer i)."""
    answers = await run_answers(hub.engine, req)  # type: ignore[arg-type]
    for answer, reply in zip(answers, replies, strict=True):
        final = answer.final
        if final.kind is EventKind.ERROR:
            raise generation_failed(hub, final)
        reply.parse(answer.text)
        problem = reply.problem(final.finish_reason is FinishReason.LENGTH)
        if problem:
            raise ApiError(
                422, problem if len(answers) == 1 else f"choice {answer.index}: {problem}"
            )
    return answers


async def run_answers(engine: Engine, req: GenerationRequest) -> list[Answer]:
    """Generate without streaming: each of the request's `n` answers, in order."""
    answers = [Answer(i) for i in range(req.n)]
    async with aclosing(engine.generate(req)) as events:
        async for ev in events:
            answer = answers[ev.index]
            answer.logprobs.extend(ev.logprobs)
            if ev.prompt_logprobs is not None:
                answer.prompt_logprobs = ev.prompt_logprobs
            if ev.kind is EventKind.TOKEN:
                answer.text += ev.text
            elif ev.kind in (EventKind.DONE, EventKind.ERROR):
                answer.final = ev
    return answers


def generation_failed(hub: Hub, final: TokenEvent) -> ApiError:
    """A failed generation: a 503 when the server ended it to shut down, else a 500."""
    return ApiError(503 if hub.draining else 500, final.error or "generation failed")


async def run_to_end(engine: Engine, req: GenerationRequest) -> tuple[str, TokenEvent]:
    """Generate without streaming: the whole text and the final (DONE or ERROR) event."""
    answer = (await run_answers(engine, req))[0]
    return answer.text, answer.final


def schema_error(value: Any, schema: dict[str, Any]) -> str | None:
    """The first way `value` fails `schema` (with its JSON path), or None."""
    import jsonschema

    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        err = jsonschema.exceptions.best_match(cls(schema).iter_errors(value))
    except RecursionError:  # a recursive schema ($ref) over a very deep value
        return "the value is nested too deeply to validate"
    if err is None:
        return None
    where = "/".join(str(p) for p in err.absolute_path) or "(root)"
    return f"at {where}: {err.message}"
