"""Memory the process holds: a zeroed cache is resident only where steps write it."""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tsjax.cache.blocked import BlockedKV
from tsjax.residency import resident_bytes, zeros, zeros_many

linux = pytest.mark.skipif(sys.platform != "linux", reason="pages are given back on Linux")
MB = 1 << 20


def test_zeros_are_zeros_and_writable():
    x = zeros((4, 3, 64, 2048), jnp.float32)
    assert x.shape == (4, 3, 64, 2048) and x.dtype == jnp.float32
    assert not np.asarray(x).any()
    write = jax.jit(
        lambda c, v: jax.lax.dynamic_update_slice(c, v, (1, 0, 0, 700)), donate_argnums=0
    )
    y = np.asarray(write(x, jnp.ones((1, 3, 64, 5))))
    assert y[1, :, :, 700:705].all() and y.sum() == 3 * 64 * 5
    # several at once (one dispatch): equal shapes are still separate buffers
    many = zeros_many([(4, 3, 64, 128)] * 3, jnp.float32)
    assert len({a.unsafe_buffer_pointer() for a in many}) == 3
    first = write(many[0], jnp.ones((1, 3, 64, 5)))
    assert np.asarray(first).any() and not any(np.asarray(a).any() for a in many[1:])
    # inside a trace it is jnp.zeros
    assert jax.jit(lambda: zeros((1000,), jnp.int32))().sum() == 0


@linux
def test_a_server_sized_cache_is_not_resident_until_written():
    """SmolLM2's blocked cache at 16 rows x 2048 positions: 1.5 GB reserved over 30 layers.
    Creating it takes a fraction of that; a prefill-like write of 300 positions into 2 rows
    makes resident what those rows reached, and they read back what was written."""
    blocks = ((16,), (128, 256, 384, 512, 1024, 1536, 2048))
    before = resident_bytes()
    layers = [BlockedKV.create(blocks, 3, 64, jnp.float32, 8) for _ in range(30)]
    reserved = sum(b.nbytes for layer in layers for row in (*layer.k, *layer.v) for b in row)
    created = resident_bytes() - before
    assert reserved > 1400 * MB
    assert created < 150 * MB, f"{created / MB:.0f} MB resident for {reserved / MB:.0f} MB"

    first = layers[0].k[0][0]  # keys [R, K, H, P], positions 0-127
    write = jax.jit(lambda c: c.at[:2, :, :, :100].set(1.0), donate_argnums=0)
    row_block = list(layers[0].k[0])
    row_block[0] = write(first)
    assert np.asarray(row_block[0])[:2, :, :, :100].all()
    assert not np.asarray(row_block[0])[2:].any() and not np.asarray(row_block[1]).any()
