"""A loaded audio encoder: the audio half of an mmproj file (Gemma 4's holds a vision and an
audio encoder), its params on device and its compiled program.

    enc = load_audio_encoder("mmproj-gemma-4-e2b-it-f16.gguf")   # None if it has no audio
    clip = enc.prepare(open("question.wav", "rb").read())         # PreparedAudio
    (emb,) = enc.embed([clip])                                    # [clip.tokens, text D]

`tsjax.vision.load_projector` loads it beside the vision encoder (`Projector.audio`). The
family comes from `clip.audio.projector_type` through `AUDIO_ENCODERS`; a family module
provides `config(g)`, `module(cfg, dtype)`, `tensors(g, cfg)` and `IGNORED_PREFIXES` (the
other modality's tensors), as a vision family does.

Each 30 s chunk of a clip runs on its own (llama.cpp's mtmd does the same), zero frames
after it up to a token bucket (`AUDIO_BUCKETS`, four frames a token): the encoder is causal
in time, so the padding changes none of the chunk's tokens, and at most one program per
bucket is compiled (all of them by `warmup`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tsjax.audio import gemma4a
from tsjax.audio.features import N_MELS
from tsjax.audio.waveform import AudioLimits, PreparedAudio, prepare_audio
from tsjax.gguf import GGUFError, GGUFFile
from tsjax.programs import compile_lowered

AUDIO_ENCODERS: dict[str, ModuleType] = {"gemma4a": gemma4a}
# tokens a chunk is padded to (x 4 frames); 750 is a whole 30 s chunk (2999 frames)
AUDIO_BUCKETS = (32, 64, 128, 256, 512, 750)


@dataclass
class AudioEncoder:
    path: Path
    config: gemma4a.AudioConfig
    params: dict
    module: nn.Module
    load_seconds: float = 0.0
    limits: AudioLimits = field(default_factory=AudioLimits)
    buckets: tuple[int, ...] = AUDIO_BUCKETS

    def __post_init__(self):
        self._traced = 0

        def forward(params, features):
            self._traced += 1  # once per input shape, when jit traces it
            return self.module.apply({"params": params}, features)

        self._forward = jax.jit(forward)

    def compiled_count(self) -> int:
        return self._traced

    def prepare(self, data: bytes) -> PreparedAudio:
        """Decode and featurize one clip (an audio file's bytes); `AudioError` if bad."""
        return prepare_audio(data, self.config.tokens, self.limits)

    def bucket(self, frames: int) -> int:
        """The token bucket a chunk of `frames` mel frames runs in."""
        tokens = self.config.tokens(frames)
        for b in self.buckets:
            if b >= tokens:
                return b
        raise ValueError(f"a chunk of {frames} frames is longer than the largest bucket")

    def embed_chunk(self, features: np.ndarray) -> np.ndarray:
        """One chunk's features [frames, 128] -> its embeddings [tokens, text D] (host)."""
        frames = len(features)
        b = self.bucket(frames)
        padded = np.zeros((1, 4 * b, N_MELS), np.float32)
        padded[0, :frames] = features
        out = self._forward(self.params, padded)
        return np.asarray(out[0, : self.config.tokens(frames)])

    def embed_features(self, chunks: Sequence[np.ndarray]) -> np.ndarray:
        """A clip's chunks' features -> the clip's embeddings [tokens, text D], the chunks'
        one after the other (one span in the prompt, as mtmd lays them out)."""
        return np.concatenate([self.embed_chunk(c) for c in chunks])

    def embed(self, clips: Sequence[PreparedAudio]) -> list[np.ndarray]:
        """Each clip's embeddings [clip.tokens, text D], each distinct clip encoded once."""
        done: dict[str, np.ndarray] = {}
        for clip in clips:
            if clip.digest not in done:
                done[clip.digest] = self.embed_features(clip.features)
        return [done[c.digest] for c in clips]

    def warmup(self, buckets: Sequence[int] | None = None, run: bool = False) -> float:
        """Compile the programs of `buckets` (default all) ahead of the first clip (`run`:
        also run each on zeros). Returns seconds."""
        t0 = time.perf_counter()
        for b in buckets or self.buckets:
            zeros = np.zeros((1, 4 * b, N_MELS), np.float32)
            spec = jax.ShapeDtypeStruct(zeros.shape, zeros.dtype)
            compile_lowered(self._forward.lower(self.params, spec))
            if run:
                jax.block_until_ready(self._forward(self.params, zeros))
        return time.perf_counter() - t0


def has_audio(g: GGUFFile) -> bool:
    """Whether an mmproj file carries an audio encoder."""
    return bool(g.meta("clip.has_audio_encoder", False)) and bool(
        g.meta("clip.audio.projector_type", None)
    )


def load_audio_encoder(
    g: GGUFFile | str | Path,
    *,
    dtype: jnp.dtype | None = None,
    device_put=None,
    limits: AudioLimits | None = None,
) -> AudioEncoder | None:
    """The audio encoder of an mmproj file (None if it has none); a GGUFError for an audio
    family this server does not run. dtype: the params' (float32 on CPU, else bfloat16)."""
    from tsjax.vision.projector import load_params

    t0 = time.perf_counter()
    g = g if isinstance(g, GGUFFile) else GGUFFile(g)
    if not has_audio(g):
        return None
    kind = str(g.meta("clip.audio.projector_type"))
    family = AUDIO_ENCODERS.get(kind)
    if family is None:
        raise GGUFError(
            f"{g.path.name}: audio projector type {kind!r} is not supported "
            f"(supported: {', '.join(sorted(AUDIO_ENCODERS))})"
        )
    cfg = family.config(g)
    if dtype is None:
        dtype = jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    module = family.module(cfg, dtype)
    zeros = jnp.zeros((1, 4 * AUDIO_BUCKETS[0], N_MELS), jnp.float32)
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), zeros))["params"]
    params = load_params(
        g, cfg, module, family.tensors(g, cfg), device_put, family.IGNORED_PREFIXES, shapes
    )
    return AudioEncoder(
        g.path, cfg, params, module, time.perf_counter() - t0, limits or AudioLimits()
    )
