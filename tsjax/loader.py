"""GGUF tensors -> the Flax params pytree, one tensor at a time, where the parameter table
(`tsjax.models.decoder.PARAM_TABLE`) says each goes.

A stacked segment's tensors are written into one preallocated [L, ...] host array per
parameter (the layout `nn.scan` expects), so peak host memory is the stacked parameter being
filled plus one dequantized tensor, never two copies of the model. With a block format
(`blocks="q8"` / `"q4"`) each tensor goes straight into its blocks (from the file's own bytes
where they already are blocks of that form: no float copy at all), so the float model never
exists: peak host memory is the narrow params plus one tensor.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict
from tqdm.auto import tqdm

from tsjax.gguf import GGUFError, GGUFFile
from tsjax.kernels.blocks import tensor_blocks
from tsjax.models import Decoder
from tsjax.models.decoder import PARAM_TABLE
from tsjax.quantize import int8_blocks, is_expert_matrix
from tsjax.quants import FOUR_BIT_TYPES
from tsjax.stack import Placement

TABLE = ("embed", "embedding")


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's interleaving of q/k rows. w: [heads*H, D] (GGUF's [out, in])."""
    out, d = w.shape
    h = out // n_heads
    return w.reshape(n_heads, h // 2, 2, d).swapaxes(1, 2).reshape(out, d)


def param_shapes(model: Decoder):
    """The params pytree's shapes (and dtypes), from the model itself (so the loader cannot
    drift from it)."""
    cache = model.new_cache(1, 8)
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
    g: GGUFFile,
    model: Decoder,
    progress: bool = True,
    device_put=None,
    narrow: Decoder | None = None,
) -> tuple[dict, LoadStats]:
    """Read every tensor `model` (a float model: `tsjax.quantize` makes bf16 and int8 weights
    from these) needs into a params pytree on device, in its layout: layer weights one array
    per layer under "layers_<i>" (`model.unrolled`) or stacked under "layers" (see
    `tsjax.stack.Segment`).

    `narrow`: the same model in a block format ("q8" / "q4"): every parameter it holds in
    blocks (Linear weights and the embedding table whose input size is a multiple of 32) is
    stored so instead (`block_leaves`), tensor by tensor.
    `device_put(path, array)` lets callers place each leaf (e.g. with a sharding); default
    is `jax.device_put` onto the default device.
    """
    t0 = time.perf_counter()
    cfg, dtype = model.cfg, model.dtype
    shapes = param_shapes(model)
    put = device_put or (lambda path, a: jax.device_put(a))
    np_dtype = np.dtype(jnp.dtype(dtype).name) if dtype != jnp.bfloat16 else np.float32
    names = g.tensor_names()
    places = _present(model, shapes)
    blocks = narrow.quant if narrow is not None else None
    # one trace of the block model tells both kinds of block leaves (each trace of a model's
    # init is ~1.5 s of a SmolLM2 load)
    narrow_flat = flatten_dict(param_shapes(narrow)) if narrow is not None else {}
    in_blocks, in_experts = _block_paths(narrow_flat), _expert_block_paths(narrow_flat)
    expected = [name for place in places for name in place.tensors]
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

    for place in places:
        leaf = _get(shapes, place.path)
        if place.path in in_blocks or place.path in in_experts:
            make = block_leaves if place.path in in_blocks else expert_blocks
            for key, arr in make(g, place, leaf.shape, cfg, blocks, bar.update).items():
                _set(params, (*place.path[:-1], key), put((*place.path[:-1], key), arr))
            continue
        if not place.stacked:
            store(place.path, _convert(g, place.tensors[0], cfg, np_dtype, leaf.shape))
            bar.update(1)
            continue
        stacked = np.empty(leaf.shape, np_dtype)
        for i, name in enumerate(place.tensors):
            stacked[i] = _convert(g, name, cfg, np_dtype, leaf.shape[1:])
            bar.update(1)
        store(place.path, stacked)
        del stacked
    bar.close()
    if blocks and cfg.tied_embeddings and "lm_head" not in params and TABLE[1] in params["embed"]:
        # a float table (input size not a multiple of 32): the tied projection is a float
        # Linear of the block model, on the same array
        params["lm_head"] = {"weight": params["embed"][TABLE[1]]}
    n_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(params))
    stats = LoadStats(time.perf_counter() - t0, len(expected), g.total_tensor_bytes(), n_bytes)
    return params, stats


def _block_paths(flat: dict) -> set[tuple[str, ...]]:
    """The float parameter paths (`.../weight`, the embedding table) the block model whose
    flattened param shapes are `flat` holds in blocks instead: where its params declare int8
    blocks `q` (what an init declares; the loader makes 4-bit ones where the file has them)."""
    return {
        (*p[:-1], "embedding" if p[:-1] == TABLE[:1] else "weight") for p in flat if p[-1] == "q"
    }


def _expert_block_paths(flat: dict) -> set[tuple[str, ...]]:
    """The routed experts' matrices (`.../moe/<projection>/weight`) the block model whose
    flattened param shapes are `flat` holds as int8 blocks (`tsjax.layers.moe.expert_format`)."""
    return {p for p, leaf in flat.items() if is_expert_matrix(p) and leaf.dtype == jnp.int8}


def expert_blocks(
    g: GGUFFile, place: Placement, shape: tuple[int, ...], cfg, quant: str, done=lambda n: None
) -> dict[str, np.ndarray]:
    """One routed-expert parameter, [..., E, out, in] float `shape`, as int8 blocks of 32:
    {"weight" int8, "scales" float32 [..., E, out, in/32]} (`tsjax.quantize.int8_blocks`:
    a Q8_0 or MXFP4 file's experts exactly), one tensor at a time (a stacked parameter's
    layers written into preallocated [L, ...] arrays): the float experts never exist whole."""
    e, n, k = shape[-3:]
    out: dict[str, np.ndarray] = {}
    for i, name in enumerate(place.tensors):
        q, d = (np.asarray(a) for a in int8_blocks(_convert(g, name, cfg, np.float32, (e, n, k))))
        done(1)
        if not place.stacked:
            return {"weight": q, "scales": d}
        for key, arr in (("weight", q), ("scales", d)):
            if key not in out:
                out[key] = np.empty((len(place.tensors), *arr.shape), arr.dtype)
            out[key][i] = arr
    return out


def block_leaves(
    g: GGUFFile, place: Placement, shape: tuple[int, ...], cfg, quant: str, done=lambda n: None
) -> dict[str, np.ndarray]:
    """One parameter's blocks (`tsjax.kernels.blocks`), [..., out, in] float `shape`: {"q",
    "d"} or, with "q4" where every tensor of it is 4-bit in the file, {"qs", "d", "m"}; a
    stacked parameter's layers are written into preallocated [L, ...] arrays one by one."""
    four = quant == "q4" and all(g.info(t).qtype in FOUR_BIT_TYPES for t in place.tensors)
    n, k = shape[-2:]
    out: dict[str, np.ndarray] = {}
    for i, name in enumerate(place.tensors):
        qtype = g.info(name).qtype
        from_raw = (four and qtype in FOUR_BIT_TYPES) or qtype == "Q8_0"
        if from_raw:
            raw, w = raw_rows(g, name, cfg), None
            if raw.shape[0] != n:
                raise GGUFError(f"{g.path.name}: tensor {name} has {raw.shape[0]} rows, "
                                f"model expects {n}")  # fmt: skip
        else:
            raw, w = None, _convert(g, name, cfg, np.float32, (n, k))
        part = tensor_blocks(w, qtype, raw, four, shape=(n, k))
        del w, raw
        g.release(name)
        done(1)
        if not place.stacked:
            return part
        for key, arr in part.items():
            if key not in out:
                out[key] = np.empty((len(place.tensors), *arr.shape), arr.dtype)
            out[key][i] = arr
    return out


def raw_rows(g: GGUFFile, name: str, cfg) -> np.ndarray:
    """A tensor's own bytes [rows, bytes per row], its rows in the order the model uses
    (llama.cpp's q/k interleaving undone, as `_convert` does for the float tensor)."""
    raw = g.raw(name)
    if cfg.permuted_qk and name.endswith(("attn_q.weight", "attn_k.weight")):
        heads = cfg.n_heads if "attn_q" in name else cfg.n_kv_heads
        raw = raw[unpermute_qk(np.arange(raw.shape[0])[:, None], heads)[:, 0]]
    return raw


def _present(model: Decoder, shapes) -> list[Placement]:
    """The table's placements of the parameters `model` has (its config picks among them)."""
    return [p for p in PARAM_TABLE.placements(model.plan()) if _get(shapes, p.path) is not None]


def _convert(g, name, cfg, np_dtype, want_shape) -> np.ndarray:
    w = g.tensor(name, np.float32)
    if cfg.permuted_qk and name.endswith(("attn_q.weight", "attn_k.weight")):
        heads = cfg.n_heads if "attn_q" in name else cfg.n_kv_heads
        w = unpermute_qk(w, heads)
    if w.shape != tuple(want_shape):
        raise GGUFError(
            f"{g.path.name}: tensor {name} has shape {w.shape}, model expects {tuple(want_shape)}"
        )
    out = np.ascontiguousarray(w, dtype=np_dtype)
    g.release(name)  # read: its file pages need not stay resident (`GGUFFile.release`)
    return out


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
