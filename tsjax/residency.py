"""This process's resident memory: how much it holds (`resident_bytes`) and giving back what
the C allocator keeps after freeing (`release_free_memory`).

Why the second: compiling and loading XLA executables frees most of what it allocates, but
glibc keeps freed memory in its arenas (fragmented, never returned on its own): after the
server's warm-up 1.3-1.4 GB of the 6.2 GB it held were such free memory, and
`malloc_trim(0)` gave them back (6155 -> 4799 MB, benchmarks/ISSUE16_FINDINGS.md, section 1).

And `zeros`: a zeroed buffer whose pages are given back as soon as it is made, so that the
KV cache and recurrent state checkpoints are resident only where they have been written (a
server with 16 rows x 2048 positions reserves 1.44 GB of SmolLM2 cache, and holds what its
conversations reached).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Callable, Sequence
from functools import cache

import jax
import jax.numpy as jnp

_MADV_DONTNEED = 4  # Linux: private anonymous pages read back as zeros, untouched


@cache
def _libc():
    name = ctypes.util.find_library("c")
    try:
        lib = ctypes.CDLL(name)
        lib.malloc_trim.argtypes = [ctypes.c_size_t]
        lib.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        return lib
    except (OSError, AttributeError, TypeError):  # not glibc (musl, macOS): nothing to trim
        return None


def release_free_memory() -> bool:
    """Return the allocator's free memory to the OS (glibc `malloc_trim(0)`; a no-op
    elsewhere). Takes ~10-100 ms on a few GB of heap. True if anything was given back."""
    lib = _libc()
    return bool(lib.malloc_trim(0)) if lib is not None else False


def resident_bytes(pid: int | str = "self") -> int:
    """Resident set size of a process (this one by default) in bytes, 0 where /proc has no
    answer (not Linux, or the process is gone)."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def peak_resident_bytes() -> int:
    """This process's peak resident set size so far (VmHWM) in bytes, 0 if unknown."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def memory_maps() -> int:
    """How many memory mappings this process has (0 where /proc has no answer). XLA:CPU maps
    every compiled kernel's code on pages of its own (three mappings per kernel; ~600 for a
    SmolLM2 step program), and Linux refuses a process more than `max_memory_maps()`: past
    that, allocations fail, and a compile has segfaulted."""
    try:
        with open("/proc/self/maps", "rb") as f:
            return sum(1 for _ in f)
    except OSError:
        return 0


def max_memory_maps() -> int:
    """Linux's limit on a process's memory mappings (`vm.max_map_count`; 65530 unless
    raised), or that default where it cannot be read."""
    try:
        with open("/proc/sys/vm/max_map_count") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 65530


def zeros(shape, dtype) -> jax.Array:
    """`jnp.zeros(shape, dtype)`, its memory not resident until written where it lives in host
    memory (XLA:CPU on Linux): the whole pages inside each buffer are handed back to the OS
    with `madvise(MADV_DONTNEED)`, after which they read as zeros (the kernel's shared zero
    page) and take memory again only when a step writes into them. Elsewhere (accelerators,
    other systems, inside a trace) a plain `jnp.zeros`."""
    return zeros_many([tuple(shape)], dtype)[0]


@cache
def _zeros_program(shapes: tuple[tuple[int, ...], ...], dtype) -> Callable:
    return jax.jit(lambda: tuple(jnp.zeros(s, dtype) for s in shapes))


def zeros_many(shapes: Sequence[tuple[int, ...]], dtype) -> tuple[jax.Array, ...]:
    """`zeros` of several shapes made by one dispatch (a cache layer's dozens of blocks: one
    eager `jnp.zeros` each cost ~6 ms, 2.6 s of a SmolLM2 server's start)."""
    shapes = tuple(tuple(int(d) for d in s) for s in shapes)
    probe = jnp.zeros((), dtype)
    if isinstance(probe, jax.core.Tracer):  # inside a trace: nothing is allocated yet
        return tuple(jnp.zeros(s, dtype) for s in shapes)
    out = _zeros_program(shapes, jnp.dtype(dtype))()
    lib = _libc()
    if lib is None or os.uname().sysname != "Linux":
        return out
    page = os.sysconf("SC_PAGE_SIZE")
    for x in out:
        x.block_until_ready()
        bufs = [s.data for s in x.addressable_shards] if len(x.devices()) > 1 else [x]
        for buf in bufs:
            if buf.nbytes < 2 * page or next(iter(buf.devices())).platform != "cpu":
                continue
            start = buf.unsafe_buffer_pointer()
            lo, hi = -(-start // page) * page, (start + buf.nbytes) // page * page
            if hi > lo:
                lib.madvise(lo, hi - lo, _MADV_DONTNEED)  # failure only leaves it resident
    return out
