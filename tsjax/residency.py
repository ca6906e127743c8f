"""This process's resident memory: how much it holds (`resident_bytes`) and giving back what
the C allocator keeps after freeing (`release_free_memory`).

Why the second: compiling and loading XLA executables frees most of what it allocates, but
glibc keeps freed memory in its arenas (fragmented, never returned on its own): after the
server's warm-up 1.3-1.4 GB of the 6.2 GB it held were such free memory, and
`malloc_trim(0)` gave them back (6155 -> 4799 MB, benchmarks/ISSUE16_FINDINGS.md, section 1).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from functools import cache


@cache
def _libc():
    name = ctypes.util.find_library("c")
    try:
        lib = ctypes.CDLL(name)
        lib.malloc_trim.argtypes = [ctypes.c_size_t]
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
