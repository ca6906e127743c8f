"""Weight formats a model can be loaded in (`tsjax.load(..., quant=)`, `--quant`), kept free of
JAX imports so that command lines and settings can name them without loading it.

- None: float weights in the model dtype (float32 on CPU): the exact reference.
- "bf16": bfloat16 matmul weights, float32 activations, accumulation and KV cache
  (`tsjax.layers.linear`; XLA:CPU converts a bfloat16 cache block to float32 and back on
  every scatter into it, which costs more than its faster attention dots save).
- "int8": int8 weights and activations, SmoothQuant-style (`tsjax.quantize`).
"""

from __future__ import annotations

QUANTS: tuple[str | None, ...] = (None, "bf16", "int8")
QUANT_CHOICES = [q for q in QUANTS if q is not None]
QUANT_HELP = (
    "matmul weights: bf16 or int8; both decode batches faster on CPU than the float32 default"
    " and are less exact (default: float32)"
)
# Each format's fewest decode rows on CPU: tsjax.shapes.MIN_DECODE_ROWS.
