"""Weight formats a model can be loaded in (`tsjax.load(..., quant=)`, `--quant`), kept free of
JAX imports so that command lines and settings can name them without loading it.

- None: float weights in the model dtype (float32 on CPU): the exact reference.
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

QUANTS: tuple[str | None, ...] = (None, "bf16", "int8", "q8", "q4")
# Formats whose weights stay in GGUF-style blocks of 32 (tsjax.kernels.blocks)
BLOCK_QUANTS = ("q8", "q4")
QUANT_CHOICES = [q for q in QUANTS if q is not None]
QUANT_HELP = (
    "matmul weights: bf16 or int8 (faster batched decode on CPU than the float32 default, less"
    " exact), q8 or q4 (the file's own blocks: int8, or 4 bits where the file has them;"
    " int8 activations per block of 32, as llama.cpp) (default: float32)"
)
# Each format's fewest decode rows on CPU: tsjax.shapes.MIN_DECODE_ROWS.
