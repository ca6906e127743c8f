"""YaRN RoPE and Mistral 3's attention temperature against transformers: the inverse
frequencies and attention factor of `transformers.modeling_rope_utils` (gpt-oss's config,
untruncated ramp; Ministral 3's, truncated, with mscale / mscale_all_dim), the cos/sin tables
of GPT-OSS's and Ministral 3's rotary embeddings, and Ministral 3's query scale by position.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tsjax.layers.rope import (
    attention_temperature,
    rope_lookup,
    rope_lookup_freqs,
    yarn_attention_factor,
    yarn_frequencies,
)

pytestmark = pytest.mark.slow  # transformers is the reference


def gpt_oss_config():
    from transformers.models.gpt_oss.configuration_gpt_oss import GptOssConfig

    # the config's own default rope_parameters: yarn, factor 32, 4096, beta 32/1, truncate off
    return GptOssConfig(hidden_size=64, head_dim=64, num_attention_heads=4, rope_theta=150000.0)


def ministral3_config(mscale: float = 1.0, mscale_all_dim: float = 1.0):
    from transformers.models.ministral3.configuration_ministral3 import Ministral3Config

    cfg = Ministral3Config(hidden_size=256, head_dim=128, num_attention_heads=2)
    cfg.rope_parameters = {
        **cfg.rope_parameters,
        "mscale": mscale,
        "mscale_all_dim": mscale_all_dim,
    }
    return cfg


def _ours(cfg) -> tuple[np.ndarray, float]:
    rp = cfg.rope_parameters
    inv = yarn_frequencies(
        rp["rope_theta"],
        cfg.head_dim,
        rp["factor"],
        rp["original_max_position_embeddings"],
        rp.get("beta_fast") or 32.0,
        rp.get("beta_slow") or 1.0,
        truncate=rp.get("truncate", True),
    )
    return inv, yarn_attention_factor(rp["factor"], rp.get("mscale"), rp.get("mscale_all_dim"))


CONFIGS = {
    "gpt-oss": gpt_oss_config,
    "ministral3": ministral3_config,
    "ministral3-mscale": lambda: ministral3_config(1.0, 0.5),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_yarn_parameters_match_transformers(name):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = CONFIGS[name]()
    ref_inv, ref_factor = ROPE_INIT_FUNCTIONS["yarn"](cfg)
    inv, factor = _ours(cfg)
    np.testing.assert_allclose(inv, ref_inv.numpy(), rtol=2e-7)
    assert factor == pytest.approx(ref_factor, rel=1e-12)
    if name == "gpt-oss":
        # the untruncated ramp differs from llama.cpp's truncated one in its end dimensions
        truncated = yarn_frequencies(150000.0, 64, 32.0, 4096, truncate=True)
        assert not np.allclose(truncated, inv, rtol=1e-3)


@pytest.mark.parametrize("name", ["gpt-oss", "ministral3"])
def test_yarn_tables_match_rotary_embedding(name):
    """cos/sin at positions past the original context, magnitude included: from the rotary
    embedding's own frequencies, to float32 rounding; from ours (which differ from them in
    the last bit of some dimensions: float32 pow), to that bit times the angle."""
    cfg = CONFIGS[name]()
    if name == "gpt-oss":
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRotaryEmbedding as Rotary
    else:
        from transformers.models.ministral3.modeling_ministral3 import (
            Ministral3RotaryEmbedding as Rotary,
        )
    positions = np.arange(0, 20000, 37, dtype=np.int32)[None]
    cos_ref, sin_ref = Rotary(cfg)(torch.zeros(1), torch.from_numpy(positions))
    half = cfg.head_dim // 2
    inv, factor = _ours(cfg)
    rotary = Rotary(cfg)
    # ours differ from theirs by a few float32 ulps of the frequency: at angle a = p * f
    # that is p * |df|, plus a float32 rounding of the angle itself (an ulp of a ~ 1e-3 at
    # p ~ 2e4), times the magnitude; measured 3.2e-4 (AMD EPYC) and 1.9e-3 (Intel Xeon)
    ref = rotary.inv_freq.numpy().astype(np.float64)
    p = float(positions.max())
    drift = p * np.abs(np.asarray(inv, np.float64) - ref) + np.spacing(np.float32(p * ref))
    bound = float(np.max(drift)) * max(factor, 1.0) + 2e-6
    for freqs, atol in ((rotary.inv_freq.numpy(), 2e-6), (inv, bound)):
        cos, sin = rope_lookup_freqs(positions, freqs, 20000, magnitude=factor)
        np.testing.assert_allclose(cos[0, :, 0], cos_ref[0, :, :half].numpy(), atol=atol)
        np.testing.assert_allclose(sin[0, :, 0], sin_ref[0, :, :half].numpy(), atol=atol)


def test_rope_lookup_unchanged():
    """rope_lookup now goes through rope_lookup_freqs: the same tables as its own formula."""
    pos = np.arange(0, 300, 7, dtype=np.int32)[None]
    cos, sin = rope_lookup(pos, 10000.0, 2.0, 64, 512)
    exponent = np.arange(32, dtype=np.float32) * np.float32(2.0 / 64)
    inv = np.float32(1.0) / np.power(np.float32(10000.0), exponent)
    angles = (np.arange(512, dtype=np.float32) / np.float32(2.0))[:, None] * inv
    np.testing.assert_array_equal(np.asarray(cos)[0, :, 0], np.cos(angles)[pos[0]])
    np.testing.assert_array_equal(np.asarray(sin)[0, :, 0], np.sin(angles)[pos[0]])


def test_attention_temperature_matches_ministral3():
    from transformers.models.ministral3.modeling_ministral3 import get_llama_4_attn_scale

    positions = np.array([[0, 1, 16383, 16384, 16385, 40000, 65536, 200000]], np.int32)
    ref = get_llama_4_attn_scale(torch.from_numpy(positions), 0.1, 16384)  # [B, 1, T, 1]
    ours = attention_temperature(positions, 0.1, 16384)  # [B, T, 1, 1]
    np.testing.assert_allclose(np.asarray(ours)[:, :, 0, 0], ref[:, 0, :, 0].numpy(), rtol=1e-6)
    assert float(np.asarray(ours)[0, 2, 0, 0]) == 1.0  # no scaling inside the original context
