"""The decoder stack shared by every family: embed, scan over layers, norm, project.

Families differ only in their config (which norms, biases, windows, caps) and in how their
GGUF tensors are named; both live in the family's own module.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from tsjax.cache import KVCache, WriteIndex, batch_write_index
from tsjax.layers.attention import Attention
from tsjax.layers.embed import Embed
from tsjax.layers.linear import Linear, input_amax
from tsjax.layers.mlp import GatedMLP
from tsjax.layers.norms import RMSNorm
from tsjax.layers.rope import RopeTables, rope_lookup
from tsjax.models.config import ModelConfig
from tsjax.shapes import SKIP_MIN_ROWS


class DecoderLayer(nn.Module):
    """Pre-norm attention + gated MLP; with `post_norms`, Gemma's sandwich norms."""

    cfg: ModelConfig
    attn_len: int
    dtype: jnp.dtype = jnp.float32
    quant: str | None = None
    skip_min_rows: int = SKIP_MIN_ROWS

    @nn.compact
    def __call__(
        self,
        carry,
        positions,
        rows,
        layer_data,
        rope: RopeTables,
        writes: WriteIndex | None = None,
    ):
        """layer_data: (layer index, attention window, index of the layer's rotary base);
        rope: every base's rotation tables for this step, stacked ([bases, B, T, 1, H/2]);
        writes: the blocked cache's scatter indices. The decoder makes both once a step."""
        x, cache_k, cache_v = carry
        layer, window, base = layer_data
        c = self.cfg
        rope = (rope[0][base], rope[1][base])
        attn = Attention(
            n_heads=c.n_heads,
            n_kv_heads=c.n_kv_heads,
            head_dim=c.head_dim,
            norm_eps=c.norm_eps,
            qkv_bias=c.qkv_bias,
            qk_norm=c.qk_norm,
            scale=c.attn_scale,
            softcap=c.attn_softcap,
            dtype=self.dtype,
            quant=self.quant,
            skip_min_rows=self.skip_min_rows,
            name="attn",
        )
        h = RMSNorm(c.norm_eps, self.dtype, name="attn_norm")(x)
        h, cache_k, cache_v = attn(
            h, positions, cache_k, cache_v, layer, rows, self.attn_len, window, rope, writes
        )
        if c.post_norms:
            h = RMSNorm(c.norm_eps, self.dtype, name="post_attn_norm")(h)
        x = x + h
        h = RMSNorm(c.norm_eps, self.dtype, name="ffn_norm")(x)
        h = GatedMLP(c.ffn_dim, c.activation, self.dtype, self.quant, name="mlp")(h)
        if c.post_norms:
            h = RMSNorm(c.norm_eps, self.dtype, name="post_ffn_norm")(h)
        return (x + h, cache_k, cache_v), None


def unroll_layers_default() -> bool:
    """Whether the layer loop is unrolled over per-layer weights (else one `lax.scan` over
    weights stacked on a leading layer axis).

    XLA:CPU's matmul kernels take whole buffers, so inside a scan it first copies each
    layer's weights out of the stacked array, every step: on SmolLM2 that copy is as much
    traffic again as the matmuls' own weight reads. Unrolled, each matmul reads its weights
    where they lie, at the price of a longer compile. Accelerator backends slice in place and
    keep the scan's short compile."""
    return jax.default_backend() == "cpu"


def layer_name(i: int) -> str:
    """Params key of layer i in the unrolled layout ("layers" holds the stacked layout)."""
    return f"layers_{i}"


class Decoder(nn.Module):
    cfg: ModelConfig
    dtype: jnp.dtype = jnp.float32
    unrolled: bool = False
    quant: str | None = None  # "bf16" / "int8" weights (see tsjax.layers.linear)
    skip_min_rows: int = SKIP_MIN_ROWS  # blocked cache

    @nn.compact
    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        cache: KVCache,
        rows: jax.Array | None,
        logit_index: jax.Array | None,
        attn_len: int,
    ) -> tuple[jax.Array, KVCache]:
        """tokens, positions: [B, T]; rows: [B] cache rows (None: the cache rows [0, B));
        logit_index: [B] which of the T positions to project to logits (None: all).
        Returns (logits [B, V] or [B, T, V], cache with the new K/V written)."""
        c = self.cfg
        embed = Embed(c.vocab_size, c.dim, self.dtype, name="embed")
        x = embed(tokens)  # [B, T, D]
        if c.embed_scale is not None:
            x = x * jnp.asarray(c.embed_scale, x.dtype)
        # The rotation tables of each distinct (base, scale), looked up once for every layer
        # (positions stay below attn_len).
        layer_bases = list(zip(c.layer_rope_thetas, c.layer_rope_scales, strict=True))
        bases = sorted(set(layer_bases))
        base_of = [bases.index(b) for b in layer_bases]
        tables = [rope_lookup(positions, t, s, c.head_dim, attn_len) for t, s in bases]
        rope = (jnp.stack([t[0] for t in tables]), jnp.stack([t[1] for t in tables]))
        if self.unrolled:
            writes = (
                batch_write_index(cache.k[0], rows, positions, attn_len) if cache.blocked else None
            )
            ks, vs = [], []
            for i in range(c.n_layers):
                data = (i, c.layer_windows[i], base_of[i])
                # blocked cache: this layer's own buffers; stacked: all of it, indexed by i
                k, v = (cache.k[i], cache.v[i]) if cache.blocked else (cache.k, cache.v)
                (x, k, v), _ = DecoderLayer(
                    c, attn_len, self.dtype, self.quant, self.skip_min_rows, name=layer_name(i)
                )((x, k, v), positions, rows, data, rope, writes)
                ks.append(k)
                vs.append(v)
            if cache.blocked:
                k, v = tuple(ks), tuple(vs)
            return self._head(embed, x, logit_index, KVCache(k, v, cache.lengths))
        assert not cache.blocked, "the scanned layer loop takes the stacked cache layout"
        layers = nn.scan(
            DecoderLayer,
            variable_axes={"params": 0, "intermediates": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast),
            length=c.n_layers,
        )(c, attn_len, self.dtype, self.quant, name="layers")
        layer_data = (
            jnp.arange(c.n_layers, dtype=jnp.int32),
            jnp.asarray(c.layer_windows, jnp.int32),
            jnp.asarray(base_of, jnp.int32),
        )
        (x, k, v), _ = layers((x, cache.k, cache.v), positions, rows, layer_data, rope)
        return self._head(embed, x, logit_index, KVCache(k, v, cache.lengths))

    def _head(self, embed, x, logit_index, cache):
        c = self.cfg
        if logit_index is not None:
            x = jnp.take_along_axis(x, logit_index[:, None, None], axis=1)[:, 0]  # [B, D]
        x = RMSNorm(c.norm_eps, self.dtype, name="final_norm")(x)
        if c.tied_embeddings and self.quant is None:
            # what a quantized model's separate lm_head would see (calibration reads it)
            self.sow("intermediates", "lm_head_input_amax", input_amax(x))
            logits = embed.attend(x)
        else:  # bf16 / int8: a tied embedding gets a copy in that format as the projection
            logits = Linear(c.vocab_size, False, self.dtype, self.quant, name="lm_head")(x)
        logits = logits.astype(jnp.float32)
        if c.final_softcap:
            logits = jnp.tanh(logits / c.final_softcap) * c.final_softcap
        return logits, cache
