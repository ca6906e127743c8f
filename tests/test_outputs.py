"""serve.outputs: reasoning and tool-call parsing, whole and streamed in every chunking.

Fixtures follow each family's published format:

* Qwen 3 `<think>` and `<tool_call>{"name", "arguments"}</tool_call>`: the Qwen3 chat template
  ("For each function call, return a json object with function name and arguments within
  <tool_call></tool_call> XML tags"), QwenLM function-calling docs.
* Qwen 3.5 / Qwen3-Coder XML body `<function=NAME><parameter=KEY>`: the Qwen3.5 prompt quoted
  in /work/shared/api/reference-behaviour.md section 3.2, llama.cpp's qwen3_coder_xml format.
* Gemma 4 `<|channel>thought\\n...<channel|>` and `<|tool_call>call:NAME{k:<|"|>v<|"|>}
  <tool_call|>`: ai.google.dev "Function calling with Gemma 4", vLLM gemma4_tool_parser docs
  (bare keys, `<|"|>` strings, several calls concatenated).
* Harmony: OpenAI cookbook "openai-harmony" (analysis `<|end|>`, `<|start|>assistant
  <|channel|>final<|message|>`, `commentary to=functions.NAME <|constrain|>json<|message|>
  {...}<|call|>`).
* Mistral: vLLM mistral_tool_parser tests (`[TOOL_CALLS] [{"name", "arguments"}]` before v11,
  `[TOOL_CALLS]name[ARGS]{...}` from v11, repeated markers for several calls).
* Llama 3.1: llama.com "Llama 3.1 prompt formats" (JSON `{"name", "parameters"}` for custom
  tools, `<|python_tag|>` marking a tool call).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from serve.outputs import (
    ContentDelta,
    OutputParser,
    ParsedOutput,
    ReasoningDelta,
    ToolCallArgs,
    ToolCallEnd,
    ToolCallStart,
    collect_output,
    select_format,
    select_parsers,
)
from serve.outputs.reasoning import Channel, HarmonySplitter, think_splitter

QWEN_TMPL = "{{- '<tool_call>' }} <think> </think>"
GEMMA4_TMPL = "<|turn>model <|channel>thought <|tool_call>"
HARMONY_TMPL = "<|start|>assistant<|channel|>final<|message|>"
MISTRAL_TMPL = "[AVAILABLE_TOOLS] [TOOL_CALLS] [ARGS]"
MAGISTRAL_TMPL = MISTRAL_TMPL + " [THINK]"
LLAMA3_TMPL = "<|start_header_id|>assistant<|end_header_id|> <|python_tag|>"
QWEN_XML_TMPL = QWEN_TMPL + " <function= <parameter="
NEMOTRON_TMPL = "<SPECIAL_11>Assistant\n<think>\n <TOOLCALL>["


@dataclass
class Case:
    id: str
    arch: str
    template: str
    text: str
    reasoning: str = ""
    content: str = ""
    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    prompt: str = ""
    malformed: int = 0


W = '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}'
WEATHER = ("get_weather", {"city": "Paris", "unit": "celsius"})
TIME = ("get_time", {"tz": "Europe/Paris"})

CASES = [
    Case(
        "qwen3-think-in-prompt",
        "qwen3",
        QWEN_TMPL,
        "Okay, the user wants 2+2.\n</think>\n\nThe answer is 4.",
        reasoning="Okay, the user wants 2+2.",
        content="The answer is 4.",
        prompt="<|im_start|>assistant\n<think>\n",
    ),
    Case(
        "qwen3-think-in-output",
        "qwen3",
        QWEN_TMPL,
        "<think>\nLet me think about <b>tags</b>.\n</think>\n\nDone: a < b > c",
        reasoning="Let me think about <b>tags</b>.",
        content="Done: a < b > c",
    ),
    Case(
        "qwen3-unclosed-think",
        "qwen3",
        QWEN_TMPL,
        "still thinking when the budget ran out",
        reasoning="still thinking when the budget ran out",
        prompt="<think>",
    ),
    Case(
        "qwen3-two-calls",
        "qwen3",
        QWEN_TMPL,
        "<think>\nNeed weather and time.\n</think>\n\nChecking.\n<tool_call>\n"
        + W
        + '\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"tz": "Europe/Paris"}}'
        + "\n</tool_call>",
        reasoning="Need weather and time.",
        content="Checking.",
        calls=[WEATHER, TIME],
    ),
    Case(
        "qwen3-call-inside-think",
        "qwen3",
        QWEN_TMPL,
        "I will call it.\n<tool_call>\n" + W + "\n</tool_call>",
        reasoning="I will call it.",
        calls=[WEATHER],
        prompt="<think>\n",
    ),
    Case(
        "qwen3-string-arguments-and-text-after",
        "qwen3",
        QWEN_TMPL,
        '<tool_call>{"name": "get_time", "arguments": "{\\"tz\\": \\"Europe/Paris\\"}"}'
        "</tool_call>\n\nThen I answer.",
        content="Then I answer.",
        calls=[TIME],
    ),
    Case(
        "qwen3-malformed-kept",
        "qwen3",
        QWEN_TMPL,
        "Try: <tool_call>{not json}</tool_call> end",
        content="Try: <tool_call>{not json}</tool_call> end",
        malformed=1,
    ),
    Case(
        "qwen3-unterminated-call-attempted",
        "qwen3",
        QWEN_TMPL,
        "<tool_call>\n" + W,
        calls=[WEATHER],
    ),
    Case(
        "qwen35-xml",
        "qwen35",
        QWEN_TMPL,
        "<think>\nhmm\n</think>\n\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis"
        "\n</parameter>\n<parameter=unit>\ncelsius\n</parameter>\n</function>\n</tool_call>"
        "<tool_call>\n<function=get_time>\n<parameter=tz>\nEurope/Paris\n</parameter>\n"
        "</function>\n</tool_call>",
        reasoning="hmm",
        calls=[WEATHER, TIME],
    ),
    Case(
        "nemotron_h-toolcall-list",
        "nemotron_h",
        NEMOTRON_TMPL,
        "Checking both.\n</think>\n<TOOLCALL>[" + W + ', {"name": "get_time", "arguments": '
        '"{\\"tz\\": \\"Europe/Paris\\"}"}]</TOOLCALL>',
        reasoning="Checking both.",
        calls=[WEATHER, TIME],
        prompt="<SPECIAL_11>Assistant\n<think>\n",
    ),
    Case(
        "nemotron_h-call-opens-inside-think",
        "nemotron_h",
        NEMOTRON_TMPL,
        "I will call it.\n<TOOLCALL>[" + W + "]</TOOLCALL>",
        reasoning="I will call it.",
        calls=[WEATHER],
        prompt="<think>\n",
    ),
    Case(
        "gemma4-thought-and-calls",
        "gemma4",
        GEMMA4_TMPL,
        "<|channel>thought\nThe user wants weather.<channel|>"
        '<|tool_call>call:get_weather{city:<|"|>Paris<|"|>,unit:<|"|>celsius<|"|>}<tool_call|>'
        '<|tool_call>call:get_time{tz:<|"|>Europe/Paris<|"|>}<tool_call|>',
        reasoning="The user wants weather.",
        calls=[WEATHER, TIME],
    ),
    Case(
        "gemma4-nested-values",
        "gemma4",
        "",
        'Sure. <|tool_call>call:book{n:2,ok:true,x:null,who:{name:<|"|>A, "B"<|"|>},'
        'tags:[<|"|>a<|"|>,3.5]}<tool_call|>',
        content="Sure.",
        calls=[
            ("book", {"n": 2, "ok": True, "x": None, "who": {"name": 'A, "B"'}, "tags": ["a", 3.5]})
        ],
    ),
    Case(
        "gemma4-think-off-plain",
        "gemma4",
        GEMMA4_TMPL,
        "Hello <there>, no channels | here.",
        content="Hello <there>, no channels | here.",
        prompt="<|turn>model\n<|channel>thought\n<channel|>",
    ),
    Case(
        "harmony-analysis-final",
        "gptoss",
        HARMONY_TMPL,
        "<|channel|>analysis<|message|>User greets. Reply.<|end|>"
        "<|start|>assistant<|channel|>final<|message|>Hello! How can I help?",
        reasoning="User greets. Reply.",
        content="Hello! How can I help?",
        prompt="<|start|>assistant",
    ),
    Case(
        "harmony-tool-call",
        "gptoss",
        HARMONY_TMPL,
        "<|channel|>analysis<|message|>Need to use function get_weather.<|end|>"
        "<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json"
        '<|message|>{"city": "Paris", "unit": "celsius"}<|call|>',
        reasoning="Need to use function get_weather.",
        calls=[WEATHER],
        prompt="<|start|>assistant",
    ),
    Case(
        "harmony-recipient-before-channel",
        "gptoss",
        HARMONY_TMPL,
        ' to=functions.get_time<|channel|>commentary json<|message|>{"tz": "Europe/Paris"}<|call|>',
        calls=[TIME],
    ),
    Case(
        "mistral-v3-list",
        "llama",
        MISTRAL_TMPL,
        '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}'
        ', {"name": "get_time", "arguments": {"tz": "Europe/Paris"}}]',
        calls=[WEATHER, TIME],
    ),
    Case(
        "mistral-v11-args",
        "llama",
        MISTRAL_TMPL,
        'Let me see.[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "unit": "celsius"}'
        '[TOOL_CALLS]get_time[CALL_ID]a1b2c3d4e[ARGS]{"tz": "Europe/Paris"}',
        content="Let me see.",
        calls=[WEATHER, TIME],
    ),
    Case(
        "magistral-think",
        "mistral3",
        MAGISTRAL_TMPL,
        '[THINK]Weather needed.[/THINK][TOOL_CALLS]get_time[ARGS]{"tz": "Europe/Paris"}',
        reasoning="Weather needed.",
        calls=[TIME],
    ),
    Case(
        "mistral-bad-args",
        "llama",
        MISTRAL_TMPL,
        "[TOOL_CALLS]get_time[ARGS]{tz: paris} ok",
        content="[TOOL_CALLS]get_time[ARGS]{tz: paris} ok",
        malformed=1,
    ),
    Case(
        "llama3-python-tag",
        "llama",
        LLAMA3_TMPL,
        '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}'
        '; {"name": "get_time", "parameters": {"tz": "Europe/Paris"}}',
        calls=[WEATHER, TIME],
    ),
    Case(
        "llama3-bare-json",
        "llama",
        LLAMA3_TMPL,
        '\n{"type": "function", "name": "get_time", "parameters": {"tz": "Europe/Paris"}}',
        calls=[TIME],
    ),
    Case(
        "llama3-json-answer-is-content",
        "llama",
        LLAMA3_TMPL,
        '{"answer": 4, "note": "}"} is the result',
        content='{"answer": 4, "note": "}"} is the result',
    ),
    Case(
        "llama3-text",
        "llama",
        LLAMA3_TMPL,
        "[1] Plain answer with {braces} and <|python",
        content="[1] Plain answer with {braces} and <|python",
    ),
    Case(
        "generic-tool-calls-object",
        "gemma3",
        "<start_of_turn>model",
        '{"tool_calls": [' + W + ', {"function": {"name": "get_time", "arguments": '
        '{"tz": "Europe/Paris"}}}]}',
        calls=[WEATHER, TIME],
    ),
    Case(
        "generic-bare-call",
        "gemma3",
        "",
        "  " + W,
        calls=[WEATHER],
    ),
]


def _parser(case: Case) -> OutputParser:
    return select_parsers(case.arch, case.template, prompt_text=case.prompt)


def _run(case: Case, chunks: list[str]) -> tuple[ParsedOutput, list]:
    parser = _parser(case)
    events: list = []
    for chunk in chunks:
        events += parser.push(chunk)
    events += parser.finish()
    return collect_output(events), events


def _view(out: ParsedOutput) -> tuple:
    return (
        out.reasoning,
        out.content,
        [(c.index, c.name, c.arguments) for c in out.tool_calls],
        [m.text for m in out.malformed],
    )


def _split(text: str, cuts: list[int]) -> list[str]:
    points = sorted({c for c in cuts if 0 < c < len(text)})
    return [text[a:b] for a, b in zip([0, *points], [*points, len(text)], strict=True)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_whole_text(case: Case) -> None:
    out = _parser(case).parse(case.text)
    assert out.reasoning == case.reasoning
    assert out.content == case.content
    assert [(c.name, c.arguments) for c in out.tool_calls] == case.calls
    assert [c.index for c in out.tool_calls] == list(range(len(case.calls)))
    assert len(out.malformed) == case.malformed
    for call in out.tool_calls:
        assert call.id.startswith("call_") and len(call.id) > 10
        assert json.loads(call.arguments_json) == call.arguments
    assert len({c.id for c in out.tool_calls}) == len(out.tool_calls)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_one_char_at_a_time(case: Case) -> None:
    whole = _parser(case).parse(case.text)
    streamed, events = _run(case, list(case.text))
    assert _view(streamed) == _view(whole)
    _check_event_order(events)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
@settings(max_examples=40, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=30))
def test_random_chunks(case: Case, cuts: list[int]) -> None:
    whole = _parser(case).parse(case.text)
    streamed, events = _run(case, _split(case.text, cuts))
    assert _view(streamed) == _view(whole)
    _check_event_order(events)


def _check_event_order(events: list) -> None:
    """Each call: start, then argument fragments forming a JSON object, then end."""
    open_calls: dict[int, str] = {}
    for e in events:
        if isinstance(e, ToolCallStart):
            assert e.index not in open_calls
            open_calls[e.index] = ""
        elif isinstance(e, ToolCallArgs):
            open_calls[e.index] += e.fragment
        elif isinstance(e, ToolCallEnd):
            assert isinstance(json.loads(open_calls.pop(e.call.index)), dict)
        elif isinstance(e, ContentDelta | ReasoningDelta):
            assert e.text
    assert not open_calls


def test_tags_cut_anywhere_never_leak() -> None:
    """Every two-piece split of every tag: no fragment of a tag in either field."""
    text = "<think>abc</think>xyz"
    for cut in range(len(text) + 1):
        splitter = think_splitter()
        deltas = splitter.push(text[:cut]) + splitter.push(text[cut:]) + splitter.finish()
        reasoning = "".join(d.text for d in deltas if d.channel == Channel.REASONING)
        content = "".join(d.text for d in deltas if d.channel == Channel.CONTENT)
        assert (reasoning, content) == ("abc", "xyz"), cut


def test_several_calls_in_one_chunk_streamed() -> None:
    case = next(c for c in CASES if c.id == "qwen3-two-calls")
    parser = _parser(case)
    events = parser.push(case.text) + parser.finish()
    starts = [e for e in events if isinstance(e, ToolCallStart)]
    assert [(s.index, s.name) for s in starts] == [(0, "get_weather"), (1, "get_time")]


def test_harmony_plain_text_is_final_answer() -> None:
    splitter = HarmonySplitter()
    deltas = splitter.push("Just text.") + splitter.finish()
    assert [(d.channel, d.text) for d in deltas] == [(Channel.CONTENT, "Just text.")]


def test_tools_off_leaves_answer_alone() -> None:
    text = "<think>x</think>" + W
    out = select_parsers("qwen3", QWEN_TMPL, tools=False).parse(text)
    assert (out.reasoning, out.content, out.tool_calls) == ("x", W, [])


def test_passthrough_is_exact() -> None:
    text = "  Hello,\n\n  world  \n"
    assert select_parsers("llama", "", tools=False).parse(text).content == text


@pytest.mark.parametrize(
    ("arch", "template", "reasoning", "tools"),
    [
        ("qwen3", QWEN_TMPL, "think", "hermes"),
        ("qwen35", "", "think", "hermes"),
        ("qwen35", QWEN_XML_TMPL, "think", "qwen-xml"),
        ("nemotron_h", "", "think", "hermes"),
        ("nemotron_h", NEMOTRON_TMPL, "think", "nemotron"),
        ("gemma4", "", "gemma4", "gemma4"),
        ("llama", GEMMA4_TMPL, "gemma4", "gemma4"),
        ("gptoss", "", "harmony", "harmony"),
        ("llama", HARMONY_TMPL, "harmony", "harmony"),
        ("llama", MISTRAL_TMPL, "none", "mistral"),
        ("llama", MAGISTRAL_TMPL, "magistral", "mistral"),
        ("llama", LLAMA3_TMPL, "none", "llama3"),
        ("gemma3", "<start_of_turn>model", "none", "json"),
        ("", "", "none", "json"),
    ],
)
def test_select_format(arch: str, template: str, reasoning: str, tools: str) -> None:
    fmt = select_format(arch, template)
    assert (fmt.reasoning_name, fmt.tools_name) == (reasoning, tools)


def test_mistral_call_form_follows_the_template() -> None:
    """The form a forced call's grammar writes (serve/outputs/grammars.py)."""
    assert select_format("llama", MAGISTRAL_TMPL).call_form == "args"
    assert select_format("llama", "{{ '[TOOL_CALLS] [' + calls + ']' }}").call_form == "list"
    assert select_format("mistral3", "").call_form == ""  # the vocabulary decides


def test_xml_values_read_by_their_declared_types() -> None:
    """Qwen's XML arguments are untyped text: a parameter the tool declares a string stays the
    text (`"42"`, `"true"`), a boolean written the template's way (`True`, Jinja's `string`
    filter) is a boolean, and undeclared values read as JSON where they parse."""
    schemas = {"f": {"type": "object", "properties": {
        "code": {"type": "string"}, "flag": {"type": "boolean"}, "pick": {"enum": ["1", "2"]},
        "n": {"type": "integer"}}}}  # fmt: skip
    parser = select_format("qwen35", QWEN_XML_TMPL).parser(schemas=schemas)
    body = "".join(
        f"<parameter={k}>\n{v}\n</parameter>\n"
        for k, v in [("code", "42"), ("flag", "True"), ("pick", "1"), ("n", "7"), ("x", "[1]")]
    )
    parsed = parser.parse(f"<tool_call>\n<function=f>\n{body}</function>\n</tool_call>")
    args = {"code": "42", "flag": True, "pick": "1", "n": 7, "x": [1]}
    assert [(c.name, c.arguments) for c in parsed.tool_calls] == [("f", args)]
