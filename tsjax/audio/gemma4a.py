"""Gemma 4's audio encoder (`clip.audio.projector_type = "gemma4a"`, the audio half of a Gemma
4 mmproj), as llama.cpp's `models/gemma4a.cpp` runs it (transformers: `Gemma4AudioModel` +
`Gemma4MultimodalEmbedder`): a USM-style conformer over 128-bin log-mel frames
(`tsjax.audio.features`), 4 frames (40 ms) a token.

- Subsampling: twice [a 3 x 3 convolution of stride 2 over (time, mel), padding 1, no bias;
  a LayerNorm over the channels (scale, no bias); ReLU], then the (mel, channel) features of
  each time step flattened (mel-major) and projected to the hidden width (`input_projection`).
- Conformer blocks: a half-step FFN (RMS norm, up, SiLU, down, RMS post-norm, x 0.5); local
  self-attention (below); a light convolution (RMS norm, pointwise to 2E, GLU, causal
  depthwise convolution of kernel K, RMS norm, SiLU, pointwise back); a second half-step
  FFN; an RMS norm of the block's output.
- Attention: each token sees itself and the 11 tokens before it (transformers' chunked
  attention with chunk 12, `attention_context_left` 13, no right context: its mask keeps
  distances 0..11, as llama.cpp's). q = Wq x / sqrt(d) / ln 2 * per_dim_scale (the file holds
  the softplus of transformers' parameter), k = Wk x * ln(1 + e) / ln 2; the score adds q .
  Wrel s(d), s(d) the sinusoidal embedding of the distance d ([sin, cos], timescales 1 ..
  1e4), then 50 tanh(score / 50). Computed here over each query's window of 12 keys (a
  gather): the same scores as the blocked form of both references, none outside the window.
- Output: `pre_encode.out` (a linear with bias, to the projection width), then the embedder:
  an RMS norm without a scale and `mm.a.input_projection` to the text width.
- Every linear but the relative-position one may clamp its input and output to scalar
  bounds from the file (`Gemma4ClippableLinear`); eps is 1e-6 everywhere (llama.cpp
  hard-codes it: the converter wrote a wrong `clip.audio.attention.layer_norm_epsilon`).
  transformers' `gradient_clipping` clamps (+-1e10) are left out, as in llama.cpp: no float32
  activation of a working model comes near them.

The encoder is causal in time after the subsampling (past-only attention and convolution), so
frames padded with zeros after a clip change none of its tokens: a clip runs padded to a
frame bucket (`tsjax.audio.encoder`).

Params: subsample/conv{0,1}/weight [C, C_in, 3, 3], subsample/norm{0,1}/scale [C],
input_projection/weight [E, mel/4 * C1]; layers/... stacked on [L] (ffn1, ffn2: norm, up,
down, post_norm; attn_norm, attn/{q,k,v,o,k_rel,per_dim_scale}, attn_post_norm; conv/{norm,
pw1, dw [L, E, K], conv_norm, pw2}; out_norm); output/{weight [P, E], bias [P]};
projection/weight [text D, P]. A clipped linear's bounds sit beside its `linear`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tsjax.gguf import GGUFError, GGUFFile
from tsjax.layers.linear import Linear
from tsjax.layers.norms import RMSNorm, layer_norm, rms_norm
from tsjax.vision.gemma4v import BOUNDS, ClippedLinear
from tsjax.vision.vit import TensorTable, scanned_layers

EPS = 1e-6  # llama.cpp's hard-coded value (see the module docstring)
# transformers' Gemma4AudioConfig defaults, hard-coded by llama.cpp (no GGUF key carries them)
CHUNK, CONTEXT_LEFT = 12, 13
WINDOW = CONTEXT_LEFT - 1  # keys a query sees: itself and the 11 before it
LOGIT_CAP = 50.0
RESIDUAL_WEIGHT = 0.5
SAMPLE_RATE, MEL_BINS = 16000, 128
# what wraps a clip's embeddings in the prompt (llama.cpp's mtmd `aud_beg` / `aud_end`)
AUDIO_BEGIN, AUDIO_END = "<|audio>", "<audio|>"
# the vision tensors of the same file: not this encoder's
IGNORED_PREFIXES = ("v.", "mm.input_projection.", "mm.soft_emb_norm.")
# GGUF per-layer linear -> its params path under layers (all clipped when the file clips)
LINEARS = {
    "ffn_up": ("ffn1", "up"),
    "ffn_down": ("ffn1", "down"),
    "ffn_up_1": ("ffn2", "up"),
    "ffn_down_1": ("ffn2", "down"),
    "attn_q": ("attn", "q"),
    "attn_k": ("attn", "k"),
    "attn_v": ("attn", "v"),
    "attn_out": ("attn", "o"),
    "conv_pw1": ("conv", "pw1"),
    "conv_pw2": ("conv", "pw2"),
}


@dataclass(frozen=True)
class AudioConfig:
    projector_type: str  # clip.audio.projector_type, the registry key
    dim: int  # E, the conformer's width
    ffn_dim: int
    n_layers: int
    n_heads: int
    head_dim: int
    channels: tuple[int, int]  # the two subsampling convolutions' output channels
    kernel: int  # the light convolution's depthwise kernel
    out_dim: int  # pre_encode.out's width (transformers' output_proj_dims)
    text_dim: int
    n_mels: int = MEL_BINS
    sample_rate: int = SAMPLE_RATE
    clipped: bool = False
    audio_begin: str = AUDIO_BEGIN
    audio_end: str = AUDIO_END
    bidirectional: bool = False  # a clip's tokens read causally in the text model (mtmd)

    @staticmethod
    def tokens(frames: int) -> int:
        """Tokens of `frames` mel frames: two stride-2 convolutions, (n - 1) // 2 + 1 each."""
        for _ in range(2):
            frames = (frames - 1) // 2 + 1
        return frames


def config(g: GGUFFile) -> AudioConfig:
    kind = g.meta("clip.audio.projector_type", None)
    for name in ("a.conv1d.0.weight", "a.conv1d.1.weight", "a.input_projection.weight",
                 "a.pre_encode.out.weight", "mm.a.input_projection.weight"):  # fmt: skip
        if not g.has_tensor(name):
            raise GGUFError(f"{g.path.name} has no tensor {name!r} (a gemma4a encoder needs it)")
    dim = int(g.meta("clip.audio.embedding_length"))
    n_heads = int(g.meta("clip.audio.attention.head_count"))
    if dim % n_heads:
        raise GGUFError(f"{g.path.name}: audio width {dim} is not a multiple of {n_heads} heads")
    n_mels = int(g.meta("clip.audio.num_mel_bins", MEL_BINS))
    if n_mels != MEL_BINS:
        raise GGUFError(f"{g.path.name}: {n_mels} mel bins, the gemma4a features have 128")
    c0 = int(g.info("a.conv1d.0.weight").shape[0])
    c1 = int(g.info("a.conv1d.1.weight").shape[0])
    text_dim, out_dim = g.info("mm.a.input_projection.weight").shape
    proj_in = int(g.info("a.input_projection.weight").shape[1])
    if proj_in != (n_mels // 4) * c1:
        raise GGUFError(
            f"{g.path.name}: a.input_projection.weight takes {proj_in} features, the"
            f" subsampling makes {n_mels // 4} x {c1}"
        )
    return AudioConfig(
        projector_type=str(kind),
        dim=dim,
        ffn_dim=int(g.meta("clip.audio.feed_forward_length", 4 * dim)),
        n_layers=int(g.meta("clip.audio.block_count")),
        n_heads=n_heads,
        head_dim=dim // n_heads,
        channels=(c0, c1),
        kernel=int(g.info("a.blk.0.conv_dw.weight").shape[-1]),
        out_dim=int(out_dim),
        text_dim=int(text_dim),
        n_mels=n_mels,
        clipped=g.has_tensor("a.blk.0.attn_q.input_min"),
    )


def relative_positions(dim: int) -> np.ndarray:
    """[WINDOW + 1, dim] sinusoidal embeddings of the distances WINDOW..0 ([sin, cos] halves,
    timescales 1..1e4: transformers' `Gemma4AudioRelPositionalEncoding`, llama.cpp's
    `pos_emb`): row p is the distance WINDOW - p."""
    half = dim // 2
    inv = np.exp(-np.arange(half) * math.log(1e4) / max(half - 1, 1))
    t = np.arange(WINDOW, -1, -1, dtype=np.float64)[:, None] * inv[None]
    return np.concatenate([np.sin(t), np.cos(t)], -1).astype(np.float32)


class AudioFFN(nn.Module):
    """x + 0.5 * post_norm(down(silu(up(norm(x))))). x: [B, T, E]."""

    cfg: AudioConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c, dt = self.cfg, self.dtype
        h = RMSNorm(EPS, dt, name="norm")(x)
        h = jax.nn.silu(ClippedLinear(c.ffn_dim, c.clipped, dt, name="up")(h))
        h = ClippedLinear(c.dim, c.clipped, dt, name="down")(h)
        return x + RESIDUAL_WEIGHT * RMSNorm(EPS, dt, name="post_norm")(h)


class AudioAttention(nn.Module):
    """Past-only local attention with relative positions (module docstring). x: [B, T, E]."""

    cfg: AudioConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c, dt = self.cfg, self.dtype
        b, t, _ = x.shape
        nh, hd = c.n_heads, c.head_dim

        def proj(name):
            return ClippedLinear(nh * hd, c.clipped, dt, name=name)(x).reshape(b, t, nh, hd)

        scale = self.param("per_dim_scale", nn.initializers.ones, (hd,), dt)
        q = proj("q").astype(jnp.float32) * (hd**-0.5 / math.log(2))
        q = q * scale.astype(jnp.float32)
        k = proj("k").astype(jnp.float32) * (math.log(1 + math.e) / math.log(2))
        v = proj("v").astype(jnp.float32)
        rel = Linear(nh * hd, False, dt, name="k_rel")(jnp.asarray(relative_positions(c.dim)))
        rel = rel.astype(jnp.float32).reshape(WINDOW + 1, nh, hd)
        # key j of query i's window: position i - (WINDOW - 1) + j, distance WINDOW - 1 - j,
        # whose relative embedding is row 1 + j (rows run from distance WINDOW down to 0)
        w = WINDOW
        idx = jnp.arange(t)[:, None] + jnp.arange(w)[None, :]  # [T, W] into the padded keys
        pad = ((0, 0), (w - 1, 0), (0, 0), (0, 0))
        kw, vw = jnp.pad(k, pad)[:, idx], jnp.pad(v, pad)[:, idx]  # [B, T, W, H, D]
        scores = jnp.einsum("bthd,btjhd->bthj", q, kw)
        scores = scores + jnp.einsum("bthd,jhd->bthj", q, rel[1:])
        scores = LOGIT_CAP * jnp.tanh(scores / LOGIT_CAP)
        before_start = idx < w - 1  # keys left of the clip (padding)
        scores = jnp.where(before_start[None, :, None, :], -1e9, scores)
        probs = jax.nn.softmax(scores, axis=-1)
        out = jnp.einsum("bthj,btjhd->bthd", probs, vw).reshape(b, t, nh * hd)
        return ClippedLinear(c.dim, c.clipped, dt, name="o")(out.astype(dt))


class AudioLightConv(nn.Module):
    """x + pw2(silu(conv_norm(causal depthwise conv(GLU(pw1(norm(x))))))). x: [B, T, E]."""

    cfg: AudioConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c, dt = self.cfg, self.dtype
        h = ClippedLinear(2 * c.dim, c.clipped, dt, name="pw1")(RMSNorm(EPS, dt, name="norm")(x))
        h = h[..., : c.dim] * jax.nn.sigmoid(h[..., c.dim :])
        kernel = self.param("dw", nn.initializers.normal(0.02), (c.dim, c.kernel), dt)
        t = h.shape[1]
        padded = jnp.pad(h, ((0, 0), (c.kernel - 1, 0), (0, 0)))
        h = sum(padded[:, j : j + t] * kernel[:, j] for j in range(c.kernel))
        h = jax.nn.silu(RMSNorm(EPS, dt, name="conv_norm")(h))
        return x + ClippedLinear(c.dim, c.clipped, dt, name="pw2")(h)


class ConformerBlock(nn.Module):
    cfg: AudioConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, _unused) -> tuple[jax.Array, None]:
        c, dt = self.cfg, self.dtype
        x = AudioFFN(c, dt, name="ffn1")(x)
        h = AudioAttention(c, dt, name="attn")(RMSNorm(EPS, dt, name="attn_norm")(x))
        x = x + RMSNorm(EPS, dt, name="attn_post_norm")(h)
        x = AudioLightConv(c, dt, name="conv")(x)
        x = AudioFFN(c, dt, name="ffn2")(x)
        return RMSNorm(EPS, dt, name="out_norm")(x), None


class Gemma4AudioEncoder(nn.Module):
    cfg: AudioConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, features: jax.Array) -> jax.Array:
        """features [B, F, 128] log-mel frames (zeros after a clip's end) -> [B, T, text D],
        T = `AudioConfig.tokens(F)`."""
        c, dt = self.cfg, self.dtype
        x = features.astype(dt)[..., None]  # [B, time, mel, 1]: NHWC, H = time
        for i, (cin, cout) in enumerate(zip((1, c.channels[0]), c.channels, strict=True)):
            w = self.param(f"conv{i}", nn.initializers.normal(0.02), (cout, cin, 3, 3), dt)
            x = jax.lax.conv_general_dilated(
                x, w, (2, 2), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "OIHW", "NHWC")
            )
            scale = self.param(f"norm{i}", nn.initializers.ones, (cout,), dt)
            x = jax.nn.relu(layer_norm(x, scale, jnp.zeros_like(scale), EPS))
        b, t, f, ch = x.shape
        x = Linear(c.dim, False, dt, name="input_projection")(x.reshape(b, t, f * ch))
        x, _ = scanned_layers(ConformerBlock, c, dt, in_axes=(nn.broadcast,))(x, None)
        x = Linear(c.out_dim, True, dt, name="output")(x)
        x = rms_norm(x, jnp.ones((c.out_dim,), jnp.float32), EPS)
        return Linear(c.text_dim, False, dt, name="projection")(x)


def module(cfg: AudioConfig, dtype: jnp.dtype) -> nn.Module:
    return Gemma4AudioEncoder(cfg, dtype)


def tensors(g: GGUFFile, cfg: AudioConfig) -> TensorTable:
    layer: TensorTable = {
        "ffn_norm.weight": (("ffn1", "norm", "scale"), None),
        "ffn_post_norm.weight": (("ffn1", "post_norm", "scale"), None),
        "ffn_norm_1.weight": (("ffn2", "norm", "scale"), None),
        "ffn_post_norm_1.weight": (("ffn2", "post_norm", "scale"), None),
        "attn_pre_norm.weight": (("attn_norm", "scale"), None),
        "attn_post_norm.weight": (("attn_post_norm", "scale"), None),
        "attn_k_rel.weight": (("attn", "k_rel", "weight"), None),
        "per_dim_scale.weight": (("attn", "per_dim_scale"), None),
        # crossed names: the converter writes transformers' lconv1d.pre_layer_norm (before
        # pw1) as `conv_norm` and its conv_norm (after the depthwise conv) as `norm_conv`;
        # llama.cpp loads them crossed back (clip.cpp, gemma4a)
        "conv_norm.weight": (("conv", "norm", "scale"), None),
        "conv_dw.weight": (("conv", "dw"), _depthwise),
        "norm_conv.weight": (("conv", "conv_norm", "scale"), None),
        "ln2.weight": (("out_norm", "scale"), None),
    }
    for name, path in LINEARS.items():
        layer[f"{name}.weight"] = ((*path, "linear", "weight"), None)
        if cfg.clipped:
            for bound in BOUNDS:
                layer[f"{name}.{bound}"] = ((*path, bound), _scalar)
    return {
        "a.conv1d.0.weight": (("conv0",), None),
        "a.conv1d.0.norm.weight": (("norm0",), None),
        "a.conv1d.1.weight": (("conv1",), None),
        "a.conv1d.1.norm.weight": (("norm1",), None),
        "a.input_projection.weight": (("input_projection", "weight"), None),
        **{f"a.blk.{{i}}.{k}": (("layers", *p), t) for k, (p, t) in layer.items()},
        "a.pre_encode.out.weight": (("output", "weight"), None),
        "a.pre_encode.out.bias": (("output", "bias"), None),
        "mm.a.input_projection.weight": (("projection", "weight"), None),
    }


def _scalar(w):
    return w.reshape(())


def _depthwise(w):
    """conv_dw as [E, K] (the converter squeezes transformers' [E, 1, K]; tolerate either)."""
    return w.reshape(w.shape[0], w.shape[-1])
