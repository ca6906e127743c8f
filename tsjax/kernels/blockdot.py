"""The CPU kernels of `blockdot.cc`, built on first use and called from jitted code through
`jax.ffi`: block-quantized matmuls, and attention over the blocked KV cache.

The C++ source ships with the package and is compiled once per machine with the system's C++
compiler (`$CXX`, else g++, c++ or clang++; ~8 s) against JAX's FFI headers, for this CPU
(`-march=native`), into `~/.cache/tsjax/kernels/` (`TSJAX_KERNEL_CACHE=DIR` moves it). The
library's name carries a hash of the source, the compiler, jaxlib's version and the CPU's
feature flags, so a change of any of them builds a new one, and concurrent first uses do not
collide (each writes a temporary file and renames it). Without a compiler, or with
`TSJAX_KERNELS=off`, `available()` is False and the caller takes another path.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger("tsjax")

SOURCE = Path(__file__).with_name("blockdot.cc")
TARGETS = {
    "tsjax_q8_matmul": "TsjaxQ8Matmul",
    "tsjax_q4_matmul": "TsjaxQ4Matmul",
    "tsjax_attention": "TsjaxAttention",
}


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def cache_dir() -> Path:
    return Path(os.environ.get("TSJAX_KERNEL_CACHE", Path.home() / ".cache/tsjax/kernels"))


def build(cxx: str, out_dir: Path, march: str = "native") -> tuple[Path, bool]:
    """Compile `blockdot.cc` with `cxx` for `-march=<march>` into `out_dir` (if not there yet);
    the library's path and whether it was compiled now. Tests build other instruction sets
    than this CPU's ("x86-64": the portable C++ path, "sapphirerapids": AVX512-VNNI) to check
    that they compile and, where this CPU runs them, that they compute the same."""
    import jaxlib

    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(
        b"\0".join(
            s.encode() if isinstance(s, str) else s
            for s in (SOURCE.read_bytes(), version, jaxlib.__version__, _cpu_flags(), march)
        )
    ).hexdigest()[:16]
    lib = out_dir / f"libblockdot-{key}.so"
    if lib.exists():
        return lib, False
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    cmd = [cxx, "-O3", f"-march={march}", "-std=c++17", "-shared", "-fPIC", "-w", str(SOURCE)]
    cmd += ["-I", jax.ffi.include_dir(), "-o", tmp]
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        os.replace(tmp, lib)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib, True


_BUILD_SECONDS: list[float] = []  # compile time spent by this process (empty: cache hit)


def build_seconds() -> float | None:
    """Seconds this process spent compiling the kernels (None: found in the cache, or not
    built): what a first start on a fresh machine pays once."""
    return _BUILD_SECONDS[0] if _BUILD_SECONDS else None


@functools.cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get("TSJAX_KERNELS", "").lower() in ("0", "off", "false", "no"):
        return None
    cxx = _compiler()
    if cxx is None:
        log.warning("no C++ compiler found: the block-quantized CPU matmuls are unavailable")
        return None
    try:
        t0 = time.perf_counter()
        path, built = build(cxx, cache_dir())
        if built:
            _BUILD_SECONDS.append(time.perf_counter() - t0)
            log.info("built the block-quantized CPU matmuls in %.1fs: %s", _BUILD_SECONDS[0], path)
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        log.warning("building the block-quantized CPU matmuls failed: %s", detail[-2000:])
        return None
    for target, symbol in TARGETS.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), "cpu")
    lib.tsjax_blockdot_isa.restype = ctypes.c_char_p
    return lib


def available() -> bool:
    """Whether the kernels are built (or buildable now) and registered with XLA:CPU."""
    return _library() is not None


def isa() -> str | None:
    """The instruction set the kernels were compiled for ("avx512-vnni", "avx2", ...)."""
    lib = _library()
    return lib.tsjax_blockdot_isa().decode() if lib is not None else None


def _call(target: str, x: jax.Array, n: int, *weights: jax.Array) -> jax.Array:
    if not available():
        raise RuntimeError("the block-quantized CPU matmuls are not available (see the log)")
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(int(np.prod(lead, dtype=np.int64)), k).astype(jnp.float32)
    out = jax.ShapeDtypeStruct((x2.shape[0], n), jnp.float32)
    y = jax.ffi.ffi_call(target, out)(x2, *weights)
    return y.reshape(*lead, n)


def q8_matmul(x: jax.Array, q: jax.Array, d: jax.Array) -> jax.Array:
    """x [..., K] float @ W^T, W [N, K] = int8 `q` [N, K] x float16 block scales `d` [K/32, N]
    -> [..., N] float32 (activations quantized to int8 per block of 32 inside)."""
    return _call("tsjax_q8_matmul", x, q.shape[0], q, d)


def q4_matmul(x: jax.Array, qs: jax.Array, d: jax.Array, m: jax.Array) -> jax.Array:
    """x [..., K] float @ W^T, W [N, K] in 4-bit blocks of 32 (`qs` uint8 [N, K/2], scale `d`
    and offset `m` float16 [K/32, N]: w = d q + m) -> [..., N] float32."""
    return _call("tsjax_q4_matmul", x, qs.shape[0], qs, d, m)


def attention(
    q: jax.Array,
    pos: jax.Array,
    rows: jax.Array,
    window: jax.Array,
    sinks: jax.Array | None,
    key_end: jax.Array | None,
    k_blocks: tuple[tuple[jax.Array, ...], ...],
    v_blocks: tuple[tuple[jax.Array, ...], ...],
    target: str = "tsjax_attention",
) -> jax.Array:
    """Attention of n rows of T query tokens, each against its own cache row's keys and values
    where they lie in the blocked cache: q [n, T, K, G, H] float32, already scaled; pos [n, T]
    the queries' positions (each sees the positions p <= pos, and p > pos - window where
    window > 0; p < key_end instead where `key_end` [n, T] is given); rows [n] their cache rows;
    sinks [K * G] sink logits or None; the key and value blocks (row blocks, each a tuple of
    position blocks [r, K, P_b, H] float32). Returns [n, T, K, G, H] float32 (zeros for a query
    that sees no position or whose row is outside the blocks). `target`: the FFI target (tests
    register other builds under other names)."""
    if not available():
        raise RuntimeError("the CPU kernels are not available (see the log)")
    empty = jnp.zeros((0,), jnp.int32)
    sinks = jnp.zeros((0,), jnp.float32) if sinks is None else sinks.reshape(-1)
    out = jax.ShapeDtypeStruct(q.shape, jnp.float32)
    return jax.ffi.ffi_call(target, out)(
        q.astype(jnp.float32),
        pos.astype(jnp.int32),
        rows.astype(jnp.int32),
        jnp.asarray(window, jnp.int32).reshape(()),
        sinks.astype(jnp.float32),
        empty if key_end is None else key_end.astype(jnp.int32),
        *(blk for rb in k_blocks for blk in rb),
        *(blk for rb in v_blocks for blk in rb),
        pos_blocks=np.int64(len(k_blocks[0])),
    )
