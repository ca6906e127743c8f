"""Time Gemma 4 E2B's audio encoder (gemma4a conformer + projector) on one chunk per bucket.

Real dimensions, random weights (no real Gemma 4 mmproj is available here): width 1024, 12
blocks, 8 heads, FFN 4096, subsampling channels [128, 32], output 1536, projected to E2B's text
width 1536, clipped linears; ~307M parameters, float32 on the default backend. For each
token bucket (4 frames a token) it reports the compile and the best of `--repeats` runs; the
log-mel features of 30 s of audio are timed too (NumPy, the request's own thread).

    python -m benchmarks.audio_encode                  # buckets 64 (2.5 s) and 750 (30 s)
    python -m benchmarks.audio_encode --buckets 32 256 --layers 3
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from tsjax.audio.features import log_mel
from tsjax.audio.gemma4a import AudioConfig, Gemma4AudioEncoder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--buckets", type=int, nargs="+", default=[64, 750])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    cfg = AudioConfig("gemma4a", 1024, 4096, args.layers, 8, 128, (128, 32), 5, 1536, 1536,
                      clipped=True)  # fmt: skip
    module = Gemma4AudioEncoder(cfg)
    samples = np.random.default_rng(0).standard_normal(30 * 16000).astype(np.float32) * 0.1
    t = time.perf_counter()
    feats = log_mel(samples)
    print(f"features of 30 s: {time.perf_counter() - t:.3f}s ({len(feats)} frames)")
    params = None
    for b in args.buckets:
        x = np.zeros((1, 4 * b, 128), np.float32)
        x[0, : min(len(feats), 4 * b)] = feats[: 4 * b]
        if params is None:
            params = module.init(jax.random.key(0), jnp.asarray(x))["params"]
        run = jax.jit(lambda p, x: module.apply({"params": p}, x))
        t = time.perf_counter()
        run.lower(params, x).compile()
        compile_s = time.perf_counter() - t
        jax.block_until_ready(run(params, x))
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            jax.block_until_ready(run(params, x))
            times.append(time.perf_counter() - t)
        n = sum(v.size for v in jax.tree_util.tree_leaves(params))
        print(f"bucket {b} tokens ({4 * b} frames, {4 * b / 100:.1f} s): compile {compile_s:.1f}s,"
              f" run {min(times):.2f}s (best of {args.repeats}); {n / 1e6:.0f}M params on"
              f" {jax.default_backend()}")  # fmt: skip


if __name__ == "__main__":
    main()
