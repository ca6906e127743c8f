"""Pure-Python scheduling: which request gets which cache row, and from which prefix.

Each cache row remembers the tokens it holds. A new request takes the free row sharing the
longest prefix with its prompt (a conversation's next turn finds its previous turn, answer
included) and prefills only the rest; ties and misses take the least recently used row.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

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
    def __init__(self, rows: int):
        self.rows = [Row(i) for i in range(rows)]
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

    def admit(self) -> tuple[GenerationRequest, Row, int] | None:
        """Pop the next request and pick its row. Returns (request, row, reused tokens)."""
        free = self.free_rows()
        if not self.queue or not free:
            return None
        req = self.queue.popleft()
        best, reuse = None, -1
        for row in sorted(free, key=lambda r: r.last_used):
            n = common_prefix(row.tokens, req.prompt_ids) if req.reuse_prefix else 0
            if n > reuse:
                best, reuse = row, n
        # At least one prompt token must be prefilled to produce the next-token logits.
        reuse = min(reuse, len(req.prompt_ids) - 1)
        self._clock += 1
        best.request, best.last_used = req, self._clock
        best.tokens = list(req.prompt_ids[:reuse])
        return req, best, reuse

    def release(self, row: Row, cached_tokens: list[int]) -> None:
        """The request is finished; the row keeps `cached_tokens` for later reuse."""
        self._clock += 1
        row.request, row.tokens, row.last_used = None, cached_tokens, self._clock
