"""A Gemma 4 image and audio clip on the server, end to end: the real server hosting the tiny
random Gemma 4 E-model with its mmproj (`--mmproj`, a bare name beside the model; gemma4v and
gemma4a), driven with the official `openai` and `ollama` clients and the Web UI protocol: the
prompt's length follows the image's size (<|image>, its tokens, <image|>) and the clip's
duration (<|audio>, its tokens, <audio|>), both APIs give the same greedy answer, `/api/show`
reports the projector's limits, a follow-up reuses the cache through the clip, and a bad clip
is a 400 naming its part."""

from __future__ import annotations

import base64
import io
import json

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


WIDE = _png(1, (528, 336))  # 11 x 7 = 77 tokens as is


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from serve.app import create_app
    from serve.settings import Settings

    tiny = build("gemma4_vision_audio")
    port = free_port()
    settings = Settings(
        model=str(tiny.gguf["f32"]), mmproj=tiny.mmproj["f32"].name, host="127.0.0.1",
        port=port, rows=1, max_len=256, prefill_chunk=128,
        upload_dir=str(tmp_path_factory.mktemp("uploads")),
    )  # fmt: skip
    app = create_app(settings)
    live = LiveServer(app, port)
    url = live.start(timeout=600)
    yield url, app.state.hub
    live.stop()


SYSTEM = {"role": "system", "content": "Be brief."}
QUESTION = "What is in this picture?"


def _expected_tokens(hub, images: list[bytes]) -> int:
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": QUESTION}]
    return len(hub.model.chat_prompt([SYSTEM, {"role": "user", "content": content}], images).ids)


def test_openai_and_ollama_see_the_same_picture(server):
    url, hub = server
    name = hub.model.name
    want = _expected_tokens(hub, [WIDE])
    assert want == _expected_tokens(hub, []) + 1 + 77 + 1  # <|image>, the tokens, <image|>
    data = base64.b64encode(WIDE).decode()
    oai = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    parts = [
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}},
        {"type": "text", "text": QUESTION},
    ]
    r = oai.chat.completions.create(
        model=name, messages=[SYSTEM, {"role": "user", "content": parts}], max_tokens=8,
        temperature=0,
    )  # fmt: skip
    assert r.usage.prompt_tokens == want and r.usage.completion_tokens > 0
    oll = ollama.Client(host=url)
    opts = {"num_predict": 8, "temperature": 0}
    msg = {"role": "user", "content": QUESTION, "images": [WIDE]}
    o = oll.chat(model=name, messages=[SYSTEM, msg], options=opts)
    assert o.prompt_eval_count == want and o.message.content == r.choices[0].message.content
    # the image changes the answer's input: without it the prompt is 79 positions shorter
    t = oll.chat(model=name, messages=[SYSTEM, {"role": "user", "content": QUESTION}],
                 options=opts)  # fmt: skip
    assert t.prompt_eval_count == want - 79


def test_show_reports_the_projector(server):
    url, hub = server
    info = httpx.post(url + "/api/show", json={"model": hub.model.name}).json()
    assert "vision" in info["capabilities"] and "audio" in info["capabilities"]
    p = info["projector_info"]
    assert p["clip.vision.projector_type"] == "gemma4v" and "tokens_per_image" not in p
    assert (p["min_image_tokens"], p["max_image_tokens"]) == (70, 1120)


def _clip_parts(wav: bytes, text: str) -> list[dict]:
    data = base64.b64encode(wav).decode()
    return [
        {"type": "input_audio", "input_audio": {"data": data, "format": "wav"}},
        {"type": "text", "text": text},
    ]


def _audio_prompt(hub, wav: bytes, text: str, system: bool = True):
    content = [{"type": "audio"}, {"type": "text", "text": text}]
    msgs = [SYSTEM] if system else []
    return hub.model.chat_prompt([*msgs, {"role": "user", "content": content}], audio=[wav])


def test_audio_through_openai_chat_and_responses(server):
    """An OpenAI `input_audio` part (base64 WAV, as the SDK sends it) in chat completions and
    Responses: the prompt is the library's (<|audio>, 51 tokens for 2 s, <audio|>); the
    same clip again reuses the cache through it (the span's key is the samples' digest)."""
    from test_gemma4a import clip, wav_bytes

    url, hub = server
    wav = wav_bytes(clip(2.05))
    prompt = _audio_prompt(hub, wav, QUESTION)
    (span,) = prompt.spans
    assert span.length == 51
    assert len(prompt.ids) == _expected_tokens(hub, []) + 1 + 51 + 1
    oai = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    msgs = [SYSTEM, {"role": "user", "content": _clip_parts(wav, QUESTION)}]
    r = oai.chat.completions.create(model=hub.model.name, messages=msgs, max_tokens=4,
                                    temperature=0)  # fmt: skip
    assert r.usage.prompt_tokens == len(prompt.ids) and r.usage.completion_tokens > 0
    again = oai.chat.completions.create(model=hub.model.name, messages=msgs, max_tokens=4,
                                        temperature=0)  # fmt: skip
    assert again.usage.prompt_tokens_details.cached_tokens >= span.end
    assert again.choices[0].message.content == r.choices[0].message.content
    parts = _clip_parts(wav, QUESTION)
    parts[1] = {"type": "input_text", "text": QUESTION}
    resp = oai.responses.create(
        model=hub.model.name, input=[{"role": "user", "content": parts}], max_output_tokens=4,
        temperature=0,
    )  # fmt: skip
    assert resp.usage.input_tokens == len(_audio_prompt(hub, wav, QUESTION, system=False).ids)


def test_audio_through_the_web_ui(server):
    """A WAV uploaded through the Web UI and listed in `audioPaths` is heard (before the
    text, as images are placed): the turn's prompt is the library's, nothing ignored."""
    from test_gemma4a import clip, wav_bytes
    from test_webui_api import sse

    url, hub = server
    wav = wav_bytes(clip(0.5, seed=3), rate=8000)  # 1 s at 8 kHz, resampled: 25 tokens
    with httpx.Client(base_url=url, timeout=120, headers={"X-TSJAX-UI": "1"}) as client:
        up = client.post("/api/upload", files={"file": ("q.wav", wav, "audio/wav")}).json()
        assert up["mediaType"] == "audio"
        msg = {"role": "user", "content": "Describe.", "audioPaths": [up["path"]]}
        done = sse(client.post("/api/chat", json={"messages": [msg], "maxTokens": 2}))[-1]
    assert done["done"] and done["error"] is None, done
    assert "mediaIgnored" not in done
    prompt = _audio_prompt(hub, wav, "Describe.", system=False)
    assert prompt.spans[0].length == 25 and done["promptTokens"] == len(prompt.ids)


def test_bad_audio_is_a_400_naming_its_part(server):
    """A part that is not audio (a bare RIFF header, bad base64) is a 400 naming the part."""
    url, hub = server
    for data, says in [("UklGRg==", "audio"), ("%%%", "not valid base64")]:
        part = {"type": "input_audio", "input_audio": {"data": data, "format": "wav"}}
        msgs = [{"role": "user", "content": [part, {"type": "text", "text": "?"}]}]
        body = {"model": hub.model.name, "messages": msgs, "max_tokens": 2}
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 400, r.text
        assert "messages[0].content[0]" in r.text and says in r.text, r.text


def _transformers_video(seconds: list[float], frame: tuple[int, int]) -> str:
    """The text transformers' `Gemma4Processor` puts where a video goes (its own
    `replace_video_token`): per frame taken at `seconds`, `mm:ss <|image>`, a `<|video|>` for
    each of the frame's soft tokens, `<image|>`, joined by spaces. The soft tokens of a
    (width, height) frame come from the size its video processor resizes it to (70 soft
    tokens at most: 16 px patches pooled 3x3)."""
    from types import SimpleNamespace

    from transformers.models.gemma4.image_processing_pil_gemma4 import (
        get_aspect_ratio_preserving_size,
    )
    from transformers.models.gemma4.processing_gemma4 import Gemma4Processor

    h, w = get_aspect_ratio_preserving_size(frame[1], frame[0], 16, 70 * 9, 3)
    proc = SimpleNamespace(boi_token="<|image>", eoi_token="<image|>", video_token="<|video|>")
    meta = SimpleNamespace(fps=10.0, timestamps=seconds)
    inputs = {"num_soft_tokens_per_video": [(h // 48) * (w // 48)], "video_metadata": [meta]}
    return Gemma4Processor.replace_video_token(proc, inputs, 0)


def _done(r: httpx.Response) -> dict:
    """The `done` frame of a Web UI stream."""
    assert r.status_code == 200, r.text
    return [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")][-1]


def test_web_ui_video_is_laid_out_as_transformers_does(server, tmp_path):
    """A 2 s video uploaded through the Web UI protocol becomes 2 frames (seconds 0 and 1);
    a turn naming them with isVideo is prompted as transformers' Gemma 4 processor expands
    a video: `00:00 ` + frame 1 + ` 00:01 ` + frame 2, each frame sized as its video
    processor sizes frames, then the question: the same token count as transformers' whole
    prompt text (our template and tokenizer, `<|video|>` one control token per position).
    Uploaded with a `sessionId`, the video joins that session's next message the same way."""
    from test_video import H, W, write_video

    url, hub = server
    video = write_video(tmp_path / "clip.mp4", seconds=2).read_bytes()
    with httpx.Client(base_url=url, timeout=120, headers={"X-TSJAX-UI": "1"}) as client:
        up = client.post("/api/upload", files={"file": ("clip.mp4", video, "video/mp4")}).json()
        assert up["frames"] == ["frame_0001_0ms.png", "frame_0002_1000ms.png"], up
        msg = {"role": "user", "content": QUESTION, "imagePaths": up["framePaths"],
               "isVideo": True}  # fmt: skip
        body = {"messages": [SYSTEM, msg], "maxTokens": 2, "temperature": 0, "think": False}
        done = _done(client.post("/api/chat", json=body))
        # Uploaded for a session instead, the video joins that session's next message.
        sid = client.post("/api/sessions").json()["sessionId"]
        client.post("/api/upload", files={"file": ("clip.mp4", video, "video/mp4")},
                    data={"sessionId": sid})  # fmt: skip
        plain = {"role": "user", "content": QUESTION}
        pending = _done(client.post("/api/chat", json={**body, "messages": [SYSTEM, plain],
                                                       "sessionId": sid}))  # fmt: skip
    assert done["done"] and done["error"] is None and "mediaIgnored" not in done, done
    assert pending["promptTokens"] == done["promptTokens"] and "mediaIgnored" not in pending
    expanded = _transformers_video([0.0, 1.0], (W, H))
    user = {"role": "user", "content": expanded + QUESTION}
    text = hub.model.template.render([SYSTEM, user], enable_thinking=False)
    want = hub.model.tokenizer.encode(text, add_bos=False, parse_special=True)  # <bos> in it
    assert done["promptTokens"] == len(want)
    assert expanded.count("<|video|>") == 2 * 63  # 64x48 -> 432x336: 9 x 7 tokens a frame
