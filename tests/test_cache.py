"""The cache interface (`tsjax.cache`): the stacked and the blocked attention layouts write,
attend and swap rows alike; and the decoder and the compiled steps carry a state of another
kind beside attention's (a stand-in for a recurrent layer, defined here) without knowing it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gguf_factory import write_tiny_gguf

from tsjax import cache as cache_pkg
from tsjax.cache import BlockedKV, Cache, StackedKV, Step
from tsjax.gguf import GGUFFile
from tsjax.models import config_from_gguf
from tsjax.models import decoder as decoder_mod
from tsjax.sampling import SamplingParams
from tsjax.shapes import StepShapes
from tsjax.stack import Param
from tsjax.steps import Steps

ROWS, MAX_LEN, KV, H, N = 8, 64, 2, 8, 4
BOUNDS = ((4, 8), (16, 24, 32, 48, 64))  # split spans: decode may skip 24-31 and 48-63


def _layouts():
    stacked = StackedKV.create(1, ROWS, KV, MAX_LEN, H, jnp.float32)
    blocked = BlockedKV.create(BOUNDS, KV, H, jnp.float32, skip_min_rows=1)
    return stacked, blocked


def _run(state, step: Step, k, v, q, sinks=None):
    step = Cache((state,), jnp.zeros((ROWS,), jnp.int32)).step(
        step.positions, step.rows, step.counts, step.attn_len
    )
    state = state.write(k, v, step, 0)
    return state, np.asarray(state.attend(q, step, 0, jnp.int32(0), H**-0.5, None, sinks))


@pytest.mark.parametrize("with_sinks", [False, True])
def test_layouts_write_attend_and_swap_alike(with_sinks):
    """Prefill, decode (its upper position block read by one row block and skipped by the
    other), swap; with and without attention sinks."""
    rng = np.random.default_rng(0)
    sinks = jnp.asarray(rng.standard_normal(N), jnp.float32) if with_sinks else None

    def run(state, step, k, v, q):
        return _run(state, step, k, v, q, sinks)

    def rand(*shape):
        return jnp.asarray(rng.standard_normal(shape), jnp.float32)

    # prefill: rows 5 and 1 (T=16 from positions 0 and 10: into the span 16-23), a padding row
    positions = jnp.asarray([0, 10, 0])[:, None] + jnp.arange(16)[None]
    prefill = Step(positions, jnp.asarray([5, 1, ROWS]), jnp.asarray([16, 16, 0]), attn_len=32)
    k, v, q = rand(3, 16, KV, H), rand(3, 16, KV, H), rand(3, 16, N, H)
    outs = [run(s, prefill, k, v, q) for s in _layouts()]
    np.testing.assert_allclose(outs[0][1][:2], outs[1][1][:2], rtol=1e-5, atol=1e-5)

    # decode of the cache rows [0, 6): rows 1 and 5 continue, the others read what they hold
    lengths = jnp.asarray([3, 26, 0, 2, 7, 16])
    decode = Step(lengths[:, None], None, jnp.ones((6,), jnp.int32), attn_len=32)
    k, v, q = rand(6, 1, KV, H), rand(6, 1, KV, H), rand(6, 1, N, H)
    outs = [run(s, decode, k, v, q) for s, _ in outs]
    np.testing.assert_allclose(outs[0][1], outs[1][1], rtol=1e-5, atol=1e-5)

    # swap rows 1 <-> 6 and 5 <-> 0 (plus a padding pair): row 6 now answers as row 1 did
    src, dst = jnp.asarray([1, 5, ROWS, 6, 0, ROWS]), jnp.asarray([6, 0, ROWS, 1, 5, ROWS])
    swapped = [s.swap(src, dst) for s, _ in outs]
    moved = jnp.asarray([17, 0, 1, 3, 8, 4, 27, 0])  # each row's next position
    step = Step(moved[:, None], None, jnp.ones((ROWS,), jnp.int32), attn_len=32)
    k, v, q = rand(ROWS, 1, KV, H), rand(ROWS, 1, KV, H), rand(ROWS, 1, N, H)
    got = [run(s, step, k, v, q)[1] for s in swapped]
    np.testing.assert_allclose(got[0], got[1], rtol=1e-5, atol=1e-5)
    # against the unswapped blocked state with the rows' queries exchanged back
    perm = np.asarray([5, 6, 2, 3, 4, 0, 1, 7])
    step_back = Step(moved[perm][:, None], None, jnp.ones((ROWS,), jnp.int32), attn_len=32)
    back = run(outs[1][0], step_back, k[perm], v[perm], q[perm])[1]
    np.testing.assert_allclose(got[1][[6, 0]], back[[1, 5]], rtol=1e-5, atol=1e-5)


# -- a state of another kind ------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclass
class TokenCount:
    """A stand-in for a recurrent state: per row, how many real tokens it has seen (`seen`,
    [L, B]) and a saved copy (`saved`), updated only by a step's real tokens (counts)."""

    seen: jax.Array
    saved: jax.Array

    REWINDS: ClassVar[bool] = False

    def prepare(self, step: Step) -> None:
        pass

    def add(self, step: Step, layer: Any) -> TokenCount:
        seen = self.seen.at[layer, step.row_index].add(step.counts, mode="drop")
        return replace(self, seen=seen)

    def swap(self, src, dst) -> TokenCount:
        def move(x):
            return x.at[:, dst].set(jnp.take(x, src, axis=1, mode="clip"), mode="drop")

        return TokenCount(move(self.seen), move(self.saved))

    def checkpoint(self, rows, slots) -> TokenCount:  # one slot (0) per row
        keep = jnp.where(slots >= 0, self.seen[:, rows], self.saved[:, rows])
        return replace(self, saved=self.saved.at[:, rows].set(keep, mode="drop"))

    def restore(self, rows, slots) -> TokenCount:
        back = jnp.where(slots >= 0, self.saved[:, rows], self.seen[:, rows])
        return replace(self, seen=self.seen.at[:, rows].set(back, mode="drop"))

    def shardings(self, named) -> TokenCount:
        axes = ("layers", "batch")
        return TokenCount(named(axes, self.seen.shape), named(axes, self.saved.shape))


class CountingLayer(nn.Module):
    """A layer of the stand-in kind: scales x by a parameter and counts tokens."""

    PARAMS: ClassVar = (Param("count_gain.weight", ("gain",), ("embed",)),)
    cfg: Any
    dtype: Any = jnp.float32
    quant: str | None = None

    @nn.compact
    def __call__(self, carry, step, layer_data, rope):
        x, state = carry
        gain = self.param("gain", nn.initializers.ones, (x.shape[-1],), self.dtype)
        return (x * gain, state.add(step, layer_data[0])), None


def _counting(cfg, seg, layout, rows, max_len, dtype):
    shape = (seg.count, rows)  # two buffers: the steps donate each
    return TokenCount(jnp.zeros(shape, jnp.int32), jnp.zeros(shape, jnp.int32))


@pytest.fixture
def counting_kind(monkeypatch):
    monkeypatch.setitem(decoder_mod.BLOCKS, "counting", CountingLayer)
    monkeypatch.setitem(cache_pkg.STATES, "counting", _counting)


@pytest.mark.parametrize("unrolled", [True, False])
def test_steps_carry_a_state_of_another_kind(tmp_path, counting_kind, unrolled):
    """Layers 1 and 2 of a tiny llama replaced by the counting kind: the steps run it
    unchanged (its state in its segments, counted by the step's real tokens only: prefill
    padding and idle decode rows add nothing), swap its rows, and checkpoint / restore
    reach it while attention's state ignores them."""
    g = GGUFFile(write_tiny_gguf(tmp_path / "llama.gguf", "llama", n_layers=4))
    cfg = config_from_gguf(g)
    kinds = ("attention", "counting", "counting", "attention")
    cfg = replace(cfg, layer_kinds=kinds)
    shapes = StepShapes.default(rows=4, max_len=32, min_prefill=16, min_attn=32)
    steps = Steps(cfg, shapes, unrolled=unrolled)
    names = [s.name for s in steps.model.plan()]
    assert names == (
        [f"layers_{i}" for i in range(4)]
        if unrolled
        else ["layers_0_0", "layers_1_2", "layers_3_3"]
    )
    tokens = jnp.zeros((1, 1), jnp.int32)
    params = steps.model.init(
        jax.random.key(0), tokens, tokens, steps.model.new_cache(1, 8), None, None, 8
    )["params"]
    cache, sampler = steps.new_cache(), steps.new_sampler()
    assert not cache.rewinds
    greedy = [SamplingParams.greedy()] * 2
    _, _, cache, sampler = steps.prefill(
        params, cache, sampler, [[1, 2, 3], [4] * 9], [2, 0], greedy
    )
    # row 2 alone: the decode bucket is rows [0, 4), the others idle
    _, _, cache, sampler = steps.decode(params, cache, sampler, [2], [5], 3, 3)

    def seen(c: Cache) -> list:
        counts = [s.seen for s in c.layers if isinstance(s, TokenCount)]
        return np.concatenate([np.asarray(x) for x in counts]).tolist()

    assert seen(cache) == [[9, 0, 6, 0]] * 2  # prompts (not their padding), 3 decode steps
    _, _, cache, sampler = steps.swap_rows(params, cache, sampler, [(0, 3)])
    assert seen(cache) == [[0, 0, 6, 9]] * 2
    assert np.asarray(cache.lengths).tolist() == [0, 0, 6, 9]
    # the prefill step's hooks: row 3 saves its state after 2 more tokens (11), takes 3
    # more (14), then resumes from what it saved for the next 1 (12)
    one = greedy[:1]
    _, _, cache, sampler = steps.prefill(
        params, cache, sampler, [[7, 7]], [3], one, starts=[9], checkpoint=[0]
    )
    _, _, cache, sampler = steps.prefill(params, cache, sampler, [[8] * 3], [3], one, starts=[11])
    assert seen(cache) == [[0, 0, 6, 14]] * 2
    _, _, cache, sampler = steps.prefill(
        params, cache, sampler, [[9]], [3], one, starts=[11], restore=[0]
    )
    assert seen(cache) == [[0, 0, 6, 12]] * 2
