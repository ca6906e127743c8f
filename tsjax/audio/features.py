"""Gemma 4's log-mel features of 16 kHz mono audio (transformers' `Gemma4AudioFeatureExtractor`,
llama.cpp's `mtmd_audio_preprocessor_gemma4a`), in NumPy.

- The samples are cut in chunks of 30 s (480 000 samples, ~750 tokens: the model's context,
  llama.cpp's split; transformers truncates there instead), each its own features.
- A chunk is padded with 160 zeros in front (semicausal: half a frame); frames of 320 samples
  (20 ms) every 160 (10 ms), as many as fit a 321-sample window: (n + 160 - 321) // 160 + 1.
- Each frame times a periodic Hann window of 320, zero-padded to 512 for the FFT; the
  magnitude (not the power) of its 257 bins through 128 triangular HTK-mel filters over
  0..8000 Hz without area normalisation; the natural log of (mel + 0.001), no normalisation.

The floor: transformers adds it (`np.log(mel_spec + self.mel_floor)`), llama.cpp 0.3.36 takes
`log(max(mel, 0.001))` (Gemma 3n's rule). They agree to within 0.001 / mel where the mel
energy is well above the floor (speech) and differ by up to ln 2 at the floor (silence); tsjax
follows transformers', the model's own definition.
"""

from __future__ import annotations

import numpy as np

SAMPLE_RATE = 16000
CHUNK_SAMPLES = 30 * SAMPLE_RATE
FRAME, HOP, N_FFT = 320, 160, 512
N_MELS, F_MIN, F_MAX = 128, 0.0, 8000.0
MEL_FLOOR = 1e-3


def frame_count(n_samples: int) -> int:
    """Mel frames of a chunk of n samples (0 if it is shorter than 161 samples)."""
    return max((n_samples + FRAME // 2 - (FRAME + 1)) // HOP + 1, 0)


def _hz_to_mel(f):
    return 2595.0 * np.log10(1.0 + np.asarray(f, np.float64) / 700.0)


def _mel_to_hz(m):
    return 700.0 * (10.0 ** (np.asarray(m, np.float64) / 2595.0) - 1.0)


def mel_filters(n_mels: int = N_MELS) -> np.ndarray:
    """[N_FFT // 2 + 1, n_mels] triangular HTK-mel filters over F_MIN..F_MAX, peak 1."""
    hz = _mel_to_hz(np.linspace(_hz_to_mel(F_MIN), _hz_to_mel(F_MAX), n_mels + 2))
    bins = np.arange(N_FFT // 2 + 1) * SAMPLE_RATE / N_FFT
    left, centre, right = hz[:-2], hz[1:-1], hz[2:]
    up = (bins[:, None] - left) / (centre - left)
    down = (right - bins[:, None]) / (right - centre)
    return np.maximum(0.0, np.minimum(up, down))


_WINDOW = np.zeros(N_FFT)
_WINDOW[:FRAME] = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(FRAME) / FRAME)  # periodic Hann
_FILTERS = mel_filters()


def log_mel(samples: np.ndarray, max_floor: bool = False) -> np.ndarray:
    """One chunk's features: samples [n] (float, 16 kHz mono) -> [frame_count(n), 128] float32.
    `max_floor`: llama.cpp's log(max(mel, floor)) instead of the model's log(mel + floor)."""
    x = np.asarray(samples, np.float64)
    n = frame_count(len(x))
    if n == 0:
        return np.zeros((0, N_MELS), np.float32)
    x = np.concatenate([np.zeros(FRAME // 2), x])
    starts = np.arange(n) * HOP
    frames = x[starts[:, None] + np.arange(FRAME)[None, :]]  # [n, 320]
    spectrum = np.abs(np.fft.rfft(frames * _WINDOW[:FRAME], n=N_FFT, axis=-1))
    mel = spectrum @ _FILTERS
    mel = np.maximum(mel, MEL_FLOOR) if max_floor else mel + MEL_FLOOR
    return np.log(mel).astype(np.float32)


def chunk_features(samples: np.ndarray) -> list[np.ndarray]:
    """The features of each 30 s chunk of a clip ([frames, 128] each; a last chunk too short
    for one frame is left out, as it makes no token)."""
    out = []
    for start in range(0, len(samples), CHUNK_SAMPLES):
        feats = log_mel(samples[start : start + CHUNK_SAMPLES])
        if len(feats):
            out.append(feats)
    return out
