"""Narrower weights for XLA:CPU's faster matmuls: bfloat16 (`bf16_params`), int8 (W8A8,
SmoothQuant-style: most of this module). The GGUF-style blocks of `--quant q8` / `q4` are made
as the loader reads each tensor (`tsjax.loader`, `tsjax.kernels.blocks.tensor_blocks`).

XLA:CPU runs int8 x int8 -> int32 matmuls about twice as fast as float32 ones from 4 rows on,
which is what batched decode is made of. Both sides must be int8: the weights once, here, with
one scale per output column; the activations on the fly, one scale per row
(`tsjax.layers.linear.int8_matmul`). Per-row activation scales are crushed by the few channels
whose magnitude is far above the rest, so each matmul first moves part of that range into its
weights (Xiao et al., SmoothQuant, 2023): with `a` a channel's largest input magnitude on a
calibration text and `w` its largest weight, the input is divided and the weight row
multiplied by `a**alpha / w**(1 - alpha)`. The calibration text is fixed (below), so the same
GGUF always gives the same int8 weights.

Measured on SmolLM2-135M against its float32 logits (README, "int8 weights"): per-row int8
without smoothing moved the next-token distribution by KL 0.05 (top-1 agreement 87%);
smoothed, far less.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax.traverse_util import flatten_dict, unflatten_dict

from tsjax.layers.experts import Q8_BLOCK, bf16_bits
from tsjax.models.decoder import Decoder

ALPHA = 0.5  # how much of the activation range moves into the weights

# Several registers a chat server sees: prose, code, numbers, markup, a chat transcript.
CALIBRATION_TEXT = """\
The history of computing is a story of abstractions layered on abstractions, from switches to \
gates, from gates to instructions, from instructions to languages. Each layer hides the one \
below it, and each one leaks.

def merge(left: list[int], right: list[int]) -> list[int]:
    out, i, j = [], 0, 0
    while i < len(left) and j < len(right):
        if left[i] <= right[j]:
            out.append(left[i]); i += 1
        else:
            out.append(right[j]); j += 1
    return out + left[i:] + right[j:]

| city | population (2021) | area (km²) |
|------|------------------:|-----------:|
| Lyon | 522,250 | 47.87 |
| Kyoto | 1,463,723 | 827.8 |

{"name": "get_weather", "arguments": {"location": "Paris", "unit": "celsius"}}

User: Can you explain why the sky is blue, in two sentences?
Assistant: Sunlight scatters off the molecules in the air, and shorter (blue) wavelengths \
scatter far more than longer (red) ones. So when you look away from the sun, you mostly see \
that scattered blue light.
User: Merci ! Et pourquoi les couchers de soleil sont-ils rouges ?
Assistant: Au coucher du soleil, la lumière traverse beaucoup plus d'atmosphère : le bleu est \
diffusé en chemin et il reste surtout le rouge et l'orange. 日没時には光が長い距離を通るため、\
赤い光が残ります。 1 + 1 = 2; 3.14159 * 2 = 6.28318; 2**10 = 1024.
"""


def calibrate(model: Decoder, params, tokens: list[int]) -> dict[tuple[str, ...], jax.Array]:
    """Largest input magnitude per channel of every matmul of the float `model` over
    `tokens`: {path of the Linear (or ("lm_head",) for a tied embedding): [..., in]}."""
    n = len(tokens)
    cache = model.new_cache(1, n)
    toks = jnp.asarray([tokens], jnp.int32)
    pos = jnp.arange(n, dtype=jnp.int32)[None]

    def run(params, cache):
        _, state = model.apply(
            {"params": params}, toks, pos, cache, None, None, n, mutable=["intermediates"]
        )
        return state["intermediates"]

    out = {}
    for path, (value,) in flatten_dict(jax.jit(run)(params, cache)).items():
        key = ("lm_head",) if path[-1] == "lm_head_input_amax" else path[:-1]
        out[key] = value
    return out


def quantize_params(params, amax: dict[tuple[str, ...], jax.Array], alpha: float = ALPHA):
    """Float params -> the int8 model's params: every calibrated Linear's `weight` [..., out,
    in] becomes `kernel` [..., in, out] (int8), `kernel_scale` [..., out] and `input_scale`
    [..., in]; a
    tied embedding also gives an int8 `lm_head`. Other leaves are kept."""
    flat = flatten_dict(params)
    if ("lm_head",) in amax and ("lm_head", "weight") not in flat:
        flat[("lm_head", "weight")] = flat[("embed", "embedding")]
    for path, a in amax.items():
        kernel = jnp.swapaxes(flat.pop((*path, "weight")), -1, -2)  # float [out, in] -> [in, out]
        k, scale, smooth = _quantize(kernel, a, alpha)
        flat[(*path, "kernel")] = k
        flat[(*path, "kernel_scale")] = scale
        flat[(*path, "input_scale")] = smooth
    return unflatten_dict(flat)


@jax.jit
def _quantize(kernel, a, alpha):
    kernel = kernel.astype(jnp.float32)
    w = jnp.max(jnp.abs(kernel), axis=-1)  # [..., in]
    s = jnp.where(
        (a > 0) & (w > 0), a**alpha / jnp.maximum(w, 1e-8) ** (1 - alpha), 1.0
    )  # x / s, w * s
    s = jnp.clip(s, 1e-4, 1e4)
    smoothed = kernel * s[..., :, None]
    col = jnp.max(jnp.abs(smoothed), axis=-2)  # [..., out]
    scale = jnp.where(col > 0, col / 127.0, 1.0)
    q = jnp.clip(jnp.round(smoothed / scale[..., None, :]), -127, 127).astype(jnp.int8)
    return q, scale, 1.0 / s


def is_expert_matrix(path: tuple[str, ...]) -> bool:
    """A routed experts' projection [..., E, out, in] (`tsjax.layers.moe.ExpertMatrix`)."""
    return (
        len(path) >= 3
        and path[-1] == "weight"
        and path[-2] in ("gate", "up", "gate_up", "down")
        and path[-3] == "moe"
    )


def _router(path: tuple[str, ...]) -> bool:
    return len(path) >= 2 and path[-2] == "router"


@jax.jit
def int8_blocks(w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Float expert weights [..., in] -> int8 [..., in] with a float32 scale per block of 32
    ([..., in/32]), the MoE layer's "int8" expert format. A block takes the power-of-two
    scale just above amax / 127 where that represents it exactly (every MXFP4 block: small
    integers times a power of two, `tsjax.mxfp4.to_int8_blocks`), else amax / 127 (Q8_0's
    own scale, so a Q8_0 file's blocks also come back exactly)."""
    *lead, n = w.shape
    b = w.reshape(*lead, n // Q8_BLOCK, Q8_BLOCK).astype(jnp.float32)
    amax = jnp.max(jnp.abs(b), axis=-1, keepdims=True)
    linear = amax / 127.0
    pow2 = jnp.exp2(jnp.ceil(jnp.log2(jnp.where(amax > 0, linear, 1.0))))
    exact = jnp.all(jnp.round(b / pow2) * pow2 == b, axis=-1, keepdims=True)
    scale = jnp.where(amax > 0, jnp.where(exact, pow2, linear), 1.0)
    q = jnp.clip(jnp.round(b / scale), -127, 127).astype(jnp.int8)
    return q.reshape(w.shape), scale[..., 0]


def expert_params(params, quant: str):
    """The routed experts' float matrices in the MoE layer's format for `quant`: "bf16" as
    bfloat16 bits (uint16), "int8" as int8 blocks with `scales` (`int8_blocks`). Other
    leaves are kept."""
    flat = flatten_dict(params)
    for path in [p for p in flat if is_expert_matrix(p)]:
        if quant == "bf16":
            flat[path] = bf16_bits(flat[path])
        elif quant == "int8":
            flat[path], flat[(*path[:-1], "scales")] = int8_blocks(flat[path])
    return unflatten_dict(flat)


def bf16_params(params, tied_embeddings: bool):
    """Float params -> the bf16 model's: every Linear `weight` in bfloat16, and a tied
    embedding's bfloat16 copy as `lm_head` (the lookup table itself stays float: XLA:CPU has
    no bfloat16 gather, and its fallback converts the whole table to float32 on every step,
    7 ms for SmolLM2's). A MoE's expert matrices become bfloat16 bits (`expert_params`); its
    router stays float32 (a rounded router would choose other experts). Other leaves are
    kept. Casts run where each leaf lives (so a sharded leaf stays sharded)."""
    flat = flatten_dict(params)
    if tied_embeddings and ("lm_head", "weight") not in flat:
        flat[("lm_head", "weight")] = flat[("embed", "embedding")]
    flat = {
        k: v.astype(jnp.bfloat16) if k[-1] == "weight" and not _plain(k) else v
        for k, v in flat.items()
    }
    return expert_params(unflatten_dict(flat), "bf16")


def _plain(path: tuple[str, ...]) -> bool:
    """A `weight` that is not a Linear's: the router's, or an expert matrix."""
    return _router(path) or is_expert_matrix(path)
