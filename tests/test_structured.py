"""Thinking, tool calling and structured outputs on every API style.

Without a model: canned engine output (a fake engine) goes through each adapter's streaming and
whole-response paths, so reasoning split across tokens, streamed tool calls and the validation
of answers are checked for Ollama, OpenAI and the Web UI protocol alike. With the real default
model (the shared server of test_server.py): 20 JSON schemas through the `openai` and `ollama`
clients, forced tool calls, and the 400s for invalid schemas and tool choices.
"""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from typing import Any

import httpx
import jsonschema
import pytest

from serve.engine import EventKind, FinishReason, GenerationRequest, Stats, TokenEvent
from serve.errors import ApiError
from serve.outputs import select_format
from serve.protocols import ollama as ollama_api
from serve.protocols import openai as openai_api
from serve.protocols.webui import chat as webui_api
from serve.sessions import SessionStore
from serve.settings import Settings
from serve.state import Hub
from serve.translation import Intent, OutputSpec, Prepared, Reply
from serve.translation.options import openai_format, openai_think, think_of
from serve.translation.plan import Plan, apply, call_schema, plan_of
from serve.translation.prompt import Prompt
from serve.translation.tools import normalize_tools, tool_choice_of, with_generic_tools

QWEN_TEMPLATE = "{{ '<think>' }}{% if tools %}<tool_call>{% endif %}"  # a think + hermes format
TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "add", "description": "Add two integers",
        "parameters": {"type": "object", "properties": {"a": {"type": "integer"},
                       "b": {"type": "integer"}}, "required": ["a", "b"]}}},
]  # fmt: skip


# -- a fake engine: canned text pieces, no model ------------------------------------------------


class FakeEngine:
    def __init__(self, pieces: list[str], reason: FinishReason = FinishReason.STOP):
        self.pieces, self.reason = pieces, reason

    async def generate(self, req: GenerationRequest):
        for p in self.pieces:
            yield TokenEvent(EventKind.TOKEN, text=p, token_ids=(1,))
        stats = Stats(prompt_tokens=3, completion_tokens=len(self.pieces))
        yield TokenEvent(EventKind.DONE, finish_reason=self.reason, stats=stats)


def fake_hub(pieces: list[str], template: str = QWEN_TEMPLATE, arch: str = "qwen3", **kw) -> Hub:
    hub = Hub(Settings())
    hub.engine = FakeEngine(pieces, **kw)  # type: ignore[assignment]
    hub._format = select_format(arch, template)
    return hub


async def collect(source) -> list[Any]:
    return [x async for x in source]


def run(coro):
    return asyncio.run(coro)


def prepared(reply: Reply) -> Prepared:
    """One request's `Prepared` around `reply` (the adapters' streaming functions take it)."""
    model = SimpleNamespace(name="m", tokenizer=None)
    return Prepared(GenerationRequest([1]), [reply], reply.plan, Prompt([1], "", []), model)


def openai_chunks(hub: Hub, reply: Reply) -> list[Any]:
    shape = openai_api._Shape(True, "m")
    return run(collect(openai_api._chat_sse(hub, prepared(reply), shape, Intent(), False)))


def ollama_lines(hub: Hub, reply: Reply, key: str = "message") -> list[Any]:
    return run(collect(ollama_api._stream(hub, prepared(reply), Intent(model="m"), key, 0)))


THINKING = ["<thi", "nk>Two plus", " two is four.</th", "ink>\n\nThe answer", " is 4."]


def test_thinking_split_across_tokens_openai_stream_and_whole():
    hub = fake_hub(THINKING)
    reply = Reply(hub, Plan(think=True), "<|im_start|>assistant\n")
    chunks = openai_chunks(hub, reply)
    deltas = [c["choices"][0]["delta"] for c in chunks if isinstance(c, dict) and c["choices"]]
    reasoning = "".join(d.get("reasoning_content", "") for d in deltas)
    assert reasoning == "".join(d.get("reasoning", "") for d in deltas) == "Two plus two is four."
    assert "".join(d.get("content") or "" for d in deltas) == "The answer is 4."
    assert not any("<" in (d.get("content") or "") for d in deltas)  # no tag leaks
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    whole = Reply(hub, Plan(think=True), "")
    whole.parse("".join(THINKING))
    msg = openai_api._message(whole)
    assert msg["reasoning_content"] == msg["reasoning"] == "Two plus two is four."
    assert msg["content"] == "The answer is 4."


def test_thinking_split_ollama_chat_generate_and_webui():
    hub = fake_hub(THINKING)
    reply = Reply(hub, Plan(think=True), "")
    lines = ollama_lines(hub, reply)
    msgs = [ln["message"] for ln in lines]
    assert "".join(m.get("thinking", "") for m in msgs) == "Two plus two is four."
    assert "".join(m["content"] for m in msgs) == "The answer is 4."
    assert lines[-1]["done"] and lines[-1]["done_reason"] == "stop"
    reply = Reply(hub, Plan(think=True), "")
    gen = ollama_lines(hub, reply, "response")
    assert "".join(ln.get("thinking", "") for ln in gen) == "Two plus two is four."
    assert "".join(ln["response"] for ln in gen) == "The answer is 4."
    session = SessionStore().get(None)
    reply = Reply(hub, Plan(think=True), "")
    frames = run(collect(webui_api._turn(hub, GenerationRequest([1]), session, reply, [], 0)))
    assert "".join(f.get("thinking", "") for f in frames) == "Two plus two is four."
    assert "".join(f.get("token", "") for f in frames) == "The answer is 4."
    assert frames[-1]["done"] and frames[-1]["error"] is None


def test_prompt_that_opened_think_starts_in_reasoning():
    hub = fake_hub(["reason", "ing</think>answer"])
    reply = Reply(hub, Plan(think=True), "<|im_start|>assistant\n<think>\n")
    reply.parse("reasoning</think>answer")
    assert (reply.reasoning, reply.content) == ("reasoning", "answer")


CALL = ['Sure.<tool_', 'call>\n{"name": "get_weather", "argu', 'ments": {"city": "Paris"}}\n</tool',
        '_call>']  # fmt: skip


def test_streamed_tool_calls_in_each_dialect():
    hub = fake_hub(CALL)
    plan = Plan(tools=normalize_tools(TOOLS))
    chunks = openai_chunks(hub, Reply(hub, plan, ""))
    deltas = [c["choices"][0]["delta"] for c in chunks if isinstance(c, dict) and c["choices"]]
    calls = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
    assert calls[0]["index"] == 0 and calls[0]["type"] == "function"
    assert calls[0]["id"].startswith("call_") and calls[0]["function"]["name"] == "get_weather"
    args = "".join(c["function"]["arguments"] for c in calls)
    assert json.loads(args) == {"city": "Paris"}
    assert all("id" not in c for c in calls[1:])
    assert "".join(d.get("content") or "" for d in deltas) == "Sure."
    assert chunks[-2]["choices"][0]["finish_reason"] == "tool_calls"

    lines = ollama_lines(hub, Reply(hub, plan, ""))
    tc = [c for ln in lines for c in ln["message"].get("tool_calls", [])]
    assert tc == [{"id": tc[0]["id"], "function": {"index": 0, "name": "get_weather",
                                                   "arguments": {"city": "Paris"}}}]  # fmt: skip
    assert lines[-1]["done_reason"] == "stop"

    session = SessionStore().get(None)
    frames = run(collect(webui_api._turn(hub, GenerationRequest([1]), session,
                                         Reply(hub, plan, ""), [], 0)))  # fmt: skip
    calls = [c for f in frames for c in f.get("tool_calls", [])]
    assert [(c["name"], c["arguments"]) for c in calls] == [("get_weather", {"city": "Paris"})]


def test_no_tools_means_no_tool_parsing():
    hub = fake_hub(CALL)
    reply = Reply(hub, Plan(), "")
    reply.parse("".join(CALL))
    assert not reply.calls and "<tool_call>" in reply.content


def test_structured_answer_cut_off_reports_instead_of_passing():
    hub = fake_hub(['{"a": 1, "b"'], template="", arch="llama", reason=FinishReason.LENGTH)
    plan = Plan(output=OutputSpec({"type": "object"}))
    chunks = openai_chunks(hub, Reply(hub, plan, ""))
    err = [c for c in chunks if isinstance(c, dict) and "error" in c]
    assert err and "token limit" in err[0]["error"]["message"]
    lines = ollama_lines(hub, Reply(hub, plan, ""))
    assert lines[-1]["done_reason"] == "error" and "not valid JSON" in lines[-1]["error"]


def test_reply_problems():
    hub = fake_hub([], template="", arch="llama")
    schema = {"type": "object", "properties": {"n": {"type": "integer", "maximum": 3}},
              "required": ["n"]}  # fmt: skip
    ok = Reply(hub, Plan(output=OutputSpec(schema)), "")
    ok.parse('{"n": 2}')
    assert ok.problem() is None
    bad = Reply(hub, Plan(output=OutputSpec(schema)), "")
    bad.parse('{"n": 7}')
    assert "maximum" in bad.problem() and "n" in bad.problem()
    tools = normalize_tools(TOOLS)
    forced = Reply(hub, Plan(tools=tools, choice="add"), "")
    forced.parse('{"name": "add", "arguments": {"a": 1, "b": "x"}}')
    assert "do not match" in forced.problem()
    forced = Reply(hub, Plan(tools=tools, choice="required"), "")
    forced.parse("no call here")
    assert "did not produce" in forced.problem()


def test_union_reply_checks_the_call_or_the_content():
    """`tool_choice: "auto"` with tools and a response format: a call must be valid, content
    must match the format."""
    hub = fake_hub([])
    tools = normalize_tools(TOOLS)
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    cases = [
        ('<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>', None),
        ('<tool_call>{"name": "add", "arguments": {"a": 1, "b": "x"}}</tool_call>', "do not match"),
        ('<tool_call>{"name": "sub", "arguments": {}}</tool_call>', "does not allow"),
        ('<think>Hm.</think>{"n": 3}', None),
        ('{"n": "three"}', "not of type"),
    ]
    for text, problem in cases:
        reply = Reply(hub, Plan(tools=tools, output=OutputSpec(schema)), "")
        reply.parse(text)
        assert (reply.problem() is None) if problem is None else problem in reply.problem()


@pytest.fixture(scope="module")
def grammars():
    from conftest import real_model_path

    from tsjax.gguf import GGUFFile
    from tsjax.grammar import GrammarFactory
    from tsjax.tokenizer import Tokenizer

    return GrammarFactory(Tokenizer.from_gguf(GGUFFile(real_model_path("smollm2-135m")).metadata))


@pytest.mark.parametrize(
    "arch, template",
    [("gemma4", ""), ("mistral3", "[TOOL_CALLS]"), ("llama", "<|start_header_id|>"),
     ("gptoss", ""), ("qwen3", "<tool_call>"), ("llama", "")],
)  # fmt: skip
def test_every_tool_syntax_is_enforced_from_the_first_token(grammars, arch, template):
    from serve.translation.plan import constrain

    hub = fake_hub([], template=template, arch=arch)
    hub._grammars = grammars
    tools = normalize_tools(TOOLS)
    for choice, output in (("required", None), ("add", None), ("auto", OutputSpec())):
        plan = plan_of(tools=tools, choice=choice, think=None, output=output)
        plan = run(constrain(hub, plan, "<|im_start|>assistant\n"))
        assert plan.constraint is not None
        req = apply(plan, GenerationRequest([1]))
        assert req.constraint is plan.constraint


def test_a_tool_syntax_without_grammar_is_a_400(grammars):
    from serve.outputs.registry import OutputFormat
    from serve.outputs.toolcalls import ToolCallParser
    from serve.translation.plan import constrain

    err = ApiError
    hub = fake_hub([])
    hub._grammars = grammars
    hub._format = OutputFormat("none", "pythonic", lambda p: None, ToolCallParser)
    plan = plan_of(tools=normalize_tools(TOOLS), choice="required", think=None, output=None)
    with pytest.raises(err) as e:
        run(constrain(hub, plan))
    assert e.value.status == 400 and "pythonic" in e.value.message


def test_request_field_parsing():
    err = ApiError
    tools = normalize_tools(TOOLS)
    assert tool_choice_of(None, tools) == "auto"
    assert tool_choice_of({"type": "function", "function": {"name": "add"}}, tools) == "add"
    for bad in ("always", {"type": "function", "function": {"name": "nope"}}, 3):
        with pytest.raises(err) as e:
            tool_choice_of(bad, tools)
        assert e.value.status == 400
    with pytest.raises(err):
        tool_choice_of("required", [])
    with pytest.raises(err):
        normalize_tools([{"type": "function", "function": {"description": "no name"}}])
    assert openai_think(None, "low", None) is True
    assert openai_think(None, "none", None) is False
    assert openai_think(True, None, {"enable_thinking": False}) is False
    assert think_of("high") is True and think_of(False) is False
    with pytest.raises(err):
        think_of("sometimes")
    assert openai_format({"type": "text"}) is None
    spec = openai_format({"type": "json_schema", "json_schema": {"name": "x", "strict": True,
                          "schema": {"type": "object"}}})  # fmt: skip
    assert spec.strict and spec.schema == {"type": "object"}
    with pytest.raises(err):
        openai_format({"type": "xml"})
    with pytest.raises(err):
        plan_of(tools=tools, choice="required", think=None, output=OutputSpec())
    plan = plan_of(tools=tools, choice="none", think=None, output=None)
    assert plan.template_tools is None and not plan.parse_tools


def test_call_schema_and_generic_tool_prompt():
    tools = normalize_tools(TOOLS)
    both = call_schema(Plan(tools=tools, choice="required"))
    jsonschema.validate({"name": "add", "arguments": {"a": 1, "b": 2}}, both)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"name": "add", "arguments": {"city": "Paris"}}, both)
    one = call_schema(Plan(tools=tools, choice="get_weather"))
    assert one["properties"]["name"] == {"const": "get_weather"}
    msgs = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]  # fmt: skip
    shown = with_generic_tools(msgs, tools, "{{ message['content'] }}")
    assert shown[0]["role"] == "system" and "get_weather" in shown[0]["content"]
    call = {"name": "get_weather", "arguments": {"city": "Paris"}}
    assert json.loads(shown[2]["content"]) == call
    assert with_generic_tools(msgs, tools, "{% for t in tools %}{{ m.tool_calls }}") == msgs


# -- with the real default model ----------------------------------------------------------------


def _obj(props: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    return {"type": "object", "properties": props,
            "required": list(props) if required is None else required,
            "additionalProperties": False}  # fmt: skip


S = {"type": "string", "maxLength": 12}


def _int(lo: int, hi: int) -> dict[str, Any]:
    return {"type": "integer", "minimum": lo, "maximum": hi}


def _arr(items: dict[str, Any], most: int, least: int = 0) -> dict[str, Any]:
    return {"type": "array", "items": items, "minItems": least, "maxItems": most}


SCHEMAS: list[dict[str, Any]] = [
    _obj({"answer": S}),
    _obj({"n": _int(0, 9)}),
    _obj({"ok": {"type": "boolean"}}),
    _obj({"color": {"enum": ["red", "green", "blue"]}}),
    _obj({"x": {"type": "number", "minimum": -1, "maximum": 1}}),
    _obj({"name": S, "age": _int(0, 120)}),
    _obj({"tags": _arr(S, 2)}),
    _obj({"point": _obj({"x": _int(0, 99), "y": _int(0, 99)})}),
    _obj({"note": {"type": ["string", "null"], "maxLength": 10}}),
    _obj({"city": S, "country": {"anyOf": [S, {"type": "null"}]}}),
    _obj({"items": _arr({"enum": ["a", "b", "c"]}, 3, least=1)}),
    _obj({"user": _obj({"id": _int(1, 999), "admin": {"type": "boolean"}})}),
    _obj({"status": {"const": "done"}, "code": _int(100, 599)}),
    _obj({"title": S, "done": {"type": "boolean"}, "priority": {"enum": [1, 2, 3]}}),
    _obj({"pairs": _arr(_obj({"k": {"type": "string", "maxLength": 4}, "v": _int(0, 9)}), 2)}),
    _obj({"word": {"type": "string", "minLength": 1, "maxLength": 8}}),
    _obj({"a": S, "b": S}, required=["a"]),
    _obj({"temp": {"type": "number", "minimum": -50, "maximum": 50}, "unit": {"enum": ["C", "F"]}}),
    _obj({"matrix": _arr(_arr(_int(0, 9), 2), 2)}),
    _obj({"meta": _obj({"lang": {"enum": ["en", "fr"]},
                        "score": {"type": ["number", "null"], "minimum": 0, "maximum": 1}})}),
]  # fmt: skip
assert len(SCHEMAS) == 20


@pytest.fixture(scope="module")
def base_url() -> str:
    from test_server import running_server

    return running_server()


def _prompt(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Give example {i} as JSON for this schema: "
             f"{json.dumps(SCHEMAS[i])}"}]  # fmt: skip


@pytest.mark.slow
def test_twenty_schemas_validate_through_both_clients(base_url):
    """Even schemas through the openai client's response_format, odd through ollama's format=;
    four at a time (the server decodes four rows together)."""
    openai = pytest.importorskip("openai")
    ollama = pytest.importorskip("ollama")
    from test_server import MODEL

    oai = openai.OpenAI(base_url=base_url + "/v1", api_key="x", max_retries=0)
    oll = ollama.Client(host=base_url)

    def one(i: int) -> tuple[int, str]:
        if i % 2 == 0:
            spec = {"name": f"s{i}", "schema": SCHEMAS[i], "strict": True}
            rf = {"type": "json_schema", "json_schema": spec}
            r = oai.chat.completions.create(
                model=MODEL, messages=_prompt(i), max_tokens=128, temperature=0.7, seed=i,
                response_format=rf)  # fmt: skip
            return i, r.choices[0].message.content
        r = oll.chat(model=MODEL, messages=_prompt(i), format=SCHEMAS[i],
                     options={"num_predict": 128, "temperature": 0.7, "seed": i})  # fmt: skip
        return i, r.message.content

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(one, range(len(SCHEMAS))))
    for i, content in results:
        jsonschema.validate(json.loads(content), SCHEMAS[i])


@pytest.mark.slow
def test_json_object_mode_and_streamed_schema(base_url):
    from test_server import MODEL

    with httpx.Client(base_url=base_url, timeout=120) as c:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "A JSON object, please"}],
                "max_tokens": 256, "temperature": 0,
                "response_format": {"type": "json_object"}}  # fmt: skip
        r = c.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        assert isinstance(json.loads(r.json()["choices"][0]["message"]["content"]), dict)
        body = {"model": MODEL, "prompt": "Name a color.", "format": SCHEMAS[3], "stream": False,
                "options": {"num_predict": 64}}  # fmt: skip
        r = c.post("/api/generate", json=body)
        assert r.status_code == 200, r.text
        jsonschema.validate(json.loads(r.json()["response"]), SCHEMAS[3])
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Name a color."}],
                "format": SCHEMAS[3], "options": {"num_predict": 64}}  # fmt: skip
        lines = [json.loads(x) for x in c.post("/api/chat", json=body).text.splitlines()]
        assert lines[-1]["done"] and "error" not in lines[-1], lines[-1]
        text = "".join(ln["message"]["content"] for ln in lines)
        jsonschema.validate(json.loads(text), SCHEMAS[3])


@pytest.mark.slow
def test_tool_choice_required_always_gives_a_valid_call(base_url):
    openai = pytest.importorskip("openai")
    from test_server import MODEL

    oai = openai.OpenAI(base_url=base_url + "/v1", api_key="x", max_retries=0)
    msgs = [{"role": "user", "content": "What is the weather in Paris, and what is 2+3?"}]
    params = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}

    def one(seed: int):
        return oai.chat.completions.create(model=MODEL, messages=msgs, tools=TOOLS,
                                           tool_choice="required", max_tokens=64,
                                           temperature=1.0, seed=seed)  # fmt: skip

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(one, range(5)))
    for r in results:
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
        call = choice.message.tool_calls[0]
        assert call.type == "function" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), params[call.function.name])
    named = oai.chat.completions.create(
        model=MODEL, messages=msgs, tools=TOOLS, max_tokens=64, stream=True,
        tool_choice={"type": "function", "function": {"name": "add"}})  # fmt: skip
    deltas = [c.choices[0].delta for c in named if c.choices]
    calls = [tc for d in deltas for tc in (d.tool_calls or [])]
    assert calls[0].function.name == "add" and calls[0].id
    args = json.loads("".join(tc.function.arguments or "" for tc in calls))
    jsonschema.validate(args, params["add"])


@pytest.mark.slow
def test_ollama_client_forced_tool_call_and_tool_result_turn(base_url):
    ollama = pytest.importorskip("ollama")
    from test_server import MODEL

    oll = ollama.Client(host=base_url)
    msgs = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = oll.chat(model=MODEL, messages=msgs, tools=TOOLS, options={"num_predict": 64})
    assert r.done  # auto: a call or an answer, both fine for a 135M model
    body = {"model": MODEL, "messages": msgs, "tools": TOOLS, "stream": False,
            "tool_choice": {"function": {"name": "get_weather"}},
            "options": {"num_predict": 64}}  # fmt: skip
    with httpx.Client(base_url=base_url, timeout=120) as c:
        got = c.post("/api/chat", json=body)
        assert got.status_code == 200, got.text
        calls = got.json()["message"]["tool_calls"]
        assert calls[0]["function"]["name"] == "get_weather"
        assert isinstance(calls[0]["function"]["arguments"], dict)
    turn2 = [*msgs, {"role": "assistant", "content": "", "tool_calls": calls},
             {"role": "tool", "content": "sunny, 21 C", "tool_name": "get_weather"}]  # fmt: skip
    r = oll.chat(model=MODEL, messages=turn2, tools=TOOLS, options={"num_predict": 24})
    assert r.done and r.prompt_eval_count > 0


BAD_SCHEMAS = [
    {"type": "object", "properties": {"a": {"type": "strin"}}},
    {"type": "object", "required": "a"},
    {"type": "object", "properties": {"a": {"minimum": "zero"}}},
]


@pytest.mark.slow
@pytest.mark.parametrize("schema", BAD_SCHEMAS)
def test_invalid_schema_is_400_before_generation(base_url, schema):
    from test_server import MODEL

    msgs = [{"role": "user", "content": "hi"}]
    with httpx.Client(base_url=base_url, timeout=60) as c:
        rf = {"type": "json_schema", "json_schema": {"name": "bad", "schema": schema}}
        r = c.post("/v1/chat/completions", json={"model": MODEL, "messages": msgs,
                                                 "response_format": rf})  # fmt: skip
        assert r.status_code == 400, r.text
        assert "schema" in r.json()["error"]["message"]
        r = c.post("/api/chat", json={"model": MODEL, "messages": msgs, "format": schema})
        assert r.status_code == 400 and "schema" in r.json()["error"], r.text
        r = c.post("/api/chat", json={"model": MODEL, "messages": msgs, "format": "yaml"})
        assert r.status_code == 400
        body = {"model": MODEL, "messages": msgs, "tools": TOOLS, "tool_choice": "sometimes"}
        r = c.post("/v1/chat/completions", json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice"


def test_every_sampling_parameter_can_be_requested():
    """The neutral request's sampling fields are the sampler's: a parameter added to
    SamplingParams without its request field (or the reverse) fails here."""
    from serve.translation import Sampling
    from tsjax.sampling import SamplingParams

    assert set(Sampling.__struct_fields__) == set(SamplingParams.__dataclass_fields__)
