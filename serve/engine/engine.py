"""The engine: one thread runs the loop (admit -> prefill -> decode -> publish), and an async
facade hands each request its own stream of `TokenEvent`s.

Continuous batching: every decode dispatch advances all cache rows at once; new requests are
prefilled into free rows between dispatches and finished ones free their row at once. While
requests wait, a dispatch runs a single step so they are admitted quickly; otherwise it runs
`decode_steps` steps to save dispatch overhead.

Pipelining: in the steady state (nobody waiting, no aborts, no grammar, no row finished) the
next dispatch goes out before the current one's tokens are read, fed on the device with the
tokens the current one samples (`Runner.decode(tokens=None)`). The host's work between
dispatches (reading tokens, detokenizing, stop strings, events, the next dispatch's own
Python) then overlaps the device's instead of adding to it. A row that finishes inside a
dispatch has its next one computed in vain and dropped; a request that arrives waits for the
dispatch in flight, as it would without pipelining, plus at most the one already queued
behind it.

The engine talks to the compiled steps only through a `tsjax.runner.Runner` (which owns the
params, cache, sampler state and device feed): in one process the model's own
`LocalRunner`, over several a `serve.engine.lockstep.StepChannel`. Observers
(`add_observer`) see every event of every request, as the metrics do.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from serve.engine.scheduler import Row, Scheduler
from serve.engine.types import (
    EventKind,
    FinishReason,
    GenerationRequest,
    Stats,
    TokenEvent,
)
from tsjax.generation import PromptTooLongError
from tsjax.grammar import mask_words
from tsjax.logprobs import TokenLogprob, host_entries
from tsjax.model import Model
from tsjax.runner import MemoryReport, Runner
from tsjax.shapes import bucket_for
from tsjax.spans import check_spans, chunk_end, spans_in, text_ids
from tsjax.textstream import TextStream

if TYPE_CHECKING:
    from tsjax.steps import PendingTokens

log = logging.getLogger("tsjax.engine")

Sink = Callable[[TokenEvent], None]
#: Sees every event the engine publishes, with its request (on the engine thread).
Observer = Callable[[GenerationRequest, TokenEvent], None]


@dataclass
class _Dispatch:
    """A decode dispatch sent to the device: its rows' requests, in the order of its token
    columns, and its step count."""

    rows: list[_Live]
    n: int
    tokens: PendingTokens


@dataclass
class _Live:
    """Host-side state of one answer to a request, in a cache row. The row holds its first
    `base` tokens of prompt + sampled, then one more per token fed back (`fed`): `base` is
    the prompt, or for the answers of an n-answer request the prompt but its last token,
    which their first decode feeds (each samples its own first token there)."""

    req: GenerationRequest
    sink: Sink
    row: Row
    text: TextStream
    stats: Stats
    submitted: float
    base: int
    index: int = 0  # which of the request's answers
    constraint: Any = None  # this answer's grammar state (`GenerationRequest.constraint`)
    sampled: list[int] = field(default_factory=list)  # every sampled token, in order
    fed: int = 0  # tokens fed back into the cache since `base`
    decode_start: float = 0.0
    prompt_logprobs: tuple | None = None  # sent with the first event

    @property
    def constrained(self) -> bool:
        return self.constraint is not None

    @property
    def grammar_pending(self) -> bool:
        """A constraint still deciding this row's next tokens."""
        return self.constrained and not self.text.finish_reason

    @property
    def next_token(self) -> int:
        """The token the next decode feeds this row."""
        return self.sampled[-1] if self.sampled else self.req.prompt_ids[self.base]

    @property
    def cached(self) -> list[int]:
        """The tokens the cache row holds."""
        return (list(self.req.cache_ids) + self.sampled)[: self.base + self.fed]

    def mask_row(self, out: np.ndarray) -> None:
        """This row's allowed-token bitmask for the next token (all bits set if free)."""
        if self.constrained and not self.constraint.finished:
            self.constraint.fill(out)
        else:
            out[:] = -1


class Engine:
    def __init__(
        self,
        model: Model,
        *,
        decode_steps: int = 4,
        prefill_chunk: int = 512,
        runner: Runner | None = None,
        pipeline: bool = True,
    ):
        """`runner`: what runs the compiled steps, `model.runner()` unless given (several
        processes: a `serve.engine.lockstep.StepChannel` that replays them on the others).
        `pipeline`: send the next decode dispatch before reading the current one's tokens
        (see the module docstring)."""
        self.model = model
        self.runner: Runner = model.runner() if runner is None else runner
        shapes = self.runner.shapes
        self.rows = shapes.rows
        self.decode_steps = decode_steps
        self.pipeline = pipeline
        self._inflight: _Dispatch | None = None  # a pipelined dispatch not yet read
        self.prefill_chunk = min(prefill_chunk, shapes.prefill_lens[-1])
        rewinds = self.runner.rewinds
        self.scheduler = Scheduler(
            self.rows, shapes.decode_batches, rewinds, 0 if rewinds else shapes.checkpoints
        )
        self._live: dict[int, _Live] = {}  # row index -> live request
        self._waiting: dict[str, tuple[GenerationRequest, Sink, float]] = {}
        self._starting: dict[str, tuple[GenerationRequest, Sink]] = {}  # admitted, not live
        self._aborts: set[str] = set()
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._running = False
        self.total_processed = 0
        self.prefills = 0  # prefill dispatches run, and the prompt tokens they computed
        self.prefill_tokens = 0
        self.warm = False
        self._observers: list[Observer] = []

    # -- lifecycle --------------------------------------------------------------------------

    def warmup(self) -> float:
        """Compile every step shape the loop uses, before taking traffic (with a projector,
        the prefill of a chunk holding an image too: see `span_lens`)."""
        secs = self.runner.warmup(
            decode_steps=tuple(sorted({1, self.decode_steps})),
            max_prompt=self.prefill_chunk,
            span_lens=self.span_lens(),
        )
        self.warm = True
        return secs

    def span_lens(self) -> tuple[int, ...]:
        """The prompt lengths whose token buckets a prefill chunk with an image may take:
        from one image's span to the chunk size (`tsjax.spans.chunk_end` may run a span
        whole past the chunk size). None without a projector."""
        proj = self.model.projector
        if proj is None:
            return ()
        lens = self.runner.shapes.prefill_lens
        # a chunk that reaches an image runs it whole: up to the chunk size plus one span (the
        # largest image's, for a projector whose image sizes vary)
        span = proj.config.max_positions + 2  # its begin and end markers too
        lo, hi = proj.config.min_positions, self.prefill_chunk + span
        if lo >= self.model.max_len:
            return ()
        picked = [b for b in lens if lo <= b <= bucket_for(min(hi, lens[-1]), lens)]
        return tuple(sorted({lo, *picked}))

    def start(self) -> None:
        if self._thread is not None:
            return
        self._running = True
        self._thread = threading.Thread(target=self._loop, name="tsjax-engine", daemon=True)
        self._thread.start()

    #: Seconds `stop` waits for the loop to answer its requests before answering them
    #: itself (the loop may be inside a step or a compile that takes longer).
    STOP_ANSWER_S = 1.0

    def stop(self) -> None:
        """Stop the loop: every request in hand ends with "server shutting down". A loop
        still inside a step or a compile after `STOP_ANSWER_S` does not hold its clients:
        they are answered from here, and the loop's own answers later go unread."""
        with self._cv:
            self._running = False
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=self.STOP_ANSWER_S)
            if self._thread.is_alive():
                self._answer_now("server shutting down")
            self._thread.join(timeout=30)
            self._thread = None

    def _answer_now(self, message: str) -> None:
        """Send every request in hand its final error event, without touching the runner or
        the rows (another thread, the loop, still owns them)."""
        with self._cv:
            live = [(v.sink, v.index, v.stats) for v in list(self._live.values())]
            held = [(req, sink) for req, sink, _ in self._waiting.values()]
            held += list(self._starting.values())
        for sink, index, stats in live:
            sink(TokenEvent(EventKind.ERROR, error=message, stats=stats,
                            finish_reason=FinishReason.ERROR, index=index))  # fmt: skip
        for req, sink in held:
            for i in range(req.n):
                sink(TokenEvent(EventKind.ERROR, error=message,
                                finish_reason=FinishReason.ERROR, index=i))  # fmt: skip

    # -- the seam the API adapters use -----------------------------------------------------

    @property
    def rewinds(self) -> bool:
        """Whether a cache row can resume from any prefix of what it holds (else only from
        its saved states: `GenerationRequest.checkpoints` says where to save them)."""
        return self.scheduler.rewinds

    def check(self, req: GenerationRequest) -> None:
        """Reject what can never run, before queueing (the adapters map it to a 400)."""
        if not req.prompt_ids:
            raise ValueError("the prompt is empty")
        # a prompt that generates needs room for a token after it; one prefilled alone not
        room = 0 if req.prefill_only else 1
        if len(req.prompt_ids) + room > self.model.max_len:
            raise PromptTooLongError(len(req.prompt_ids), self.model.max_len)
        if req.max_tokens < 0 or (req.max_tokens == 0 and not req.prompt_logprobs | req.embed):
            raise ValueError(f"max_tokens must be at least 1, got {req.max_tokens}")
        check_spans(req.spans, len(req.prompt_ids), self.model.config.dim)
        if not 1 <= req.n <= self.rows:
            raise ValueError(
                f"n must be between 1 and {self.rows} (the answers decoded at once: the"
                f" server's rows), got {req.n}"
            )
        if req.embed and req.n != 1:
            raise ValueError("an embedding request has one answer (n=1)")
        req.sampling.validate()

    def submit(self, req: GenerationRequest, sink: Sink) -> None:
        """Queue a request; `sink` receives its events on the engine thread (each after the
        observers have seen it)."""
        self.check(req)
        with self._cv:
            self.scheduler.enqueue(req)
            self._waiting[req.id] = (req, self._observed(req, sink), time.perf_counter())
            self._cv.notify_all()

    def add_observer(self, observer: Observer) -> None:
        """Call `observer(request, event)` for every event published from now on (on the
        engine thread, before the request's own sink; an observer that raises is logged and
        skipped, the request unharmed)."""
        with self._cv:
            self._observers = [*self._observers, observer]

    def remove_observer(self, observer: Observer) -> None:
        with self._cv:
            self._observers = [o for o in self._observers if o is not observer]

    def memory(self) -> MemoryReport:
        """Params and cache bytes, per device (`Runner.memory`)."""
        return self.runner.memory()

    def _observed(self, req: GenerationRequest, sink: Sink) -> Sink:
        """The request's sink as the engine calls it: observers first, and nothing after an
        answer's final event (`stop` may have answered it while the loop still ran)."""
        ended: set[int] = set()
        lock = threading.Lock()

        def publish(ev: TokenEvent) -> None:
            with lock:
                if ev.index in ended:
                    return
                if ev.kind in (EventKind.DONE, EventKind.ERROR):
                    ended.add(ev.index)
            for observer in self._observers:
                try:
                    observer(req, ev)
                except Exception:
                    log.exception("an engine observer failed")
            sink(ev)

        return publish

    def abort(self, req_id: str) -> None:
        """Cancel a queued or running request; its row is freed within one dispatch."""
        with self._cv:
            self._aborts.add(req_id)
            self._cv.notify_all()

    async def generate(self, req: GenerationRequest) -> AsyncIterator[TokenEvent]:
        """Submit and stream events until every answer's DONE or ERROR (`req.n` of them, each
        with its `index`). Closing the iterator early (client went away) aborts the request,
        every answer of it."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue[TokenEvent] = asyncio.Queue()
        self.submit(req, lambda ev: loop.call_soon_threadsafe(q.put_nowait, ev))
        left = req.n
        try:
            while left:
                ev = await q.get()
                if ev.kind in (EventKind.DONE, EventKind.ERROR):
                    left -= 1
                yield ev
        finally:
            if left:
                self.abort(req.id)

    def status(self) -> dict:
        with self._cv:
            return {
                "busy": bool(self._live),
                "active_requests": len(self._live),
                "pending_requests": len(self.scheduler.queue),
                "total_processed": self.total_processed,
                "rows": self.rows,
            }

    # -- the loop ---------------------------------------------------------------------------

    def _loop(self) -> None:
        last_queue_note = 0.0
        while True:
            if self._inflight is not None and (
                self._aborts or self.scheduler.queue or not self._live
            ):
                try:  # read the dispatch in flight before rows change hands
                    self._land(self._take_inflight())
                except Exception as e:
                    log.exception("engine step failed")
                    self._fail_all(f"internal error: {e}")
            admitted = []
            try:
                with self._cv:
                    idle = not self._live and not self.scheduler.queue
                    if self._running and idle:
                        # compile what requests met meanwhile now, not inside the next burst
                        self.runner.when_idle()
                    while self._running and not self._live and not self.scheduler.queue:
                        self._cv.wait(timeout=1.0)
                    if not self._running:
                        break
                    if idle:
                        self._gather_burst()
                    self._apply_aborts()
                    while (nxt := self.scheduler.admit()) is not None:
                        admitted.append(nxt)
                for group in self._prefill_groups(admitted):
                    if len(group) == 1:
                        self._start(*group[0])
                    else:
                        self._start_together(group)
                if self._live:
                    self._decode()
            except Exception as e:  # a step failed: fail every request in hand, keep serving
                log.exception("engine step failed")
                self._fail_all(f"internal error: {e}")
            now = time.perf_counter()
            if now - last_queue_note > 1.0:
                last_queue_note = now
                self._note_queue()
        self._fail_all("server shutting down")

    #: From idle, the engine waits for a burst of requests to finish arriving before it
    #: starts: until none has come for `BURST_QUIET_S`, at most `BURST_WAIT_S` in all.
    BURST_QUIET_S = 0.004
    BURST_WAIT_S = 0.025

    def _gather_burst(self) -> None:
        """Called from idle with the lock held and a request queued: wait (briefly) for the
        rest of a burst, so that it is admitted, and prefilled, together. Started at its
        first request, a prefill takes both cores of a small machine from the event loop
        still reading the others, which then came in up to 0.3 s later in small groups
        (measured on 2 cores with 16 Ollama clients). A lone request waits BURST_QUIET_S."""
        end = time.perf_counter() + self.BURST_WAIT_S
        seen = len(self.scheduler.queue)
        while self._running and (left := end - time.perf_counter()) > 0:
            self._cv.wait(timeout=min(self.BURST_QUIET_S, left))
            if len(self.scheduler.queue) == seen:
                return
            seen = len(self.scheduler.queue)

    def _apply_aborts(self) -> None:
        for req_id in list(self._aborts):
            req = self.scheduler.remove(req_id)
            if req is not None:
                _, sink, _ = self._waiting.pop(req_id)
                for i in range(req.n):
                    sink(TokenEvent(EventKind.DONE, finish_reason=FinishReason.ABORT,
                                    stats=Stats(), index=i))  # fmt: skip
            for live in list(self._live.values()):
                if live.req.id == req_id:
                    live.text.finish("abort")
                    self._finish(live, FinishReason.ABORT)
        self._aborts.clear()

    def _note_queue(self) -> None:
        with self._cv:
            waiting = list(self.scheduler.queue)
        for i, req in enumerate(waiting):
            entry = self._waiting.get(req.id)
            if entry is not None:
                entry[1](
                    TokenEvent(EventKind.QUEUED, queue_position=i + 1, queue_pending=len(waiting))
                )

    #: The most tokens (batch bucket x token bucket) one prefill of several prompts computes:
    #: a bigger group is split (the programs' activations grow with it, and rows decoding
    #: wait for the whole of it).
    PREFILL_BATCH_TOKENS = 2048

    def _batchable(self, req: GenerationRequest, reuse: int) -> bool:
        """Whether an admitted request's prefill can share one call with others': one text
        answer, its rest one chunk, no state to save or restore (a cache that rewinds), no
        prompt scores."""
        return (
            req.n == 1
            and not req.prefill_only
            and not req.spans
            and not req.prompt_logprobs
            and self.rewinds
            and len(req.prompt_ids) - reuse <= self.prefill_chunk
        )

    def _prefill_groups(self, admitted: list) -> list[list]:
        """The admitted requests in groups prefilled by one call each, in admission order by
        each group's first: requests that can share a call (`_batchable`) are grouped by the
        token bucket of what they prefill, at most `PREFILL_BATCH_TOKENS` a group, where the
        runner has that batch's program ready (`Runner.prefill_ready`); the rest alone."""
        shapes = self.runner.shapes
        groups: list[list] = []
        by_bucket: dict[int, list] = {}
        for item in admitted:
            req, _, reuse = item
            if not self._batchable(req, reuse):
                groups.append([item])
                continue
            t = bucket_for(len(req.prompt_ids) - reuse, shapes.prefill_lens)
            group = by_bucket.get(t)
            if group is None or bucket_for(len(group) + 1, shapes.prefill_batches) * t > max(
                self.PREFILL_BATCH_TOKENS, t
            ):
                group = by_bucket[t] = []
                groups.append(group)
            group.append(item)
        out: list[list] = []
        for group in groups:
            lens, starts = (
                [len(req.prompt_ids) - reuse for req, _, reuse in group],
                [reuse for _, _, reuse in group],
            )
            if len(group) > 1 and self.runner.prefill_ready(lens, starts):
                out.append(group)
            else:
                out.extend([item] for item in group)
        return out

    def _start_together(self, group: list[tuple[GenerationRequest, Row, int]]) -> None:
        """Prefill several admitted one-answer requests (`_batchable`) in one call, each
        into its row from its reused prefix, and start them: each samples its first token
        in it. The kernels compute every prompt on its own (each gets the tokens it would
        alone); a call of several is cheaper than as many of one (`python -m
        benchmarks.dispatch_cost`: 16 prompts of 64 tokens in 0.39 s, one by one 0.70 s)."""
        lives = [self._answers(req, row, reuse)[0] for req, row, reuse in group]
        t0 = time.perf_counter()
        reqs = [x.req for x in lives]
        starts = [reuse for _, _, reuse in group]
        rests = [req.prompt_ids[s:] for req, s in zip(reqs, starts, strict=True)]
        computed = sum(len(r) for r in rests)
        pending = self.runner.prefill(
            rests,
            [x.row.index for x in lives],
            [req.sampling for req in reqs],
            starts=starts,
            histories=[list(req.prompt_ids) for req in reqs],
            masks=self._masks(lives),
            logprobs=[req.logprobs for req in reqs],
        )
        self.prefills += 1
        self.prefill_tokens += computed
        first = pending.get()
        self._go_live(lives, t0)
        log.debug("prefilled %d prompts together (%d tokens) in %.3fs", len(group), computed,
                  time.perf_counter() - t0)  # fmt: skip
        for i, live in enumerate(lives):
            lps = self._entries(pending, i) if live.req.logprobs else None
            self._consume(live, [int(first[0, i])], lps)

    def _go_live(self, lives: list[_Live], t0: float) -> None:
        """Prefilled since `t0`: the answers decode from now on."""
        now = time.perf_counter()
        for live in lives:
            live.stats.prefill_seconds = now - t0
            live.decode_start = now
            live.row.tokens = list(live.req.cache_ids)
            self._live[live.row.index] = live
            self._starting.pop(live.req.id, None)

    def _take(self, req: GenerationRequest) -> tuple[Sink, float]:
        """An admitted request's sink and submission time, taken from the waiting ones: it
        is starting until live (`_fail_all` answers it if it never gets there)."""
        _, sink, submitted = self._waiting.pop(req.id)
        self._starting[req.id] = (req, sink)
        return sink, submitted

    def _answers(self, req: GenerationRequest, row: Row, reuse: int) -> list[_Live]:
        """Take an admitted request (`_take`) and make its answers, in `row` (and the rows
        `admit` gave its others). One answer's row holds the prompt; n answers' rows hold it
        but its last token, which their first decode feeds, each under its own copy of the
        constraint."""
        sink, submitted = self._take(req)
        rows = [row] if req.n == 1 else [row, *self.scheduler.siblings(req, row)]
        constraints = [req.constraint] * len(rows)
        if req.constraint is not None and req.n > 1:
            constraints = [req.constraint] + [req.constraint.fork() for _ in rows[1:]]
        prompt, queued = req.prompt_ids, time.perf_counter() - submitted
        base = len(prompt) if req.n == 1 else len(prompt) - 1
        return [
            _Live(
                req,
                sink,
                r,
                self._text(req),
                Stats(len(prompt), reuse, queue_seconds=queued),
                submitted,
                base,
                index=i,
                constraint=c,
            )  # fmt: skip
            for i, (r, c) in enumerate(zip(rows, constraints, strict=True))
        ]

    def _start(self, req: GenerationRequest, row: Row, reuse: int) -> None:
        """Prefill an admitted request into its row and start its answers: one answer
        samples its first token in the prefill; n answers share a prefill of the prompt but
        its last token, copied to their rows, and each samples its first token in the next
        decode; a prefill-only request (embedding, prompt scoring) is done at once."""
        if req.prefill_only:
            sink, submitted = self._take(req)
            self._prefill_only(req, row, sink, time.perf_counter() - submitted)
            self._starting.pop(req.id)
            return
        lives = self._answers(req, row, reuse)
        rows, base = [x.row for x in lives], lives[0].base
        t0 = time.perf_counter()
        masks = self._masks(lives[:1]) if req.n == 1 else None
        with self._cv:
            marks = self.scheduler.plan_checkpoints(row, self._marks(req, base), reuse)
        restore = row.resume if reuse else -1
        pending, _, scored = self._prefill(req, row.index, reuse, base, masks, restore, marks)
        if req.n > 1:
            self._copy(req, rows)
            for sibling in rows[1:]:  # the copies carry the first row's checkpoints
                sibling.saved = list(row.saved)
        # The prefill runs asynchronously: its time ends when its first token is on the host
        # (ending it at the dispatch counted the prefill as decode time).
        first = pending.get() if req.n == 1 and pending is not None else None
        for live in lives:
            live.prompt_logprobs = scored
        self._go_live(lives, t0)
        if req.n == 1:  # the prefill sampled the first token
            assert pending is not None
            lps = self._entries(pending, 0) if req.logprobs else None
            self._consume(lives[0], [int(first[0, 0])], lps)

    def _text(self, req: GenerationRequest) -> TextStream:
        return TextStream(
            self.model.tokenizer,
            stop=req.stop,
            max_tokens=req.max_tokens,
            room=self.model.max_len - len(req.prompt_ids),
        )

    def _marks(self, req: GenerationRequest, end: int) -> list[int]:
        """Where a cache that cannot rewind saves `req`'s state: its `checkpoints` (default
        the end of what is prefilled), up to `end` and never inside an image."""
        if self.rewinds:
            return []
        marks = [p for p in (req.checkpoints or (end,)) if 0 < p <= end]
        return [p for p in marks if req.reusable(p) == p]

    def _prefill(
        self,
        req: GenerationRequest,
        row: int,
        start: int,
        end: int,
        masks=None,
        restore: int = -1,
        marks: dict[int, int] | None = None,
    ) -> tuple[PendingTokens | None, np.ndarray | None, tuple | None]:
        """Prefill prompt[start:end] into `row`, in chunks: the first resumes from the
        checkpoint slot `restore` (-1: the row's own state), and a chunk ends at each
        position of `marks` ({position: slot}), saving the state there. Returns (the last
        chunk's output, or None if nothing was left to prefill; for `embed` the final-normed
        states summed over the prompt [D]; for `prompt_logprobs` one entry per prompt token,
        None first)."""
        prompt, chunk_len = req.prompt_ids, self.prefill_chunk
        pending, pooled, entries, marks = None, None, [None], marks or {}
        while start < end:
            # a chunk never cuts an image: its positions attend to each other
            limit = min([end, *(p for p in marks if p > start)])
            stop = chunk_end(start, chunk_len, limit, req.spans)
            chunk, spans = prompt[start:stop], spans_in(req.spans, start, stop)
            after = prompt[stop] if stop < len(prompt) else -1  # the token after this chunk
            pending = self.runner.prefill(
                [chunk],
                [row],
                [req.sampling],
                starts=[start],
                histories=[text_ids(prompt, req.spans, stop) if req.spans else prompt[:stop]],
                masks=masks,
                spans=[spans] if spans else None,
                logprobs=[req.logprobs],
                next_tokens=[after] if req.prompt_logprobs else None,
                restore=[restore],
                checkpoint=[marks.get(stop, -1)],
            )
            restore = -1
            self.prefills += 1
            self.prefill_tokens += len(chunk)
            if req.embed:
                part = pending.pooled_sums()[0]
                pooled = part if pooled is None else pooled + part
            if req.prompt_logprobs:
                chosen, ids, top = (a[0] for a in pending.prompt_logprobs())
                k = len(prompt[start + 1 : stop + 1])  # positions whose next token is known
                entries += host_entries(chosen[:k], ids[:k], top[:k], prompt[start + 1 : stop + 1])
            start = stop
        scored = tuple(entries) if req.prompt_logprobs else None
        return pending, pooled, scored

    def _copy(self, req: GenerationRequest, rows: list[Row]) -> None:
        """Give each of an n-answer request's rows the prompt its first row was prefilled
        with (all but the last token) and its own sampling state: seeds seed + i, or
        independent random ones without a seed."""
        n, seed = len(rows), req.sampling.seed
        seeds = None if seed < 0 else [(seed + i) & 0x7FFFFFFF for i in range(n)]
        self.runner.copy_rows(
            [rows[0].index] * n,
            [r.index for r in rows],
            [len(req.prompt_ids) - 1] * n,
            [req.sampling] * n,
            [
                text_ids(req.prompt_ids, req.spans, len(req.prompt_ids))
                if req.spans
                else list(req.prompt_ids)
            ]
            * n,  # fmt: skip
            seeds,
            [req.logprobs] * n,
        )

    def _prefill_only(self, req: GenerationRequest, row: Row, sink: Sink, queued: float) -> None:
        """An embedding or a scored prompt: prefill, answer, free the row (which keeps the
        prompt for reuse)."""
        t0 = time.perf_counter()
        _, pooled, scored = self._prefill(req, row.index, 0, len(req.prompt_ids))
        embedding = None if pooled is None else (pooled / len(req.prompt_ids)).astype(np.float32)
        took = time.perf_counter() - t0
        stats = Stats(len(req.prompt_ids), queue_seconds=queued, prefill_seconds=took)
        with self._cv:  # prefilled whole, nothing fed after: the row's state is exact
            self.scheduler.release(row, list(req.cache_ids), len(req.cache_ids))
            self.total_processed += 1
        for i in range(req.n):
            sink(TokenEvent(EventKind.DONE, finish_reason=FinishReason.LENGTH, stats=stats,
                            index=i, prompt_logprobs=scored, embedding=embedding))  # fmt: skip

    def _compact(self) -> None:
        """Move live requests into the lowest rows (decode runs rows [0, b) for the smallest
        bucket b holding them all) by exchanging their cache rows with free ones; not while
        the exchange's program is still to be compiled (decode runs the wider bucket
        meanwhile: nobody waits for an optimization)."""
        with self._cv:
            pairs = self.scheduler.compaction()
        if not pairs or not self.runner.can_swap():
            return
        self.runner.swap_rows(pairs)
        with self._cv:
            for a, b in pairs:
                self.scheduler.swap(a, b)
                live = self._live.pop(a)
                live.row = self.scheduler.rows[b]
                self._live[b] = live
        log.debug("moved rows %s", pairs)

    def _decode(self) -> None:
        if self._inflight is not None:  # sent last time round, before its predecessor was read
            current = self._take_inflight()
        else:
            self._compact()
            rows = list(self._live.values())
            waiting = self.scheduler.can_admit()
            left = min(x.text.max_tokens - len(x.text.tokens) for x in rows)
            # A grammar needs the mask recomputed after every token: one step per dispatch.
            grammar = any(x.grammar_pending for x in rows)
            n = 1 if waiting or grammar else max(1, min(self.decode_steps, left))
            tokens = [x.next_token for x in rows]
            current = self._dispatch(rows, n, tokens, self._masks(rows) if grammar else None)
        if self.pipeline and (n := self._next_steps(current)):
            self._inflight = self._dispatch(current.rows, n, None)
        self._land(current)

    def _dispatch(self, rows: list[_Live], n: int, tokens, masks=None) -> _Dispatch:
        """Send n decode steps for `rows`, fed `tokens` (None: the tokens the previous
        dispatch sampled, on the device). Returns at once."""
        max_pos = max(x.base + x.fed for x in rows)
        pending = self.runner.decode([x.row.index for x in rows], tokens, max_pos, n, masks)
        for live in rows:
            live.fed += n  # written into the cache by this dispatch (read or not)
        return _Dispatch(rows, n, pending)

    def _next_steps(self, current: _Dispatch) -> int:
        """How many steps to send behind `current` before reading it (0: none, read first):
        only in the steady state, where nothing the host learns from `current` could change
        the next dispatch except a row finishing (whose extra steps are then dropped)."""
        if self._aborts or self.scheduler.queue:
            return 0
        rows = current.rows
        if len(rows) != len(self._live) or any(self._live.get(x.row.index) is not x for x in rows):
            return 0  # a row finished or was added since: compact / re-plan first
        if any(x.grammar_pending for x in rows):
            return 0
        # tokens each row may still produce once `current` is read (at most); a row that
        # `current` takes to its limit rides along in vain, the others set the step count
        left = [x.text.max_tokens - len(x.text.tokens) - current.n for x in rows]
        going = [n for n in left if n > 0]
        return min(self.decode_steps, *going) if going else 0

    def _take_inflight(self) -> _Dispatch:
        d, self._inflight = self._inflight, None
        assert d is not None
        return d

    def _land(self, d: _Dispatch) -> None:
        """Read a dispatch's tokens (waiting for it) and hand them to its rows' requests;
        rows whose request finished since it was sent are skipped."""
        out = d.tokens.get()
        asked = any(x.req.logprobs for x in d.rows)
        lps = d.tokens.token_logprobs() if asked else None
        for i, live in enumerate(d.rows):
            if live.text.finish_reason or self._live.get(live.row.index) is not live:
                continue
            entries = None
            if lps is not None and live.req.logprobs:
                entries = host_entries(lps[0][:, i], lps[1][:, i], lps[2][:, i], out[:, i])
            self._consume(live, [int(t) for t in out[:, i]], entries)

    @staticmethod
    def _entries(pending: PendingTokens, i: int) -> list[TokenLogprob]:
        """The log-probabilities of the tokens `pending` sampled for its i-th row."""
        chosen, ids, top = pending.token_logprobs()
        return host_entries(chosen[:, i], ids[:, i], top[:, i], pending.get()[:, i])

    def _masks(self, rows: list[_Live]) -> np.ndarray | None:
        """[len(rows), W] bitmasks, or None when no row is constrained (the cheap path)."""
        if not any(x.constrained for x in rows):
            return None
        out = np.empty((len(rows), mask_words(self.model.config.vocab_size)), np.int32)
        for i, live in enumerate(rows):
            live.mask_row(out[i])
        return out

    def _advance_grammar(self, live: _Live, token: int) -> None:
        """Feed the constraint the token it allowed."""
        c = live.constraint
        if token not in self.model.tokenizer.eog_ids and not c.finished:
            if not c.accept(token):
                raise RuntimeError(f"grammar rejected token {token} it had allowed")

    def _consume(
        self, live: _Live, tokens: list[int], lps: list[TokenLogprob] | None = None
    ) -> None:
        """Turn sampled tokens (and their log-probabilities, if asked) into events; finish
        the answer when its stream ends. A token's log-probability is reported when the
        token is part of the answer (not an end-of-generation token)."""
        try:
            if not live.sampled:
                live.stats.first_token_seconds = time.perf_counter() - live.submitted
            pieces, kept = [], []
            for j, t in enumerate(tokens):
                live.sampled.append(t)
                before = len(live.text.tokens)
                pieces.append(live.text.push(t))
                if lps is not None and len(live.text.tokens) > before:
                    kept.append(lps[j])
                if live.constraint is not None:
                    self._advance_grammar(live, t)
                if live.text.finish_reason:
                    break
            text = "".join(pieces)
            scored, live.prompt_logprobs = live.prompt_logprobs, None
            if text or kept or scored is not None or not live.text.finish_reason:
                live.sink(TokenEvent(EventKind.TOKEN, text=text, token_ids=tuple(tokens),
                                     index=live.index, logprobs=tuple(kept),
                                     prompt_logprobs=scored))  # fmt: skip
            if live.text.finish_reason:
                self._finish(live, FinishReason(live.text.finish_reason))
        except Exception as e:  # one request's failure is its own
            log.exception("request %s failed", live.req.id)
            self._finish(live, FinishReason.ERROR, error=str(e))

    def _finish(self, live: _Live, reason: FinishReason, error: str = "") -> None:
        self._live.pop(live.row.index, None)
        stats = live.stats
        stats.completion_tokens = len(live.text.tokens)
        stats.decode_seconds = time.perf_counter() - live.decode_start
        with self._cv:
            self.scheduler.release(live.row, *self._held(live))
            self.total_processed += 1
        if reason is FinishReason.ERROR:
            live.sink(TokenEvent(EventKind.ERROR, error=error, stats=stats, finish_reason=reason,
                                 index=live.index))  # fmt: skip
        else:
            stopped = live.text.stop_string
            live.sink(TokenEvent(EventKind.DONE, finish_reason=reason, stats=stats,
                                 stop_sequence=stopped, index=live.index))  # fmt: skip

    def _held(self, live: _Live) -> tuple[list[int], int]:
        """What a finished answer's row holds (`_Live.cached`), and how many of those tokens
        its state holds exactly (0: unknown).

        A row that sampled an end-of-generation token stopped on the device right there
        (`tsjax.steps.Steps`), the token itself not fed: its state is exactly the prompt and
        the answer before it. Any other end (a stop string, the token limit, an abort) may
        have been overtaken by steps already on their way, which fed tokens the host never
        read: such a row is exact only if every token it was fed is known."""
        known = len(live.req.cache_ids) + len(live.sampled)
        fed = live.fed
        if live.sampled and live.sampled[-1] in self.model.tokenizer.eog_ids:
            fed = min(fed, known - 1 - live.base)
        held = (list(live.req.cache_ids) + live.sampled)[: live.base + fed]
        return held, len(held) if live.base + fed <= known else 0

    def _fail_all(self, message: str) -> None:
        """Answer every request in hand with an error (live, being started, queued) and
        free their rows; the runner's state is rebuilt."""
        self._inflight = None  # the runner's state and feed are about to be replaced
        for live in list(self._live.values()):
            self._finish(live, FinishReason.ERROR, error=message)
        with self._cv:
            failed = [(req, sink) for req, sink, _ in self._waiting.values()]
            failed = [*self._starting.values(), *failed]
            for req, _ in failed:
                self.scheduler.remove(req.id)
            self._waiting.clear()
            self._starting.clear()
            for row in self.scheduler.rows:  # rows of requests that never started
                if row.request is not None and row.index not in self._live:
                    row.request = None
            self.scheduler.forget()  # the cache may be gone: trust nothing in it
        # Answered once the rows are free: a client that sees its error may count on them.
        for req, sink in failed:
            for i in range(req.n):
                sink(TokenEvent(EventKind.ERROR, error=message,
                                finish_reason=FinishReason.ERROR, index=i))  # fmt: skip
        self.runner.reset()
