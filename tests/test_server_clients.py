"""The official `openai` and `ollama` Python clients work unchanged against the server: the
real test of wire compatibility, since they parse every field into typed models."""

from __future__ import annotations

import pytest
from test_server import MODEL, running_server

pytestmark = pytest.mark.slow

openai = pytest.importorskip("openai")
ollama = pytest.importorskip("ollama")


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
