"""Routed experts as grouped matmuls: each expert multiplies only the rows routed to it.

The rows arrive sorted by expert (`tsjax.layers.moe.dispatch`), so expert e owns the
contiguous run `sizes[e]` long. Two ways to run the experts over their runs, both exact:

- `ragged_ffn`: `jax.lax.ragged_dot_general`, one grouped GEMM per projection. GPU and TPU
  lower it to a grouped GEMM kernel. XLA:CPU does not: JAX lowers it there to a dense
  product of every row with every expert (masked), which measured 3-15x slower than computing
  all experts densely (`python benchmarks/moe.py`).
- `tiled_ffn`: a loop over row tiles, each tile `t` rows of one expert (an expert's last tile
  runs past its rows; the next tile overwrites the excess). Only tiles that exist run
  (`lax.fori_loop` over a dynamic count), so the work is the routed rows plus at most
  `t - 1` padding rows an expert, and each used expert's weights are read once a tile.
  XLA:CPU copies a dynamically indexed weight slice before multiplying it (as it does a
  scanned layer's weights, see `tsjax.models.decoder.unroll_layers_default`), so every tile
  pays a copy of its expert's weights, and `tile_rows` sizes tiles to make few of them.

Expert weights keep GGUF's layout, [E, out, in] (gate and up as one [E, 2F, in] matrix
where the file fuses them, Gemma 4), in one of four formats (a dict per projection):

- float32 (`weight`);
- bfloat16, stored as its bits (`weight` uint16): XLA:CPU converts a bfloat16 array that a
  loop slices to float32, whole, before the loop (every call); integers it leaves alone;
- int8 with a float scale per block of 32 along `in` (`weight` int8 + `scales` [E, out,
  in/32], Q8_0's layout; MXFP4 converts to it losslessly, `tsjax.mxfp4.to_int8_blocks`);
- MXFP4 (`scales` uint8 [E, out, in/32] + `nibbles` uint8 [E, out, in/32, 16]).

Tiles decode their expert's matrix inside the loop, where XLA:CPU copies it anyway.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp

from tsjax import mxfp4

Array = jax.Array
Matrix = Mapping[str, Array]  # one projection of every expert, in one of the formats above

Q8_BLOCK = 32
MAX_TILE = 64  # rows a tile: 64 beat 32 and 128 at a 512-token prefill (benchmarks/moe.py)

# (gate or None, up) -> hidden; gate is None for the families without a gate (Nemotron-H).
ACTIVATIONS: dict[str, Callable[..., Array]] = {
    "silu": lambda g, u: jax.nn.silu(g) * u,
    "gelu_tanh": lambda g, u: jax.nn.gelu(g, approximate=True) * u,
    "relu2": lambda g, u: jnp.square(jax.nn.relu(u)),
}


def swiglu_oai(g: Array, u: Array, alpha: float, limit: float) -> Array:
    """GPT-OSS's clamped SwiGLU: the gate capped at `limit`, up clamped to +-`limit`, the
    sigmoid sharpened by `alpha`, and up shifted by one."""
    g = jnp.minimum(g, limit)
    u = jnp.clip(u, -limit, limit)
    return g * jax.nn.sigmoid(alpha * g) * (u + 1.0)


def activation_fn(name: str, alpha: float = 1.702, limit: float = 7.0) -> Callable[..., Array]:
    """The expert hidden activation `name` ("silu", "gelu_tanh", "relu2", "swiglu_oai")."""
    if name == "swiglu_oai":
        return lambda g, u: swiglu_oai(g, u, alpha, limit)
    return ACTIVATIONS[name]


def matrix_format(m: Matrix) -> str:
    """ "mxfp4", "int8", "bf16" (bits in uint16) or "float"."""
    if "nibbles" in m:
        return "mxfp4"
    return {jnp.int8: "int8", jnp.uint16: "bf16"}.get(m["weight"].dtype.type, "float")


def bf16_bits(w) -> Array:
    """bfloat16 weights -> the uint16 bits the "bf16" expert format stores."""
    return jax.lax.bitcast_convert_type(jnp.asarray(w, jnp.bfloat16), jnp.uint16)


def expert_matrix(m: Matrix, e: Array | int, dtype) -> Array:
    """Expert e's [out, in] matrix of projection `m`, decoded: float32 and bfloat16 keep their
    dtype (bfloat16 multiplies narrow, see `_mm`), int8 and MXFP4 become `dtype`."""
    fmt = matrix_format(m)
    if fmt == "mxfp4":
        return mxfp4.decode(m["scales"][e], m["nibbles"][e], dtype)
    w = m["weight"][e]
    if fmt == "int8":
        out, n = w.shape
        blocks = w.reshape(out, n // Q8_BLOCK, Q8_BLOCK).astype(jnp.float32)
        return (blocks * m["scales"][e][..., None]).reshape(out, n).astype(dtype)
    return jax.lax.bitcast_convert_type(w, jnp.bfloat16) if fmt == "bf16" else w


def all_experts(m: Matrix, dtype) -> Array:
    """Every expert's matrix decoded: [E, out, in] (what a grouped GEMM takes)."""
    fmt = matrix_format(m)
    if fmt in ("float", "bf16"):
        w = m["weight"]
        return jax.lax.bitcast_convert_type(w, jnp.bfloat16) if fmt == "bf16" else w
    return jax.vmap(lambda e: expert_matrix(m, e, dtype))(jnp.arange(n_experts(m)))


def n_experts(m: Matrix) -> int:
    return next(iter(m.values())).shape[0]


def _mm(x: Array, w: Array) -> Array:
    """x [t, in] @ w[out, in]^T -> [t, out] in x's dtype; narrower weights take x in their
    dtype and accumulate in float32 (as `tsjax.layers.linear` does)."""
    if w.dtype.itemsize < x.dtype.itemsize:
        y = jax.lax.dot_general(
            x.astype(w.dtype), w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
        )
        return y.astype(x.dtype)
    return jax.lax.dot_general(x, w.astype(x.dtype), (((1,), (1,)), ((), ())))


def gate_and_up(p: Mapping[str, Matrix], proj: Callable[[str, Array], Array], x: Array):
    """(gate or None, up) of rows x through `proj`: one product for a fused "gate_up" matrix
    [E, 2F, in] (Gemma 4's GGUF layout, the gate's rows first), else one each."""
    if "gate_up" in p:
        y = proj("gate_up", x)
        f = y.shape[-1] // 2
        return y[..., :f], y[..., f:]
    return (proj("gate", x) if "gate" in p else None), proj("up", x)


def expert_ffn(x: Array, e: Array, p: Mapping[str, Matrix], act: Callable[..., Array]) -> Array:
    """Expert e on rows x [t, in] -> [t, out]: down(act(gate(x) + b, up(x) + b)) + b, with the
    gate and the biases where `p` has them."""

    def proj(name: str, h: Array) -> Array:
        y = _mm(h, expert_matrix(p[name], e, h.dtype))
        bias = p.get(name + "_bias")
        return y if bias is None else y + bias[e].astype(y.dtype)

    return proj("down", act(*gate_and_up(p, proj, x)))


def tile_rows(n_rows: int, n_experts: int) -> int:
    """Rows a tile for `n_rows` routed rows over `n_experts` experts. Each tile copies its
    expert's weights (XLA:CPU) and computes every row of the tile, used or not, so a tile
    should hold an expert's usual largest share, mean + 2 standard deviations of a Poisson
    count, rounded up to a power of two, at most `MAX_TILE`; one row when experts average at
    most one (matrix-vector products). Measured best on XLA:CPU (benchmarks/moe.py): 1 row
    at one token, 8 at 16 tokens (32 experts top-4, and 8 experts top-2), 64 at 512."""
    mean = n_rows / n_experts
    if mean <= 1:
        return 1
    return min(1 << math.ceil(math.log2(mean + 2 * math.sqrt(mean))), MAX_TILE)


def tiled_ffn(
    xs: Array,
    sizes: Array,
    p: Mapping[str, Matrix],
    act: Callable[..., Array],
    tile: int,
    first_expert: Array | int = 0,
) -> Array:
    """Rows sorted by expert, xs [n, in] with sizes [E] rows per expert -> [n, out].

    `p` holds the experts first_expert .. first_expert + El - 1 (El = their leading axis; all
    of them unless experts are split over devices); rows of other experts come out zero."""
    n, e_all = xs.shape[0], sizes.shape[0]
    e_local = n_experts(p["down"])
    out_dim = p["down"]["scales" if "nibbles" in p["down"] else "weight"].shape[1]
    # Tile j of all experts: expert tile_e[j], first row tile_r[j]. Their number is at most
    # sum_e ceil(n_e / t) <= (n + min(E, n) * (t - 1)) / t.
    n_tiles = (n + min(e_all, n) * (tile - 1)) // tile
    ends = jnp.cumsum(sizes)
    per_e = (sizes + tile - 1) // tile
    tile_end = jnp.cumsum(per_e)
    j = jnp.arange(n_tiles, dtype=jnp.int32)
    tile_e = jnp.minimum(jnp.searchsorted(tile_end, j, side="right"), e_all - 1)
    tile_r = ends[tile_e] - sizes[tile_e] + (j - (tile_end[tile_e] - per_e[tile_e])) * tile
    lo = first_expert
    first = tile_end[lo] - per_e[lo]
    last = tile_end[lo + e_local - 1]

    xs = jnp.pad(xs, ((0, tile), (0, 0)))

    def body(i, out):
        r = tile_r[i]
        xt = jax.lax.dynamic_slice_in_dim(xs, r, tile)
        y = expert_ffn(xt, tile_e[i] - lo, p, act)
        return jax.lax.dynamic_update_slice_in_dim(out, y.astype(out.dtype), r, 0)

    out = jax.lax.fori_loop(first, last, body, jnp.zeros((n + tile, out_dim), xs.dtype))[:n]
    if e_local == e_all:
        return out
    return _keep_rows(out, ends, sizes, lo, e_local)


def ragged_ffn(
    xs: Array,
    sizes: Array,
    p: Mapping[str, Matrix],
    act: Callable[..., Array],
    first_expert: Array | int = 0,
) -> Array:
    """`tiled_ffn` as grouped GEMMs (`jax.lax.ragged_dot_general`); same arguments."""
    n, e_all = xs.shape[0], sizes.shape[0]
    e_local = n_experts(p["down"])
    ends = jnp.cumsum(sizes)
    lo = first_expert
    local = e_local != e_all
    group_sizes = sizes
    if local:  # this device's experts' rows first: the rows past their groups come out zero
        shift = ends[lo] - sizes[lo]
        xs = jnp.roll(xs, -shift, axis=0)
        group_sizes = jax.lax.dynamic_slice_in_dim(sizes, lo, e_local)
    row_e = jnp.repeat(jnp.arange(e_local), group_sizes, total_repeat_length=n)
    dims = jax.lax.RaggedDotDimensionNumbers(
        dot_dimension_numbers=(([1], [2]), ([], [])),
        lhs_ragged_dimensions=[0],
        rhs_group_dimensions=[0],
    )

    def proj(name: str, h: Array) -> Array:
        w = all_experts(p[name], h.dtype)
        hn = h.astype(w.dtype) if w.dtype.itemsize < h.dtype.itemsize else h
        y = jax.lax.ragged_dot_general(
            hn, w.astype(hn.dtype), group_sizes, dims, preferred_element_type=jnp.float32
        ).astype(h.dtype)
        bias = p.get(name + "_bias")
        return y if bias is None else y + bias[row_e].astype(y.dtype)

    out = proj("down", act(*gate_and_up(p, proj, xs)))
    if not local:
        return out
    return _keep_rows(jnp.roll(out, shift, axis=0), ends, sizes, lo, e_local)


def _keep_rows(out: Array, ends: Array, sizes: Array, lo, e_local: int) -> Array:
    """out with the rows outside experts lo .. lo + e_local - 1 set to zero."""
    start = ends[lo] - sizes[lo]
    stop = ends[lo + e_local - 1]
    r = jnp.arange(out.shape[0])
    return jnp.where(((r >= start) & (r < stop))[:, None], out, 0)
