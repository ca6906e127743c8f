"""The server end to end on the tiny GPT-OSS and Mistral 3 models (random weights, converted
by llama.cpp's converter), through the official `openai` and `ollama` clients.

A random model rambles, so what is checked is what the server makes of it where the outcome
does not depend on the weights: calls forced by `tool_choice` come back in each API's shape
from the model's own syntax (GPT-OSS's Harmony `<|channel|>commentary to=functions.NAME
<|constrain|>json<|message|>{...}<|call|>`, Mistral 3's `[TOOL_CALLS]NAME[ARGS]{...}`), with
arguments valid under the tool's schema, streamed and whole; response formats give schema-valid
JSON in Harmony's final channel; the reasoning effort of every API's thinking field reaches the
Harmony system message. Harmony's parsing of analysis/final/commentary messages is tested on
real-model-shaped text in `test_outputs.py`, and its grammar (the optional analysis message
before a constrained answer, `<|end|>` not stopping generation) in `test_grammar.py`.
"""

from __future__ import annotations

import contextlib
import json

import httpx
import jsonschema
import msgspec
import pytest
from hf_factory import build_all
from live_server import LiveServer

pytestmark = pytest.mark.slow

openai = pytest.importorskip("openai")
ollama = pytest.importorskip("ollama")

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather", "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}},
                       "required": ["city"], "additionalProperties": False},
    },
}  # fmt: skip
ANSWER = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}},
          "required": ["answer"], "additionalProperties": False}  # fmt: skip
WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]
HI = [{"role": "user", "content": "Say hi."}]


@contextlib.contextmanager
def serving(path):
    """The app on `path` (one row, a 512-token window: few shapes to warm up)."""
    from serve.app import create_app
    from serve.settings import Settings

    server = LiveServer(create_app(Settings(model=str(path), rows=1, max_len=512)))
    try:
        yield server.start(timeout=900)  # the MoE's warm-up compiles for minutes on a busy CPU
    finally:
        server.stop()


@pytest.fixture(scope="module")
def tiny():
    return build_all(["gpt_oss", "mistral3"])


@pytest.fixture(scope="module")
def gpt_oss(tiny):
    with serving(tiny["gpt_oss"].gguf["mxfp4"]) as url:  # the experts as real files ship them
        yield url


@pytest.fixture(scope="module")
def mistral(tiny):
    with serving(tiny["mistral3"].gguf["f32"]) as url:
        yield url


def _oai(url: str):
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=300)


def _model(url: str) -> str:
    return _oai(url).models.list().data[0].id


def _check_call(name: str, arguments: str | dict) -> None:
    assert name == "get_weather"
    args = json.loads(arguments) if isinstance(arguments, str) else arguments
    jsonschema.validate(args, WEATHER_TOOL["function"]["parameters"])


def _ollama_chat(url: str, **body) -> ollama.ChatResponse:
    """Ollama's /api/chat with this server's extensions (`tool_choice`), not streamed."""
    body = {"stream": False, "options": {"temperature": 0, "num_predict": 160}, **body}
    return ollama.ChatResponse.model_validate(
        httpx.post(url + "/api/chat", json=body, timeout=600).json()
    )


# Each server takes one OpenAI request (the first): OpenAI requests may reuse a cached prefix,
# whose prefill is one more compiled program (minutes for the MoE on a busy 2-core machine);
# Ollama's never do.


def test_harmony_forced_tool_call(gpt_oss):
    """A forced tool choice: one Harmony call, ended by `<|call|>`, as OpenAI's streamed
    `tool_calls` and Ollama's `message.tool_calls` (this server's `tool_choice`). Thinking off
    leaves out the analysis message, which a random model would not end."""
    model = _model(gpt_oss)
    stream = _oai(gpt_oss).chat.completions.create(
        model=model, messages=WEATHER, tools=[WEATHER_TOOL], temperature=0, max_tokens=160,
        reasoning_effort="none", stream=True,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )  # fmt: skip
    chunks = [c.choices[0] for c in stream if c.choices]
    calls = [tc for c in chunks for tc in c.delta.tool_calls or []]
    assert {tc.index for tc in calls} == {0} and chunks[-1].finish_reason == "tool_calls"
    assert not "".join(c.delta.content or "" for c in chunks)
    name = "".join(tc.function.name or "" for tc in calls)
    _check_call(name, "".join(tc.function.arguments or "" for tc in calls))
    out = _ollama_chat(gpt_oss, model=model, messages=WEATHER, tools=[WEATHER_TOOL], think=False,
                       tool_choice="required")  # fmt: skip
    (call,) = out.message.tool_calls
    _check_call(call.function.name, call.function.arguments)


def test_harmony_structured_output(gpt_oss):
    """A response format: JSON valid under the schema in Harmony's final channel, returned as
    content with no reasoning (Ollama `format`; the same grammar serves OpenAI's)."""
    out = _ollama_chat(gpt_oss, model=_model(gpt_oss), messages=HI, format=ANSWER, think=False)
    jsonschema.validate(json.loads(out.message.content), ANSWER)
    assert not out.message.thinking and out.done_reason == "stop"


def test_reasoning_effort_reaches_the_template(tiny):
    """Each API's thinking field -> `Intent.effort` -> the Harmony system message."""
    from serve.protocols import anthropic as anthropic_api
    from serve.protocols import ollama as ollama_api
    from serve.protocols import openai as openai_api
    from serve.protocols import responses as responses_api
    from serve.protocols.webui.sessions import TurnOptions
    from serve.translation.intent import Intent
    from serve.translation.plan import plan_of
    from serve.translation.prepare import _prompt
    from tsjax.model import load

    model = load(tiny["gpt_oss"].gguf["f32"], max_len=512, progress=False)

    def rendered(intent: Intent) -> str:
        plan = plan_of(tools=[], choice="auto", think=intent.think, output=None)
        return _prompt(model, intent, plan).text

    def chat(**kw) -> Intent:
        body = msgspec.convert({"model": "m", "messages": HI, **kw}, openai_api.ChatBody)
        return openai_api._chat_intent(body)

    assert "Reasoning: high" in rendered(chat(reasoning_effort="high"))
    assert "Reasoning: low" in rendered(chat(reasoning_effort="minimal"))
    assert "Reasoning: medium" in rendered(chat())  # the template's default
    kwargs = {"reasoning_effort": "low"}  # explicit template kwargs win
    assert "Reasoning: low" in rendered(chat(reasoning_effort="high", chat_template_kwargs=kwargs))
    body = msgspec.convert({"model": "m", "messages": HI, "think": "high"}, ollama_api.ChatBody)
    assert "Reasoning: high" in rendered(ollama_api._intent(body, messages=HI))
    opts = TurnOptions(think="low").resolved()
    assert opts["think"] is True and "Reasoning: low" in rendered(
        Intent(messages=HI, think=opts["think"], effort=opts["effort"])
    )
    body = msgspec.convert({"model": "m", "input": "Hi", "reasoning": {"effort": "high"}},
                           responses_api.ResponsesBody)  # fmt: skip
    assert "Reasoning: high" in rendered(responses_api._intent(body))
    body = {"model": "m", "max_tokens": 8, "messages": HI, "output_config": {"effort": "low"}}
    body = msgspec.convert(body, anthropic_api.MessagesBody)
    assert "Reasoning: low" in rendered(anthropic_api._intent(body))


def test_mistral_forced_tool_call(mistral):
    """Mistral 3's `[TOOL_CALLS]NAME[ARGS]{...}` forced by a named tool choice, read back by the
    OpenAI client. (A short system message: the template's default one and the tools would not
    fit the 512-token window.)"""
    r = _oai(mistral).chat.completions.create(
        model=_model(mistral), temperature=0, max_tokens=160, reasoning_effort="none",
        messages=[{"role": "system", "content": "Be brief."}, *WEATHER], tools=[WEATHER_TOOL],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )  # fmt: skip
    calls = r.choices[0].message.tool_calls
    assert calls and r.choices[0].finish_reason == "tool_calls"
    for call in calls:
        _check_call(call.function.name, call.function.arguments)
