"""tests/crashsafe.py: a pytest-xdist run (`--dist loadfile`, two workers) whose workers die
in native code (SIGSEGV) finishes, runs every other test once, runs the test a worker died in
once more, and fails it when it kills a worker twice."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent

TEST_FILE = '''
import os, signal, time
from pathlib import Path

RUNS = Path(os.environ["CRASHSAFE_RUNS"])


def _ran(name):
    with RUNS.open("a") as f:
        f.write(f"{{__name__}}::{{name}}\\n")


def _die_unless_done(name, times):
    """SIGSEGV the worker the first `times` times this test runs."""
    flag = RUNS.parent / f"{{__name__}}-{{name}}.deaths"
    deaths = int(flag.read_text()) if flag.exists() else 0
    if deaths < times:
        flag.write_text(str(deaths + 1))
        os.kill(os.getpid(), signal.SIGSEGV)

{tests}
'''


def _tests(name: str, n: int, die: dict[int, int]) -> str:
    out = []
    for i in range(1, n + 1):
        body = f"    _ran('test_{name}{i}')\n    time.sleep(0.2)\n"
        if i in die:
            body += f"    _die_unless_done('test_{name}{i}', {die[i]})\n"
        out.append(f"def test_{name}{i}():\n{body}")
    return "\n\n".join(out)


def _run(tmp_path: Path, files: dict[str, tuple[int, dict[int, int]]]):
    for name, (n, die) in files.items():
        (tmp_path / f"test_{name}.py").write_text(TEST_FILE.format(tests=_tests(name, n, die)))
    runs = tmp_path / "runs.txt"
    env = dict(os.environ, CRASHSAFE_RUNS=str(runs), PYTHONPATH=str(HERE))
    args = [sys.executable, "-m", "pytest", "-p", "crashsafe", "-p", "no:cacheprovider"]
    args += ["-n", "2", "--dist", "loadfile", "-q", "-p", "no:randomly", str(tmp_path)]
    proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    ran = Counter(runs.read_text().split()) if runs.exists() else Counter()
    return proc, ran


@pytest.mark.timeout(240)
def test_a_dead_worker_reruns_its_test_once_and_the_run_finishes(tmp_path):
    # b3 dies once in the middle of its file, c1 dies once as its file's only test (the
    # replacement worker then holds a single test: the case pytest-xdist waited forever on)
    files = {"a": (4, {}), "b": (5, {3: 1}), "c": (1, {1: 1}), "d": (3, {})}
    proc, ran = _run(tmp_path, files)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "13 passed, 2 rerun" in out, out
    assert "RERUN test_b.py::test_b3" in out and "RERUN test_c.py::test_c1" in out, out
    assert ran.pop("test_b::test_b3") == 2 and ran.pop("test_c::test_c1") == 2, ran
    assert sorted(ran.values()) == [1] * 11, ran  # every other test exactly once


@pytest.mark.timeout(240)
def test_a_test_that_kills_two_workers_fails_and_the_rest_still_runs(tmp_path):
    files = {"a": (3, {2: 5}), "b": (4, {})}
    proc, ran = _run(tmp_path, files)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "1 failed, 6 passed, 1 rerun" in out, out
    assert "crashed while running 'test_a.py::test_a2'" in out, out
    assert ran.pop("test_a::test_a2") == 2, ran
    assert sorted(ran.values()) == [1] * 6, ran
