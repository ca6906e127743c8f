"""Stop strings matched on decoded text, with hold-back so stop text is never emitted.

Text arrives in arbitrary chunks (one token's worth, or less); a stop string may span
chunks. The matcher emits everything that can no longer be the start of a stop string and
holds back the longest tail that still could.
"""

from __future__ import annotations


class StopMatcher:
    def __init__(self, stops: list[str] | tuple[str, ...] = ()):
        self.stops = tuple(s for s in stops if s)
        self._held = ""
        self.stopped: str | None = None  # the stop string that matched

    def push(self, text: str) -> str:
        """Feed decoded text; return what is safe to emit now ('' once stopped)."""
        if self.stopped is not None:
            return ""
        buf = self._held + text
        if not self.stops:
            self._held = ""
            return buf
        hit = min(
            ((i, s) for s in self.stops if (i := buf.find(s)) >= 0),
            default=None,
            key=lambda x: x[0],
        )
        if hit is not None:
            self.stopped = hit[1]
            self._held = ""
            return buf[: hit[0]]
        keep = self._partial_tail(buf)
        self._held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep]

    def flush(self) -> str:
        """End of generation: whatever was held back is real text after all."""
        out, self._held = ("" if self.stopped is not None else self._held), ""
        return out

    def _partial_tail(self, buf: str) -> int:
        """Length of the longest suffix of buf that is a proper prefix of a stop string."""
        best = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(buf)), best, -1):
                if buf.endswith(s[:k]):
                    best = k
                    break
        return best
