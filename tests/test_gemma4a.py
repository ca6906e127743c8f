"""Gemma 4's gemma4a audio encoder on the tiny random Gemma 4 E-model of `hf_factory` (one
mmproj with vision and audio; conformer of 2 blocks, width 32, 2 heads, subsampling channels
128 and 4, depthwise kernel 5, clipped linears): WAV decoding and resampling, the log-mel
features against transformers' `Gemma4AudioFeatureExtractor`, the embeddings against
transformers' `get_audio_features` (same features) and llama.cpp's mtmd (its own features and
30 s chunks), and a prompt's logits with a clip in it against transformers."""

from __future__ import annotations

import io
import wave

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err
from hf_factory import build
from hf_reference import hf_model
from vision_factory import MtmdCrashed, mtmd_audio_embeddings

from tsjax.audio import AudioError, decode_audio, prepare_audio
from tsjax.audio.features import frame_count, log_mel
from tsjax.audio.gemma4a import AudioConfig
from tsjax.vision import load_projector

pytestmark = pytest.mark.slow  # transformers + llama.cpp's converter build the model

RATE = 16000


def clip(seconds: float, seed: int = 0, silence: bool = False) -> np.ndarray:
    """A tone in noise (the mel energies well above the floor); `silence`: a quarter of a
    second of zeros in it (energies at the floor)."""
    n = int(seconds * RATE)
    t = np.arange(n) / RATE
    x = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.2 * np.random.default_rng(seed).standard_normal(n)
    if silence:
        x[5000:9000] = 0
    return x.astype(np.float32)


def wav_bytes(samples: np.ndarray, rate: int = RATE, channels: int = 1, width: int = 2) -> bytes:
    """PCM WAV of samples [n] in [-1, 1) (repeated on every channel)."""
    scaled = np.clip(samples, -1, 1 - 2.0 ** (1 - 8 * width)) * 2.0 ** (8 * width - 1)
    ints = np.repeat(np.round(scaled).astype(np.int64)[:, None], channels, axis=1).reshape(-1)
    if width == 1:
        raw = (ints + 128).astype(np.uint8).tobytes()
    else:
        raw = b"".join(int(v).to_bytes(width, "little", signed=True) for v in ints)
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(raw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def tiny():
    return build("gemma4_vision_audio")


@pytest.fixture(scope="module")
def enc(tiny):
    return load_projector(tiny.mmproj["f32"]).audio


def test_config_from_mmproj(enc):
    c = enc.config
    assert (c.projector_type, c.dim, c.ffn_dim, c.n_layers, c.n_heads, c.head_dim) == (
        "gemma4a", 32, 128, 2, 2, 16,
    )  # fmt: skip
    assert (c.channels, c.kernel, c.out_dim, c.text_dim, c.clipped) == ((128, 4), 5, 48, 64, True)
    assert (c.audio_begin, c.audio_end, c.bidirectional) == ("<|audio>", "<audio|>", False)
    # two stride-2 convolutions: 4 frames (40 ms) a token, rounded up
    assert [AudioConfig.tokens(f) for f in (1, 4, 5, 204, 2999)] == [1, 1, 2, 51, 750]
    assert frame_count(160) == 0 and frame_count(161) == 1 and frame_count(480000) == 2999


def test_wav_decoding():
    """8/16/24/32-bit PCM, stereo averaged, 8 kHz resampled to 16 kHz (the band kept); bad
    input is an AudioError naming the problem."""
    x = clip(0.5)[: RATE // 2] * 0.5
    for width in (1, 2, 3, 4):
        got, rate = decode_audio(wav_bytes(x, width=width))
        assert rate == RATE and got.shape == x.shape
        assert np.abs(got - x).max() <= 2.0 ** (1 - 8 * width), width
    got, _ = decode_audio(wav_bytes(x, channels=2))
    assert np.abs(got - x).max() < 1e-4
    tone = (0.5 * np.sin(2 * np.pi * 1000 * np.arange(8000) / 8000)).astype(np.float32)
    prepared = prepare_audio(wav_bytes(tone, rate=8000), AudioConfig.tokens)
    assert prepared.seconds == 1.0 and prepared.tokens == AudioConfig.tokens(frame_count(16000))
    resampled, _ = decode_audio(wav_bytes(tone, rate=8000))
    from tsjax.audio import resample

    up = resample(resampled, 8000)
    want = 0.5 * np.sin(2 * np.pi * 1000 * np.arange(16000) / 16000)
    assert up.shape == (16000,) and np.abs(up - want)[200:-200].max() < 2e-3
    # other containers through PyAV: lossless FLAC at 22.05 kHz, stereo, comes back equal
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="flac") as box:
        stream = box.add_stream("flac", rate=22050, layout="stereo")
        pcm = np.round(np.repeat(x[None], 2, 0) * 32767).astype(np.int16)
        frame = av.AudioFrame.from_ndarray(pcm.T.reshape(1, -1), format="s16", layout="stereo")
        frame.sample_rate = 22050
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            box.mux(packet)
    got, rate = decode_audio(buf.getvalue())
    assert rate == 22050 and got.shape == x.shape and np.abs(got - x).max() < 1e-4
    for bad, says in [(b"", "empty"), (wav_bytes(x[:100]), "too short"), (b"ID3junk", "decoded")]:
        with pytest.raises(AudioError, match=says):
            prepare_audio(bad, AudioConfig.tokens)
    with pytest.raises(AudioError):
        prepare_audio(b"RIFF\x00\x00\x00\x00WAVEjunk", AudioConfig.tokens)


def test_features_match_transformers():
    """Our log-mel frames against transformers' extractor on the same 16 kHz samples, a
    silent stretch included (its `log(mel + floor)`); the frame count is its mask's."""
    from transformers import Gemma4AudioFeatureExtractor

    x = clip(2.05, silence=True)
    out = Gemma4AudioFeatureExtractor()([x], return_tensors="np")
    ref, mask = out["input_features"][0], out["input_features_mask"][0]
    ours = log_mel(x)
    assert ours.shape == (int(mask.sum()), 128) == (frame_count(len(x)), 128)
    assert np.abs(ours - ref[: len(ours)]).max() < 1e-4


def test_embeddings_match_transformers(tiny, enc):
    """The encoder on our features against transformers' Gemma4AudioModel +
    Gemma4MultimodalEmbedder on the same features (7e-7 measured), the chunk padded to its
    bucket (51 tokens in 64: padding after a clip changes none of its tokens)."""
    import torch

    x = clip(2.05, silence=True)
    feats = log_mel(x)
    with torch.no_grad():
        out = hf_model(tiny).model.get_audio_features(
            torch.tensor(feats[None]), torch.ones((1, len(feats)), dtype=torch.bool)
        )
    ref = out.pooler_output.reshape(-1, 64).numpy()
    ours = enc.embed_features([feats])
    assert enc.bucket(len(feats)) == 64 and ours.shape == ref.shape == (51, 64)
    assert rel_err(ours, ref) < 1e-3, rel_err(ours, ref)


def _f16(x):
    return np.asarray(x, np.float16).astype(np.float32)


def test_embeddings_match_llama_cpp(tiny, enc, tmp_path):
    """llama.cpp's mtmd on the same samples, its own features, 30 s chunks and layout: a clip
    is <|audio>, every chunk's tokens, <audio|> (31.3 s: 750 + 33 tokens). Its features floor
    the mel energies with max(mel, 0.001) where the model adds 0.001, and ggml's CPU
    convolutions take float16 inputs and kernels: 1.3e-3 / 3.5e-3 from ours as is; with its
    floor and those roundings emulated, 1.4e-4 / 2.2e-4."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    clips = [clip(2.05), clip(31.3, seed=1)]
    try:
        refs = mtmd_audio_embeddings(
            tiny.mmproj["f32"], tiny.gguf["f32"], clips, tmp_path / "a.npz"
        )
    except MtmdCrashed as e:
        pytest.skip(f"llama-cpp-python crashed (built for another CPU?): {e}")
    begin, end = tiny.special_ids["<|audio>"], tiny.special_ids["<audio|>"]
    rounded = dict(enc.params, conv0=jnp.asarray(_f16(enc.params["conv0"])))
    rounded["conv1"] = jnp.asarray(_f16(enc.params["conv1"]))
    for x, (seq, ref), tokens in zip(clips, refs, (51, 783), strict=True):
        prepared = prepare_audio(wav_bytes(x), AudioConfig.tokens)
        assert prepared.tokens == tokens and seq == [begin] + [-1] * tokens + [end]
        ours = enc.embed_features([log_mel(x[i : i + 480000]) for i in range(0, len(x), 480000)])
        assert ours.shape == ref.shape == (tokens, 64)
        assert rel_err(ours, ref) < 5e-3, rel_err(ours, ref)
        emulated = []
        for i in range(0, len(x), 480000):
            f = _f16(log_mel(x[i : i + 480000], max_floor=True))
            b = enc.bucket(len(f))
            padded = np.zeros((1, 4 * b, 128), np.float32)
            padded[0, : len(f)] = f
            out = np.asarray(enc._forward(rounded, padded))[0, : AudioConfig.tokens(len(f))]
            emulated.append(out)
        assert rel_err(np.concatenate(emulated), ref) < 1e-3


@pytest.fixture(scope="module")
def model(tiny):
    from tsjax.model import load

    return load(
        tiny.gguf["f32"], mmproj=tiny.mmproj["f32"].name, max_len=256, rows=1, progress=False,
        quant="f32",
    )  # fmt: skip


def _audio_chat(*parts) -> list[dict]:
    """One user message of text and audio parts ("<audio>" marks an audio part)."""
    content = [{"type": "audio"} if p == "<audio>" else {"type": "text", "text": p} for p in parts]
    return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": content}]


def test_logits_match_transformers(tiny, model):
    """A clip inside the text: the layout (<|audio>, 51 embedded positions, <audio|>) and
    every position's logits against transformers fed the same features (its audio soft
    tokens in the clip's place, causal, per-layer inputs of the pad token as for images)."""
    import torch
    from hf_reference import hf_multimodal_logits
    from test_multimodal import _forward

    x = clip(2.05, silence=True)
    prompt = model.chat_prompt(_audio_chat("transcribe", "<audio>", "please"), audio=[wav_bytes(x)])
    (span,) = prompt.spans
    assert span.length == 51 and not span.bidirectional
    assert prompt.ids[span.start - 1] == tiny.special_ids["<|audio>"]
    assert prompt.ids[span.end] == tiny.special_ids["<audio|>"]
    ids = list(prompt.ids)
    ids[span.start : span.end] = [tiny.special_ids["<|audio|>"]] * span.length
    feats = log_mel(np.asarray(decode_audio(wav_bytes(x))[0]))
    inputs = {
        "input_features": torch.tensor(feats[None]),
        "input_features_mask": torch.ones((1, len(feats)), dtype=torch.bool),
    }
    ref = hf_multimodal_logits(tiny, ids, inputs)
    ours = _forward(model, prompt)
    assert rel_err(ours, ref) < 1e-3, rel_err(ours, ref)
