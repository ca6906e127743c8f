"""The decoder stack shared by every family: embed, the layers segment by segment
(`tsjax.stack`), norm, project.

Each segment runs one kind of layer (`BLOCKS`) over its own cache state: unrolled, one layer
with its own params subtree; scanned, `nn.scan` over a run of layers whose params and state
are stacked on a leading layer axis. The decoder hands each segment its state from
`Cache.layers` and collects the updated one, whatever kind it is (`tsjax.cache`).

The dense families differ only in their config (which norms, biases, windows, caps), which
lives in the family's own module. Every parameter a layer kind or the head may have is
declared once, in its module's `PARAMS` and in `HEAD_PARAMS`, which the loader and the
sharding rules read through `PARAM_TABLE`.
"""

from __future__ import annotations

from typing import Any, ClassVar, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from tsjax.cache import Cache, KVLayout, KVState, SharedKV, Step, create_cache
from tsjax.kernels.blocks import QK
from tsjax.layers.attention import Attention
from tsjax.layers.embed import Embed, PerLayerInputs
from tsjax.layers.linear import Linear, input_amax
from tsjax.layers.mlp import GatedMLP
from tsjax.layers.norms import RMSNorm
from tsjax.layers.rope import (
    attention_temperature,
    layer_frequencies,
    mrope_choice,
    rope_lookup_freqs,
)
from tsjax.models.config import ModelConfig
from tsjax.quants import BLOCK_QUANTS
from tsjax.spans import SpanInputs
from tsjax.stack import ATTENTION, Param, ParamTable, Segment, layer_plan

#: The pre-attention norm and the attention block's parameters (the config decides biases,
#: q/k norms and sinks). q/k/v weights are [N*H, D] with heads major, so splitting whole
#: heads is splitting that axis into contiguous blocks; the axis is named for its heads.
ATTENTION_PARAMS: tuple[Param, ...] = (
    Param("attn_norm.weight", ("attn_norm", "scale"), ("embed",)),
    Param("attn_q.weight", ("attn", "q", "weight"), ("q_heads", "embed")),
    Param("attn_k.weight", ("attn", "k", "weight"), ("kv_heads", "embed")),
    Param("attn_v.weight", ("attn", "v", "weight"), ("kv_heads", "embed")),
    Param("attn_q.bias", ("attn", "q", "bias"), ("q_heads",)),
    Param("attn_k.bias", ("attn", "k", "bias"), ("kv_heads",)),
    Param("attn_v.bias", ("attn", "v", "bias"), ("kv_heads",)),
    Param("attn_output.weight", ("attn", "o", "weight"), ("embed", "q_heads")),
    Param("attn_output.bias", ("attn", "o", "bias"), ("embed",)),
    Param("attn_q_norm.weight", ("attn", "q_norm", "scale"), ("head_dim",)),
    Param("attn_k_norm.weight", ("attn", "k_norm", "scale"), ("head_dim",)),
    Param("attn_sinks.weight", ("attn", "sinks"), ("q_heads",)),
)

#: What every layer's attention is given for one step (`Decoder._rope`): the rotation tables
#: of every distinct `ModelConfig.rope_key`, stacked ([bases, B, T, 1, W] cos and sin, W the
#: widest head's H/2), and the queries' scale by position ([B, T, 1, 1]; None for most
#: families).
LayerRope = tuple[jax.Array, jax.Array, jax.Array | None]


def attention_block(cfg: ModelConfig, dtype, quant: str | None) -> Attention:
    """The attention module every layer kind builds from the config (named "attn")."""
    return Attention(
        n_heads=cfg.n_heads,
        n_kv_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim,
        norm_eps=cfg.norm_eps,
        qkv_bias=cfg.qkv_bias,
        qk_norm=cfg.qk_norm,
        scale=cfg.attn_scale,
        softcap=cfg.attn_softcap,
        dtype=dtype,
        quant=quant,
        sinks=cfg.attn_sinks,
        o_bias=cfg.o_bias,
        name="attn",
    )


def run_attention(cfg: ModelConfig, dtype, quant, x, state, step, data, rope: LayerRope):
    """Pre-norm attention of one layer: (attention output [B, T, D], state). data: the
    layer's `LayerData` (its index into a stacked state, window and RoPE base)."""
    cos, sin, q_scale = rope
    h = RMSNorm(cfg.norm_eps, dtype, name="attn_norm")(x)
    return attention_block(cfg, dtype, quant)(
        h, state, data.index, step, data.window, (cos[data.base], sin[data.base]), q_scale
    )


class LayerData(NamedTuple):
    """What differs from layer to layer of a segment, handed to each layer (scanned along
    with its params in a stacked segment): `index` into the segment's stacked state (into the
    source layer's, for a layer reading another layer's keys and values), the attention
    `window`, `base` (which of the step's rotation tables the layer uses), and the layer's
    per-layer `inputs` [B, T, P] (Gemma 4 E models; None for the others)."""

    index: Any
    window: Any
    base: Any
    inputs: Any = None


class DecoderLayer(nn.Module):
    """Pre-norm attention + gated MLP; with `post_norms`, Gemma's sandwich norms.

    Every layer kind's module takes (cfg, dtype, quant), and `mesh` where it declares that
    field (expert parallelism), and is called as
    `((x, state), step, LayerData, rope) -> ((x, state), None)`, rope being the step's
    `LayerRope`."""

    #: Every parameter this layer may have (the config decides biases and extra norms).
    PARAMS: ClassVar[tuple[Param, ...]] = (
        *ATTENTION_PARAMS,
        Param("post_attention_norm.weight", ("post_attn_norm", "scale"), ("embed",)),
        Param("ffn_norm.weight", ("ffn_norm", "scale"), ("embed",)),
        Param("ffn_gate.weight", ("mlp", "gate", "weight"), ("ffw", "embed")),
        Param("ffn_up.weight", ("mlp", "up", "weight"), ("ffw", "embed")),
        Param("ffn_down.weight", ("mlp", "down", "weight"), ("embed", "ffw")),
        Param("post_ffw_norm.weight", ("post_ffn_norm", "scale"), ("embed",)),
    )

    cfg: ModelConfig
    dtype: jnp.dtype = jnp.float32
    quant: str | None = None

    @nn.compact
    def __call__(self, carry: tuple[jax.Array, KVState], step: Step, data: LayerData, rope):
        """carry: (x [B, T, D], this segment's attention state); data: the layer's
        `LayerData`; rope: the step's `LayerRope`."""
        x, state = carry
        c = self.cfg
        h, state = run_attention(c, self.dtype, self.quant, x, state, step, data, rope)
        if c.post_norms:
            h = RMSNorm(c.norm_eps, self.dtype, name="post_attn_norm")(h)
        x = x + h
        h = RMSNorm(c.norm_eps, self.dtype, name="ffn_norm")(x)
        h = GatedMLP(c.ffn_dim, c.activation, self.dtype, self.quant, name="mlp")(h)
        if c.post_norms:
            h = RMSNorm(c.norm_eps, self.dtype, name="post_ffn_norm")(h)
        return (x + h, state), None


def unroll_layers_default() -> bool:
    """Whether the layer loop is unrolled over per-layer weights (else one `lax.scan` over
    weights stacked on a leading layer axis).

    XLA:CPU's matmul kernels take whole buffers, so inside a scan it first copies each
    layer's weights out of the stacked array, every step: on SmolLM2 that copy is as much
    traffic again as the matmuls' own weight reads. Unrolled, each matmul reads its weights
    where they lie, at the price of a longer compile. Accelerator backends slice in place and
    keep the scan's short compile."""
    return jax.default_backend() == "cpu"


#: The module of each layer kind (`ModelConfig.layer_kinds`): the layer's parameters are its
#: `PARAMS`. A family with a new kind of layer registers its module here.
BLOCKS: dict[str, type[nn.Module]] = {ATTENTION: DecoderLayer}

#: The model-wide parameters: the embedding (also the tied output projection), the final norm
#: and a separate output projection (GGUF `output.weight`; bf16 / int8 give a tied embedding
#: one in their format); Gemma 4 E models' per-layer input embedding, projection and norm
#: (`tsjax.layers.embed.PerLayerInputs`).
HEAD_PARAMS: tuple[Param, ...] = (
    Param("token_embd.weight", ("embed", "embedding"), ("vocab", "embed")),
    Param("output_norm.weight", ("final_norm", "scale"), ("embed",)),
    Param("output.weight", ("lm_head", "weight"), ("vocab", "embed")),
    Param("per_layer_token_embd.weight", ("per_layer", "embed", "embedding"), ("vocab", None)),
    Param("per_layer_model_proj.weight", ("per_layer", "proj", "weight"), (None, "embed")),
    Param("per_layer_proj_norm.weight", ("per_layer", "norm", "scale"), (None,)),
)

#: Every parameter of every model (see `tsjax.stack.ParamTable`).
PARAM_TABLE = ParamTable(HEAD_PARAMS, BLOCKS)


#: Whether an unrolled layer runs as a jitted function of its params (`_layer_program`).
TRACE_LAYERS_ONCE = True
_LAYER_PROGRAMS: dict[tuple, tuple[ModelConfig, Any]] = {}


def _layer_program(block: type[nn.Module], cfg: ModelConfig, dtype, quant, kw, static):
    """One unrolled layer as a jitted function of (params, x, state, step, inputs, rope), one
    per layer kind, config and static layer data (index, window, rope base). Called for every
    layer inside a step's trace, JAX traces it once per distinct layer and reuses the jaxpr
    for the others (and lowers it once, one function called per layer), where a plain call
    traced all the layers of both step programs one by one: most of a server's time to ready.
    XLA inlines the calls, so the compiled program is the same."""
    key = (block, id(cfg), jnp.dtype(dtype), quant, tuple(kw.items()), tuple(static))
    hit = _LAYER_PROGRAMS.get(key)
    if hit is None or hit[0] is not cfg:  # (an id reused by a new config)
        index, window, base = static
        module = block(cfg, dtype, quant, **kw)

        def run(params, x, state, step, inputs, rope):
            data = LayerData(index, window, base, inputs)
            (x, state), _ = module.apply({"params": params}, (x, state), step, data, rope)
            return x, state

        hit = _LAYER_PROGRAMS[key] = (cfg, jax.jit(run))
    return hit[1]


def _locate(plan: tuple[Segment, ...], layer: int) -> tuple[int, int]:
    """(index of the segment holding `layer` in `plan`, the layer's index in that segment)."""
    for j, seg in enumerate(plan):
        if layer in seg.layers:
            return j, layer - seg.first
    raise ValueError(f"no segment holds layer {layer}")


class Decoder(nn.Module):
    cfg: ModelConfig
    dtype: jnp.dtype = jnp.float32
    unrolled: bool = False
    quant: str | None = None  # "bf16" / "int8" weights (see tsjax.layers.linear)
    mesh: Mesh | None = None  # the steps' mesh, for layers that split work by hand (experts)

    @nn.compact
    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        cache: Cache,
        rows: jax.Array | None,
        logit_index: jax.Array | None,
        attn_len: int,
        counts: jax.Array | None = None,
        spans: SpanInputs | None = None,
        hidden: bool = False,
    ) -> tuple[jax.Array, Cache] | tuple[jax.Array, Cache, jax.Array]:
        """tokens, positions: [B, T]; rows: [B] cache rows (None: the cache rows [0, B));
        logit_index: [B] which of the T positions to project to logits (None: all); counts:
        [B] how many of each row's tokens are real (`tsjax.cache.Step`; None: all T); spans:
        embeddings that replace some positions' token embeddings, and how far each query
        sees (`tsjax.spans`; None: text only, causal).
        Returns (logits [B, V] or [B, T, V], cache with the step's tokens written), and with
        `hidden` (static) also every position's final-normed state [B, T, D] (embeddings,
        prompt log-probabilities: `project` maps it to logits)."""
        c = self.cfg
        embed = Embed(c.vocab_size, c.dim, self.dtype, self._embed_quant(), name="embed")
        x = embed(tokens)  # [B, T, D]
        if c.embed_scale is not None:
            x = x * jnp.asarray(c.embed_scale, x.dtype)
        key_end = None
        if spans is not None:  # an encoder's output goes in as it is: never scaled
            x = jnp.where(spans.mask[..., None], spans.embeds.astype(x.dtype), x)
            key_end = spans.key_end
        inputs = None
        if c.per_layer_input_dim:
            inputs = PerLayerInputs(
                c.vocab_size,
                c.n_layers,
                c.per_layer_input_dim,
                c.norm_eps,
                self.dtype,
                self.quant,
                name="per_layer",
            )(tokens, x)  # [L, B, T, P]
        if counts is None:
            counts = jnp.full((tokens.shape[0],), tokens.shape[1], jnp.int32)
        rope_pos = None
        if c.mrope_sections:
            rope_pos, cache = self._mrope_positions(positions, cache, rows, counts, spans)
        rope, base_of = self._rope(positions, attn_len, rope_pos)
        step = cache.step(positions, rows, counts, attn_len, key_end)
        plan = self.plan()
        states: list[Any] = []
        for seg, state in zip(plan, cache.layers, strict=True):
            if isinstance(state, SharedKV):  # reads the keys and values of an earlier layer
                j, index = _locate(plan, state.source)
                x, _ = self._segment(seg, x, states[j], step, rope, base_of, inputs, index)
            else:
                x, state = self._segment(seg, x, state, step, rope, base_of, inputs)
            states.append(state)
        return self._head(embed, x, logit_index, cache.with_layers(states), hidden)

    def _mrope_positions(self, positions, cache: Cache, rows, counts, spans):
        """M-RoPE: the step's (t, h, w) rope positions [3, B, T] (cache positions plus the
        shift each row starts from, plus the spans' offsets, `tsjax.spans`), and the cache
        with the shift after each real token recorded (`Cache.rope_shift`)."""
        b, t = positions.shape
        row_index = jnp.arange(b, dtype=jnp.int32) if rows is None else rows
        start = cache.shift_before(row_index, positions[:, 0])  # [B]
        base = positions + start[:, None]
        if spans is not None and spans.rope is not None:
            off = spans.rope  # [B, T, 4]
            rope_pos = base[None] + jnp.moveaxis(off[..., :3], -1, 0)
            after = start[:, None] + off[..., 3]
        else:  # text only: every section at the same position, the shift carried on
            rope_pos = jnp.broadcast_to(base[None], (3, b, t))
            after = jnp.broadcast_to(start[:, None], (b, t))
        real = jnp.arange(t, dtype=jnp.int32)[None, :] < counts[:, None]
        return rope_pos, cache.write_shift(row_index, positions, after, real)

    def _rope(
        self, positions: jax.Array, attn_len: int, rope_pos: jax.Array | None = None
    ) -> tuple[LayerRope, list[int]]:
        """The step's `LayerRope`: the rotation tables of each distinct `ModelConfig.rope_key`
        among the layers, looked up once for every layer (positions stay below attn_len),
        stacked [bases, B, T, 1, W] with W the widest head's H/2 (YaRN's frequencies and
        magnitude where the config has them), and Mistral 3's query scale; and each layer's
        index into the tables. `rope_pos` [3, B, T]: M-RoPE's (t, h, w) positions, each
        frequency looked up at its section's (`mrope_choice`; never past the cache
        positions: an image advances max(rows, cols) <= its token count)."""
        c = self.cfg
        keys = [c.rope_key(i) for i in range(c.n_layers)]
        bases = sorted(set(keys))
        width = max(h for _, _, h, _ in bases) // 2
        magnitude = c.rope_yarn.magnitude if c.rope_yarn else 1.0
        tables = []
        for theta, scale, h, factored in bases:
            factors = c.rope_freq_factors if factored else None
            if c.rope_yarn is None:
                freqs = layer_frequencies(theta, h, factors, width)
            else:  # no family has both YaRN and frequency factors
                assert factors is None, "YaRN with rope_freqs factors"
                freqs = np.pad(c.rope_yarn.frequencies(theta, h), (0, width - h // 2))
            if rope_pos is None:
                tables.append(rope_lookup_freqs(positions, freqs, attn_len, scale, magnitude))
                continue
            by = [rope_lookup_freqs(p, freqs, attn_len, scale, magnitude) for p in rope_pos]
            choice = jnp.asarray(mrope_choice(c.mrope_sections, width))
            tables.append(
                tuple(
                    jnp.where(choice == 0, by[0][k], jnp.where(choice == 1, by[1][k], by[2][k]))
                    for k in range(2)
                )
            )
        q_scale = None
        if c.query_temperature is not None:
            q_scale = attention_temperature(positions, *c.query_temperature)
        rope = (jnp.stack([t[0] for t in tables]), jnp.stack([t[1] for t in tables]), q_scale)
        return rope, [bases.index(k) for k in keys]

    def _segment(
        self, seg: Segment, x, state, step: Step, rope, base_of, inputs, read: int | None = None
    ) -> tuple[Any, Any]:
        """Run one segment's layers over its state; with `read`, over the state of the
        segment holding the layer they read (`read`: that layer's index in it)."""
        c, block = self.cfg, BLOCKS[seg.kind]
        kw = {"mesh": self.mesh} if "mesh" in block.__dataclass_fields__ else {}
        if not seg.stacked:
            i = seg.first  # static window and base: the mask's window test folds away
            data = LayerData(
                0 if read is None else read,
                c.layer_windows[i],
                base_of[i],
                None if inputs is None else inputs[i],
            )
            if TRACE_LAYERS_ONCE and not (
                self.is_initializing() or self.is_mutable_collection("intermediates")
            ):
                run = _layer_program(block, c, self.dtype, self.quant, kw, data[:3])
                params = self.variables["params"][seg.name]
                return run(params, x, state, step, data.inputs, rope)
            (x, state), _ = block(c, self.dtype, self.quant, name=seg.name, **kw)(
                (x, state), step, data, rope
            )
            return x, state
        layers = nn.scan(
            block,
            variable_axes={"params": 0, "intermediates": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast, 0, nn.broadcast),
            length=seg.count,
        )(c, self.dtype, self.quant, name=seg.name, **kw)
        span = slice(seg.first, seg.first + seg.count)
        index = jnp.arange(seg.count, dtype=jnp.int32)
        if read is not None:
            index = jnp.full((seg.count,), read, jnp.int32)
        data = LayerData(
            index,
            jnp.asarray(c.layer_windows[span], jnp.int32),
            jnp.asarray(base_of[span], jnp.int32),
            None if inputs is None else inputs[span],
        )
        (x, state), _ = layers((x, state), step, data, rope)
        return x, state

    def plan(self) -> tuple[Segment, ...]:
        """The layer loop's segments (`tsjax.stack.layer_plan`)."""
        return layer_plan(self.cfg.layer_kinds, self.unrolled)

    def new_cache(self, rows: int, max_len: int, layout: KVLayout | None = None) -> Cache:
        """A zeroed cache for this model's segments (attention stacked unless `layout`)."""
        layout = KVLayout() if layout is None else layout
        return create_cache(self.cfg, self.plan(), layout, rows, max_len, self.dtype)

    def _embed_quant(self) -> str | None:
        """The block format the embedding table is held in (`tsjax.layers.embed`), or None:
        float (bf16 and int8 keep the table float; a tied one gets a projection copy)."""
        blocks = self.quant in BLOCK_QUANTS and self.cfg.dim % QK == 0
        return self.quant if blocks else None

    def _head(self, embed, x, logit_index, cache, hidden: bool = False):
        """Final norm, output projection (tied or not), soft-cap."""
        c = self.cfg
        final_norm = RMSNorm(c.norm_eps, self.dtype, name="final_norm")
        normed = None
        if hidden:  # the norm is per position: norming first changes no logit
            x = normed = final_norm(x)
        if logit_index is not None:
            x = jnp.take_along_axis(x, logit_index[:, None, None], axis=1)[:, 0]  # [B, D]
        if not hidden:
            x = final_norm(x)
        if c.tied_embeddings and self.quant is None:
            # what a quantized model's separate lm_head would see (calibration reads it)
            self.sow("intermediates", "lm_head_input_amax", input_amax(x))
            logits = embed.attend(x)
        elif c.tied_embeddings and self._embed_quant() is not None:
            logits = embed.attend(x)  # the table's own blocks
        else:  # bf16 / int8: a tied embedding gets a copy in that format as the projection
            logits = Linear(c.vocab_size, False, self.dtype, self.quant, name="lm_head")(x)
        logits = _softcap(c, logits.astype(jnp.float32))
        return (logits, cache) if not hidden else (logits, cache, normed)

    def project(self, params, x: jax.Array) -> jax.Array:
        """Logits [..., V] (float32) of final-normed states x [..., D]: the output projection
        of `__call__`'s head, outside it (a function of `params`, callable inside a step)."""
        c = self.cfg
        if c.tied_embeddings and (self.quant is None or self._embed_quant() is not None):
            # float: the table itself; block formats: the table's own blocks
            table = Embed(c.vocab_size, c.dim, self.dtype, self._embed_quant(), parent=None)
            logits = table.apply({"params": params["embed"]}, x, method=Embed.attend)
        else:
            head = Linear(c.vocab_size, False, self.dtype, self.quant, parent=None)
            logits = head.apply({"params": params["lm_head"]}, x)
        return _softcap(c, logits.astype(jnp.float32))


def _softcap(c: ModelConfig, logits: jax.Array) -> jax.Array:
    """Gemma 2's final logit soft-capping (a no-op for models without it)."""
    if c.final_softcap:
        return jnp.tanh(logits / c.final_softcap) * c.final_softcap
    return logits
