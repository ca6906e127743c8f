"""Qwen 3.5's (and Qwen3-VL's) projector (`clip.projector_type = "qwen3vl_merger"`), as
llama.cpp's `models/qwen3vl.cpp` and transformers' `Qwen3_5VisionModel` run it:

1. patch embedding: a Conv3D over two frames of P x P patches, which for a still image (the
   frame repeated) is the image's patches times the sum of the two temporal kernels (GGUF
   splits them into `v.patch_embd.weight` and `.weight.1`), plus a bias;
2. the learned square grid of position embeddings, resampled bilinearly (corners aligned)
   to the image's patch grid, added;
3. pre-norm blocks: LayerNorm, attention with fused q/k/v (`attn_qkv`) and a 2-D RoPE (the
   first quarter of each head's rotation pairs turn with the patch's row, the second quarter
   with its column, base 10000, rotate-half layout over the whole head), LayerNorm,
   GELU (tanh) MLP;
4. the merger: LayerNorm per patch, each 2 x 2 block of patches concatenated (row-major
   inside the block), `mm.0` -> GELU -> `mm.2` into the text model's width.

Dynamic resolution: an image keeps its aspect ratio and is resized (bicubic, letterboxed by
the rounding) to sides that are multiples of patch x merge (32 px), between 8 and 4096
tokens as llama.cpp limits it (`clip.vision.image_min_pixels` / `image_max_pixels` where the
file has them; `tsjax.vision.preprocess.fit_size`), and encoded per token bucket
(`tsjax.vision.dynamic`: the packed patches, 2 x 2 blocks contiguous, with their (row, col),
padding masked; the learned grid is resampled to each image's own patch grid, read from the
positions). Its tokens are the merged blocks in row-major order, wrapped as
`<|vision_start|>` ... `<|vision_end|>`; they attend causally (llama.cpp masks an image's
tokens in raster order, transformers by index: the same) and take M-RoPE positions in the
text model (`VisionConfig.mrope`; `tsjax.spans`).

The merger's GELU is the exact (erf) one, as transformers' `nn.GELU()`; llama.cpp runs its
tanh approximation there (a ~1e-4 difference in the embeddings). Qwen3-VL's deepstack
layers (`v.deepstack.*`) feed the text model's first layers, which only the `qwen3vl` text
family reads: a file with them is refused.

Params (tower layers stacked under "layers", one `nn.scan`):

    tower/patch_embed_weight, tower/patch_embed_weight_1 [D, 3*P*P], patch_embed_bias [D]
    tower/position_embedding [G*G, D]     tower/post_ln/{scale,bias} [D]
    tower/layers/{ln1,ln2}/{scale,bias} [L, D]
    tower/layers/qkv/{weight [L, 3, D, D], bias [L, 3, D]}   tower/layers/o/{weight, bias}
    tower/layers/mlp/{up,down}/{weight, bias}
    mm0/{weight [4D, 4D], bias}           mm2/{weight [T, 4D], bias}
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tsjax.gguf import GGUFError, GGUFFile
from tsjax.layers.linear import Linear
from tsjax.layers.mlp import MLP
from tsjax.layers.norms import LayerNorm
from tsjax.layers.rope import rotate
from tsjax.vision.config import ResizeSpec, VisionConfig, base_vision_kwargs
from tsjax.vision.vit import TensorTable, full_attention, scanned_layers

DEFAULT_MERGE = 2
# llama.cpp's token limits for the Qwen-VL family (`set_limit_image_tokens(8, 4096)`)
MIN_TOKENS, MAX_TOKENS = 8, 4096
ROPE_THETA = 10000.0
TOWER = "tower"

_LAYER = (TOWER, "layers")
PARAM_AXES: dict[tuple[str, ...], tuple[str | None, ...]] = {
    (TOWER, "patch_embed_weight"): ("vision_embed", "vision_patch"),
    (TOWER, "patch_embed_weight_1"): ("vision_embed", "vision_patch"),
    (TOWER, "patch_embed_bias"): ("vision_embed",),
    (TOWER, "position_embedding"): ("vision_patches", "vision_embed"),
    (TOWER, "post_ln", "scale"): ("vision_embed",),
    (TOWER, "post_ln", "bias"): ("vision_embed",),
    **{
        (*_LAYER, n, p): ("layers", "vision_embed")
        for n in ("ln1", "ln2")
        for p in ("scale", "bias")
    },  # fmt: skip
    (*_LAYER, "qkv", "weight"): ("layers", None, "vision_heads", "vision_embed"),
    (*_LAYER, "qkv", "bias"): ("layers", None, "vision_heads"),
    (*_LAYER, "o", "weight"): ("layers", "vision_embed", "vision_heads"),
    (*_LAYER, "o", "bias"): ("layers", "vision_embed"),
    (*_LAYER, "mlp", "up", "weight"): ("layers", "vision_ffw", "vision_embed"),
    (*_LAYER, "mlp", "up", "bias"): ("layers", "vision_ffw"),
    (*_LAYER, "mlp", "down", "weight"): ("layers", "vision_embed", "vision_ffw"),
    (*_LAYER, "mlp", "down", "bias"): ("layers", "vision_embed"),
    # the merger's hidden width is 4 D: left whole (small next to the tower)
    ("mm0", "weight"): (None, None),
    ("mm0", "bias"): (None,),
    ("mm2", "weight"): ("embed", None),
    ("mm2", "bias"): ("embed",),
}


def config(g: GGUFFile) -> VisionConfig:
    kw = base_vision_kwargs(g)
    merge = int(g.meta("clip.vision.spatial_merge_size", DEFAULT_MERGE))
    deep = [n for n in g.tensor_names() if n.startswith("v.deepstack.")]
    if deep:
        raise GGUFError(
            f"{g.path.name} has deepstack layers ({deep[0]}, ...): a Qwen3-VL projector, whose"
            " features feed the qwen3vl text family's first layers; only Qwen 3.5's (no"
            " deepstack) is supported"
        )
    for name in ("mm.0.weight", "mm.2.weight", "v.patch_embd.weight.1"):
        if not g.has_tensor(name):
            raise GGUFError(f"{g.path.name} has no tensor {name!r} (a qwen3vl_merger needs it)")
    text_dim, _ = g.info("mm.2.weight").shape  # [out, in]
    if g.info("mm.0.weight").shape[-1] != kw["dim"] * merge * merge:
        raise GGUFError(f"{g.path.name}: mm.0 does not take {merge}x{merge} merged patches")
    side = int(round(g.info("v.position_embd.weight").shape[0] ** 0.5))
    kw["image_size"] = side * kw["patch_size"]  # the learned grid's size, in pixels
    area = (kw["patch_size"] * merge) ** 2
    min_px = int(g.meta("clip.vision.image_min_pixels", MIN_TOKENS * area))
    max_px = int(g.meta("clip.vision.image_max_pixels", MAX_TOKENS * area))
    return VisionConfig(
        **kw,
        text_dim=int(text_dim),
        merge=merge,
        resize=ResizeSpec("bicubic", "ceil", (0, 0, 0)),
        image_begin="<|vision_start|>",
        image_end="<|vision_end|>",
        bidirectional=False,
        min_tokens=max(1, -(-min_px // area)),
        max_tokens=max_px // area,
        mrope=True,
    )


def learned_positions(table: jax.Array, pos: jax.Array, valid: jax.Array) -> jax.Array:
    """The learned square grid table [G*G, D] resampled bilinearly (corners aligned, as
    transformers' `F.interpolate` taps) to each image's patch grid, at patches pos [B, N, 2]
    (row, col; the grid's size is the largest valid position + 1) -> [B, N, D] float32."""
    side = int(round(table.shape[0] ** 0.5))
    size = jnp.max(jnp.where(valid[..., None], pos, 0), axis=1) + 1  # [B, 2]
    span = jnp.maximum(size - 1, 1).astype(jnp.float32)[:, None, :]
    src = pos.astype(jnp.float32) * jnp.float32(side - 1) / span  # transformers' order
    lo = jnp.floor(src)
    taps = [jnp.clip(lo.astype(jnp.int32) + off, 0, side - 1) for off in (0, 1)]
    weights = [jnp.maximum(1 - jnp.abs(src - lo - off), 0) for off in (0, 1)]
    table = table.astype(jnp.float32)
    out = jnp.zeros((*pos.shape[:2], table.shape[1]), jnp.float32)
    for a in (0, 1):  # transformers' tap order: (h0, w0), (h0, w1), (h1, w0), (h1, w1)
        for b in (0, 1):
            idx = taps[a][..., 0] * side + taps[b][..., 1]
            w = weights[a][..., 0] * weights[b][..., 1]
            out = out + jnp.take(table, idx, axis=0) * w[..., None]
    return out


def vision_rope(pos: jax.Array, head_dim: int) -> tuple[jax.Array, jax.Array]:
    """(cos, sin) [B, N, 1, H/2] of patches at pos [B, N, 2] (row, col): pair i < H/4 turns
    with the row, pair H/4 + i with the column, both at theta ** (-4i / H)."""
    quarter = head_dim // 4
    inv = np.float32(1) / np.power(
        np.float32(ROPE_THETA), np.arange(0, 2 * quarter, 2, dtype=np.float32) / (2 * quarter)
    )
    p = pos.astype(jnp.float32)
    angles = jnp.concatenate([p[..., :1] * inv, p[..., 1:] * inv], axis=-1)[:, :, None, :]
    return jnp.cos(angles), jnp.sin(angles)


class QkvAttention(nn.Module):
    """Bidirectional attention with fused q/k/v and the tower's 2-D RoPE over one image's
    patches (padding masked as keys). x: [B, N, D]."""

    n_heads: int
    head_dim: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, rope, valid) -> jax.Array:
        b, p, d = x.shape
        n, h = self.n_heads, self.head_dim
        init = nn.initializers.normal(0.02)
        w = self.param("weight", init, (3, n * h, d), self.dtype)  # [q | k | v] rows
        bias = self.param("bias", nn.initializers.zeros, (3, n * h), self.dtype)
        qkv = jnp.einsum("bpd,sed->sbpe", x, w) + bias[:, None, None, :]
        q, k, v = (qkv[i].reshape(b, p, n, h) for i in range(3))
        q, k = rotate(q, rope), rotate(k, rope)
        return full_attention(q, k, v, h**-0.5, valid).reshape(b, p, n * h)


class TowerLayer(nn.Module):
    cfg: VisionConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, rope, valid) -> tuple[jax.Array, None]:
        c = self.cfg
        h = LayerNorm(c.norm_eps, self.dtype, name="ln1")(x)
        h = QkvAttention(c.n_heads, c.head_dim, self.dtype, name="qkv")(h, rope, valid)
        x = x + Linear(c.dim, True, self.dtype, name="o")(h)
        h = LayerNorm(c.norm_eps, self.dtype, name="ln2")(x)
        return x + MLP(c.ffn_dim, c.activation, True, self.dtype, name="mlp")(h), None


class Tower(nn.Module):
    cfg: VisionConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, patches, pos, valid) -> jax.Array:
        """patches [B, N, 3*P*P], pos [B, N, 2], valid [B, N] (`tsjax.vision.dynamic.pack`)
        -> [B, N, D] after the final norm."""
        c = self.cfg
        init, k = nn.initializers.normal(0.02), 3 * c.patch_size**2
        w0 = self.param("patch_embed_weight", init, (c.dim, k), self.dtype)
        w1 = self.param("patch_embed_weight_1", init, (c.dim, k), self.dtype)
        bias = self.param("patch_embed_bias", nn.initializers.zeros, (c.dim,), self.dtype)
        x = jnp.einsum("bpk,dk->bpd", patches.astype(self.dtype), w0 + w1) + bias
        side = c.patches_per_side
        table = self.param("position_embedding", init, (side * side, c.dim), self.dtype)
        x = x + learned_positions(table, pos, valid).astype(self.dtype)
        x, _ = scanned_layers(TowerLayer, c, self.dtype)(x, vision_rope(pos, c.head_dim), valid)
        return LayerNorm(c.norm_eps, self.dtype, name="post_ln")(x)


class Qwen3VLProjector(nn.Module):
    cfg: VisionConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, patches, pos, valid) -> jax.Array:
        """The packed patches of a token bucket of `bucket` tokens (`tsjax.vision.dynamic`)
        -> [B, bucket, text D]: the merged 2 x 2 blocks in row-major order (padding after)."""
        c = self.cfg
        x = Tower(c, self.dtype, name=TOWER)(patches, pos, valid)
        b, n, d = x.shape
        m2 = c.merge * c.merge
        x = x.reshape(b, n // m2, m2 * d)  # each block's patches are contiguous
        x = Linear(m2 * d, True, self.dtype, name="mm0")(x)
        x = jax.nn.gelu(x, approximate=False)
        return Linear(c.text_dim, True, self.dtype, name="mm2")(x)


def module(cfg: VisionConfig, dtype: jnp.dtype) -> nn.Module:
    return Qwen3VLProjector(cfg, dtype)


def tensors(g: GGUFFile, cfg: VisionConfig) -> TensorTable:
    d = cfg.dim
    t = (TOWER,)
    table: TensorTable = {
        "v.patch_embd.weight": ((*t, "patch_embed_weight"), _flatten),
        "v.patch_embd.weight.1": ((*t, "patch_embed_weight_1"), _flatten),
        "v.patch_embd.bias": ((*t, "patch_embed_bias"), None),
        "v.position_embd.weight": ((*t, "position_embedding"), None),
        "v.post_ln.weight": ((*t, "post_ln", "scale"), None),
        "v.post_ln.bias": ((*t, "post_ln", "bias"), None),
        "mm.0.weight": (("mm0", "weight"), None),
        "mm.0.bias": (("mm0", "bias"), None),
        "mm.2.weight": (("mm2", "weight"), None),
        "mm.2.bias": (("mm2", "bias"), None),
    }
    layer = {
        "ln1.weight": ("ln1", "scale"),
        "ln1.bias": ("ln1", "bias"),
        "ln2.weight": ("ln2", "scale"),
        "ln2.bias": ("ln2", "bias"),
        "attn_out.weight": ("o", "weight"),
        "attn_out.bias": ("o", "bias"),
        "ffn_up.weight": ("mlp", "up", "weight"),
        "ffn_up.bias": ("mlp", "up", "bias"),
        "ffn_down.weight": ("mlp", "down", "weight"),
        "ffn_down.bias": ("mlp", "down", "bias"),
    }
    for suffix, path in layer.items():
        table[f"v.blk.{{i}}.{suffix}"] = ((*t, "layers", *path), None)
    table["v.blk.{i}.attn_qkv.weight"] = (
        (*t, "layers", "qkv", "weight"),
        lambda w: w.reshape(3, d, d),
    )
    table["v.blk.{i}.attn_qkv.bias"] = ((*t, "layers", "qkv", "bias"), lambda b: b.reshape(3, d))
    return table


def _flatten(w: np.ndarray) -> np.ndarray:
    """One temporal slice of the Conv3D kernel [D, C, P, P] -> [D, C*P*P]."""
    return w.reshape(w.shape[0], -1)
