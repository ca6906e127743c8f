"""Images in: multimodal projectors (llama.cpp's mmproj GGUF files) as Flax modules.

- `load_projector(path)` reads an mmproj GGUF into a `Projector` (config, params, the
  compiled encoder); its family comes from `clip.projector_type` (`PROJECTORS`).
- `prepare_image` / `Projector.prepare` decode and preprocess an image exactly as llama.cpp's
  mtmd does for the family; bad input raises an `ImageError` naming the problem.
- `Projector.embed(prepared images)` -> each image's prompt embeddings [positions, text D]
  (`Projector.encode(pixels [n, S, S, 3])` for a fixed-size family's batch). Families:
  `gemma3` (fixed 896 px square), `pixtral`, `qwen3vl_merger` and `gemma4v` (dynamic
  resolution: `tsjax.vision.dynamic`; Qwen 3.5's images also take M-RoPE positions,
  `tsjax.spans`; Gemma 4's spans are bidirectional on its sliding layers only).
"""

from tsjax.vision.config import ResizeSpec, VisionConfig
from tsjax.vision.preprocess import (
    EmptyImageError,
    ImageError,
    ImageLimits,
    ImageTooLargeError,
    NotAnImageError,
    PreparedImage,
    TruncatedImageError,
    open_image,
    prepare_image,
)
from tsjax.vision.projector import (
    IMAGE_BUCKETS,
    PROJECTORS,
    Projector,
    default_buckets,
    load_projector,
)

__all__ = [
    "IMAGE_BUCKETS",
    "PROJECTORS",
    "EmptyImageError",
    "ImageError",
    "ImageLimits",
    "ImageTooLargeError",
    "NotAnImageError",
    "PreparedImage",
    "Projector",
    "ResizeSpec",
    "TruncatedImageError",
    "VisionConfig",
    "default_buckets",
    "load_projector",
    "open_image",
    "prepare_image",
]
