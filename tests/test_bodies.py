"""Request bodies (serve/bodies.py): strict decoding with 400s that name the field, in each
API style's error shape, and the OpenAPI schema (`/schema`) that documents every JSON body.
No model: an app whose model cannot load answers all of this."""

from __future__ import annotations

import logging
import time

import msgspec
import pytest

from serve.bodies import decode
from serve.errors import ApiError, ErrorKind


class Inner(msgspec.Struct):
    role: str


class Outer(msgspec.Struct):
    model: str
    n: int = 1
    messages: list[Inner] = []


def test_decode_is_strict_and_names_the_field():
    assert decode(b'{"model": "m", "n": 2}', Outer).n == 2
    cases = [
        (b"", None, "empty"),
        (b'{"model": "m"', None, "malformed"),
        (b'{"model": "m", "n": "2"}', "n", "Expected `int`"),
        (b'{"n": 2}', "model", "missing required field"),
        (b'{"model": "m", "messages": [{"content": "x"}]}', "messages[0].role", "missing"),
    ]
    for raw, param, words in cases:
        with pytest.raises(ApiError) as e:
            decode(raw, Outer)
        err = e.value
        assert err.status == 400 and err.kind is ErrorKind.INVALID_REQUEST
        assert err.param == param and words in err.message


@pytest.fixture(scope="module")
def nomodel():
    from litestar.testing import TestClient

    from serve.app import create_app
    from serve.settings import Settings

    logging.getLogger("tsjax.serve").setLevel(logging.CRITICAL)  # the load failure is expected
    with TestClient(
        create_app(Settings(model="/nonexistent/no-such-model.gguf")), base_url="http://127.0.0.1"
    ) as c:  # a Host the loopback server serves
        deadline = time.time() + 30
        while c.get("/health").json()["status"] == "loading" and time.time() < deadline:
            time.sleep(0.05)
        yield c


def test_openapi_schema_documents_the_json_bodies(nomodel):
    spec = nomodel.get("/schema/openapi.json").json()
    bodies = {
        path: op["requestBody"]["content"]["application/json"]["schema"]["$ref"].split("/")[-1]
        for path, ops in spec["paths"].items()
        for op in ops.values()
        if "requestBody" in op
    }
    for path in ("/v1/chat/completions", "/v1/completions", "/api/generate", "/api/chat/ollama",
                 "/api/show", "/api/webui/chat", "/api/models/load"):  # fmt: skip
        assert path in bodies, path
    chat = spec["components"]["schemas"][bodies["/v1/chat/completions"]]
    assert set(chat["required"]) == {"model", "messages"} and "tool_choice" in chat["properties"]


def test_strict_400s_in_each_dialect_before_the_model_is_asked_for(nomodel):
    """A body that fails validation is a 400 in the route's own shape, even with no model."""
    r = nomodel.post("/v1/chat/completions", json={"model": "m", "messages": [], "n": "2"})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == "n"
    r = nomodel.post("/v1/chat/completions", content=b"")
    assert r.status_code == 400 and "empty" in r.json()["error"]["message"]
    r = nomodel.post("/api/generate", json={"model": "m", "stream": "yes"})
    assert r.status_code == 400 and "stream" in r.json()["error"]
    r = nomodel.post("/api/models/load", json={"model": 3})
    assert r.status_code == 400 and r.json()["ok"] is False and "model" in r.json()["error"]
    r = nomodel.post("/api/chat/ollama", json={"model": "m", "messages": []})
    assert r.status_code == 503 and "failed to load" in r.json()["error"]
    r = nomodel.post("/v1/chat/completions", json={"model": "m", "messages": []})
    assert r.status_code == 503 and r.json()["error"]["type"] == "unavailable_error"
