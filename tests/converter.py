"""llama.cpp's own Hugging Face -> GGUF converter, fetched once from PyPI and run in a subprocess.

Families without a small real GGUF (Gemma 4, Qwen 3.5, Nemotron-H, GPT-OSS, Mistral 3 and the
vision/audio projectors) are tested on tiny random Hugging Face models converted by the very
script that produces the GGUF files people download: ``convert_hf_to_gguf.py``. It ships inside
the source distribution of llama-cpp-python (``vendor/llama.cpp``), which is on PyPI, the one
registry these machines reach. The sdist is pinned by version and sha256; its llama.cpp tree is
also where the family notes, the chat templates (``models/templates``) and llama.cpp's graph
code (``src/models``, ``tools/mtmd``) are read from.

    python tests/converter.py fetch          # what `make converter` runs: download, verify, unpack
    root = converter_root()                  # the same, from Python (instant once unpacked)
    convert([ConvertJob(hf_dir, out, "f32"), ConvertJob(hf_dir, out_mm, "f32", mmproj=True)])

The tree lives beside the model cache: ``$TSJAX_HOME/llama.cpp/<version>``, else
``$XDG_CACHE_HOME/tsjax/...`` (``~/.cache/tsjax/...``), as `tsjax.catalog.models_dir` decides.
A failure to fetch raises: a test that needs the converter must not silently skip.

The converter runs in a child process (it puts its own, newer ``gguf-py`` first on
``sys.path``, which must not leak into the tests' ``gguf``). All jobs for one model share one
child, so torch and transformers are imported once per model. Three optional patches are applied
in the child before each job's run; each exists because a *tiny* checkpoint differs from a
real one in a way the converter cannot handle (see `ConvertJob`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

SDIST_REQUIREMENT = "llama-cpp-python==0.3.36"
SDIST_VERSION = "0.3.36"
SDIST_FILE = "llama_cpp_python-0.3.36.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"

# What is unpacked from vendor/llama.cpp: the converter and its gguf-py, the chat templates, and
# the C++ sources the family notes cite. The rest (75 MB of vocab test files, ggml kernels) is not.
_KEEP = (
    "convert_hf_to_gguf.py",
    "conversion/",
    "gguf-py/gguf/",
    "models/templates/",
    "src/",
    "tools/mtmd/",
    "include/",
    "LICENSE",
)
_PREFIX = f"llama_cpp_python-{SDIST_VERSION}/vendor/llama.cpp/"
_STAMP = ".sdist-sha256"


class ConverterError(RuntimeError):
    """The converter could not be fetched, or a conversion failed (the message has its log)."""


def cache_root() -> Path:
    """Where the unpacked llama.cpp tree lives: beside `tsjax.catalog.models_dir()`."""
    from tsjax.catalog import models_dir  # imported here: the child process must not need tsjax

    return models_dir().parent / "llama.cpp" / SDIST_VERSION


def converter_root() -> Path:
    """The unpacked ``vendor/llama.cpp`` of the pinned sdist, fetching it on first use.

    Instant when already unpacked (a stamp file records the verified digest). Otherwise
    downloads the sdist with pip (its index and proxy settings apply), checks the sha256 and
    unpacks the needed subset atomically. Raises `ConverterError` when any step fails.
    """
    root = cache_root()
    stamp = root / _STAMP
    if stamp.is_file() and stamp.read_text().strip() == SDIST_SHA256:
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root.parent, prefix=".fetch-") as tmp:
        sdist = _download(Path(tmp))
        staging = Path(tmp) / "tree"
        _unpack(sdist, staging)
        (staging / _STAMP).write_text(SDIST_SHA256 + "\n")
        if root.exists():
            shutil.rmtree(root)  # a stale or half-written tree (no valid stamp)
        staging.rename(root)
    return root


def _download(dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
    cmd += ["--disable-pip-version-check", "-d", str(dest), SDIST_REQUIREMENT]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    path = dest / SDIST_FILE
    if proc.returncode != 0 or not path.is_file():
        raise ConverterError(
            f"could not download {SDIST_REQUIREMENT} from PyPI (rc={proc.returncode}):\n"
            + (proc.stdout + proc.stderr)[-3000:]
        )
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        raise ConverterError(f"{SDIST_FILE}: sha256 {digest}, expected {SDIST_SHA256}")
    return path


def _unpack(sdist: Path, dest: Path) -> None:
    with tarfile.open(sdist) as tar:
        members = []
        for m in tar.getmembers():
            rel = m.name[len(_PREFIX) :] if m.name.startswith(_PREFIX) else None
            if rel and any(rel == k or (k.endswith("/") and rel.startswith(k)) for k in _KEEP):
                m.name = rel
                members.append(m)
        if not any(m.name == "convert_hf_to_gguf.py" for m in members):
            raise ConverterError(f"{sdist.name} has no {_PREFIX}convert_hf_to_gguf.py")
        tar.extractall(dest, members=members, filter="data")


# ----------------------------------------------------------------------------- conversion


@dataclass(frozen=True)
class ConvertJob:
    """One run of ``convert_hf_to_gguf.py`` on a model directory.

    hf_dir: the Hugging Face checkpoint directory. outfile: the GGUF to write. outtype:
    ``f32``, ``f16``, ``bf16`` or ``q8_0`` (the converter's own choices). mmproj: write the
    projector (``--mmproj``) instead of the text model. extra_args: more converter flags (e.g.
    ``--no-mtp``).

    Patches (applied in the child process, for this job only):
    force_pre: the ``tokenizer.ggml.pre`` name to write. The converter recognises a BPE
        pre-tokenizer by hashing how the tokenizer splits a fixed text; a tiny trained vocabulary
        gives an unknown hash and the converter refuses. The tiny tokenizers use the real
        family's split regex, so the name written is the truthful one.
    raw_config: read ``config.json`` as written instead of through ``AutoConfig(...).to_dict()``.
        transformers 5 fills every NemotronH MoE default into the dict, and the converter then
        picks ``nemotron_h_moe`` for a dense model (hub configs of dense models have no MoE keys).
    pixtral_img_break: let ``embed_tokens`` reach the Pixtral projector converter.
        ``MmprojModel.filter_tensors`` drops every ``language_model.`` tensor of an HF-format
        checkpoint, so ``v.token_embd.img_break`` (the ``[IMG_BREAK]`` row of the text
        embeddings, which mtmd requires) is never written for one; real Mistral 3 projectors
        come from the Mistral-format checkpoint, whose path keeps it.
    """

    hf_dir: str
    outfile: str
    outtype: str = "f32"
    mmproj: bool = False
    extra_args: tuple[str, ...] = ()
    force_pre: str | None = None
    raw_config: bool = False
    pixtral_img_break: bool = False

    def argv(self) -> list[str]:
        args = [self.hf_dir, "--outfile", self.outfile, "--outtype", self.outtype]
        return args + (["--mmproj"] if self.mmproj else []) + list(self.extra_args)


def convert(jobs: list[ConvertJob], *, timeout: float = 600) -> None:
    """Run the jobs in one child process; raise `ConverterError` with its log."""
    root = converter_root()
    spec = json.dumps({"root": str(root), "jobs": [asdict(j) for j in jobs]})
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, __file__, "convert", spec],
        capture_output=True, text=True, timeout=timeout, env=env,
    )  # fmt: skip
    missing = [j.outfile for j in jobs if not Path(j.outfile).is_file()]
    if proc.returncode != 0 or missing:
        raise ConverterError(
            f"convert_hf_to_gguf.py failed (rc={proc.returncode}, missing {missing}):\n"
            + (proc.stdout + proc.stderr)[-4000:]
        )


def _run_jobs(spec: dict) -> None:
    """Child process: import the converter from the unpacked tree, patch it, run the jobs."""
    import runpy

    root = Path(spec["root"])
    sys.path[:0] = [str(root), str(root / "gguf-py")]  # the tree's gguf, not site-packages'
    import conversion.base as base

    script = runpy.run_path(str(root / "convert_hf_to_gguf.py"), run_name="tsjax_converter")
    original = {
        "pre": base.TextModel.get_vocab_base_pre,
        "hparams": base.ModelBase.load_hparams,
    }
    for job in spec["jobs"]:
        base.TextModel.get_vocab_base_pre = original["pre"]
        base.ModelBase.load_hparams = original["hparams"]
        if job["force_pre"]:
            pre = job["force_pre"]
            base.TextModel.get_vocab_base_pre = lambda self, tokenizer, pre=pre: pre
        if job["raw_config"]:

            def raw(dir_model, is_mistral_format=False):
                return json.loads((Path(dir_model) / "config.json").read_text())

            base.ModelBase.load_hparams = staticmethod(raw)
        if job["pixtral_img_break"]:
            _let_img_break_through(base)
        sys.argv = ["convert_hf_to_gguf.py", *ConvertJob(**job).argv()]
        script["main"]()


def _let_img_break_through(base) -> None:
    import conversion.llava as llava

    parent = base.MmprojModel.filter_tensors.__func__

    def filter_tensors(cls, item):
        if item[0].endswith("embed_tokens.weight"):
            return item  # LlavaVisionModel.modify_tensors keeps only the [IMG_BREAK] row
        return parent(cls, item)

    llava.LlavaVisionModel.filter_tensors = classmethod(filter_tensors)


def main(argv: list[str]) -> int:
    if argv[:1] == ["fetch"]:
        print(converter_root())
        return 0
    if argv[:1] == ["convert"] and len(argv) == 2:
        _run_jobs(json.loads(argv[1]))
        return 0
    print("usage: converter.py fetch | convert SPEC_JSON", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
