"""Time a video upload's frame extraction (serve/translation/video.py) against decoding
the whole video.

Writes a synthetic H.264 MP4 (moving noise, so the encoder cannot skip frames; libx264's
default keyframe interval, 250 frames) into a temporary directory, then times, alternating
A and B `--repeats` times: `extract_frames` (seeks to each kept frame) and a plain decode of
every frame (what extraction without seeking would cost), and reports the frames each decoded.

    python -m benchmarks.video_frames                       # 60 s of 1280x720 at 30 fps
    python -m benchmarks.video_frames --seconds 20 --size 640x360 --keep 8
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import av
import numpy as np

from serve.translation.video import Budget, extract_frames


def write(path: Path, seconds: int, fps: int, width: int, height: int) -> None:
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (height + 64, width + 64, 3), dtype=np.uint8)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps, options={"preset": "ultrafast"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(seconds * fps):
            dx, dy = i % 64, (i // 64) % 64  # the picture moves: every frame differs
            frame = av.VideoFrame.from_ndarray(noise[dy : dy + height, dx : dx + width])
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def decode_all(path: Path) -> int:
    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        stream.codec_context.thread_count = 1  # as extraction decodes: one core
        return sum(1 for _ in c.decode(stream))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=int, default=60)
    ap.add_argument("--fps", type=int, default=30)
    ap.add_argument("--size", default="1280x720")
    ap.add_argument("--keep", type=int, default=4, help="video_max_frames")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    width, height = map(int, args.size.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        video = Path(tmp) / "clip.mp4"
        t = time.perf_counter()
        write(video, args.seconds, args.fps, width, height)
        took, mb = time.perf_counter() - t, video.stat().st_size / 1e6
        print(
            f"wrote {args.seconds} s of {args.size} at {args.fps} fps ({mb:.1f} MB), {took:.1f} s"
        )
        seek, full = [], []
        for _ in range(args.repeats):
            budget = Budget()
            t = time.perf_counter()
            frames = extract_frames(video, args.keep, budget)
            seek.append(time.perf_counter() - t)
            t = time.perf_counter()
            total = decode_all(video)
            full.append(time.perf_counter() - t)
        print(f"extract_frames: {statistics.median(seek):.3f} s median of {args.repeats}, "
              f"{budget.decoded} frames decoded for {len(frames)} kept "
              f"(seconds {[round(f.seconds, 2) for f in frames]})")  # fmt: skip
        print(f"decode every frame: {statistics.median(full):.3f} s median, {total} frames")


if __name__ == "__main__":
    main()
