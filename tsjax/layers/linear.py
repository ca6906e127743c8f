"""Dense projection. Float weights are kept as GGUF stores them, `weight` [out, in], and the
product is computed as weight @ x^T then transposed: XLA:CPU runs that ~1.3x faster than
x @ kernel[in, out] from 4 rows on, and no worse for one row (`python -m benchmarks.kernels`
times both forms on SmolLM2's shapes).

With `quant="bf16"` the `weight` is stored as bfloat16 and multiplied by bfloat16 inputs with
float32 accumulation: half the bytes, and on XLA:CPU with AVX512-BF16 about 1.4x the float32
rate at 16 rows and 1.6x at 32 (about the same at 2-8 rows; `benchmarks.kernels --rows N`).
One row is the exception: XLA:CPU has no fast bfloat16 matrix-vector kernel (~9x slower than
float32), so a bf16 model's decode pads to 2 rows (`tsjax.shapes.MIN_DECODE_ROWS`).

With `quant="int8"` (weights made by `tsjax.quantize`) the `kernel` [in, out] is int8 (both
orders run at the same speed there) with one float scale
per output column, and each input row is scaled per channel (`input_scale`, the calibrated
smoothing) and quantized to int8 on the fly (symmetric, one scale per row), so the matmul runs
int8 x int8 -> int32: on XLA:CPU about twice the float32 rate from 4 rows (XNNPACK's int8
kernels). The float path records each input channel's largest magnitude when asked (the
"intermediates" collection), which is what calibration reads.

With `quant="q8"` or `"q4"` the weight stays in blocks of 32 values along its input axis, as
GGUF stores it (`tsjax.kernels.blocks`): int8 values and a float16 scale per block (`q`, `d`),
or, for the tensors the file holds in 4 bits, 4-bit values with a float16 scale and offset per
block (`qs`, `d`, `m`; only with "q4"). Which one a Linear holds is read from its params, so
one model mixes them as its file does (an input size that is not a multiple of 32 keeps its
float weight). On CPU the product runs in `tsjax.kernels.blockdot`
(activations quantized to int8 per block of 32 inside, as llama.cpp does), on accelerators as
bfloat16 x the weights dequantized inside the step.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from tsjax.kernels.blocks import QK, block_matmul
from tsjax.quants import BLOCK_QUANTS


def weight_dtype(quant: str | None, dtype) -> jnp.dtype:
    """The dtype float weights are stored in: bfloat16 for quant="bf16", else `dtype`."""
    return jnp.dtype(jnp.bfloat16) if quant == "bf16" else jnp.dtype(dtype)


def int8_matmul(x: jax.Array, kernel: jax.Array, scale: jax.Array) -> jax.Array:
    """x [..., in] float @ int8 kernel [in, out] (column scales [out]) -> [..., out] float."""
    amax = jnp.max(jnp.abs(x), axis=-1, keepdims=True).astype(jnp.float32)
    row_scale = jnp.where(amax > 0, amax / 127.0, 1.0)
    xq = jnp.clip(jnp.round(x / row_scale), -127, 127).astype(jnp.int8)
    acc = jax.lax.dot_general(
        xq, kernel, (((xq.ndim - 1,), (0,)), ((), ())), preferred_element_type=jnp.int32
    )
    return (acc.astype(jnp.float32) * row_scale * scale).astype(x.dtype)


def features_first_matmul(x: jax.Array, w: jax.Array, x_axis: int = -1) -> jax.Array:
    """w[N, K] @ x, contracting x's axis `x_axis` (its K features) -> [N, ...x's other axes]
    in x's dtype. A narrower `w` (bfloat16) gets x in its dtype and accumulates in float32."""
    if w.dtype.itemsize < x.dtype.itemsize:  # narrow weights: narrow x, accumulate wide
        x_in, acc = x.astype(w.dtype), jnp.promote_types(x.dtype, jnp.float32)
    else:
        x_in, acc, w = x, None, w.astype(x.dtype)
    y = jax.lax.dot_general(
        w, x_in, (((1,), (x_axis % x.ndim,)), ((), ())), preferred_element_type=acc
    )
    return y.astype(x.dtype)


def transposed_matmul(x: jax.Array, w: jax.Array, x_axis: int = -1) -> jax.Array:
    """x [..., K] @ w[N, K]^T -> [..., N] in x's dtype (K at `x_axis` of x), computed as
    w @ x^T and then transposed. The barrier keeps XLA from folding the transpose back into
    the slower operand order."""
    y = features_first_matmul(x, w, x_axis)  # [N, ...]
    return jnp.moveaxis(jax.lax.optimization_barrier(y), 0, -1)


def input_amax(x: jax.Array, axis: int = -1) -> jax.Array:
    """Largest magnitude per input channel (along `axis`) over every other axis.
    x: [..., in] -> [in]."""
    x = jnp.moveaxis(x, axis, -1)
    return jnp.max(jnp.abs(x.reshape(-1, x.shape[-1])), axis=0).astype(jnp.float32)


class Linear(nn.Module):
    """y = x @ W^T (+ b). Float weights also take and give "features first" ([in, ...] ->
    [features, ...], `features_first_in` / `features_first_out`), the matmul's own layout: a
    chain of projections with elementwise work between them (the gated MLP) then runs with
    no transpose between its matmuls."""

    features: int
    use_bias: bool = False
    dtype: jnp.dtype = jnp.float32
    quant: str | None = None

    @nn.compact
    def __call__(
        self, x: jax.Array, features_first_in: bool = False, features_first_out: bool = False
    ) -> jax.Array:
        """x: [..., in], or [in, ...] with `features_first_in`. Returns [..., features], or
        [features, ...] with `features_first_out`."""
        in_axis = 0 if features_first_in else -1
        shape = (x.shape[in_axis], self.features)
        if self.quant in BLOCK_QUANTS and shape[0] % QK == 0:
            y = block_matmul(jnp.moveaxis(x, in_axis, -1), self._blocks(shape[0]))
            y = jnp.moveaxis(y, -1, 0) if features_first_out else y
        elif self.quant == "int8":
            assert not (features_first_in or features_first_out), "int8 takes rows first"
            kernel = self.param("kernel", nn.initializers.zeros, shape, jnp.int8)
            scale = self.param("kernel_scale", nn.initializers.ones, shape[1:], jnp.float32)
            smooth = self.param("input_scale", nn.initializers.ones, shape[:1], jnp.float32)
            y = int8_matmul(x * smooth.astype(x.dtype), kernel, scale)
        else:
            wdt = weight_dtype(self.quant, self.dtype)
            weight = self.param("weight", nn.initializers.normal(0.02), shape[::-1], wdt)
            self.sow("intermediates", "input_amax", input_amax(x, in_axis))
            if features_first_out:
                y = features_first_matmul(x, weight, in_axis)
            else:
                y = transposed_matmul(x, weight, in_axis)
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (self.features,), self.dtype)
            y = y + (bias.reshape((-1,) + (1,) * (y.ndim - 1)) if features_first_out else bias)
        return y

    def _blocks(self, k: int) -> dict[str, jax.Array]:
        """This Linear's block-quantized weight: 4-bit blocks if its params hold them, else
        int8 blocks (what a fresh init declares)."""
        n, g = self.features, k // QK
        if self.has_variable("params", "qs"):
            return {
                "qs": self.param("qs", nn.initializers.zeros, (n, k // 2), jnp.uint8),
                "d": self.param("d", nn.initializers.ones, (g, n), jnp.float16),
                "m": self.param("m", nn.initializers.zeros, (g, n), jnp.float16),
            }
        return {
            "q": self.param("q", nn.initializers.zeros, (n, k), jnp.int8),
            "d": self.param("d", nn.initializers.ones, (g, n), jnp.float16),
        }
