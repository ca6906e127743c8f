"""The hybrid recurrent families end to end: Qwen 3.5 (Gated DeltaNet + gated attention) and
Nemotron-H (Mamba2 + attention + FFN blocks), on the factory's tiny models (`hf_factory`).

- All-position logits against transformers on the HF weights, over a prompt longer than one
  chunk of the layers' chunked prefill (every family and variant).
- The engine: a conversation's next turn resumes from the row's own state (the end of the
  previous answer) or from a checkpoint saved during an earlier prefill; the greedy tokens equal
  transformers' generation from one full prefill; a prefix with no saved state at its end is not
  counted as a hit.
"""

from __future__ import annotations

import asyncio

import pytest
from conftest import all_logits, rel_err

from serve.engine import Engine, EventKind, GenerationRequest
from tsjax.model import load
from tsjax.sampling import SamplingParams
from tsjax.shapes import StepShapes

pytestmark = pytest.mark.slow

#: 120 tokens: past the chunk of both chunked prefills (64 for DeltaNet, the factory's 8 for
#: Mamba2's SSD), deterministic and spread over the 512-token vocabulary (ids 20..419).
IDS = [(37 * i + 11) % 400 + 20 for i in range(120)]


def _load(name: str, rows: int = 2):
    from hf_factory import build

    m = build(name)
    shapes = StepShapes.default(rows=rows, max_len=128, min_prefill=16, min_attn=32)
    return m, load(m.gguf["f32"], progress=False, shapes=shapes, quant="f32")  # exact


@pytest.mark.parametrize("name", ["qwen35", "qwen35moe", "nemotron_h", "nemotron_h_moe"])
def test_all_position_logits_match_transformers(name):
    from hf_reference import hf_logits

    m, model = _load(name, rows=1)
    ours, want = all_logits(model, IDS), hf_logits(m, IDS)
    errs = [rel_err(ours[t], want[t]) for t in range(len(IDS))]
    assert max(errs) < 1e-3, (name, max(errs), errs.index(max(errs)))


def _hf_greedy(m, ids: list[int], n: int) -> list[int]:
    """transformers' greedy continuation of `ids` (one full prefill, then its own decode), up
    to n tokens or its end-of-sequence token included."""
    import torch
    from hf_reference import hf_model

    with torch.no_grad():
        out = hf_model(m).generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)
    return out[0, len(ids) :].tolist()


@pytest.mark.parametrize("name", ["qwen35", "nemotron_h"])
def test_conversation_resumes_from_saved_states(name):
    m, model = _load(name)
    assert not model.runner().rewinds
    eng = Engine(model, decode_steps=4, prefill_chunk=32)
    eng.start()
    greedy = SamplingParams.greedy()

    def turn(prompt: list[int], n: int, **kw) -> tuple[list[int], int]:
        async def main():
            return [ev async for ev in eng.generate(GenerationRequest(prompt, greedy, n, **kw))]

        events = asyncio.run(main())
        tokens = [t for ev in events if ev.kind is EventKind.TOKEN for t in ev.token_ids]
        assert events[-1].kind is EventKind.DONE, events[-1]
        return tokens, events[-1].stats.cached_tokens

    try:
        p1 = IDS[:40]
        # a checkpoint inside the prompt (where a chat's last user message would start)
        a1, cached = turn(p1, 10, checkpoints=(30,))
        assert cached == 0 and a1 == _hf_greedy(m, p1, 10)
        # the next turn: the row's own state holds the prompt and the answer but its last
        # token (sampled, never fed), so everything up to there is reused
        p2 = p1 + a1 + [21, 22, 23]
        a2, cached = turn(p2, 8)
        assert cached == len(p1) + len(a1) - 1
        assert a2 == _hf_greedy(m, p2, 8)
        # an edit after the checkpoint: the row resumes from the checkpoint's saved state
        p3 = p1[:35] + [24, 25, 26]
        a3, cached = turn(p3, 8)
        assert cached == 30
        assert a3 == _hf_greedy(m, p3, 8)
        # 25 tokens shared with a row, but no state saved there: not a hit
        assert turn(p1[:25] + [27, 28], 4)[1] == 0
    finally:
        eng.stop()


@pytest.mark.parametrize("name", ["qwen35", "nemotron_h_moe"])
def test_chat_resume_points_are_where_the_next_turns_branch_off(name):
    """A chat prompt's resume points (where the engine saves a recurrent state) are where the
    generation prompt and the last user message start: the next turn (whose template drops the
    answer's reasoning) and an edited question share the prompt's tokens up to there."""
    from serve.translation.prompt import chat_prompt

    _, model = _load(name, rows=1)
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi there"},
        {"role": "assistant", "content": "hello", "reasoning_content": "a greeting"},
        {"role": "user", "content": "and now?"},
    ]
    prompt = chat_prompt(model, chat, resume_points=True)
    user, gen = prompt.resume_points
    reply = {"role": "assistant", "content": "fine", "reasoning_content": "think"}
    after = chat_prompt(model, [*chat, reply, {"role": "user", "content": "ok"}]).ids
    edited = chat_prompt(model, [*chat[:-1], {"role": "user", "content": "or?"}]).ids
    assert model.tokenizer.decode(prompt.ids[user:gen]).startswith("user\nand now?")

    def shared(ids: list[int]) -> int:
        return next(i for i, (a, b) in enumerate(zip(ids, prompt.ids, strict=False)) if a != b)

    assert user < shared(edited) < gen <= shared(after)


# (family, what opens an assistant turn, what ends it) in the factory's real templates
TURNS = [
    ("qwen35", "<|im_start|>assistant\n", "<|im_end|>"),
    ("nemotron_h", "<SPECIAL_11>Assistant\n", "\n<SPECIAL_12>"),
    ("nemotron_h_moe", "<|im_start|>assistant\n", "<|im_end|>"),
]
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"},
        "metric": {"type": "boolean"}}, "required": ["city"]}}},
    {"type": "function", "function": {"name": "now", "parameters": {"type": "object",
     "properties": {}}}},
]  # fmt: skip


@pytest.mark.parametrize(("name", "opens", "ends"), TURNS, ids=[t[0] for t in TURNS])
def test_tool_calls_as_the_real_template_writes_them_parse_back(name, opens, ends):
    """An assistant turn with tool calls, rendered by the family's own chat template, reads
    back through the output format chosen for that template as the same calls (a string
    that looks like a number stays a string; a boolean survives the template's spelling)."""
    from serve.outputs import select_format
    from serve.translation.prompt import chat_prompt

    _, model = _load(name, rows=1)
    calls = [("get_weather", {"city": "0042", "days": 3, "metric": False}), ("now", {})]
    chat = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": n, "arguments": a}} for n, a in calls]},
        {"role": "tool", "content": "sunny"},
        {"role": "user", "content": "Thanks."},
    ]  # fmt: skip
    text = chat_prompt(model, chat, tools=TOOLS).text
    start = text.index(opens, text.index("Weather?")) + len(opens)
    turn = text[start : text.index(ends, start)]
    fmt = select_format(model.config.architecture, model.template.source)
    assert fmt.tools_name == {"nemotron_h": "nemotron"}.get(name, "qwen-xml")
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    parsed = fmt.parser(text[:start], schemas=schemas).parse(turn)
    assert [(c.name, c.arguments) for c in parsed.tool_calls] == calls, turn
    assert not parsed.content.strip() and not parsed.malformed


def test_nemotron_h_thinking_switch():
    """Nemotron-H Nano v2's template switches thinking by `/think` / `/no_think` in a message,
    not `enable_thinking`: the request's switch reaches it that way, unseen in the text."""
    from serve.translation.prompt import chat_prompt

    _, model = _load("nemotron_h", rows=1)
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    on, off, default = (chat_prompt(model, chat, think=t).text for t in (True, False, None))
    assert off.endswith("Assistant\n<think></think>") and "/no_think" not in off
    assert on == default and on.endswith("Assistant\n<think>\n")
