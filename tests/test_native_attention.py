"""Attention in the native kernel (`tsjax.kernels.blockdot.attention`, what the blocked cache
runs on one CPU device) against the same attention in XLA's ops over the same blocks. Decode
(`attend_blocks`): row blocks the batch fills or ends inside, position blocks of different
sizes, rows at block edges and at position 0, sliding windows, sinks, a head size that is not
a multiple of 16 (the portable dot). Prefill (`native_attend`): several tokens of rows
anywhere in the cache, causal or up to a key end (an image's positions), against the rows
gathered out of the blocks and XLA's dense attention."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tsjax.cache import cpu_kernels
from tsjax.cache.cpu_kernels import attend_blocks, native_attend, read_rows
from tsjax.cache.dense import attend
from tsjax.kernels import blockdot

pytestmark = pytest.mark.skipif(not blockdot.available(), reason="no C++ compiler here")

ROWS = (8, 8)  # row blocks
POSITIONS = (16, 16, 32)  # position blocks


def _blocks(rng, kv: int, h: int):
    return tuple(
        tuple(jnp.asarray(rng.standard_normal((r, kv, p, h)), jnp.float32) for p in POSITIONS)
        for r in ROWS
    )


def _case(b: int, kv: int, g: int, h: int, seed: int):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((b, kv, g, h)), jnp.float32)
    pos = rng.integers(0, sum(POSITIONS), b).astype(np.int32)
    pos[:4] = [0, 15, 16, sum(POSITIONS) - 1][: min(4, b)]  # the edges
    sinks = jnp.asarray(rng.standard_normal(kv * g), jnp.float32)
    return q, jnp.asarray(pos), _blocks(rng, kv, h), _blocks(rng, kv, h), sinks


@pytest.mark.parametrize(
    "b,kv,g,h,attn,window,sink",
    [
        (16, 3, 3, 64, 64, 0, False),  # SmolLM2's heads, both row blocks full
        (12, 3, 3, 64, 64, 0, True),  # the batch ends inside the second row block
        (5, 1, 4, 64, 32, 7, False),  # one row block, a window, the last block unread
        (16, 2, 2, 40, 64, 20, True),  # head size 40: the portable dot
        (1, 3, 3, 64, 64, 0, False),  # one row
    ],
)
def test_native_decode_attention_matches_xla(b, kv, g, h, attn, window, sink):
    """One token for each of the cache rows [0, b), as a decode step."""
    q, pos, kb, vb, sinks = _case(b, kv, g, h, seed=b + h + window)
    pos = jnp.minimum(pos, attn - 1)
    sinks = sinks if sink else None
    w = jnp.int32(window)
    assert cpu_kernels.native_attention(q, kb, None)
    rows = jnp.arange(b, dtype=jnp.int32)

    def native(q, pos, kb, vb):
        out = native_attend(q[:, None], kb, vb, pos[:, None], rows, attn, w, 0.125, sinks)
        return out.reshape(b, -1)

    ours = jax.jit(native)(q, pos, kb, vb)
    ref = jax.jit(
        lambda q, pos, kb, vb: attend_blocks(q, kb, vb, pos, attn, w, 0.125, None, sinks)
    )(q, pos, kb, vb)
    assert ours.shape == ref.shape == (b, kv * g * h)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=2e-5, atol=2e-6)


def test_soft_capped_and_narrow_blocks_keep_the_xla_form():
    """Gemma 2's logit soft-cap and a non-float32 cache are not the kernel's."""
    rng = np.random.default_rng(0)
    q = jnp.zeros((2, 1, 2, 16), jnp.float32)
    kb = _blocks(rng, 1, 16)
    assert cpu_kernels.native_attention(q, kb, None)
    assert not cpu_kernels.native_attention(q, kb, 50.0)
    narrow = tuple(tuple(blk.astype(jnp.bfloat16) for blk in rb) for rb in kb)
    assert not cpu_kernels.native_attention(q, narrow, None)


@pytest.mark.parametrize(
    "window,key_end,sink", [(0, False, False), (6, False, True), (0, True, True)]
)
def test_native_prefill_attention_matches_xla(window, key_end, sink):
    """Rows 3, 9 and 14 (both row blocks), 12 tokens each from different starts."""
    kv, g, h, t = 2, 2, 64, 12
    _, _, kb, vb, sinks = _case(3, kv, g, h, seed=7 + window)
    rng = np.random.default_rng(5)
    q = jnp.asarray(rng.standard_normal((3, t, kv, g, h)), jnp.float32)
    rows = jnp.asarray([3, 9, 14], jnp.int32)
    starts = np.asarray([0, 20, 45])
    positions = jnp.asarray(starts[:, None] + np.arange(t), jnp.int32)
    # an image's positions see each other: up to the end of a span 4..9 of the tokens
    ends = np.where((np.arange(t) >= 4) & (np.arange(t) < 10), starts[:, None] + 10, positions + 1)
    ends = jnp.asarray(ends, jnp.int32) if key_end else None
    sinks = sinks if sink else None
    attn = sum(POSITIONS)
    ours = native_attend(q, kb, vb, positions, rows, attn, jnp.int32(window), 0.125, sinks, ends)
    keys, values = read_rows(kb, rows, attn), read_rows(vb, rows, attn)
    flat = q.reshape(3, t, kv * g, h)
    ref = attend(flat, keys, values, positions, jnp.int32(window), 0.125, None, sinks, ends)
    np.testing.assert_allclose(
        np.asarray(ours).reshape(3, t, -1), np.asarray(ref), rtol=2e-5, atol=2e-6
    )
