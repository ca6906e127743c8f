"""Grammar constraints over the real SmolLM2 vocabulary: every path the mask allows ends in
output that parses and validates; invalid schemas are refused before any generation."""

from __future__ import annotations

import json

import jsonschema
import numpy as np
import pytest
from conftest import real_model_path

from tsjax.gguf import GGUFFile
from tsjax.grammar import GrammarError, GrammarFactory
from tsjax.tokenizer import Tokenizer

SCHEMAS = [
    {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 8},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
        },
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {"tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
        "required": ["tags"],
    },
    {
        "type": "object",
        "properties": {"x": {"type": ["number", "null"]}, "ok": {"type": "boolean"}},
        "required": ["x", "ok"],
    },
]


@pytest.fixture(scope="module")
def factory():
    tok = Tokenizer.from_gguf(GGUFFile(real_model_path("smollm2-135m")).metadata)
    return GrammarFactory(tok)


def random_walk(factory, constraint, seed, limit=150):
    """Sample uniformly among allowed tokens, preferring to end once the grammar allows it."""
    rng = np.random.default_rng(seed)
    eog = factory.tokenizer.eog_ids
    out = []
    for _ in range(limit):
        allowed = constraint.allowed()
        assert len(allowed), "the mask allowed nothing"
        ends = [t for t in allowed if t in eog]
        choices = [t for t in allowed if t not in eog]
        if ends and (not choices or len(out) > limit // 2 or rng.random() < 0.3):
            return factory.tokenizer.decode(out)
        if len(out) > 30:  # steer towards closing the value so every walk ends
            closing = [t for t in choices if factory.tokenizer.decode([t]) in ('"', "]", "}")]
            choices = closing or choices
        t = int(rng.choice(choices))
        assert constraint.accept(t)
        out.append(t)
    pytest.skip("walk did not finish within the token limit")


@pytest.mark.parametrize("i", range(len(SCHEMAS)))
def test_every_allowed_path_validates(factory, i):
    for seed in range(3):
        text = random_walk(factory, factory.json_schema(SCHEMAS[i]), seed)
        jsonschema.validate(json.loads(text), SCHEMAS[i])


def test_json_object_gives_an_object(factory):
    text = random_walk(factory, factory.json_object(), 7)
    assert isinstance(json.loads(text), dict)


def test_control_tokens_are_never_allowed(factory):
    c = factory.json_schema({"type": "string"})
    assert c.accept(factory.tokenizer.encode('"', add_bos=False)[0])
    special = factory.tokenizer.special_ids - factory.tokenizer.eog_ids
    assert not special & set(c.allowed().tolist())


@pytest.mark.parametrize(
    "schema, message",
    [
        ({"type": "objekt"}, "invalid JSON schema"),
        ({"properties": {"a": {"minimum": "zero"}}}, "invalid JSON schema"),
        ("{not json", "not valid JSON"),
        ([1, 2], "must be a JSON object"),
    ],
)
def test_invalid_schemas_are_refused(factory, schema, message):
    with pytest.raises(GrammarError, match=message):
        factory.json_schema(schema)


@pytest.mark.slow
def test_constrained_generation_with_the_real_model_validates():
    """The compiled sampler applies the mask: greedy SmolLM2 output parses and validates."""
    from conftest import loaded_model

    from tsjax.generation import generate
    from tsjax.sampling import SamplingParams

    model = loaded_model("smollm2-135m", max_len=512)
    factory = GrammarFactory(model.tokenizer, model.config.vocab_size)
    ids = model.render_chat([{"role": "user", "content": "Describe a cat as JSON."}])
    for i, schema in enumerate(SCHEMAS):
        sp = SamplingParams.greedy() if i == 0 else SamplingParams(temperature=0.8, seed=i)
        res = generate(
            model, ids, sampling=sp, max_tokens=120, constraint=factory.json_schema(schema)
        )
        jsonschema.validate(json.loads(res.text), schema)
        assert res.finish_reason == "stop"


# -- grammars in each model's output syntax (serve/outputs/grammars.py) ----------------------
#
# The SmolLM2 vocabulary plus the control tokens the other formats use as markers, so a marker
# is one token as in the real models; `<|end|>` and `<|call|>` end generation, as for GPT-OSS.

MARKERS = ["<|tool_call>", "<tool_call|>", "[TOOL_CALLS]", "[ARGS]", "<|channel|>",
           "<|constrain|>", "<|message|>", "<|start|>", "<|end|>", "<|call|>", "<|channel>",
           "<channel|>", "[THINK]", "[/THINK]"]  # fmt: skip
TOOLS = [
    ("get_weather", {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
     "unit": {"enum": ["C", "F"]}}, "required": ["city"], "additionalProperties": False}),
    ("add", {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0,
     "maximum": 99}, "b": {"type": "integer"}}, "required": ["a", "b"]}),
    ("now", {"type": "object", "properties": {}}),
]  # fmt: skip
ANSWER = {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 10},
          "sure": {"type": "boolean"}}, "required": ["answer", "sure"]}  # fmt: skip
# (architecture, template) -> the format under test, by tools_name (Mistral by form)
FORMATS = {
    "json": ("llama", ""),
    "hermes": ("qwen3", "<tool_call>"),
    "qwen-xml": ("qwen35", "<tool_call><function=<parameter="),
    "nemotron": ("nemotron_h", "<TOOLCALL>["),
    "llama3": ("llama", "<|start_header_id|>"),
    "gemma4": ("gemma4", "<|tool_call>"),
    "mistral": ("mistral3", "[TOOL_CALLS]{{ name }}[ARGS]"),
    "mistral-list": ("llama", "[TOOL_CALLS] ["),
    "magistral": ("mistral3", "[THINK][TOOL_CALLS]{{ name }}[ARGS]"),
    "harmony": ("gptoss", "<|start|>assistant<|channel|>"),
}


@pytest.fixture(scope="module")
def marked():
    meta = dict(GGUFFile(real_model_path("smollm2-135m")).metadata)
    meta["tokenizer.ggml.tokens"] = [*meta["tokenizer.ggml.tokens"], *MARKERS]
    meta["tokenizer.ggml.token_type"] = [*meta["tokenizer.ggml.token_type"], *[3] * len(MARKERS)]
    return GrammarFactory(Tokenizer.from_gguf(meta))


def _fmt(name: str):
    from serve.outputs import select_format

    return select_format(*FORMATS[name])


def _answer(g, fmt, *, tools=TOOLS, output=None, think=False, prompt="", single=False):
    from serve.outputs.grammars import answer_format

    tree = answer_format(g, fmt, tools=tools, output=output, think=think, prompt_text=prompt,
                         single_call=single)  # fmt: skip
    return g.structural(tree)


def walk(g, c, seed, prefix="", limit=240):
    """`prefix` fed token by token (each must be allowed), then uniform among allowed tokens,
    steering towards closing values and markers so every walk ends. Control tokens other than
    the format's markers are never allowed."""
    tok = g.tokenizer
    markers = {tok.id_of(m) for m in MARKERS}
    rng = np.random.default_rng(seed)
    out = tok.encode(prefix, add_bos=False) if prefix else []
    for t in out:
        assert t in c.allowed() and c.accept(t), f"{tok.decode([t])!r} refused in {prefix!r}"
    for _ in range(limit):
        allowed = c.allowed().tolist()
        assert allowed, "the mask allowed nothing"
        assert not (set(allowed) & (tok.special_ids - tok.eog_ids - markers))
        ends = [t for t in allowed if t in tok.eog_ids]
        choices = [t for t in allowed if t not in tok.eog_ids]
        if ends and (not choices or len(out) > 60 or rng.random() < 0.5):
            return tok.decode(out)
        if len(out) > 25:
            closing = [t for t in choices if t in markers or tok.decode([t]) in '"]}']
            choices = closing or choices
        t = int(rng.choice(choices))
        assert c.accept(t)
        out.append(t)
    pytest.skip("walk did not finish within the token limit")


def _parsed(fmt, text, prompt=""):
    return fmt.parser(prompt, tools=True).parse(text)


def _check_calls(parsed, allowed):
    params = dict(TOOLS)
    assert parsed.tool_calls and not parsed.malformed and not parsed.content.strip()
    for call in parsed.tool_calls:
        assert call.name in allowed
        jsonschema.validate(call.arguments, params[call.name])


@pytest.mark.parametrize("name", list(FORMATS))
def test_forced_calls_in_each_format_parse_and_validate(marked, name):
    fmt = _fmt(name)
    names = [n for n, _ in TOOLS]
    for seed in range(4):
        text = walk(marked, _answer(marked, fmt), seed)
        _check_calls(_parsed(fmt, text), names)
    for seed in range(2):  # a named choice: only that function
        c = _answer(marked, fmt, tools=[TOOLS[1]])
        parsed = _parsed(fmt, walk(marked, c, seed))
        _check_calls(parsed, ["add"])


@pytest.mark.parametrize(
    "name", ["json", "hermes", "qwen-xml", "nemotron", "gemma4", "mistral", "harmony", "llama3"]
)
def test_union_is_a_valid_call_or_valid_content(marked, name):
    fmt = _fmt(name)
    for seed in range(6):
        parsed = _parsed(fmt, walk(marked, _answer(marked, fmt, output=(ANSWER, True)), seed))
        if parsed.tool_calls:
            _check_calls(parsed, [n for n, _ in TOOLS])
        else:
            jsonschema.validate(json.loads(parsed.content), ANSWER)
    # the content branch is open even where the walks all called
    head = "<|channel|>final<|message|>" if name == "harmony" else ""
    c = _answer(marked, fmt, output=(ANSWER, True))
    content = walk(marked, c, 0, prefix=head + '{"answer')
    jsonschema.validate(json.loads(_parsed(fmt, content).content), ANSWER)
    c = _answer(marked, fmt, output=(None, False))  # json_object beside the tools
    parsed = _parsed(fmt, walk(marked, c, 1))
    assert parsed.tool_calls or isinstance(json.loads(parsed.content), dict)


@pytest.mark.parametrize(
    "name, block",
    [
        ("hermes", "<think>First, the weather.</think>\n"),
        ("gemma4", "<|channel>thought\nFirst, the weather.<channel|>"),
        ("magistral", "[THINK]First, the weather.[/THINK]"),
    ],
)
def test_reasoning_block_is_optional_but_never_a_way_out(marked, name, block):
    fmt = _fmt(name)
    for think in (None, True):
        # with a block: reasoning, then JSON content valid under the format
        c = _answer(marked, fmt, tools=[], output=(ANSWER, True), think=think)
        parsed = _parsed(fmt, walk(marked, c, 2, prefix=block))
        assert parsed.reasoning == "First, the weather."
        jsonschema.validate(json.loads(parsed.content), ANSWER)
        # without one: the JSON from the first token; free text is refused
        c = _answer(marked, fmt, tools=[], output=(ANSWER, True), think=think)
        jsonschema.validate(json.loads(_parsed(fmt, walk(marked, c, 3, prefix="{")).content),
                            ANSWER)  # fmt: skip
        c = _answer(marked, fmt, tools=[], output=(ANSWER, True), think=think)
        assert not c.accept(marked.tokenizer.encode("Sure", add_bos=False)[0])
        # a forced call after the block
        c = _answer(marked, fmt, think=think)
        _check_calls(_parsed(fmt, walk(marked, c, 4, prefix=block)), [n for n, _ in TOOLS])
    c = _answer(marked, fmt, tools=[], output=(ANSWER, True), think=False)
    assert not c.accept(marked.tokenizer.encode(block, add_bos=False)[0])  # thinking off
    # the template closed an empty block (its way of switching thinking off): none follows
    empty = {"hermes": "<think>\n\n</think>\n\n", "gemma4": "<|channel>thought\n<channel|>",
             "magistral": "[THINK][/THINK]"}[name]  # fmt: skip
    c = _answer(marked, fmt, tools=[], output=(ANSWER, True), think=None, prompt="A:" + empty)
    assert not c.accept(marked.tokenizer.encode(block, add_bos=False)[0])


@pytest.mark.parametrize(
    "name, call, again",
    [
        ("hermes", '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>',
         "\n<tool_call>"),
        ("gemma4", '<|tool_call>call:add{"a": 1, "b": 2}<tool_call|>', "<|tool_call>"),
    ],
)  # fmt: skip
def test_a_named_function_is_called_once(marked, name, call, again):
    """tool_choice naming a function asks for one call to it; "required" allows several."""
    tok = marked.tokenizer
    for single in (True, False):
        c = _answer(marked, _fmt(name), tools=[TOOLS[1]], single=single)
        for t in tok.encode(call, add_bos=False):
            assert c.accept(t), tok.decode([t])
        assert c.accept(tok.encode(again, add_bos=False)[0]) != single


def test_prompt_that_opened_the_block_must_close_it(marked):
    fmt = _fmt("hermes")
    prompt = "<|im_start|>assistant\n<think>\n"
    c = _answer(marked, fmt, tools=[], output=(ANSWER, True), think=None, prompt=prompt)
    text = walk(marked, c, 5, prefix='Maybe {"answer": 1}? No.</think>\n\n')
    parsed = _parsed(fmt, text, prompt)
    assert parsed.reasoning == 'Maybe {"answer": 1}? No.'
    jsonschema.validate(json.loads(parsed.content), ANSWER)
    c = _answer(marked, fmt, tools=[], output=(ANSWER, True), think=None, prompt=prompt)
    for t in marked.tokenizer.encode('{"answer": "x", "sure": true}', add_bos=False):
        assert c.accept(t)  # still reasoning text: the grammar cannot end here
    assert not set(c.allowed().tolist()) & marked.tokenizer.eog_ids


def test_harmony_answers_in_the_final_channel(marked):
    """`<|end|>` ends generation here (as for GPT-OSS), so no analysis message is allowed
    before a constrained answer: it would stop the request half way."""
    fmt = _fmt("harmony")
    c = _answer(marked, fmt, tools=[], output=(ANSWER, True), think=True)
    text = walk(marked, c, 6)
    assert text.startswith("<|channel|>final<|message|>")
    jsonschema.validate(json.loads(_parsed(fmt, text).content), ANSWER)


@pytest.fixture(scope="module")
def harmony_vocab():
    """`marked` with `<|return|>` too: a Harmony vocabulary, where `<|end|>` ends a message
    and not the answer (`tsjax.tokenizer`, as llama.cpp), so it is no stop token."""
    meta = dict(GGUFFile(real_model_path("smollm2-135m")).metadata)
    extra = [*MARKERS, "<|return|>"]
    meta["tokenizer.ggml.tokens"] = [*meta["tokenizer.ggml.tokens"], *extra]
    meta["tokenizer.ggml.token_type"] = [*meta["tokenizer.ggml.token_type"], *[3] * len(extra)]
    return GrammarFactory(Tokenizer.from_gguf(meta))


def test_harmony_analysis_then_the_constrained_answer(harmony_vocab):
    """GPT-OSS reasons in an analysis message first (`<|end|><|start|>assistant` ends it),
    then answers in the final channel (JSON) or calls a tool; the analysis is optional, and
    thinking switched off leaves it out."""
    g, fmt = harmony_vocab, _fmt("harmony")
    tok = g.tokenizer
    assert tok.id_of("<|end|>") not in tok.eog_ids
    assert {tok.id_of("<|return|>"), tok.id_of("<|call|>")} <= tok.eog_ids
    block = "<|channel|>analysis<|message|>First, the weather.<|end|><|start|>assistant"
    for think in (None, True):
        c = _answer(g, fmt, tools=[], output=(ANSWER, True), think=think)
        parsed = _parsed(fmt, walk(g, c, 2, prefix=block))
        assert parsed.reasoning == "First, the weather."
        jsonschema.validate(json.loads(parsed.content), ANSWER)
        c = _answer(g, fmt, tools=[], output=(ANSWER, True), think=think)
        text = walk(g, c, 3, prefix="<|channel|>final<|message|>{")
        jsonschema.validate(json.loads(_parsed(fmt, text).content), ANSWER)
        c = _answer(g, fmt, think=think)  # a forced call after the analysis
        _check_calls(_parsed(fmt, walk(g, c, 4, prefix=block)), [n for n, _ in TOOLS])
    c = _answer(g, fmt, tools=[], output=(ANSWER, True), think=False)
    assert c.accept(tok.id_of("<|channel|>"))
    assert not c.accept(tok.encode("analysis", add_bos=False)[0])


def test_markers_are_tokens_and_other_control_tokens_stay_out(marked):
    tok = marked.tokenizer
    assert marked.marker("<|tool_call>") == {"type": "token", "token": tok.id_of("<|tool_call>")}
    assert marked.marker("<tool_call>") == {"type": "const_string", "value": "<tool_call>"}
    assert marked.marker("<|end|>")["type"] == "const_string"  # a stop token is never a marker
    c = _answer(marked, _fmt("gemma4"))
    assert set(c.allowed().tolist()) == {tok.id_of("<|tool_call>")}


def test_text_without_marker():
    from serve.outputs.grammars import text_without
    from tsjax.grammar import _xgrammar

    xgr = _xgrammar()

    for marker in ("</think>", "aab", "[/THINK]"):
        g = xgr.Grammar.from_ebnf(text_without(marker)["grammar"])
        for s in ("", "plain", "a</thinkb", "aa" + marker[:-1], "x" + marker, marker + "y"):
            m = xgr.testing._is_grammar_accept_string(g, s)
            assert m == (marker not in s), (marker, s)
    markers = ("</parameter>", "</tool_call>", "aab")
    g = xgr.Grammar.from_ebnf(text_without(*markers)["grammar"])
    for s in ("", "</para</tool_cal", "x</tool_call>", "</parameter>y", "</p</parameter>", "aaab",
              "</</t", "a<b>", "</tool_call"):  # fmt: skip
        m = xgr.testing._is_grammar_accept_string(g, s)
        assert m == (not any(x in s for x in markers)), s
