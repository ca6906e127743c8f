"""Several processes, one server: process 0 takes HTTP traffic and runs the engine; every
other process is a follower that runs the same compiled steps with the same host inputs.

A mesh that spans several processes makes every step an SPMD program that each process must
launch, in the same order, with the same host data. So on process 0 the engine's runner is a
`StepChannel` (a `tsjax.runner.Runner`, like the `LocalRunner` it wraps): each call first
publishes a command (an op code and the call's host arguments) and then runs on the local
runner. Followers run `follow`: read the next command, make the same call on their own
`LocalRunner` (their own params, cache, sampler state and device feed), repeat until
SHUTDOWN. The engine does not know; it only sees a `Runner`.

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
starts over (`reset`: a new cache and sampler state), which the followers follow. A failure on
one side only (a device out of memory, a lost host) leaves the processes out of lockstep for
good: a follower that failed alone sees process 0 go on, or not start over, and exits with
status 2; process 0 failing alone logs it as CRITICAL and refuses every later step with the
reason (each request gets it as its error) until the job is restarted. A follower that exits
or dies stops its jax.distributed heartbeats, which ends the job (about 100 s by default)
rather than leaving it hanging. A follower that cannot load the model says so in the store,
and process 0's /health reports it instead of hanging in the first step.
"""

from __future__ import annotations

import enum
import logging
import pickle
import threading
import time
from typing import Any

import jax
import numpy as np

from tsjax.runner import MemoryReport, Runner
from tsjax.sampling import SamplingParams
from tsjax.shapes import StepShapes
from tsjax.spans import EmbedSpan
from tsjax.steps import PendingTokens

log = logging.getLogger("tsjax.lockstep")

PREFIX = "tsjax/lockstep"
BLOCK = 64  # commands per key directory: the unit followers acknowledge and process 0 deletes
POLL_MS = 60_000  # a follower's wait for the next command, renewed until one comes
FAIL_WAIT_S = 120.0  # after a failed step, how long each side waits to hear the other failed


class Op(enum.IntEnum):
    RESET = 1
    WARMUP = 2
    PREFILL = 3
    DECODE = 4
    SWAP = 5
    SHUTDOWN = 6
    COPY = 7


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
    """A `Runner` for process 0: `reset`, `warmup`, `prefill`, `decode`, `swap_rows` and
    `copy_rows` publish their host arguments to the followers, then run on the local runner it was
    attached to (`memory`, `shapes` and `rewinds` are the local runner's own)."""

    def __init__(self, client: Any = None, followers: int | None = None):
        self._kv = client if client is not None else _client()
        self._followers = jax.process_count() - 1 if followers is None else followers
        self._seq = 0
        self._deleted = 0  # command blocks below this are gone from the store
        self._lock = threading.Lock()  # one command and its step at a time, in order
        self._closed = False
        self._broken = ""  # why the processes are out of lockstep, once they are
        self._lost = ""  # why the runners' state is gone (a step failed) until a reset
        self.runner: Runner | None = None

    def attach(self, runner: Runner, ready_timeout_s: float = 1800.0) -> StepChannel:
        """Drive `runner` (process 0's own) once every follower reports its model loaded."""
        deadline = time.monotonic() + ready_timeout_s
        for p in range(1, self._followers + 1):
            left_ms = max(int((deadline - time.monotonic()) * 1000), 1)
            status = self._kv.blocking_key_value_get(_ready_key(p), left_ms)
            if status != "ok":
                raise RuntimeError(f"follower process {p}: {status}")
        self.runner = runner
        return self

    # -- the Runner ---------------------------------------------------------------------------

    @property
    def shapes(self) -> StepShapes:
        return self._local().shapes

    @property
    def rewinds(self) -> bool:
        return self._local().rewinds

    def memory(self) -> MemoryReport:
        return self._local().memory()

    def reset(self) -> None:
        self._call(Op.RESET, "reset")

    def warmup(
        self,
        decode_steps: tuple[int, ...] = (1,),
        max_prompt: int | None = None,
        batches: tuple[int, ...] = (1,),
        span_lens: tuple[int, ...] = (),
    ) -> float:
        return self._call(Op.WARMUP, "warmup", decode_steps, max_prompt, batches, span_lens)

    def prefill(
        self,
        prompts: list[list[int]],
        rows: list[int],
        sampling: list[SamplingParams],
        starts: list[int] | None = None,
        histories: list[list[int]] | None = None,
        seeds: list[int] | None = None,
        masks: np.ndarray | None = None,
        restore: list[int] | None = None,
        checkpoint: list[int] | None = None,
        spans: list[list[EmbedSpan]] | None = None,
        logprobs: list[bool] | None = None,
        next_tokens: list[int | None] | None = None,
    ) -> PendingTokens:
        # spans carry host (numpy) embeddings: they pickle with the command, and every
        # follower splices the same ones
        return self._call(
            Op.PREFILL,
            "prefill",
            prompts,
            rows,
            sampling,
            starts,
            histories,
            seeds,
            masks,
            restore,
            checkpoint,
            spans,
            logprobs,
            next_tokens,
        )

    def decode(
        self,
        rows: list[int],
        tokens: list[int] | None,
        max_pos: int,
        n_steps: int = 1,
        masks: np.ndarray | None = None,
    ) -> PendingTokens:
        return self._call(Op.DECODE, "decode", rows, tokens, max_pos, n_steps, masks)

    def swap_rows(self, pairs: list[tuple[int, int]]) -> None:
        self._call(Op.SWAP, "swap_rows", pairs)

    def can_swap(self) -> bool:  # process 0's programs decide; a follower compiles if it must
        return self._local().can_swap()

    def prefill_ready(self, lens: list[int], starts: list[int]) -> bool:  # as `can_swap`
        return self._local().prefill_ready(lens, starts)

    def when_idle(self) -> None:
        self._local().when_idle()

    def copy_rows(
        self,
        src: list[int],
        dst: list[int],
        lengths: list[int],
        sampling: list[SamplingParams],
        histories: list[list[int]] | None = None,
        seeds: list[int] | None = None,
        logprobs: list[bool] | None = None,
    ) -> None:
        self._call(Op.COPY, "copy_rows", src, dst, lengths, sampling, histories, seeds, logprobs)

    def close(self) -> None:
        """Tell the followers to exit (idempotent; later calls raise)."""
        with self._lock:
            if not self._closed:
                self._send(Op.SHUTDOWN, force=True)
                self._closed = True
                log.info("lockstep: sent shutdown to %d follower(s)", self._followers)

    # -- internals -------------------------------------------------------------------------

    def _local(self) -> Runner:
        if self.runner is None:
            raise RuntimeError("StepChannel.attach() has not been called")
        return self.runner

    def _call(self, op: Op, method: str, *args):
        """Publish the call, then make it on the local runner. After a failed step only a
        reset is published: every runner's state went with the step (donated), and a
        follower that failed the same step waits for the reset."""
        with self._lock:
            runner = self._local()
            if self._lost and op is not Op.RESET:
                raise RuntimeError(f"a step failed ({self._lost}): reset() first")
            self._send(op, args)
            try:
                out = getattr(runner, method)(*args)
            except Exception as e:
                self._lost = repr(e)[:200]
                self._failed(e)
                raise
            if op is Op.RESET:
                self._lost = ""
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

    def _send(self, op: Op, args: tuple = (), force=False) -> None:
        if self._closed:
            raise RuntimeError("the lockstep channel is closed (server shutting down)")
        if self._broken and not force:
            raise RuntimeError(self._broken)
        payload = pickle.dumps((int(op), tuple(args)), protocol=5)
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


def _receive(kv, seq: int, wait_s: float | None = None) -> tuple[Op, tuple] | None:
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
    op, args = pickle.loads(payload)
    return Op(op), args


#: The runner method each command calls.
_METHODS = {
    Op.RESET: "reset",
    Op.WARMUP: "warmup",
    Op.PREFILL: "prefill",
    Op.DECODE: "decode",
    Op.SWAP: "swap_rows",
    Op.COPY: "copy_rows",
}


def follow(runner: Runner, client: Any = None, process: int | None = None) -> int:
    """A follower's loop: make process 0's runner calls, in order, on `runner` (this
    process's own) until SHUTDOWN (returns 0). Returns 1 if the command stream itself fails
    (the coordinator went away), 2 if a step failed here and process 0 did not start over
    after it (out of lockstep)."""
    kv = client if client is not None else _client()
    me = jax.process_index() if process is None else process
    seq = 0
    ran = 0
    failed = False  # the previous command failed here
    while True:
        try:
            got = _receive(kv, seq, FAIL_WAIT_S if failed else None)
        except Exception:
            log.exception("follower %d: lost the command stream at command %d", me, seq)
            return 1
        if failed and (got is None or got[0] not in (Op.RESET, Op.SHUTDOWN)):
            log.critical(
                "follower %d: command %d failed here but process 0 did not start over after"
                " it; out of lockstep, leaving the job so that it stops instead of hanging",
                me,
                seq - 1,
            )
            return 2
        assert got is not None
        op, args = got
        failed = False
        seq += 1
        if seq % BLOCK == 0:
            kv.key_value_set(f"{PREFIX}/ack/{me}", str(seq // BLOCK), allow_overwrite=True)
        if op is Op.SHUTDOWN:
            log.info("follower %d: shutdown after %d commands (%d steps)", me, seq, ran)
            return 0
        try:
            out = getattr(runner, _METHODS[op])(*args)
            if op is Op.WARMUP:
                log.info("follower %d: warm-up compiled in %.1fs", me, out)
            elif op is not Op.RESET:
                ran += 1
        except Exception as e:
            # Process 0 made the same call on the same inputs; in the usual case it failed
            # the same way and its engine starts over with a reset, which we follow.
            log.exception("follower %d: command %d (%s) failed", me, seq - 1, op.name)
            kv.key_value_set(_failed_key(me, seq - 1), repr(e)[:1000], allow_overwrite=True)
            failed = True
