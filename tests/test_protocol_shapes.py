"""The Responses and Anthropic Messages adapters without a model: canned engine output with
reasoning, text and tool calls goes through each adapter's streamed and whole paths, and
every object is validated by the official SDK's own types (pydantic, strictly) and every
stream is folded by the SDK's own accumulator (`client.responses.stream(...)`,
`client.messages.stream(...)` use them), which is what a client would make of it. The
request side: input items and content blocks as the chat template's messages."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
from typing import Any

import pytest

from serve.engine import EventKind, FinishReason, GenerationRequest, Stats, TokenEvent
from serve.errors import ApiError
from serve.outputs import select_format
from serve.protocols import anthropic as anthropic_api
from serve.protocols import responses as responses_api
from serve.settings import Settings
from serve.state import Hub
from serve.translation import Prepared, Reply
from serve.translation.plan import Plan
from serve.translation.prompt import Prompt
from serve.translation.tools import normalize_tools

openai = pytest.importorskip("openai")
anthropic = pytest.importorskip("anthropic")

from anthropic.lib.streaming._messages import accumulate_event  # noqa: E402
from anthropic.types import Message as AnthropicMessage  # noqa: E402
from anthropic.types import RawMessageStreamEvent  # noqa: E402
from openai.lib.streaming.responses._responses import ResponseStreamState  # noqa: E402
from openai.types.responses import Response, ResponseStreamEvent  # noqa: E402
from pydantic import TypeAdapter  # noqa: E402

QWEN_TEMPLATE = "{{ '<think>' }}{% if tools %}<tool_call>{% endif %}"  # think + Hermes calls
WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS = [{"type": "function", "name": "get_weather", "parameters": WEATHER, "strict": True}]
THINK = ["<thi", "nk>Two plus", " two is four.</th", "ink>\n\nThe answer", " is 4."]
CALL = [
    "<think>Weather needs",
    " a tool.</think>\n\n",
    '<tool_call>\n{"name": "get_weather", ',
    '"arguments": {"city": "Paris"}}\n</tool_call>',
]


class FakeEngine:
    def __init__(self, pieces: list[str], reason=FinishReason.STOP, stop_sequence=None):
        self.pieces, self.reason, self.stop_sequence = pieces, reason, stop_sequence

    async def generate(self, req: GenerationRequest):
        for p in self.pieces:
            yield TokenEvent(EventKind.TOKEN, text=p, token_ids=(1,))
        stats = Stats(prompt_tokens=12, cached_tokens=5, completion_tokens=len(self.pieces))
        yield TokenEvent(
            EventKind.DONE, finish_reason=self.reason, stats=stats, stop_sequence=self.stop_sequence
        )


class FakeTokenizer:
    def encode(self, text: str, **_: Any) -> list[int]:
        return [1] * len(text.split())


class FakeModel:
    name = "fake.gguf"
    tokenizer = FakeTokenizer()


def fake(pieces: list[str], tools: bool = False, **kw) -> tuple[Hub, Prepared]:
    hub = Hub(Settings())
    hub.engine = FakeEngine(pieces, **kw)  # type: ignore[assignment]
    hub._format = select_format("qwen3", QWEN_TEMPLATE)
    plan = Plan(think=True, tools=normalize_tools(TOOLS) if tools else [])
    req = GenerationRequest([1] * 12)
    prompt = Prompt([1] * 12, "", [])
    return hub, Prepared(req, [Reply(hub, plan, "")], plan, prompt, FakeModel())  # type: ignore[arg-type]


def collect(source) -> list[Any]:
    async def run():
        return [x async for x in source]

    return asyncio.run(run())


# -- OpenAI Responses ----------------------------------------------------------------------------

RESPONSE_EVENT = TypeAdapter(ResponseStreamEvent)


def responses_body(**kw) -> responses_api.ResponsesBody:
    return responses_api.ResponsesBody(model="fake", input="hi", **kw)


def responses_stream(pieces, body=None, **kw) -> tuple[list[dict], Any]:
    """The streamed events, each validated, and what the SDK's stream state makes of them."""
    hub, prep = fake(pieces, **kw)
    shape = responses_api._Shape(body or responses_body(), prep)
    events = collect(responses_api._stream(hub, shape))
    state = ResponseStreamState(input_tools=TOOLS, text_format=openai.omit)
    for ev in events:
        for _ in state.handle_event(RESPONSE_EVENT.validate_python(ev)):
            pass
    assert [ev["sequence_number"] for ev in events] == list(range(len(events)))
    return events, state


def responses_whole(pieces, body=None, **kw) -> dict:
    hub, prep = fake(pieces, **kw)
    whole = asyncio.run(
        responses_api._whole(hub, responses_api._Shape(body or responses_body(), prep))
    )
    Response.model_validate(whole)
    return whole


def test_responses_reasoning_and_text_streamed_as_the_sdk_reads_them():
    events, state = responses_stream(THINK)
    kinds = [ev["type"] for ev in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] == "response.completed"
    final = state._completed_response
    assert [o.type for o in final.output] == ["reasoning", "message"]
    assert final.output[0].content[0].text == "Two plus two is four."
    assert final.output_text == "The answer is 4."
    assert final.usage.output_tokens_details.reasoning_tokens == 5  # its words, re-tokenized
    assert final.usage.input_tokens_details.cached_tokens == 5
    # Each item is announced, filled and closed in the SDK's order.
    message = kinds[kinds.index("response.output_item.done") + 1 : -1]
    message = [k for i, k in enumerate(message) if i == 0 or k != message[i - 1]]  # one delta
    assert message == [
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
    ]


def test_responses_whole_matches_the_stream():
    events, _ = responses_stream(THINK)
    streamed = events[-1]["response"]["output"]
    whole = responses_whole(THINK)["output"]
    strip = [{k: v for k, v in item.items() if k != "id"} for item in streamed]
    assert strip == [{k: v for k, v in item.items() if k != "id"} for item in whole]


def test_responses_function_call_streamed_with_its_arguments():
    body = responses_body(tools=TOOLS)
    events, state = responses_stream(CALL, body, tools=True)
    final = state._completed_response
    assert [o.type for o in final.output] == ["reasoning", "function_call"]
    call = final.output[1]
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}
    assert call.call_id.startswith("call_") and call.id.startswith("fc_")
    deltas = "".join(
        ev["delta"] for ev in events if ev["type"] == "response.function_call_arguments.delta"
    )
    assert deltas == call.arguments
    assert final.tools[0].name == "get_weather" and final.tools[0].strict is True
    whole = responses_whole(CALL, body, tools=True)
    assert [o["type"] for o in whole["output"]] == ["reasoning", "function_call"]


def test_responses_cut_off_is_incomplete():
    events, _ = responses_stream(THINK[:4], reason=FinishReason.LENGTH)
    last = events[-1]
    assert last["type"] == "response.incomplete"
    assert last["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert last["response"]["output"][-1]["status"] == "incomplete"
    whole = responses_whole(THINK[:4], reason=FinishReason.LENGTH)
    assert whole["status"] == "incomplete" and whole["output"][-1]["status"] == "incomplete"


def test_responses_engine_error_fails_the_stream():
    hub, prep = fake(THINK)

    class Failing(FakeEngine):
        async def generate(self, req):
            yield TokenEvent(EventKind.TOKEN, text="Hel", token_ids=(1,))
            yield TokenEvent(EventKind.ERROR, error="device lost")

    hub.engine = Failing([])  # type: ignore[assignment]
    events = collect(responses_api._stream(hub, responses_api._Shape(responses_body(), prep)))
    for ev in events:
        RESPONSE_EVENT.validate_python(ev)
    assert [ev["type"] for ev in events[-2:]] == ["error", "response.failed"]
    assert events[-1]["response"]["error"]["message"] == "device lost"


def test_responses_input_items_as_messages():
    image = "data:image/png;base64,AAAA"
    body = responses_api.ResponsesBody(
        model="m",
        instructions="Be brief.",
        input=[
            {"type": "message", "role": "developer", "content": "Use tools."},
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "Look:"},
                    {"type": "input_image", "image_url": image},
                ],
            },
            {
                "type": "reasoning",
                "id": "rs_1",
                "summary": [],
                "content": [{"type": "reasoning_text", "text": "Need weather."}],
            },
            {
                "type": "function_call",
                "call_id": "call_1",
                "name": "get_weather",
                "arguments": '{"city": "Paris"}',
            },
            {
                "type": "function_call",
                "call_id": "call_2",
                "name": "get_weather",
                "arguments": '{"city": "Rome"}',
            },
            {"type": "function_call_output", "call_id": "call_1", "output": "Sunny"},
            {
                "type": "message",
                "role": "assistant",
                "content": [{"type": "output_text", "text": "It is sunny.", "annotations": []}],
            },
        ],
    )
    msgs = responses_api._messages(body)
    assert [m["role"] for m in msgs] == [
        "system",
        "system",
        "user",
        "assistant",
        "tool",
        "assistant",
    ]
    # the image decoded into the neutral part every adapter hands the prompt
    part = msgs[2]["content"][1]
    assert part["type"] == "image" and part["image"].data == base64.b64decode("AAAA")
    calls = msgs[3]["tool_calls"]
    assert [c["id"] for c in calls] == ["call_1", "call_2"]
    assert msgs[3]["reasoning_content"] == "Need weather."
    assert msgs[4] == {"role": "tool", "tool_call_id": "call_1", "content": "Sunny"}
    assert msgs[5]["content"] == "It is sunny."


def test_responses_refusals_are_clear_400s():
    for kw, param in (
        ({"previous_response_id": "resp_1"}, "previous_response_id"),
        ({"conversation": "conv_1"}, "conversation"),
        ({"background": True}, "background"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
        ({"text": responses_api.TextConfig(format={"type": "yaml"})}, "text.format.type"),
        ({"input": [{"type": "item_reference", "id": "x"}]}, "input[0].type"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]},
            "input[0].content[0].type",
        ),
    ):
        with pytest.raises(ApiError) as e:
            responses_api._intent(responses_api.ResponsesBody(**{"model": "m", "input": "x", **kw}))
        assert e.value.status == 400 and e.value.param == param, kw


def test_responses_text_format_and_effort():
    fmt = {"type": "json_schema", "name": "a", "schema": WEATHER, "strict": True}
    body = responses_body(
        text=responses_api.TextConfig(format=fmt),
        reasoning=responses_api.ReasoningConfig(effort="low"),
    )
    intent = responses_api._intent(body)
    assert intent.output.schema == WEATHER and intent.output.strict and intent.think is True
    assert intent.effort == "low"  # the template's `reasoning_effort`
    off = responses_api._intent(responses_body(reasoning=responses_api.ReasoningConfig("none")))
    assert off.think is False and responses_api._intent(responses_body()).think is None
    assert off.effort is None


# -- Anthropic Messages --------------------------------------------------------------------------

ANTHROPIC_EVENT = TypeAdapter(RawMessageStreamEvent)


def messages_body(**kw) -> anthropic_api.MessagesBody:
    return anthropic_api.MessagesBody(
        model="fake",
        max_tokens=kw.pop("max_tokens", 64),
        messages=[anthropic_api.Message("user", "hi")],
        **kw,
    )


def messages_stream(pieces, body=None, **kw) -> tuple[list[dict], Any]:
    hub, prep = fake(pieces, **kw)
    events = collect(
        anthropic_api._stream(hub, anthropic_api._Shape(body or messages_body(), prep))
    )
    snapshot, bufs = None, {}
    for ev in events:
        if ev["type"] == "ping":  # the SDK's SSE reader drops pings before parsing
            assert ev == {"type": "ping"}
            continue
        parsed = ANTHROPIC_EVENT.validate_python(ev)
        snapshot = accumulate_event(event=parsed, current_snapshot=snapshot, json_bufs=bufs)
    return events, snapshot


def messages_whole(pieces, body=None, **kw) -> dict:
    hub, prep = fake(pieces, **kw)
    whole = asyncio.run(
        anthropic_api._whole(hub, anthropic_api._Shape(body or messages_body(), prep))
    )
    AnthropicMessage.model_validate(whole)
    return whole


def test_anthropic_thinking_and_text_streamed_as_the_sdk_reads_them():
    events, msg = messages_stream(THINK)
    kinds = [ev["type"] for ev in events]
    assert kinds[:2] == ["message_start", "ping"] and kinds[-2:] == [
        "message_delta",
        "message_stop",
    ]
    assert [b.type for b in msg.content] == ["thinking", "text"]
    thinking = msg.content[0]
    assert thinking.thinking == "Two plus two is four."
    digest = hashlib.sha256(thinking.thinking.encode()).digest()
    assert thinking.signature == base64.b64encode(digest).decode()
    assert msg.content[1].text == "The answer is 4." and msg.stop_reason == "end_turn"
    # The three parts of the prompt add up: 12 prompt tokens, 5 of them from the cache.
    assert (msg.usage.input_tokens, msg.usage.cache_read_input_tokens) == (7, 5)
    assert msg.usage.output_tokens == len(THINK)
    assert messages_whole(THINK)["content"] == [
        b.model_dump(exclude_none=True) for b in msg.content
    ]


def test_anthropic_tool_use_streamed_with_input_json():
    events, msg = messages_stream(CALL, tools=True)
    tool = msg.content[-1]
    assert (
        tool.type == "tool_use" and tool.name == "get_weather" and tool.input == {"city": "Paris"}
    )
    assert tool.id.startswith("toolu_") and msg.stop_reason == "tool_use"
    deltas = [
        ev["delta"]["partial_json"]
        for ev in events
        if ev["type"] == "content_block_delta" and ev["delta"]["type"] == "input_json_delta"
    ]
    assert json.loads("".join(deltas)) == {"city": "Paris"}
    whole = messages_whole(CALL, tools=True)
    assert whole["stop_reason"] == "tool_use" and whole["content"][-1]["input"] == {"city": "Paris"}


def test_anthropic_stop_reasons():
    whole = messages_whole(["Paris is nice"], stop_sequence="!")
    assert (whole["stop_reason"], whole["stop_sequence"]) == ("stop_sequence", "!")
    _, msg = messages_stream(["Paris is nice"], stop_sequence="!")
    assert (msg.stop_reason, msg.stop_sequence) == ("stop_sequence", "!")
    cut = messages_whole(["a", "b", "c"], messages_body(max_tokens=3), reason=FinishReason.LENGTH)
    assert cut["stop_reason"] == "max_tokens"
    # Ended by the length but short of max_tokens: the context window was full.
    full = messages_whole(["a", "b"], messages_body(max_tokens=30), reason=FinishReason.LENGTH)
    assert full["stop_reason"] == "model_context_window_exceeded"


def test_anthropic_blocks_as_messages():
    png = base64.b64encode(b"\x89PNG").decode()
    body = anthropic_api.MessagesBody(
        model="m",
        max_tokens=5,
        system=[{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Be kind."}],
        messages=[
            anthropic_api.Message(
                "user",
                [
                    {"type": "text", "text": "Look:"},
                    {
                        "type": "image",
                        "source": {"type": "base64", "media_type": "image/png", "data": png},
                    },
                ],
            ),
            anthropic_api.Message(
                "assistant",
                [
                    {"type": "thinking", "thinking": "Use the tool.", "signature": "x"},
                    {"type": "text", "text": "Checking."},
                    {
                        "type": "tool_use",
                        "id": "toolu_1",
                        "name": "get_weather",
                        "input": {"city": "Paris"},
                    },
                ],
            ),
            anthropic_api.Message(
                "user",
                [
                    {
                        "type": "tool_result",
                        "tool_use_id": "toolu_1",
                        "is_error": True,
                        "content": [{"type": "text", "text": "timeout"}],
                    },
                    {"type": "text", "text": "Try again?"},
                ],
            ),
        ],
    )
    msgs = anthropic_api._messages(body)
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "tool", "user"]
    assert msgs[0]["content"] == "Be brief.\nBe kind."
    part = msgs[1]["content"][1]
    assert part["type"] == "image" and part["image"].data == base64.b64decode(png)
    assert msgs[2] == {
        "role": "assistant",
        "content": "Checking.",
        "reasoning_content": "Use the tool.",
        "tool_calls": [
            {
                "id": "toolu_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
            }
        ],
    }
    assert msgs[3] == {"role": "tool", "tool_call_id": "toolu_1", "content": "Error: timeout"}
    assert msgs[4] == {"role": "user", "content": "Try again?"}


def test_anthropic_options_and_refusals():
    tools = [{"name": "get_weather", "description": "Weather", "input_schema": WEATHER}]
    intent = anthropic_api._intent(
        messages_body(
            tools=tools,
            tool_choice={"type": "tool", "name": "get_weather"},
            stop_sequences=["\n"],
            thinking=anthropic_api.ThinkingConfig("enabled", 2048),
            temperature=0.2,
            top_k=5,
        )
    )
    assert intent.tools[0]["function"]["parameters"] == WEATHER
    assert intent.tool_choice == {"type": "function", "function": {"name": "get_weather"}}
    assert intent.stop == ("\n",) and intent.think is True and intent.max_tokens == 64
    assert (intent.sampling.temperature, intent.sampling.top_k) == (0.2, 5)
    for choice, expected in (("any", "required"), ("auto", "auto"), ("none", "none")):
        assert anthropic_api._intent(messages_body(tool_choice={"type": choice})).tool_choice == (
            expected
        )
    off = anthropic_api._intent(messages_body(thinking=anthropic_api.ThinkingConfig("disabled")))
    assert off.think is False and anthropic_api._intent(messages_body()).think is None
    schema = anthropic_api.OutputConfig(format={"type": "json_schema", "schema": WEATHER})
    assert anthropic_api._intent(messages_body(output_config=schema)).output.schema == WEATHER
    effort = anthropic_api.OutputConfig(effort="max")
    assert anthropic_api._intent(messages_body(output_config=effort)).effort == "high"
    assert intent.effort is None
    for kw, param in (
        ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools[0].type"),
        ({"tool_choice": {"type": "some"}}, "tool_choice"),
        ({"thinking": anthropic_api.ThinkingConfig("lots")}, "thinking.type"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"output_config": anthropic_api.OutputConfig(effort="huge")}, "output_config.effort"),
    ):
        with pytest.raises(ApiError) as e:
            anthropic_api._intent(messages_body(**kw))
        assert e.value.status == 400 and e.value.param == param, kw


def test_anthropic_error_shapes_and_statuses():
    for status, kind, code in (
        (400, "invalid_request_error", 400),
        (401, "authentication_error", 401),
        (404, "not_found_error", 404),
        (503, "overloaded_error", 529),
        (500, "api_error", 500),
    ):
        r = anthropic_api.render_error(None, ApiError(status, "why"))  # type: ignore[arg-type]
        assert r.status_code == code
        assert r.content == {"type": "error", "error": {"type": kind, "message": "why"}}
        with pytest.raises(anthropic.APIStatusError):  # the SDK reads it as an error of its own
            raise anthropic.Anthropic(api_key="x")._make_status_error(
                "why", body=r.content, response=_response(code)
            )


def _response(status: int):
    import httpx2

    return httpx2.Response(status, request=httpx2.Request("POST", "http://x/v1/messages"))
