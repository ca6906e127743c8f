"""The typed, frozen configuration of a multimodal projector (llama.cpp's "mmproj" GGUF).

A projector file has `general.architecture = "clip"`; its vision tower is described by
`clip.vision.*` keys and its family by `clip.projector_type` (or, in files that carry several
modalities, `clip.vision.projector_type`). Every family reads the shared keys the same way
(`base_vision_kwargs`) and adds its own (pooling, preprocessing, how the text model wraps the
image), exactly as llama.cpp's `clip.cpp` does.
"""

from __future__ import annotations

from dataclasses import dataclass

from tsjax.gguf import GGUFError, GGUFFile


@dataclass(frozen=True)
class ResizeSpec:
    """How an image becomes the encoder's square input (llama.cpp's `img_tool::resize`).

    algo: Pillow-compatible resampling filter ("bilinear", "bicubic", "lanczos").
    pad: "ceil" (aspect kept, the scaled size rounded up, centred with integer division;
    llama.cpp's PAD_CEIL), "nearest" (rounded to nearest; PAD_NEAREST) or "none" (stretched).
    pad_color: RGB of the letterbox bars.
    """

    algo: str = "bilinear"
    pad: str = "ceil"
    pad_color: tuple[int, int, int] = (0, 0, 0)


@dataclass(frozen=True)
class VisionConfig:
    projector_type: str  # clip.projector_type, the registry key
    image_size: int  # the encoder's square input side, pixels
    patch_size: int
    dim: int  # D of the vision tower
    ffn_dim: int  # F of the vision tower
    n_layers: int  # L of the vision tower
    n_heads: int
    head_dim: int
    norm_eps: float
    activation: str  # tsjax.layers.mlp.ACTIVATIONS key
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    text_dim: int  # the text model's D the projection maps to
    merge: int = 1  # pooling kernel per side (Gemma 3: 4, 64x64 patches -> 16x16 tokens)
    resize: ResizeSpec = ResizeSpec()
    # How the text model sees an image: its tokens wrapped in these (tokenized) strings, and
    # whether image tokens attend to each other in both directions.
    image_begin: str | None = None
    image_end: str | None = None
    bidirectional: bool = False
    # Dynamic resolution (Pixtral): an image keeps its aspect ratio and is resized so that its
    # token grid (each side a multiple of patch x merge pixels) holds min_tokens..max_tokens
    # tokens (llama.cpp's `calc_size_preserved_ratio`). 0: every image is letterboxed onto the
    # fixed image_size square.
    min_tokens: int = 0
    max_tokens: int = 0
    # One [IMG_BREAK] embedding after each row of image tokens but the last (Pixtral).
    row_break: bool = False
    # M-RoPE text models (Qwen 3.5): an image's tokens take (t, h, w) positions of its token
    # grid and the text after it continues max(rows, cols) positions on (`tsjax.spans`).
    mrope: bool = False

    @property
    def dynamic(self) -> bool:
        """Whether images keep their aspect ratio (variable token counts)."""
        return self.max_tokens > 0

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def n_patches(self) -> int:
        return self.patches_per_side**2

    @property
    def align(self) -> int:
        """Pixels per image token and side (a side of a dynamic image is a multiple)."""
        return self.patch_size * self.merge

    @property
    def tokens_per_image(self) -> int:
        """Embedded positions of every image of a fixed-size family (ValueError if dynamic)."""
        if self.dynamic:
            raise ValueError(
                f"{self.projector_type} images take a variable number of tokens (their size)"
            )
        return (self.patches_per_side // self.merge) ** 2

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """(rows, cols) of image tokens of a prepared image height x width pixels."""
        return height // self.align, width // self.align

    def positions(self, height: int, width: int) -> int:
        """Prompt positions the embeddings of a prepared height x width image fill: its tokens,
        and a break after each row but the last where the family has them."""
        rows, cols = self.grid(height, width)
        return rows * cols + (rows - 1 if self.row_break else 0)

    @property
    def max_positions(self) -> int:
        """The most prompt positions one image's embeddings can fill: tokens_per_image, or
        for a dynamic family max_tokens plus, with row breaks, one break per row of a
        one-token-wide image."""
        if not self.dynamic:
            return self.tokens_per_image
        return self.max_tokens + (self.max_tokens - 1 if self.row_break else 0)

    @property
    def min_positions(self) -> int:
        """The fewest prompt positions one image's embeddings fill."""
        return self.min_tokens if self.dynamic else self.tokens_per_image


def projector_type(g: GGUFFile) -> str:
    """The projector family of an mmproj file; a GGUFError for files that are not one."""
    arch = g.metadata.get("general.architecture")
    if arch != "clip":
        raise GGUFError(
            f"{g.path.name} is not a multimodal projector: general.architecture is {arch!r},"
            " expected 'clip' (an mmproj GGUF, e.g. mmproj-model-f16.gguf)"
        )
    if g.meta("clip.has_vision_encoder", True) is False:
        raise GGUFError(f"{g.path.name} has no vision encoder (clip.has_vision_encoder = false)")
    kind = g.meta("clip.projector_type", None) or g.meta("clip.vision.projector_type", None)
    if not isinstance(kind, str) or not kind:
        raise GGUFError(f"{g.path.name} lacks clip.projector_type")
    return kind


def activation(g: GGUFFile) -> str:
    """The tower's FFN activation as llama.cpp picks it: clip.use_gelu -> GELU (tanh
    approximation), clip.use_silu -> SiLU, neither -> quick GELU."""
    gelu, silu = bool(g.meta("clip.use_gelu", False)), bool(g.meta("clip.use_silu", False))
    if gelu and silu:
        raise GGUFError(f"{g.path.name}: both clip.use_gelu and clip.use_silu are set")
    return "gelu_tanh" if gelu else "silu" if silu else "gelu_quick"


def base_vision_kwargs(g: GGUFFile) -> dict:
    """Fields every family reads the same way from `clip.vision.*` keys."""
    dim = int(g.meta("clip.vision.embedding_length"))
    n_heads = int(g.meta("clip.vision.attention.head_count"))
    head_dim = int(g.meta("clip.vision.attention.head_dim", dim // n_heads))
    if head_dim * n_heads != dim:
        raise GGUFError(f"{g.path.name}: {n_heads} heads of {head_dim} do not make dim {dim}")
    n_kv = int(g.meta("clip.vision.attention.head_count_kv", n_heads))
    if n_kv != n_heads:
        raise GGUFError(f"{g.path.name}: grouped-query vision attention is not supported")
    mean = [float(x) for x in g.meta("clip.vision.image_mean", [])]
    std = [float(x) for x in g.meta("clip.vision.image_std", [])]
    if len(mean) < 3 or len(std) < 3:
        raise GGUFError(f"{g.path.name}: clip.vision.image_mean/image_std need 3 values each")
    if any(s == 0 for s in std[:3]):
        raise GGUFError(f"{g.path.name}: clip.vision.image_std has a zero")
    image_size, patch = int(g.meta("clip.vision.image_size")), int(g.meta("clip.vision.patch_size"))
    if patch <= 0 or image_size % patch:
        raise GGUFError(f"{g.path.name}: image size {image_size} is not a multiple of {patch}")
    return dict(
        projector_type=projector_type(g),
        image_size=image_size,
        patch_size=patch,
        dim=dim,
        ffn_dim=int(g.meta("clip.vision.feed_forward_length")),
        n_layers=int(g.meta("clip.vision.block_count")),
        n_heads=n_heads,
        head_dim=head_dim,
        norm_eps=float(g.meta("clip.vision.attention.layer_norm_epsilon", 1e-6)),
        activation=activation(g),
        image_mean=tuple(mean[:3]),
        image_std=tuple(std[:3]),
    )
