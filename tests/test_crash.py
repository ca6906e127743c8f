"""A native crash stays a crash: apache-tvm-ffi's handler (loaded by xgrammar) is replaced by
the process's own, so the process dies with faulthandler's report (it hung before)."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="sigaction via ctypes: Linux")

SCRIPT = """
import ctypes, faulthandler, signal, sys
faulthandler.enable()
from tsjax import crash
import xgrammar  # directly: tvm-ffi installs its handlers
libc = ctypes.CDLL(None)
buf = ctypes.create_string_buffer(256)
libc.sigaction(signal.SIGSEGV, None, buf)
print("before", crash._library_of(buf), flush=True)
print("replaced", crash.keep(), flush=True)
libc.sigaction(signal.SIGSEGV, None, buf)
print("after", crash._library_of(buf), flush=True)
if sys.argv[1] == "crash":
    ctypes.string_at(0)
"""


def _run(mode: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=120
    )


def test_keep_puts_back_the_process_handler_and_a_crash_dies():
    ok = _run("check")
    assert ok.returncode == 0, ok.stderr
    lines = dict(line.split(" ", 1) for line in ok.stdout.splitlines())
    assert "tvm_ffi" in lines["before"]  # what xgrammar's import did
    assert int(lines["replaced"]) >= 1 and "tvm_ffi" not in lines["after"]
    crashed = _run("crash")
    assert crashed.returncode == -11, crashed.stderr  # died of SIGSEGV: no hang, no exit 0
    assert "Fatal Python error: Segmentation fault" in crashed.stderr
    assert "Segfault encountered" not in crashed.stderr + crashed.stdout
