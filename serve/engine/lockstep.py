"""Several processes, one server: process 0 takes HTTP traffic and runs the engine; every
other process is a follower that runs the same compiled steps with the same host inputs.

A mesh that spans several processes makes every step an SPMD program that each process must
launch, in the same order, with the same host data. So on process 0 the engine talks to a
`StepChannel` instead of the bare `Steps`: each call first publishes a command (an op code and
the call's host arguments) and then runs the step. Followers run `follow`: read the next
command, run the same `Steps` method on their own params, cache and sampler state, repeat
until SHUTDOWN. The engine does not know; it only sees an object with the `Steps` methods.

Commands go through the key-value store of jax.distributed's coordination service (gRPC on
the host; process 0 hosts it), not through a device collective such as
`multihost_utils.broadcast_one_to_all`: an idle follower then waits in a plain RPC instead of
inside an all-reduce on its devices for as long as nobody sends requests, process 0 never
blocks on sending, and a command costs one small RPC (0.4 ms on loopback with two CPU
processes, against 1.9 ms for a `broadcast_one_to_all`). The store has no public Python
handle, hence the one private import in `_client`.

Keys: command `seq` is `tsjax/lockstep/cmd/{seq // BLOCK}/{seq % BLOCK}`. After each full
block a follower acknowledges it (`ack/{process}`), and process 0 deletes the blocks every
follower has read, so the store stays small on a server that runs for weeks.

Failures. A step that raises on process 0 raises the same way on every follower in the usual
case (same code, same inputs: a host-side check, a compile error). A follower records each
command it failed in the store; process 0, when a step raised, waits (`FAIL_WAIT_S`) to see
that every follower failed the same command, and then its engine fails the live requests and
starts over with a new cache and sampler, which the followers follow. A failure on one side
only (a device out of memory, a lost host) leaves the processes out of lockstep for good: a
follower that failed alone sees process 0 go on, or not start over, and exits with status 2;
process 0 failing alone logs it as CRITICAL and refuses every later step with the reason (each
request gets it as its error) until the job is restarted. A follower that exits or dies stops
its jax.distributed heartbeats, which ends the job (about 100 s by default) rather than
leaving it hanging. A follower that cannot load the model says so in the store, and process
0's /health reports it instead of hanging in the first step.
"""

from __future__ import annotations

import enum
import logging
import pickle
import threading
import time
from typing import Any

import jax

log = logging.getLogger("tsjax.lockstep")

PREFIX = "tsjax/lockstep"
BLOCK = 64  # commands per key directory: the unit followers acknowledge and process 0 deletes
POLL_MS = 60_000  # a follower's wait for the next command, renewed until one comes
FAIL_WAIT_S = 120.0  # after a failed step, how long each side waits to hear the other failed


class Op(enum.IntEnum):
    NEW_CACHE = 1
    NEW_SAMPLER = 2
    WARMUP = 3
    PREFILL = 4
    DECODE = 5
    SHUTDOWN = 6
    SWAP = 7


def _client():
    """jax.distributed's key-value store client (None before `jax.distributed.initialize`)."""
    from jax._src.distributed import global_state

    if global_state.client is None:
        raise RuntimeError("lockstep serving needs jax.distributed.initialize() first")
    return global_state.client


def _cmd_key(seq: int) -> str:
    return f"{PREFIX}/cmd/{seq // BLOCK}/{seq % BLOCK}"


def _block_dir(block: int) -> str:
    return f"{PREFIX}/cmd/{block}"


def _ready_key(process: int) -> str:
    return f"{PREFIX}/ready/{process}"


def _failed_key(process: int, seq: int) -> str:
    return f"{PREFIX}/failed/{process}/{seq}"


class StepChannel:
    """Stands in for `Steps` on process 0: `prefill`, `decode`, `swap_rows`, `new_cache`,
    `new_sampler` and `warmup` publish their host arguments to the followers, then run the
    step here. Everything else (`shapes`, `plan`, `mesh`, ...) is the wrapped `Steps`' own.

    Followers hold their own params, cache and sampler state and substitute them, so the
    cache and sampler passed in must be the ones the previous call returned (what the engine
    does); anything else raises here before a follower could drift."""

    def __init__(self, client: Any = None, followers: int | None = None):
        self._kv = client if client is not None else _client()
        self._followers = jax.process_count() - 1 if followers is None else followers
        self._seq = 0
        self._deleted = 0  # command blocks below this are gone from the store
        self._lock = threading.Lock()  # one command and its step at a time, in order
        self._closed = False
        self._broken = ""  # why the processes are out of lockstep, once they are
        self.steps: Any = None
        self.params: Any = None
        self._cache: Any = None
        self._sampler: Any = None

    def attach(self, steps, params, ready_timeout_s: float = 1800.0) -> StepChannel:
        """Wrap `steps` (run with `params`) once every follower reports its model loaded."""
        deadline = time.monotonic() + ready_timeout_s
        for p in range(1, self._followers + 1):
            left_ms = max(int((deadline - time.monotonic()) * 1000), 1)
            status = self._kv.blocking_key_value_get(_ready_key(p), left_ms)
            if status != "ok":
                raise RuntimeError(f"follower process {p}: {status}")
        self.steps, self.params = steps, params
        return self

    def __getattr__(self, name: str):
        if name.startswith("_") or self.__dict__.get("steps") is None:
            raise AttributeError(name)
        return getattr(self.steps, name)

    # -- the Steps methods the engine calls ------------------------------------------------

    def new_cache(self):
        with self._lock:
            self._send(Op.NEW_CACHE)
            self._cache = self.steps.new_cache()
            return self._cache

    def new_sampler(self):
        with self._lock:
            self._send(Op.NEW_SAMPLER)
            self._sampler = self.steps.new_sampler()
            return self._sampler

    def warmup(self, params, *args, **kwargs) -> float:
        with self._lock:
            self._check(params)
            self._send(Op.WARMUP, args, kwargs)
            try:
                return self.steps.warmup(params, *args, **kwargs)
            except Exception as e:
                self._failed(e)
                raise

    def prefill(self, params, cache, sampler, *args, **kwargs):
        return self._step(Op.PREFILL, self.steps.prefill, params, cache, sampler, args, kwargs)

    def decode(self, params, cache, sampler, *args, **kwargs):
        return self._step(Op.DECODE, self.steps.decode, params, cache, sampler, args, kwargs)

    def swap_rows(self, params, cache, sampler, *args, **kwargs):
        return self._step(Op.SWAP, self.steps.swap_rows, params, cache, sampler, args, kwargs)

    def close(self) -> None:
        """Tell the followers to exit (idempotent; later calls raise)."""
        with self._lock:
            if not self._closed:
                self._send(Op.SHUTDOWN, force=True)
                self._closed = True
                log.info("lockstep: sent shutdown to %d follower(s)", self._followers)

    # -- internals -------------------------------------------------------------------------

    def _step(self, op: Op, fn, params, cache, sampler, args, kwargs):
        with self._lock:
            self._check(params, cache, sampler)
            self._send(op, args, kwargs)
            self._cache = self._sampler = None  # donated: stale until the step returns
            try:
                out = fn(params, cache, sampler, *args, **kwargs)
            except Exception as e:
                self._failed(e)
                raise
            self._cache, self._sampler = out[2], out[3]
            return out

    def _failed(self, error: Exception) -> None:
        """A step raised here. If every follower failed the same command the processes are
        still in step (the engine starts over and they follow); if not, they are out of
        lockstep for good: say so loudly, and refuse every later step."""
        seq = self._seq - 1
        for p in range(1, self._followers + 1):
            try:
                self._kv.blocking_key_value_get(_failed_key(p, seq), int(FAIL_WAIT_S * 1000))
                self._kv.key_value_delete(_failed_key(p, seq))
            except Exception:
                self._broken = (
                    f"command {seq} failed on process 0 ({error!r}) but not on follower {p};"
                    " the processes are out of lockstep: restart the job"
                )
                log.critical("lockstep: %s", self._broken)
                raise RuntimeError(self._broken) from error

    def _check(self, params, cache=None, sampler=None) -> None:
        if self.steps is None:
            raise RuntimeError("StepChannel.attach() has not been called")
        if params is not self.params:
            raise RuntimeError("lockstep steps run with the params they were attached with")
        if cache is not None and (cache is not self._cache or sampler is not self._sampler):
            raise RuntimeError(
                "lockstep steps need the cache and sampler the previous call returned:"
                " the followers hold only those"
            )

    def _send(self, op: Op, args: tuple = (), kwargs: dict | None = None, force=False) -> None:
        if self._closed:
            raise RuntimeError("the lockstep channel is closed (server shutting down)")
        if self.steps is None and not force:
            raise RuntimeError("StepChannel.attach() has not been called")
        if self._broken and not force:
            raise RuntimeError(self._broken)
        payload = pickle.dumps((int(op), tuple(args), dict(kwargs or {})), protocol=5)
        self._kv.key_value_set_bytes(_cmd_key(self._seq), payload)
        self._seq += 1
        if self._seq % BLOCK == 0:
            self._collect()

    def _collect(self) -> None:
        """Delete the command blocks every follower has acknowledged."""
        acks = self._kv.key_value_dir_get(f"{PREFIX}/ack/")
        if not acks or len(acks) < self._followers:
            return
        done = min(int(v) for _, v in acks)
        for block in range(self._deleted, done):
            self._kv.key_value_delete(_block_dir(block))
        self._deleted = max(self._deleted, done)


def announce_ready(error: str | None = None, client: Any = None, process: int | None = None):
    """A follower's word to process 0 that its model loaded ("ok") or why it did not."""
    kv = client if client is not None else _client()
    me = jax.process_index() if process is None else process
    kv.key_value_set(_ready_key(me), "ok" if error is None else error)


def _receive(kv, seq: int, wait_s: float | None = None) -> tuple[Op, tuple, dict] | None:
    """Command `seq`; None if `wait_s` passes first (no limit: an idle server is normal)."""
    deadline = None if wait_s is None else time.monotonic() + wait_s
    while True:
        poll = POLL_MS
        if deadline is not None:
            poll = min(poll, int((deadline - time.monotonic()) * 1000))
            if poll <= 0:
                return None
        try:
            payload = kv.blocking_key_value_get_bytes(_cmd_key(seq), poll)
            break
        except Exception as e:  # a timeout just means an idle server; anything else is fatal
            if "DEADLINE_EXCEEDED" not in str(e):
                raise
    op, args, kwargs = pickle.loads(payload)
    return Op(op), args, kwargs


def follow(steps, params, client: Any = None, process: int | None = None) -> int:
    """A follower's loop: run process 0's step commands in order until SHUTDOWN (returns 0).
    Returns 1 if the command stream itself fails (the coordinator went away), 2 if a step
    failed here and process 0 did not start over after it (out of lockstep)."""
    kv = client if client is not None else _client()
    me = jax.process_index() if process is None else process
    cache = sampler = None
    seq = 0
    ran = 0
    failed = False  # the previous command failed here
    while True:
        try:
            got = _receive(kv, seq, FAIL_WAIT_S if failed else None)
        except Exception:
            log.exception("follower %d: lost the command stream at command %d", me, seq)
            return 1
        if failed and (got is None or got[0] not in (Op.NEW_CACHE, Op.SHUTDOWN)):
            log.critical(
                "follower %d: command %d failed here but process 0 did not start over after"
                " it; out of lockstep, leaving the job so that it stops instead of hanging",
                me,
                seq - 1,
            )
            return 2
        assert got is not None
        op, args, kwargs = got
        failed = False
        seq += 1
        if seq % BLOCK == 0:
            kv.key_value_set(f"{PREFIX}/ack/{me}", str(seq // BLOCK), allow_overwrite=True)
        if op is Op.SHUTDOWN:
            log.info("follower %d: shutdown after %d commands (%d steps)", me, seq, ran)
            return 0
        try:
            if op is Op.NEW_CACHE:
                cache = steps.new_cache()
            elif op is Op.NEW_SAMPLER:
                sampler = steps.new_sampler()
            elif op is Op.WARMUP:
                secs = steps.warmup(params, *args, **kwargs)
                log.info("follower %d: warm-up compiled in %.1fs", me, secs)
            else:
                fn = {Op.PREFILL: "prefill", Op.DECODE: "decode", Op.SWAP: "swap_rows"}[op]
                _, _, cache, sampler = getattr(steps, fn)(params, cache, sampler, *args, **kwargs)
                ran += 1
        except Exception as e:
            # Process 0 ran the same call on the same inputs; in the usual case it failed the
            # same way and its engine starts over with new_cache/new_sampler, which we follow.
            log.exception("follower %d: command %d (%s) failed", me, seq - 1, op.name)
            kv.key_value_set(_failed_key(me, seq - 1), repr(e)[:1000], allow_overwrite=True)
            failed = True
