"""The compiled programs of the steps, one per static shape, and when they are compiled: ahead
(warm-up), on first use, or in a background thread while a bigger program that covers the
shape serves in its place (`tsjax.steps.Steps` decides which shapes cover which).

Why: every shape is its own XLA executable (the unrolled layer loop makes them big: 10-56k
HLO instructions, 50-240 MB of host memory and 1-12 s to trace, lower and load each for
SmolLM2, benchmarks/ISSUE16_FINDINGS.md). Compiling all of them before serving took minutes
and gigabytes; compiling only what requests reach keeps both proportional to use.

A key is a tuple (kind, *static sizes), e.g. ("decode", rows, attn_len, max_steps). `lower`
turns a key into a `jax.stages.Lowered` from abstract inputs only (no buffers), so a
background compile never touches the live cache.

The compiled programs of every live `Programs` together stay within a share of the process's
memory mappings (`MAPS_SHARE` of Linux's vm.max_map_count): XLA:CPU maps each compiled kernel
on pages of its own (about 600 mappings per SmolLM2 step program), a process past the limit
cannot allocate, and a test worker that got there segfaulted in a compile. Past the budget the
least recently used programs are dropped, with a warning; a dropped shape compiles again on its
next use. A `Programs` no longer referenced is freed with its executables: its background
thread exits when idle (`IDLE_EXIT_S`) and holds it only meanwhile.

In the background, XLA's compile runs on a thread of low CPU priority (`os.setpriority` on its
own thread id, Linux), so on a small machine the steps being served keep the cores; tracing
and lowering, which hold the GIL, stay at normal priority (a starved thread holding the GIL
stalls every other one), and that GIL time is what a background compile still costs.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax

from tsjax import crash
from tsjax.residency import max_memory_maps, memory_maps

log = logging.getLogger("tsjax.programs")

Key = tuple[Any, ...]
#: The background thread's nice value: well below the serving threads, not starved outright
#: on a busy machine (19 got it next to no CPU beside other busy processes).
NICE = 10
#: Lowers one key from abstract inputs (called on whichever thread compiles it).
Lower = Callable[[Key], "jax.stages.Lowered"]
#: The share of the process's memory mappings (vm.max_map_count) compiled programs may fill
#: before the least recently used are dropped.
MAPS_SHARE = 0.5
#: Seconds the background thread waits for work before it exits (a new request starts one).
IDLE_EXIT_S = 10.0

_LIVE: weakref.WeakSet[Programs] = weakref.WeakSet()  # every Programs not yet freed
_live_lock = threading.Lock()
_uses = itertools.count()  # a global clock of program uses: least recently used goes first

# One XLA compile at a time in this process. With the persistent compilation cache on, JAX
# serializes each executable it compiled; a full test run aborted (SIGABRT, in native code)
# while one thread serialized an executable and another compiled the image encoder, and
# XLA:CPU's serialization has failed us before (a re-serialized executable missing a
# function). Not proven to be the cause, but on CPU two compiles at once only share the cores
# anyway; tracing and lowering (Python, under the GIL) still overlap a compile.
_COMPILE_LOCK = threading.Lock()


def compile_lowered(lowered: jax.stages.Lowered) -> Any:
    """`lowered.compile()`, one at a time in this process (see `_COMPILE_LOCK`), with the
    process's own crash handlers in place (`tsjax.crash`: a crash inside a compile hung a
    process whose handler was apache-tvm-ffi's)."""
    with _COMPILE_LOCK:
        crash.keep()
        return lowered.compile()


class Programs:
    """Compiled executables by key: `get`, `compile` (now, on this thread) and `request`
    (in the background, low priority). Thread-safe; a key is compiled once even when the
    background thread and a caller want it at the same time."""

    def __init__(self, lower: Lower, after_compile: Callable[[], None] | None = None):
        self._lower = lower
        self._after = after_compile  # e.g. give the compiler's freed memory back to the OS
        self._done: dict[Key, Any] = {}
        self._used: dict[Key, int] = {}  # key -> `_uses` tick of its last get or compile
        self._busy: dict[Key, threading.Event] = {}  # being compiled, by any thread
        self._queue: deque[Key] = deque()
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._xla: ThreadPoolExecutor | None = None
        self._closed = False
        #: (key, "ahead" | "demand" | "background", seconds) per compile, in order
        self.history: list[tuple[Key, str, float]] = []
        #: keys dropped to stay within the memory-map budget, in order
        self.dropped: list[Key] = []
        with _live_lock:
            _LIVE.add(self)

    def __contains__(self, key: Key) -> bool:
        with self._cv:
            return key in self._done

    def keys(self) -> list[Key]:
        with self._cv:
            return list(self._done)

    def pending(self) -> int:
        """Programs queued for or being compiled (on any thread)."""
        with self._cv:
            return len(self._queue) + len(self._busy)

    def get(self, key: Key) -> Any | None:
        with self._cv:
            exe = self._done.get(key)
            if exe is not None:
                self._used[key] = next(_uses)
            return exe

    def compile(self, key: Key, why: str = "demand") -> Any:
        """The executable for `key`, compiling it on this thread if nobody has (waiting for
        the background thread if it is compiling the same key)."""
        while True:
            with self._cv:
                if key in self._done:
                    self._used[key] = next(_uses)
                    return self._done[key]
                event = self._busy.get(key)
                if event is None:
                    event = self._busy[key] = threading.Event()
                    break
            event.wait()  # someone else compiles it; it may also have failed: look again
        try:
            t0 = time.perf_counter()
            lowered = self._lower(key)
            if why == "background":  # XLA's compile at low priority, on its own thread
                exe = self._niced().submit(compile_lowered, lowered).result()
            else:
                exe = compile_lowered(lowered)
            secs = time.perf_counter() - t0
            with self._cv:
                self._done[key] = exe
                self._used[key] = next(_uses)
                self.history.append((key, why, secs))
            if why != "ahead":
                log.info("compiled %s %s in %.1fs", why, key, secs)
        finally:
            with self._cv:
                self._busy.pop(key, None)
            event.set()
        _within_maps_budget(keep=(self, key))
        if self._after is not None:
            self._after()
        return exe

    def _drop(self, key: Key) -> None:
        """Forget `key`'s executable (freed once no running step holds it)."""
        with self._cv:
            if self._done.pop(key, None) is not None:
                self._used.pop(key, None)
                self.dropped.append(key)

    def request(self, key: Key, soon: bool = False) -> None:
        """Compile `key` in the background (no-op if compiled or being compiled). `soon`: a
        running request will need it (a growing answer's next attention bucket): it goes
        ahead of the queue, which otherwise compiles in the order asked."""
        with self._cv:
            if self._closed or key in self._done or key in self._busy:
                return
            if key in self._queue:
                if not soon:
                    return
                self._queue.remove(key)
            if soon:
                self._queue.appendleft(key)
            else:
                self._queue.append(key)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._work, name="tsjax-compile", daemon=True
                )
                self._thread.start()
            self._cv.notify_all()

    def idle(self, timeout: float | None = None) -> bool:
        """Wait until nothing is queued or compiling in the background; False on timeout."""
        end = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            while self._queue or self._busy:
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cv.wait(timeout=0.05 if left is None else min(left, 0.05))
        return True

    def close(self, timeout: float = 120.0) -> None:
        """Stop the background thread after the compile it is in (queued keys are dropped):
        an XLA compile still running at interpreter exit can crash it."""
        with self._cv:
            self._closed = True
            self._queue.clear()
            self._cv.notify_all()
            thread, xla = self._thread, self._xla
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        if xla is not None:
            xla.shutdown(wait=True)

    def _niced(self) -> ThreadPoolExecutor:
        """The one thread that runs background XLA compiles, at nice `NICE` (Linux: a thread's
        nice value is its own, and threads it starts inherit it)."""
        with self._cv:
            if self._xla is None:
                self._xla = ThreadPoolExecutor(1, "tsjax-xla", initializer=_lower_priority)
            return self._xla

    def _work(self) -> None:
        # This thread traces and lowers at normal priority: it holds the GIL meanwhile, and a
        # low-priority thread holding the GIL stalls every serving thread that waits for it
        # (on a busy machine, for minutes). Only XLA's compile, which releases the GIL, runs
        # niced (`_niced`).
        while True:
            with self._cv:
                if not self._queue and not self._closed:
                    self._cv.wait(IDLE_EXIT_S)
                if self._closed or not self._queue:  # closed, or idle: `request` starts
                    self._thread = None  # another; meanwhile nothing holds this object
                    return
                key = self._queue.popleft()
            try:
                self.compile(key, "background")
            except Exception as e:  # the step that needs it compiles it on demand, raises there
                if "after shutdown" in str(e):  # the interpreter is exiting: its executors
                    return  # shut down before atexit's `close` runs
                if not self._closed:  # (closing: the XLA thread refuses new work)
                    log.exception("background compile of %s failed", key)
            with self._cv:
                self._cv.notify_all()


def _within_maps_budget(keep: tuple[Programs, Key]) -> None:
    """Drop the least recently used programs of every live `Programs` (but `keep`) while the
    process holds more memory mappings than `MAPS_SHARE` of Linux's limit."""
    limit = int(max_memory_maps() * MAPS_SHARE)
    maps = memory_maps()
    while maps > limit:
        candidates = []
        with _live_lock:
            live = list(_LIVE)
        for programs in live:
            with programs._cv:
                candidates += [(t, programs, k) for k, t in programs._used.items()]
        candidates = [c for c in candidates if c[1:] != keep]
        if not candidates:
            return
        _, programs, key = min(candidates, key=lambda c: c[0])  # ticks are unique
        programs._drop(key)
        now = memory_maps()
        log.warning(
            "dropped compiled program %s to stay within the memory-map budget (%d mappings "
            "before, %d after, budget %d of vm.max_map_count %d): it compiles again when "
            "next used",
            key, maps, now, limit, max_memory_maps(),
        )  # fmt: skip
        maps = now


@atexit.register
def _close_all() -> None:
    """At interpreter exit, stop every background compile (an XLA compile still running at
    exit can crash the interpreter)."""
    with _live_lock:
        live = list(_LIVE)
    for programs in live:
        programs.close()


def _lower_priority() -> None:
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICE)
    except (AttributeError, OSError):
        pass
