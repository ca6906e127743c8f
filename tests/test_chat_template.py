"""Chat templates: GGUF templates rendered as transformers renders them, built-in fallbacks in
the published formats, and a sandbox that untrusted templates cannot escape."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest

from tsjax.chat_template import (
    BUILTIN_TEMPLATES,
    ChatTemplate,
    TemplateError,
    builtin_family,
    normalize_messages,
    special_tokens_from_metadata,
)

MODELS = Path("/root/.cache/tsjax/models")
SMOLLM = MODELS / "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA = MODELS / "gemma-3-270m-q4_k_m.gguf"


def _metadata(path: Path) -> dict:
    if not path.is_file():
        pytest.skip(f"model file missing: {path}")
    from tsjax.gguf import GGUFFile

    return GGUFFile(path).metadata


@pytest.fixture(scope="module")
def smollm_metadata() -> dict:
    return _metadata(SMOLLM)


@pytest.fixture(scope="module")
def gemma_metadata() -> dict:
    return _metadata(GEMMA)  # the 262k-entry vocab is slow to read: once per module


# ----------------------------------------------------------------------------- conversations

SYSTEM_USER = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+2?"},
]
USER_ONLY = [{"role": "user", "content": "Hello there"}]
MULTI_TURN = [
    {"role": "system", "content": "Answer in French."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Bonjour !"},
    {"role": "user", "content": "How are you?"},
]
ENDS_WITH_ASSISTANT = [
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue — or “bleu”."},
]
CONVERSATIONS = {
    "system_user": SYSTEM_USER,
    "user_only": USER_ONLY,
    "multi_turn": MULTI_TURN,
    "ends_with_assistant": ENDS_WITH_ASSISTANT,
}

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
TOOL_CONVERSATION = [
    {"role": "system", "content": "Be helpful."},
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": None,  # OpenAI clients send null content next to tool calls
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"},
]

# A ChatML-with-tools template modelled on Qwen3's published one: tools in the system turn, tool
# calls as <tool_call> JSON (arguments through `tojson` unless already a string), consecutive tool
# results merged into one user turn, and the empty think block when enable_thinking is false.
QWEN_STYLE_TEMPLATE = """\
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools><|im_end|>\\n" }}
{%- elif messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == "user" or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>assistant\\n' + message.content }}
        {%- for tool_call in message.tool_calls or [] %}
            {%- if (loop.first and message.content) or not loop.first %}
                {{- '\\n' }}
            {%- endif %}
            {%- if tool_call.function %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '<tool_call>\\n{"name": "' + tool_call.name + '", "arguments": ' }}
            {%- if tool_call.arguments is string %}
                {{- tool_call.arguments }}
            {%- else %}
                {{- tool_call.arguments | tojson }}
            {%- endif %}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or messages[loop.index0 - 1].role != "tool" %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}
        {%- if loop.last or messages[loop.index0 + 1].role != "tool" %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}
"""

QWEN_STYLE_TOOL_PROMPT = (
    "<|im_start|>system\nBe helpful.\n\n# Tools\n\n<tools>\n"
    + json.dumps(WEATHER_TOOL)
    + "\n</tools><|im_end|>\n"
    "<|im_start|>user\nWeather in Paris?<|im_end|>\n"
    '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}'
    "\n</tool_call><|im_end|>\n"
    "<|im_start|>user\n<tool_response>\n18 C, sunny\n</tool_response><|im_end|>\n"
    "<|im_start|>assistant\n"
)


# ----------------------------------------------------------------------------- GGUF template


def test_smollm_uses_gguf_template(smollm_metadata: dict) -> None:
    template = ChatTemplate.from_metadata(smollm_metadata)
    assert template.name == "GGUF chat template"
    assert template.source == smollm_metadata["tokenizer.chat_template"]
    assert template.special_tokens["bos_token"] == "<|im_start|>"
    assert template.special_tokens["eos_token"] == "<|im_end|>"
    # SmolLM's BOS is <|im_start|>, which every rendered prompt starts with: adding BOS would
    # double it.
    assert template.bos_in_template
    assert template.render(SYSTEM_USER) == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    )


@pytest.fixture(scope="module")
def hf_smollm_tokenizer():
    if not SMOLLM.is_file():
        pytest.skip(f"model file missing: {SMOLLM}")
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(SMOLLM.parent), gguf_file=SMOLLM.name)


@pytest.mark.slow
@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("conversation", list(CONVERSATIONS), ids=list(CONVERSATIONS))
def test_smollm_matches_transformers(
    smollm_metadata: dict, hf_smollm_tokenizer, conversation: str, add_generation_prompt: bool
) -> None:
    messages = CONVERSATIONS[conversation]
    expected = hf_smollm_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    got = ChatTemplate.from_metadata(smollm_metadata).render(
        messages, add_generation_prompt=add_generation_prompt
    )
    assert got == expected


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(BUILTIN_TEMPLATES) + ["qwen_style"])
def test_environment_matches_transformers_renderer(family: str) -> None:
    """Same template, same (normalised) messages: our sandbox renders what transformers' does,
    including tools, tool calls, `tojson` and `enable_thinking`."""
    cut = pytest.importorskip("transformers.utils.chat_template_utils")
    if family == "qwen_style":
        template = ChatTemplate.from_string(QWEN_STYLE_TEMPLATE)
    else:
        template = ChatTemplate.builtin(family)
    conversations = [SYSTEM_USER, MULTI_TURN, ENDS_WITH_ASSISTANT]
    if family != "gemma":  # Gemma has no tool format
        conversations.append(TOOL_CONVERSATION)
    for messages in conversations:
        tools = [WEATHER_TOOL] if messages is TOOL_CONVERSATION else None
        for thinking in (None, False):
            kwargs = {} if thinking is None else {"enable_thinking": thinking}
            expected = cut.render_jinja_template(
                [normalize_messages(messages)],
                tools=tools,
                chat_template=template.source,
                add_generation_prompt=True,
                **template.special_tokens,
                **kwargs,
            )[0][0]
            assert template.render(messages, tools=tools, enable_thinking=thinking) == expected


# ----------------------------------------------------------------------------- built-in fallbacks


def test_gemma_file_falls_back_to_builtin_gemma(gemma_metadata: dict) -> None:
    assert "tokenizer.chat_template" not in gemma_metadata
    template = ChatTemplate.from_metadata(gemma_metadata)
    assert template.name == "built-in gemma template"
    assert template.bos_token == "<bos>"
    assert template.special_tokens["eos_token"] == "<eos>"
    assert template.bos_in_template

    # The published Gemma 3 format: BOS, system prompt + blank line folded into the first user
    # turn, "model" for the assistant, turn contents trimmed.
    assert template.render(SYSTEM_USER) == (
        "<bos><start_of_turn>user\nYou are terse.\n\nWhat is 2+2?<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    assert template.render(USER_ONLY) == (
        "<bos><start_of_turn>user\nHello there<end_of_turn>\n<start_of_turn>model\n"
    )
    assert template.render(MULTI_TURN) == (
        "<bos><start_of_turn>user\nAnswer in French.\n\nHi<end_of_turn>\n"
        "<start_of_turn>model\nBonjour !<end_of_turn>\n"
        "<start_of_turn>user\nHow are you?<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    assert template.render(ENDS_WITH_ASSISTANT, add_generation_prompt=False) == (
        "<bos><start_of_turn>user\nName a colour.<end_of_turn>\n"
        "<start_of_turn>model\nBlue — or “bleu”.<end_of_turn>\n"
    )
    padded = [{"role": "user", "content": "  spaced out \n"}]
    assert template.render(padded) == (
        "<bos><start_of_turn>user\nspaced out<end_of_turn>\n<start_of_turn>model\n"
    )


def test_gemma_rejects_roles_that_do_not_alternate(gemma_metadata: dict) -> None:
    template = ChatTemplate.from_metadata(gemma_metadata)
    messages = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(TemplateError, match="built-in gemma template.*must alternate"):
        template.render(messages)


def test_gemma_image_placeholder() -> None:
    template = ChatTemplate.builtin("gemma")
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                {"type": "text", "text": "What is this?"},
            ],
        }
    ]
    assert template.render(messages, image_placeholder="<start_of_image>") == (
        "<bos><start_of_turn>user\n<start_of_image>\nWhat is this?<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    assert template.render(messages) == (
        "<bos><start_of_turn>user\nWhat is this?<end_of_turn>\n<start_of_turn>model\n"
    )


def _vocab_metadata(arch: str, tokens: list[str], template: str | None = None) -> dict:
    meta = {
        "general.architecture": arch,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.bos_token_id": 0,
        "tokenizer.ggml.eos_token_id": 1,
    }
    if template is not None:
        meta["tokenizer.chat_template"] = template
    return meta


LLAMA3_VOCAB = ["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"]


@pytest.mark.parametrize(
    ("arch", "tokens", "family"),
    [
        ("gemma", ["<bos>", "<eos>"], "gemma"),
        ("gemma2", ["<bos>", "<eos>"], "gemma"),
        ("gemma3", ["<bos>", "<eos>"], "gemma"),
        ("llama", LLAMA3_VOCAB, "llama3"),
        ("llama", ["<s>", "</s>"], "chatml"),
        ("qwen2", ["<|endoftext|>", "<|im_end|>"], "chatml"),
        ("qwen3", ["<|endoftext|>", "<|im_end|>"], "qwen3"),
        ("phi3", ["<s>", "</s>"], "chatml"),
    ],
)
def test_fallback_family_by_architecture(arch: str, tokens: list[str], family: str) -> None:
    assert builtin_family(arch, tokens) == family
    template = ChatTemplate.from_metadata(_vocab_metadata(arch, tokens))
    assert template.name == f"built-in {family} template"
    assert template.source == BUILTIN_TEMPLATES[family]
    assert template.bos_token == tokens[0]


def test_architecture_argument_overrides_metadata() -> None:
    meta = _vocab_metadata("qwen2", ["<bos>", "<eos>"])
    assert ChatTemplate.from_metadata(meta, "gemma3").name == "built-in gemma template"


def test_gguf_template_wins_over_fallback() -> None:
    meta = _vocab_metadata("gemma3", ["<bos>", "<eos>"], template="{{ bos_token }}custom")
    template = ChatTemplate.from_metadata(meta)
    assert template.name == "GGUF chat template"
    assert template.render(USER_ONLY) == "<bos>custom"


def test_llama3_builtin_format() -> None:
    template = ChatTemplate.from_metadata(_vocab_metadata("llama", LLAMA3_VOCAB))
    assert template.bos_in_template
    assert template.render(MULTI_TURN) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nAnswer in French.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nBonjour !<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHow are you?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_chatml_and_qwen3_builtins() -> None:
    chatml = ChatTemplate.builtin("chatml")
    expected = (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert not chatml.bos_in_template
    assert chatml.render(SYSTEM_USER) == expected
    # Plain ChatML models never saw think tags: enable_thinking changes nothing there.
    assert chatml.render(SYSTEM_USER, enable_thinking=False) == expected
    qwen3 = ChatTemplate.builtin("qwen3")
    assert qwen3.render(SYSTEM_USER) == expected
    assert qwen3.render(SYSTEM_USER, enable_thinking=True) == expected
    assert qwen3.render(SYSTEM_USER, enable_thinking=False) == expected + "<think>\n\n</think>\n\n"


def test_builtin_chatml_tools_follow_qwen_format() -> None:
    prompt = ChatTemplate.builtin("qwen3").render(TOOL_CONVERSATION, tools=[WEATHER_TOOL])
    assert prompt.startswith("<|im_start|>system\nBe helpful.\n\n# Tools\n")
    assert "<tools>\n" + json.dumps(WEATHER_TOOL) + "\n</tools>" in prompt
    assert prompt.endswith(
        "<|im_start|>user\nWeather in Paris?<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": '
        '{"city": "Paris"}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\n18 C, sunny\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_unknown_builtin_is_an_error() -> None:
    with pytest.raises(TemplateError, match="no built-in chat template 'mistral'"):
        ChatTemplate.builtin("mistral")


# ----------------------------------------------------------------------------- tools, thinking


def test_qwen_style_template_with_tools_and_thinking() -> None:
    template = ChatTemplate.from_string(QWEN_STYLE_TEMPLATE)
    prompt = template.render(TOOL_CONVERSATION, tools=[WEATHER_TOOL])
    assert prompt == QWEN_STYLE_TOOL_PROMPT
    assert template.render(TOOL_CONVERSATION, tools=[WEATHER_TOOL], enable_thinking=True) == prompt
    no_think = template.render(TOOL_CONVERSATION, tools=[WEATHER_TOOL], enable_thinking=False)
    assert no_think == prompt + "<think>\n\n</think>\n\n"

    # Without tools the system prompt is a plain system turn.
    assert template.render(SYSTEM_USER, enable_thinking=False) == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
        "<think>\n\n</think>\n\n"
    )


def test_enable_thinking_left_undefined_when_none() -> None:
    template = ChatTemplate.from_string(
        "{{ 'defined' if enable_thinking is defined else 'undefined' }}:{{ tools }}"
    )
    assert template.render(USER_ONLY) == "undefined:None"
    assert template.render(USER_ONLY, enable_thinking=False) == "defined:None"


def test_tool_use_variant_renders_requests_with_tools() -> None:
    meta = _vocab_metadata("qwen2", ["<s>", "</s>"], template="plain")
    meta["tokenizer.chat_template.tool_use"] = "tools:{{ tools | length }}"
    template = ChatTemplate.from_metadata(meta)
    assert template.render(USER_ONLY) == "plain"
    assert template.render(USER_ONLY, tools=[WEATHER_TOOL]) == "tools:1"


# ----------------------------------------------------------------------------- normalisation


def test_tool_call_arguments_become_dicts() -> None:
    messages = normalize_messages(TOOL_CONVERSATION)
    assistant = messages[2]
    assert assistant["content"] == ""
    call = assistant["tool_calls"][0]
    assert call["function"]["arguments"] == {"city": "Paris"}
    assert messages[3]["name"] == "get_weather"  # filled from the call the result answers

    # Dict arguments, a flat {name, arguments} call, empty and malformed arguments.
    calls = normalize_messages(
        [
            {
                "role": "assistant",
                "tool_calls": [
                    {"function": {"name": "a", "arguments": {"x": 1}}},
                    {"name": "b", "arguments": '{"y": [1, 2]}'},
                    {"function": {"name": "c", "arguments": ""}},
                    {"function": {"name": "d", "arguments": "{not json"}},
                ],
            }
        ]
    )[0]["tool_calls"]
    assert [c["function"]["arguments"] for c in calls] == [
        {"x": 1},
        {"y": [1, 2]},
        {},
        "{not json",
    ]
    assert all(c["type"] == "function" for c in calls)


def test_templates_can_iterate_arguments() -> None:
    template = ChatTemplate.from_string(
        "{% for m in messages %}{% for c in m.tool_calls or [] %}"
        "{{ c.function.name }}({% for k, v in c.function.arguments | items %}"
        "{{ k }}={{ v | tojson }}{% if not loop.last %}, {% endif %}{% endfor %})"
        "{% endfor %}{% endfor %}"
    )
    messages = [
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"function": {"name": "f", "arguments": '{"a": "é", "b": 2}'}},
            ],
        }
    ]
    assert template.render(messages) == 'f(a="é", b=2)'


def test_content_parts_become_text() -> None:
    messages = normalize_messages(
        [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "first"},
                    {"type": "image_url", "image_url": {"url": "http://x/y.png"}},
                    {"type": "text", "text": "second"},
                ],
            },
            {"role": "assistant", "content": None, "thinking": "hmm"},
        ],
        image_placeholder="<image>",
    )
    assert messages[0]["content"] == "first\n<image>\nsecond"
    assert messages[1] == {
        "role": "assistant",
        "content": "",
        "thinking": "hmm",
        "reasoning_content": "hmm",
    }


@pytest.mark.parametrize(
    ("message", "error"),
    [
        ({"content": "no role"}, "has no role"),
        ({"role": "user", "content": [{"type": "input_audio"}]}, "unsupported content part"),
        ({"role": "user", "content": 42}, "must be a string or a list"),
        ({"role": "assistant", "tool_calls": [{"function": {}}]}, "without function.name"),
    ],
)
def test_bad_messages_are_template_errors(message: dict, error: str) -> None:
    with pytest.raises(TemplateError, match=error):
        ChatTemplate.builtin("chatml").render([message])


# ----------------------------------------------------------------------------- sandbox, globals


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ ''.__class__ }}",  # stock Jinja renders this silently as ""
        "{{ messages.__class__.__subclasses__() }}",
        "{{ raise_exception.__globals__ }}",
        "{{ namespace.__init__.__globals__['os'] }}",
        "{{ strftime_now.__code__.co_consts }}",
        "{% set ns = namespace(_secret=1) %}{{ ns }}",
    ],
)
def test_sandbox_blocks_internals(source: str) -> None:
    template = ChatTemplate.from_string(source, name="GGUF chat template")
    with pytest.raises(TemplateError, match="GGUF chat template attempted an unsafe operation"):
        template.render(USER_ONLY)


def test_sandbox_is_immutable() -> None:
    template = ChatTemplate.from_string("{{ messages.append({'role': 'user'}) }}")
    with pytest.raises(TemplateError, match="unsafe"):
        template.render(USER_ONLY)


def test_raise_exception_names_the_template() -> None:
    template = ChatTemplate.from_string(
        "{{ raise_exception('System role not supported') }}", name="GGUF chat template"
    )
    with pytest.raises(TemplateError) as info:
        template.render(SYSTEM_USER)
    assert isinstance(info.value, ValueError)
    assert str(info.value) == (
        "GGUF chat template rejected the conversation: System role not supported"
    )


def test_syntax_error_names_template_and_line() -> None:
    with pytest.raises(TemplateError, match=r"GGUF chat template has a syntax error at line 2"):
        ChatTemplate.from_string("ok\n{% if %}", name="GGUF chat template")


def test_runtime_type_error_is_a_template_error() -> None:
    template = ChatTemplate.from_string("{{ messages[0].content + 1 }}")
    with pytest.raises(TemplateError, match="chat template failed to render"):
        template.render(USER_ONLY)


def test_strftime_now() -> None:
    template = ChatTemplate.from_string("{{ strftime_now('%d %b %Y') }}")
    before = datetime.now().strftime("%d %b %Y")
    got = template.render(USER_ONLY)
    after = datetime.now().strftime("%d %b %Y")
    assert got in {before, after}


def test_tojson_has_transformers_semantics() -> None:
    value = {"b": "<é & ü>", "a": [1, None, True]}
    cases = {
        "{{ v | tojson }}": json.dumps(value, ensure_ascii=False),
        "{{ v | tojson(indent=2) }}": json.dumps(value, ensure_ascii=False, indent=2),
        "{{ v | tojson(separators=(',', ':')) }}": json.dumps(
            value, ensure_ascii=False, separators=(",", ":")
        ),
        "{{ v | tojson(sort_keys=true) }}": json.dumps(value, ensure_ascii=False, sort_keys=True),
        "{{ v | tojson(ensure_ascii=true) }}": json.dumps(value),
    }
    for source, expected in cases.items():
        assert ChatTemplate.from_string(source).render(USER_ONLY, v=value) == expected, source
    # No HTML escaping, unlike Jinja's own tojson.
    assert "<é & ü>" in ChatTemplate.from_string("{{ v | tojson }}").render(USER_ONLY, v=value)


def test_loopcontrols_dict_and_namespace() -> None:
    template = ChatTemplate.from_string(
        "{% set ns = namespace(n=0) %}{% for m in messages %}{% if m.role == 'system' %}"
        "{% continue %}{% endif %}{% set ns.n = ns.n + 1 %}{% if ns.n > 1 %}{% break %}{% endif %}"
        "{% endfor %}{{ ns.n }} {{ dict(a=1) | tojson }}"
    )
    assert template.render(MULTI_TURN) == '2 {"a": 1}'


def test_variables_special_tokens_and_extra() -> None:
    template = ChatTemplate.from_string(
        "{{ bos_token }}|{{ eos_token }}|{{ add_generation_prompt }}|{{ date_string }}|{{ n }}",
        special_tokens={"bos_token": "<s>", "eos_token": "</s>"},
    )
    assert template.render(USER_ONLY, date_string="1 Jan", n=np.int64(3)) == (
        "<s>|</s>|True|1 Jan|3"
    )
    # Extra kwargs may override a special token, as in transformers.
    assert template.render(USER_ONLY, add_generation_prompt=False, bos_token="").startswith(
        "|</s>|False"
    )


def test_bos_in_template() -> None:
    tokens = {"bos_token": "<s>"}
    assert ChatTemplate.from_string("{{ bos_token }}x", special_tokens=tokens).bos_in_template
    assert not ChatTemplate.from_string("x{{ bos_token }}", special_tokens=tokens).bos_in_template
    assert not ChatTemplate.from_string("{{ bos_token }}x").bos_in_template  # no BOS known
    # A template that rejects the probe conversation is judged by its text.
    rejecting = "{{ bos_token }}{{ raise_exception('needs a system prompt') }}"
    assert ChatTemplate.from_string(rejecting, special_tokens=tokens).bos_in_template


def test_special_tokens_from_metadata() -> None:
    meta = {
        "tokenizer.ggml.tokens": ["<unk>", "<s>", "</s>", "<pad>"],
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": np.uint32(2),
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.padding_token_id": 3,
        "tokenizer.ggml.seperator_token_id": 99,  # out of range: ignored
    }
    assert special_tokens_from_metadata(meta) == {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
    }
    assert special_tokens_from_metadata({}) == {}
