"""Audio files in: decoded to 16 kHz mono float samples, and prepared for an audio encoder.

- WAV with integer PCM samples (8-bit unsigned, 16/24/32-bit signed) is read with the
  standard library's `wave`. Other containers and codecs (MP3, FLAC, Ogg, float WAV) are
  decoded with PyAV (FFmpeg) to float samples. Samples are scaled to [-1, 1).
- Several channels are averaged into one (as llama.cpp's miniaudio decoder mixes down).
- Another sample rate is resampled to 16 kHz with `scipy.signal.resample_poly`: polyphase
  FIR filtering at the reduced ratio (Kaiser window, beta 5), which keeps the band below 8 kHz
  and removes what would alias. (llama.cpp resamples with miniaudio's linear resampler;
  transformers expects 16 kHz input and leaves resampling to the caller.)

`prepare_audio(data, cfg)` -> `PreparedAudio`: the 30 s chunks' log-mel features
(`tsjax.audio.features`), the digest of the samples (the prefix cache's identity for the
clip's positions) and the prompt positions its embeddings fill.
"""

from __future__ import annotations

import hashlib
import io
import wave
from collections.abc import Callable
from dataclasses import dataclass
from math import gcd

import numpy as np

from tsjax.audio.features import SAMPLE_RATE, chunk_features, frame_count


class AudioError(ValueError):
    """Audio that cannot be used: not decodable, empty, too short or too long."""


@dataclass(frozen=True)
class AudioLimits:
    max_seconds: float = 600.0  # 20 chunks of 30 s: 15 000 tokens of a Gemma 4 encoder


@dataclass(frozen=True)
class PreparedAudio:
    """features: each 30 s chunk's log-mel frames [frames, 128] float32. digest: sha256 of
    the 16 kHz samples (what the encoder sees). seconds: the clip's duration. tokens: the
    prompt positions its embeddings fill (every chunk's tokens together)."""

    features: tuple[np.ndarray, ...]
    digest: str
    seconds: float
    tokens: int


def decode_audio(data: bytes) -> tuple[np.ndarray, int]:
    """An audio file's bytes -> (samples [n] float32 mono in [-1, 1), sample rate)."""
    if not data:
        raise AudioError("the audio is empty (0 bytes)")
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        try:
            return _read_wav(data)
        except (wave.Error, EOFError) as e:
            if "unknown format" not in str(e):
                raise AudioError(f"the WAV file cannot be read: {e}") from None
    return _read_with_av(data)


def _read_wav(data: bytes) -> tuple[np.ndarray, int]:
    with wave.open(io.BytesIO(data)) as w:
        channels, width, rate = w.getnchannels(), w.getsampwidth(), w.getframerate()
        raw = w.readframes(w.getnframes())
    if width == 1:
        x = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128) / 128
    elif width in (2, 4):
        x = np.frombuffer(raw, f"<i{width}").astype(np.float32) / 2.0 ** (8 * width - 1)
    elif width == 3:
        b = np.frombuffer(raw[: len(raw) // 3 * 3], np.uint8).reshape(-1, 3).astype(np.int32)
        x = ((b[:, 0] | b[:, 1] << 8 | b[:, 2] << 16) << 8 >> 8).astype(np.float32) / 2.0**23
    else:
        raise AudioError(f"WAV samples of {width} bytes are not supported")
    n = len(x) // channels
    return x[: n * channels].reshape(n, channels).mean(axis=1), rate


def _read_with_av(data: bytes) -> tuple[np.ndarray, int]:
    import av  # FFmpeg (a dependency for video uploads too); imported when needed: ~0.1 s

    try:
        with av.open(io.BytesIO(data)) as box:
            stream = next((s for s in box.streams if s.type == "audio"), None)
            if stream is None:
                raise AudioError("the file holds no audio stream")
            # packed float, every channel kept: FFmpeg's own mixdown would scale a stereo
            # clip's level by sqrt(2); the channels are averaged here, as for WAV
            resampler = av.AudioResampler(format="flt")
            pieces = []
            rate = stream.codec_context.sample_rate or SAMPLE_RATE
            frames = list(box.decode(stream))
            for out in [r for f in frames for r in resampler.resample(f)] + list(
                resampler.resample(None)
            ):
                channels = len(out.layout.channels)
                pieces.append(out.to_ndarray().reshape(-1, channels).mean(axis=1))
                rate = out.sample_rate
    except AudioError:
        raise
    except Exception as e:  # PyAV raises its own errors for anything it cannot demux or decode
        raise AudioError(f"the audio cannot be decoded: {e}") from None
    samples = np.concatenate(pieces) if pieces else np.zeros(0, np.float32)
    return samples.astype(np.float32), int(rate)


def resample(samples: np.ndarray, rate: int, target: int = SAMPLE_RATE) -> np.ndarray:
    """samples [n] at `rate` Hz -> [ceil(n * target / rate)] at `target` Hz (polyphase FIR)."""
    if rate == target:
        return np.asarray(samples, np.float32)
    if rate <= 0:
        raise AudioError(f"the audio's sample rate {rate} Hz is not valid")
    from scipy.signal import resample_poly

    g = gcd(int(rate), int(target))
    return resample_poly(samples, target // g, int(rate) // g).astype(np.float32)


def prepare_audio(
    data: bytes, tokens_of: Callable[[int], int], limits: AudioLimits | None = None
) -> PreparedAudio:
    """Decode, resample and featurize one clip; an `AudioError` names what is wrong.
    `tokens_of(frames)`: the encoder's tokens for a chunk of that many frames."""
    limits = limits or AudioLimits()
    samples, rate = decode_audio(data)
    seconds = len(samples) / rate if rate > 0 else 0.0
    if seconds > limits.max_seconds:
        raise AudioError(
            f"the audio is {seconds:.1f} s long, more than the {limits.max_seconds:.0f} s this"
            " server takes"
        )
    samples = resample(samples, rate)
    if frame_count(len(samples)) == 0:
        raise AudioError(f"the audio is too short ({seconds * 1000:.1f} ms; 11 ms at least)")
    if not np.all(np.isfinite(samples)):
        raise AudioError("the audio has samples that are not finite numbers")
    chunks = tuple(chunk_features(samples))
    digest = hashlib.sha256(b"audio16k:" + samples.astype("<f4").tobytes()).hexdigest()
    tokens = sum(tokens_of(len(c)) for c in chunks)
    return PreparedAudio(chunks, digest, seconds, tokens)
