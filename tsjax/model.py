"""A loaded model: config, params on device, tokenizer, chat template and compiled steps
(`Model.runner()` runs them with a cache of its own), and optionally a multimodal projector
(`mmproj`) that turns images into embeddings the prompt takes in place of tokens."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from tsjax.catalog import enable_compilation_cache, resolve_model
from tsjax.chat_template import ChatTemplate, special_tokens_from_metadata
from tsjax.gguf import GGUFFile
from tsjax.loader import LoadStats, load_params
from tsjax.models import ModelConfig, config_from_gguf
from tsjax.quants import BLOCK_QUANTS, choose_quant, quant_name
from tsjax.runner import LocalRunner
from tsjax.shapes import StepShapes
from tsjax.spans import Prompt
from tsjax.steps import Steps
from tsjax.tokenizer import Tokenizer

if TYPE_CHECKING:
    from tsjax.vision import Projector
    from tsjax.vision.preprocess import ImageSource

log = logging.getLogger("tsjax")


def default_dtype() -> jnp.dtype:
    """float32 on CPU (XLA:CPU runs bf16 matmuls ~10x slower); bfloat16 on accelerators."""
    return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16


@dataclass
class Model:
    path: Path
    config: ModelConfig
    params: dict
    tokenizer: Tokenizer
    template: ChatTemplate
    steps: Steps
    metadata: dict
    load_stats: LoadStats
    projector: Projector | None = None  # the mmproj's image encoder, if one was loaded
    quant_reason: str = "asked for"  # why this weight format (`tsjax.quants.choose_quant`)

    @property
    def quant(self) -> str:
        """The weight format the params are in: "f32" (the model dtype's float weights), "bf16",
        "int8", "q8" or "q4" (`tsjax.quants`)."""
        return quant_name(self.steps.model.quant)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def max_len(self) -> int:
        return self.steps.shapes.max_len

    def runner(self) -> LocalRunner:
        """The compiled steps with this model's params and a fresh cache of their own (one
        per user: `tsjax.generation`, the server's engine)."""
        return LocalRunner(self.steps, self.params)

    def render_chat(self, messages: list[dict], **kwargs) -> list[int]:
        """Messages through the chat template, then tokens (no second BOS); control-token text
        in the messages is tokenized as text (`ChatTemplate.tokenize`)."""
        return self.template.tokenize(self.tokenizer, messages, **kwargs)[0]

    def tokenize_prompt(
        self,
        text: str,
        controls: Sequence[tuple[int, int]] | None = None,
        lengths: Sequence[int] | None = None,
    ) -> tuple[list[int], list[int]]:
        """Rendered prompt text -> (token ids, where each image's embeddings start), one
        image per `tsjax.vision.prompt.IMAGE_MARK` (audio clip per `AUDIO_MARK`) in the text
        (`image_prompt`). `controls`: the template's own control tokens
        (`ChatTemplate.render_marked`), the only text parsed as control tokens; None parses
        them anywhere (a raw prompt). `lengths`: each medium's positions
        (`PreparedImage.tokens`, `PreparedAudio.tokens`; needed by a dynamic-resolution
        projector and by audio). BOS as `render_chat` adds it. Marks without a projector are
        a `NoProjectorError`, audio marks without an audio encoder a `NoAudioEncoderError`."""
        from tsjax.vision.prompt import (
            NoAudioEncoderError,
            NoProjectorError,
            image_prompt,
            mark_kinds,
        )

        add_bos = None if not self.template.bos_in_template else False
        kinds = mark_kinds(text)
        if not kinds:
            if controls is None:
                return self.tokenizer.encode(text, add_bos=add_bos, parse_special=True), []
            return self.tokenizer.encode_marked(text, controls, add_bos=add_bos), []
        if self.projector is None:
            raise NoProjectorError(self.name)
        if "audio" in kinds and self.projector.audio is None:
            raise NoAudioEncoderError(self.name)
        return image_prompt(
            self.tokenizer,
            text,
            self.projector.config,
            controls=controls,
            add_bos=add_bos,
            add_eos=None,
            lengths=lengths,
            audio=self.projector.audio.config if self.projector.audio else None,
        )

    def chat_prompt(
        self,
        messages: list[dict],
        images: Sequence[ImageSource] = (),
        audio: Sequence[bytes] = (),
        **kwargs: Any,
    ) -> Prompt:
        """Messages through the chat template with `images` (bytes, paths or PIL images, in
        the order of the image parts, `{"type": "image"}`, of the messages) and `audio`
        (audio files' bytes, in the order of the audio parts, `{"type": "audio"}`) encoded
        into the prompt; control-token text in the messages stays text
        (`ChatTemplate.tokenize`). `kwargs` go to the template (`ChatTemplate.render`)."""
        from tsjax.vision.prompt import (
            ImageCountError,
            NoAudioEncoderError,
            NoProjectorError,
            image_spans,
            inline_images,
            mark_kinds,
        )

        text, controls = self.template.render_marked(
            inline_images(messages), self.tokenizer.control_texts, **kwargs
        )
        kinds = mark_kinds(text)
        if kinds and self.projector is None:
            raise NoProjectorError(self.name)
        if kinds.count("image") != len(images) or kinds.count("audio") != len(audio):
            raise ImageCountError(
                f"the messages have {kinds.count('image')} image and {kinds.count('audio')}"
                f" audio part(s) for {len(images)} image(s) and {len(audio)} clip(s)"
            )
        if not kinds or self.projector is None:
            return Prompt(self.tokenize_prompt(text, controls)[0])
        if audio and self.projector.audio is None:
            raise NoAudioEncoderError(self.name)
        pictures = iter([self.projector.prepare(x) for x in images])
        clips = iter([self.projector.audio.prepare(x) for x in audio] if audio else [])
        prepared = [next(pictures) if k == "image" else next(clips) for k in kinds]
        ids, starts = self.tokenize_prompt(text, controls, [p.tokens for p in prepared])
        return Prompt(ids, tuple(image_spans(self.projector, prepared, starts)))


def load(
    model: str | Path | None = None,
    *,
    max_len: int | None = None,
    rows: int = 1,
    dtype=None,
    progress: bool = True,
    shapes: StepShapes | None = None,
    mesh: Mesh | str | None = None,
    unrolled: bool | None = None,
    quant: str | None = "auto",
    mmproj: str | Path | None = None,
) -> Model:
    """Load a catalog name or a .gguf path. `max_len` caps the cache (default: the model's
    context length, at most 4096); `rows` is the number of decode slots. `mmproj`: a
    multimodal projector GGUF (llama.cpp's mmproj file) for image input; a bare file name is
    looked for beside the model, "none" means none.

    `mesh` (a `jax.sharding.Mesh`, or a spec such as "tp=4" / "dp=2,tp=2" over every device)
    shards params, cache and steps over several devices; each weight goes straight from the
    host into its shards. None keeps everything on the default device.

    `quant`: the weight format (`tsjax.quants`): "auto" (default) chooses per platform and
    file (`choose_quant`; `Model.quant` says which), "f32" or None the exact float weights."""
    path = resolve_model(model)
    enable_compilation_cache()
    t0 = time.perf_counter()
    g = GGUFFile(path)
    cfg = config_from_gguf(g)
    dtype = dtype or default_dtype()
    if isinstance(mesh, str):
        from tsjax.sharding import make_mesh

        mesh = make_mesh(mesh)
    n_devices = 1 if mesh is None else mesh.devices.size
    quant, reason = choose_quant(
        quant, jax.default_backend(), _weight_types(g), _kernels, n_devices
    )
    if cfg.moe is not None and quant in BLOCK_QUANTS:  # tsjax.layers.moe.expert_format
        reason += "; routed experts in int8 blocks of 32"
    max_len = max_len or min(cfg.context_length, 4096)
    shapes = shapes or StepShapes.default(rows=rows, max_len=max_len)
    tokenizer = Tokenizer.from_gguf(g.metadata)
    steps = Steps(
        cfg, shapes, dtype, mesh=mesh, unrolled=unrolled, quant=quant, stop_ids=tokenizer.eog_ids
    )
    put = steps.plan.device_put if steps.plan is not None else None
    float_model = steps.model.clone(quant=None)
    narrow = steps.model if quant in BLOCK_QUANTS else None
    params, stats = load_params(g, float_model, progress=progress, device_put=put, narrow=narrow)
    if quant == "int8":
        from tsjax.quantize import CALIBRATION_TEXT, calibrate, quantize_params

        calibration = tokenizer.encode(CALIBRATION_TEXT)
        params = quantize_params(params, calibrate(float_model, params, calibration))
        if cfg.moe is not None:
            from tsjax.quantize import expert_params

            params = expert_params(params, "int8")
    elif quant == "bf16":
        from tsjax.quantize import bf16_params

        params = bf16_params(params, cfg.tied_embeddings)
    if quant is not None:
        stats.bytes_params = sum(x.nbytes for x in jax.tree_util.tree_leaves(params))
    template = ChatTemplate.from_metadata(
        g.metadata, g.architecture, special_tokens=special_tokens_from_metadata(g.metadata)
    )
    stats.seconds = time.perf_counter() - t0
    log.info(
        "loaded %s (%s, %d layers) in %.1fs: %.0f MB params (%s weights, %s) on %s",
        path.name,
        cfg.architecture,
        cfg.n_layers,
        stats.seconds,
        stats.bytes_params / 1e6,
        quant_name(quant),
        reason,
        jax.devices()[0].platform if mesh is None else f"{mesh.devices.size} devices",
    )
    metadata = {k: v for k, v in g.metadata.items() if not k.startswith("tokenizer.ggml.")}
    projector = None
    if mmproj_path(mmproj, path) is not None:
        projector = load_model_projector(mmproj_path(mmproj, path), cfg.dim, mesh)
    return Model(path, cfg, params, tokenizer, template, steps, metadata, stats, projector, reason)


def mmproj_path(mmproj: str | Path | None, model_path: Path) -> Path | None:
    """Where the projector file is: a bare file name beside the model (as the reference
    server resolves it), any other path as given; None for None, "" or "none"."""
    if mmproj is None or str(mmproj).strip().lower() in ("", "none"):
        return None
    p = Path(mmproj).expanduser()
    if p.name == str(mmproj) and not p.is_absolute():
        return model_path.parent / p
    return p


def load_model_projector(path: Path, text_dim: int, mesh: Mesh | None = None) -> Projector:
    """The projector at `path`, checked to project into a text model of width `text_dim`,
    its params sharded over `mesh` by the vision rules. Not over a mesh that spans several
    processes: every process would have to encode in step, and only the first one serves
    HTTP; there it stays on this process's first device."""
    from tsjax.vision import load_projector

    if not path.is_file():
        raise FileNotFoundError(f"mmproj file not found: {path}")
    if mesh is not None and jax.process_count() > 1:
        mesh = None
    proj = load_projector(path, mesh=mesh)
    proj.check_text_dim(text_dim)
    c = proj.config
    per_image = f"{c.min_tokens}-{c.max_tokens}" if c.dynamic else str(c.tokens_per_image)
    log.info(
        "loaded projector %s (%s, %s tokens an image) in %.1fs",
        path.name,
        c.projector_type,
        per_image,
        proj.load_seconds,
    )
    return proj


def _weight_types(g: GGUFFile) -> set[str]:
    """The GGUF types of the file's matrices (what "auto" chooses a format from)."""
    return {g.info(n).qtype for n in g.tensor_names() if len(g.info(n).shape) >= 2}


def _kernels() -> bool:
    from tsjax.kernels import blockdot

    return blockdot.available()
