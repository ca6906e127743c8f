"""Mixture-of-experts feed-forward: a router picks `top_k` of `n_experts` expert MLPs for each
token, the chosen experts run on their tokens only, and their outputs are summed with the
router's weights (plus, in some families, a shared expert every token goes through).

What differs between families is data (`MoESpec`); each setting names the family that needs
it, as llama.cpp's `build_moe_ffn` and transformers' modeling files do it:

- gpt-oss: logits with a bias; top-k of the logits, softmax over those k; clamped SwiGLU
  experts (alpha 1.702, limit 7, up + 1) with biases; no shared expert.
- qwen35moe: softmax scores; top-k, renormalised; SwiGLU experts; a SwiGLU shared expert
  scaled by sigmoid(x @ w).
- nemotron_h_moe: sigmoid scores; top-k of score + a selection bias, weighed by the unbiased
  scores, renormalised, times a routed scale; relu^2 experts without a gate, optionally on
  a latent projection of x; a relu^2 shared expert.
- gemma4 (MoE): softmax scores of the router's own normed input (rms_norm(x) * scale /
  sqrt(D)); top-k, renormalised, times a learned scale per expert; GeGLU experts whose gate
  and up are one matrix (one product a tile); the family's dense MLP runs beside it.

The token -> expert dispatch sorts the (token, choice) pairs by expert, runs the experts as
grouped matmuls over their contiguous rows (`tsjax.layers.experts`: ragged GEMMs on GPU/TPU,
row tiles on CPU), and gathers the results back. Nothing computes an expert on a token that
did not choose it.

Expert parallelism: with `ExpertParallel`, each device of the mesh axis holds E / n experts
(logical axis "experts", `MOE_RULES`), computes the rows routed to them, and one `psum` adds the
per-(token, choice) outputs, each of which only one device computed: the sum adds zeros, so
the sharded layer gives the unsharded layer's values exactly.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from tsjax.layers.experts import Q8_BLOCK, activation_fn, ragged_ffn, tile_rows, tiled_ffn
from tsjax.layers.linear import Linear
from tsjax.layers.norms import rms_norm
from tsjax.mxfp4 import BLOCK as MXFP4_BLOCK
from tsjax.quants import BLOCK_QUANTS
from tsjax.stack import Param

# llama.cpp clamps the renormalising sum to float16's smallest normal number.
MIN_WEIGHT_SUM = 6.103515625e-5


@dataclass(frozen=True)
class MoESpec:
    """One family's MoE block. Shapes: D model dim (the layer's input), F `ffn_dim`."""

    n_experts: int
    top_k: int
    ffn_dim: int
    scoring: str = "softmax"  # router probabilities: "softmax" or "sigmoid" of the logits
    softmax_topk: bool = False  # gpt-oss: top-k of the logits, softmax over those k
    normalize: bool = False  # renormalise the k weights to sum to one
    routed_scale: float = 1.0  # multiplies the k weights (nemotron_h_moe)
    router_bias: bool = False  # gpt-oss: the router's logits have a bias
    selection_bias: bool = False  # nemotron_h_moe: added to the scores to choose, not to weigh
    n_groups: int = 1  # grouped choice (DeepSeek-V3 style): experts in n_groups groups,
    groups_used: int = 1  # the best groups_used groups (by their top-2 score sum) compete
    router_norm: bool = False  # gemma4: the router sees rms_norm(x) * scale / sqrt(D)
    norm_eps: float = 1e-6
    expert_scale: bool = False  # gemma4: a learned multiplier per expert on its output
    fused_gate_up: bool = False  # gemma4: gate and up one matrix [E, 2F, D] ("gate_up")
    activation: str = "silu"  # "silu", "gelu_tanh", "relu2" (no gate) or "swiglu_oai"
    expert_bias: bool = False  # gpt-oss: biases on the experts' gate, up and down
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    latent_dim: int = 0  # nemotron (Super): experts run on x projected to this size
    shared_ffn_dim: int = 0  # a shared expert of this size, same activation (0: none)
    shared_gate: bool = False  # qwen35moe: the shared expert scaled by sigmoid(x @ w)

    @property
    def gated(self) -> bool:
        return self.activation != "relu2"


@dataclass(frozen=True)
class ExpertParallel:
    """Split the experts over mesh axis `axis` (E must divide by its size); `rows` names the
    mesh axis the token rows are split over (each group of devices routes its own rows)."""

    mesh: Mesh
    axis: str = "tp"
    rows: str | None = None

    def size(self, axis: str | None) -> int:
        return self.mesh.shape[axis] if axis else 1


# Logical axes of the MoE block's params (paths under the block), for `tsjax.sharding`:
# experts split over a mesh axis, each expert whole ("expert_ffw" never split: the mesh axis
# is taken). A model whose expert count does not divide keeps its experts replicated
# (`tsjax.sharding.logical_to_spec`). The router (E x D floats) stays whole on every device:
# each routes all of its rows. Expert matrices are [E, out, in] (`weight`); the Linear
# layers are listed by their `kernel` [in, out], as `tsjax.sharding` lists them.
MOE_RULES: dict[str, str | None] = {"experts": "tp", "expert_ffw": None}
MOE_PARAM_AXES: dict[tuple[str, ...], tuple[str | None, ...]] = {
    ("router", "weight"): (None, "embed"),
    ("router", "bias"): (None,),
    ("router", "selection_bias"): (None,),
    ("router", "input_scale"): ("embed",),
    ("expert_scale",): (None,),
    ("gate", "weight"): ("experts", "expert_ffw", "embed"),
    ("up", "weight"): ("experts", "expert_ffw", "embed"),
    ("gate_up", "weight"): ("experts", "expert_ffw", "embed"),
    ("down", "weight"): ("experts", "embed", "expert_ffw"),
    ("gate_bias",): ("experts", "expert_ffw"),
    ("up_bias",): ("experts", "expert_ffw"),
    ("down_bias",): ("experts", "embed"),
    ("shared", "gate", "kernel"): ("embed", "ffw"),
    ("shared", "up", "kernel"): ("embed", "ffw"),
    ("shared", "down", "kernel"): ("ffw", "embed"),
    ("shared_gate", "kernel"): ("embed", None),
    ("latent_down", "kernel"): ("embed", None),
    ("latent_up", "kernel"): (None, "embed"),
}
_EXPERT_MATRICES = ("gate", "up", "gate_up", "down")


def moe_param_axes(path: tuple[str, ...]) -> tuple[str | None, ...]:
    """Logical axes of the MoE param at `path` (relative to the block). Quantized expert
    leaves have their matrix's axes, the last one counted in blocks (`scales`, and int8's
    `weight`), the MXFP4 `nibbles` a trailing byte axis. Linear leaves follow
    `tsjax.sharding.param_axes`: `weight` is the kernel's axes reversed."""
    path = tuple(path)
    if len(path) == 2 and path[0] in _EXPERT_MATRICES:
        axes = MOE_PARAM_AXES[(path[0], "weight")]
        return (*axes, None) if path[1] == "nibbles" else axes
    last = path[-1]
    if last in ("weight", "kernel_scale", "input_scale") and path[0] != "router":
        kernel = MOE_PARAM_AXES[(*path[:-1], "kernel")]
        return {"weight": kernel[::-1], "kernel_scale": kernel[1:], "input_scale": kernel[:1]}[last]
    return MOE_PARAM_AXES[path]


# GGUF's tensor names of the MoE block's params (llama.cpp's `LLM_TENSOR_FFN_*_EXPS`, `_SHEXP`,
# `FFN_GATE_INP`, `FFN_EXP_PROBS_B`, `FFN_LATENT_*`), by their path under the block.
GGUF_NAMES: dict[tuple[str, ...], str] = {
    ("router", "weight"): "ffn_gate_inp.weight",
    ("router", "bias"): "ffn_gate_inp.bias",
    ("router", "selection_bias"): "exp_probs_b.bias",
    ("gate", "weight"): "ffn_gate_exps.weight",
    ("up", "weight"): "ffn_up_exps.weight",
    ("down", "weight"): "ffn_down_exps.weight",
    ("gate_bias",): "ffn_gate_exps.bias",
    ("up_bias",): "ffn_up_exps.bias",
    ("down_bias",): "ffn_down_exps.bias",
    ("shared", "gate", "weight"): "ffn_gate_shexp.weight",
    ("shared", "up", "weight"): "ffn_up_shexp.weight",
    ("shared", "down", "weight"): "ffn_down_shexp.weight",
    ("shared_gate", "weight"): "ffn_gate_inp_shexp.weight",
    ("latent_down", "weight"): "ffn_latent_down.weight",
    ("latent_up", "weight"): "ffn_latent_up.weight",
}


def moe_params(prefix: tuple[str, ...]) -> tuple[Param, ...]:
    """The parameter table's entries (`tsjax.stack.Param`) of a MoE block whose params live
    under `prefix` in its layer: every parameter GGUF names (`GGUF_NAMES`; a family's spec
    decides which exist), with the axes of `moe_param_axes`."""
    return tuple(
        Param(name, (*prefix, *path), moe_param_axes(path)) for path, name in GGUF_NAMES.items()
    )


class Dispatch(NamedTuple):
    """(token, choice) pairs sorted by expert: pair `order[i]` (= token * k + choice) is row i;
    `sizes[e]` rows belong to expert e."""

    order: jax.Array  # [M*k] int32
    sizes: jax.Array  # [E] int32


def route(
    logits: jax.Array,
    spec: MoESpec,
    selection_bias: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Router logits [M, E] (float32, any router bias added) -> (weights [M, k] float32,
    experts [M, k] int32)."""
    k = spec.top_k
    if spec.softmax_topk:
        top, experts = jax.lax.top_k(logits, k)
        weights = jax.nn.softmax(top, axis=-1)
    else:
        scores = jax.nn.softmax(logits, -1) if spec.scoring == "softmax" else jax.nn.sigmoid(logits)
        choice = scores if selection_bias is None else scores + selection_bias
        if spec.n_groups > 1:
            choice = _best_groups(choice, spec.n_groups, spec.groups_used)
        _, experts = jax.lax.top_k(choice, k)
        weights = jnp.take_along_axis(scores, experts, axis=-1)
    if spec.normalize:
        weights = weights / jnp.maximum(weights.sum(-1, keepdims=True), MIN_WEIGHT_SUM)
    if spec.routed_scale != 1.0:
        weights = weights * spec.routed_scale
    return weights, experts.astype(jnp.int32)


def _best_groups(choice: jax.Array, n_groups: int, used: int) -> jax.Array:
    """choice [M, E] with the experts outside each row's `used` best groups at -inf; a group
    scores the sum of its two best experts."""
    m, e = choice.shape
    grouped = choice.reshape(m, n_groups, e // n_groups)
    group_score = jax.lax.top_k(grouped, 2)[0].sum(-1)  # [M, G]
    _, best = jax.lax.top_k(group_score, used)
    keep = jnp.zeros((m, n_groups), bool).at[jnp.arange(m)[:, None], best].set(True)
    return jnp.where(keep[:, :, None], grouped, -jnp.inf).reshape(m, e)


def dispatch(experts: jax.Array, n_experts: int) -> Dispatch:
    """experts [M, k] -> the pairs sorted by expert (stable: a token's choices keep their
    order, tokens keep theirs)."""
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True).astype(jnp.int32)
    return Dispatch(order, jnp.bincount(flat, length=n_experts).astype(jnp.int32))


def combine(ys: jax.Array, d: Dispatch, weights: jax.Array) -> jax.Array:
    """Sorted expert outputs ys [M*k, D] -> [M, D], each token's k outputs weighted (in
    float32) and summed in choice order."""
    m, k = weights.shape
    inverse = jnp.zeros_like(d.order).at[d.order].set(jnp.arange(m * k, dtype=jnp.int32))
    per_pair = ys[inverse].reshape(m, k, -1).astype(jnp.float32)
    return jnp.einsum("mkd,mk->md", per_pair, weights).astype(ys.dtype)


def routed_experts(
    x: jax.Array,
    weights: jax.Array,
    experts: jax.Array,
    p: Mapping,
    spec: MoESpec,
    impl: str,
    tile: int,
    first_expert: jax.Array | int = 0,
    reduce_axis: str | None = None,
) -> jax.Array:
    """x [M, D], the router's choice (weights, experts [M, k]) and the experts' params `p`
    (projections "gate", "up", "down" and their "_bias") -> [M, D]. `p` may hold only
    experts first_expert..: the others' outputs are summed over mesh axis `reduce_axis`."""
    d = dispatch(experts, spec.n_experts)
    xs = x[d.order // spec.top_k]  # [M*k, D], sorted by expert
    act = activation_fn(spec.activation, spec.swiglu_alpha, spec.swiglu_limit)
    if impl == "ragged":
        ys = ragged_ffn(xs, d.sizes, p, act, first_expert)
    else:
        ys = tiled_ffn(xs, d.sizes, p, act, tile, first_expert)
    if reduce_axis is not None:
        ys = jax.lax.psum(ys, reduce_axis)
    return combine(ys, d, weights)


def default_impl() -> str:
    """Grouped GEMMs where the backend has them; row tiles on CPU (see tsjax.layers.experts)."""
    return "tiles" if jax.default_backend() == "cpu" else "ragged"


class Router(nn.Module):
    """Router logits in float32 and the family's choice (`route`)."""

    spec: MoESpec

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x [M, D] -> (weights [M, k] float32, experts [M, k] int32)."""
        s, e, dim = self.spec, self.spec.n_experts, x.shape[-1]
        x = x.astype(jnp.float32)
        if s.router_norm:
            scale = self.param("input_scale", nn.initializers.ones, (dim,), jnp.float32)
            x = rms_norm(x, scale * dim**-0.5, s.norm_eps)
        w = self.param("weight", nn.initializers.normal(0.02), (e, dim), jnp.float32)
        logits = jax.lax.dot_general(x, w.astype(jnp.float32), (((1,), (1,)), ((), ())))
        if s.router_bias:
            logits = logits + self.param("bias", nn.initializers.zeros, (e,), jnp.float32)
        sel = None
        if s.selection_bias:
            sel = self.param("selection_bias", nn.initializers.zeros, (e,), jnp.float32)
        return route(logits, s, sel)


class ExpertMatrix(nn.Module):
    """One projection of every expert, [E, out, in], in the block's weight format."""

    shape: tuple[int, int, int]
    quant: str | None = None
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self) -> dict[str, jax.Array]:
        e, out, n = self.shape
        zeros = nn.initializers.zeros
        if self.quant in ("mxfp4", "int8") and n % Q8_BLOCK:
            raise ValueError(f"{self.quant} experts take inputs in blocks of 32, not {n}")
        if self.quant == "mxfp4":
            g = n // MXFP4_BLOCK
            return {
                "scales": self.param("scales", zeros, (e, out, g), jnp.uint8),
                "nibbles": self.param("nibbles", zeros, (e, out, g, 16), jnp.uint8),
            }
        if self.quant == "int8":
            return {
                "weight": self.param("weight", zeros, self.shape, jnp.int8),
                "scales": self.param("scales", zeros, (e, out, n // Q8_BLOCK), jnp.float32),
            }
        if self.quant == "bf16":  # its bits (tsjax.layers.experts explains why)
            return {"weight": self.param("weight", zeros, self.shape, jnp.uint16)}
        return {
            "weight": self.param("weight", nn.initializers.normal(0.02), self.shape, self.dtype)
        }


class SharedExpert(nn.Module):
    """The shared expert: a dense MLP with the routed experts' activation."""

    ffn_dim: int
    activation: str
    dtype: jnp.dtype = jnp.float32
    quant: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        act = activation_fn(self.activation)
        up = Linear(self.ffn_dim, False, self.dtype, self.quant, name="up")(x)
        gate = None
        if self.activation != "relu2":
            gate = Linear(self.ffn_dim, False, self.dtype, self.quant, name="gate")(x)
        return Linear(x.shape[-1], False, self.dtype, self.quant, name="down")(act(gate, up))


def expert_format(quant: str | None, n_in: int) -> str | None:
    """The routed experts' format, for `n_in` inputs, in a model of weight format `quant`:
    the block formats ("q8", "q4") hold them as int8 blocks of 32 (Q8_0's layout: a Q8_0 or
    MXFP4 file's experts exactly; the block kernels multiply 2-D weights, not a tile's expert
    picked in the step) where `n_in` divides into blocks, else float as a block model's
    Linear does; every other format as itself."""
    if quant in BLOCK_QUANTS:
        return "int8" if n_in % Q8_BLOCK == 0 else None
    return quant


class MoE(nn.Module):
    """The MoE block: router, routed experts, optional latent projection and shared expert.

    `quant` is the model's weight format; the routed experts take `expert_format(quant)`
    (`tsjax.layers.experts`): None (the model dtype), "bf16" (stored as uint16 bits), "int8"
    (blocks of 32 with a float scale; also under "q8" and "q4") or "mxfp4" (GGUF's blocks,
    decoded in the step); the router stays float32, the shared expert and projections use
    `Linear` in `quant` (float under "mxfp4").
    `impl` ("tiles" / "ragged") and `tile` (rows a tile) override the defaults. Param paths
    and their logical axes: `MOE_PARAM_AXES`."""

    spec: MoESpec
    dtype: jnp.dtype = jnp.float32
    quant: str | None = None
    impl: str | None = None
    tile: int | None = None
    parallel: ExpertParallel | None = None

    @nn.compact
    def __call__(self, x: jax.Array, router_x: jax.Array | None = None) -> jax.Array:
        """x: [..., D] -> [..., D]. `router_x` [..., D]: what the router sees when it is not x
        (gemma4 routes on the residual and feeds the experts its pre-norm)."""
        s = self.spec
        lead, dim = x.shape[:-1], x.shape[-1]
        xf = x.reshape(-1, dim)  # [M, D]
        xr = xf if router_x is None else router_x.reshape(-1, dim)
        weights, experts = Router(s, name="router")(xr)
        if s.expert_scale:
            scale = self.param("expert_scale", nn.initializers.ones, (s.n_experts,), jnp.float32)
            weights = weights * scale[experts]

        lin_quant = None if self.quant == "mxfp4" else self.quant
        xe = xf
        if s.latent_dim:
            xe = Linear(s.latent_dim, False, self.dtype, lin_quant, name="latent_down")(xf)
        y = self._routed(xe, weights, experts, self._expert_params(xe.shape[-1]))
        if s.latent_dim:
            y = Linear(dim, False, self.dtype, lin_quant, name="latent_up")(y)
        if s.shared_ffn_dim:
            y = y + self._shared(xf, lin_quant)
        return y.reshape(*lead, dim)

    def _expert_params(self, d: int) -> dict:
        """The routed experts' params: "gate", "up", "down" (+ "_bias" for gpt-oss), or
        "gate_up" and "down" (`MoESpec.fused_gate_up`)."""
        s, e, f = self.spec, self.spec.n_experts, self.spec.ffn_dim
        shapes = {"up": (e, f, d), "down": (e, d, f)}
        if s.fused_gate_up:
            shapes = {"gate_up": (e, 2 * f, d), "down": (e, d, f)}
        elif s.gated:
            shapes = {"gate": (e, f, d), **shapes}
        p = {
            name: ExpertMatrix(shape, expert_format(self.quant, shape[2]), self.dtype, name=name)()
            for name, shape in shapes.items()
        }
        if s.expert_bias:
            for name, (_, out, _) in shapes.items():
                p[name + "_bias"] = self.param(
                    name + "_bias", nn.initializers.zeros, (e, out), self.dtype
                )
        return p

    def _routed(self, xe, weights, experts, p) -> jax.Array:
        s = self.spec
        impl = self.impl or default_impl()
        tile = self.tile or tile_rows(xe.shape[0] * s.top_k, s.n_experts)
        ep = self.parallel
        if ep is None or ep.size(ep.axis) == 1 or s.n_experts % ep.size(ep.axis):
            return routed_experts(xe, weights, experts, p, s, impl, tile)
        rows = ep.rows if ep.rows and xe.shape[0] % ep.size(ep.rows) == 0 else None
        e_local = s.n_experts // ep.size(ep.axis)

        def local(xe, weights, experts, p):
            first = jax.lax.axis_index(ep.axis) * e_local
            return routed_experts(xe, weights, experts, p, s, impl, tile, first, ep.axis)

        row_spec = P(rows)
        return jax.shard_map(
            local,
            mesh=ep.mesh,
            in_specs=(row_spec, row_spec, row_spec, jax.tree.map(lambda _: P(ep.axis), p)),
            out_specs=row_spec,
            check_vma=False,
        )(xe, weights, experts, p)

    def _shared(self, x: jax.Array, quant: str | None) -> jax.Array:
        """The shared expert on x [M, D] (qwen35moe: times the sigmoid of its gate)."""
        s = self.spec
        y = SharedExpert(s.shared_ffn_dim, s.activation, self.dtype, quant, name="shared")(x)
        if s.shared_gate:
            g = Linear(1, False, self.dtype, quant, name="shared_gate")(x)
            y = y * jax.nn.sigmoid(g.astype(jnp.float32)).astype(y.dtype)
        return y
