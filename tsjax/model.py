"""A loaded model: config, params on device, tokenizer, chat template and compiled steps
(`Model.runner()` runs them with a cache of its own)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from tsjax.catalog import enable_compilation_cache, resolve_model
from tsjax.chat_template import ChatTemplate, special_tokens_from_metadata
from tsjax.gguf import GGUFFile
from tsjax.loader import LoadStats, load_params
from tsjax.models import ModelConfig, config_from_gguf
from tsjax.runner import LocalRunner
from tsjax.shapes import StepShapes
from tsjax.steps import Steps
from tsjax.tokenizer import Tokenizer

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
    quant: str | None = None,
) -> Model:
    """Load a catalog name or a .gguf path. `max_len` caps the cache (default: the model's
    context length, at most 4096); `rows` is the number of decode slots.

    `mesh` (a `jax.sharding.Mesh`, or a spec such as "tp=4" / "dp=2,tp=2" over every device)
    shards params, cache and steps over several devices; each weight goes straight from the
    host into its shards. None keeps everything on the default device."""
    path = resolve_model(model)
    enable_compilation_cache()
    t0 = time.perf_counter()
    g = GGUFFile(path)
    cfg = config_from_gguf(g)
    dtype = dtype or default_dtype()
    if isinstance(mesh, str):
        from tsjax.sharding import make_mesh

        mesh = make_mesh(mesh)
    max_len = max_len or min(cfg.context_length, 4096)
    shapes = shapes or StepShapes.default(rows=rows, max_len=max_len)
    steps = Steps(cfg, shapes, dtype, mesh=mesh, unrolled=unrolled, quant=quant)
    put = steps.plan.device_put if steps.plan is not None else None
    float_model = steps.model.clone(quant=None)
    params, stats = load_params(g, float_model, progress=progress, device_put=put)
    tokenizer = Tokenizer.from_gguf(g.metadata)
    if quant == "int8":
        from tsjax.quantize import CALIBRATION_TEXT, calibrate, quantize_params

        calibration = tokenizer.encode(CALIBRATION_TEXT)
        params = quantize_params(params, calibrate(float_model, params, calibration))
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
        "loaded %s (%s, %d layers) in %.1fs: %.0f MB params on %s",
        path.name,
        cfg.architecture,
        cfg.n_layers,
        stats.seconds,
        stats.bytes_params / 1e6,
        jax.devices()[0].platform if mesh is None else f"{mesh.devices.size} devices",
    )
    metadata = {k: v for k, v in g.metadata.items() if not k.startswith("tokenizer.ggml.")}
    return Model(path, cfg, params, tokenizer, template, steps, metadata, stats)
