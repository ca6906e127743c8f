"""Pixtral's projector (`clip.projector_type = "pixtral"`): the vision tower of Mistral 3
(Ministral 3, Mistral Small 3.1+) and Pixtral 12B, as llama.cpp's `models/pixtral.cpp` runs it
(transformers: `PixtralVisionModel` + `Mistral3MultiModalProjector`).

- Dynamic resolution: an image keeps its aspect ratio, resized (bicubic) so that it has 8 to
  1024 tokens, each side a multiple of patch x merge pixels (`tsjax.vision.preprocess.fit_size`;
  llama.cpp's limits, not the file's image_size), encoded per token bucket
  (`tsjax.vision.dynamic`).
- Tower: a patch convolution without bias, RMS norm (`ln_pre`), pre-norm blocks of RMS norms,
  attention with a 2-D RoPE (each head's first half of frequencies turns with the patch's
  row, the second half with its column) and a gated MLP (SiLU in every released model; exact
  GELU for `clip.use_gelu`); no learned positions, no final norm.
- Mistral 3's patch merger (merge > 1): RMS norm, then each merge x merge block of patch
  features concatenated (feature-major, as torch's `unfold`) and projected back to D.
- Projector: linear (D -> text D), exact (erf) GELU, linear (text D -> text D), biases as the
  file has them. llama.cpp's CPU GELU is the tanh form through an fp16 table; transformers'
  "gelu" is erf: this follows the model's definition.
- Layout in the prompt: the image's rows of tokens, an `[IMG_BREAK]` embedding (the text
  model's, copied into the file as `v.token_embd.img_break`) after each row but the last,
  then the text `[IMG_END]`; causal attention (no bidirectional span), as both references.

Params: tower/{patch_embed/weight [D, 3*P*P], pre_ln/scale [D]}, tower/layers/{ln1,ln2}/scale
[L, D], tower/layers/attn/{q,k,v,o}/weight [L, D, D] (q/k rows un-permuted from llama.cpp's
interleaved RoPE layout), tower/layers/mlp/{gate,up}/weight [L, F, D], .../down/weight [L, D, F];
input_norm/scale [D] and patch_merger/weight [D, D*merge^2] with a merger; linear_1/weight
[T_dim, D], linear_2/weight [T_dim, T_dim] (+ bias); img_break [T_dim] with row breaks.
"""

from __future__ import annotations

from dataclasses import dataclass

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tsjax.gguf import GGUFError, GGUFFile
from tsjax.layers.linear import Linear
from tsjax.layers.mlp import GatedMLP
from tsjax.layers.norms import RMSNorm
from tsjax.layers.rope import rope_frequencies, rotate
from tsjax.loader import unpermute_qk
from tsjax.vision.config import ResizeSpec, VisionConfig, base_vision_kwargs
from tsjax.vision.vit import (
    LAYER_PARAM_AXES,
    TensorTable,
    _flatten_patch,
    full_attention,
    scanned_layers,
)

TOWER = "tower"
BREAK = "img_break"  # the [IMG_BREAK] embedding's params key
# llama.cpp's `set_limit_image_tokens(8, 1024)` for pixtral (its --image-min/max-tokens
# options aside): the fewest and most tokens (after the merge) an image is resized to.
MIN_TOKENS, MAX_TOKENS = 8, 1024
ROPE_THETA = 10000.0  # llama.cpp hard-codes it (the files carry no key)

_L = ("layers",)
PARAM_AXES: dict[tuple[str, ...], tuple[str | None, ...]] = {
    (TOWER, "patch_embed", "weight"): ("vision_embed", "vision_patch"),
    (TOWER, "pre_ln", "scale"): ("vision_embed",),
    **{(TOWER, "layers", *k): (*_L, *v) for k, v in LAYER_PARAM_AXES.items() if k[-1] != "bias"},
    (TOWER, "layers", "mlp", "gate", "weight"): (*_L, "vision_ffw", "vision_embed"),
    ("input_norm", "scale"): ("vision_embed",),
    ("patch_merger", "weight"): ("vision_embed", None),  # [D, D*merge^2]
    ("linear_1", "weight"): ("embed", "vision_embed"),
    ("linear_1", "bias"): ("embed",),
    ("linear_2", "weight"): ("embed", None),
    ("linear_2", "bias"): ("embed",),
    (BREAK,): ("embed",),
}


@dataclass(frozen=True)
class PixtralConfig(VisionConfig):
    rope_theta: float = ROPE_THETA
    proj_bias: bool = False  # linear_1/linear_2 biases (Mistral 3: none; Pixtral 12B: yes)


def config(g: GGUFFile) -> PixtralConfig:
    kw = base_vision_kwargs(g)
    merge = int(g.meta("clip.vision.spatial_merge_size", 1))
    merger = g.has_tensor("mm.patch_merger.weight")
    if merge < 1 or merger != (merge > 1):
        raise GGUFError(
            f"{g.path.name}: spatial merge {merge} needs a patch merger exactly when > 1"
            f" (mm.patch_merger.weight {'present' if merger else 'absent'})"
        )
    for name in ("mm.1.weight", "mm.2.weight"):
        if not g.has_tensor(name):
            raise GGUFError(f"{g.path.name} has no tensor {name!r} (a pixtral projector needs it)")
    text_dim, d_in = g.info("mm.1.weight").shape  # numpy order: [text D, D]
    if d_in != kw["dim"]:
        raise GGUFError(
            f"{g.path.name}: mm.1.weight takes {d_in} features, the tower makes {kw['dim']}"
        )
    # clip.use_gelu is transformers' "gelu" here, the exact (erf) form (llama.cpp runs its
    # tanh approximation for every projector's use_gelu; Gemma 3's is "gelu_pytorch_tanh")
    kw["activation"] = {"gelu_tanh": "gelu"}.get(kw["activation"], kw["activation"])
    return PixtralConfig(
        **kw,
        text_dim=int(text_dim),
        merge=merge,
        resize=ResizeSpec("bicubic", "ceil", (0, 0, 0)),
        image_begin=None,
        image_end="[IMG_END]",
        bidirectional=False,
        min_tokens=MIN_TOKENS,
        max_tokens=MAX_TOKENS,
        row_break=g.has_tensor("v.token_embd.img_break"),
        proj_bias=g.has_tensor("mm.1.bias"),
    )


def rope_2d(pos: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """(cos, sin) [B, N, 1, H/2] of patches at pos [B, N, 2] (row, col): frequency pairs
    theta^(-2j/H) with even j turn with the row, odd j with the column (transformers'
    `PixtralRotaryEmbedding`; llama.cpp's two half-width ropes)."""
    inv = rope_frequencies(theta, head_dim)
    rows = pos[..., :1].astype(jnp.float32) * jnp.asarray(inv[::2])
    cols = pos[..., 1:].astype(jnp.float32) * jnp.asarray(inv[1::2])
    angles = jnp.concatenate([rows, cols], axis=-1)[:, :, None, :]
    return jnp.cos(angles), jnp.sin(angles)


class RopeAttention(nn.Module):
    """Bidirectional attention over an image's patches with the 2-D RoPE. x: [B, N, D]."""

    n_heads: int
    head_dim: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, tables, valid) -> jax.Array:
        b, n, d = x.shape
        nh, hd = self.n_heads, self.head_dim

        def proj(name):
            return Linear(nh * hd, False, self.dtype, name=name)(x).reshape(b, n, nh, hd)

        q, k = rotate(proj("q"), tables), rotate(proj("k"), tables)
        out = full_attention(q, k, proj("v"), hd**-0.5, valid)
        return Linear(d, False, self.dtype, name="o")(out.reshape(b, n, nh * hd))


class PixtralLayer(nn.Module):
    cfg: PixtralConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, tables, valid) -> tuple[jax.Array, None]:
        c = self.cfg
        h = RMSNorm(c.norm_eps, self.dtype, name="ln1")(x)
        x = x + RopeAttention(c.n_heads, c.head_dim, self.dtype, name="attn")(h, tables, valid)
        h = RMSNorm(c.norm_eps, self.dtype, name="ln2")(x)
        return x + GatedMLP(c.ffn_dim, c.activation, self.dtype, name="mlp")(h), None


class PixtralTower(nn.Module):
    cfg: PixtralConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, patches, pos, valid) -> jax.Array:
        """patches [B, N, 3*P*P], pos [B, N, 2], valid [B, N] -> [B, N, D]."""
        c = self.cfg
        x = Linear(c.dim, False, self.dtype, name="patch_embed")(patches.astype(self.dtype))
        x = RMSNorm(c.norm_eps, self.dtype, name="pre_ln")(x)
        tables = rope_2d(pos, c.head_dim, c.rope_theta)
        x, _ = scanned_layers(PixtralLayer, c, self.dtype)(x, tables, valid)
        return x


class PixtralProjector(nn.Module):
    cfg: PixtralConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, patches, pos, valid) -> jax.Array:
        """The packed inputs of `tsjax.vision.dynamic.pack` (N = T * merge^2 patches) ->
        [B, T, text D], tokens in the blocks' (row-major) order."""
        c = self.cfg
        x = PixtralTower(c, self.dtype, name=TOWER)(patches, pos, valid)
        if c.merge > 1:
            x = RMSNorm(c.norm_eps, self.dtype, name="input_norm")(x)
            b, n, d = x.shape
            m2 = c.merge**2
            # each block's merge^2 patches, feature-major: torch's unfold order (d, kh, kw)
            x = x.reshape(b, n // m2, m2, d).transpose(0, 1, 3, 2).reshape(b, n // m2, d * m2)
            x = Linear(d, False, self.dtype, name="patch_merger")(x)
        x = Linear(c.text_dim, c.proj_bias, self.dtype, name="linear_1")(x)
        x = jax.nn.gelu(x, approximate=False)
        x = Linear(c.text_dim, c.proj_bias, self.dtype, name="linear_2")(x)
        if c.row_break:  # a parameter of the module, used on the host (`arrange`)
            self.param(BREAK, nn.initializers.zeros, (c.text_dim,), self.dtype)
        return x


def module(cfg: PixtralConfig, dtype: jnp.dtype) -> nn.Module:
    return PixtralProjector(cfg, dtype)


def arrange(cfg: PixtralConfig, params: dict, tokens: np.ndarray, rows: int, cols: int):
    """An image's tokens [rows * cols, text D] (row-major) -> its prompt embeddings: each row
    followed by the [IMG_BREAK] embedding, except the last (llama.cpp's layout)."""
    if not cfg.row_break or rows == 1:
        return tokens
    brk = np.broadcast_to(np.asarray(params[BREAK], tokens.dtype), (rows, 1, tokens.shape[-1]))
    grid = np.concatenate([tokens.reshape(rows, cols, -1), brk], axis=1)
    return grid.reshape(rows * (cols + 1), -1)[:-1]


def tensors(g: GGUFFile, cfg: PixtralConfig) -> TensorTable:
    def heads(w):
        return unpermute_qk(w, cfg.n_heads)

    layer = {
        "ln1.weight": (("ln1", "scale"), None),
        "ln2.weight": (("ln2", "scale"), None),
        "attn_q.weight": (("attn", "q", "weight"), heads),
        "attn_k.weight": (("attn", "k", "weight"), heads),
        "attn_v.weight": (("attn", "v", "weight"), None),
        "attn_out.weight": (("attn", "o", "weight"), None),
        "ffn_gate.weight": (("mlp", "gate", "weight"), None),
        "ffn_up.weight": (("mlp", "up", "weight"), None),
        "ffn_down.weight": (("mlp", "down", "weight"), None),
    }
    table: TensorTable = {
        "v.patch_embd.weight": ((TOWER, "patch_embed", "weight"), _flatten_patch),
        "v.pre_ln.weight": ((TOWER, "pre_ln", "scale"), None),
        **{f"v.blk.{{i}}.{k}": ((TOWER, "layers", *p), t) for k, (p, t) in layer.items()},
        "mm.1.weight": (("linear_1", "weight"), None),
        "mm.2.weight": (("linear_2", "weight"), None),
    }
    if cfg.proj_bias:
        table["mm.1.bias"] = (("linear_1", "bias"), None)
        table["mm.2.bias"] = (("linear_2", "bias"), None)
    if cfg.merge > 1:
        table["mm.input_norm.weight"] = (("input_norm", "scale"), None)
        table["mm.patch_merger.weight"] = (("patch_merger", "weight"), None)
    if cfg.row_break:
        table["v.token_embd.img_break"] = ((BREAK,), None)
    return table
