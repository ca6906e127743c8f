"""Gemma 4's chat format on the real template (llama.cpp's `google-gemma-4-31B-it.jinja`, which
the converter writes into the factory's GGUF and beside its HF checkpoint):

- Prompts: our template rendering and tokenization (control tokens only where the template
  wrote them; `<|"|>` one token) give exactly the ids of transformers' `apply_chat_template`
  with the checkpoint's tokenizer, thinking on, off and unset, with tools, a call (arguments
  sent as a JSON string, as OpenAI clients do) and its result.
- Output: the template's own spelling of an assistant turn (thought channel, two calls with
  `<|"|>` strings, nested values), decoded token by token from its ids, parses back into the
  reasoning and calls it was rendered from; grammars write its markers as those tokens.
- Server (the tiny dense model): thinking switched on and off through every API's field
  reaches the template (the prompt's token count is the reference's); a forced call through
  the official OpenAI client (one call, whole and streamed) and its result sent back through
  the OpenAI and Ollama clients, rendered the template's way.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import jsonschema
import pytest
from hf_factory import build
from test_server import _server, running_server

from serve.outputs import select_format
from tsjax.chat_template import ChatTemplate
from tsjax.gguf import GGUFFile
from tsjax.grammar import GrammarFactory
from tsjax.textstream import TextStream
from tsjax.tokenizer import Tokenizer

pytestmark = pytest.mark.slow

PARAMS = {"type": "object", "properties": {"city": {"type": "string", "description": "City",
          "maxLength": 8},
          "days": {"type": "integer", "minimum": 1, "maximum": 9}}, "required": ["city"],
          "additionalProperties": False}  # fmt: skip
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather now",
                                           "parameters": PARAMS}}]  # fmt: skip
ARGS = {"city": 'Paris, "FR" {x}', "days": 2}
ASK = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Paris?"}]
CALLED = [
    *ASK,
    {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function",
     "function": {"name": "get_weather", "arguments": json.dumps(ARGS)}}]},
    {"role": "tool", "tool_call_id": "c1", "content": '{"temp": 21}'},
]  # fmt: skip


@pytest.fixture(scope="module")
def gemma4():
    m = build("gemma4")
    g = GGUFFile(m.gguf["f32"])
    return m, Tokenizer.from_file(g), ChatTemplate.from_metadata(g.metadata)


def _ours(tok, tmpl, messages, tools, think) -> list[int]:
    text, spans = tmpl.render_marked(
        messages, tok.control_texts, tools=tools, add_generation_prompt=True,
        enable_thinking=think,
    )  # fmt: skip
    return tok.encode_marked(text, spans, add_bos=False)


def _reference(m, messages, tools, think) -> list[int]:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(m.hf_dir)
    plain = copy.deepcopy(list(messages))
    for x in plain:  # transformers' templates take arguments as a mapping
        for c in x.get("tool_calls") or []:
            c["function"] = {**c["function"], "arguments": json.loads(c["function"]["arguments"])}
    kw = {} if think is None else {"enable_thinking": think}
    return hf.apply_chat_template(
        plain, tools=tools, add_generation_prompt=True, tokenize=True, return_dict=True, **kw
    )["input_ids"]


@pytest.mark.parametrize("think", [None, True, False])
def test_prompts_equal_transformers(gemma4, think):
    m, tok, tmpl = gemma4
    for messages, tools in ((ASK, None), (ASK, TOOLS), (CALLED, TOOLS)):
        want = _reference(m, messages, tools, think)
        assert _ours(tok, tmpl, messages, tools, think) == want, (len(messages), tools)
    ids = _ours(tok, tmpl, CALLED, TOOLS, think)
    assert ids.count(tok.id_of('<|"|>')) >= 8  # the declaration's and the call's strings
    assert (tok.id_of("<|think|>") in ids) == bool(think)


def test_template_spelling_parses_back(gemma4):
    """The template writes an earlier assistant turn exactly as the model is trained to answer:
    that text, as the model's tokens, must come back as the same reasoning and calls."""
    _, tok, tmpl = gemma4
    calls = [("get_weather", ARGS), ("get_weather", {"city": "Oslo", "days": 1, "opts":
             {"units": ["C", "K"], "fresh": True, "note": "a, b: c"}})]  # fmt: skip
    turn = {"role": "assistant", "content": "", "reasoning_content": "Two cities: two calls.",
            "tool_calls": [{"id": f"c{i}", "type": "function",
                            "function": {"name": n, "arguments": a}}
                           for i, (n, a) in enumerate(calls)]}  # fmt: skip
    head = tmpl.render(ASK, add_generation_prompt=True, enable_thinking=True)
    full, spans = tmpl.render_marked([*ASK, turn], tok.control_texts, enable_thinking=True)
    assert full.startswith(head) and full.endswith("<|tool_response>")
    answer = full[len(head) : -len("<|tool_response>")]
    assert '{city:<|"|>Paris, "FR" {x}<|"|>,days:2}' in answer  # native strings, bare keys
    cut = [(a - len(head), b - len(head)) for a, b in spans if a >= len(head)]
    ids = tok.encode_marked(answer, cut, add_bos=False, add_eos=False)
    assert tok.id_of("<|channel>") in ids and tok.id_of('<|"|>') in ids
    parsed = _parse(tok, tmpl, head, ids)
    assert parsed.reasoning.strip() == "Two cities: two calls."
    assert [(c.name, c.arguments) for c in parsed.tool_calls] == calls
    assert parsed.content == "" and not parsed.malformed
    # thinking off: the prompt closed an empty thought; a plain answer is all content
    head = tmpl.render(ASK, add_generation_prompt=True, enable_thinking=False)
    assert head.endswith("<|channel>thought\n<channel|>")
    parsed = _parse(tok, tmpl, head, tok.encode("Sunny, 21.", add_bos=False))
    assert (parsed.reasoning, parsed.content) == ("", "Sunny, 21.")
    # grammars write these markers as the one (user-defined) token the template's text is
    g = GrammarFactory(tok)
    for mark in ("<|tool_call>", "<tool_call|>", "<|channel>", "<channel|>"):
        assert g.marker(mark) == {"type": "token", "token": tok.id_of(mark)}


def _parse(tok, tmpl, prompt_text: str, ids: list[int]):
    """`ids` as the server streams them: detokenized one token at a time, parsed as they come."""
    parser = select_format("gemma4", tmpl.source).parser(prompt_text)
    stream = TextStream(tok, max_tokens=len(ids), room=len(ids))
    events = [e for t in ids for e in parser.push(stream.push(t))]
    events += parser.push(stream.finish("stop")) + parser.finish()
    from serve.outputs.registry import collect_output

    return collect_output(events)


# -- through the server ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(gemma4):
    """(base URL, model name) of a server on the tiny dense model, stopped after this module."""
    path = gemma4[0].gguf["f32"]
    # few compiled programs: prompts up to 128 tokens a chunk, one decode step a dispatch, and
    # attention buckets up to the 250-token conversation with tools and a call
    settings = dict(rows=1, max_len=320, prefill_chunk=128, decode_steps=1)
    yield running_server(path, **settings), path.name
    _server.pop(f"url:{path}")
    _server.pop(f"server:{path}").stop()


def test_thinking_switch_through_each_api(gemma4, server):
    openai = pytest.importorskip("openai")
    ollama = pytest.importorskip("ollama")
    anthropic = pytest.importorskip("anthropic")
    m, tok, tmpl = gemma4
    url, name = server
    n = {t: len(_reference(m, ASK, None, t)) for t in (None, True, False)}
    assert n[True] != n[False] and n[None] == n[False]  # the template's default: off
    oai = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    oll = ollama.Client(host=url)
    ant = anthropic.Anthropic(base_url=url, api_key="x", max_retries=0)

    def openai_chat(**kw: Any) -> int:
        r = oai.chat.completions.create(model=name, messages=ASK, max_tokens=1, **kw)
        return r.usage.prompt_tokens

    def ollama_chat(**kw: Any) -> int:
        r = oll.chat(model=name, messages=ASK, options={"num_predict": 1}, **kw)
        return r.prompt_eval_count

    def anthropic_messages(**kw: Any) -> int:
        r = ant.messages.create(model=name, system=ASK[0]["content"], max_tokens=2,
                                messages=ASK[1:], **kw)  # fmt: skip
        return r.usage.input_tokens + (r.usage.cache_read_input_tokens or 0)  # less the reuse

    def responses(**kw: Any) -> int:
        r = oai.responses.create(model=name, instructions=ASK[0]["content"],
                                 input=ASK[1]["content"], max_output_tokens=1, **kw)  # fmt: skip
        return r.usage.input_tokens

    cases = [
        (openai_chat(), None),
        (openai_chat(extra_body={"chat_template_kwargs": {"enable_thinking": True}}), True),
        (openai_chat(extra_body={"chat_template_kwargs": {"enable_thinking": False}}), False),
        (openai_chat(reasoning_effort="low"), True),
        (openai_chat(reasoning_effort="none"), False),
        (openai_chat(extra_body={"think": True}), True),
        (ollama_chat(), None),
        (ollama_chat(think=True), True),
        (ollama_chat(think="high"), True),
        (ollama_chat(think=False), False),
        (anthropic_messages(thinking={"type": "enabled", "budget_tokens": 1024}), True),
        (anthropic_messages(thinking={"type": "disabled"}), False),
        (responses(reasoning={"effort": "medium"}), True),
        (responses(), None),
    ]
    assert [got for got, _ in cases] == [n[want] for _, want in cases]


def test_forced_call_and_its_result_through_the_clients(gemma4, server):
    openai = pytest.importorskip("openai")
    ollama = pytest.importorskip("ollama")
    m, tok, tmpl = gemma4
    url, name = server
    oai = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    forced = {"type": "function", "function": {"name": "get_weather"}}
    kw = dict(model=name, messages=ASK, tools=TOOLS, tool_choice=forced, max_tokens=64,
              temperature=0)  # fmt: skip
    r = oai.chat.completions.create(**kw)
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls" and not msg.content
    (call,) = msg.tool_calls
    assert call.function.name == "get_weather"
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, PARAMS)
    streamed = list(oai.chat.completions.create(**kw, stream=True))
    frags = [tc.function.arguments or "" for c in streamed if c.choices
             for tc in c.choices[0].delta.tool_calls or []]  # fmt: skip
    assert json.loads("".join(frags)) == args
    # the call and its result back: rendered as the template writes them (the reference's ids)
    history = [*ASK, msg.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 21}'}]  # fmt: skip
    want = len(_reference(m, [*ASK, {**history[2], "content": None}, history[3]], TOOLS, None))
    r = oai.chat.completions.create(model=name, messages=history, tools=TOOLS, max_tokens=2)
    assert r.usage.prompt_tokens == want
    oll = ollama.Client(host=url)
    ollama_history = [*ASK, {"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "get_weather", "arguments": args}}]},
        {"role": "tool", "content": '{"temp": 21}', "tool_name": "get_weather"}]  # fmt: skip
    got = oll.chat(model=name, messages=ollama_history, tools=TOOLS, options={"num_predict": 1})
    assert got.prompt_eval_count == want
