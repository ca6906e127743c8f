"""Video uploads as frames (serve/translation/video.py): which frames are kept (the
reference's evenly spaced rule), decoding them from real files PyAV writes here (a few
seconds of 64x48 frames, each frame's colour saying its number), the bounds on decoding, the
frames directory in the upload store (private, in the quota, expired as one), `POST
/api/upload` of a video, and how a video message's frames are laid out for Gemma 4 (timed,
cut to the limit) and for other models (plain images). In-process on the stub engine:
nothing is compiled."""

from __future__ import annotations

import io
import os
import stat
import time
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image
from tiny_app import UI, tiny_client, tiny_model

from serve.translation.intent import ImageInput
from serve.translation.video import (
    Budget,
    VideoError,
    candidate_frames,
    even_indices,
    extract_frames,
    frame_name,
    frame_parts,
    frame_seconds,
    max_frames,
)
from serve.uploads import FRAMES_DIR, UploadStore

W, H = 64, 48


def colour(i: int) -> tuple[int, int, int]:
    """Frame i's colour: red counts frames by 8, green by 8 backwards, blue by the second."""
    return (i * 8) % 256, 255 - (i * 8) % 256, (i // 10) * 40 % 256


def write_video(path: Path, seconds: int = 3, fps: int = 10, codec: str = "libx264",
                gop: int | None = None, fmt: str | None = None,
                options: dict | None = None) -> Path:  # fmt: skip
    """A `seconds` long video of flat frames at `fps`, frame i in `colour(i)`; `fmt` and
    `options`: the container's format and muxer options."""
    with av.open(str(path), "w", format=fmt, options=options or {}) as out:
        stream = out.add_stream(codec, rate=fps, options={"crf": "0"} if codec == "libx264" else {})
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        if gop:
            stream.codec_context.gop_size = gop
        for i in range(seconds * fps):
            rgb = np.empty((H, W, 3), np.uint8)
            rgb[:] = colour(i)
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def frame_number(png: bytes) -> int:
    """Which frame of `write_video` a decoded PNG is (nearest colour; video coding is lossy)."""
    pixel = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))[H // 2, W // 2].astype(int)
    return min(range(256), key=lambda i: np.abs(pixel - colour(i)).sum())


# -- which frames --------------------------------------------------------------------------


def test_evenly_spaced_indices_follow_the_reference():
    assert even_indices(8, 4) == [0, 2, 5, 7]
    assert even_indices(3, 4) == [0, 1, 2]
    assert even_indices(9, 1) == [4]
    assert even_indices(4, 4) == [0, 1, 2, 3]
    assert even_indices(60, 4) == [0, 20, 39, 59]
    assert even_indices(5, 4) == [0, 1, 3, 4]  # 4/3 -> 1, 8/3 -> 3
    assert even_indices(7, 5) == [0, 2, 3, 4, 6]  # 1.5 and 4.5 round to even
    for count in range(1, 40):
        for limit in range(1, 8):
            got = even_indices(count, limit)
            assert len(got) == min(count, limit) and got == sorted(set(got))
            assert got[-1] < count and (limit == 1 or count <= limit or got[-1] == count - 1)


def test_candidates_are_one_a_second_and_the_limit_setting():
    assert candidate_frames(30, 10.0, 4) == [0, 10, 20]
    assert candidate_frames(30, 29.97, 4) == [0]  # round(29.97) = 30 frames a second
    assert candidate_frames(240, 30.0, 4) == [0, 60, 150, 210]  # 8 candidates -> [0,2,5,7]
    assert candidate_frames(10, 0.4, 2) == [0, 9]  # under 1 fps: every frame is a candidate
    assert [max_frames(v) for v in (4, 7, 0, -3, "x", None, "2")] == [4, 7, 4, 4, 4, 4, 2]


# -- decoding ------------------------------------------------------------------------------


@pytest.mark.parametrize("ext,codec", [(".mp4", "libx264"), (".webm", "libvpx-vp9")])
def test_frames_are_decoded_at_their_seconds(tmp_path, ext, codec):
    """3 s at 10 fps: candidates 0, 10, 20, all kept under a limit of 4, each the right
    frame (WebM has no frame count: it comes from the duration)."""
    frames = extract_frames(write_video(tmp_path / f"v{ext}", codec=codec), 4)
    assert [f.number for f in frames] == [0, 10, 20]
    assert [f.seconds for f in frames] == pytest.approx([0.0, 1.0, 2.0], abs=1e-3)
    assert [frame_number(f.png) for f in frames] == [0, 10, 20]
    assert Image.open(io.BytesIO(frames[0].png)).size == (W, H)


@pytest.mark.parametrize("name,codec,fmt,options", [
    ("live.webm", "libvpx-vp9", "webm", {"live": "1"}),  # as a browser records: no duration
    ("raw.h264", "libx264", "h264", {}),  # no container: no count, no seeking
])  # fmt: skip
def test_videos_without_a_length_or_an_index(tmp_path, name, codec, fmt, options):
    """Without a frame count or a duration the packets are counted; a file that cannot seek
    is decoded from its start, up to the last kept frame."""
    video = write_video(tmp_path / name, codec=codec, fmt=fmt, options=options)
    with av.open(str(video)) as c:
        assert c.duration is None and c.streams.video[0].frames == 0
    frames = extract_frames(video, 4)
    assert [f.number for f in frames] == [0, 10, 20]
    assert [frame_number(f.png) for f in frames] == [0, 10, 20]


def test_only_the_kept_frames_are_decoded(tmp_path):
    """A 20 s video with a keyframe every 5 s, 2 frames kept: candidate seconds 0..19, kept
    [0, 19] (frames 0 and 190); reaching them decodes about one group of pictures, not the
    200 frames."""
    video = write_video(tmp_path / "long.mp4", seconds=20, gop=50)
    budget = Budget()
    frames = extract_frames(video, 2, budget)
    assert [f.number for f in frames] == [0, 190]
    assert [frame_number(f.png) for f in frames] == [0, 190 % 256]
    assert budget.decoded <= 60, budget.decoded
    assert [f.number for f in extract_frames(video, 1)] == [100]  # the middle candidate


def test_unreadable_and_unbounded_videos_are_refused(tmp_path, monkeypatch):
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(2000))
    with pytest.raises(VideoError, match="cannot be read|no video stream|no frame"):
        extract_frames(junk, 4)
    empty = tmp_path / "empty.mkv"
    empty.write_bytes(b"")
    with pytest.raises(VideoError):
        extract_frames(empty, 4)
    video = write_video(tmp_path / "v.mp4", seconds=10, gop=100)
    with pytest.raises(VideoError, match="more than"):
        extract_frames(video, 4, Budget(frames_per_kept=5))
    with pytest.raises(VideoError, match="longer than"):
        extract_frames(video, 4, Budget(seconds=-1.0))
    monkeypatch.setattr("serve.translation.video.MAX_FRAME_PIXELS", W * H - 1)
    with pytest.raises(VideoError, match="64x48"):
        extract_frames(video, 4)


# -- the upload store ----------------------------------------------------------------------


def test_frames_directories_are_private_counted_and_expire(tmp_path):
    held: set[Path] = set()
    store = UploadStore(tmp_path / "up", quota=1000, ttl=60.0, held=lambda: held)
    a = store.save_frames([(frame_name(1, 0.0), b"a" * 300), (frame_name(2, 1.5), b"b" * 300)])
    assert [p.name for p in a] == ["frame_0001_0ms.png", "frame_0002_1500ms.png"]
    assert FRAMES_DIR.match(a[0].parent.name) and a[0].parent.parent == store.root
    assert stat.S_IMODE(a[0].parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(a[0].stat().st_mode) == 0o600
    assert store.usage() == 600 and store.inside(str(a[1])) == a[1]
    assert [frame_seconds(p) for p in a] == [0.0, 1.5] and frame_seconds("x.png") is None
    with pytest.raises(Exception, match="quota"):
        store.save_frames([(frame_name(1, 0.0), b"c" * 500)])
    assert store.usage() == 600  # nothing written
    with pytest.raises(ValueError):
        store.save_frames([("../evil.png", b"x")])
    b = store.save_frames([(frame_name(1, 0.0), b"d" * 100)])
    old = time.time() - 3600
    for p in (*a, *b, a[0].parent, b[0].parent):
        os.utime(p, (old, old))
    held.add(b[0])  # a session uses the second video's frame: its directory stays
    assert store.sweep() == 1
    assert not a[0].parent.exists() and b[0].exists() and store.usage() == 100
    assert store.inside(str(store.root / "frames_x" / "frame_0001.png")) is None
    assert store.inside(str(tmp_path / "frame_0001_0ms.png")) is None


# -- through the HTTP API ------------------------------------------------------------------


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("m"))


def test_video_upload_answers_its_frames(model, tmp_path):
    video = write_video(tmp_path / "clip.mp4", seconds=9).read_bytes()
    with tiny_client(model, upload_dir=str(tmp_path / "u"), video_max_frames=2) as c:
        sid = c.post("/api/sessions").json()["sessionId"]
        r = c.post("/api/upload", files={"file": ("Clip.MP4", video, "video/mp4")},
                   data={"sessionId": sid}, headers=UI)  # fmt: skip
        up = r.json()
        assert r.status_code == 200 and up["mediaType"] == "video", r.text
        # 9 candidates (one a second), 2 kept: seconds 0 and 8
        assert up["frames"] == ["frame_0001_0ms.png", "frame_0002_8000ms.png"]
        paths = [Path(p) for p in up["framePaths"]]
        assert [p.name for p in paths] == up["frames"]
        assert paths[0].parent.parent == Path(up["path"]).parent
        assert [frame_number(p.read_bytes()) for p in paths] == [0, 80]
        # A turn may name the frames (the UI does, with isVideo); a text-only model ignores
        # them and says so. The pending video counts once.
        msg = {"role": "user", "content": "What happens?", "imagePaths": up["framePaths"],
               "isVideo": True}  # fmt: skip
        r = c.post("/api/chat", json={"messages": [msg], "sessionId": sid, "maxTokens": 2})
        done = [line for line in r.text.splitlines() if '"done":true' in line]
        assert r.status_code == 200 and '"mediaIgnored":3' in done[0], r.text
        # An unreadable video is a 400 naming the file, and nothing of it is kept.
        before = sorted(p.name for p in (tmp_path / "u").iterdir())
        r = c.post("/api/upload", files={"file": ("bad.webm", b"not a video" * 50)}, headers=UI)
        assert r.status_code == 400 and "video cannot be used" in r.json()["error"], r.text
        assert sorted(p.name for p in (tmp_path / "u").iterdir()) == before


# -- in a chat turn ------------------------------------------------------------------------


def _frames(folder: Path, n: int) -> list[ImageInput]:
    return [ImageInput(path=str(folder / frame_name(i + 1, 1.5 * i))) for i in range(n)]


def _layout(parts: list[dict]) -> list[str]:
    return [p["text"] if p["type"] == "text" else Path(p["image"].path).name for p in parts]


def test_gemma4_frames_are_timed_and_cut_to_the_limit(tmp_path):
    """Gemma 4 gets transformers' video layout (`mm:ss ` before each frame, a space between
    frames); 8 frames over a limit of 4 keep [0, 2, 5, 7] (the reference's 1, 3, 6, 8)."""
    eight = _frames(tmp_path / ("frames_" + "a" * 32), 8)
    assert _layout(frame_parts(eight, 4, gemma4=True)) == [
        "00:00 ", "frame_0001_0ms.png", " 00:03 ", "frame_0003_3000ms.png",
        " 00:07 ", "frame_0006_7500ms.png", " 00:10 ", "frame_0008_10500ms.png",
    ]  # fmt: skip
    assert _layout(frame_parts(eight[:3], 4, gemma4=False)) == [
        "frame_0001_0ms.png", "frame_0002_1500ms.png", "frame_0003_3000ms.png",
    ]  # fmt: skip
    frames = [p["image"] for p in frame_parts(eight, 4, gemma4=True) if p["type"] == "image"]
    assert {f.max_tokens for f in frames} == {70}  # Gemma 4's video frames: at most 70
    plain = [p["image"] for p in frame_parts(eight, 4, gemma4=False)]
    assert {f.max_tokens for f in plain} == {None}
    late = [ImageInput(path=str(tmp_path / "frame_0001_754000ms.png"))]
    assert _layout(frame_parts(late, 4, gemma4=True))[0] == "12:34 "


@pytest.mark.parametrize(
    "width,height",
    [(64, 48), (1920, 1080), (1280, 720), (720, 1280), (100, 100), (3840, 2160), (2000, 10),
     (10, 2000), (480, 336)],
)  # fmt: skip
def test_gemma4_frames_are_sized_as_transformers_sizes_video(width, height):
    """A Gemma 4 video frame (at most 70 positions) takes the size transformers'
    Gemma4VideoProcessor gives it (its `get_aspect_ratio_preserving_size` with 70 soft
    tokens: 16 px patches, 3x3 pooling), for small, large, portrait and extreme frames."""
    # the video processor's own module needs torchvision; it sizes frames with this function
    # (the same in the PIL image processor's module) and its class defaults
    # max_soft_tokens=70, patch_size=16, pooling_kernel_size=3
    from transformers.models.gemma4.image_processing_pil_gemma4 import (
        get_aspect_ratio_preserving_size,
    )

    from serve.translation.video import GEMMA4_FRAME_TOKENS
    from tsjax.vision.config import VisionConfig
    from tsjax.vision.preprocess import budget_size, prepare_image

    assert GEMMA4_FRAME_TOKENS == 70
    cfg = VisionConfig(
        projector_type="gemma4v", image_size=224, patch_size=16, dim=8, ffn_dim=8,
        n_layers=1, n_heads=1, head_dim=8, norm_eps=1e-6, activation="gelu",
        image_mean=(0.0,) * 3, image_std=(1.0,) * 3, text_dim=8, merge=3,
        min_tokens=70, max_tokens=1120,
    )  # fmt: skip
    h, w = get_aspect_ratio_preserving_size(height, width, 16, 70 * 9, 3)
    assert budget_size(width, height, cfg, 70) == (w, h)
    image = Image.new("RGB", (width, height), (200, 10, 10))
    prepared = prepare_image(image, cfg, max_tokens=70)
    assert prepared.pixels.shape[:2] == (h, w) and prepared.tokens == (h // 48) * (w // 48)
    assert prepared.tokens <= 70


def test_chat_lays_out_stills_and_each_video(tmp_path):
    """A Web UI video message: still images first, then each video's frames (grouped by their
    frames directory), each video cut to the limit on its own; other models take every
    frame as an image, in order."""
    from serve.protocols.webui.chat import _image_parts, _Media

    still = ImageInput(path=str(tmp_path / ("c" * 32 + ".png")))
    one = _frames(tmp_path / ("frames_" + "a" * 32), 6)
    two = _frames(tmp_path / ("frames_" + "b" * 32), 2)
    images = [still, *one, *two]
    gemma4 = _layout(_image_parts(images, True, _Media(True, True, 4)))
    assert gemma4[0] == still.path.rsplit("/", 1)[1]
    assert gemma4[1:] == _layout(frame_parts(one, 4, gemma4=True) +
                                 frame_parts(two, 4, gemma4=True))  # fmt: skip
    assert len([n for n in gemma4 if n.endswith(".png")]) == 1 + 4 + 2
    other = _layout(_image_parts(images, True, _Media(True, False, 4)))
    assert other == [Path(i.path).name for i in images]
    assert _layout(_image_parts(images, False, _Media(True, True, 4))) == other
