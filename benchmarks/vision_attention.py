"""Peak memory and time of one layer's bidirectional attention over an image's patches
(`tsjax.vision.vit.full_attention`), in one piece against in blocks of queries.

Random q, k, v of the given shape (default: Gemma 4's largest token bucket, 1120 tokens x 3 x 3
= 10080 patches, through its real tower's 12 heads of 64), float32, one image. Each mode runs
in its own process so that its peak resident memory is its own; each is timed twice (the
first call compiles).

    python -m benchmarks.vision_attention                  # 10080 patches, both modes
    python -m benchmarks.vision_attention --patches 4096 --heads 16 --head-dim 72
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def run(patches: int, heads: int, head_dim: int, whole: bool) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from tsjax.vision import vit

    if whole:
        vit.QUERY_BLOCKS_PAST = patches  # one piece
    rng = np.random.default_rng(0)
    shape = (1, patches, heads, head_dim)
    q, k, v = (jnp.asarray(rng.standard_normal(shape, np.float32)) for _ in range(3))
    mask = jnp.ones((1, patches), bool)
    f = jax.jit(lambda q, k, v, m: vit.full_attention(q, k, v, head_dim**-0.5, m))
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        jax.block_until_ready(f(q, k, v, mask))
        times.append(time.perf_counter() - t0)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    return {"whole": whole, "first_s": times[0], "second_s": times[1], "peak_rss_gib": rss}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patches", type=int, default=10080)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--child", choices=["whole", "blocks"])
    a = ap.parse_args()
    if a.child:
        print(json.dumps(run(a.patches, a.heads, a.head_dim, a.child == "whole")))
        return
    for mode in ("blocks", "whole"):
        cmd = [sys.executable, "-m", "benchmarks.vision_attention", "--child", mode,
               "--patches", str(a.patches), "--heads", str(a.heads),
               "--head-dim", str(a.head_dim)]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        print(f"{a.patches} patches, {a.heads} heads of {a.head_dim}, {mode}: "
              f"{r['second_s']:.1f} s (first {r['first_s']:.1f} s), "
              f"peak RSS {r['peak_rss_gib']:.1f} GiB")  # fmt: skip


if __name__ == "__main__":
    main()
