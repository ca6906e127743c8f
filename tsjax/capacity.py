"""How many cache rows (requests decoded together) a server gets by default, from the model
and the machine: the KV cache one row needs, the memory free at start, and the cores.

Why these bounds (benchmarks/ISSUE16_FINDINGS.md, section 4, and BENCHMARKS.md):
- memory: a row holds its whole context's keys and values (SmolLM2 at 2048 positions,
  float32: 94 MB); the cache may take a quarter of the memory available at start, leaving the
  rest to the params, the compiled programs and the rest of the machine;
- cores: on CPU, decode of more rows is nearly free while it is bound by reading the weights
  and stops paying once the step is compute-bound: 16 rows on 2 cores cost 30% less CPU per
  token than 8 (`python -m benchmarks.dispatch_cost --rows 16`), so 8 rows per core;
- a power of two, since the decode buckets are (1, 4, 16, ...), and at most `MAX_ROWS`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

#: Share of the memory available at start the default cache may take.
MEMORY_SHARE = 0.25
#: Rows per CPU core (see the module docstring).
ROWS_PER_CORE = 8
MAX_ROWS = 64


@dataclass(frozen=True)
class RowsChoice:
    rows: int
    reason: str  # for the start-up line: how the count was chosen


def kv_bytes_per_row(n_layers: int, n_kv_heads: int, head_dim: int, max_len: int,
                     itemsize: int) -> int:  # fmt: skip
    """Keys and values of one cache row: every layer as global attention (sliding-window and
    recurrent layers hold less, so this is an upper bound)."""
    return max_len * 2 * n_layers * n_kv_heads * head_dim * itemsize


def memory_available() -> int:
    """MemAvailable from /proc/meminfo in bytes (0 if unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def cpu_cores() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _pow2_floor(n: int) -> int:
    return 1 << (max(n, 1).bit_length() - 1)


def choose_rows(kv_row: int, memory: int, cores: int | None) -> RowsChoice:
    """Default rows for a cache row of `kv_row` bytes, `memory` bytes available for the
    server (MemAvailable on CPU, device memory on an accelerator; 0: unknown) and `cores` CPU
    cores (None on an accelerator: memory alone bounds it): the largest power of two within
    `MEMORY_SHARE` of the memory and `ROWS_PER_CORE` per core, 1 to `MAX_ROWS`."""
    limits = [MAX_ROWS]
    why = [f"at most {MAX_ROWS}"]
    if memory > 0:
        by_memory = int(MEMORY_SHARE * memory) // max(kv_row, 1)
        limits.append(by_memory)
        why.append(f"{by_memory} fit {MEMORY_SHARE:.0%} of {memory / 2**30:.1f} GiB free"
                   f" at {kv_row / 2**20:.0f} MiB KV per row")  # fmt: skip
    if cores is not None:
        limits.append(ROWS_PER_CORE * cores)
        why.append(f"{ROWS_PER_CORE} per core x {cores} cores")
    rows = _pow2_floor(min(limits))
    return RowsChoice(rows, "auto: " + "; ".join(why) + " (--rows overrides)")
