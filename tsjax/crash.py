"""Keeping a native crash a crash: apache-tvm-ffi (loaded by xgrammar) installs handlers for
the crash signals that print a backtrace with the unwinder, and that deadlocks when the crash
happened inside the unwinder. Seen three times: XLA's compile threw a C++ exception, the
unwinder segfaulted in `_Unwind_Find_FDE`, and tvm-ffi's handler waited forever on the
unwinder's lock, so the process hung (a test run ran into CI's limit) instead of dying or
printing Python's faulthandler report. The one such segfault caught in a core dump since was a
process at Linux's limit on memory mappings (65121 of 65530: XLA:CPU maps every compiled
kernel on its own pages), which `tsjax.programs` now keeps compiled programs well below.

`keep()` puts back, for each crash signal whose handler now lives in tvm-ffi's library, the
handler this process had when tsjax was first imported (faulthandler's, or the default: die).
Called after xgrammar's import and before every XLA compile: the handler also reached a test
process by a way not traced (it hung so while tsjax restored the handlers after its own
xgrammar import). Linux only; elsewhere it does nothing.
"""

from __future__ import annotations

import ctypes
import signal
import sys
import threading

SIGNALS = ("SIGSEGV", "SIGBUS", "SIGILL", "SIGFPE", "SIGABRT")
_FOREIGN = "tvm_ffi"  # a handler whose code lives in a library whose path holds this


class _DlInfo(ctypes.Structure):
    _fields_ = [
        ("fname", ctypes.c_char_p),
        ("fbase", ctypes.c_void_p),
        ("sname", ctypes.c_char_p),
        ("saddr", ctypes.c_void_p),
    ]


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def _handlers() -> dict[int, ctypes.Array]:
    """Each crash signal's current `struct sigaction` (raw bytes; 152 on x86-64)."""
    libc, out = _libc(), {}
    if libc is None:
        return out
    for name in SIGNALS:
        buf = ctypes.create_string_buffer(256)
        if libc.sigaction(int(getattr(signal, name)), None, buf) == 0:
            out[int(getattr(signal, name))] = buf
    return out


def _library_of(buf: ctypes.Array) -> str:
    """The path of the shared object holding a sigaction's handler, "" if none."""
    libc = _libc()
    addr = int.from_bytes(buf.raw[: ctypes.sizeof(ctypes.c_void_p)], sys.byteorder)
    info = _DlInfo()
    if libc is None or addr < 4096 or not libc.dladdr(ctypes.c_void_p(addr), ctypes.byref(info)):
        return ""  # SIG_DFL / SIG_IGN, or not in a loaded object
    return (info.fname or b"").decode(errors="replace")


_ORIGINAL = _handlers()
_lock = threading.Lock()


def keep() -> int:
    """Replace tvm-ffi's crash handlers by the original ones; returns how many it replaced."""
    libc = _libc()
    if libc is None:
        return 0
    replaced = 0
    with _lock:
        for sig, now in _handlers().items():
            if _FOREIGN in _library_of(now) and sig in _ORIGINAL:
                if _FOREIGN not in _library_of(_ORIGINAL[sig]):
                    libc.sigaction(sig, _ORIGINAL[sig], None)
                    replaced += 1
    return replaced
