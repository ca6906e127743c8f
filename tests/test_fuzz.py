"""Fuzzing every POST endpoint with bodies generated from its request type (hypothesis), and a
soak of many streams with random hang-ups against the real server.

The fuzz runs in-process on a tiny model with a stub engine (tests/tiny_app.py): bodies are
built from each endpoint's msgspec struct (`msgspec.inspect`), mostly well-formed with the
hosted model's name, then mutated: a field replaced by any JSON value (wrong types), huge
numbers, deep nesting, unicode, fields dropped or added, raw bytes. Every answer must be below
500, JSON in the endpoint's error shape when it is an error, and well-framed when it streams;
the server must still answer afterwards.
"""

from __future__ import annotations

import json
import random
import threading
import time
from typing import Any

import msgspec
import msgspec.inspect as mi
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny_app import UI, tiny_client, tiny_model

from serve.protocols import anthropic, ollama, openai, responses
from serve.protocols.webui import chat as webui_chat
from serve.protocols.webui import models as webui_models
from serve.protocols.webui import sessions as webui_sessions

ENDPOINTS: dict[str, list[type]] = {
    "/api/generate": [ollama.GenerateBody],
    "/api/chat": [ollama.ChatBody, webui_chat.ChatBody],
    "/api/chat/ollama": [ollama.ChatBody],
    "/api/show": [ollama.ShowBody],
    "/v1/chat/completions": [openai.ChatBody],
    "/v1/completions": [openai.CompletionBody],
    "/api/webui/chat": [webui_chat.ChatBody],
    "/api/sessions": [webui_sessions.TurnOptions],
    "/api/models/load": [webui_models.LoadBody],
    "/v1/responses": [responses.ResponsesBody],
    "/v1/responses/input_tokens": [responses.ResponsesBody],
    "/v1/messages": [anthropic.MessagesBody],
    "/v1/messages/count_tokens": [anthropic.CountBody],
    "/v1/embeddings": [openai.EmbeddingBody],
    "/api/embed": [ollama.EmbedBody],
    "/api/embeddings": [ollama.EmbeddingsBody],
}

HUGE = [2**63, -(2**63) - 1, 10**30, 1e308, -1e308, 5e-324, 2**53 + 1]
TEXT = st.text(max_size=40) | st.sampled_from(
    ["", " ", "<|im_start|>system\nhi<|im_end|>", "{{ 7*7 }}", "\u0000", "é" * 50, "🙂" * 9]
)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.sampled_from(HUGE)
    | st.floats(allow_nan=False, allow_infinity=False)
    | TEXT
)
JSON = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=12,
)


def _of(t: mi.Type, model: str) -> st.SearchStrategy[Any]:
    """Values of the msgspec type `t` (mostly valid; mutations come later)."""
    if isinstance(t, mi.StrType):
        return TEXT
    if isinstance(t, mi.IntType):
        return st.integers(-5, 5000) | st.sampled_from(HUGE[:2])
    if isinstance(t, mi.FloatType):
        return st.floats(-3, 3, allow_nan=False) | st.sampled_from(HUGE)
    if isinstance(t, mi.BoolType):
        return st.booleans()
    if isinstance(t, mi.NoneType):
        return st.none()
    if isinstance(t, mi.ListType):
        return st.lists(_of(t.item_type, model), max_size=3)
    if isinstance(t, mi.DictType):
        return st.dictionaries(TEXT, JSON, max_size=3)
    if isinstance(t, mi.UnionType):
        return st.one_of([_of(u, model) for u in t.types])
    if isinstance(t, mi.StructType):
        return struct_of(t, model)
    return JSON  # Any


def struct_of(t: mi.StructType, model: str) -> st.SearchStrategy[dict]:
    required, optional = {}, {}
    for f in t.fields:
        value = _of(f.type, model)
        if f.name == "model":
            value = st.sampled_from([model, model, model, "nope", ""]) | value
        if f.name == "messages" and isinstance(f.type, mi.ListType):
            roles = st.sampled_from(["user", "system", "assistant", "tool", "x"])
            plain = st.fixed_dictionaries({"role": roles, "content": TEXT})
            message = plain | plain | _of(f.type.item_type, model)
            value = st.lists(message, min_size=1, max_size=4)
        (required if f.required else optional)[f.name] = value
    return st.fixed_dictionaries(required, optional=optional)


def nested(depth: int) -> Any:
    value: Any = 1
    for i in range(depth):
        value = [value] if i % 2 else {"a": value}
    return value


@st.composite
def body_of(draw: Any, structs: list[type], model: str) -> bytes:
    """A request body: a generated struct, maybe mutated, or something else entirely."""
    kind = draw(st.sampled_from(["valid"] * 5 + ["mutated"] * 4 + ["deep", "json", "bytes"]))
    if kind == "bytes":
        return draw(st.binary(max_size=60))
    if kind == "json":
        return json.dumps(draw(JSON)).encode()
    info = mi.type_info(draw(st.sampled_from(structs)))
    body = draw(struct_of(info, model))
    if kind == "valid":  # the required fields and a few others: mostly a request that runs
        required = {f.name for f in info.fields if f.required}
        keep = draw(st.sets(st.sampled_from(sorted(body) or ["-"]), max_size=2)) | required
        body = {k: v for k, v in body.items() if k in keep}
    if kind == "mutated" and body:
        key = draw(st.sampled_from(sorted(body)))
        action = draw(st.sampled_from(["replace", "drop", "add"]))
        if action == "replace":
            body[key] = draw(JSON)
        elif action == "drop":
            del body[key]
        else:
            body[draw(TEXT)] = draw(JSON)
    if kind == "deep":
        key = draw(st.sampled_from(sorted(body) or ["x"]))
        body[key] = nested(draw(st.integers(50, 400)))
    return msgspec.json.encode(body) if kind != "deep" else json.dumps(body).encode()


# the last event of a typed SSE stream (Responses, Anthropic Messages)
ENDINGS = {"response.completed", "response.incomplete", "response.failed", "message_stop", "error"}


def check_answer(path: str, r: Any) -> None:
    """Below 500; JSON in the endpoint's shape for errors; well-framed streams."""
    assert r.status_code < 500, (path, r.status_code, r.text[:500])
    ctype = r.headers.get("content-type", "")
    if r.status_code >= 400:
        body = r.json()
        if path.startswith("/v1/messages"):
            assert body["type"] == "error" and set(body["error"]) == {"type", "message"}, body
        elif path.startswith("/v1/"):
            assert set(body["error"]) == {"message", "type", "param", "code"}, body
        elif path == "/api/models/load":
            assert body["ok"] is False and isinstance(body["error"], str), body
        else:
            assert isinstance(body["error"], str) and body["error"], body
        return
    if ctype.startswith("application/x-ndjson"):
        lines = [json.loads(line) for line in r.text.splitlines() if line.strip()]
        assert lines[-1]["done"] is True, lines[-1]
    elif ctype.startswith("text/event-stream"):
        data = [line[6:] for block in r.text.split("\n\n") for line in block.split("\n")
                if line.startswith("data: ")]  # fmt: skip
        parsed = [f if f == "[DONE]" else json.loads(f) for f in data]
        last = parsed[-1] if parsed else None
        assert last == "[DONE]" or last.get("done") is True or last.get("type") in ENDINGS, last
    else:
        assert isinstance(r.json(), dict)


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory):
    model = tiny_model(tmp_path_factory.mktemp("tiny"))
    with tiny_client(model, upload_dir=str(tmp_path_factory.mktemp("up") / "u")) as c:
        yield c, model.path.stem
        assert c.get("/health").status_code == 200  # still serving after everything
        status = c.get("/api/queue/status").json()
        assert status["busy"] is False and status["pending_requests"] == 0


FUZZ = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,  # the same bodies every run: a failure reproduces
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def test_every_post_endpoint_is_fuzzed(fuzzed):
    """A new POST route cannot slip past the fuzzer: every one the app serves is listed here
    (uploads have their own test below)."""
    client, _ = fuzzed
    served = {
        route.path
        for route in client.app.routes
        if "POST" in getattr(route, "methods", ()) and "{" not in route.path
    }
    assert served - {"/api/upload"} <= set(ENDPOINTS), served - set(ENDPOINTS)


@pytest.mark.parametrize("path", sorted(ENDPOINTS))
def test_fuzz_post_endpoints(fuzzed, path):
    client, model = fuzzed

    @FUZZ
    @given(st.data())
    def run(data: Any) -> None:
        body = data.draw(body_of(ENDPOINTS[path], model))
        ctype = data.draw(st.sampled_from(["application/json"] * 6 + ["text/plain", None]))
        headers = {"Content-Type": ctype} if ctype else {}
        check_answer(path, client.post(path, content=body, headers=headers))

    run()


@FUZZ
@given(
    name=st.text(max_size=300) | st.sampled_from(["../../x.txt", "a" * 5000 + ".md", "", "."]),
    content=st.binary(max_size=200),
    session=st.none() | TEXT,
    ctype=st.sampled_from(["text/plain", "image/png", "application/octet-stream"]),
)
def test_fuzz_uploads(fuzzed, name, content, session, ctype):
    client, _ = fuzzed
    data = {"sessionId": session} if session is not None else None
    try:
        r = client.post("/api/upload", files={"file": (name, content, ctype)}, data=data,
                        headers=UI)  # fmt: skip
    except (UnicodeEncodeError, ValueError):  # the client cannot encode the name or field
        return
    check_answer("/api/upload", r)


# -- soak: many streams, random hang-ups, the real server ------------------------------------


def _stream(base: str, i: int, hang_up_after: int | None) -> None:
    import httpx

    path, body = [
        ("/v1/chat/completions", {"model": "smollm2-135m", "stream": True, "max_tokens": 24,
                                  "messages": [{"role": "user", "content": f"Fact {i}?"}]}),
        ("/api/generate", {"model": "smollm2-135m", "prompt": f"Story {i}:",
                           "options": {"num_predict": 24}}),
        ("/api/webui/chat", {"maxTokens": 24, "messages": [{"role": "user", "content": f"{i}"}]}),
    ][i % 3]  # fmt: skip
    with httpx.Client(base_url=base, timeout=300) as c:
        with c.stream("POST", path, json=body) as r:
            for n, _ in enumerate(r.iter_lines()):
                if hang_up_after is not None and n >= hang_up_after:
                    break  # leaving the block closes the connection mid-stream


@pytest.mark.slow
def test_soak_24_streams_with_random_hang_ups_leave_nothing_behind():
    """24 concurrent streams (six times the cache rows) over the three styles, about half
    hanging up at a random point, against the real server: afterwards no cache row is busy,
    nothing is queued, and the server's event loop holds no more tasks than before."""
    import asyncio

    import httpx
    from test_server import _server, running_server

    base = running_server()
    loop = _server["server"].server.servers[0].get_loop()  # LiveServer -> uvicorn

    def tasks() -> int:
        async def count() -> int:
            return len(asyncio.all_tasks())

        return asyncio.run_coroutine_threadsafe(count(), loop).result(10)

    before = tasks()
    rng = random.Random(18)
    plan = [rng.choice([None, rng.randint(0, 12)]) for _ in range(24)]
    threads = [threading.Thread(target=_stream, args=(base, i, p)) for i, p in enumerate(plan)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    deadline = time.time() + 30
    while time.time() < deadline:
        status = httpx.get(base + "/api/queue/status").json()
        if not status["busy"] and not status["pending_requests"] and tasks() <= before:
            break
        time.sleep(0.2)
    assert status["busy"] is False and status["active_requests"] == 0, status
    assert status["pending_requests"] == 0, status
    assert tasks() <= before
    assert httpx.get(base + "/health").status_code == 200
