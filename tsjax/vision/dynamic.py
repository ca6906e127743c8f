"""Dynamic-resolution images (Pixtral, Qwen 3.5, Gemma 4): each image keeps its aspect ratio,
so its patch grid and token count vary. The encoder is compiled per *token bucket*, not per size:

- An image of rows x cols tokens (each token a merge x merge block of patches) becomes a flat
  sequence of its patches, each block's merge^2 patches contiguous and the blocks in row-major
  order, with every patch's (row, col) in the patch grid (`pack`): the tower's 2-D RoPE reads
  the positions, its attention masks the padding, and the patch merger takes consecutive
  merge^2 patches. So no compiled shape depends on rows or cols, only on the padded length.
- The sequence is padded to the smallest token bucket holding rows x cols tokens
  (`token_buckets`: powers of two from the family's fewest tokens to its most, the last one
  the most itself; e.g. Pixtral's 8..1024: 8, 16, ..., 1024, eight programs). Padding never
  changes a real token: padded patches are masked out as keys, and their outputs are dropped.
  At most half of a bucket is padding (attention: up to 3/4 of its work), the price of a
  bounded set of programs that the warm-up compiles once (`Projector.warmup`).
"""

from __future__ import annotations

import numpy as np

from tsjax.vision.config import VisionConfig


def token_buckets(lo: int, hi: int) -> tuple[int, ...]:
    """Powers of two from the first >= lo, doubling below hi, then hi: the token counts an
    image's padded sequence can take."""
    if not 1 <= lo <= hi:
        raise ValueError(f"bad token range {lo}..{hi}")
    b, out = 1, []
    while b < lo:
        b *= 2
    while b < hi:
        out.append(b)
        b *= 2
    return (*out, hi)


def bucket_of(tokens: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket holding `tokens`; ValueError past the largest."""
    for b in buckets:
        if b >= tokens:
            return b
    raise ValueError(f"an image of {tokens} tokens exceeds the largest bucket {buckets[-1]}")


def pack(pixels: np.ndarray, cfg: VisionConfig, bucket: int) -> tuple[np.ndarray, ...]:
    """One prepared image [H, W, 3] (sides multiples of `cfg.align`) -> the encoder's padded
    inputs for a bucket of `bucket` tokens (N = bucket * merge^2 patches):

        patches [N, 3*P*P] float32, each flattened (channel, row, column) like the patch
                convolution's kernel; merge x merge blocks contiguous, blocks row-major
        pos     [N, 2] int32, each patch's (row, col) in the image's patch grid
        valid   [N] bool, False for the padding
    """
    p, m = cfg.patch_size, cfg.merge
    h, w, c = pixels.shape
    rows, cols = cfg.grid(h, w)
    if (rows * cfg.align, cols * cfg.align) != (h, w) or not rows or not cols:
        raise ValueError(f"a {w}x{h} image is not a grid of {cfg.align}-pixel tokens")
    x = pixels.reshape(rows, m, p, cols, m, p, c).transpose(0, 3, 1, 4, 6, 2, 5)
    x = x.reshape(rows * cols * m * m, c * p * p)
    r = np.arange(rows)[:, None, None, None] * m + np.arange(m)[None, None, :, None]
    k = np.arange(cols)[None, :, None, None] * m + np.arange(m)[None, None, None, :]
    pos = np.stack(np.broadcast_arrays(r, k), -1).reshape(-1, 2).astype(np.int32)
    n, real = bucket * m * m, x.shape[0]
    if real > n:
        raise ValueError(f"{rows * cols} tokens do not fit a bucket of {bucket}")
    patches = np.zeros((n, c * p * p), np.float32)
    patches[:real] = x
    positions = np.zeros((n, 2), np.int32)
    positions[:real] = pos
    valid = np.zeros((n,), bool)
    valid[:real] = True
    return patches, positions, valid


def empty_inputs(cfg: VisionConfig, n: int, bucket: int) -> tuple[np.ndarray, ...]:
    """Inputs for n padding images of a bucket (one valid patch each: no empty softmax)."""
    m2, pp = cfg.merge**2, 3 * cfg.patch_size**2
    valid = np.zeros((n, bucket * m2), bool)
    valid[:, 0] = True
    return (
        np.zeros((n, bucket * m2, pp), np.float32),
        np.zeros((n, bucket * m2, 2), np.int32),
        valid,
    )
