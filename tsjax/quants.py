"""Weight formats a model can be loaded in (`tsjax.load(..., quant=)`, `--quant`), kept free of
JAX imports so that command lines and settings can name them without loading it.

- "auto" (the default): chosen per platform and file by `choose_quant` (README, "Weight
  formats"): the block formats on CPU, weight-only int8 blocks on accelerators.
- "f32" (or None): float weights in the model dtype (float32 on CPU): the exact reference.
- "bf16": bfloat16 matmul weights, float32 activations, accumulation and KV cache
  (`tsjax.layers.linear`; XLA:CPU converts a bfloat16 cache block to float32 and back on
  every scatter into it, which costs more than its faster attention dots save).
- "int8": int8 weights and activations, SmoothQuant-style (`tsjax.quantize`).
- "q8": every matmul weight in int8 blocks of 32 with a float16 scale each (GGUF's Q8_0 form),
  activations quantized per block of 32 in the step (`tsjax.kernels`).
- "q4": as "q8", but the tensors the file holds in 4 bits (Q4_0, Q4_1, Q4_K) keep them: 4-bit
  blocks of 32 with a scale and an offset, the file's own values.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

QUANTS: tuple[str | None, ...] = (None, "bf16", "int8", "q8", "q4")
# Formats whose weights stay in GGUF-style blocks of 32 (tsjax.kernels.blocks)
BLOCK_QUANTS = ("q8", "q4")
# What a user may ask for: a format, "f32" (= None, the float weights) or "auto".
QUANT_CHOICES = ["auto", "f32", *(q for q in QUANTS if q is not None)]
QUANT_HELP = (
    "matmul weights: auto (default: q4 or q8 on CPU, by the file; q8 on accelerators), f32"
    " (exact float weights), bf16, int8, q8 or q4 (the file's own blocks of 32: int8, or 4 bits"
    " where the file has them; int8 activations per block of 32, as llama.cpp)"
)
# GGUF tensor types whose blocks `q4` keeps as they are (tsjax.kernels.blocks.q4_from_gguf).
FOUR_BIT_TYPES = ("Q4_0", "Q4_1", "Q4_K")
# Each format's fewest decode rows on CPU: tsjax.shapes.MIN_DECODE_ROWS.


def quant_name(quant: str | None) -> str:
    """The name a resolved format is shown by (startup line, /api/show): "f32" for None."""
    return "f32" if quant is None else quant


def choose_quant(
    requested: str | None,
    backend: str,
    weight_types: Iterable[str],
    kernels: Callable[[], bool],
    devices: int = 1,
) -> tuple[str | None, str]:
    """The format to load in and why: (a member of QUANTS, reason).

    `requested`: a QUANT_CHOICES name or None (= "f32"); anything but "auto" is taken as asked.
    "auto" decides from `backend` (jax.default_backend()), the GGUF types of the file's matmul
    weights (`weight_types`), whether the CPU block kernels build (`kernels()`, called only on
    CPU) and the number of devices the model spans (README, "Weight formats", has the figures):
    - CPU, one device: "q4" when the file holds 4-bit weights (its own blocks: the fewest bytes
      per token, the measured fastest decode), else "q8"; float32 where the kernels cannot be
      built (their XLA fallback dequantizes every weight on every step: slower than float32).
    - CPU over several devices: float32 (the kernels are one custom call per matmul, which XLA
      cannot split over a mesh).
    - GPU / TPU: "q8", weight-only int8 blocks dequantized inside the step next to bfloat16
      activations (half of bf16's bytes per token; XLA fuses the dequantization on these
      backends). Not measured on a device yet.
    """
    if requested in (None, "f32"):
        return None, "asked for"
    if requested != "auto":
        if requested not in QUANTS:
            raise ValueError(f"unknown weight format {requested!r}; choose from {QUANT_CHOICES}")
        return requested, "asked for"
    if backend != "cpu":
        return "q8", f"auto: weight-only int8 blocks on {backend}"
    if devices > 1:
        return None, f"auto: float32 ({devices} CPU devices; the block kernels do not shard)"
    if not kernels():
        return None, "auto: float32 (the CPU block kernels could not be built, see the log)"
    four = sorted(set(weight_types) & set(FOUR_BIT_TYPES))
    if four:
        return "q4", f"auto: the file's {'/'.join(four)} blocks, int8 blocks elsewhere"
    return "q8", "auto: int8 blocks of 32 (the file has no 4-bit weights)"
