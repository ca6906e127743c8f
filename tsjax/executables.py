"""Compiled step programs kept on disk between processes, under a digest of what they were
traced from, so a warm start neither traces, lowers nor compiles them.

    store = ExecutableStore(directory, context)   # context: everything the traces read
    exe = store.load(key)                          # a `jax.stages.Compiled`, or None
    store.save(key, exe)

Why: JAX's persistent compilation cache (`tsjax.catalog.enable_compilation_cache`) skips
XLA's compile, but its key is the lowered program, so every start still traces and lowers
each step: for SmolLM2's 30 unrolled layers about 3 s a program on a 2-core CPU, most of a
warm start. Here the key is the step key plus a `context` string that `tsjax.steps.Steps`
builds from every input of its traces: the abstract params, cache and sampler (shapes, dtypes,
shardings), the model config and decoder, the step shapes and layout, the stop ids, the CPU
kernels' library, the jax and jaxlib versions, the backend and its devices, the JAX_*, XLA_*
and TSJAX_* environment, and the digest of tsjax's own source files (`source_digest`). Any
change among them is another file, never a stale program.

Files are `jax.experimental.serialize_executable` payloads (pickled with their input and
output tree structures), written to a temporary name and renamed, so a reader never sees half
a file. One that fails to load (another jaxlib build, a truncated disk) is removed and the
program compiled as usual. Only single-device steps use a store: a mesh's executables are
left to the persistent cache. It is on wherever the persistent cache is
(`tsjax.catalog.compilation_cache_dir`: `<cache>/executables`); TSJAX_PROGRAM_STORE=DIR puts
it in DIR, =off turns it off (the test suite does: its tests patch backends and kernels
inside one process). Loading a file runs code from it (pickle): the directory must be as
trusted as the program itself, like JAX's own cache directory.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import jax

log = logging.getLogger("tsjax.executables")

#: Values of TSJAX_PROGRAM_STORE that turn the store off.
OFF = ("0", "off", "false", "no")
#: The environment variables whose values can change what a step traces to.
ENV_PREFIXES = ("JAX_", "XLA_", "TSJAX_")


@functools.cache
def source_digest() -> str:
    """sha256 over the path and bytes of every .py and .cc file in the tsjax package."""
    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.suffix in (".py", ".cc")):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def environment() -> str:
    """The JAX_*, XLA_* and TSJAX_* variables and the versions and devices of this process."""
    import jaxlib

    env = sorted((k, v) for k, v in os.environ.items() if k.startswith(ENV_PREFIXES))
    devices = [(d.platform, d.device_kind) for d in jax.devices()]
    return repr((jax.__version__, jaxlib.__version__, jax.default_backend(), devices, env))


class ExecutableStore:
    """Serialized executables in `directory`, one file per (context, key)."""

    def __init__(self, directory: Path, context: str):
        self.directory = Path(directory)
        self._context = hashlib.sha256(
            (context + "\0" + environment() + "\0" + source_digest()).encode()
        ).hexdigest()
        self.loaded = 0  # files loaded by this process
        self.saved = 0

    def path(self, key: tuple) -> Path:
        digest = hashlib.sha256((self._context + repr(key)).encode()).hexdigest()[:32]
        return self.directory / f"{key[0]}-{digest}.exe"

    def load(self, key: tuple) -> Any | None:
        """The stored executable of `key`, or None (absent, or unreadable: then removed)."""
        from jax.experimental.serialize_executable import deserialize_and_load

        path = self.path(key)
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            log.warning("cannot read stored program %s: %s", path, e)
            return None
        try:
            payload, in_tree, out_tree = pickle.loads(blob)
            exe = deserialize_and_load(payload, in_tree, out_tree)
        except Exception as e:  # any failure means: compile it instead
            log.warning("stored program %s does not load (%s); compiling it", path.name, e)
            path.unlink(missing_ok=True)
            return None
        self.loaded += 1
        return exe

    def save(self, key: tuple, exe: Any) -> None:
        """Write `exe` for `key` (best effort: a program that cannot be serialized, or a disk
        that cannot take it, only means the next start compiles it again)."""
        from jax.experimental.serialize_executable import serialize

        try:
            blob = pickle.dumps(serialize(exe))
            self.directory.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(blob)
                os.replace(tmp, self.path(key))
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        except Exception as e:
            log.info("program %s not stored: %s", key, e)
            return
        self.saved += 1
