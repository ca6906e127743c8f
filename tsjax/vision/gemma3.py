"""Gemma 3's projector (`clip.projector_type = "gemma3"`): SigLIP, then average pooling of
k x k patches, RMS norm with the soft-embedding scale, and a projection into the text model's
embedding space (llama.cpp `models/siglip.cpp`; transformers `Gemma3MultiModalProjector`).

SigLIP-So400m at 896 px: 64 x 64 patches of 14 px, pooled 4 x 4 into 256 tokens per image.
The text model sees `<start_of_image>` + 256 image embeddings + `<end_of_image>`, and image
tokens attend to each other in both directions. Images are letterboxed to the square input
with Pillow-style bilinear resampling (llama.cpp's fixed-size preprocessor; transformers'
processor stretches instead).

Params, besides the tower's (`tsjax.vision.vit`, under "vit"):
    soft_emb_norm/scale [D]  (GGUF stores HF's 1 + w)
    input_projection/weight [T_dim, D]  (GGUF stores [D, T_dim]: transposed on load)
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from tsjax.gguf import GGUFError, GGUFFile
from tsjax.layers.linear import Linear
from tsjax.layers.norms import RMSNorm
from tsjax.vision.config import ResizeSpec, VisionConfig, base_vision_kwargs
from tsjax.vision.vit import TensorTable, ViT, vit_tensors

DEFAULT_MERGE = 4  # llama.cpp: every Gemma 3 size pools 4 x 4 unless the file says otherwise

# Logical axes of the params outside the tower (`tsjax.vision.sharding`).
PARAM_AXES: dict[tuple[str, ...], tuple[str | None, ...]] = {
    ("soft_emb_norm", "scale"): ("vision_embed",),
    ("input_projection", "weight"): ("embed", "vision_embed"),  # [text D, D]
}
TOWER = "vit"  # the params key of the ViT tower


def config(g: GGUFFile) -> VisionConfig:
    kw = base_vision_kwargs(g)
    merge = int(g.meta("clip.vision.projector.scale_factor", DEFAULT_MERGE))
    side = kw["image_size"] // kw["patch_size"]
    if merge <= 0 or side % merge:
        raise GGUFError(f"{g.path.name}: {side} patches per side do not pool by {merge}")
    proj = "mm.input_projection.weight"
    if not g.has_tensor(proj):
        raise GGUFError(f"{g.path.name} has no tensor {proj!r} (a gemma3 projector needs it)")
    d_in, text_dim = g.info(proj).shape  # numpy order: [D, text D]
    if d_in != kw["dim"]:
        raise GGUFError(f"{g.path.name}: {proj} takes {d_in} features, the tower makes {kw['dim']}")
    return VisionConfig(
        **kw,
        text_dim=int(text_dim),
        merge=merge,
        resize=ResizeSpec("bilinear", "ceil", (0, 0, 0)),
        image_begin="<start_of_image>",
        image_end="<end_of_image>",
        bidirectional=True,
    )


class Gemma3Projector(nn.Module):
    cfg: VisionConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, pixels: jax.Array) -> jax.Array:
        """pixels: [B, S, S, 3] normalized. Returns [B, tokens_per_image, text D]."""
        c = self.cfg
        x = ViT(c, self.dtype, name=TOWER)(pixels)  # [B, patches, D]
        b, _, d = x.shape
        g, k = c.patches_per_side, c.merge
        x = x.reshape(b, g // k, k, g // k, k, d)
        x = jnp.mean(x.astype(jnp.float32), axis=(2, 4)).astype(x.dtype)
        x = x.reshape(b, (g // k) ** 2, d)  # row-major pooled tokens
        x = RMSNorm(c.norm_eps, self.dtype, name="soft_emb_norm")(x)
        return Linear(c.text_dim, False, self.dtype, name="input_projection")(x)


def module(cfg: VisionConfig, dtype: jnp.dtype) -> nn.Module:
    return Gemma3Projector(cfg, dtype)


def tensors(g: GGUFFile, cfg: VisionConfig) -> TensorTable:
    table = vit_tensors(g, cfg, (TOWER,))
    table["mm.soft_emb_norm.weight"] = (("soft_emb_norm", "scale"), None)
    table["mm.input_projection.weight"] = (("input_projection", "weight"), lambda w: w.T)
    return table
