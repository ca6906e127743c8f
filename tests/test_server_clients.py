"""The official `openai`, `anthropic` and `ollama` Python clients work unchanged against the
server: the real test of wire compatibility, since they parse every field into typed models.
Every surface: OpenAI chat, completions, models and Responses; Anthropic Messages and token
counting; Ollama chat, generate, tags, show and ps (one shared server, the real SmolLM2)."""

from __future__ import annotations

import json

import pytest
from test_server import MODEL, running_server

pytestmark = pytest.mark.slow

openai = pytest.importorskip("openai")
ollama = pytest.importorskip("ollama")
anthropic = pytest.importorskip("anthropic")


@pytest.fixture(scope="module")
def base_url() -> str:
    return running_server()


@pytest.fixture(scope="module")
def oai(base_url):
    return openai.OpenAI(base_url=base_url + "/v1", api_key="not-needed", max_retries=0)


@pytest.fixture(scope="module")
def oll(base_url):
    return ollama.Client(host=base_url)


MSGS = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is 2+3?"},
]


def test_openai_chat(oai):
    r = oai.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=8, temperature=0)
    assert r.choices[0].message.content and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.usage.prompt_tokens_details.cached_tokens >= 0


def test_openai_stream(oai):
    stream = oai.chat.completions.create(
        model=MODEL,
        messages=MSGS,
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1


def test_openai_models_and_completions(oai):
    ids = [m.id for m in oai.models.list()]
    assert ids == [MODEL[: -len(".gguf")]]
    r = oai.completions.create(model=ids[0], prompt="Once upon a time", max_tokens=6)
    assert r.choices[0].text


def test_openai_errors_are_typed(oai):
    with pytest.raises(openai.NotFoundError):
        oai.chat.completions.create(model="gpt-4", messages=MSGS, max_tokens=4)
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=4, n=3)
    assert e.value.body["param"] == "n"


def test_ollama_chat_and_stream(oll):
    opts = {"num_predict": 8, "temperature": 0}
    r = oll.chat(model=MODEL, messages=MSGS, options=opts)
    assert r.message.role == "assistant" and r.message.content and r.done
    assert r.eval_count and r.eval_duration and r.prompt_eval_count
    parts = list(oll.chat(model=MODEL, messages=MSGS, options=opts, stream=True))
    assert "".join(p.message.content for p in parts) == r.message.content
    assert parts[-1].done and parts[-1].done_reason in ("stop", "length")


def test_ollama_generate_list_show(oll):
    r = oll.generate(model=MODEL, prompt="Why is the sky blue?", options={"num_predict": 6})
    assert r.response and r.done and r.eval_count <= 6
    parts = list(oll.generate(model=MODEL, prompt="Hi", stream=True, options={"num_predict": 4}))
    assert parts[-1].done
    listed = oll.list().models
    assert listed[0].model == MODEL and listed[0].size > 0
    shown = oll.show(MODEL)
    assert shown.details.family == "llama" and shown.modelinfo["general.architecture"] == "llama"


def test_ollama_unknown_model_raises(oll):
    with pytest.raises(ollama.ResponseError) as e:
        oll.chat(model="llama3:latest", messages=MSGS)
    assert e.value.status_code == 404


# -- model listing -------------------------------------------------------------------------------


def test_openai_model_retrieve(oai):
    listed = next(iter(oai.models.list()))
    for name in (listed.id, MODEL, "smollm2-135m"):  # any name the model answers to
        assert oai.models.retrieve(name) == listed
    with pytest.raises(openai.NotFoundError) as e:
        oai.models.retrieve("gpt-4o")
    assert e.value.body["param"] == "model"


def test_ollama_ps(oll):
    (entry,) = oll.ps().models
    assert entry.model == MODEL and entry.context_length == 1024
    assert entry.details.family == "llama" and entry.details.quantization_level == "Q4_1"
    # Weights (float32 on CPU: ~538 MB for 135M parameters) plus the KV cache.
    assert 500e6 < entry.size < 2e9
    assert entry.size_vram == 0  # on CPU nothing is in accelerator memory: "100% CPU"
    assert entry.expires_at.year > 2300  # loaded until the server stops


# -- OpenAI Responses ----------------------------------------------------------------------------

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
RESP_TOOLS = [
    {
        "type": "function",
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": WEATHER,
        "strict": True,
    }
]


def test_openai_responses_plain_and_cached(oai):
    ask = {
        "model": MODEL,
        "input": "What is 2+3?",
        "instructions": "Answer briefly.",
        "max_output_tokens": 8,
        "temperature": 0,
    }
    r = oai.responses.create(**ask)
    assert r.status in ("completed", "incomplete") and r.output_text
    assert r.output[-1].type == "message" and r.output[-1].role == "assistant"
    if r.status == "incomplete":
        assert r.incomplete_details.reason == "max_output_tokens" and r.usage.output_tokens == 8
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    counted = oai.responses.input_tokens.count(
        model=MODEL, input=ask["input"], instructions=ask["instructions"]
    )
    assert counted.input_tokens == r.usage.input_tokens
    again = oai.responses.create(**ask)  # the same prompt: served from the prefix cache
    assert again.output_text == r.output_text
    assert again.usage.input_tokens_details.cached_tokens >= r.usage.input_tokens - 1


def test_openai_responses_stream(oai):
    with oai.responses.stream(
        model=MODEL,
        input=[{"role": "user", "content": "Say hello."}],
        max_output_tokens=12,
        temperature=0,
    ) as stream:
        events = list(stream)
    kinds = [e.type for e in events]
    assert kinds[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text and text == events[-1].response.output_text
    done = [e for e in events if e.type == "response.output_text.done"]
    assert done[0].text == text


def test_openai_responses_tools_round_trip(oai):
    question = "What is the weather in Paris?"
    r = oai.responses.create(
        model=MODEL,
        input=question,
        tools=RESP_TOOLS,
        tool_choice="required",
        max_output_tokens=40,
        temperature=0,
    )
    (call,) = [o for o in r.output if o.type == "function_call"]
    assert call.name == "get_weather" and "city" in json.loads(call.arguments)
    answer = oai.responses.create(
        model=MODEL,
        tools=RESP_TOOLS,
        max_output_tokens=16,
        temperature=0,
        input=[
            {"role": "user", "content": question},
            call.model_dump(exclude_none=True),
            {"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 21 C"},
        ],
    )
    assert answer.output_text
    stream = oai.responses.create(
        model=MODEL,
        input="Weather in Rome?",
        tools=RESP_TOOLS,
        tool_choice={"type": "function", "name": "get_weather"},
        max_output_tokens=40,
        temperature=0,
        stream=True,
    )
    events = list(stream)
    args = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    (done,) = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert json.loads(args) == json.loads(done.arguments) and "city" in json.loads(args)
    assert events[-1].type == "response.completed"


def test_openai_responses_structured_output_and_reasoning_effort(oai):
    from pydantic import BaseModel

    class Sum(BaseModel):
        answer: int

    r = oai.responses.parse(
        model=MODEL,
        input="What is 2+3? Answer in JSON.",
        text_format=Sum,
        max_output_tokens=30,
        temperature=0,
    )
    assert r.status == "completed" and isinstance(r.output_parsed, Sum)
    # SmolLM2 has no reasoning syntax: an effort is accepted, and nothing is reasoning.
    r = oai.responses.create(
        model=MODEL, input="Hi", reasoning={"effort": "low"}, max_output_tokens=4
    )
    assert r.usage.output_tokens_details.reasoning_tokens == 0
    assert [o.type for o in r.output] == ["message"]
    with pytest.raises(openai.BadRequestError) as e:
        oai.responses.create(model=MODEL, input="Hi", previous_response_id="resp_123")
    assert e.value.body["param"] == "previous_response_id"


# -- Anthropic Messages --------------------------------------------------------------------------

GREEDY = {"temperature": 0}  # the anthropic client no longer sends sampling fields itself
ANT_TOOLS = [
    {"name": "get_weather", "description": "Current weather in a city", "input_schema": WEATHER}
]


@pytest.fixture(scope="module")
def ant(base_url):
    return anthropic.Anthropic(base_url=base_url, api_key="not-needed", max_retries=0)


def test_anthropic_messages_plain_and_count_tokens(ant):
    ask = {
        "model": MODEL,
        "max_tokens": 8,
        "system": "Answer briefly.",
        "messages": [{"role": "user", "content": "What is 2+3?"}],
    }
    m = ant.messages.create(**ask, extra_body=GREEDY)
    assert m.role == "assistant" and m.content[0].type == "text" and m.content[0].text
    assert m.stop_reason in ("end_turn", "max_tokens") and m.id.startswith("msg_")
    counted = ant.messages.count_tokens(model=MODEL, system=ask["system"], messages=ask["messages"])
    u = m.usage
    assert u.input_tokens + u.cache_read_input_tokens + u.cache_creation_input_tokens == (
        counted.input_tokens
    )
    if m.stop_reason == "max_tokens":
        assert u.output_tokens == 8
    with pytest.raises(anthropic.NotFoundError) as e:
        ant.messages.create(model="claude-sonnet-4-5", max_tokens=4, messages=ask["messages"])
    assert e.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.BadRequestError):  # max_tokens is required
        ant.post("/v1/messages", body={"model": MODEL, "messages": ask["messages"]}, cast_to=object)


def test_anthropic_stream_and_stop_sequence(ant):
    with ant.messages.stream(
        model=MODEL,
        max_tokens=16,
        extra_body=GREEDY,
        messages=[{"role": "user", "content": "Say hello."}],
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text and text == final.content[0].text
    assert final.usage.output_tokens >= 1 and final.stop_reason in ("end_turn", "max_tokens")
    # A stop sequence taken from the greedy answer ends it there, and is reported.
    words = text.split()
    if len(words) >= 3:
        stop = " " + words[2]
        m = ant.messages.create(
            model=MODEL,
            max_tokens=16,
            stop_sequences=[stop],
            messages=[{"role": "user", "content": "Say hello."}],
            extra_body=GREEDY,
        )
        assert (m.stop_reason, m.stop_sequence) == ("stop_sequence", stop)
        assert m.content[0].text == text[: text.index(stop)]


def test_anthropic_tools_round_trip(ant):
    question = [{"role": "user", "content": "What is the weather in Paris?"}]
    m = ant.messages.create(
        model=MODEL,
        max_tokens=40,
        tools=ANT_TOOLS,
        tool_choice={"type": "any"},
        messages=question,
        extra_body=GREEDY,
    )
    (use,) = [b for b in m.content if b.type == "tool_use"]
    assert m.stop_reason == "tool_use" and use.id.startswith("toolu_") and "city" in use.input
    follow = [
        *question,
        {"role": "assistant", "content": m.content},
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "Sunny, 21 C"}],
        },
    ]
    answer = ant.messages.create(
        model=MODEL,
        max_tokens=16,
        tools=ANT_TOOLS,
        tool_choice={"type": "none"},
        messages=follow,
        extra_body=GREEDY,
    )
    assert answer.content[0].type == "text" and answer.content[0].text
    with ant.messages.stream(
        model=MODEL,
        max_tokens=40,
        tools=ANT_TOOLS,
        extra_body=GREEDY,
        tool_choice={"type": "tool", "name": "get_weather"},
        messages=[{"role": "user", "content": "Weather in Rome?"}],
    ) as s:
        final = s.get_final_message()
    assert final.stop_reason == "tool_use" and final.content[-1].name == "get_weather"


def test_anthropic_thinking_flag(ant):
    """SmolLM2 has no reasoning syntax: thinking on or off is accepted and the answer is text
    (thinking blocks from a reasoning model are checked in test_protocol_shapes.py)."""
    for thinking in ({"type": "enabled", "budget_tokens": 1024}, {"type": "disabled"}):
        m = ant.messages.create(
            model=MODEL,
            max_tokens=4,
            thinking=thinking,
            extra_body=GREEDY,
            messages=[{"role": "user", "content": "Hi"}],
        )
        assert [b.type for b in m.content] == ["text"]
