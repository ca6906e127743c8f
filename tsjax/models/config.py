"""The typed, frozen model configuration every family's GGUF parser produces."""

from __future__ import annotations

from dataclasses import dataclass

from tsjax.gguf import GGUFFile
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
    # What each layer is (`tsjax.models.decoder.BLOCKS`); () = attention everywhere.
    layer_kinds: tuple[str, ...] = ()
    # The recurrent layers' sizes (`tsjax.layers.deltanet`, `tsjax.layers.mamba2`).
    ssm: SSMConfig | None = None

    def __post_init__(self):
        if not self.layer_kinds:
            object.__setattr__(self, "layer_kinds", (ATTENTION,) * self.n_layers)
        assert len(self.layer_kinds) == self.n_layers, self.layer_kinds

    @property
    def attn_scale(self) -> float:
        return self.query_scale or self.head_dim**-0.5


def base_config_kwargs(g: GGUFFile, family: str) -> dict:
    """Fields every family reads the same way from `{arch}.*` keys."""
    arch = g.architecture
    n_heads = int(g.meta(f"{arch}.attention.head_count"))
    n_kv = g.meta(f"{arch}.attention.head_count_kv", n_heads)
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
        ffn_dim=int(g.meta(f"{arch}.feed_forward_length")),
        norm_eps=float(g.meta(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        context_length=int(g.meta(f"{arch}.context_length", 2048)),
        rope_theta=theta,
        layer_windows=(0,) * n_layers,
        layer_rope_thetas=(theta,) * n_layers,
        layer_rope_scales=(scale,) * n_layers,
        tied_embeddings=not g.has_tensor("output.weight"),
    )
