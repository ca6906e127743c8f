"""Video uploads as frames: which frames a video is shown to a model as, and decoding them.

A video becomes at most `video_max_frames` still images (the reference server's rule, section
7.1 of its behaviour notes): candidate frames are taken at one per second (every round(fps)
frames), and of those at most `limit` are kept, evenly spaced (`even_indices`). Only the kept
frames are decoded: each is reached by seeking to the keyframe before it and decoding forward,
so the work is a few groups of pictures whatever the video's length, and every video's decode
is bounded in frames, pixels and seconds (`Budget`), on one thread, so an upload cannot pin a
core. Decoding is PyAV's (FFmpeg); anything it cannot read is a `VideoError`.
"""

from __future__ import annotations

import io
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path
from typing import Any

from serve.translation.intent import ImageInput, image_part

DEFAULT_MAX_FRAMES = 4
MAX_FRAME_PIXELS = 7680 * 4320  # 8K UHD: larger frames are refused before any decoding
# frames decoded per frame kept (the distance from the keyframe before it): 10 s at 60 fps,
# twice x264's default keyframe interval
FRAMES_PER_KEPT = 600
MAX_DECODE_SECONDS = 30.0  # wall time for one video's decoding
# positions a Gemma 4 video frame takes at most (transformers' Gemma4VideoProcessor
# `max_soft_tokens`; an image takes 70 to 1120)
GEMMA4_FRAME_TOKENS = 70


_FRAME_TIME = re.compile(r"^frame_\d{4}_(\d{1,12})ms\.png$")


class VideoError(ValueError):
    """The upload is not a video this server can read (or would take too long to)."""


def max_frames(value: object) -> int:
    """`video_max_frames` as the reference reads it: a positive integer, else the default."""
    try:
        n = int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return DEFAULT_MAX_FRAMES
    return n if n > 0 else DEFAULT_MAX_FRAMES


def even_indices(count: int, limit: int) -> list[int]:
    """Indices of at most `limit` of `count` items, evenly spaced, first and last kept:
    8 -> 4 gives [0, 2, 5, 7]; 3 -> 4 gives [0, 1, 2]; 9 -> 1 gives the middle, [4].
    Rounding is half-to-even, as the reference's (.NET `Math.Round`) and Python's are."""
    if count <= limit:
        return list(range(count))
    if limit == 1:
        return [count // 2]
    out: list[int] = []
    for i in range(limit):
        k = round(i * (count - 1) / (limit - 1))
        k = min(max(k, out[-1] + 1 if out else 0), count - 1)  # strictly increasing, in range
        out.append(k)
    return out


def candidate_frames(total: int, fps: float, limit: int) -> list[int]:
    """Which of a video's `total` frames it is shown as: one a second, then `limit` of
    those evenly spaced. Frame numbers, ascending."""
    step = max(1, round(fps))
    candidates = list(range(0, total, step))
    return [candidates[i] for i in even_indices(len(candidates), limit)]


@dataclass
class Budget:
    """Bounds on one video's decoding: frames decoded (`frames_per_kept` for each frame
    kept: the frames between a keyframe and a kept frame) and wall time."""

    frames_per_kept: int = FRAMES_PER_KEPT
    seconds: float = MAX_DECODE_SECONDS
    decoded: int = 0
    allowed: int = 0
    started: float = field(default_factory=time.monotonic)

    def spend(self) -> None:
        """One frame decoded."""
        self.decoded += 1
        if self.decoded > self.allowed:
            raise VideoError(f"reaching the sampled frames needs more than {self.allowed} "
                             "frames decoded (keyframes too far apart)")  # fmt: skip
        self.clock()

    def clock(self) -> None:
        if time.monotonic() - self.started > self.seconds:
            raise VideoError(f"decoding the video took longer than {self.seconds:g} s")


@dataclass(frozen=True)
class Frame:
    """A frame kept from a video: its number in the video, its time, its PNG bytes."""

    number: int
    seconds: float
    png: bytes


def extract_frames(path: Path, limit: int, budget: Budget | None = None) -> list[Frame]:
    """The frames a video is shown as (`candidate_frames`), decoded and encoded as PNG.
    Blocking (decoding): run it in a worker thread. Raises `VideoError` for a file that is
    not a readable video, has no video stream or no frames, or exceeds the bounds.

    Each kept frame is reached by a seek; a file that cannot seek (a raw stream, a WebM
    recorded without an index) is decoded from its start up to the last kept frame instead,
    within the same bounds."""
    import av

    budget = budget or Budget()
    try:
        with av.open(str(path), metadata_errors="ignore") as container:
            stream = _video_stream(container)
            fps = _fps(stream)
            total = _frame_count(container, stream, fps, budget)
        numbers = candidate_frames(total, fps, limit)
        budget.allowed = budget.frames_per_kept * len(numbers)
        with av.open(str(path), metadata_errors="ignore") as container:
            stream = _video_stream(container)
            try:
                frames = [_frame_at(container, stream, n, fps, budget) for n in numbers]
            except av.FFmpegError:  # no seeking in this file: one pass from the start
                frames = None
        if frames is None:
            with av.open(str(path), metadata_errors="ignore") as container:
                frames = _frames_in_order(container, _video_stream(container), numbers, budget)
    except av.FFmpegError as e:
        raise VideoError(f"the video cannot be read: {e}") from e
    kept: list[Frame] = []
    for frame in frames:
        # a count over-estimated by the container can land several numbers on the last
        # frame: keep it once
        if frame is not None and (not kept or frame.number > kept[-1].number):
            kept.append(frame)
    if not kept:
        raise VideoError("no frame of the video could be decoded")
    return kept


def _video_stream(container):
    """The first video stream, set to decode on one thread; checked for its frame size."""
    if not container.streams.video:
        raise VideoError("the file has no video stream")
    stream = container.streams.video[0]
    stream.thread_type, stream.codec_context.thread_count = "SLICE", 1  # one core
    w, h = stream.codec_context.width, stream.codec_context.height
    if w * h > MAX_FRAME_PIXELS:
        raise VideoError(f"the video's frames are {w}x{h}: larger than 8K UHD is refused")
    return stream


def frame_name(index: int, seconds: float) -> str:
    """The stored name of a video's `index`-th kept frame (from 1), which says its time in
    milliseconds (a model told when each frame was taken reads it back: `frame_seconds`)."""
    return f"frame_{index:04d}_{round(seconds * 1000)}ms.png"


def frame_seconds(path: str | Path) -> float | None:
    """When a stored frame was taken in its video, from its name; None for other files."""
    m = _FRAME_TIME.match(Path(path).name)
    return int(m.group(1)) / 1000 if m else None


def _fps(stream) -> float:
    """Frames a second: FFmpeg's guess (`av_guess_frame_rate`), else the average."""
    rate = stream.guessed_rate or stream.average_rate
    fps = float(rate) if rate else 0.0
    if not fps > 0:
        raise VideoError("the video has no frame rate")
    return fps


def _frame_count(container, stream, fps: float, budget: Budget) -> int:
    """Frames in the stream: the container's count, else its duration times the rate, else
    the packets counted (demuxing reads the file but decodes nothing; in the time budget)."""
    if stream.frames > 0:
        return int(stream.frames)
    if stream.duration and stream.time_base:
        return max(1, round(float(stream.duration * stream.time_base) * fps))
    if container.duration:
        return max(1, round(container.duration / 1_000_000 * fps))
    count = 0
    for packet in container.demux(stream):
        count += 1 if packet.size else 0
        if count % 256 == 0:
            budget.clock()
    if count <= 0:
        raise VideoError("the video has no frames")
    return count


def _frame_at(container, stream, number: int, fps: float, budget: Budget) -> Frame | None:
    """Frame `number` (at number/fps seconds from the stream's start): seek to the keyframe
    before it, decode forward to it. The last frame decoded when the stream ends first
    (a count over-estimated from the duration); None when nothing decodes."""
    base = stream.time_base or Fraction(1, 1_000_000)
    start = stream.start_time or 0
    target = number / fps
    container.seek(start + int(target / base), stream=stream, backward=True)
    last = None
    for frame in container.decode(stream):
        budget.spend()
        if frame.pts is None:
            raise VideoError("the video's frames carry no timestamps")
        last = frame
        # half a frame early counts: timestamps are rounded to the time base
        if float((frame.pts - start) * base) >= target - 0.5 / fps:
            break
    if last is None:
        return None
    seconds = max(0.0, float((last.pts - start) * base))
    return Frame(round(seconds * fps), seconds, _png(last))


def _frames_in_order(container, stream, numbers: list[int], budget: Budget) -> list[Frame]:
    """Frames `numbers` (ascending) by decoding from the start and counting, stopping at the
    last; the time budget bounds it (not the frame budget: every frame before the last kept
    one is decoded)."""
    budget.allowed = budget.decoded + numbers[-1] + 1
    wanted, out = set(numbers), []
    for i, frame in enumerate(container.decode(stream)):
        budget.spend()
        if i in wanted:
            out.append(Frame(i, i / _fps(stream), _png(frame)))
        if i >= numbers[-1]:
            break
    return out


def _png(frame) -> bytes:
    out = io.BytesIO()
    frame.to_image().save(out, format="PNG", compress_level=1)  # speed over a few bytes
    return out.getvalue()


def frame_parts(frames: Sequence[ImageInput], limit: int, *, gemma4: bool) -> list[dict[str, Any]]:
    """One video's frames as content parts (images), cut to `limit` evenly spaced when there
    are more. For Gemma 4, transformers' `Gemma4Processor` layout of a video (its chat
    template writes `<|video|>` where the video goes; the processor expands that to
    `mm:ss <|image>…<image|>` per frame, joined by spaces): each frame follows its time as
    `mm:ss ` (frames without a stored time, `frame_seconds`, get none), frames are separated
    by a space, and each takes at most `GEMMA4_FRAME_TOKENS` positions."""
    kept = [frames[i] for i in even_indices(len(frames), limit)]
    if not gemma4:
        return [image_part(f) for f in kept]
    parts: list[dict[str, Any]] = []
    for i, frame in enumerate(kept):
        frame = replace(frame, max_tokens=GEMMA4_FRAME_TOKENS)
        seconds = frame_seconds(frame.path or "")
        stamp = "" if seconds is None else f"{int(seconds // 60):02d}:{int(seconds % 60):02d} "
        if i or stamp:
            parts.append({"type": "text", "text": (" " if i else "") + stamp})
        parts.append(image_part(frame))
    return parts
