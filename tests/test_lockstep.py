"""The lockstep command channel without a second process: process 0's `StepChannel` and a
follower thread share an in-memory stand-in for jax.distributed's key-value store, and each
side's `LocalRunner` runs fake steps that record what it ran. (tests/test_sharding.py runs
the real thing: `tsjax serve` as two processes.)"""

from __future__ import annotations

import threading

import pytest

from serve.engine import lockstep
from serve.engine.lockstep import BLOCK, StepChannel, announce_ready, follow
from tsjax.runner import LocalRunner


class MemoryStore:
    """The calls `lockstep` makes on jax.distributed's client, over a dict."""

    def __init__(self):
        self.data: dict[str, object] = {}
        self.cv = threading.Condition()
        self.sets = 0

    def key_value_set(self, key, value, allow_overwrite=False):
        with self.cv:
            assert allow_overwrite or key not in self.data, key
            self.data[key] = value
            self.cv.notify_all()

    def key_value_set_bytes(self, key, value, allow_overwrite=False):
        self.sets += 1
        self.key_value_set(key, value, allow_overwrite)

    def blocking_key_value_get(self, key, timeout_in_ms):
        with self.cv:
            if not self.cv.wait_for(lambda: key in self.data, timeout_in_ms / 1000):
                raise RuntimeError(f"DEADLINE_EXCEEDED: GetKeyValue() timed out with key: {key}")
            return self.data[key]

    blocking_key_value_get_bytes = blocking_key_value_get

    def key_value_dir_get(self, prefix):
        with self.cv:
            return [(k, v) for k, v in self.data.items() if k.startswith(prefix)]

    def key_value_delete(self, key):
        with self.cv:
            for k in [k for k in self.data if k == key or k.startswith(key + "/")]:
                del self.data[k]


class FakeSteps:
    """Steps whose cache and sampler are counters: each step returns the next ones, so a
    follower that skipped or reordered a command would end with different numbers. With a
    `barrier` shared by both sides, warmup/prefill/decode wait for each other the way an SPMD
    program's collectives do (process 0 cannot run ahead of its followers)."""

    shapes = "the shapes"

    def __init__(self, barrier: threading.Barrier | None = None, fail_decode: int = -1):
        self.calls: list[tuple] = []
        self.made = 0
        self.barrier = barrier
        self.fail_decode = fail_decode  # this side alone fails its decode call number N
        self.decodes = 0

    def _collective(self):
        if self.barrier is not None:
            self.barrier.wait(timeout=30)

    def _new(self):
        self.made += 1
        return [self.made]

    def new_cache(self):
        self.calls.append(("new_cache",))
        return self._new()

    def new_sampler(self):
        self.calls.append(("new_sampler",))
        return self._new()

    def warmup(self, params, decode_steps=(1,), max_prompt=None, batches=(1,), span_lens=()):
        self._collective()
        self.calls.append(("warmup", params, decode_steps, max_prompt))
        return 0.5

    def prefill(self, params, cache, sampler, prompts, rows, sampling, **kw):
        self._collective()
        if prompts == [[666]]:
            raise ValueError("a step that fails on every process")
        self.calls.append(("prefill", params, cache[0], sampler[0], prompts, rows, sampling, kw))
        return [len(prompts[0])], None, self._new(), self._new()

    def decode(
        self, params, cache, sampler, rows, tokens, max_pos, n_steps=1, masks=None, wait=True
    ):
        self._collective()
        self.decodes += 1
        if self.decodes == self.fail_decode:
            raise MemoryError("this process only")
        self.calls.append(("decode", params, cache[0], sampler[0], rows, tokens, max_pos, n_steps))
        out = [[t + 1 for t in tokens]] * n_steps
        return (out if wait else Pending(out)), None, self._new(), self._new()

    def swap_rows(self, params, cache, sampler, pairs):
        self._collective()
        self.calls.append(("swap_rows", params, cache[0], sampler[0], pairs))
        return None, None, self._new(), self._new()


class Pending:
    """What a decode that does not wait returns (`tsjax.steps.PendingTokens`'s `get`)."""

    def __init__(self, out):
        self.out = out

    def get(self):
        return self.out


def _engine_like(ch: StepChannel, n_decodes: int) -> None:
    """What the engine does through the channel: fresh state, warm-up (which ends in fresh
    state), a prefill, decodes; a failed step and the reset after it."""
    ch.reset()
    assert ch.warmup(decode_steps=(1, 4), max_prompt=16) == 0.5
    first = ch.prefill([[1, 2, 3]], [0], ["greedy"])
    tokens = [first[0]]
    for i in range(n_decodes):
        tokens = ch.decode([0], tokens, 3 + i, 1).get()[-1]
    ch.swap_rows([(0, 1)])
    with pytest.raises(ValueError, match="fails on every process"):
        ch.prefill([[666]], [0], ["greedy"])
    with pytest.raises(RuntimeError, match="reset"):  # the failed step took the state
        ch.decode([0], tokens, 9, 1)
    ch.reset()
    ch.decode([0], tokens, 9, 4)


def test_follower_replays_every_step_in_order(caplog, monkeypatch):
    monkeypatch.setattr(lockstep, "POLL_MS", 50)  # the follower sees idle timeouts too
    store = MemoryStore()
    barrier = threading.Barrier(2)
    leader_steps, follower_steps = FakeSteps(barrier), FakeSteps(barrier)
    ch = StepChannel(client=store, followers=1)
    result: list[int] = []
    follower_runner = LocalRunner(follower_steps, "follower params")
    follower = threading.Thread(
        target=lambda: result.append(follow(follower_runner, client=store, process=1))
    )
    follower.start()
    announce_ready(client=store, process=1)
    ch.attach(LocalRunner(leader_steps, "leader params"), ready_timeout_s=10)
    assert ch.shapes == "the shapes"  # the local runner's

    n_decodes = 3 * BLOCK  # enough commands for the follower to acknowledge whole blocks
    with caplog.at_level("ERROR", logger="tsjax.lockstep"):
        _engine_like(ch, n_decodes)
        ch.close()
        follower.join(timeout=30)
    assert result == [0]
    ch.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        ch.reset()

    # Same calls on both sides, each side with its own params and its own state.
    def strip(calls):
        return [tuple(x for x in c if x not in ("leader params", "follower params")) for c in calls]

    assert strip(follower_steps.calls) == strip(leader_steps.calls)
    assert next(c for c in follower_steps.calls if c[0] == "warmup")[1] == "follower params"
    assert len([c for c in leader_steps.calls if c[0] == "decode"]) == n_decodes + 1
    # The failed prefill failed on the follower as well, and it said so.
    assert any("PREFILL) failed" in r.getMessage() for r in caplog.records)
    # Acknowledged blocks are gone from the store; the last ones may remain.
    commands = [k for k in store.data if k.startswith(f"{lockstep.PREFIX}/cmd/")]
    assert store.sets > 3 * BLOCK and len(commands) <= 2 * BLOCK


def test_attach_reports_a_follower_that_failed_to_load():
    store = MemoryStore()
    announce_ready("model failed to load: no such file", client=store, process=1)
    with pytest.raises(RuntimeError, match="follower process 1: model failed to load"):
        runner = LocalRunner(FakeSteps(), "params")
        StepChannel(client=store, followers=1).attach(runner, ready_timeout_s=5)


def test_unattached_raises():
    store = MemoryStore()
    ch = StepChannel(client=store, followers=0)
    with pytest.raises(RuntimeError, match="attach"):
        ch.warmup()
    with pytest.raises(RuntimeError, match="attach"):
        ch.reset()
    assert store.sets == 0  # nothing was sent for a call that was refused
    ch.attach(LocalRunner(FakeSteps(), "params"))
    ch.reset()
    assert store.sets == 1


def _pair(store, leader_steps, follower_steps):
    ch = StepChannel(client=store, followers=1)
    result: list[int] = []
    runner = LocalRunner(follower_steps, "params")
    follower = threading.Thread(
        target=lambda: result.append(follow(runner, client=store, process=1))
    )
    follower.start()
    announce_ready(client=store, process=1)
    ch.attach(LocalRunner(leader_steps, "params"), ready_timeout_s=10)
    ch.reset()
    return ch, follower, result


def test_follower_leaves_when_only_it_failed_a_step(caplog):
    store = MemoryStore()
    ch, follower, result = _pair(store, FakeSteps(), FakeSteps(fail_decode=2))
    for i in range(3):
        ch.decode([0], [1], i, 1)
    follower.join(timeout=30)
    assert result == [2]  # it saw process 0 carry on after the step it failed
    assert any("out of lockstep" in r.getMessage() for r in caplog.records)


def test_process_0_refuses_to_go_on_when_only_it_failed_a_step(monkeypatch, caplog):
    monkeypatch.setattr(lockstep, "FAIL_WAIT_S", 0.2)
    store = MemoryStore()
    ch, follower, result = _pair(store, FakeSteps(fail_decode=1), FakeSteps())
    with pytest.raises(RuntimeError, match="not on follower 1") as err:
        ch.decode([0], [1], 0, 1)
    assert isinstance(err.value.__cause__, MemoryError)
    with pytest.raises(RuntimeError, match="out of lockstep"):  # every later step, too
        ch.reset()
    ch.close()  # the shutdown still goes out
    follower.join(timeout=30)
    assert result == [0]
