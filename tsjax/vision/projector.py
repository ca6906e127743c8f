"""A loaded projector: its config, params on device, and the compiled encoder.

    proj = load_projector("mmproj-gemma-3-4b-it-f16.gguf")
    img = proj.prepare(open("cat.jpg", "rb").read())        # PreparedImage (pixels, digest)
    emb = proj.encode(np.stack([img.pixels]))               # [1, 256, text D] on device
    (e,) = proj.embed([img])                                # [img.tokens, text D] on the host

The family comes from `clip.projector_type` through `PROJECTORS`, as the text families come
from `general.architecture`. A family module provides `config(g) -> VisionConfig`,
`module(cfg, dtype) -> flax module`, `tensors(g, cfg)` (GGUF tensor -> params path, `{i}` for
the layer of stacked tensors), `PARAM_AXES` (its own params' logical axes; a ViT tower's are in
`tsjax.vision.vit`) and, if its prompt layout interleaves more than the tokens (Pixtral's row
breaks), `arrange(cfg, params, tokens, rows, cols)`.

A fixed-size family's module takes pixels [B, S, S, 3] -> [B, tokens, text D]; a dynamic one's
(`VisionConfig.dynamic`, Pixtral) takes the packed, padded patches of `tsjax.vision.dynamic`
-> [B, bucket, text D]. The encoder is one `jax.jit` of the module's apply with the params as
an argument; batches of images are padded to an image-count bucket (`default_buckets()`), and
dynamic images to a token bucket (`tsjax.vision.dynamic.token_buckets`), so at most one
compile per (count, token) bucket, all of them compiled by `warmup`; bigger batches run in
chunks of the largest.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from tsjax.gguf import GGUFError, GGUFFile
from tsjax.programs import compile_lowered
from tsjax.vision import dynamic, gemma3, gemma4v, pixtral, qwen3vl
from tsjax.vision.config import VisionConfig, projector_type
from tsjax.vision.preprocess import ImageLimits, ImageSource, PreparedImage, prepare_image

if TYPE_CHECKING:
    from tsjax.audio.encoder import AudioEncoder

PROJECTORS: dict[str, ModuleType] = {
    "gemma3": gemma3,
    "gemma4v": gemma4v,
    "pixtral": pixtral,
    "qwen3vl_merger": qwen3vl,
}
IMAGE_BUCKETS = (1, 2, 4, 8)


def default_buckets() -> tuple[int, ...]:
    """One image at a time on CPU, `IMAGE_BUCKETS` on accelerators. XLA:CPU is compute-bound
    here: two 896 px images (2 SigLIP layers) took 10.5-11.4 s as a batch of two against
    9.5-10.0 s one after the other, and each image in a batch holds ~2 GiB of attention
    scores at its widest."""
    return (1,) if jax.default_backend() == "cpu" else IMAGE_BUCKETS


DevicePut = Callable[[tuple[str, ...], np.ndarray], jax.Array]


def projector_family(g: GGUFFile) -> ModuleType:
    kind = projector_type(g)
    family = PROJECTORS.get(kind)
    if family is None:
        raise GGUFError(
            f"{g.path.name}: projector type {kind!r} is not supported "
            f"(supported: {', '.join(sorted(PROJECTORS))})"
        )
    return family


@dataclass
class Projector:
    path: Path
    config: VisionConfig
    params: dict
    module: nn.Module
    load_seconds: float = 0.0
    buckets: tuple[int, ...] = IMAGE_BUCKETS
    limits: ImageLimits = field(default_factory=ImageLimits)
    metadata: dict = field(default_factory=dict)  # the file's keys (Ollama's projector_info)
    family: ModuleType | None = None
    # the same file's audio encoder (Gemma 4's gemma4a), if it has one: `tsjax.audio`
    audio: AudioEncoder | None = None

    def __post_init__(self):
        self._traced = 0

        def forward(params, *inputs):
            self._traced += 1  # runs once per input shape, when jit traces (and compiles) it
            return self.module.apply({"params": params}, *inputs)

        self._forward = jax.jit(forward)
        c = self.config
        self.token_buckets = dynamic.token_buckets(c.min_tokens, c.max_tokens) if c.dynamic else ()
        self._host_params: dict | None = None

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def tokens_per_image(self) -> int:
        """Positions of every image (fixed-size families; a ValueError for dynamic ones)."""
        return self.config.tokens_per_image

    def compiled_count(self) -> int:
        """How many input shapes the encoder has compiled, warm-up included (a call after
        `warmup` compiled its shape finds the program: it neither traces nor compiles)."""
        return self._traced

    def prepare(self, source: ImageSource, max_tokens: int | None = None) -> PreparedImage:
        """Decode and preprocess one image (bytes, path or PIL image); `ImageError` if bad.
        `max_tokens`: a video frame's budget (dynamic families; `budget_size`)."""
        return prepare_image(source, self.config, self.limits, max_tokens)

    def bucket(self, n: int) -> int:
        """The image-count bucket a batch of n (1 <= n <= max bucket) images runs in."""
        return next(b for b in self.buckets if b >= n)

    def encode(self, pixels: np.ndarray | Sequence[np.ndarray]) -> jax.Array:
        """pixels: [n, S, S, 3] normalized (`PreparedImage.pixels` stacked), for a fixed-size
        family. Returns the image embeddings [n, tokens_per_image, text D] on device."""
        if self.config.dynamic:
            raise ValueError(f"{self.config.projector_type} images differ in size: use embed")
        pixels = np.asarray(pixels, np.float32)
        s = self.config.image_size
        if pixels.ndim != 4 or pixels.shape[1:] != (s, s, 3):
            raise ValueError(f"pixels must be [n, {s}, {s}, 3], got {list(pixels.shape)}")
        outs, step = [], self.buckets[-1]
        for start in range(0, len(pixels), step):
            chunk = pixels[start : start + step]
            n = len(chunk)
            if self.bucket(n) > n:  # zero images as padding; each image attends only to itself
                pad = np.zeros((self.bucket(n) - n, s, s, 3), np.float32)
                chunk = np.concatenate([chunk, pad])
            outs.append(self._forward(self.params, chunk)[:n])
        if not outs:
            return jnp.zeros((0, self.tokens_per_image, self.config.text_dim), self.module.dtype)
        return outs[0] if len(outs) == 1 else jnp.concatenate(outs)

    def encode_images(self, sources: Sequence[ImageSource]) -> jax.Array:
        """Prepare and encode images in one batch: [n, tokens_per_image, text D]."""
        return self.encode(np.stack([self.prepare(s).pixels for s in sources]))

    def embed(self, images: Sequence[PreparedImage]) -> list[np.ndarray]:
        """Each image's embeddings [img.tokens, text D] as host arrays, each distinct image
        (by digest) encoded once, all of them together (`embed_pixels`)."""
        unique: dict[str, PreparedImage] = {}
        for img in images:
            unique.setdefault(img.digest, img)
        if not unique:
            return []
        out = self.embed_pixels([img.pixels for img in unique.values()])
        by_digest = dict(zip(unique, out, strict=True))
        return [by_digest[img.digest] for img in images]

    def embed_pixels(self, pixels: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Prepared images' pixels ([H, W, 3] each) -> their prompt embeddings [positions,
        text D] (`VisionConfig.positions`), host arrays. A fixed-size family's run as one
        batch; a dynamic family's grouped by token bucket."""
        if not pixels:
            return []
        if not self.config.dynamic:
            return list(np.asarray(self.encode(np.stack(pixels))))
        c, out = self.config, [None] * len(pixels)
        groups: dict[int, list[int]] = {}
        for i, px in enumerate(pixels):
            rows, cols = c.grid(*px.shape[:2])
            groups.setdefault(dynamic.bucket_of(rows * cols, self.token_buckets), []).append(i)
        step = self.buckets[-1]
        for t, members in sorted(groups.items()):
            for start in range(0, len(members), step):
                chunk = members[start : start + step]
                packed = [dynamic.pack(pixels[i], c, t) for i in chunk]
                inputs = [np.stack(a) for a in zip(*packed, strict=True)]
                pad = self.bucket(len(chunk)) - len(chunk)
                if pad:
                    inputs = [
                        np.concatenate(ab)
                        for ab in zip(inputs, dynamic.empty_inputs(c, pad, t), strict=True)
                    ]
                res = np.asarray(self._forward(self.params, *inputs))
                for i, r in zip(chunk, res, strict=False):
                    out[i] = self._arrange(r, *c.grid(*pixels[i].shape[:2]))
        return out

    def _arrange(self, tokens: np.ndarray, rows: int, cols: int) -> np.ndarray:
        """A dynamic image's first rows*cols tokens of its bucket, laid out as the family
        puts them in the prompt."""
        tokens = tokens[: rows * cols]
        arrange = getattr(self.family, "arrange", None)
        if arrange is None:
            return tokens
        if self._host_params is None:  # the few small leaves arrange reads, on the host once
            self._host_params = {
                k: np.asarray(v) for k, v in self.params.items() if not isinstance(v, dict)
            }
        return arrange(self.config, self._host_params, tokens, rows, cols)

    def warmup(self, buckets: Sequence[int] | None = None, run: bool = False) -> float:
        """Compile the encoder for each image-count bucket ahead of the first request, without
        running it (a later call finds the program compiled: jit's cache is shared with
        `lower().compile()`). A full SigLIP-So400m image takes about a minute on a 2-core CPU
        in float32, so running one at start-up would cost that much again. `run`: also run
        a zero batch per bucket. A dynamic family compiles every (count, token) bucket pair:
        then no image size compiles later. Returns seconds."""
        t0 = time.perf_counter()
        if self.config.dynamic:
            for b in buckets or self.buckets:
                for t in self.token_buckets:
                    inputs = dynamic.empty_inputs(self.config, b, t)
                    specs = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in inputs]
                    compile_lowered(self._forward.lower(self.params, *specs))
                    if run:
                        jax.block_until_ready(self._forward(self.params, *inputs))
            return time.perf_counter() - t0
        s = self.config.image_size
        for b in buckets or self.buckets:
            spec = jax.ShapeDtypeStruct((b, s, s, 3), jnp.float32)
            compile_lowered(self._forward.lower(self.params, spec))
            if run:
                jax.block_until_ready(
                    self._forward(self.params, np.zeros((b, s, s, 3), np.float32))
                )
        return time.perf_counter() - t0

    def check_text_dim(self, text_dim: int) -> None:
        """A GGUFError when the projector's output does not fit the text model's D."""
        if text_dim != self.config.text_dim:
            raise GGUFError(
                f"{self.name} projects to {self.config.text_dim} features but the text model's"
                f" embedding is {text_dim}: it belongs to another model"
            )


def load_projector(
    path: str | Path,
    *,
    dtype: jnp.dtype | None = None,
    device_put: DevicePut | None = None,
    buckets: tuple[int, ...] | None = None,
    limits: ImageLimits | None = None,
    mesh: Mesh | None = None,
) -> Projector:
    """Read an mmproj GGUF: config from its `clip.*` keys, params from its `v.*` / `mm.*`
    tensors, and its audio encoder (`Projector.audio`) where it has one. dtype: the params'
    (default float32 on CPU, bfloat16 on accelerators); device_put(path, array): place each
    leaf (e.g. a `VisionShardingPlan.device_put`); mesh: shard the params over it by the
    vision rules (`tsjax.vision.sharding`; instead of device_put); buckets: the image counts
    compiled (default `default_buckets()`)."""
    t0 = time.perf_counter()
    g = GGUFFile(path)
    family = projector_family(g)
    cfg = family.config(g)
    if mesh is not None:
        from tsjax.vision.sharding import VisionShardingPlan

        device_put = VisionShardingPlan(mesh, cfg).device_put
    if dtype is None:
        # TODO(narrow weights): the tower runs float32 on CPU (~64 s for a full SigLIP-So400m
        # image on 2 cores, compute-bound); the text model's narrow formats (`--quant`,
        # tsjax.quantize: int8 kernels with per-channel scales) would suit its matmuls too,
        # once measured against these embeddings' tolerance.
        dtype = jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    module = family.module(cfg, dtype)
    ignore = getattr(family, "IGNORED_PREFIXES", ())
    params = load_params(g, cfg, module, family.tensors(g, cfg), device_put, ignore)
    # the audio half of the file runs on one device, its params replicated (small: ~300M
    # parameters for Gemma 4's conformer)
    from tsjax.audio.encoder import has_audio, load_audio_encoder  # (it imports this module)

    audio = load_audio_encoder(g, dtype=dtype) if has_audio(g) else None
    # dynamic images run one at a time: each is already up to thousands of patches, and a
    # count bucket per token bucket would multiply the programs to compile
    default = (1,) if cfg.dynamic else default_buckets()
    return Projector(
        Path(path),
        cfg,
        params,
        module,
        time.perf_counter() - t0,
        tuple(sorted(buckets or default)),
        limits or ImageLimits(),
        dict(g.metadata),
        family,
        audio,
    )


def param_shapes(module: nn.Module, cfg: VisionConfig) -> dict:
    """The params pytree's shapes and dtypes, from the module itself."""
    if cfg.dynamic:
        inputs = [jnp.asarray(a) for a in dynamic.empty_inputs(cfg, 1, cfg.min_tokens)]
    else:
        inputs = [jnp.zeros((1, cfg.image_size, cfg.image_size, 3), jnp.float32)]
    return jax.eval_shape(lambda: module.init(jax.random.key(0), *inputs))["params"]


def load_params(
    g: GGUFFile,
    cfg: VisionConfig,
    module,
    table,
    device_put=None,
    ignore: tuple[str, ...] = (),
    shapes: dict | None = None,
) -> dict:
    """Every tensor of `table` (GGUF name -> (params path, transform)) into a params pytree
    shaped as `module` wants it (`shapes`: its params' shapes, default `param_shapes`);
    per-layer tensors ("{i}") stacked on a leading layer axis. Any other tensor is an error,
    except those named with an `ignore` prefix (another modality's encoder in the same file:
    Gemma 4's audio, `tsjax.audio`, and vision)."""
    shapes = param_shapes(module, cfg) if shapes is None else shapes
    put = device_put or (lambda path, a: jax.device_put(a))
    names = set(g.tensor_names())
    wanted = [n.format(i=i) for n in table for i in (range(cfg.n_layers) if "{i}" in n else [0])]
    missing = [n for n in wanted if n not in names]
    if missing:
        raise GGUFError(
            f"{g.path.name}: missing tensors {missing[:5]} for a {cfg.projector_type} projector"
        )
    unused = sorted(n for n in names - set(wanted) if not n.startswith(ignore))
    if unused:
        raise GGUFError(
            f"{g.path.name}: tensors {unused[:5]} are not supported for a "
            f"{cfg.projector_type} projector (the encoder would ignore them)"
        )
    covered = {path for path, _ in table.values()}
    for leaf_path, _ in jax.tree_util.tree_flatten_with_path(shapes)[0]:
        key = tuple(k.key for k in leaf_path)
        assert key in covered, f"no GGUF tensor fills params {'/'.join(key)}"
    params: dict = {}
    for name, (path, transform) in table.items():
        leaf = _get(shapes, path)
        np_dtype = np.dtype(leaf.dtype)
        if "{i}" in name:
            arr = np.stack(
                [
                    _tensor(g, name.format(i=i), transform, leaf.shape[1:])
                    for i in range(cfg.n_layers)
                ]
            )
        else:
            arr = _tensor(g, name, transform, leaf.shape)
        _set(params, path, put(path, arr.astype(np_dtype, copy=False)))
    return params


def _tensor(g: GGUFFile, name: str, transform, want: tuple[int, ...]) -> np.ndarray:
    w = g.tensor(name, np.float32)
    if transform is not None:
        w = transform(w)
    if w.shape != tuple(want):
        raise GGUFError(f"{g.path.name}: tensor {name} has shape {w.shape}, expected {want}")
    return np.ascontiguousarray(w).reshape(w.shape)  # (ascontiguousarray makes 0-d 1-d)


def _get(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def _set(tree, path, value):
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value
