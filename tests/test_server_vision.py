"""Images on every API surface, end to end: the real server (uvicorn on a loopback port) hosting
the tiny random Gemma 3 with its projector (`--mmproj`, a bare name beside the model), driven
with the official `openai` and `ollama` clients and raw HTTP for the Web UI; prompt token counts
with the image positions, prefix reuse through an image, the model panel and `/api/show`,
every kind of bad image as a 400 naming the problem, and no compiles after warm-up."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
from live_server import LiveServer, free_port
from PIL import Image
from test_webui_api import sse

pytestmark = pytest.mark.slow

openai = pytest.importorskip("openai")
ollama = pytest.importorskip("ollama")

MAX_LEN = 256


def _png(seed: int, size=(90, 40)) -> bytes:
    rgb = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG")
    return buf.getvalue()


RED, BLUE, GREEN = _png(1), _png(2, (30, 70)), _png(3, (56, 56))
RED64 = base64.b64encode(RED).decode()
BLUE64 = base64.b64encode(BLUE).decode()


def _span_programs(hub) -> list:
    return sorted(k for k in hub.model.steps.programs.keys() if k[0] == "span_prefill")


@pytest.fixture(scope="module")
def server(tiny_vision, tmp_path_factory):
    """(base URL, hub, compiled step shapes once warm) of a warm server; stopped after the
    module."""
    from serve.app import create_app
    from serve.settings import Settings

    port = free_port()
    settings = Settings(
        model=str(tiny_vision.text_gguf),
        mmproj=tiny_vision.mmproj.name,
        host="127.0.0.1",
        port=port,
        rows=2,
        max_len=MAX_LEN,
        prefill_chunk=64,
        upload_dir=str(tmp_path_factory.mktemp("uploads")),
    )
    app = create_app(settings)
    server = LiveServer(app, port)
    url = server.start(timeout=600)
    hub = app.state.hub
    # the prefills with embedded spans are compiled at start; text shapes are the lazy
    # programs, which may compile in the background without holding a request
    yield url, hub, _span_programs(hub)
    server.stop()


@pytest.fixture(scope="module")
def name(server):
    return server[1].model.name


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="x", max_retries=0)


@pytest.fixture(scope="module")
def oll(server):
    return ollama.Client(host=server[0])


def _library_prompt(hub, text: str, images: list[bytes]):
    """The library's prompt for one user message with `images` before `text`."""
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
    return hub.model.chat_prompt([{"role": "user", "content": content}], images)


def _expected_tokens(hub, text: str, images: list[bytes]) -> int:
    return len(_library_prompt(hub, text, images).ids)


def test_openai_and_ollama_see_the_same_picture(server, name, oai, oll):
    """The same picture and words through OpenAI's image_url part and Ollama's images (chat and
    generate) give the same prompt (its token count with the image's positions) and the same
    greedy answer."""
    hub = server[1]
    want = _expected_tokens(hub, "What is in this picture?", [RED])
    parts = [
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{RED64}"}},
        {"type": "text", "text": "What is in this picture?"},
    ]
    r = oai.chat.completions.create(
        model=name, messages=[{"role": "user", "content": parts}], max_tokens=8, temperature=0
    )
    assert r.usage.prompt_tokens == want > hub.model.projector.tokens_per_image
    opts = {"num_predict": 8, "temperature": 0}
    msg = {"role": "user", "content": "What is in this picture?", "images": [RED]}
    o = oll.chat(model=name, messages=[msg], options=opts)
    assert o.prompt_eval_count == want
    assert o.message.content == r.choices[0].message.content
    g = oll.generate(model=name, prompt="What is in this picture?", images=[RED], options=opts)
    assert g.prompt_eval_count == want and g.response == o.message.content


def test_responses_and_anthropic_see_the_same_picture(server, name, oai):
    """The Responses API's input_image part and an Anthropic base64 image block give the same
    prompt (token count with the image's positions) and greedy answer as OpenAI chat."""
    anthropic = pytest.importorskip("anthropic")
    hub = server[1]
    want = _expected_tokens(hub, "Describe it.", [RED])
    url = f"data:image/png;base64,{RED64}"
    text = {"type": "text", "text": "Describe it."}
    text_in = {"type": "input_text", "text": "Describe it."}

    def block(data):
        return {
            "type": "image",
            "source": {"type": "base64", "media_type": "image/png", "data": data},
        }

    chat = oai.chat.completions.create(
        model=name,
        messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, text]}
        ],
        max_tokens=6,
        temperature=0,
    )
    r = oai.responses.create(
        model=name,
        input=[{"role": "user", "content": [{"type": "input_image", "image_url": url}, text_in]}],
        max_output_tokens=6,
        temperature=0,
    )
    assert r.usage.input_tokens == want
    assert r.output_text == chat.choices[0].message.content
    client = anthropic.Anthropic(base_url=server[0], api_key="x", max_retries=0)
    m = client.messages.create(
        model=name,
        max_tokens=6,
        extra_body={"temperature": 0},  # (this SDK's create() no longer spells it)
        messages=[{"role": "user", "content": [block(RED64), text]}],
    )
    assert m.usage.input_tokens + (m.usage.cache_read_input_tokens or 0) == want
    assert "".join(b.text for b in m.content if b.type == "text") == r.output_text
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.create(
            model=name,
            max_tokens=2,
            messages=[{"role": "user", "content": [block("bm90IGFuIGltYWdl")]}],
        )
    assert "image" in str(e.value)


def test_follow_up_reuses_the_cache_through_the_picture(server, name):
    """(Raw HTTP: the ollama client drops the cache-hit fields, which are the reference's.)"""
    url, hub, _ = server
    opts = {"num_predict": 6, "temperature": 0}

    def chat(messages):
        body = {"model": name, "messages": messages, "options": opts, "stream": False}
        r = httpx.post(url + "/api/chat", json=body, timeout=120)
        assert r.status_code == 200, r.text
        return r.json()

    first = [{"role": "user", "content": "Look at this.", "images": [BLUE64]}]
    a = chat(first)
    follow = first + [
        {"role": "assistant", "content": a["message"]["content"]},
        {"role": "user", "content": "And the colours?"},
    ]
    b = chat(follow)
    (span,) = _library_prompt(hub, "Look at this.", [BLUE]).spans
    assert b["prompt_cache_hit_tokens"] >= span.end
    # the same words about a picture no row holds: reuse stops where the pictures differ
    green = base64.b64encode(GREEN).decode()
    c = chat([{**follow[0], "images": [green]}, *follow[1:]])
    assert c["prompt_cache_hit_tokens"] == span.start


def test_web_ui_upload_and_stream(server):
    url, hub, _ = server
    # uploads need the Web UI's header (README "Security")
    with httpx.Client(base_url=url, timeout=120, headers={"X-TSJAX-UI": "1"}) as client:
        up = client.post("/api/upload", files={"file": ("cat.png", RED, "image/png")}).json()
        assert up["mediaType"] == "image"
        body = {
            "messages": [{"role": "user", "content": "Describe.", "imagePaths": [up["path"]]}],
            "maxTokens": 4,
            "temperature": 0,
        }
        frames = sse(client.post("/api/chat", json=body))
        done = frames[-1]
        assert done["done"] and done["error"] is None, done
        assert "mediaIgnored" not in done
        assert done["promptTokens"] == _expected_tokens(hub, "Describe.", [RED])
        # the picture is served back for the conversation's preview
        pic = client.get("/uploads/" + up["path"].rsplit("/", 1)[-1])
        assert pic.status_code == 200 and pic.content == RED


def test_model_panel_and_show(server, name, oll):
    url, hub, _ = server
    proj = hub.model.projector
    with httpx.Client(base_url=url, timeout=30) as client:
        m = client.get("/api/models").json()
        assert m["mmProjModels"] == [proj.name] and m["loadedMmProj"] == proj.name
        assert m["hostedMmProjPath"] == str(proj.path.resolve())
        ok = client.post("/api/models/load", json={"model": name, "mmproj": proj.name})
        assert ok.status_code == 200 and ok.json()["loadedMmProj"] == proj.name
        for mmproj, words in [("none", "started with mmproj"), ("x.gguf", "not hosted")]:
            r = client.post("/api/models/load", json={"model": name, "mmproj": mmproj})
            assert r.status_code == 400 and words in r.json()["error"], r.text
    assert "vision" in oll.show(name).capabilities  # what clients read to offer images
    assert "audio" not in oll.show(name).capabilities  # Gemma 3: no audio encoder
    info = httpx.post(url + "/api/show", json={"model": name}).json()["projector_info"]
    assert info["clip.projector_type"] == "gemma3" and info["file"] == proj.name
    assert info["tokens_per_image"] == proj.tokens_per_image


def test_bad_images_are_400s(server, name, oai):
    url = server[0]
    not_image = base64.b64encode(b"hello, not a picture " * 10).decode()
    cut = base64.b64encode(RED[: len(RED) // 2]).decode()
    with httpx.Client(base_url=url, timeout=60) as client:

        def ollama_chat(images):
            msg = {"role": "user", "content": "?", "images": images}
            return client.post(
                "/api/chat", json={"model": name, "messages": [msg], "stream": False}
            )

        for images, words in [
            ([not_image], "messages[0].images[0]: not an image"),
            ([RED64, cut], "messages[0].images[1]: the image is truncated"),
            (["!!not base64!!"], "messages[0].images[0]: the image is not valid base64"),
            ([RED64] * 14, "each image takes 18 tokens"),  # 14 x 18 > 256 positions
        ]:
            r = ollama_chat(images)
            assert r.status_code == 400 and words in r.json()["error"], r.text
        r = client.post("/api/generate", json={"model": name, "prompt": "?", "images": [cut]})
        assert r.status_code == 400 and "images[0]: the image is truncated" in r.json()["error"]
    for url_, words in [
        ("https://example.com/cat.png", "not fetched"),
        ("data:text/plain;base64,aGVsbG8=", "not an image"),
    ]:
        part = {"type": "image_url", "image_url": {"url": url_}}
        with pytest.raises(openai.BadRequestError) as e:
            oai.chat.completions.create(
                model=name, messages=[{"role": "user", "content": [part]}], max_tokens=2
            )
        assert words in e.value.body["message"]
        assert e.value.body["param"] == "messages[0].content[0]"


def test_audio_is_refused_by_name(server, name):
    """Gemma 3's projector has no audio encoder: an OpenAI input_audio part is a 400 that
    says so, not a silently dropped part."""
    part = {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}}
    msgs = [{"role": "user", "content": [part, {"type": "text", "text": "?"}]}]
    body = {"model": name, "messages": msgs, "max_tokens": 2}
    r = httpx.post(server[0] + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert "cannot take audio input" in r.text and "no audio encoder" in r.text


def test_no_compiles_after_warm_up(server, name, oai, oll):
    """Text and image requests of every surface ran above: no image prefill compiled since
    warm-up (its buckets are warmed beside the text ones; text shapes the warm-up left out
    run on covering programs while theirs compile in the background: tests/test_programs.py)."""
    _, hub, before = server
    oll.chat(model=name, messages=[{"role": "user", "content": "hi"}], options={"num_predict": 3})
    parts = [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{BLUE64}"}}]
    oai.chat.completions.create(
        model=name, messages=[{"role": "user", "content": parts}], max_tokens=3
    )
    assert before and _span_programs(hub) == before
    assert hub.model.steps.prefill_fn._cache_size() == 0  # nothing went around the programs
    assert hub.encoder.stats.images >= 3  # each distinct picture encoded


def test_web_ui_video_frames_are_images(server, tmp_path):
    """A video uploaded through the Web UI protocol becomes its frames (3 s: seconds 0, 1, 2);
    a turn naming them with isVideo shows a Gemma 3 model each frame as an image, before the
    text, as the reference does for every model but Gemma 4."""
    from test_video import write_video

    url, hub, _ = server
    video = write_video(tmp_path / "clip.webm", seconds=3, codec="libvpx-vp9").read_bytes()
    with httpx.Client(base_url=url, timeout=120, headers={"X-TSJAX-UI": "1"}) as client:
        up = client.post("/api/upload", files={"file": ("clip.webm", video, "video/webm")})
        up = up.json()
        assert len(up["framePaths"]) == 3, up
        msg = {"role": "user", "content": "Describe.", "imagePaths": up["framePaths"],
               "isVideo": True}  # fmt: skip
        done = sse(client.post("/api/chat", json={"messages": [msg], "maxTokens": 2}))[-1]
    assert done["done"] and done["error"] is None and "mediaIgnored" not in done, done
    frames = [open(p, "rb").read() for p in up["framePaths"]]
    assert done["promptTokens"] == _expected_tokens(hub, "Describe.", frames)
