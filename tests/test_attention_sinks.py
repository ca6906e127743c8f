"""Attention sinks (gpt-oss: a learned logit per query head that joins the softmax's
denominator and attends to nothing) against transformers' GPT-OSS eager attention, on every
path of the attention math: the einsum form (prefill), the fused one-query form (decode of 4+
rows), and the blocked-cache decode (row and position blocks, one softmax across them); with
a causal mask and a sliding window. No sinks leaves every path as it was.
"""

from __future__ import annotations

from types import SimpleNamespace

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tsjax.cache.cpu_kernels import attend_blocks
from tsjax.cache.dense import attend

N, K, H = 8, 2, 16
SCALE = H**-0.5

pytestmark = pytest.mark.slow  # transformers is the reference


def _hf(q, k, v, q_pos, window, sinks):
    """GPT-OSS's eager_attention_forward on [B, T, N, H] / [B, K, S, H] numpy inputs."""
    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward

    s = k.shape[2]
    delta = q_pos[:, :, None] - np.arange(s)[None, None, :]
    visible = (delta >= 0) & ((window <= 0) | (delta < window))
    mask = torch.from_numpy(np.where(visible, 0.0, -np.inf).astype(np.float32))[:, None]
    module = SimpleNamespace(
        sinks=torch.from_numpy(sinks), num_key_value_groups=N // K, training=False
    )
    out, _ = eager_attention_forward(
        module,
        torch.from_numpy(q).transpose(1, 2),
        torch.from_numpy(k),
        torch.from_numpy(v),
        mask,
        scaling=SCALE,
    )
    return out.reshape(q.shape[0], q.shape[1], N * H).numpy()


def _case(b, t, s, seed):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, t, N, H)).astype(np.float32)
    k = rng.standard_normal((b, K, s, H)).astype(np.float32)
    v = rng.standard_normal((b, K, s, H)).astype(np.float32)
    sinks = (2.0 * rng.standard_normal(N)).astype(np.float32)
    return q, k, v, sinks


@pytest.mark.parametrize("window", [0, 5])
@pytest.mark.parametrize("b,t", [(2, 12), (6, 1)])  # prefill (einsum); decode of 6 rows (fused)
def test_attend_with_sinks_matches_gpt_oss(b, t, window):
    s = 12
    q, k, v, sinks = _case(b, t, s, b * t + window)
    q_pos = np.tile(np.arange(s - t, s, dtype=np.int32), (b, 1))
    if t == 1:
        q_pos = np.arange(s - b, s, dtype=np.int32)[:, None]  # rows at different lengths
    ours = attend(q, k, v, q_pos, jnp.int32(window), SCALE, None, jnp.asarray(sinks))
    ref = _hf(q, k, v, q_pos, window, sinks)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)
    # the sink takes probability mass: without it, the output differs
    plain = attend(q, k, v, q_pos, jnp.int32(window), SCALE, None)
    assert np.max(np.abs(np.asarray(plain) - ref)) > 1e-3


@pytest.mark.parametrize("native", [True, False], ids=["native", "xla"])
@pytest.mark.parametrize("window", [0, 5])
def test_blocked_decode_with_sinks(window, native):
    """Decode over two row blocks (8 + 4 rows) x two position blocks (16 + 16), in the native
    kernel (`native_attend`) and in XLA's ops (`attend_blocks`)."""
    from tsjax.cache.cpu_kernels import native_attend, native_attention

    b, s = 12, 32
    q, k, v, sinks = _case(b, 1, s, 11 + window)
    pos = np.random.default_rng(3).integers(0, s, b).astype(np.int32)
    # key and value blocks [R, K, P, H]
    kb, vb = (
        tuple(
            tuple(jnp.asarray(a[r0:r1, :, p0:p1]) for p0, p1 in ((0, 16), (16, 32)))
            for r0, r1 in ((0, 8), (8, 12))
        )
        for a in (k, v)
    )
    qr = q.reshape(b, K, N // K, H)
    w, rows = jnp.int32(window), jnp.arange(b, dtype=jnp.int32)

    def decode(sinks):
        if not native:
            return attend_blocks(qr, kb, vb, jnp.asarray(pos), s, w, SCALE, None, sinks)
        if not native_attention(qr, kb, None):
            pytest.skip("the CPU kernels are not built here")
        out = native_attend(
            qr[:, None], kb, vb, jnp.asarray(pos)[:, None], rows, s, w, SCALE, sinks
        )
        return out.reshape(b, -1)

    ours = decode(sinks)
    ref = _hf(q, k, v, pos[:, None], window, sinks)[:, 0]
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)
    plain = decode(None)
    np.testing.assert_allclose(
        plain,
        attend(q, k, v, pos[:, None], jnp.int32(window), SCALE, None)[:, 0],
        rtol=1e-5,
        atol=1e-6,
    )
