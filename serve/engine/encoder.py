"""The image encoder beside the engine: turns requests' prepared images (and audio clips, for
a projector with an audio encoder) into embeddings on a thread of its own, so neither the
event loop nor the engine's decode loop waits on it.

Requests hand in `PreparedImage`s (`tsjax.vision.Projector.prepare`, pixels and digest) and
await one embedding array [tokens, D] per image. Each distinct image (by digest) is encoded
once: within a request and across the requests waiting at the same time, whose images go
through the projector together, up to its largest image-count bucket (one image at a time on
CPU, where batching does not pay; `tsjax.vision.default_buckets`).

    encoder = ImageEncoder(model.projector); encoder.start()
    embeds = await encoder.embed([proj.prepare(data) for data in images])
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from tsjax.vision import PreparedImage, Projector

log = logging.getLogger("tsjax.encoder")


@dataclass
class EncoderStats:
    images: int = 0  # images and audio clips encoded (a repeat within a batch counts once)
    batches: int = 0
    seconds: float = 0.0  # time spent encoding


class ImageEncoder:
    def __init__(self, projector: Projector, max_batch: int | None = None):
        self.projector = projector
        self.max_batch = max_batch or max(projector.buckets)
        self.stats = EncoderStats()
        # (digest, pixels [H, W, 3] of an image, or a PreparedAudio clip)
        self._queue: deque[tuple[str, Any]] = deque()
        self._pending: dict[str, Future[np.ndarray]] = {}  # digest -> its embeddings
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._running = False
        self._closed = False  # stopped: no more images taken

    def start(self) -> None:
        if self._thread is None:
            self._running = True
            self._thread = threading.Thread(target=self._loop, name="tsjax-encoder", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        with self._cv:
            self._running, self._closed = False, True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=60)
            self._thread = None
        with self._cv:  # whatever was still waiting will not be encoded
            for _, fut in self._pending.items():
                fut.set_exception(RuntimeError("the image encoder stopped (server shutting down)"))
            self._pending.clear()
            self._queue.clear()

    def submit(self, images: Sequence[PreparedImage]) -> list[Future[np.ndarray]]:
        """One future per image; equal digests share one (encoded once). Images submitted
        before `start` wait for it."""
        out = []
        with self._cv:
            if self._closed:
                raise RuntimeError("the image encoder is stopped (server shutting down)")
            for img in images:
                fut = self._pending.get(img.digest)
                if fut is None:
                    fut = self._pending[img.digest] = Future()
                    clip = getattr(img, "features", None) is not None
                    self._queue.append((img.digest, img if clip else img.pixels))
                out.append(fut)
            self._cv.notify_all()
        return out

    async def embed(self, images: Sequence[PreparedImage]) -> list[np.ndarray]:
        """Each image's embeddings [image.tokens, D] (host arrays), in order."""
        futures = self.submit(images)
        return list(await asyncio.gather(*(asyncio.wrap_future(f) for f in futures)))

    def _loop(self) -> None:
        # the audio encoder's chunk buckets, smallest first, compiled here while no request
        # waits (a clip before its bucket compiled compiles it on the spot): start-up does not
        # wait for them (six programs, ~5 s each on a loaded 2-core CPU for the tiny model)
        audio = self.projector.audio
        warm = list(audio.buckets) if audio is not None else []
        while True:
            with self._cv:
                while self._running and not self._queue and not warm:
                    self._cv.wait(timeout=1.0)
                if not self._running:
                    return
                batch = [
                    self._queue.popleft() for _ in range(min(self.max_batch, len(self._queue)))
                ]
            if batch:
                self._encode(batch)
            elif warm:
                bucket = warm.pop(0)
                try:
                    secs = audio.warmup([bucket])  # type: ignore[union-attr]
                    log.debug("audio bucket %d compiled in %.1fs", bucket, secs)
                except Exception:
                    log.exception("compiling the audio encoder's bucket %d failed", bucket)

    def _encode(self, batch: list[tuple[str, Any]]) -> None:
        t0 = time.perf_counter()
        pictures = [i for i, (_, x) in enumerate(batch) if isinstance(x, np.ndarray)]
        clips = sorted(set(range(len(batch))) - set(pictures))
        results: list[np.ndarray | BaseException] = [RuntimeError("not encoded")] * len(batch)
        try:
            out = self.projector.embed_pixels([batch[i][1] for i in pictures])
            for i, r in zip(pictures, out, strict=True):
                results[i] = r
        except Exception as e:  # every image of the batch fails alike
            log.exception("image encoding failed")
            for i in pictures:
                results[i] = e
        for i in clips:  # each clip's 30 s chunks one after the other (tsjax.audio.encoder)
            try:
                assert self.projector.audio is not None
                results[i] = self.projector.audio.embed_features(batch[i][1].features)
            except Exception as e:
                log.exception("audio encoding failed")
                results[i] = e
        secs = time.perf_counter() - t0
        with self._cv:
            self.stats.images += len(batch)
            self.stats.batches += 1
            self.stats.seconds += secs
            for (digest, _), res in zip(batch, results, strict=True):
                fut = self._pending.pop(digest)
                if isinstance(res, BaseException):
                    fut.set_exception(res)
                else:
                    fut.set_result(res)
        log.debug("encoded %d image(s) in %.2fs", len(batch), secs)
