"""Process memory probes for the start-up and served-path benchmarks (Linux `/proc` only):
resident and peak memory, a sampling thread for the peak between two points, where the
resident pages lie (`/proc/<pid>/smaps`, grouped), and glibc's malloc state (`mallinfo2`:
bytes in use against bytes held free inside its arenas, which `malloc_trim` can return).

    python -m benchmarks.memory PID        # one process's resident memory, grouped

Nothing here imports JAX, so the served-path benchmark can watch a server from outside.
"""

from __future__ import annotations

import ctypes
import os
import re
import sys
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field

MB = 1e6


def status(pid: int | str = "self") -> dict[str, int]:
    """The byte counts of /proc/<pid>/status (VmRSS, VmHWM, RssAnon, RssFile, ...)."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            parts = rest.split()
            if len(parts) == 2 and parts[1] == "kB":
                out[key] = int(parts[0]) * 1024
    return out


def rss(pid: int | str = "self") -> int:
    """Resident bytes now."""
    return status(pid)["VmRSS"]


def reset_peak(pid: int | str = "self") -> bool:
    """Reset VmHWM (the kernel's peak-resident mark) to the current resident size, so the
    next `status()["VmHWM"]` is the peak since now. False where the kernel refuses."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@dataclass
class PeakSampler:
    """A thread that samples a process's resident memory every `interval` seconds: the peak
    between `start()` and `stop()` for processes whose VmHWM cannot be reset, and a timeline
    (seconds since start, bytes)."""

    pid: int | str = "self"
    interval: float = 0.05
    peak: int = 0
    timeline: list[tuple[float, int]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> PeakSampler:
        self._stop.clear()
        t0 = time.perf_counter()

        def run():
            while not self._stop.is_set():
                try:
                    now = rss(self.pid)
                except (FileNotFoundError, ProcessLookupError, KeyError):
                    return  # the process ended
                self.peak = max(self.peak, now)
                self.timeline.append((time.perf_counter() - t0, now))
                self._stop.wait(self.interval)

        self._thread = threading.Thread(target=run, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> int:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return self.peak


def _mapping_group(name: str) -> str:
    """A smaps mapping's group: the file's base name for files, else its kind."""
    if not name:
        return "[anon]"
    if name.startswith("["):
        return "[stack]" if name.startswith("[stack") else name
    base = name.rsplit("/", 1)[-1]
    if ".so" in base:
        return "shared libraries (.so)"
    if base.endswith(".gguf"):
        return "model file (mmap)"
    if "(deleted)" in name or name.startswith("/memfd:"):
        return "deleted/memfd"
    return "other files"


_HEADER = re.compile(r"^[0-9a-f]+-[0-9a-f]+ ")


def smaps_groups(pid: int | str = "self") -> dict[str, dict[str, int]]:
    """Resident bytes by mapping group (`_mapping_group`): {group: {"rss", "anon", "n"}},
    plus anonymous mappings bucketed by size, which tells allocator arenas (64 MiB regions
    reserved per thread arena) and large direct mmaps (buffers) apart."""
    groups: dict[str, dict[str, int]] = defaultdict(lambda: {"rss": 0, "anon": 0, "n": 0})
    current = None
    size = 0
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            if _HEADER.match(line):
                parts = line.split(maxsplit=5)
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                size = hi - lo
                name = parts[5].strip() if len(parts) > 5 else ""
                current = _mapping_group(name)
                if current == "[anon]":
                    current = _anon_bucket(size)
                groups[current]["n"] += 1
            elif line.startswith("Rss:") and current:
                groups[current]["rss"] += int(line.split()[1]) * 1024
            elif line.startswith("Anonymous:") and current:
                groups[current]["anon"] += int(line.split()[1]) * 1024
    return dict(groups)


def _anon_bucket(size: int) -> str:
    if size >= 256 << 20:
        return "[anon >= 256 MiB]"
    if size >= 16 << 20:
        return "[anon 16-256 MiB]"
    if size >= 1 << 20:
        return "[anon 1-16 MiB]"
    return "[anon < 1 MiB]"


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",  # bytes obtained with sbrk (main arena)
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",  # bytes in blocks obtained with mmap (big allocations)
            "usmblks",
            "fsmblks",
            "uordblks",  # bytes in use (all arenas)
            "fordblks",  # bytes free inside the arenas (held, not returned to the OS)
            "keepcost",
        )
    ]


def malloc_state() -> dict[str, int] | None:
    """glibc's mallinfo2 over every arena: `in_use`, `free_held` (free inside arenas),
    `mmapped` (direct mmaps), `arena` (arena bytes). None where glibc lacks mallinfo2 or
    another allocator is preloaded (its figures would be glibc's, not what is used)."""
    if "malloc" in os.environ.get("LD_PRELOAD", ""):
        return None  # jemalloc/tcmalloc: glibc's arenas are empty and say nothing
    try:
        libc = ctypes.CDLL("libc.so.6")
        fn = libc.mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2
    m = fn()
    return {
        "arena": m.arena,
        "in_use": m.uordblks,
        "free_held": m.fordblks,
        "mmapped": m.hblkhd,
    }


def malloc_trim() -> None:
    """Ask glibc to return free arena memory to the OS (no-op for other allocators)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def format_groups(groups: dict[str, dict[str, int]], top: int = 12) -> list[str]:
    """Markdown rows `| group | mappings | resident MB | anonymous MB |`, largest first."""
    rows = sorted(groups.items(), key=lambda kv: -kv[1]["rss"])[:top]
    return [
        f"| {name} | {g['n']} | {g['rss'] / MB:.0f} | {g['anon'] / MB:.0f} |" for name, g in rows
    ]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    pid = args[0] if args else "self"
    st = status(pid)
    print(f"VmRSS {st['VmRSS'] / MB:.0f} MB, VmHWM {st['VmHWM'] / MB:.0f} MB")
    print("| group | mappings | resident MB | anonymous MB |\n|---|---|---|---|")
    print("\n".join(format_groups(smaps_groups(pid))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
