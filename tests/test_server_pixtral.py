"""Images of any size on the server, end to end: the real server hosting the tiny random
Mistral 3 with its Pixtral projector (`--mmproj`, a bare name beside the model), driven with
the official `openai` and `ollama` clients. Prompt token counts follow each image's own size
(its rows, breaks and [IMG_END]), both APIs give the same greedy answer, the projector's limits
are in `/api/show`, a too-long prompt names its images, Anthropic's count_tokens sizes the
image, and after warm-up no image size compiles anything (encoder token buckets and span
prefills are all warm)."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
from hf_factory import build
from live_server import LiveServer, free_port
from PIL import Image

pytestmark = pytest.mark.slow

openai = pytest.importorskip("openai")
ollama = pytest.importorskip("ollama")


def _png(seed: int, size: tuple[int, int]) -> bytes:
    rgb = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG")
    return buf.getvalue()


WIDE, TALL, BIG = _png(1, (130, 70)), _png(2, (60, 150)), _png(3, (300, 300))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(base URL, hub, span prefill programs once warm); stopped after the module."""
    from serve.app import create_app
    from serve.settings import Settings

    tiny = build("mistral3")
    port = free_port()
    settings = Settings(
        model=str(tiny.gguf["f32"]), mmproj=tiny.mmproj["f32"].name, host="127.0.0.1",
        port=port, rows=2, max_len=256, prefill_chunk=64,
        upload_dir=str(tmp_path_factory.mktemp("uploads")),
    )  # fmt: skip
    app = create_app(settings)
    live = LiveServer(app, port)
    url = live.start(timeout=600)
    hub = app.state.hub
    spans = sorted(k for k in hub.model.steps.programs.keys() if k[0] == "span_prefill")
    yield url, hub, spans
    live.stop()


SYSTEM = {"role": "system", "content": "Be brief."}  # the template's default is 300+ tokens


def _expected_tokens(hub, text: str, images: list[bytes]) -> int:
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
    msgs = [SYSTEM, {"role": "user", "content": content}]
    return len(hub.model.chat_prompt(msgs, images).ids)


def test_openai_and_ollama_see_the_same_picture(server):
    url, hub, _ = server
    name = hub.model.name
    want = _expected_tokens(hub, "What is in this picture?", [WIDE])
    oai = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    parts = [
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{_b64(WIDE)}"}},
        {"type": "text", "text": "What is in this picture?"},
    ]
    r = oai.chat.completions.create(
        model=name, messages=[SYSTEM, {"role": "user", "content": parts}], max_tokens=8,
        temperature=0,
    )  # fmt: skip
    # 2 rows of 4 tokens, a break between them and [IMG_END]
    assert r.usage.prompt_tokens == want
    assert want == _expected_tokens(hub, "What is in this picture?", []) + 2 * 4 + 1 + 1
    oll = ollama.Client(host=url)
    opts = {"num_predict": 8, "temperature": 0}
    msg = {"role": "user", "content": "What is in this picture?", "images": [WIDE]}
    o = oll.chat(model=name, messages=[SYSTEM, msg], options=opts)
    assert o.prompt_eval_count == want and o.message.content == r.choices[0].message.content
    g = oll.generate(model=name, prompt="What is in this picture?", images=[WIDE], options=opts,
                     system=SYSTEM["content"])  # fmt: skip
    assert g.response == o.message.content
    # another size, another count: 5 rows of 2
    tall = oll.chat(model=name, messages=[SYSTEM, {**msg, "images": [TALL]}], options=opts)
    assert tall.prompt_eval_count == _expected_tokens(hub, "What is in this picture?", [TALL])
    assert tall.prompt_eval_count == want - 9 + 5 * 2 + 4


def test_counting_endpoints_size_the_image(server):
    """Anthropic's count_tokens renders without generating: it prepares the image too, since
    its size decides the prompt's length."""
    url, hub, _ = server
    block = {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                         "data": _b64(TALL)}}  # fmt: skip
    msg = {"role": "user", "content": [block, {"type": "text", "text": "Hm?"}]}
    body = {"model": hub.model.name, "system": SYSTEM["content"], "messages": [msg]}
    r = httpx.post(url + "/v1/messages/count_tokens", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["input_tokens"] == _expected_tokens(hub, "Hm?", [TALL])


def test_show_and_too_long(server):
    url, hub, _ = server
    name = hub.model.name
    info = httpx.post(url + "/api/show", json={"model": name}).json()
    assert "vision" in info["capabilities"]
    p = info["projector_info"]
    assert p["clip.projector_type"] == "pixtral" and "tokens_per_image" not in p
    assert (p["min_image_tokens"], p["max_image_tokens"]) == (8, 1024)
    # three 300 px squares: 9 x 9 tokens + 8 breaks + [IMG_END] each, over 256 positions
    msg = {"role": "user", "content": "?", "images": [_b64(BIG)] * 3}
    body = {"model": name, "stream": False, "messages": [SYSTEM, msg]}
    r = httpx.post(url + "/api/chat", json=body, timeout=120)
    assert r.status_code == 400, r.text
    assert "3 image(s) take 267 positions: send fewer or smaller images" in r.json()["error"]


def test_no_compiles_after_warm_up(server):
    """Images of three sizes ran above and one more here: the encoder's token buckets and the
    span prefills were all compiled at start."""
    url, hub, before = server
    encoder_programs = hub.model.projector.compiled_count()
    oll = ollama.Client(host=url)
    odd = _png(4, (250, 41))
    msg = {"role": "user", "content": "and this?", "images": [odd]}
    oll.chat(model=hub.model.name, messages=[SYSTEM, msg], options={"num_predict": 3})
    assert hub.model.projector.compiled_count() == encoder_programs
    spans = sorted(k for k in hub.model.steps.programs.keys() if k[0] == "span_prefill")
    assert before and spans == before
    assert hub.model.steps.prefill_fn._cache_size() == 0  # nothing went around the programs
    assert hub.encoder.stats.images >= 3
