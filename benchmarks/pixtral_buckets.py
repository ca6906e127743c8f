"""What Pixtral's token buckets cost: the warm-up's compiles and the encode time per bucket.

Real dimensions, random weights (no real mmproj is available here): Mistral Small 3.1's tower
(24 layers, dim 1024, 16 heads of 64, FFN 4096, 14 px patches, 2 x 2 merger) and projector to
a 5120-wide text model. Dynamic-resolution images are compiled per token bucket (powers of two
from 8 to 1024 tokens, `tsjax.vision.dynamic`): this compiles each (what the server's start-up
does) and encodes one image per chosen bucket, an image exactly the bucket's size and one just
over the previous bucket (the most padding that bucket sees).

    python -m benchmarks.pixtral_buckets                      # compile all, encode 64 and 256
    python -m benchmarks.pixtral_buckets --encode 64 256 1024 --layers 24
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import numpy as np
from PIL import Image

from tsjax.vision import Projector
from tsjax.vision import pixtral as family
from tsjax.vision.config import ResizeSpec
from tsjax.vision.dynamic import empty_inputs


def small31_config(layers: int, text_dim: int) -> family.PixtralConfig:
    return family.PixtralConfig(
        projector_type="pixtral", image_size=1540, patch_size=14, dim=1024, ffn_dim=4096,
        n_layers=layers, n_heads=16, head_dim=64, norm_eps=1e-5, activation="silu",
        image_mean=(0.481, 0.458, 0.408), image_std=(0.269, 0.261, 0.276), text_dim=text_dim,
        merge=2, resize=ResizeSpec("bicubic", "ceil", (0, 0, 0)), image_end="[IMG_END]",
        min_tokens=family.MIN_TOKENS, max_tokens=family.MAX_TOKENS, row_break=True,
    )  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--text-dim", type=int, default=5120)
    ap.add_argument("--encode", type=int, nargs="*", default=[64, 256], help="token buckets")
    args = ap.parse_args()
    cfg = small31_config(args.layers, args.text_dim)
    module = family.module(cfg, np.float32)
    t0 = time.perf_counter()
    inputs = empty_inputs(cfg, 1, cfg.min_tokens)
    params = jax.jit(module.init)(jax.random.key(0), *inputs)["params"]
    proj = Projector(Path("random"), cfg, params, module, buckets=(1,), family=family)
    print(f"{jax.devices()[0].device_kind}, {args.layers} layers, random init "
          f"{time.perf_counter() - t0:.1f} s; token buckets {proj.token_buckets}")  # fmt: skip
    secs = proj.warmup()
    print(f"warm-up, all {len(proj.token_buckets)} buckets (compile only): {secs:.1f} s")
    rng = np.random.default_rng(0)
    a = cfg.align
    for t in args.encode:
        prev = max([b for b in proj.token_buckets if b < t], default=0)
        for tokens in sorted({t, prev + 1}):
            cols = int(np.ceil(np.sqrt(tokens)))
            rows = -(-tokens // cols)
            rgb = rng.integers(0, 256, (rows * a, cols * a, 3), dtype=np.uint8)
            img = proj.prepare(Image.fromarray(rgb))
            t0, c0 = time.perf_counter(), time.process_time()
            (emb,) = proj.embed([img])
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            print(f"bucket {t:5d}: {rows}x{cols} = {rows * cols:4d} tokens ({img.tokens} positions)"
                  f" {wall:.2f} s wall, {cpu:.1f} CPU s")  # fmt: skip
    assert proj.compiled_count() == len(proj.token_buckets), "an image compiled after warm-up"


if __name__ == "__main__":
    main()
