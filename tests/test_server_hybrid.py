"""A hybrid recurrent model served end to end: the real server (uvicorn on a loopback port)
hosting the factory's tiny Qwen 3.5 (Gated DeltaNet + gated attention), driven with the official
`openai` and `ollama` clients: a conversation whose next turn resumes from the state saved
where the generation prompt started (its cached tokens counted), the same greedy answer through
both APIs, and a tool call forced in the model's own XML syntax, returned as an OpenAI call."""

from __future__ import annotations

import json

import pytest
from live_server import LiveServer, free_port

pytestmark = pytest.mark.slow

openai = pytest.importorskip("openai")
ollama = pytest.importorskip("ollama")

UNIT = {"type": "string", "enum": ["celsius", "fahrenheit"]}
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"unit": UNIT, "metric": {"type": "boolean"}},
    "required": ["unit", "metric"], "additionalProperties": False}}}  # fmt: skip


@pytest.fixture(scope="module")
def served():
    from hf_factory import build

    from serve.app import create_app
    from serve.settings import Settings

    port = free_port()
    settings = Settings(model=str(build("qwen35").gguf["f32"]), host="127.0.0.1", port=port,
                        rows=2, max_len=1024, prefill_chunk=256)  # fmt: skip
    app = create_app(settings)
    server = LiveServer(app, port)
    url = server.start(timeout=900)
    yield url, app.state.hub.model.name
    server.stop()


def test_next_turn_resumes_from_the_saved_state(served):
    url, m = served
    oai = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    first = oai.chat.completions.create(model=m, messages=chat, max_tokens=6, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    answer = first.choices[0].message
    # the same greedy answer through Ollama's API (resumed from the state saved where the
    # generation prompt starts), reasoning and content split alike
    options = {"temperature": 0, "num_predict": 6}
    got = ollama.Client(host=url).chat(model=m, messages=chat, think=True, options=options)
    reasoning = getattr(answer, "reasoning_content", None) or ""
    assert (got.message.thinking or "", got.message.content) == (reasoning, answer.content)
    turn = {"role": "assistant", "content": answer.content or "",
            "reasoning_content": reasoning or "x"}  # fmt: skip
    chat += [turn, {"role": "user", "content": "And then?"}]
    second = oai.chat.completions.create(model=m, messages=chat, max_tokens=4, temperature=0)
    # the template drops the answer's reasoning, so the new prompt branches off where the
    # first one's generation prompt started: exactly the state saved there
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert 0 < cached < first.usage.prompt_tokens, (cached, first.usage)


def test_forced_tool_call_in_the_xml_syntax(served):
    url, m = served
    oai = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    r = oai.chat.completions.create(
        model=m,
        messages=[{"role": "user", "content": "Weather?"}],
        tools=[TOOL],
        tool_choice="required",
        max_tokens=100,
        extra_body={"chat_template_kwargs": {"enable_thinking": False}},
    )
    calls = r.choices[0].message.tool_calls
    assert calls and all(c.function.name == "get_weather" for c in calls), r
    args = json.loads(calls[0].function.arguments)
    assert args["unit"] in UNIT["enum"] and isinstance(args["metric"], bool), args
