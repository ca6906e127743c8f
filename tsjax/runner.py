"""The runner: the compiled steps with the state they run on, behind one typed seam.

`Runner` is what the engine (and `tsjax.generation`) drive: prefill prompts into rows, decode
rows, exchange or copy rows, start over. `LocalRunner` runs the steps in this process and owns,
as values, the params, the cache, the sampler state and the in-flight device feed (the tokens
the last decode sampled, which the next one may take without them leaving the device). Several
processes: `serve.engine.lockstep.StepChannel` implements the same `Runner` by publishing each
call to the followers before running it on its own `LocalRunner`, and each follower replays the
calls on its own.

State is an argument of the compiled steps and stays one here: every call hands the runner's
cache and sampler state to a step (which donates them) and keeps what it returns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import jax
import numpy as np

from tsjax.sampling import SamplingParams
from tsjax.shapes import StepShapes
from tsjax.sharding import bytes_per_device
from tsjax.spans import EmbedSpan
from tsjax.steps import PendingTokens, Steps


@dataclass(frozen=True)
class MemoryReport:
    """What a runner holds on its devices: params and cache bytes (whole, every shard
    counted once) and each device's share of both (this process's devices)."""

    params_bytes: int
    cache_bytes: int
    per_device: dict[int, int] = field(default_factory=dict)  # device id -> bytes

    def describe(self) -> str:
        return (
            f"params {self.params_bytes / 2**20:.1f} MiB, cache {self.cache_bytes / 2**20:.1f} MiB"
        )


class Runner(Protocol):
    """The seam between the engine and the compiled steps (see the module docstring)."""

    shapes: StepShapes

    @property
    def rewinds(self) -> bool:
        """Whether a row can resume from any prefix of what it holds (`tsjax.cache.Cache`)."""
        ...

    def reset(self) -> None:
        """A fresh cache and sampler state (every row empty), no feed."""
        ...

    def warmup(
        self,
        decode_steps: tuple[int, ...] = (1,),
        max_prompt: int | None = None,
        batches: tuple[int, ...] = (1,),
        span_lens: tuple[int, ...] = (),
    ) -> float:
        """Compile every step shape (`Steps.warmup`), then `reset`. Returns seconds."""
        ...

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
        """Prefill prompts into rows (`Steps.prefill`; `spans`: each prompt's embedded spans,
        host arrays) and return at once: `get()` gives each one's first token ([1, n]); the
        log-probabilities and pooled states come with it."""
        ...

    def decode(
        self,
        rows: list[int],
        tokens: list[int] | None,
        max_pos: int,
        n_steps: int = 1,
        masks: np.ndarray | None = None,
    ) -> PendingTokens:
        """Send `n_steps` decode steps for `rows` (`Steps.decode`) and return at once;
        `tokens=None` continues from the device feed of the previous decode of the same
        rows (no prefill, swap or reset since)."""
        ...

    def swap_rows(self, pairs: list[tuple[int, int]]) -> None:
        """Exchange rows (`Steps.swap_rows`)."""
        ...

    def can_swap(self) -> bool:
        """Whether `swap_rows` runs now without waiting for its program to compile
        (`Steps.swap_ready`); the engine's moves of rows are an optimization that waits."""
        ...

    def prefill_ready(self, lens: list[int], starts: list[int]) -> bool:
        """Whether text prompts of `lens` new tokens from `starts` prefill together now
        without waiting for a program to compile (`Steps.prefill_ready`); one by one they
        always can."""
        ...

    def when_idle(self) -> None:
        """Nothing is running or waiting: compile the shapes met meanwhile in the background
        (`Steps.request_deferred`)."""
        ...

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
        """Copy rows with fresh sampling states (`Steps.copy_rows`)."""
        ...

    def memory(self) -> MemoryReport:
        """Params and cache bytes, per device."""
        ...


class LocalRunner:
    """A `Runner` over `steps` in this process, with its own params, cache, sampler state and
    device feed. A step that fails leaves no usable state (the cache was donated to it): the
    runner refuses further steps until `reset`."""

    def __init__(self, steps: Steps, params: Any):
        self.steps, self.params = steps, params
        self.shapes: StepShapes = steps.shapes
        self._cache: Any = None
        self._sampler: Any = None
        self._feed: PendingTokens | None = None
        self._lost = ""
        self.reset()

    @property
    def rewinds(self) -> bool:
        return self._cache.rewinds

    def reset(self) -> None:
        self._cache, self._sampler = self.steps.new_cache(), self.steps.new_sampler()
        self._feed, self._lost = None, ""
        jax.block_until_ready(self._cache)

    def warmup(
        self,
        decode_steps: tuple[int, ...] = (1,),
        max_prompt: int | None = None,
        batches: tuple[int, ...] = (1,),
        span_lens: tuple[int, ...] = (),
    ) -> float:
        secs = self.steps.warmup(self.params, decode_steps, max_prompt, batches, span_lens)
        self.reset()
        return secs

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
        self._feed = None  # rows start afresh: the next decode takes host tokens
        first, _ = self._step(
            self.steps.prefill,
            prompts,
            rows,
            sampling,
            starts=starts,
            histories=histories,
            seeds=seeds,
            masks=masks,
            restore=restore,
            checkpoint=checkpoint,
            spans=spans,
            logprobs=logprobs,
            next_tokens=next_tokens,
            wait=False,
        )
        return first

    def decode(
        self,
        rows: list[int],
        tokens: list[int] | None,
        max_pos: int,
        n_steps: int = 1,
        masks: np.ndarray | None = None,
    ) -> PendingTokens:
        if tokens is None:  # checked here, before a step could take the state
            feed = self._feed
            if feed is None or not np.array_equal(feed.where, np.asarray(rows)):
                raise ValueError("tokens=None continues the previous decode's rows only")
            tokens = feed
        self._feed = None
        pending, _ = self._step(
            self.steps.decode, rows, tokens, max_pos, n_steps, masks=masks, wait=False
        )
        self._feed = pending
        return pending

    def swap_rows(self, pairs: list[tuple[int, int]]) -> None:
        self._feed = None  # rows moved: the next decode takes host tokens
        self._step(self.steps.swap_rows, pairs)

    def can_swap(self) -> bool:
        return self.steps.swap_ready()

    def prefill_ready(self, lens: list[int], starts: list[int]) -> bool:
        return self.steps.prefill_ready(lens, starts)

    def when_idle(self) -> None:
        self.steps.request_deferred()

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
        self._feed = None  # rows changed: the next decode takes host tokens
        self._step(self.steps.copy_rows, src, dst, lengths, sampling, histories, seeds, logprobs)

    def memory(self) -> MemoryReport:
        """From the arrays' shapes and shardings only, so it is safe while a step holds the
        (donated) cache."""
        params, cache = bytes_per_device(self.params), bytes_per_device(self._cache)
        per_device = {d: params.get(d, 0) + cache.get(d, 0) for d in params.keys() | cache}
        return MemoryReport(_nbytes(self.params), _nbytes(self._cache), per_device)

    def _step(self, fn, *args, **kwargs):
        """Run a step on the runner's cache and sampler and keep the ones it returns. A step
        that raises may have taken them (donated), so they count as lost."""
        if self._lost:
            raise RuntimeError(
                f"the runner lost its cache in a failed step ({self._lost}): reset() first"
            )
        try:
            out, extra, self._cache, self._sampler = fn(
                self.params, self._cache, self._sampler, *args, **kwargs
            )
        except Exception as e:
            self._feed, self._lost = None, repr(e)[:200]
            raise
        return out, extra


def _nbytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))
