"""The HTTP server end to end: a real uvicorn on a loopback port with the real default model,
driven with raw HTTP for every endpoint, the bad-input cases, prefix reuse across turns, and
concurrent streams with one client walking away mid-stream."""

from __future__ import annotations

import atexit
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import real_model_path
from live_server import LiveServer, free_port

pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct.Q4_1.gguf"
_server: dict = {}


def running_server(path: Path | None = None, **settings: Any) -> str:
    """Start the app once per process and model (default: the real SmolLM2) and return its
    base URL once /health says it is warm. Compiling takes ~40 s on 2 cores, so both server
    test modules share one server. `settings`: more `Settings` fields (first start only)."""
    key = "url" if path is None else f"url:{path}"
    if key in _server:
        return _server[key]
    from serve.app import create_app
    from serve.settings import Settings

    path = path or real_model_path("smollm2-135m")
    port = free_port()
    kw: dict[str, Any] = {"rows": 4, "max_len": 1024, **settings}
    settings_ = Settings(model=str(path), host="127.0.0.1", port=port, **kw)
    server = LiveServer(create_app(settings_), port)
    url = server.start(timeout=300)
    atexit.register(server.stop)
    _server[key], _server["server" if key == "url" else f"server:{path}"] = url, server
    return url


@pytest.fixture(scope="module")
def client():
    with httpx.Client(base_url=running_server(), timeout=120) as c:
        yield c


def ndjson(r: httpx.Response) -> list[dict]:
    return [json.loads(line) for line in r.text.splitlines() if line.strip()]


def sse(r: httpx.Response) -> list:
    out = []
    for block in r.text.split("\n\n"):
        if block.startswith("data: "):
            data = block[len("data: ") :]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


GREEDY = {"temperature": 0, "top_k": 0, "top_p": 1.0}


# -- utilities and listings -----------------------------------------------------------------


def test_health_version_queue(client):
    assert client.get("/health").json()["status"] == "ok"
    assert client.get("/api/version").json() == {"version": "0.1.0"}
    q = client.get("/api/queue/status").json()
    assert {"busy", "pending_requests", "total_processed"} <= set(q)
    assert isinstance(q["busy"], bool) and isinstance(q["total_processed"], int)


def test_tags_show_models(client):
    tags = client.get("/api/tags").json()["models"]
    assert tags[0]["model"] == MODEL and tags[0]["name"] == MODEL[: -len(".gguf")]
    assert tags[0]["size"] > 0 and tags[0]["modified_at"].endswith("Z")
    show = client.post("/api/show", json={"model": "smollm2-135m"}).json()
    assert show["details"]["family"] == "llama" and show["details"]["format"] == "gguf"
    assert show["model_info"]["general.architecture"] == "llama"
    assert "im_start" in show["template"]
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == MODEL[: -len(".gguf")]


# -- Ollama ---------------------------------------------------------------------------------


def test_generate_non_stream(client):
    body = {"model": MODEL, "prompt": "What is 1+1?", "stream": False,
            "options": {"num_predict": 8, **GREEDY}}  # fmt: skip
    r = client.post("/api/generate", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["done"] is True and out["model"] == MODEL and out["response"]
    assert out["done_reason"] in ("stop", "length") and out["eval_count"] <= 8
    assert out["prompt_eval_count"] > 0 and out["prompt_cache_hit_tokens"] == 0
    for key in ("total_duration", "load_duration", "prompt_eval_duration", "eval_duration"):
        assert isinstance(out[key], int)
    assert out["eval_duration"] > 0
    again = client.post("/api/generate", json=body).json()  # generate never reuses a prefix
    assert again["prompt_cache_hit_tokens"] == 0 and again["response"] == out["response"]


def test_generate_stream_and_length(client):
    body = {"model": MODEL, "prompt": "Count: 1, 2, 3,", "raw": True,
            "options": {"num_predict": 6, **GREEDY}}  # fmt: skip
    r = client.post("/api/generate", json=body)
    assert r.headers["content-type"].startswith("application/x-ndjson")
    lines = ndjson(r)
    assert all(not x["done"] for x in lines[:-1]) and lines[-1]["done"] is True
    assert lines[-1]["done_reason"] == "length" and lines[-1]["eval_count"] == 6
    assert "".join(x["response"] for x in lines) != ""


def test_ollama_chat_both_paths(client):
    msgs = [{"role": "user", "content": "Say hi."}]
    body = {"model": MODEL, "messages": msgs, "stream": False,
            "options": {"num_predict": 8, **GREEDY}}  # fmt: skip
    a = client.post("/api/chat/ollama", json=body).json()
    b = client.post("/api/chat", json=body).json()
    assert a["message"]["role"] == "assistant" and a["message"]["content"]
    assert a["message"]["content"] == b["message"]["content"]
    lines = ndjson(client.post("/api/chat", json=body | {"stream": True}))
    assert "".join(x["message"]["content"] for x in lines) == a["message"]["content"]
    assert lines[-1]["done"] and "prompt_cache_hit_ratio" in lines[-1]


def test_multi_turn_cache_hits_rise(client):
    """Turn 2 carries turn 1's answer: most of its prompt comes from the KV cache."""
    opts = {"num_predict": 12, **GREEDY}
    history = [{"role": "user", "content": "Name three colours of the rainbow."}]
    one = client.post(
        "/api/chat/ollama",
        json={"model": MODEL, "messages": history, "stream": False, "options": opts},
    ).json()
    history += [one["message"], {"role": "user", "content": "And two more?"}]
    two = client.post(
        "/api/chat/ollama",
        json={"model": MODEL, "messages": history, "stream": False, "options": opts},
    ).json()
    assert two["prompt_cache_hit_tokens"] > one["prompt_cache_hit_tokens"]
    assert two["prompt_cache_hit_tokens"] >= one["prompt_eval_count"] - 1
    assert two["prompt_cache_hit_ratio"] > 0.5
    oa = client.post(
        "/v1/chat/completions",
        json={"model": MODEL, "messages": history, "max_tokens": 4, "temperature": 0},
    ).json()
    assert oa["usage"]["prompt_tokens_details"]["cached_tokens"] > 0


# -- OpenAI ---------------------------------------------------------------------------------


def test_openai_chat_non_stream(client):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "What is 2+3?"}],
            "max_tokens": 8, "temperature": 0, "stop": ["\n\n"], "seed": 1}  # fmt: skip
    out = client.post("/v1/chat/completions", json=body).json()
    assert out["object"] == "chat.completion" and out["id"].startswith("chatcmpl-")
    choice = out["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["message"]["content"]
    assert choice["finish_reason"] in ("stop", "length")
    u = out["usage"]
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    assert "cached_tokens" in u["prompt_tokens_details"]


def test_openai_chat_stream_with_usage(client):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hello!"}],
            "max_completion_tokens": 6, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    r = client.post("/v1/chat/completions", json=body)
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6
    assert len({c["id"] for c in chunks}) == 1


def test_openai_completions(client):
    body = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 5,
            "temperature": 0}  # fmt: skip
    out = client.post("/v1/completions", json=body).json()
    assert out["object"] == "text_completion" and out["choices"][0]["text"]
    events = sse(client.post("/v1/completions", json=body | {"stream": True}))
    assert events[-1] == "[DONE]"
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == out["choices"][0]["text"]


# -- bad input ------------------------------------------------------------------------------

OLLAMA_BAD = [
    ("/api/generate", b"{not json", None),
    ("/api/generate", b"", None),
    ("/api/generate", {"prompt": "hi"}, "model"),
    ("/api/generate", {"model": MODEL, "stream": "yes"}, "stream"),
    ("/api/generate", {"model": MODEL, "options": {"num_predict": 1.5}}, "num_predict"),
    ("/api/generate", {"model": MODEL, "options": {"temperature": "hot"}}, "temperature"),
    ("/api/generate", {"model": 123}, "model"),
    ("/api/chat/ollama", {"model": MODEL}, "messages"),
    ("/api/chat/ollama", {"model": MODEL, "messages": "hi"}, "messages"),
    ("/api/chat/ollama", {"model": MODEL, "messages": []}, "messages"),
    ("/api/show", {"model": ""}, "model"),
]


@pytest.mark.parametrize(("path", "body", "field"), OLLAMA_BAD)
def test_ollama_bad_input_is_400_naming_the_field(client, path, body, field):
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = client.post(path, headers={"content-type": "application/json"}, **kw)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert isinstance(err, str) and err
    if field:
        assert field in err


OPENAI_BAD = [
    (b"[1, 2", None),
    ({"messages": []}, "model"),
    ({"model": MODEL}, "messages"),
    ({"model": MODEL, "messages": [{"content": "x"}]}, "messages[0].role"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": "9"},
     "max_tokens"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "n": 1000}, "n"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "temperature": -1}, None),
]  # fmt: skip


@pytest.mark.parametrize(("body", "param"), OPENAI_BAD)
def test_openai_bad_input_is_400_in_openai_shape(client, body, param):
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = client.post("/v1/chat/completions", headers={"content-type": "application/json"}, **kw)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and err["message"]
    if param:
        assert err["param"] == param


def test_unknown_model_is_404_in_each_shape(client):
    msgs = [{"role": "user", "content": "x"}]
    r = client.post("/api/generate", json={"model": "llama3:latest", "prompt": "x"})
    assert r.status_code == 404 and "llama3:latest" in r.json()["error"]
    r = client.post("/api/chat/ollama", json={"model": "nope", "messages": msgs})
    assert r.status_code == 404
    r = client.post("/api/show", json={"model": "nope"})
    assert r.status_code == 404
    r = client.post("/v1/chat/completions", json={"model": "gpt-4", "messages": msgs})
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


def test_prompt_over_context_window_is_400_with_counts(client):
    long = "word " * 1500
    r = client.post(
        "/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": long}]},
    )
    assert r.status_code == 400
    msg = r.json()["error"]["message"]
    assert "1024" in msg and "tokens" in msg
    r = client.post("/api/generate", json={"model": MODEL, "prompt": long, "stream": True})
    assert r.status_code == 400 and "1024" in r.json()["error"]


# -- concurrency and aborts -----------------------------------------------------------------


def _stream_chat(base: str, i: int, abort_after: int | None = None) -> tuple[str, bool, int]:
    """One streaming chat; with `abort_after`, hang up after that many chunks of what would
    otherwise be a long (900-token) answer. Returns (text, saw [DONE], completion tokens)."""
    limit = 24 if abort_after is None else 900
    ask = [{"role": "user", "content": f"Tell me fact number {i} about cats."}]
    body = {"model": MODEL, "stream": True, "max_tokens": limit, "temperature": 0.7, "seed": i,
            "messages": ask, "stream_options": {"include_usage": True}}  # fmt: skip
    text, done, n, tokens = [], False, 0, 0
    with httpx.Client(base_url=base, timeout=120) as c:
        with c.stream("POST", "/v1/chat/completions", json=body) as r:
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                if not chunk["choices"]:
                    continue
                delta = chunk["choices"][0]["delta"]
                text.append(delta.get("content") or "")
                n += 1
                if abort_after is not None and n >= abort_after:
                    break  # leaving the with-block closes the connection mid-stream
    return "".join(text), done, tokens


def test_concurrent_streams_and_an_abort(client, record_property):
    """16 simultaneous streaming chats (15 complete, 1 hangs up mid-stream) on 4 cache rows:
    all complete, the hang-up is aborted, and the aggregate throughput is reported."""
    base = str(client.base_url)
    before = client.get("/api/queue/status").json()["total_processed"]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(_stream_chat, base, i) for i in range(15)]
        aborted = pool.submit(_stream_chat, base, 99, 3)
        results = [f.result() for f in futures]
        _, aborted_done, _ = aborted.result()
    wall = time.perf_counter() - t0
    assert all(done and text and n > 0 for text, done, n in results)
    assert not aborted_done
    tokens = sum(n for _, _, n in results)
    record_property("aggregate_tok_per_s", tokens / wall)
    print(f"16 concurrent streams: {tokens} tokens in {wall:.1f}s = {tokens / wall:.1f} tok/s")
    # 900 tokens would take far longer than this: the hang-up must have aborted it
    deadline = time.time() + 10
    while time.time() < deadline:
        status = client.get("/api/queue/status").json()
        if not status["busy"] and status["total_processed"] >= before + 16:
            break
        time.sleep(0.2)
    assert status["busy"] is False and status["pending_requests"] == 0
    assert status["total_processed"] >= before + 16


def test_image_input_is_a_clear_400_on_a_text_only_model(client):
    pixel = (
        "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAA"
        "BJRU5ErkJggg=="
    )
    parts = [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{pixel}"}},
    ]
    r = client.post(
        "/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": parts}]},
    )
    assert r.status_code == 400
    err = r.json()["error"]
    assert "image" in err["message"] and err["param"] == "messages"
    r = client.post(
        "/api/generate",
        json={"model": MODEL, "prompt": "What is this?", "images": [pixel], "stream": False},
    )
    assert r.status_code == 400 and "image" in r.json()["error"]
    r = client.post(
        "/api/chat",
        json={
            "model": MODEL,
            "stream": False,
            "messages": [{"role": "user", "content": "What is this?", "images": [pixel]}],
        },
    )
    assert r.status_code == 400 and "image" in r.json()["error"]
