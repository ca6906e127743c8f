"""Gemma 4's vision projector (`clip.vision.projector_type = "gemma4v"`), as llama.cpp's
`models/gemma4v.cpp` runs it (transformers: `Gemma4VisionModel` + `Gemma4MultimodalEmbedder`).
Gemma 4's mmproj files carry an audio encoder beside it (`clip.audio.projector_type =
"gemma4a"`): only the vision half is read here, and the audio tensors are left alone.

- Dynamic resolution: an image keeps its aspect ratio, resized (bicubic, letterboxed on black)
  so that it has 70 to 1120 tokens, each side a multiple of 16 x 3 = 48 pixels
  (`tsjax.vision.preprocess.fit_size`, llama.cpp's dyn_size preprocessor and limits), encoded
  per token bucket (`tsjax.vision.dynamic`). Pixels are x / 255 (the files' mean 0, std 1);
  the tower maps them to 2x - 1 itself.
- Tower: a patch convolution without bias, then a learned position embedding per axis (table 0
  by the patch's column, table 1 by its row); pre-norm blocks of RMS norms with post-norms
  after attention and MLP (Gemma's sandwich); attention with per-head RMS norms on q and k
  (learned scale) and v (none), scale 1, and a 2-D NEOX RoPE (theta 100): the first half of
  each head turns with the column, the second with the row, each half with its own
  rotate-half pairing; a gated MLP (GELU, tanh form). Every linear may clamp its input and
  output to scalar bounds from the file (`Gemma4ClippableLinear`).
- Pooler: each 3 x 3 block of patches averaged (row-major blocks), times sqrt(D), then
  standardised ((x - std_bias) * std_scale) where the file has them.
- Embedder: RMS norm without a scale, then `mm.input_projection` to the text width.
- Layout in the prompt: `<|image>` + the tokens + `<image|>` (llama.cpp's mtmd; the chat
  template's `<|image|>` placeholder is where the span goes). The text model takes the
  embeddings as they are (not scaled by sqrt(D)); their per-layer inputs (E models) are
  token 0's row of the per-layer table plus the projection of the image embedding, as
  llama.cpp (`inp_per_layer_multimodal`: row 0) and transformers (the pad token, id 0); the
  span is bidirectional on the sliding layers except for E2B/E4B (`CAUSAL_TEXT_DIMS`).

The activation: transformers' `hidden_activation` is "gelu_pytorch_tanh" and the files carry
no `clip.use_gelu`, so llama.cpp (0.3.36) falls back to its default quick GELU for this tower;
tsjax follows the model's definition, as for Pixtral's erf GELU (the llama.cpp test compares
with `clip.use_gelu` set in a copy of the file, which makes llama.cpp run the tanh form).

Params: tower/{patch_embed/weight [D, 3*P*P], position_embedding [2, T, D]},
tower/layers/{ln1,ln2,attn_post_norm,ffn_post_norm}/scale [L, D],
tower/layers/attn/{q_norm,k_norm}/scale [L, H], tower/layers/attn/{q,k,v,o}/weight [L, D, D],
tower/layers/mlp/{gate,up}/weight [L, F, D], .../down/weight [L, D, F], each linear's
{input,output}_{min,max} [L] when clipped; std_bias/std_scale [D]; input_projection/weight
[text D, D].
"""

from __future__ import annotations

from dataclasses import dataclass

import flax.linen as nn
import jax
import jax.numpy as jnp

from tsjax.gguf import GGUFError, GGUFFile
from tsjax.layers.linear import Linear
from tsjax.layers.mlp import ACTIVATIONS
from tsjax.layers.norms import RMSNorm, rms_norm
from tsjax.layers.rope import rope_frequencies
from tsjax.vision.config import ResizeSpec, VisionConfig, base_vision_kwargs
from tsjax.vision.vit import TensorTable, _flatten_patch, full_attention, scanned_layers

TOWER = "tower"
# the audio encoder's tensors in the same file (gemma4a): not this projector's
IGNORED_PREFIXES = ("a.", "mm.a.")
# llama.cpp's `set_limit_image_tokens(70, 1120)` for gemma4v (its --image-min/max-tokens
# options aside), its hard-coded RoPE base and pooling kernel (`clip.vision.projector.
# scale_factor` overrides the kernel, as there).
MIN_TOKENS, MAX_TOKENS = 70, 1120
ROPE_THETA = 100.0
POOLING = 3
# llama.cpp's `mtmd_decode_use_non_causal`: E2B (D 1536) and E4B (D 2560) read images
# causally; every other Gemma 4 lets an image's tokens see each other (on the sliding layers:
# `tsjax.models.gemma4`), as transformers' `use_bidirectional_attention = "vision"` of those
# checkpoints. The files carry no key for it, so the text width decides, as there.
CAUSAL_TEXT_DIMS = (1536, 2560)
BOUNDS = ("input_min", "input_max", "output_min", "output_max")
# GGUF per-layer linear -> its params path under tower/layers
LINEARS = {
    "attn_q": ("attn", "q"),
    "attn_k": ("attn", "k"),
    "attn_v": ("attn", "v"),
    "attn_out": ("attn", "o"),
    "ffn_gate": ("mlp", "gate"),
    "ffn_up": ("mlp", "up"),
    "ffn_down": ("mlp", "down"),
}

_L = ("layers",)
_LINEAR_AXES = {
    "q": ("vision_heads", "vision_embed"),
    "k": ("vision_heads", "vision_embed"),
    "v": ("vision_heads", "vision_embed"),
    "o": ("vision_embed", "vision_heads"),
    "gate": ("vision_ffw", "vision_embed"),
    "up": ("vision_ffw", "vision_embed"),
    "down": ("vision_embed", "vision_ffw"),
}
PARAM_AXES: dict[tuple[str, ...], tuple[str | None, ...]] = {
    (TOWER, "patch_embed", "weight"): ("vision_embed", "vision_patch"),
    (TOWER, "position_embedding"): (None, None, "vision_embed"),
    **{(TOWER, "layers", n, "scale"): (*_L, "vision_embed") for n in ("ln1", "ln2")},
    (TOWER, "layers", "attn_post_norm", "scale"): (*_L, "vision_embed"),
    (TOWER, "layers", "ffn_post_norm", "scale"): (*_L, "vision_embed"),
    (TOWER, "layers", "attn", "q_norm", "scale"): (*_L, None),
    (TOWER, "layers", "attn", "k_norm", "scale"): (*_L, None),
    **{
        (TOWER, "layers", *p, "linear", "weight"): (*_L, *_LINEAR_AXES[p[1]])
        for p in LINEARS.values()
    },
    **{(TOWER, "layers", *p, b): _L for p in LINEARS.values() for b in BOUNDS},
    ("std_bias",): ("vision_embed",),
    ("std_scale",): ("vision_embed",),
    ("input_projection", "weight"): ("embed", "vision_embed"),
}


@dataclass(frozen=True)
class Gemma4VisionConfig(VisionConfig):
    rope_theta: float = ROPE_THETA
    position_size: int = 0  # rows of each position table (patches per side at most)
    clipped: bool = False  # linears clamp their inputs and outputs (Gemma4ClippableLinear)
    standardize: bool = False  # v.std_bias / v.std_scale after the pooler


def config(g: GGUFFile) -> Gemma4VisionConfig:
    kw = base_vision_kwargs(g)
    for name in ("v.patch_embd.weight", "v.position_embd.weight", "mm.input_projection.weight"):
        if not g.has_tensor(name):
            raise GGUFError(f"{g.path.name} has no tensor {name!r} (a gemma4v projector needs it)")
    text_dim, d_in = g.info("mm.input_projection.weight").shape  # numpy order: [text D, D]
    if d_in != kw["dim"]:
        raise GGUFError(
            f"{g.path.name}: mm.input_projection.weight takes {d_in} features, the tower"
            f" makes {kw['dim']}"
        )
    tables, size, width = g.info("v.position_embd.weight").shape
    if tables != 2 or width != kw["dim"]:
        raise GGUFError(
            f"{g.path.name}: v.position_embd.weight is {[tables, size, width]}, expected"
            f" [2, n, {kw['dim']}] (one table per axis)"
        )
    std = [g.has_tensor(f"v.std_{n}") for n in ("bias", "scale")]
    if std[0] != std[1]:
        raise GGUFError(f"{g.path.name}: v.std_bias and v.std_scale come together")
    merge = int(g.meta("clip.vision.projector.scale_factor", POOLING))
    kw["activation"] = "gelu_tanh"  # the model's (see the module docstring)
    return Gemma4VisionConfig(
        **kw,
        text_dim=int(text_dim),
        merge=merge,
        resize=ResizeSpec("bicubic", "ceil", (0, 0, 0)),
        image_begin="<|image>",
        image_end="<image|>",
        bidirectional=int(text_dim) not in CAUSAL_TEXT_DIMS,
        min_tokens=MIN_TOKENS,
        max_tokens=MAX_TOKENS,
        position_size=int(size),
        clipped=g.has_tensor("v.blk.0.attn_q.input_min"),
        standardize=std[0],
    )


class ClippedLinear(nn.Module):
    """y = clamp(clamp(x, in_min, in_max) @ W^T, out_min, out_max) (bounds: scalars from the
    file; without them a plain linear). x: [..., in] -> [..., features]."""

    features: int
    clipped: bool
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if not self.clipped:
            return Linear(self.features, False, self.dtype, name="linear")(x)
        lo, hi, out_lo, out_hi = (
            self.param(b, nn.initializers.zeros, (), jnp.float32).astype(x.dtype) for b in BOUNDS
        )
        y = Linear(self.features, False, self.dtype, name="linear")(jnp.clip(x, lo, hi))
        return jnp.clip(y, out_lo, out_hi)


def rope_2d(pos: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """(cos, sin) [B, N, 1, H/4] per half-head of patches at pos [B, N, 2] (row, col): each
    half of a head (H/2 dims) rotates NEOX-style with frequencies theta^(-4j/H), the first
    half by the column, the second by the row. Returns the tables of both: [2, B, N, 1, H/4]."""
    inv = jnp.asarray(rope_frequencies(theta, head_dim // 2))
    cols = pos[..., 1:].astype(jnp.float32) * inv
    rows = pos[..., :1].astype(jnp.float32) * inv
    angles = jnp.stack([cols, rows])[:, :, :, None, :]
    return jnp.cos(angles), jnp.sin(angles)


def _rotate_halves(x: jax.Array, tables) -> jax.Array:
    """x [B, N, heads, H]: each half of each head rotated by its own table (NEOX pairing)."""
    cos, sin = tables
    xf = x.astype(jnp.float32)
    h = x.shape[-1] // 2
    out = []
    for i, part in enumerate((xf[..., :h], xf[..., h:])):
        a, b = part[..., : h // 2], part[..., h // 2 :]
        out += [a * cos[i] - b * sin[i], b * cos[i] + a * sin[i]]
    return jnp.concatenate(out, axis=-1).astype(x.dtype)


class Gemma4VisionAttention(nn.Module):
    cfg: Gemma4VisionConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, tables, valid) -> jax.Array:
        c = self.cfg
        b, n, d = x.shape
        nh, hd = c.n_heads, c.head_dim

        def proj(name):
            y = ClippedLinear(nh * hd, c.clipped, self.dtype, name=name)(x)
            return y.reshape(b, n, nh, hd)

        q = RMSNorm(c.norm_eps, self.dtype, name="q_norm")(proj("q"))
        k = RMSNorm(c.norm_eps, self.dtype, name="k_norm")(proj("k"))
        v = rms_norm(proj("v"), jnp.ones((hd,), jnp.float32), c.norm_eps)
        q, k = _rotate_halves(q, tables), _rotate_halves(k, tables)
        out = full_attention(q, k, v, 1.0, valid)
        return ClippedLinear(d, c.clipped, self.dtype, name="o")(out.reshape(b, n, nh * hd))


class Gemma4VisionMLP(nn.Module):
    cfg: Gemma4VisionConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x) -> jax.Array:
        c = self.cfg
        gate = ClippedLinear(c.ffn_dim, c.clipped, self.dtype, name="gate")(x)
        up = ClippedLinear(c.ffn_dim, c.clipped, self.dtype, name="up")(x)
        return ClippedLinear(c.dim, c.clipped, self.dtype, name="down")(
            ACTIVATIONS[c.activation](gate) * up
        )


class Gemma4VisionLayer(nn.Module):
    cfg: Gemma4VisionConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, tables, valid) -> tuple[jax.Array, None]:
        c, dt = self.cfg, self.dtype
        h = RMSNorm(c.norm_eps, dt, name="ln1")(x)
        h = Gemma4VisionAttention(c, dt, name="attn")(h, tables, valid)
        x = x + RMSNorm(c.norm_eps, dt, name="attn_post_norm")(h)
        h = Gemma4VisionMLP(c, dt, name="mlp")(RMSNorm(c.norm_eps, dt, name="ln2")(x))
        return x + RMSNorm(c.norm_eps, dt, name="ffn_post_norm")(h), None


class Gemma4VisionTower(nn.Module):
    cfg: Gemma4VisionConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, patches, pos, valid) -> jax.Array:
        """patches [B, N, 3*P*P] (values in [0, 1]), pos [B, N, 2] (row, col), valid [B, N]
        -> [B, N, D]."""
        c = self.cfg
        x = patches.astype(self.dtype) * 2 - 1
        x = Linear(c.dim, False, self.dtype, name="patch_embed")(x)
        table = self.param(
            "position_embedding",
            nn.initializers.normal(0.02),
            (2, c.position_size, c.dim),
            self.dtype,
        )
        x = x + table[0][pos[..., 1]] + table[1][pos[..., 0]]
        tables = rope_2d(pos, c.head_dim, c.rope_theta)
        x, _ = scanned_layers(Gemma4VisionLayer, c, self.dtype)(x, tables, valid)
        return x


class Gemma4VisionProjector(nn.Module):
    cfg: Gemma4VisionConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, patches, pos, valid) -> jax.Array:
        """The packed inputs of `tsjax.vision.dynamic.pack` (N = T * merge^2 patches, each
        merge x merge block contiguous) -> [B, T, text D], tokens in row-major order."""
        c = self.cfg
        x = Gemma4VisionTower(c, self.dtype, name=TOWER)(patches, pos, valid)
        b, n, d = x.shape
        m2 = c.merge**2
        # the pooler in float32: sqrt(D) scaling can leave the float16 range (transformers)
        x = x.astype(jnp.float32).reshape(b, n // m2, m2, d).mean(axis=2) * d**0.5
        if c.standardize:
            bias = self.param("std_bias", nn.initializers.zeros, (d,), self.dtype)
            scale = self.param("std_scale", nn.initializers.ones, (d,), self.dtype)
            x = (x - bias.astype(jnp.float32)) * scale.astype(jnp.float32)
        x = rms_norm(x, jnp.ones((d,), jnp.float32), c.norm_eps).astype(self.dtype)
        return Linear(c.text_dim, False, self.dtype, name="input_projection")(x)


def module(cfg: Gemma4VisionConfig, dtype: jnp.dtype) -> nn.Module:
    return Gemma4VisionProjector(cfg, dtype)


def tensors(g: GGUFFile, cfg: Gemma4VisionConfig) -> TensorTable:
    layer: TensorTable = {
        "ln1.weight": (("ln1", "scale"), None),
        "ln2.weight": (("ln2", "scale"), None),
        "attn_post_norm.weight": (("attn_post_norm", "scale"), None),
        "ffn_post_norm.weight": (("ffn_post_norm", "scale"), None),
        "attn_q_norm.weight": (("attn", "q_norm", "scale"), None),
        "attn_k_norm.weight": (("attn", "k_norm", "scale"), None),
    }
    for name, path in LINEARS.items():
        layer[f"{name}.weight"] = ((*path, "linear", "weight"), None)
        if cfg.clipped:
            for b in BOUNDS:
                layer[f"{name}.{b}"] = ((*path, b), _scalar)
    table: TensorTable = {
        "v.patch_embd.weight": ((TOWER, "patch_embed", "weight"), _flatten_patch),
        "v.position_embd.weight": ((TOWER, "position_embedding"), None),
        **{f"v.blk.{{i}}.{k}": ((TOWER, "layers", *p), t) for k, (p, t) in layer.items()},
        "mm.input_projection.weight": (("input_projection", "weight"), None),
    }
    if cfg.standardize:
        table["v.std_bias"] = (("std_bias",), None)
        table["v.std_scale"] = (("std_scale",), None)
    return table


def _scalar(w):
    return w.reshape(())
