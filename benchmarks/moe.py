"""Time the MoE layer (`tsjax.layers.moe.MoE`) on random weights shaped like small real MoEs:
decode batches and a prefill, each grouped-matmul implementation, each expert weight format.

    python benchmarks/moe.py                      # every config, rows 1 / 16 / 512
    python benchmarks/moe.py --config gpt-oss-s --rows 16 --impl tiles:1,tiles:2,tiles:4

Implementations: `tiles[:t]` (row tiles, t rows each; auto from the rows when omitted),
`ragged` (jax.lax.ragged_dot_general; on CPU JAX lowers it to a masked dense product), and
`dense` (every expert on every row, the outputs masked by the router: the baseline a grouped
dispatch must beat). Formats: f32, bf16, int8 (blocks of 32, a float scale each), mxfp4
(GGUF's blocks kept packed and decoded in the step; "mxfp4 dequantized at load" is the f32 /
bf16 rows). Rounds alternate the variants, so a busy machine slows them alike; the figure is
the median of the per-round medians, in ms per layer call.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from tsjax.layers.experts import activation_fn, bf16_bits, tile_rows
from tsjax.layers.moe import MoE, MoESpec, Router


@dataclass(frozen=True)
class Config:
    dim: int
    spec: MoESpec


CONFIGS = {
    # a small real MoE's shape (Qwen-style routing: softmax, top-2 renormalised, SwiGLU)
    "small-8x2": Config(1024, MoESpec(8, 2, 512, normalize=True)),
    # GPT-OSS-20B's proportions (32 experts, top-4, ffn = dim, clamped SwiGLU with biases)
    # scaled from dim 2880 to 1024
    "gpt-oss-s": Config(
        1024,
        MoESpec(
            32, 4, 1024, softmax_topk=True, router_bias=True, activation="swiglu_oai",
            expert_bias=True,
        ),
    ),
}  # fmt: skip


def make_params(cfg: Config, fmt: str, rng: np.random.Generator) -> dict:
    """Random params of the layer in weight format `fmt`."""
    s, d = cfg.spec, cfg.dim
    moe = MoE(s, quant=None if fmt == "f32" else fmt)
    shapes = jax.eval_shape(moe.init, jax.random.PRNGKey(0), jnp.zeros((1, d)))["params"]

    def leaf(path, x):
        name = path[-1].key
        if x.dtype == jnp.uint8:  # MXFP4: random codes; scales near 2**-7 (weights ~0.03)
            if name == "scales":
                return rng.integers(119, 123, x.shape, dtype=np.uint8)
            return rng.integers(0, 256, x.shape, dtype=np.uint8)
        if x.dtype == jnp.int8:
            return rng.integers(-127, 128, x.shape, dtype=np.int8)
        if x.dtype == jnp.uint16:  # bfloat16 bits
            fan_in = x.shape[-1]
            return bf16_bits(rng.standard_normal(x.shape, dtype=np.float32) / np.sqrt(fan_in))
        if name == "scales":
            return np.full(x.shape, 0.03 / 127, np.float32)
        fan_in = x.shape[-1] if x.ndim > 1 else 1
        w = rng.standard_normal(x.shape, dtype=np.float32) / np.sqrt(fan_in)
        return jnp.asarray(w, x.dtype)

    params = jax.tree_util.tree_map_with_path(leaf, shapes)
    return {"params": jax.tree.map(jnp.asarray, params)}


def dense_fn(cfg: Config):
    """Every expert on every row (f32 weights), masked by the router's weights."""
    s = cfg.spec
    act = activation_fn(s.activation, s.swiglu_alpha, s.swiglu_limit)

    def run(params, x):
        p = params["params"]
        xf = x.reshape(-1, x.shape[-1])
        w, e = Router(s).apply({"params": p["router"]}, xf)

        def proj(name, h, eq):
            y = jnp.einsum(eq, h, p[name]["weight"])
            return y + p[name + "_bias"][:, None] if name + "_bias" in p else y

        gate = proj("gate", xf, "mi,eoi->emo") if s.gated else None
        y = proj("down", act(gate, proj("up", xf, "mi,eoi->emo")), "emi,eoi->emo")  # [E, M, D]
        m = jnp.arange(xf.shape[0])[:, None]
        mask = jnp.zeros((xf.shape[0], s.n_experts)).at[m, e].set(w)
        return jnp.einsum("emd,me->md", y, mask).reshape(x.shape)

    return jax.jit(run)


def variant_fn(cfg: Config, impl: str, fmt: str):
    if impl == "dense":
        return dense_fn(cfg)
    name, _, tile = impl.partition(":")
    moe = MoE(
        cfg.spec, quant=None if fmt == "f32" else fmt, impl=name, tile=int(tile) if tile else None
    )
    return jax.jit(moe.apply)


def time_variants(fns: dict, args: dict, rounds: int, reps: int) -> dict[str, float]:
    for key, f in fns.items():
        jax.block_until_ready(f(*args[key]))  # compile
    per_round: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for key, f in fns.items():
            ts = []
            for _ in range(reps):
                t0 = time.perf_counter()
                jax.block_until_ready(f(*args[key]))
                ts.append(time.perf_counter() - t0)
            per_round[key].append(statistics.median(ts) * 1e3)
    return {k: statistics.median(v) for k, v in per_round.items()}


def weight_mib(params) -> float:
    leaves = jax.tree.leaves(
        {k: v for k, v in params["params"].items() if k in ("gate", "up", "down")}
    )
    return sum(x.nbytes for x in leaves) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=",".join(CONFIGS))
    ap.add_argument("--rows", default="1,16,512", help="tokens per call; 512 is one prefill")
    ap.add_argument("--impl", default="tiles,ragged,dense")
    ap.add_argument("--formats", default="f32,bf16,int8,mxfp4")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; ms per layer call")
    for cname in a.config.split(","):
        cfg = CONFIGS[cname]
        params = {f: make_params(cfg, f, rng) for f in a.formats.split(",")}
        for f, p in params.items():
            print(f"{cname}: {f} expert weights {weight_mib(p):.1f} MiB")
        for rows in map(int, a.rows.split(",")):
            shape = (rows, 1, cfg.dim) if rows <= 64 else (1, rows, cfg.dim)
            x = jnp.asarray(rng.standard_normal(shape, dtype=np.float32))
            fns, args = {}, {}
            for impl in a.impl.split(","):
                for f in a.formats.split(","):
                    if impl == "dense" and f != "f32":
                        continue  # computes with f32 weights whatever the format
                    if impl == "ragged" and f != "f32" and rows > 64:
                        continue  # the slow baseline: f32 only at prefill
                    fns[(impl, f)] = variant_fn(cfg, impl, f)
                    args[(impl, f)] = (params["f32" if impl == "dense" else f], x)
            reps = a.reps if rows <= 64 else max(1, a.reps // 3)
            res = time_variants(fns, args, a.rounds, reps)
            auto = tile_rows(rows * cfg.spec.top_k, cfg.spec.n_experts)
            for (impl, f), ms in res.items():
                label = f"tiles (t={auto})" if impl == "tiles" else impl
                print(f"{cname} rows={rows:4d} {label:14s} {f:6s} {ms:9.2f} ms", flush=True)


if __name__ == "__main__":
    main()
