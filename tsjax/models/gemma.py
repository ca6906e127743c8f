"""Gemma 1/2/3: GELU-tanh MLP, embeddings scaled by sqrt(D), (1 + w) norms folded in by the
converter; Gemma 2/3 add sandwich norms and interleave sliding-window and global layers.

- Gemma 2: every other layer slides (layer 0 slides), attention and final logit soft-capping.
- Gemma 3: five sliding layers then one global; sliding layers use RoPE base 10000, global ones
  the file's base (with linear scaling on the larger models); q/k RMSNorm replaces soft-capping.
Most GGUF files do not store the layer pattern or the local RoPE base; the published
architecture constants are the defaults, and the keys win where a file has them.
"""

from __future__ import annotations

from tsjax.gguf import GGUFFile
from tsjax.models.config import ModelConfig, base_config_kwargs

LOCAL_ROPE_THETA = 10000.0
# Models whose query scale is 1/sqrt(D/N) instead of 1/sqrt(H): (architecture, layers).
QUERY_SCALE_BY_DIM = {("gemma2", 46), ("gemma3", 62)}


def config(g: GGUFFile) -> ModelConfig:
    arch = g.architecture
    kw = base_config_kwargs(g, "gemma")
    n, d = kw["n_layers"], kw["dim"]
    kw.update(activation="gelu_tanh", embed_scale=d**0.5)
    if (arch, n) in QUERY_SCALE_BY_DIM:
        kw["query_scale"] = (d / kw["n_heads"]) ** -0.5
    if arch == "gemma":
        return ModelConfig(**kw)
    window = int(g.meta(f"{arch}.attention.sliding_window", 4096))
    if arch == "gemma2":
        sliding = [i % 2 == 0 for i in range(n)]
        kw["attn_softcap"] = float(g.meta(f"{arch}.attn_logit_softcapping", 50.0)) or None
        kw["final_softcap"] = float(g.meta(f"{arch}.final_logit_softcapping", 30.0)) or None
        kw["layer_rope_thetas"] = (kw["rope_theta"],) * n
    else:
        pattern = int(g.meta(f"{arch}.attention.sliding_window_pattern", 6))
        sliding = [(i + 1) % pattern != 0 for i in range(n)]
        local_theta = float(g.meta(f"{arch}.rope.freq_base_swa", LOCAL_ROPE_THETA))
        kw["qk_norm"] = True
        kw["final_softcap"] = float(g.meta(f"{arch}.final_logit_softcapping", 0.0)) or None
        kw["layer_rope_thetas"] = tuple(local_theta if s else kw["rope_theta"] for s in sliding)
        # Position interpolation applies to the global layers only.
        kw["layer_rope_scales"] = tuple(1.0 if s else kw["layer_rope_scales"][0] for s in sliding)
    kw["layer_windows"] = tuple(window if s else 0 for s in sliding)
    return ModelConfig(**kw, post_norms=True)
