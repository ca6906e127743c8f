"""Access control and routing, with no model (nothing compiles): API keys on every route but
the public ones, each API's 401 shape, both header forms, the official clients' view of a
keyed server, the Web UI's key prompt in a real browser, CORS preflight, and unknown routes
as JSON 404s in the shape of the API their path belongs to."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from litestar.testing import TestClient
from live_server import LiveServer

from serve.access import key_allowed, presented_key
from serve.app import create_app
from serve.settings import Settings

KEYS = ["key-one", "key-two"]
ORIGIN = "https://app.example"
NO_MODEL = "/nonexistent/no-such-model.gguf"


def _client(**settings) -> TestClient:
    # a Host the server answers while bound to loopback (its default)
    return TestClient(create_app(Settings(model=NO_MODEL, **settings)), base_url="http://127.0.0.1")


@pytest.fixture(scope="module")
def keyed():
    with _client(api_key=KEYS, cors_origins=[ORIGIN]) as c:
        yield c


@pytest.fixture(scope="module")
def unkeyed():
    with _client() as c:
        yield c


def openai_shape(body: dict, code: str | None) -> bool:
    err = body.get("error")
    return (
        isinstance(err, dict)
        and set(err) == {"message", "type", "param", "code"}
        and (err["code"] == code)
    )


def anthropic_shape(body: dict, kind: str) -> bool:
    return (
        body.get("type") == "error" and body["error"]["type"] == kind and body["error"]["message"]
    )


def error_shape(body: dict) -> bool:  # Ollama and the Web UI's chat: {"error": "..."}
    return isinstance(body.get("error"), str) and body["error"]


CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
# (method, path, body, the check of the 401 body)
ROUTES = [
    ("POST", "/v1/chat/completions", CHAT, lambda b: openai_shape(b, "invalid_api_key")),
    ("GET", "/v1/models", None, lambda b: openai_shape(b, "invalid_api_key")),
    ("GET", "/v1/models/m", None, lambda b: openai_shape(b, "invalid_api_key")),
    ("POST", "/v1/responses", {"model": "m", "input": "hi"},
     lambda b: openai_shape(b, "invalid_api_key")),
    ("POST", "/v1/messages", {**CHAT, "max_tokens": 5},
     lambda b: anthropic_shape(b, "authentication_error")),
    ("POST", "/v1/messages/count_tokens", CHAT,
     lambda b: anthropic_shape(b, "authentication_error")),
    ("GET", "/api/tags", None, error_shape),
    ("GET", "/api/ps", None, error_shape),
    ("POST", "/api/generate", {"model": "m", "prompt": "hi"}, error_shape),
    ("POST", "/api/chat", {"messages": [{"role": "user", "content": "hi"}]}, error_shape),
    ("POST", "/api/sessions", None, error_shape),
    ("DELETE", "/api/sessions/abc", None, lambda b: b.get("ok") is False and b["error"]),
    ("GET", "/api/models", None, lambda b: b.get("ok") is False and b["error"]),
    ("GET", "/uploads/0123.png", None, error_shape),
    ("GET", "/schema/openapi.json", None, error_shape),
]  # fmt: skip


@pytest.mark.parametrize("method,path,body,shape", ROUTES, ids=[r[1] for r in ROUTES])
def test_no_key_or_a_wrong_key_is_a_401_in_the_api_s_shape(keyed, method, path, body, shape):
    for headers in ({}, {"Authorization": "Bearer nope"}, {"x-api-key": "key-one-"}):
        r = keyed.request(method, path, json=body, headers=headers)
        assert r.status_code == 401, (path, headers, r.text)
        assert shape(r.json()), r.text
        said = str(r.json().get("error"))  # missing vs refused: the message says which
        assert ("invalid API key" in said) == bool(headers), said


def test_either_header_and_every_key_pass(keyed):
    for headers in (
        {"Authorization": "Bearer key-one"},
        {"authorization": "bearer key-two"},  # the scheme is case-insensitive
        {"x-api-key": "key-two"},
        {"Authorization": "Basic xyz", "x-api-key": "key-one"},  # not Bearer: x-api-key counts
    ):
        assert keyed.get("/v1/models", headers=headers).json() == {"object": "list", "data": []}
        assert keyed.get("/api/tags", headers=headers).status_code == 200
    # Past the guard, the handler runs: no model here, so a 503 in Anthropic's shape.
    r = keyed.post("/v1/messages/count_tokens", json=CHAT, headers={"x-api-key": "key-one"})
    assert r.status_code == 529 and anthropic_shape(r.json(), "overloaded_error")


def test_public_routes_need_no_key(keyed):
    assert keyed.get("/health").status_code == 503  # no model: not ready, but not a 401
    page = keyed.get("/")
    assert page.status_code == 200 and "key-dialog" in page.text
    assert keyed.get("/auth.js").status_code == 200 and keyed.get("/app.js").status_code == 200
    assert keyed.get("/metrics").status_code == 200


def test_metrics_auth_keys_metrics_too():
    with _client(api_key=KEYS, metrics_auth=True) as c:
        assert c.get("/metrics").status_code == 401
        assert c.get("/metrics", headers={"x-api-key": "key-one"}).status_code == 200
        assert c.get("/health").status_code == 503


def test_no_keys_means_open(unkeyed):
    assert unkeyed.get("/v1/models").status_code == 200
    assert unkeyed.get("/api/tags", headers={"Authorization": "Bearer anything"}).status_code == 200


def test_key_helpers():
    keys = [k.encode() for k in KEYS]
    assert key_allowed("key-two", keys) and not key_allowed("key-tw", keys)
    assert not key_allowed("", keys) and not key_allowed("key-one", [])
    assert presented_key(httpx.Headers({"Authorization": "Bearer  k "})) == "k"
    assert presented_key(httpx.Headers({"Authorization": "Bearer"})) is None
    assert presented_key(httpx.Headers({"X-Api-Key": "k2"})) == "k2"
    assert presented_key(httpx.Headers({})) is None


def test_cors_preflight_and_origins(keyed, unkeyed):
    ask = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
           "Access-Control-Request-Headers": "authorization, content-type, x-api-key"}  # fmt: skip
    r = keyed.options("/v1/chat/completions", headers=ask)  # no key: preflights carry none
    assert r.status_code in (200, 204), r.text
    assert r.headers["access-control-allow-origin"] == ORIGIN
    allowed = r.headers["access-control-allow-headers"].lower()
    assert "authorization" in allowed and "x-api-key" in allowed
    r = keyed.options("/v1/chat/completions", headers={**ask, "Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in r.headers
    r = keyed.get("/v1/models", headers={"Origin": ORIGIN, "x-api-key": "key-one"})
    assert r.headers["access-control-allow-origin"] == ORIGIN
    # CORS is off by default: no browser origin may read the answers.
    r = unkeyed.get("/v1/models", headers={"Origin": ORIGIN})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    r = unkeyed.options("/v1/chat/completions", headers=ask)
    assert "access-control-allow-origin" not in r.headers


def test_unknown_routes_are_json_404s_in_the_path_s_shape(unkeyed):
    for method in ("POST", "GET", "DELETE", "PUT"):
        r = unkeyed.request(method, "/v1/no-such-thing")
        assert r.status_code == 404 and openai_shape(r.json(), None), (method, r.text)
        r = unkeyed.request(method, "/api/no-such-thing")
        assert r.status_code == 404 and error_shape(r.json()), (method, r.text)
    r = unkeyed.post("/v1/messages/nope")
    assert r.status_code == 404 and anthropic_shape(r.json(), "not_found_error")
    r = unkeyed.get("/no-such-file.js")
    assert r.status_code == 404 and error_shape(r.json())
    # A real route with a method it does not take stays a 405.
    assert unkeyed.get("/v1/chat/completions").status_code == 405
    assert unkeyed.get("/").status_code == 200  # the Web UI is still served at /


# -- the official clients and the browser, against a keyed server on a real port --------------


@pytest.fixture(scope="module")
def keyed_url():
    server = LiveServer(create_app(Settings(model=NO_MODEL, api_key=KEYS)))
    # the load fails (no model): the server is up once /health says so
    yield server.start(timeout=60, ready=lambda r: r.json()["status"] == "error")
    server.stop(timeout=10)


def test_official_clients_see_their_authentication_errors(keyed_url):
    openai = pytest.importorskip("openai")
    anthropic = pytest.importorskip("anthropic")
    ollama = pytest.importorskip("ollama")
    bad = openai.OpenAI(base_url=keyed_url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.models.list()
    assert e.value.body["code"] == "invalid_api_key"
    good = openai.OpenAI(base_url=keyed_url + "/v1", api_key="key-two", max_retries=0)
    assert list(good.models.list()) == []  # past the key check; no model loaded here
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(
            base_url=keyed_url, api_key="wrong", max_retries=0
        ).messages.count_tokens(model="m", messages=[{"role": "user", "content": "hi"}])
    ant = anthropic.Anthropic(base_url=keyed_url, api_key="key-one", max_retries=0)
    with pytest.raises(anthropic.InternalServerError) as e:  # the key passed; no model: 529
        ant.messages.count_tokens(model="m", messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 529
    with pytest.raises(ollama.ResponseError) as e:
        ollama.Client(host=keyed_url).ps()
    assert e.value.status_code == 401
    keyed = ollama.Client(host=keyed_url, headers={"Authorization": "Bearer key-one"})
    assert keyed.ps().models == []


CHROMIUM = "/usr/bin/chromium"


def test_web_ui_asks_for_the_key_once_and_keeps_it(keyed_url):
    """The page loads without a key, asks for one at the first 401, says when a key is
    refused, keeps the accepted one in localStorage and sends it from then on (a reload
    asks nothing); a key the server no longer takes is forgotten and asked for again."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    from test_webui_browser import CHROMIUM_ARGS

    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        page = browser.new_context(base_url=keyed_url).new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto("/")
        dialog = page.locator("#key-dialog")
        dialog.wait_for(state="visible")
        assert "needs an API key" in page.locator("#key-message").text_content()
        page.fill("#key-input", "wrong")
        page.click("#key-dialog button[value=ok]")
        page.wait_for_function("/refused/.test(document.getElementById('key-message').textContent)")
        assert dialog.is_visible()
        page.fill("#key-input", "key-two")
        page.click("#key-dialog button[value=ok]")
        # No model: the badge reports the load error, which only a keyed call can fetch.
        page.wait_for_function("/failed to load/.test(document.getElementById('model-badge')"
                               ".textContent)")  # fmt: skip
        assert page.evaluate("localStorage.getItem('tsjax.apiKey')") == "key-two"
        page.reload()
        page.wait_for_function("/failed to load/.test(document.getElementById('model-badge')"
                               ".textContent)")  # fmt: skip
        assert not dialog.is_visible()
        page.evaluate("localStorage.setItem('tsjax.apiKey', 'revoked')")
        page.reload()
        dialog.wait_for(state="visible")
        assert "refused" in page.locator("#key-message").text_content()
        assert page.evaluate("localStorage.getItem('tsjax.apiKey')") is None
        browser.close()
        assert not errors, errors
