"""A test run that outlives one native crash of a worker (a pytest plugin; `tests/conftest.py`
imports its hooks).

Why: the suite runs on pytest-xdist with `--dist loadfile`. A worker process that dies in native
code (seen about once in three full runs: a segfault in XLA:CPU or the unwinder, not
reproduced in isolation; README, "Tests") is replaced, but pytest-xdist's loadfile scheduler
(3.8) then puts the dead worker's whole file back in the queue, the tests already done
included, and can hand the replacement a single test, which a worker never starts (it waits
for the next one first): the run waits forever and ends at CI's time limit with no summary.

What this changes, under `--dist loadfile` only:

- the dead worker's file goes back in the queue without the tests it finished;
- the test it died in runs once more, on a fresh worker, and is reported as a rerun (`R`,
  and a line in the summary with the worker's death); dying in it a second time fails it, as
  pytest-xdist would have on the first;
- a worker holding one test that cannot get a second is told to stop, which makes it run that
  test (no wait).

A test that fails (an assertion, an exception, a timeout) is never rerun: only a worker's death
is, and the faulthandler report of that death stays in the run's output.
"""

from __future__ import annotations

from xdist.scheduler import LoadFileScheduling

RERUNS = 1  # how many times a test a worker died in is run again on a fresh worker
OUTCOME = "rerun"


class CrashSafeLoadFile(LoadFileScheduling):
    """pytest-xdist's loadfile scheduling with a dead worker's file re-queued correctly."""

    def __init__(self, config, log=None) -> None:
        super().__init__(config, log)
        self.deaths: dict[str, int] = {}  # nodeid -> workers that died running it

    def will_rerun(self, nodeid: str) -> bool:
        return 0 < self.deaths.get(nodeid, 0) <= RERUNS

    def remove_node(self, node):
        workload = self.assigned_work.pop(node)
        left = {
            scope: [nodeid for nodeid, done in unit.items() if not done]
            for scope, unit in workload.items()
        }
        left = {scope: ids for scope, ids in left.items() if ids}
        if not left:
            return None  # a worker that finished its work and stopped
        # A worker runs its tests in the order they were given: the first one not done is the
        # one it died in.
        crashitem = next(iter(left.values()))[0]
        self.deaths[crashitem] = self.deaths.get(crashitem, 0) + 1
        if not self.will_rerun(crashitem):
            next(iter(left.values())).remove(crashitem)
        for scope, ids in reversed(list(left.items())):
            if ids:
                self.workqueue[scope] = dict.fromkeys(ids, False)
                self.workqueue.move_to_end(scope, last=False)
        for other in self.assigned_work:
            self._reschedule(other)
        return crashitem

    def _reschedule(self, node) -> None:
        super()._reschedule(node)
        # A worker starts a test only once it holds the next one (or is told to stop): one
        # that holds a single test gets more work, or the order to stop.
        while node in self.assigned_work and not node.shutting_down:
            if self._pending_of(self.assigned_work[node]) >= 2:
                break
            if self.workqueue:
                self._assign_work_unit(node)
            else:
                node.shutdown()


def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") == "loadfile":
        return CrashSafeLoadFile(config, log)
    return None


def pytest_handlecrashitem(crashitem, report, sched):
    if isinstance(sched, CrashSafeLoadFile) and sched.will_rerun(crashitem):
        report.outcome = OUTCOME
        report.longrepr = f"{report.longrepr}; running it again on a fresh worker"


def pytest_report_teststatus(report, config):
    if report.outcome == OUTCOME:
        return OUTCOME, "R", ("RERUN", {"yellow": True})
    return None


def pytest_terminal_summary(terminalreporter):
    reruns = terminalreporter.stats.get(OUTCOME, [])
    if reruns:
        terminalreporter.write_sep("=", "workers that died (each test run again once)", red=True)
        for report in reruns:
            terminalreporter.write_line(f"RERUN {report.nodeid}: {report.longrepr}")
