"""GGUF tensors -> the Flax params pytree, one tensor at a time.

Per-layer tensors are written into one preallocated [L, ...] host array per parameter (the
layout `nn.scan` expects), so peak host memory is the stacked parameter being filled plus one
dequantized tensor, never two copies of the model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from tsjax.gguf import GGUFError, GGUFFile
from tsjax.models import Decoder, ModelConfig
from tsjax.models.decoder import layer_name

# GGUF tensor name (per layer) -> params path under "layers" (every tensor keeps GGUF's
# orientation: a Linear's float `weight` is [out, in], see tsjax.layers.linear).
LAYER_TENSORS: dict[str, tuple[str, ...]] = {
    "attn_norm.weight": (("attn_norm", "scale")),
    "attn_q.weight": (("attn", "q", "weight")),
    "attn_k.weight": (("attn", "k", "weight")),
    "attn_v.weight": (("attn", "v", "weight")),
    "attn_q.bias": (("attn", "q", "bias")),
    "attn_k.bias": (("attn", "k", "bias")),
    "attn_v.bias": (("attn", "v", "bias")),
    "attn_output.weight": (("attn", "o", "weight")),
    "attn_q_norm.weight": (("attn", "q_norm", "scale")),
    "attn_k_norm.weight": (("attn", "k_norm", "scale")),
    "post_attention_norm.weight": (("post_attn_norm", "scale")),
    "ffn_norm.weight": (("ffn_norm", "scale")),
    "ffn_gate.weight": (("mlp", "gate", "weight")),
    "ffn_up.weight": (("mlp", "up", "weight")),
    "ffn_down.weight": (("mlp", "down", "weight")),
    "post_ffw_norm.weight": (("post_ffn_norm", "scale")),
}
GLOBAL_TENSORS: dict[str, tuple[str, ...]] = {
    "token_embd.weight": (("embed", "embedding")),
    "output_norm.weight": (("final_norm", "scale")),
    "output.weight": (("lm_head", "weight")),
}


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's interleaving of q/k rows. w: [heads*H, D] (GGUF's [out, in])."""
    out, d = w.shape
    h = out // n_heads
    return w.reshape(n_heads, h // 2, 2, d).swapaxes(1, 2).reshape(out, d)


def param_shapes(model: Decoder):
    """The params pytree's shapes (and dtypes), from the model itself (so the loader cannot
    drift from it)."""
    from tsjax.cache import KVCache

    cache = KVCache.create(model.cfg, 1, 8, model.dtype)
    tokens = jnp.zeros((1, 1), jnp.int32)
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), tokens, tokens, cache, None, None, 8)
    )
    return shapes["params"]


@dataclass
class LoadStats:
    seconds: float
    n_tensors: int
    bytes_file: int
    bytes_params: int


def load_params(
    g: GGUFFile, model: Decoder, progress: bool = True, device_put=None
) -> tuple[dict, LoadStats]:
    """Read every tensor `model` (a float model: `tsjax.quantize` makes int8 weights from
    these) needs into a params pytree on device, in its layout: layer weights one array per
    layer under "layers_<i>" (`model.unrolled`) or stacked under "layers".

    `device_put(path, array)` lets callers place each leaf (e.g. with a sharding); default
    is `jax.device_put` onto the default device.
    """
    t0 = time.perf_counter()
    cfg, dtype, unrolled = model.cfg, model.dtype, model.unrolled
    shapes = param_shapes(model)
    put = device_put or (lambda path, a: jax.device_put(a))
    np_dtype = np.dtype(jnp.dtype(dtype).name) if dtype != jnp.bfloat16 else np.float32
    names = g.tensor_names()
    expected = _expected_tensors(cfg, shapes)
    missing = [n for n in expected if n not in names]
    if missing:
        raise GGUFError(f"{g.path.name}: missing tensors {missing[:5]} for {cfg.architecture}")
    params: dict = {}
    bar = tqdm(
        total=len(expected),
        desc=f"loading {g.path.name}",
        unit="tensor",
        disable=not progress,
        leave=False,
    )

    def store(path, arr):
        _set(params, path, put(path, _cast(arr, dtype)))

    layer_params = shapes[layer_name(0) if unrolled else "layers"]
    for suffix, path in LAYER_TENSORS.items():
        leaf = _get(layer_params, path)
        if leaf is None:
            continue
        shape = leaf.shape if unrolled else leaf.shape[1:]
        stacked = None if unrolled else np.empty(leaf.shape, np_dtype)
        for i in range(cfg.n_layers):
            arr = _convert(g, f"blk.{i}.{suffix}", cfg, np_dtype, shape)
            if unrolled:
                store((layer_name(i), *path), arr)
            else:
                stacked[i] = arr
            bar.update(1)
        if stacked is not None:
            store(("layers", *path), stacked)
        del stacked
    for name, path in GLOBAL_TENSORS.items():
        leaf = _get(shapes, path)
        if leaf is None:
            continue
        arr = _convert(g, name, cfg, np_dtype, leaf.shape)
        store(path, arr)
        bar.update(1)
    bar.close()
    n_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(params))
    stats = LoadStats(time.perf_counter() - t0, len(expected), g.total_tensor_bytes(), n_bytes)
    return params, stats


def _expected_tensors(cfg: ModelConfig, shapes) -> list[str]:
    out = [n for n, p in GLOBAL_TENSORS.items() if _get(shapes, p) is not None]
    layer_params = shapes.get("layers") or shapes[layer_name(0)]
    for suffix, path in LAYER_TENSORS.items():
        if _get(layer_params, path) is not None:
            out += [f"blk.{i}.{suffix}" for i in range(cfg.n_layers)]
    return out


def _convert(g, name, cfg, np_dtype, want_shape) -> np.ndarray:
    w = g.tensor(name, np.float32)
    if cfg.permuted_qk and name.endswith(("attn_q.weight", "attn_k.weight")):
        heads = cfg.n_heads if "attn_q" in name else cfg.n_kv_heads
        w = unpermute_qk(w, heads)
    if w.shape != tuple(want_shape):
        raise GGUFError(
            f"{g.path.name}: tensor {name} has shape {w.shape}, model expects {tuple(want_shape)}"
        )
    return np.ascontiguousarray(w, dtype=np_dtype)


def _cast(a: np.ndarray, dtype) -> np.ndarray:
    # On the host (ml_dtypes covers bfloat16): a device-side cast would first place the whole
    # tensor on one device, defeating a sharded `device_put`.
    return a if jnp.dtype(dtype) == a.dtype else a.astype(jnp.dtype(dtype))


def _get(tree, path):
    for p in path:
        if not isinstance(tree, dict) or p not in tree:
            return None
        tree = tree[p]
    return tree


def _set(tree, path, value):
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value
