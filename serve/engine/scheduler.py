"""Pure-Python scheduling: which request gets which cache row, and from which prefix.

Each cache row remembers the tokens it holds. A new request takes the free row sharing the
longest prefix with its prompt (a conversation's next turn finds its previous turn, answer
included) and prefills only the rest. A request for `n` answers waits until n rows are free and
takes them together (its prompt is prefilled once, into the first, and copied). Misses take the
least recently used free row among the lowest rows: decode runs on the cache rows [0, b) for
the smallest bucket b holding every live row, so live requests are kept low (`compaction` says
which rows to exchange when they are not).

A cache whose state cannot rewind (a recurrent layer's: `tsjax.cache.LayerState.REWINDS`)
resumes a row only from a state it holds exactly: the row's own state where it stopped
(`Row.live`: the end of the previous answer) or one of its checkpoint slots (`Row.saved`:
states saved during earlier prefills, at the positions each request asked for, e.g. where its
last user message and its generation prompt start). A shared prefix with no such state at
its end is not a hit: the row resumes from the longest one inside the prefix, or from
nothing. `plan_checkpoints` gives each new request its slots.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tsjax.shapes import bucket_for

if TYPE_CHECKING:  # its module imports JAX (through tsjax.sampling); this one must not
    from serve.engine.types import GenerationRequest


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


@dataclass
class Row:
    index: int
    tokens: list[int] = field(default_factory=list)  # what the cache row holds, in order
    request: GenerationRequest | None = None
    last_used: int = 0
    # A cache that cannot rewind: how many of `tokens` each checkpoint slot's saved state
    # holds, and the row's own state (0: none); `resume`: the slot the admitted request
    # restores (-1: none, it continues from the row's own state or starts afresh).
    saved: list[int] = field(default_factory=list)
    live: int = 0
    resume: int = -1


class Scheduler:
    def __init__(
        self,
        rows: int,
        buckets: tuple[int, ...] | None = None,
        rewinds: bool = True,
        checkpoints: int = 0,
    ):
        """`buckets`: the decode batch buckets (row counts a decode step runs); default one
        bucket of all rows. `rewinds`: whether a cache row can resume from any prefix of
        what it holds (keys and values can; a recurrent layer's state cannot: it resumes
        from its own state or from one of its `checkpoints` slots, see the module
        docstring)."""
        self.rows = [Row(i, saved=[0] * checkpoints) for i in range(rows)]
        self.rewinds = rewinds
        self.buckets = tuple(sorted({min(b, rows) for b in (buckets or ())} | {rows}))
        self.queue: deque[GenerationRequest] = deque()
        self._clock = 0

    def enqueue(self, req: GenerationRequest) -> None:
        self.queue.append(req)

    def remove(self, req_id: str) -> GenerationRequest | None:
        for r in self.queue:
            if r.id == req_id:
                self.queue.remove(r)
                return r
        return None

    def position(self, req_id: str) -> int:
        for i, r in enumerate(self.queue):
            if r.id == req_id:
                return i + 1
        return 0

    def free_rows(self) -> list[Row]:
        return [r for r in self.rows if r.request is None]

    def active_rows(self) -> list[Row]:
        return [r for r in self.rows if r.request is not None]

    def can_admit(self) -> bool:
        """Whether the next request in line has the rows it needs free."""
        return bool(self.queue) and len(self.free_rows()) >= max(self.queue[0].n, 1)

    def admit(self) -> tuple[GenerationRequest, Row, int] | None:
        """Pop the next request and pick its row (the one to prefill; `siblings` are the
        others of an n-answer request). Returns (request, row, reused tokens). The queue is
        FIFO: a request waiting for several rows holds back the ones behind it."""
        if not self.can_admit():
            return None
        free = self.free_rows()
        req = self.queue.popleft()
        n = max(req.n, 1)
        # Without a prefix to reuse: the least recently used of the free rows below the bucket
        # that the live rows plus these need (so decode stays in that bucket).
        limit = self.bucket(len(self.rows) - len(free) + n)
        low = [r for r in free if r.index < limit] or free
        best, reuse, slot = min(low, key=lambda r: r.last_used), 0, -1
        # Rows remember an image's positions by a pseudo id of its digest (`cache_ids`).
        prompt = req.cache_ids
        if req.reuse_prefix:
            for row in sorted(free, key=lambda r: r.last_used):
                k, s = self.resumable(row, req)
                if k > reuse:
                    best, reuse, slot = row, k, s
        self._clock += 1
        shared = common_prefix(best.tokens, prompt) if req.reuse_prefix else 0
        # saved states past the shared prefix are of another sequence now
        best.saved = [p if p <= shared else 0 for p in best.saved]
        best.request, best.last_used = req, self._clock
        best.tokens, best.live, best.resume = list(prompt[:reuse]), 0, slot
        others = sorted((r for r in free if r is not best),
                        key=lambda r: (r.index >= limit, r.last_used))  # fmt: skip
        for row in others[: n - 1]:
            row.request, row.last_used, row.tokens = req, self._clock, []
            row.saved, row.live, row.resume = [0] * len(row.saved), 0, -1
        return req, best, reuse

    def resumable(self, row: Row, req: GenerationRequest) -> tuple[int, int]:
        """How many of `req`'s prompt tokens `row` can serve, and the checkpoint slot to
        restore for them (-1: none). At least one prompt token is left to prefill (for the
        next token's logits), and an image is prefilled whole or not at all (its positions
        attend to each other). A cache that rewinds serves the whole shared prefix; one that
        does not, the longest prefix of it whose state the row holds exactly."""
        prompt = req.cache_ids
        n = req.reusable(min(common_prefix(row.tokens, prompt), len(prompt) - 1))
        if self.rewinds:
            return n, -1
        best, slot = (row.live, -1) if 0 < row.live <= n else (0, -1)
        for s, p in enumerate(row.saved):
            if best < p <= n and req.reusable(p) == p:
                best, slot = p, s
        return (best if req.reusable(best) == best else 0), slot

    def plan_checkpoints(self, row: Row, positions: list[int], start: int) -> dict[int, int]:
        """Slots for the states `row`'s request saves at `positions` of its prompt (past the
        reused `start`): {position: slot}. Free slots go first, then those holding the
        shortest prefixes; the request's furthest positions win when slots are short (the
        slot it restores from is read before anything is saved)."""
        if self.rewinds or not row.saved:
            return {}
        want = sorted({p for p in positions if p > start})[-len(row.saved) :]
        order = sorted(range(len(row.saved)), key=lambda s: row.saved[s])
        plan = dict(zip(want, order, strict=False))
        for p, s in plan.items():
            row.saved[s] = p
        return plan

    def siblings(self, req: GenerationRequest, row: Row) -> list[Row]:
        """The other rows `admit` gave `req` besides `row` (n - 1 of them), lowest first."""
        return [r for r in self.rows if r.request is req and r is not row]

    def bucket(self, n: int) -> int:
        """The smallest decode bucket of at least n rows (n <= the number of rows)."""
        return bucket_for(n, self.buckets)

    def compaction(self) -> list[tuple[int, int]]:
        """(live row, free row) pairs to exchange so that every live row lies below the
        smallest bucket that holds them all: live rows above it, highest first, each with the
        least recently used free row below it."""
        live = [r for r in self.rows if r.request is not None]
        limit = self.bucket(len(live))
        high = sorted((r for r in live if r.index >= limit), key=lambda r: -r.index)
        if not high:
            return []
        free = sorted(
            (r for r in self.rows[:limit] if r.request is None), key=lambda r: r.last_used
        )
        return [(h.index, f.index) for h, f in zip(high, free, strict=False)]

    def swap(self, a: int, b: int) -> None:
        """Rows a and b exchanged contents (the cache rows were swapped): swap what they hold."""
        ra, rb = self.rows[a], self.rows[b]
        ra.tokens, rb.tokens = rb.tokens, ra.tokens
        ra.request, rb.request = rb.request, ra.request
        ra.last_used, rb.last_used = rb.last_used, ra.last_used
        ra.saved, rb.saved = rb.saved, ra.saved
        ra.live, rb.live = rb.live, ra.live
        ra.resume, rb.resume = rb.resume, ra.resume

    def release(self, row: Row, cached_tokens: list[int], live: int = 0) -> None:
        """The request is finished; the row keeps `cached_tokens` for later reuse. `live`:
        how many of them the row's own state holds exactly (a cache that cannot rewind
        resumes only there or from a checkpoint; 0: nowhere)."""
        self._clock += 1
        row.request, row.tokens, row.last_used = None, cached_tokens, self._clock
        row.live = live

    def forget(self) -> None:
        """The cache was lost: no row holds anything."""
        for row in self.rows:
            row.tokens, row.live, row.resume = [], 0, -1
            row.saved = [0] * len(row.saved)
