"""The ViT tower of CLIP-style projectors (SigLIP for Gemma 3), as llama.cpp's `build_vit`
runs it: patch embedding (a strided convolution, here patches times a matrix), learned
position embedding, pre-norm blocks of bidirectional attention and a plain MLP, then a final
LayerNorm. Every image attends only to its own patches.

Params (stacked on a leading layer axis under "layers", one `lax.scan` over them: the tower's
matmuls are compute-bound, so the per-layer weight copy a scan makes on XLA:CPU is noise):

    patch_embed/{weight [D, 3*P*P], bias [D]}   position_embedding [patches, D]
    layers/{ln1,ln2}/{scale,bias} [L, D]        layers/attn/{q,k,v,o}/{weight [L, D, D], bias}
    layers/mlp/up/{weight [L, F, D], bias}      layers/mlp/down/{weight [L, D, F], bias}
    post_ln/{scale,bias} [D]
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tsjax.gguf import GGUFFile
from tsjax.layers.linear import Linear
from tsjax.layers.mlp import MLP
from tsjax.layers.norms import LayerNorm
from tsjax.vision.config import VisionConfig

# GGUF tensor -> params path, with an optional host-side conversion of the array.
Transform = Callable[[np.ndarray], np.ndarray]
TensorTable = dict[str, tuple[tuple[str, ...], Transform | None]]

# Per layer (GGUF "v.blk.{i}.<suffix>"), relative to the tower's "layers".
LAYER_TENSORS: dict[str, tuple[str, ...]] = {
    "ln1.weight": ("ln1", "scale"),
    "ln1.bias": ("ln1", "bias"),
    "attn_q.weight": ("attn", "q", "weight"),
    "attn_q.bias": ("attn", "q", "bias"),
    "attn_k.weight": ("attn", "k", "weight"),
    "attn_k.bias": ("attn", "k", "bias"),
    "attn_v.weight": ("attn", "v", "weight"),
    "attn_v.bias": ("attn", "v", "bias"),
    "attn_out.weight": ("attn", "o", "weight"),
    "attn_out.bias": ("attn", "o", "bias"),
    "ln2.weight": ("ln2", "scale"),
    "ln2.bias": ("ln2", "bias"),
    "ffn_up.weight": ("mlp", "up", "weight"),
    "ffn_up.bias": ("mlp", "up", "bias"),
    "ffn_down.weight": ("mlp", "down", "weight"),
    "ffn_down.bias": ("mlp", "down", "bias"),
}

# Logical axes (`tsjax.vision.sharding`) of the tower's params, relative to its root; stacked
# layer params have a leading "layers" axis. Float weights are [out, in] as GGUF stores them.
PARAM_AXES: dict[tuple[str, ...], tuple[str | None, ...]] = {
    ("patch_embed", "weight"): ("vision_embed", "vision_patch"),
    ("patch_embed", "bias"): ("vision_embed",),
    ("position_embedding",): ("vision_patches", "vision_embed"),
    ("post_ln", "scale"): ("vision_embed",),
    ("post_ln", "bias"): ("vision_embed",),
}
LAYER_PARAM_AXES: dict[tuple[str, ...], tuple[str | None, ...]] = {
    ("ln1", "scale"): ("vision_embed",),
    ("ln1", "bias"): ("vision_embed",),
    ("ln2", "scale"): ("vision_embed",),
    ("ln2", "bias"): ("vision_embed",),
    **{
        ("attn", p, "weight"): ("vision_heads", "vision_embed")  # [N*H, D]
        for p in ("q", "k", "v")
    },
    **{("attn", p, "bias"): ("vision_heads",) for p in ("q", "k", "v")},
    ("attn", "o", "weight"): ("vision_embed", "vision_heads"),
    ("attn", "o", "bias"): ("vision_embed",),
    ("mlp", "up", "weight"): ("vision_ffw", "vision_embed"),
    ("mlp", "up", "bias"): ("vision_ffw",),
    ("mlp", "down", "weight"): ("vision_embed", "vision_ffw"),
    ("mlp", "down", "bias"): ("vision_embed",),
}


def param_axes(path: tuple[str, ...]) -> tuple[str | None, ...] | None:
    """Logical axes of the tower param at `path` (relative to the tower), or None."""
    if path and path[0] == "layers":
        axes = LAYER_PARAM_AXES.get(path[1:])
        return None if axes is None else ("layers", *axes)
    return PARAM_AXES.get(path)


def patchify(pixels: jax.Array, patch: int) -> jax.Array:
    """[B, S, S, C] -> [B, (S/P)^2, C*P*P]: patches in row-major order, each flattened as
    (channel, row, column), the order of the convolution kernel [D, C, P, P]."""
    b, h, w, c = pixels.shape
    gh, gw = h // patch, w // patch
    x = pixels.reshape(b, gh, patch, gw, patch, c)
    x = x.transpose(0, 1, 3, 5, 2, 4)  # [B, gh, gw, C, P, P]
    return x.reshape(b, gh * gw, c * patch * patch)


# Past this many patches an image's queries run in blocks of QUERY_BLOCK, one after another
# (`lax.map`): the scores of all of them at once grow with the square of the patches. One
# layer of Gemma 4's largest bucket (1120 tokens, 10080 patches) through its real tower's 12
# heads of 64: 14.1 GiB peak and 35.1 s in one piece, 3.3 GiB and 11.8 s in blocks (2 busy
# cores: `python -m benchmarks.vision_attention`). Gemma 3 (4096) and Pixtral (up to 4096)
# stay in one piece; Qwen 3.5's buckets of 2048 and 4096 tokens (8192, 16384 patches) and
# Gemma 4's of 512 and up go in blocks.
QUERY_BLOCKS_PAST = 4096
QUERY_BLOCK = 2048


def full_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, scale: float, key_mask: jax.Array | None = None
) -> jax.Array:
    """Bidirectional attention. q, k, v: [B, P, N, H] -> [B, P, N, H]. key_mask [B, P] bool:
    the keys each query may see (None: all; padding patches of a size bucket are False, and
    every image has at least one real patch, so no row is empty).

    Heads first, with the softmax's division applied to the [P, H] output instead of the
    [P, P] probabilities: on XLA:CPU at SigLIP's 4096 patches x 16 heads of 72 this took
    1.5 s a layer against 2.5 s for `jax.nn.dot_product_attention`, whose scores take a
    transposing layout (`python benchmarks/vision_encode.py --layers 3`). Past
    `QUERY_BLOCKS_PAST` patches, in blocks of queries."""
    b, p, n, h = q.shape
    if p <= QUERY_BLOCKS_PAST:
        return _attention(q, k, v, scale, key_mask)
    blocks = -(-p // QUERY_BLOCK)
    qp = jnp.pad(q, ((0, 0), (0, blocks * QUERY_BLOCK - p), (0, 0), (0, 0)))
    qs = jnp.moveaxis(qp.reshape(b, blocks, QUERY_BLOCK, n, h), 1, 0)
    out = jax.lax.map(lambda qb: _attention(qb, k, v, scale, key_mask), qs)
    return jnp.moveaxis(out, 0, 1).reshape(b, blocks * QUERY_BLOCK, n, h)[:, :p]


def _attention(q, k, v, scale: float, key_mask) -> jax.Array:
    """`full_attention` in one piece: q [B, Q, N, H], k, v [B, P, N, H] -> [B, Q, N, H]."""
    q, k, v = (x.transpose(0, 2, 1, 3) for x in (q * jnp.asarray(scale, q.dtype), k, v))
    s = jnp.einsum("bnph,bnqh->bnpq", q, k, preferred_element_type=jnp.float32)
    if key_mask is not None:
        s = jnp.where(key_mask[:, None, None, :], s, -jnp.inf)
    e = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
    out = jnp.einsum("bnpq,bnqh->bnph", e.astype(v.dtype), v, preferred_element_type=jnp.float32)
    out = out / jnp.sum(e, axis=-1, keepdims=True)
    return out.astype(q.dtype).transpose(0, 2, 1, 3)


def scanned_layers(layer: type[nn.Module], cfg, dtype, in_axes: Any = (nn.broadcast, nn.broadcast)):
    """A vision tower's `cfg.n_layers` blocks as one `nn.scan` of `layer(cfg, dtype)`, its params
    stacked on a leading layer axis under "layers" (the GGUF loaders' `{i}` tensors). Call it
    inside the tower's compact `__call__` as `(x, *inputs)`; each block returns (x, None), and
    `in_axes` says how the inputs after x reach it (default: two broadcast ones, e.g. the
    rotation tables and the key mask)."""
    return nn.scan(
        layer,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=in_axes,
        length=cfg.n_layers,
    )(cfg, dtype, name="layers")


class VisionAttention(nn.Module):
    """Bidirectional multi-head attention over one image's patches. x: [B, P, D]."""

    n_heads: int
    head_dim: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, p, d = x.shape
        n, h = self.n_heads, self.head_dim

        def proj(name):
            return Linear(n * h, True, self.dtype, name=name)(x).reshape(b, p, n, h)

        out = full_attention(proj("q"), proj("k"), proj("v"), h**-0.5)
        return Linear(d, True, self.dtype, name="o")(out.reshape(b, p, n * h))


class EncoderLayer(nn.Module):
    cfg: VisionConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, _) -> tuple[jax.Array, None]:
        c = self.cfg
        h = LayerNorm(c.norm_eps, self.dtype, name="ln1")(x)
        x = x + VisionAttention(c.n_heads, c.head_dim, self.dtype, name="attn")(h)
        h = LayerNorm(c.norm_eps, self.dtype, name="ln2")(x)
        return x + MLP(c.ffn_dim, c.activation, True, self.dtype, name="mlp")(h), None


class ViT(nn.Module):
    cfg: VisionConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, pixels: jax.Array) -> jax.Array:
        """pixels: [B, S, S, 3] normalized. Returns [B, patches, D]."""
        c = self.cfg
        x = patchify(pixels.astype(self.dtype), c.patch_size)
        x = Linear(c.dim, True, self.dtype, name="patch_embed")(x)  # [B, patches, D]
        pos = self.param(
            "position_embedding", nn.initializers.normal(0.02), (c.n_patches, c.dim), self.dtype
        )
        x = x + pos
        x, _ = scanned_layers(EncoderLayer, c, self.dtype, in_axes=0)(x, None)
        return LayerNorm(c.norm_eps, self.dtype, name="post_ln")(x)


def vit_tensors(g: GGUFFile, cfg: VisionConfig, root: tuple[str, ...]) -> TensorTable:
    """The tower's GGUF tensors -> params paths under `root`. Per-layer entries are named with
    `{i}` for the layer. Older Gemma 3 / Idefics 3 files store ffn_up and ffn_down swapped;
    llama.cpp recognises them by ffn_down taking D inputs, and so does this."""
    table: TensorTable = {
        "v.patch_embd.weight": ((*root, "patch_embed", "weight"), _flatten_patch),
        "v.patch_embd.bias": ((*root, "patch_embed", "bias"), None),
        "v.position_embd.weight": ((*root, "position_embedding"), None),
        "v.post_ln.weight": ((*root, "post_ln", "scale"), None),
        "v.post_ln.bias": ((*root, "post_ln", "bias"), None),
    }
    layer = dict(LAYER_TENSORS)
    down = "v.blk.0.ffn_down.weight"
    if cfg.ffn_dim != cfg.dim and g.has_tensor(down) and g.info(down).shape[-1] == cfg.dim:
        for part in ("weight", "bias"):
            layer[f"ffn_up.{part}"], layer[f"ffn_down.{part}"] = (
                layer[f"ffn_down.{part}"],
                layer[f"ffn_up.{part}"],
            )
    for suffix, path in layer.items():
        table[f"v.blk.{{i}}.{suffix}"] = ((*root, "layers", *path), None)
    return table


def _flatten_patch(w: np.ndarray) -> np.ndarray:
    """Convolution kernel [D, C, P, P] -> matrix [D, C*P*P]."""
    return w.reshape(w.shape[0], -1)
