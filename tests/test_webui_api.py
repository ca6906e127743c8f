"""The Web UI protocol over raw HTTP: SSE chat turns, sessions, multi-turn KV reuse, the model
panel, uploads (text, image, path-traversal names, oversize), and bad input.

Most tests drive the shared real server of test_server.py (one per process). Behaviour that
needs no model (upload limits, the no-model answers, the session store; reasoning frames are in
test_structured.py)
runs in-process against an app whose model cannot load, which costs no compile time.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest
from test_server import MODEL, running_server

from serve.sessions import DEFAULT_ID, SessionStore

GREEDY = {"temperature": 0, "topK": 0, "topP": 1.0, "repetitionPenalty": 1.0}


def sse(r: httpx.Response) -> list[dict]:
    """Frames of a Web UI stream: only `data:` lines, each one JSON object."""
    out = []
    for block in r.text.split("\n\n"):
        block = block.strip()
        if block:
            assert block.startswith("data: "), block
            out.append(json.loads(block[len("data: ") :]))
    return out


def answer(frames: list[dict]) -> str:
    return "".join(f.get("token", "") for f in frames)


# -- no model needed ----------------------------------------------------------------------------


def test_session_store_default_ttl_and_capacity():
    store = SessionStore(ttl_seconds=0.05, max_sessions=3)
    assert store.get(None).id == DEFAULT_ID and store.get("  ").id == DEFAULT_ID
    a, b = store.create(), store.create()
    assert a.id != b.id and len(a.id) == 32 and len(store) == 3
    assert store.get("nope") is None
    store.get(a.id)
    c = store.create()  # full: the least recently used (b) goes
    assert store.get(b.id) is None and store.get(c.id) is not None
    assert store.remove(DEFAULT_ID) is None and store.get(DEFAULT_ID) is not None
    time.sleep(0.1)
    assert store.get(a.id) is None  # expired; the default never expires
    assert store.get(None).id == DEFAULT_ID


@pytest.fixture(scope="module")
def nomodel():
    """An app whose model cannot load: the upload and no-model paths, no compiling."""
    from litestar.testing import TestClient

    from serve.app import create_app
    from serve.settings import Settings

    settings = Settings(model="/nonexistent/no-such-model.gguf", max_upload_bytes=4096)
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as c:
        c.headers["X-TSJAX-UI"] = "1"  # uploads need the Web UI's header (or an API key)
        deadline = time.time() + 30
        while c.get("/health").json()["status"] == "loading" and time.time() < deadline:
            time.sleep(0.05)
        yield c


def test_nomodel_panel_and_chat(nomodel):
    m = nomodel.get("/api/models").json()
    assert m["models"] == [] and m["loaded"] is None and m["architecture"] is None
    assert m["status"] == "error" and "failed to load" in m["error"]
    r = nomodel.post("/api/chat", json={"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 503 and "failed to load" in r.json()["error"]
    r = nomodel.post("/api/models/load", json={"model": "x"})
    assert r.status_code == 503 and r.json()["ok"] is False


def test_upload_limits_in_process(nomodel):
    big = {"file": ("big.txt", b"x" * 5000, "text/plain")}
    r = nomodel.post("/api/upload", files=big)
    assert r.status_code == 413 and "4096" in r.json()["error"]

    def chunks():  # no Content-Length: the limit is enforced on the bytes streamed
        boundary = b"--B\r\n"
        yield boundary + b'Content-Disposition: form-data; name="file"; filename="a.txt"\r\n\r\n'
        for _ in range(10):
            yield b"y" * 1000
        yield b"\r\n--B--\r\n"

    r = nomodel.post(
        "/api/upload",
        content=chunks(),
        headers={"Content-Type": "multipart/form-data; boundary=B"},
    )
    assert r.status_code == 413, r.text
    # No model: text is cut by characters and the token fields are null.
    r = nomodel.post("/api/upload", files={"file": ("n.txt", "é" * 100, "text/plain")})
    body = r.json()
    assert body["truncateUnit"] == "characters" and body["textContent"] == "é" * 100
    assert body["originalTokenCount"] is None and body["truncated"] is False


# -- the shared real server ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def client():
    # uploads need the Web UI's header (or an API key), as the page sends it
    with httpx.Client(base_url=running_server(), timeout=120, headers={"X-TSJAX-UI": "1"}) as c:
        yield c


def chat(client: httpx.Client, messages: list[dict], **extra) -> list[dict]:
    body = {"messages": messages, "maxTokens": 12, "think": False, **GREEDY, **extra}
    r = client.post("/api/chat", json=body)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    return sse(r)


@pytest.mark.slow
def test_models_panel_and_load(client):
    m = client.get("/api/models").json()
    assert m["loaded"] == MODEL and m["models"] == [MODEL] and m["architecture"] == "llama"
    assert m["loadedBackend"] == m["defaultBackend"] == m["supportedBackends"][0]["value"]
    assert m["defaultMaxTokens"] == m["contextLength"] == 1024 and m["status"] == "ready"
    ok = client.post("/api/models/load", json={"model": MODEL, "backend": m["loadedBackend"]})
    assert ok.status_code == 200 and ok.json()["ok"] is True and ok.json()["model"] == MODEL
    for body, status, text in [
        ({"model": "other.gguf"}, 400, "not hosted"),
        ({"model": MODEL, "backend": "ggml_metal_nope"}, 400, "not supported"),
        ({"model": MODEL, "mmproj": "proj.gguf"}, 400, "projector"),
        ({}, 400, "model is required"),
    ]:
        r = client.post("/api/models/load", json=body)
        assert r.status_code == status and r.json()["ok"] is False, r.text
        assert text in r.json()["error"]
    r = client.post("/api/models/load", content=b"{nope")
    assert r.status_code == 400 and r.json()["ok"] is False


@pytest.mark.slow
def test_chat_stream_frames_and_multiturn_reuse(client):
    sid = client.post("/api/sessions").json()["sessionId"]
    msgs = [{"role": "user", "content": "Name three colours of the rainbow."}]
    frames = chat(client, msgs, sessionId=sid)
    done = frames[-1]
    assert done["done"] is True and all("done" not in f for f in frames[:-1])
    text = answer(frames)
    assert text and done["tokenCount"] >= 1 and done["error"] is None
    assert done["sessionId"] == sid and done["aborted"] is False
    assert done["promptTokens"] > 0 and done["tokPerSec"] > 0 and done["elapsed"] > 0
    # Turn 2 sends the history back: its prompt starts with turn 1's prompt and answer.
    msgs += [{"role": "assistant", "content": text}, {"role": "user", "content": "And two more?"}]
    done2 = chat(client, msgs, sessionId=sid)[-1]
    assert done2["kvReusedTokens"] >= done["promptTokens"] + done["tokenCount"] - 1
    assert done2["kvReusedTokens"] > done["kvReusedTokens"]
    pct = 100 * done2["kvReusedTokens"] / done2["promptTokens"]
    assert done2["kvReusePercent"] == pytest.approx(pct, abs=0.1)
    # Even when the client sends an edited answer, the session splices the real tokens.
    msgs[1]["content"] = text.upper() + " (edited)"
    done3 = chat(client, msgs, sessionId=sid, maxTokens=4)[-1]
    assert done3["kvReusedTokens"] >= done["promptTokens"] + done["tokenCount"] - 1
    # newChat forgets the tracked answer: the edited text is rendered instead.
    done4 = chat(client, msgs, sessionId=sid, maxTokens=4, newChat=True)[-1]
    assert done4["kvReusedTokens"] < done3["kvReusedTokens"]
    assert client.delete(f"/api/sessions/{sid}").json() == {"ok": True, "sessionId": sid}


@pytest.mark.slow
def test_default_session_and_session_errors(client):
    frames = chat(client, [{"role": "user", "content": "Hi"}], maxTokens=3)
    assert frames[-1]["sessionId"] == DEFAULT_ID and frames[-1]["tokenCount"] <= 3
    created = client.post("/api/sessions").json()
    assert len(created["sessionId"]) == 32 and created["createdAt"].endswith("Z")
    sid = created["sessionId"]
    assert client.delete(f"/api/sessions/{sid}").status_code == 200
    r = client.delete(f"/api/sessions/{sid}")
    assert r.status_code == 404
    assert r.json() == {"ok": False, "error": f"Session '{sid}' not found."}
    r = client.delete(f"/api/sessions/{DEFAULT_ID}")
    assert r.status_code == 400 and r.json()["ok"] is False
    r = client.post(
        "/api/chat", json={"messages": [{"role": "user", "content": "x"}], "sessionId": sid}
    )
    assert r.status_code == 404 and "not found or has been disposed" in r.json()["error"]
    # A session created with defaults uses them: maxTokens 2 caps the answer.
    sid = client.post("/api/sessions", json={"maxTokens": 2, **GREEDY}).json()["sessionId"]
    body = {"messages": [{"role": "user", "content": "Count to ten."}], "sessionId": sid}
    done = sse(client.post("/api/chat", json=body))[-1]
    assert done["tokenCount"] == 2 and done["finishReason"] == "length"
    client.delete(f"/api/sessions/{sid}")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b"{not json", "malformed JSON"),
        (b"", "empty"),
        (json.dumps({"maxTokens": 5}).encode(), "messages"),
        (json.dumps({"messages": [{"content": "no role"}]}).encode(), "role"),
        (json.dumps({"messages": "hi"}).encode(), "messages"),
        (json.dumps({"messages": [], "maxTokens": 5}).encode(), "messages"),
        (
            json.dumps({"messages": [{"role": "user", "content": "x"}], "maxTokens": "9"}).encode(),
            "maxTokens",
        ),
        (
            json.dumps(
                {"messages": [{"role": "user", "content": "x"}], "backend": "cuda"}
            ).encode(),
            "/api/models/load",
        ),
        (
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": "x"},
                    ],
                    "temperature": -1,
                }
            ).encode(),
            "temperature",
        ),
        (
            json.dumps(
                {"messages": [{"role": "user", "content": "x", "imagePaths": ["/etc/passwd"]}]}
            ).encode(),
            "not a file uploaded",
        ),
    ],
)
def test_chat_bad_input_is_400_json(client, body, needle):
    r = client.post("/api/chat", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    assert needle in r.json()["error"]


@pytest.mark.slow
def test_chat_with_model_field_is_ollama(client):
    """A body with `model` keeps going to the Ollama handler (NDJSON), not the Web UI."""
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Hi"}],
        "stream": False,
        "options": {"num_predict": 2},
    }
    r = client.post("/api/chat", json=body)
    assert r.status_code == 200 and r.json()["done"] is True


@pytest.mark.slow
def test_upload_text_image_and_traversal(client, tmp_path):
    sid = client.post("/api/sessions").json()["sessionId"]
    text = "The secret word is pineapple. " * 400  # > 512 tokens: truncated to ctx/2
    r = client.post(
        "/api/upload",
        files={"file": ("notes.md", text.encode(), "text/markdown")},
        data={"sessionId": sid},
    )
    up = r.json()
    assert r.status_code == 200 and up["ok"] and up["mediaType"] == "text"
    assert up["truncated"] and up["truncateUnit"] == "tokens" and up["truncateLimit"] == 512
    assert up["modelContextLimit"] == 1024 and up["originalTokenCount"] > 512
    assert up["returnedTokenCount"] <= 513 and up["textContent"].startswith("The secret word")
    root = Path(up["path"]).parent
    # The pending text is inlined into the session's next turn: a much longer prompt.
    done = chat(
        client,
        [{"role": "user", "content": "What is the secret word?"}],
        sessionId=sid,
        maxTokens=2,
    )[-1]
    assert done["promptTokens"] > 500, done
    png = b"\x89PNG\r\n\x1a\n" + b"\0" * 64
    evil = [
        "../../../../tmp/evil.png",
        "..\\..\\evil.png",
        "/etc/passwd",
        "a/../../b.PNG",
        "....//x.png",
        "%2e%2e%2fz.png",
        "nul\x00.png",
        ".",
        "..png",
    ]
    for name in evil:
        r = client.post("/api/upload", files={"file": (name, png, "image/png")})
        assert r.status_code == 200, (name, r.text)
        saved = Path(r.json()["path"])
        assert saved.parent == root and saved.is_file(), name
        assert "/" not in r.json()["fileName"] and "\\" not in r.json()["fileName"]
    assert not Path("/tmp/evil.png").exists()
    img = client.post("/api/upload", files={"file": ("cat.PNG", png, "image/png")}).json()
    assert img["mediaType"] == "image" and img["path"].endswith(".png")
    # The preview route serves stored names only.
    name = Path(img["path"]).name
    assert client.get(f"/uploads/{name}").content == png
    assert client.get("/uploads/..%2F..%2Fetc%2Fpasswd").status_code == 404
    # An uploaded image may be referenced; a text-only model reports that it ignored it.
    msg = {"role": "user", "content": "Describe.", "imagePaths": [img["path"]]}
    done = chat(client, [msg], maxTokens=2)[-1]
    assert done["mediaIgnored"] == 1 and done["error"] is None
    client.delete(f"/api/sessions/{sid}")


@pytest.mark.slow
def test_upload_errors(client):
    r = client.post("/api/upload", json={"file": "x"})
    assert r.status_code == 400 and r.json()["error"] == "Expected multipart form data"
    form = b'--B\r\nContent-Disposition: form-data; name="note"\r\n\r\nhi\r\n--B--\r\n'
    r = client.post(
        "/api/upload", content=form, headers={"Content-Type": "multipart/form-data; boundary=B"}
    )
    assert r.status_code == 400 and r.json()["error"] == "No file uploaded"
    r = client.post("/api/upload", files={"file": ("", b"\x89PNG", "image/png")})  # no filename
    assert r.status_code == 400 and "No file uploaded" in r.json()["error"]
    r = client.post("/api/upload", content=b"x", headers={"Content-Type": "multipart/form-data"})
    assert r.status_code == 400 and "boundary" in r.json()["error"]
    r = client.post("/api/upload", files={"file": ("a.txt", b"x")}, data={"sessionId": "nope"})
    assert r.status_code == 404
    # Oversize is refused from the announced length, before any body byte is read.
    host = urlparse(str(client.base_url))
    with socket.create_connection((host.hostname, host.port), timeout=10) as s:
        s.sendall(
            b"POST /api/upload HTTP/1.1\r\nHost: 127.0.0.1\r\nX-TSJAX-UI: 1\r\n"
            b"Content-Type: multipart/form-data; boundary=B\r\n"
            b"Content-Length: 999999999999\r\nConnection: close\r\n\r\n"
        )
        reply = s.recv(4096).decode("latin-1")
    assert reply.startswith("HTTP/1.1 413"), reply
    assert '"error"' in reply


@pytest.mark.slow
def test_client_disconnect_aborts_turn(client):
    body = {
        "messages": [{"role": "user", "content": "Write a long story."}],
        "maxTokens": 900,
        **GREEDY,
    }
    with client.stream("POST", "/api/chat", json=body) as r:
        for line in r.iter_lines():
            if '"token"' in line:
                break
    deadline = time.time() + 10
    while time.time() < deadline:
        q = client.get("/api/queue/status").json()
        if not q["busy"]:
            break
        time.sleep(0.1)
    assert not q["busy"], q
