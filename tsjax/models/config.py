"""The typed, frozen model configuration every family's GGUF parser produces."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tsjax.gguf import GGUFFile
from tsjax.layers.moe import MoESpec
from tsjax.layers.rope import Yarn, yarn_attention_factor
from tsjax.stack import ATTENTION


@dataclass(frozen=True)
class SSMConfig:
    """The recurrent layers' sizes, GGUF's `{arch}.ssm.*` keys. Gated DeltaNet (`qwen35`) and
    Mamba2 (`nemotron_h`) share the keys with different meanings:

    | key            | Gated DeltaNet            | Mamba2                  |
    |----------------|---------------------------|-------------------------|
    | conv_kernel    | K, the conv's taps        | K                       |
    | state_size     | Dk, key head dim          | N, state size           |
    | group_count    | Hk, key heads             | G, groups of B and C    |
    | time_step_rank | Hv, value heads           | H, heads                |
    | inner_size     | Hv * Dv                   | E = H * P (P head dim)  |
    """

    conv_kernel: int
    state_size: int
    group_count: int
    time_step_rank: int
    inner_size: int

    @classmethod
    def from_gguf(cls, g: GGUFFile) -> SSMConfig | None:
        """The file's `{arch}.ssm.*` sizes; None for a model without recurrent layers."""
        arch = g.architecture
        if g.meta(f"{arch}.ssm.inner_size", None) is None:
            return None
        return cls(**{f: int(g.meta(f"{arch}.ssm.{f}")) for f in cls.__dataclass_fields__})


@dataclass(frozen=True)
class ModelConfig:
    architecture: str  # GGUF general.architecture
    family: str  # registry family that runs it
    vocab_size: int
    dim: int  # D
    n_layers: int  # L
    n_heads: int  # N
    n_kv_heads: int  # K
    head_dim: int  # H
    ffn_dim: int  # F
    norm_eps: float
    context_length: int
    rope_theta: float
    # Per-layer data (one entry per layer) so one lax.scan runs mixed layer types.
    layer_windows: tuple[int, ...]  # 0 = global attention, else sliding window size
    layer_rope_thetas: tuple[float, ...]
    layer_rope_scales: tuple[float, ...]  # linear position interpolation (1.0 = none)
    qkv_bias: bool = False
    qk_norm: bool = False
    post_norms: bool = False  # Gemma 2/3 sandwich norms around attention and FFN
    embed_scale: float | None = None
    attn_softcap: float | None = None
    final_softcap: float | None = None
    query_scale: float = 0.0  # 0 means 1/sqrt(head_dim)
    activation: str = "silu"
    tied_embeddings: bool = True
    permuted_qk: bool = False  # llama.cpp stores Llama q/k rows interleaved for its RoPE
    # Rotary dimensions of each head: None = all of them; 0 = no RoPE (Nemotron-H); fewer
    # than head_dim rotate the first ones only (Qwen 3.5's partial rotary).
    rope_dim: int | None = None
    o_bias: bool = False  # gpt-oss: a bias on the attention output projection
    attn_sinks: bool = False  # gpt-oss: a learned sink logit per query head
    rope_yarn: Yarn | None = None  # YaRN frequencies and magnitude (gpt-oss, Mistral 3)
    # Mistral 3 (Llama 4): queries scaled by 1 + beta ln(1 + floor(p / n0)) after RoPE, as
    # (beta, n0); None: no scaling (`tsjax.layers.rope.attention_temperature`).
    query_temperature: tuple[float, int] | None = None
    # What each layer is (`tsjax.models.decoder.BLOCKS`); () = attention everywhere.
    layer_kinds: tuple[str, ...] = ()
    # The recurrent layers' sizes (`tsjax.layers.deltanet`, `tsjax.layers.mamba2`).
    ssm: SSMConfig | None = None
    moe: MoESpec | None = None  # the experts of a mixture-of-experts family
    # Sizes by layer where layers differ (Gemma 4: sliding and global layers have their own
    # head size and KV heads, KV-shared layers a wider MLP); () = the model-wide value.
    layer_head_dims: tuple[int, ...] = ()
    layer_kv_heads: tuple[int, ...] = ()
    layer_ffn_dims: tuple[int, ...] = ()
    # Layer i attends over layer kv_sources[i]'s keys and values (Gemma 4's KV sharing: the
    # last layers compute no keys or values of their own); () = each layer its own.
    kv_sources: tuple[int, ...] = ()
    # llama.cpp's `rope_freqs` [H/2]: the rotary frequencies of the layers flagged in
    # `layer_rope_factored` are divided by these (Gemma 4's partial rotation of global layers).
    rope_freq_factors: tuple[float, ...] = ()
    layer_rope_factored: tuple[bool, ...] = ()
    per_layer_input_dim: int = 0  # Gemma 4 E models: per-layer token inputs of this size
    v_norm: bool = False  # Gemma 4: values RMS-normed (without a weight) like the keys
    # Interleaved M-RoPE (Qwen 3.5, GGUF `rope.dimension_sections`): rotary frequency j
    # turns with a token's h position where j % 3 == 1 (j < 3 s[1]), its w position where
    # j % 3 == 2 (j < 3 s[2]), else its t position (`tsjax.layers.rope.mrope_choice`).
    # Text tokens have equal positions in all three: plain RoPE. () = plain RoPE.
    mrope_sections: tuple[int, ...] = ()

    def __post_init__(self):
        if not self.layer_kinds:
            object.__setattr__(self, "layer_kinds", (ATTENTION,) * self.n_layers)
        assert len(self.layer_kinds) == self.n_layers, self.layer_kinds
        for name in ("layer_head_dims", "layer_kv_heads", "layer_ffn_dims", "kv_sources"):
            assert len(getattr(self, name)) in (0, self.n_layers), name

    @property
    def attn_scale(self) -> float:
        return self.query_scale or self.head_dim**-0.5

    @property
    def rotary_dim(self) -> int:
        """How many dimensions of each head RoPE rotates (0: none)."""
        return self.head_dim if self.rope_dim is None else self.rope_dim

    def head_dim_at(self, layer: int) -> int:
        return self.layer_head_dims[layer] if self.layer_head_dims else self.head_dim

    def kv_heads_at(self, layer: int) -> int:
        return self.layer_kv_heads[layer] if self.layer_kv_heads else self.n_kv_heads

    def ffn_dim_at(self, layer: int) -> int:
        return self.layer_ffn_dims[layer] if self.layer_ffn_dims else self.ffn_dim

    def kv_source(self, layer: int) -> int:
        """The layer whose keys and values `layer` attends over (itself unless shared)."""
        return self.kv_sources[layer] if self.kv_sources else layer

    def rope_key(self, layer: int) -> tuple[float, float, int, bool]:
        """What `layer`'s rotation tables depend on: (base, linear scale, rotated size: the
        head, or its first `rope_dim` dims (no RoPE: a table of 2 nobody reads, which XLA
        drops), whether `rope_freq_factors` divide its frequencies)."""
        factored = bool(self.layer_rope_factored and self.layer_rope_factored[layer])
        rotated = self.head_dim_at(layer) if self.rope_dim is None else (self.rope_dim or 2)
        return (
            self.layer_rope_thetas[layer],
            self.layer_rope_scales[layer],
            rotated,
            factored,
        )


def per_layer(value) -> tuple[int, ...]:
    """A GGUF size that is an int or an int per layer -> the per-layer tuple, or () for one
    value shared by every layer."""
    return tuple(int(v) for v in value) if isinstance(value, list | tuple) else ()


def yarn_from_gguf(g: GGUFFile, truncate: bool = True) -> Yarn | None:
    """The file's YaRN scaling (`{arch}.rope.scaling.*`), or None when it has none. The
    magnitude is llama.cpp's: 0.1 ln(factor) + 1, or with `yarn_log_multiplier` (Mistral 3,
    transformers' `mscale_all_dim`, beside an `mscale` of 1) the ratio of the two terms."""
    arch = g.architecture
    if g.meta(f"{arch}.rope.scaling.type", "none") != "yarn":
        return None
    key = f"{arch}.rope.scaling."
    factor = float(g.meta(key + "factor"))
    log_mul = g.meta(key + "yarn_log_multiplier", None)
    magnitude = (
        yarn_attention_factor(factor)
        if log_mul is None
        else yarn_attention_factor(factor, 1.0, float(log_mul))
    )
    magnitude *= float(g.meta(key + "attn_factor", 1.0))
    return Yarn(
        factor=factor,
        original_positions=int(g.meta(key + "original_context_length")),
        beta_fast=float(g.meta(key + "yarn_beta_fast", 32.0)),
        beta_slow=float(g.meta(key + "yarn_beta_slow", 1.0)),
        truncate=truncate,
        magnitude=magnitude,
    )


def base_config_kwargs(g: GGUFFile, family: str, ffn_default: Any = ...) -> dict:
    """Fields every family reads the same way from `{arch}.*` keys. `head_count_kv` and
    `feed_forward_length` may be arrays, one value per layer (llama.cpp's per-layer keys):
    then `layer_kv_heads` / `layer_ffn_dims` hold them and the model-wide value is the
    largest. `ffn_default`: the FFN size of a file without `feed_forward_length` (by default
    that key is required)."""
    arch = g.architecture
    n_heads = _widest(g.meta(f"{arch}.attention.head_count"))
    layer_kv = per_layer(g.meta(f"{arch}.attention.head_count_kv", n_heads))
    n_kv = max(layer_kv) if layer_kv else g.meta(f"{arch}.attention.head_count_kv", n_heads)
    layer_ffn = per_layer(g.meta(f"{arch}.feed_forward_length", ffn_default))
    ffn = max(layer_ffn) if layer_ffn else g.meta(f"{arch}.feed_forward_length", ffn_default)
    dim = int(g.meta(f"{arch}.embedding_length"))
    head_dim = int(g.meta(f"{arch}.attention.key_length", dim // n_heads))
    n_layers = int(g.meta(f"{arch}.block_count"))
    vocab = g.meta(f"{arch}.vocab_size", None)
    if vocab is None:
        vocab = g.info("token_embd.weight").shape[0]
    theta = float(g.meta(f"{arch}.rope.freq_base", 10000.0))
    scale = 1.0
    if g.meta(f"{arch}.rope.scaling.type", "none") == "linear":
        scale = float(g.meta(f"{arch}.rope.scaling.factor", 1.0))
    return dict(
        architecture=arch,
        family=family,
        vocab_size=int(vocab),
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=int(n_kv),
        head_dim=head_dim,
        ffn_dim=int(ffn),
        norm_eps=float(g.meta(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        context_length=int(g.meta(f"{arch}.context_length", 2048)),
        rope_theta=theta,
        layer_windows=(0,) * n_layers,
        layer_rope_thetas=(theta,) * n_layers,
        layer_rope_scales=(scale,) * n_layers,
        tied_embeddings=not g.has_tensor("output.weight"),
        layer_kv_heads=layer_kv,
        layer_ffn_dims=layer_ffn,
    )


def _widest(value: Any) -> int:
    """A size GGUF may give per layer (an array, 0 where a layer has none: Nemotron-H's head
    counts and FFN sizes): the largest."""
    return max(int(v) for v in value) if isinstance(value, (list, tuple)) else int(value)
