"""Pure-Python scheduling: which request gets which cache row, and from which prefix.

Each cache row remembers the tokens it holds. A new request takes the free row sharing the
longest prefix with its prompt (a conversation's next turn finds its previous turn, answer
included) and prefills only the rest. A request for `n` answers waits until n rows are free and
takes them together (its prompt is prefilled once, into the first, and copied). Misses take the
least recently used free row among the lowest rows: decode runs on the cache rows [0, b) for
the smallest bucket b holding every live row, so live requests are kept low (`compaction` says
which rows to exchange when they are not).
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


class Scheduler:
    def __init__(self, rows: int, buckets: tuple[int, ...] | None = None, rewinds: bool = True):
        """`buckets`: the decode batch buckets (row counts a decode step runs); default one
        bucket of all rows. `rewinds`: whether a cache row can resume from any prefix of
        what it holds (keys and values can; a recurrent layer's state cannot, and then no
        prefix is reused: resuming from a saved state is the runner's `restore` /
        `checkpoint`, for the scheduler to use once it tracks where rows saved theirs)."""
        self.rows = [Row(i) for i in range(rows)]
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
        best, reuse = min(low, key=lambda r: r.last_used), 0
        # Rows remember an image's positions by a pseudo id of its digest (`cache_ids`).
        prompt = req.cache_ids
        if req.reuse_prefix and self.rewinds:
            for row in sorted(free, key=lambda r: r.last_used):
                k = common_prefix(row.tokens, prompt)
                if k > reuse:
                    best, reuse = row, k
        # At least one prompt token must be prefilled to produce the next-token logits, and
        # an image is prefilled whole or not at all (its positions attend to each other).
        reuse = req.reusable(min(reuse, len(prompt) - 1))
        self._clock += 1
        best.request, best.last_used = req, self._clock
        best.tokens = list(prompt[:reuse])
        others = sorted((r for r in free if r is not best),
                        key=lambda r: (r.index >= limit, r.last_used))  # fmt: skip
        for row in others[: n - 1]:
            row.request, row.last_used, row.tokens = req, self._clock, []
        return req, best, reuse

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

    def release(self, row: Row, cached_tokens: list[int]) -> None:
        """The request is finished; the row keeps `cached_tokens` for later reuse."""
        self._clock += 1
        row.request, row.tokens, row.last_used = None, cached_tokens, self._clock
