"""The recurrent layers' prefill and decode on this backend: chunked against token-by-token.

    python -m benchmarks.recurrent [--tokens 512] [--rows 16] [--layer deltanet|mamba2|both]

Times one layer (random weights and inputs, float32), the best of `--rounds` calls of each
jitted program (alternating), shaped like a small real model:
- Gated DeltaNet as in Qwen3.5-0.8B (D 1024, 16 key and 16 value heads of 128, conv 4);
- Mamba2 with transformers' NemotronHConfig defaults (D 4096, 128 heads of 64, 8 groups,
  state 128, conv 4, chunk 128).

For each: a prefill of `--tokens` tokens in one row, chunked (what prefill runs) and token
by token (a `lax.scan` of the decode recurrence), the whole layer and its recurrence alone
(the projections are the same in both forms); and a decode step of `--rows` rows from a
nonzero state, donated as the engine's steps donate the cache. Prints the best wall time and
the best process CPU time (all threads) of each; BENCHMARKS.md ("Recurrent layers") quotes
them.
"""

from __future__ import annotations

import argparse
import time


def _alternate(cases: dict, rounds: int) -> dict[str, tuple[float, float]]:
    """Each case (name -> a call returning arrays) once per round, the cases alternating so
    that the other processes' load falls on all alike; the best wall and best process CPU
    time (all threads: on a shared machine it moves less with the load) of each, in ms."""
    import jax

    for call in cases.values():
        jax.block_until_ready(call())
    best = {name: (float("inf"), float("inf")) for name in cases}
    for _ in range(rounds):
        for name, call in cases.items():
            t, c = time.perf_counter(), time.process_time()
            jax.block_until_ready(call())
            wall, cpu = time.perf_counter() - t, time.process_time() - c
            best[name] = (min(best[name][0], wall * 1e3), min(best[name][1], cpu * 1e3))
    return best


def _layer(name: str, chunk: int | None):
    from tsjax.layers.deltanet import CHUNK as DCHUNK
    from tsjax.layers.deltanet import GatedDeltaNet
    from tsjax.layers.mamba2 import CHUNK as MCHUNK
    from tsjax.layers.mamba2 import Mamba2

    if name == "deltanet":
        return 1024, GatedDeltaNet(16, 16, 128, 128, 4, 1e-6, chunk=chunk or DCHUNK)
    return 4096, Mamba2(128, 64, 8, 128, 4, 1e-5, chunk=chunk or MCHUNK)


def _core(name: str, layer, t: int):
    """The recurrence alone on random inputs: (chunked fn, token-by-token fn, args)."""
    import jax
    import jax.numpy as jnp

    from tsjax.layers import deltanet, mamba2

    k = jax.random.split(jax.random.key(1), 6)
    if name == "deltanet":
        h, dk, dv = layer.v_heads, layer.k_dim, layer.v_dim
        q = deltanet.l2_normalize(jax.random.normal(k[0], (1, t, h, dk)), 1e-6)
        kk = deltanet.l2_normalize(jax.random.normal(k[1], (1, t, h, dk)), 1e-6)
        v = jax.random.normal(k[2], (1, t, h, dv))
        g = -jax.nn.softplus(jax.random.normal(k[3], (1, t, h)))
        beta = jax.nn.sigmoid(jax.random.normal(k[4], (1, t, h)))
        s = jnp.zeros((1, h, dk, dv))
        args = (q, kk, v, g, beta, s)
        return (
            jax.jit(lambda *a: deltanet.chunked_delta_rule(*a, layer.chunk)),
            jax.jit(deltanet.recurrent_delta_rule),
            args,
        )
    h, p, g, n = layer.n_heads, layer.head_dim, layer.n_groups, layer.state_size
    x = jax.random.normal(k[0], (1, t, h, p))
    dt = jax.nn.softplus(jax.random.normal(k[1], (1, t, h)))
    a = -jnp.exp(jax.random.normal(k[2], (h,)))
    b, c = jax.random.normal(k[3], (1, t, g, n)), jax.random.normal(k[4], (1, t, g, n))
    s = jnp.zeros((1, h, p, n))
    args = (x, dt, a, b, c, s)
    return (
        jax.jit(lambda *a: mamba2.chunked_ssd(*a, layer.chunk)),
        jax.jit(mamba2.recurrent_ssd),
        args,
    )


def bench(name: str, tokens: int, rows: int, rounds: int, chunk: int | None) -> None:
    import jax
    import jax.numpy as jnp

    from tsjax.cache.state import Step

    d, layer = _layer(name, chunk)

    def step(b, t, start):
        pos = start + jnp.zeros((b, 1), jnp.int32) + jnp.arange(t, dtype=jnp.int32)
        return Step(pos, None, jnp.full((b,), t, jnp.int32))

    x = jax.random.normal(jax.random.key(0), (1, tokens, d))
    params = jax.jit(layer.init)(
        jax.random.key(0), x[:, :1], layer.new_state(None, 1), 0, step(1, 1, 0)
    )["params"]

    def apply(p, x, s, st, rec):
        return layer.apply({"params": p}, x, s, 0, st, rec)

    fwd = jax.jit(apply, static_argnums=4)
    dec = jax.jit(apply, static_argnums=4, donate_argnums=2)  # the steps donate the cache
    pre, fresh = step(1, tokens, 0), layer.new_state(None, 1)
    core_c, core_n, args = _core(name, layer, tokens)
    xd = jax.random.normal(jax.random.key(3), (rows, 1, d))
    live = [
        jax.tree.map(
            lambda a: jax.random.normal(jax.random.key(2), a.shape, a.dtype) * 0.1,
            layer.new_state(None, rows),
        )
    ]

    def decode():
        out, live[0] = dec(params, xd, live[0], step(rows, 1, 7), None)
        return out

    cases = {
        "layer chunked": lambda: fwd(params, x, fresh, pre, False),
        "layer token by token": lambda: fwd(params, x, fresh, pre, True),
        "recurrence chunked": lambda: core_c(*args),
        "recurrence token by token": lambda: core_n(*args),
        "decode": decode,
    }
    best = _alternate(cases, rounds)
    print(f"{name} ({type(layer).__name__}, D {d}, chunk {layer.chunk}), best of {rounds}:")
    for case, (wall, cpu) in best.items():
        what = f"decode step, {rows} rows" if case == "decode" else f"prefill {tokens}, {case}"
        print(f"  {what:40s} {wall:9.2f} ms  ({cpu:9.2f} ms CPU)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.recurrent", description=__doc__)
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--chunk", type=int, default=None, help="override the layer's chunk size")
    p.add_argument("--layer", choices=["deltanet", "mamba2", "both"], default="both")
    args = p.parse_args(argv)
    names = ["deltanet", "mamba2"] if args.layer == "both" else [args.layer]
    for name in names:
        bench(name, args.tokens, args.rows, args.rounds, args.chunk)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
