"""Every static shape the compiled steps take, and the arithmetic that picks them: buckets of
rows, tokens and cache positions, and the CPU cache layout's blocks. Plain Python, no JAX, so
the scheduler (which rounds row counts to decode buckets) and command lines can import it
without starting JAX.

The layout policy numbers live here too, each with the measurement that set it (README, "The
KV cache on CPU: blocks", gives the `benchmarks.decode` commands):

- `MIN_ROW_BLOCK`: the fewest rows a cache row block holds;
- `SKIP_MIN_ROWS`: the fewest rows a row block decodes with for it to skip an unreached
  position block;
- `StepShapes.split_span`: position spans from this long are two blocks;
- `MIN_DECODE_ROWS`: per weight format, the fewest rows an XLA:CPU decode step computes.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, replace

#: The fewest rows a cache row block holds (CPU layout). A decode batch that ends inside a
#: block reads only its own rows of it, so a big block costs small batches little, while each
#: block is more, smaller ops per layer and a block's rows skip an unreached half span only
#: all together. With `split_span` 128 this took a 16-row bf16 step at 150 positions from
#: 42.5-43.2 to 39.3-40.5 ms, and 4 rows or one float32 row no slower.
MIN_ROW_BLOCK = 16

#: Row blocks decoding at least this many rows skip a last position block none of their rows
#: reaches. Fewer rows read little cache, and the conditional costs them more than it saves:
#: a 1-row float32 step at 150 positions took 31.4 ms with it and 23.1 without
#: (python -m benchmarks.decode --rows 32 --live 1 --max-len 512 --positions 150).
SKIP_MIN_ROWS = 8

#: Fewest rows a decode step computes per weight format on CPU: XLA:CPU's bfloat16 and int8
#: matmuls are slow for one row (no fast matrix-vector kernel) and fast from 2 and 4 rows, so
#: narrower batches are padded there (rows past the cache's compute and are dropped).
#: Measured: a 4-row int8 step beats a 1-row float32 one. Other backends have fast narrow
#: matrix-vector kernels: no padding.
#: The block formats' CPU kernels (`tsjax.kernels.blockdot`) run one row at memory speed.
MIN_DECODE_ROWS: dict[str | None, int] = {None: 1, "bf16": 2, "int8": 4, "q8": 1, "q4": 1}

#: (row bounds, position bounds) of the blocked cache layout; each bound is a block's end.
BlockBounds = tuple[tuple[int, ...], tuple[int, ...]]


def geometric_buckets(lo: int, hi: int, factor: int) -> tuple[int, ...]:
    """lo, lo * factor, ... below hi, then hi: (16, 32, 64, 100) for (16, 100, 2)."""
    out, b = [], lo
    while b < hi:
        out.append(b)
        b *= factor
    out.append(hi)
    return tuple(out)


def bucket_for(n: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket holding n (buckets sorted); ValueError past the largest."""
    i = bisect.bisect_left(buckets, n)
    if i == len(buckets):
        raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")
    return buckets[i]


def steps_bucket(n: int) -> int:
    """The compiled step-count capacity for a dispatch of n decode steps: 4, 8, 16, ..."""
    return max(4, 1 << (max(n, 1) - 1).bit_length())


def split_blocks(bounds: tuple[int, ...], min_span: int) -> tuple[int, ...]:
    """Block bounds with every block after the first that spans at least `min_span` positions
    cut in two halves: (128, 256, 512, 1024) with 256 -> (128, 256, 384, 512, 768, 1024).
    Decode attention skips the upper half of its bucket's last span when no row reaches it."""
    out = [bounds[0]]
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        if hi - lo >= max(min_span, 2) and (hi - lo) % 2 == 0:
            out.append(lo + (hi - lo) // 2)
        out.append(hi)
    return tuple(out)


def block_sizes(bounds: tuple[int, ...]) -> list[int]:
    """Block bounds (each block's end) -> block sizes: (4, 16, 32) -> [4, 12, 16]."""
    return [hi - lo for lo, hi in zip((0, *bounds[:-1]), bounds, strict=True)]


@dataclass(frozen=True)
class StepShapes:
    """Every static shape the steps compile for."""

    rows: int  # decode slots (cache rows), B
    max_len: int  # cache positions per row, S
    prefill_lens: tuple[int, ...]  # token buckets T for prefill
    prefill_batches: tuple[int, ...]  # batch buckets b for prefill
    attn_lens: tuple[int, ...]  # buckets of cache positions read by attention
    decode_batches: tuple[int, ...] = ()  # buckets of live rows decoded together
    # Position spans between attention buckets at least this long are two cache blocks (CPU
    # layout), so decode reads the upper half only when a row reaches it (measured with
    # `MIN_ROW_BLOCK`, above). None: no span is split. `default` splits only where a row
    # block is big enough to skip at all (`skip_min_rows`): elsewhere a split only adds ops
    # and compile time.
    split_span: int | None = 128
    min_row_block: int = MIN_ROW_BLOCK  # CPU layout: the fewest rows of a row block
    skip_min_rows: int = SKIP_MIN_ROWS  # CPU layout: row blocks this big skip unread spans
    # Saved states per row for layers that cannot rewind (recurrent ones; `tsjax.cache`):
    # where a conversation's next turn can resume. Each costs one more copy of every
    # recurrent layer's per-row state; keys and values need none.
    checkpoints: int = 2

    def __post_init__(self):
        if not self.decode_batches:
            object.__setattr__(self, "decode_batches", geometric_buckets(1, self.rows, 4))

    def cache_blocks(self) -> BlockBounds:
        """(row bounds, position bounds) of the blocked cache layout: position blocks end at
        the attention buckets, long spans cut in halves (`split_span`); row blocks end at the
        decode buckets, but no row block is smaller than `min_row_block` rows."""
        least = self.min_row_block
        rows = {min(max(b, least), self.rows) for b in self.decode_batches} | {self.rows}
        if self.split_span is None:
            return tuple(sorted(rows)), self.attn_lens
        return tuple(sorted(rows)), split_blocks(self.attn_lens, self.split_span)

    def padded_decode(self, quant: str | None, cpu: bool) -> StepShapes:
        """These shapes with every decode bucket at least `MIN_DECODE_ROWS[quant]` rows on
        CPU (rows past the cache's are padding: they compute and are dropped)."""
        least = MIN_DECODE_ROWS[quant] if cpu else 1
        if least <= 1:
            return self
        return replace(
            self, decode_batches=tuple(sorted({max(b, least) for b in self.decode_batches}))
        )

    @classmethod
    def default(
        cls,
        rows: int,
        max_len: int,
        min_prefill: int = 16,
        min_attn: int = 128,
        min_row_block: int = MIN_ROW_BLOCK,
        checkpoints: int = 2,
    ) -> StepShapes:
        shapes = cls(
            rows=rows,
            max_len=max_len,
            prefill_lens=geometric_buckets(min(min_prefill, max_len), max_len, 2),
            prefill_batches=geometric_buckets(1, rows, 2),
            attn_lens=geometric_buckets(min(min_attn, max_len), max_len, 2),
            min_row_block=min_row_block,
            checkpoints=checkpoints,
        )
        if max(block_sizes(shapes.cache_blocks()[0])) < shapes.skip_min_rows:
            shapes = replace(shapes, split_span=None)  # no row block would skip a half
        return shapes
