"""The chat page end to end: headless Chromium (Debian's /usr/bin/chromium) driven by Playwright
against the shared live server with the real default model (see test_server.running_server),
and one server of its own with the tiny Gemma 3 and its projector for attached pictures and video.

Each test leaves a screenshot in test-artifacts/webui/<test name>.png, failed or not. Skips when
the browser or playwright is missing (`make test` installs Chromium when it runs as root).
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import httpx
import pytest
from test_server import running_server

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts" / "webui"
# Flags that keep Chromium off the (closed) network and out of first-run work.
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
FOOTER = re.compile(r"^\d+ tokens · \d+\.\ds · \d+\.\d tok/s · KV (\d+)/(\d+) \(\d+%\)")
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}


@pytest.fixture(scope="module")
def chromium():
    if not Path(CHROMIUM).exists():
        pytest.skip(
            f"{CHROMIUM} is missing (apt-get install chromium; `make test` does it as root)"
        )
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    with sync_api.sync_playwright() as p:
        # launch() gives every run a fresh temporary profile (user-data-dir).
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture(scope="module")
def browser(chromium):
    """Chromium pointed at the shared live server (SmolLM2)."""
    chromium.base_url = running_server()
    return chromium


def open_page(browser, request, viewport=DESKTOP, model="SmolLM2"):
    """A fresh context (no saved settings) on the chat page, once it has its session and
    shows `model` (a regular expression) in its badge."""
    ctx = browser.new_context(viewport=viewport, base_url=browser.base_url)
    page = ctx.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto("/")
    page.wait_for_function("document.getElementById('transcript').dataset.sessionId")
    page.wait_for_function(
        "m => new RegExp(m).test(document.getElementById('model-badge').textContent)", arg=model
    )

    def finish():
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / f"{request.node.name}.png"), full_page=True)
        ctx.close()
        assert not errors, f"JavaScript errors on the page: {errors}"

    request.addfinalizer(finish)
    return page


@pytest.fixture
def page(browser, request):
    return open_page(browser, request)


@pytest.fixture
def phone(browser, request):
    return open_page(browser, request, PHONE)


def settings(page, max_tokens: int, temperature: float = 0.0) -> None:
    if not page.locator("#max-tokens").is_visible():
        page.click("#settings-toggle")
    page.fill("#max-tokens", str(max_tokens))
    page.fill("#temperature", str(temperature))


def send(page, text: str) -> None:
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")


def wait_reply(page, n: int, timeout: float = 60_000):
    """The n-th (1-based) assistant bubble once its footer is filled in; returns its footer."""
    footer = page.locator(".msg.assistant footer.stats").nth(n - 1)
    page.wait_for_function(
        "n => { const f = document.querySelectorAll('.msg.assistant footer.stats')[n - 1];"
        " return f && f.textContent.length > 0 && !document.querySelector('[aria-busy=true]'); }",
        arg=n,
        timeout=timeout,
    )
    return footer.text_content()


def test_send_streams_reply_with_stats(page):
    settings(page, 24)
    # Record the answer's length at every DOM change, to see it grow while streaming.
    page.evaluate(
        """() => { window.lengths = [];
        new MutationObserver(() => {
          const c = document.querySelector('.msg.assistant .content');
          if (c) window.lengths.push(c.textContent.length);
        }).observe(document.getElementById('transcript'),
                   {subtree: true, childList: true, characterData: true}); }"""
    )
    send(page, "Write one sentence about the sea.")
    assert page.locator(".msg.user .content").text_content() == "Write one sentence about the sea."
    assert page.locator("#stop").is_visible()  # the send button became Stop
    footer = wait_reply(page, 1)
    m = FOOTER.match(footer)
    assert m, footer
    assert page.locator(".msg.assistant .content").text_content().strip()
    lengths = [n for n in page.evaluate("window.lengths") if n > 0]
    assert len(set(lengths)) >= 2, f"the reply arrived in one piece: {lengths}"
    assert page.locator("#send").is_visible() and page.locator("#stop").is_hidden()
    assert page.evaluate("document.activeElement.id") == "prompt"  # keeps typing flow

    # The second turn reuses the first turn's cache (KV reused > 0 in its footer).
    page.fill("#prompt", "And one about")
    page.press("#prompt", "Shift+Enter")  # a newline, not a send
    page.type("#prompt", "the sky.")
    assert page.locator(".msg.user").count() == 1
    assert page.input_value("#prompt") == "And one about\nthe sky."
    page.press("#prompt", "Enter")
    m2 = FOOTER.match(wait_reply(page, 2))
    assert m2 and int(m2.group(1)) > 0, m2


def test_new_chat_disposes_session(page, browser):
    settings(page, 8)
    send(page, "Hi!")
    wait_reply(page, 1)
    old = page.evaluate("document.getElementById('transcript').dataset.sessionId")
    page.click("#new-chat")
    page.wait_for_function(
        "old => { const s = document.getElementById('transcript').dataset.sessionId;"
        " return s && s !== old; }",
        arg=old,
    )
    assert page.locator(".msg").count() == 0
    assert page.locator("#empty").is_visible()
    # The old session is gone on the server: deleting it again is a 404.
    r = httpx.delete(f"{browser.base_url}/api/sessions/{old}")
    assert r.status_code == 404, r.text


def test_stop_mid_stream(page, browser):
    settings(page, 900, temperature=0.7)
    send(page, "Write a very long story about a dragon who learns to bake bread.")
    page.wait_for_function(
        "() => (document.querySelector('.msg.assistant .content')?.textContent.length ?? 0) > 40"
    )
    page.click("#stop")
    footer = wait_reply(page, 1, timeout=10_000)
    assert footer == "Stopped by user"
    text = page.locator(".msg.assistant .content").text_content()
    time.sleep(1.0)
    assert page.locator(".msg.assistant .content").text_content() == text  # nothing more came
    assert page.locator("#send").is_visible()
    # The server aborted the request (the disconnect frees its slot).
    deadline = time.time() + 10
    while httpx.get(f"{browser.base_url}/api/queue/status").json()["busy"]:
        assert time.time() < deadline, "the server kept generating after Stop"
        time.sleep(0.2)
    # The partial answer stays in the conversation and a new turn works after it.
    page.fill("#max-tokens", "8")
    send(page, "Thanks.")
    assert FOOTER.match(wait_reply(page, 2))


def test_edit_and_delete_then_regenerate(page):
    settings(page, 12)
    send(page, "What is the capital of France?")
    wait_reply(page, 1)
    send(page, "And of Italy?")
    wait_reply(page, 2)
    assert page.locator(".msg").count() == 4

    # Edit the first question: everything after it is replaced by one regenerated reply.
    page.locator(".msg.user").first.get_by_role("button", name="Edit").click()
    editor = page.locator(".msg.user textarea.edit-text")
    assert editor.input_value() == "What is the capital of France?"
    editor.fill("What is the capital of Spain?")
    with page.expect_request("**/api/chat") as req:
        page.get_by_role("button", name="Save & regenerate").click()
    sent = req.value.post_data_json["messages"]
    assert [m["role"] for m in sent] == ["user"]
    assert sent[0]["content"] == "What is the capital of Spain?"
    assert FOOTER.match(wait_reply(page, 1))
    assert page.locator(".msg").count() == 2
    assert page.locator(".msg.user .content").text_content() == "What is the capital of Spain?"

    # Regenerate the reply in place, then delete from the question on: an empty chat.
    page.locator(".msg.assistant").get_by_role("button", name="Regenerate").click()
    assert FOOTER.match(wait_reply(page, 1))
    assert page.locator(".msg").count() == 2
    page.locator(".msg.user").get_by_role("button", name="Delete").click()
    assert page.locator(".msg").count() == 0


def test_upload_text_file_then_ask(page):
    settings(page, 24)
    body = b"The secret word is PINEAPPLE.\n"
    page.set_input_files(
        "#file-input", files=[{"name": "notes.txt", "mimeType": "text/plain", "buffer": body}]
    )
    chip = page.locator("#attachments .chip")
    chip.filter(has_text=f"{len(body)} B").wait_for()
    assert "notes.txt" in chip.text_content()
    with page.expect_request("**/api/chat") as req:
        send(page, "What is the secret word in the file?")
    msg = req.value.post_data_json["messages"][-1]
    assert msg["content"].startswith("[File: notes.txt]\nThe secret word is PINEAPPLE.")
    assert msg["content"].endswith("What is the secret word in the file?")
    assert len(msg["textFilePaths"]) == 1
    assert page.locator("#attachments .chip").count() == 0  # sent with the message
    assert "notes.txt" in page.locator(".msg.user .chip").text_content()
    assert FOOTER.match(wait_reply(page, 1))

    # An image gets a thumbnail served back from /uploads/.
    png = bytes.fromhex(
        "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
        "1f15c4890000000d49444154789c6360f8cfc0f01f0005000201e2f4"
        "d4a10000000049454e44ae426082"
    )
    page.set_input_files(
        "#file-input", files=[{"name": "dot.png", "mimeType": "image/png", "buffer": png}]
    )
    page.wait_for_function(
        "() => { const i = document.querySelector('#attachments .chip img.thumb');"
        " return i && i.complete && i.naturalWidth === 1; }"
    )
    page.get_by_role("button", name="Remove dot.png").click()
    assert page.locator("#attachments .chip").count() == 0


def test_tools_validation_and_markdown(page):
    page.fill("#tools", '[{"type": "function", "function": {}}')
    status = page.locator("#tools-status")
    assert status.text_content().startswith("Invalid JSON")
    assert page.get_attribute("#tools", "aria-invalid") == "true"
    send(page, "hello")  # blocked: nothing is sent while the tools are invalid
    assert page.locator(".msg").count() == 0
    page.click("#tools-example")
    assert status.text_content() == "1 tool: get_weather"

    # The renderer escapes HTML first and allows only http(s)/mailto links.
    html = page.evaluate(
        """async () => (await import('/markdown.js')).renderMarkdown(
        '# Title\\n**bold** and *it* `x<y`\\n\\n- a\\n- b\\n\\n```py\\nprint(\"<b>\")\\n```\\n' +
        '<script>alert(1)</script> [ok](https://example.com) [bad](javascript:alert(1))')"""
    )
    assert "<h1>Title</h1>" in html and "<strong>bold</strong>" in html and "<em>it</em>" in html
    assert "<code>x&lt;y</code>" in html and "<ul><li>a</li><li>b</li></ul>" in html
    assert '<code class="language-py">print(&quot;&lt;b&gt;&quot;)</code>' in html
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert '<a href="https://example.com"' in html and 'href="javascript' not in html


def test_phone_layout(phone):
    page = phone
    # Settings start closed as a drawer; nothing is wider than the screen.
    assert page.get_attribute("#settings-toggle", "aria-expanded") == "false"
    assert page.locator("#settings").is_hidden()
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    settings(page, 16)
    assert page.locator("#settings").is_visible()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "test_phone_layout-settings.png"))
    page.click("#settings-toggle")
    send(page, "Give me a short list of three fruits.")
    assert FOOTER.match(wait_reply(page, 1))
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    box = page.locator("#send").bounding_box()
    assert box and box["x"] + box["width"] <= PHONE["width"]


def test_tool_call_and_result_with_the_model(page):
    settings(page, 64)
    page.click("#tools-example")
    page.select_option("#tool-choice", "required")  # grammar-enforced: always a call
    with page.expect_request("**/api/chat") as req:
        send(page, "What is the weather in Paris?")
    assert req.value.post_data_json["tool_choice"] == "required"
    assert req.value.post_data_json["tools"][0]["function"]["name"] == "get_weather"
    assert FOOTER.match(wait_reply(page, 1))
    call = page.locator(".msg.assistant .tool-call")
    assert "get_weather" in call.text_content() and '"city"' in call.text_content()

    # Answer as the tool: the result goes back as a `tool` turn after the call.
    page.select_option("#tool-choice", "none")
    page.fill("#tool-result", '{"temperature": 21, "unit": "C"}')
    with page.expect_request("**/api/chat") as req:
        page.get_by_role("button", name="Send tool result").click()
    sent = req.value.post_data_json["messages"]
    assert [m["role"] for m in sent] == ["user", "assistant", "tool"]
    assert sent[1]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert FOOTER.match(wait_reply(page, 2))


CANNED = [
    {"queue_position": 2, "queue_pending": 2},
    {"thinking": "The user wants code. "},
    {"thinking": "Keep it short."},
    {"token": "Here is **code**:\n\n```python\nprint('hi')\n"},
    {"token": "```\n"},
    {"tool_calls": [{"id": "call_1", "name": "get_weather", "arguments": {"city": "Paris"}}]},
    {"done": True, "tokenCount": 187, "elapsed": 2.144, "tokPerSec": 87.22, "aborted": False,
     "error": None, "sessionId": None, "promptTokens": 512, "kvReusedTokens": 420,
     "kvReusePercent": 82.03, "finishReason": "tool_calls", "ttft": 0.2},
]  # fmt: skip


def test_reasoning_code_and_footer_from_a_canned_stream(page):
    """Frames the small model does not produce on demand (reasoning, a queue wait), served by a
    route that replays the protocol's exact shapes."""
    import json

    body = "".join(f"data: {json.dumps(f)}\n\n" for f in CANNED)
    page.route(
        "**/api/chat",
        lambda route: route.fulfill(status=200, content_type="text/event-stream", body=body),
    )
    page.check("#think")
    with page.expect_request("**/api/chat") as req:
        send(page, "Show me code")
    assert req.value.post_data_json["think"] is True
    footer = wait_reply(page, 1)
    assert footer == "187 tokens · 2.1s · 87.2 tok/s · KV 420/512 (82%)"
    reasoning = page.locator(".msg.assistant details.reasoning")
    assert reasoning.is_visible() and reasoning.get_attribute("open") is None  # folded when done
    reasoning.locator("summary").click()
    assert "Keep it short." in reasoning.locator(".reasoning-body").text_content()
    assert page.locator(".msg.assistant .code pre").text_content() == "print('hi')"
    assert page.locator(".msg.assistant .code-lang").text_content() == "python"
    assert page.locator(".msg.assistant strong").text_content() == "code"
    assert "get_weather" in page.locator(".msg.assistant .tool-call").text_content()


@pytest.fixture(scope="module")
def vision_server(chromium, tiny_vision, tmp_path_factory):
    """Chromium pointed at a live server of its own hosting the tiny Gemma 3 with its
    projector (`tiny_vision`); (browser, hub)."""
    from live_server import LiveServer, free_port

    from serve.app import create_app
    from serve.settings import Settings

    port = free_port()
    settings = Settings(
        model=str(tiny_vision.text_gguf), mmproj=tiny_vision.mmproj.name, host="127.0.0.1",
        port=port, rows=1, max_len=256, prefill_chunk=64,
        upload_dir=str(tmp_path_factory.mktemp("uploads")),
    )  # fmt: skip
    app = create_app(settings)
    live = LiveServer(app, port)
    chromium.base_url = live.start(timeout=600)
    yield chromium, app.state.hub
    live.stop()


@pytest.mark.slow
def test_attach_an_image_and_a_video_and_ask(vision_server, request, tmp_path):
    """The 📎 picker uploads a picture; sent, it reaches the model (the prompt's token count
    is the library's for that picture before the text) and the user bubble shows it, loaded
    back from /uploads/. Then a video, whose frames reach the model as pictures."""
    import io

    import numpy as np
    from PIL import Image

    browser, hub = vision_server
    page = open_page(browser, request, model=re.escape(hub.model.name))
    settings(page, 4)
    rgb = np.random.default_rng(7).integers(0, 256, (40, 90, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG")
    png = buf.getvalue()
    with page.expect_file_chooser() as chooser:
        page.click("label.attach")
    chooser.value.set_files([{"name": "noise.png", "mimeType": "image/png", "buffer": png}])
    page.wait_for_function(
        "() => { const i = document.querySelector('#attachments .chip img.thumb');"
        " return i && i.complete && i.naturalWidth === 90; }"
    )
    with page.expect_request("**/api/chat") as req:
        send(page, "Describe.")
    msg = req.value.post_data_json["messages"][-1]
    assert len(msg["imagePaths"]) == 1 and "isVideo" not in msg, msg
    m = FOOTER.match(wait_reply(page, 1, timeout=180_000))
    assert m, page.locator(".msg.assistant").last.text_content()
    content = [{"type": "image"}, {"type": "text", "text": "Describe."}]
    want = hub.model.chat_prompt([{"role": "user", "content": content}], [png])
    assert int(m.group(2)) == len(want.ids)  # KV reused/prompt: the picture's positions in it
    page.wait_for_function(
        "() => { const i = document.querySelector('.msg.user img.picture');"
        " return i && i.complete && i.naturalWidth === 90 && /\\/uploads\\//.test(i.src); }"
    )

    # A video becomes its frames: the picker takes it (chip VID), an empty message gets the
    # reference UI's default prompt, and the turn sends the frames with isVideo.
    from test_video import write_video

    page.click("#new-chat")
    page.wait_for_function("!document.querySelector('.msg')")
    page.wait_for_function("document.getElementById('transcript').dataset.sessionId")
    clip = write_video(tmp_path / "clip.mp4", seconds=2).read_bytes()
    page.set_input_files(
        "#file-input", files=[{"name": "clip.mp4", "mimeType": "video/mp4", "buffer": clip}]
    )
    page.locator("#attachments .chip.ready.kind-video").wait_for()
    with page.expect_request("**/api/chat") as req:
        page.click("#send")
    msg = req.value.post_data_json["messages"][-1]
    assert msg["isVideo"] and len(msg["imagePaths"]) == 2, msg
    assert msg["content"] == "What is happening in this video?"
    m = FOOTER.match(wait_reply(page, 1, timeout=180_000))
    frames = [Path(p).read_bytes() for p in msg["imagePaths"]]
    content = [{"type": "image"}] * 2 + [{"type": "text", "text": msg["content"]}]
    want = hub.model.chat_prompt([{"role": "user", "content": content}], frames)
    assert m and int(m.group(2)) == len(want.ids), m
