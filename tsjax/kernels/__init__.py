"""Matmul kernels for narrow weights: block-quantized formats (`blocks`) and the CPU kernels
that run them from jitted code (`blockdot`)."""
