"""Compiled programs on demand (`Steps.lazy`, as the server runs): warm-up compiles only the
first shapes, every request shape is served at once by a compiled program that covers it
while its own compiles in the background, and nothing recompiles once it has. Default rows
from the model and the machine (`tsjax.capacity`)."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
import weakref

import jax
import jax.numpy as jnp
from gguf_factory import write_tiny_gguf

from serve.engine import Engine, EventKind, GenerationRequest
from tsjax import programs as programs_mod
from tsjax.capacity import choose_rows, kv_bytes_per_row
from tsjax.model import load
from tsjax.programs import Programs
from tsjax.sampling import SamplingParams
from tsjax.shapes import StepShapes


def _serve(engine, prompts, max_tokens=12):
    async def one(prompt):
        req = GenerationRequest(prompt, SamplingParams.greedy(), max_tokens=max_tokens)
        return [ev async for ev in engine.generate(req)]

    async def main():
        return await asyncio.gather(*(one(p) for p in prompts))

    runs = asyncio.run(main())
    assert all(r[-1].kind is EventKind.DONE for r in runs)
    return [[t for ev in r for t in ev.token_ids] for r in runs]


def _settled(steps, timeout: float = 600.0) -> bool:
    """Once the engine is idle it asks for the shapes it deferred: wait for that, then for
    their compiles."""
    end = time.monotonic() + timeout
    while steps.deferred and time.monotonic() < end:
        time.sleep(0.01)
    return not steps.deferred and steps.programs.idle(timeout=max(0.0, end - time.monotonic()))


def test_lazy_programs_cover_every_shape_then_compile_once(tmp_path):
    path = write_tiny_gguf(tmp_path / "llama.gguf", "llama")
    shapes = StepShapes.default(rows=4, max_len=128, min_prefill=16, min_attn=32)
    model = load(path, progress=False, shapes=shapes)
    steps = model.steps
    steps.lazy = True
    engine = Engine(model, decode_steps=4, prefill_chunk=32)
    engine.warmup()
    first = set(steps.first_keys((1, 4), 32))
    assert first <= set(steps.programs.keys()) <= first | set(steps.later_keys((1, 4), 32))
    assert len(first) == 2  # the longest prefill chunk, the decode of every row
    assert steps.programs.idle(timeout=600)  # later_keys, queued at warm-up
    engine.start()
    try:
        base = [7, 3, 11, 19, 23, 5]
        # fresh prompts of several buckets, one longer than a prefill chunk, then prompts
        # that extend earlier ones (prefill after a reused prefix)
        prompts = [base[:3], base * 3, base * 9, list(range(40, 60))]
        prompts += [base * 3 + [9, 9], base * 9 + list(range(30))]
        before = _serve(engine, prompts)
        assert not [h for h in steps.programs.history if h[1] == "demand"], "a request waited"
        assert _settled(steps)
        compiled = steps.programs.history
        assert [h for h in compiled if h[1] == "background"], "nothing compiled in the background"
        after = _serve(engine, prompts)  # mostly on their own programs now
        assert after == before, "a covering program answered differently"
        assert _settled(steps)
        keys = [h[0] for h in steps.programs.history]
        assert len(keys) == len(set(keys)), "a shape compiled twice"
        # prompts admitted together were prefilled one by one while their batch's program
        # was missing; it was asked for once the engine was idle, in the background
        assert [k for k in keys if k[0] == "prefill" and k[1] > 1]
        assert not [h for h in steps.programs.history if h[1] == "demand"], "a request waited"
    finally:
        engine.stop()


def test_default_rows_from_memory_and_cores():
    smollm = kv_bytes_per_row(30, 3, 64, 2048, 4)
    assert smollm == 94_371_840  # 2 x 30 layers x 3 KV heads x 64 x 4 bytes x 2048
    assert choose_rows(smollm, 20 * 2**30, 2).rows == 16  # cores bound it: 8 per core
    assert choose_rows(smollm, 20 * 2**30, 8).rows == 32  # memory: 54 rows fit, power of two
    assert choose_rows(smollm, 2 * 2**30, 8).rows == 4
    assert choose_rows(smollm, 2**20, 8).rows == 1  # never zero
    assert choose_rows(2**20, 0, None).rows == 64  # nothing known: the cap
    assert "cores" in choose_rows(smollm, 20 * 2**30, 2).reason


def _tiny_lower(key):
    n = key[1]
    return jax.jit(lambda x: x * n + 1).lower(jax.ShapeDtypeStruct((n,), jnp.float32))


def test_least_recently_used_programs_are_dropped_past_the_memory_map_budget(monkeypatch):
    first, second = Programs(_tiny_lower), Programs(_tiny_lower)
    # each program "maps" 100; the limit 500 at MAPS_SHARE 0.5 leaves room for two
    monkeypatch.setattr(programs_mod, "MAPS_SHARE", 0.5)
    monkeypatch.setattr(programs_mod, "max_memory_maps", lambda: 500)
    monkeypatch.setattr(
        programs_mod, "memory_maps", lambda: 100 * (len(first.keys()) + len(second.keys()))
    )
    old = second.compile(("k", 9))
    one = first.compile(("k", 1))  # 200 maps: within budget
    assert first.get(("k", 1)) is one and second.dropped == []
    first.compile(("k", 2))  # 300: the least recently used of both, second's, goes
    assert second.dropped == [("k", 9)] and second.keys() == []
    assert first.get(("k", 1)) is one  # ("k", 1) is now used after ("k", 2)
    first.compile(("k", 3))
    assert first.dropped == [("k", 2)] and set(first.keys()) == {("k", 1), ("k", 3)}
    again = second.compile(("k", 9))  # compiles again on its next use, and still works
    assert again is not old and float(again(jnp.ones(9))[0]) == 10.0
    assert [h[0] for h in second.history] == [("k", 9), ("k", 9)]


def test_an_unreferenced_programs_is_freed_with_its_executables(monkeypatch):
    monkeypatch.setattr(programs_mod, "IDLE_EXIT_S", 0.05)
    programs = Programs(_tiny_lower)
    programs.request(("k", 4))  # starts the background thread
    assert programs.idle(timeout=120) and ("k", 4) in programs
    exe = weakref.ref(programs.get(("k", 4)))
    ref = weakref.ref(programs)
    del programs
    deadline = time.monotonic() + 30
    while (ref() is not None or exe() is not None) and time.monotonic() < deadline:
        time.sleep(0.05)  # the idle thread exits, and with it its hold on the object
        gc.collect()
    assert ref() is None and exe() is None
    programs = Programs(_tiny_lower)  # a new request after the thread exited starts another
    programs.request(("k", 5))
    assert programs.idle(timeout=120) and ("k", 5) in programs


def test_a_program_needed_soon_goes_ahead_of_the_queue():
    busy, gate = threading.Event(), threading.Event()

    def lower(key):
        if key == ("k", 1):
            busy.set()
            gate.wait(60)  # holds the background thread while the queue fills
        return _tiny_lower(key)

    programs = Programs(lower)
    programs.request(("k", 1))
    assert busy.wait(60)
    for n in (2, 3, 4):
        programs.request(("k", n))
    programs.request(("k", 5), soon=True)
    programs.request(("k", 3), soon=True)  # queued already: moved to the front
    programs.request(("k", 2))  # queued already, not needed soon: stays where it is
    gate.set()
    assert programs.idle(timeout=120)
    assert [h[0][1] for h in programs.history] == [1, 3, 5, 2, 4]
    programs.close()


def _lazy_steps_asking(tmp_path, monkeypatch, shapes):
    """A tiny model's lazy steps (nothing compiled) whose background requests are recorded
    in `asked` ((key, soon) each) instead of compiled."""
    model = load(write_tiny_gguf(tmp_path / "llama.gguf", "llama"), progress=False, shapes=shapes)
    steps = model.steps
    steps.lazy = True
    steps._remember(model.params)
    asked: list = []
    monkeypatch.setattr(
        steps.programs, "request", lambda key, soon=False: asked.append((key, soon))
    )
    return steps, asked


def test_a_growing_answer_asks_for_its_next_attention_bucket_first(tmp_path, monkeypatch):
    # Halfway through its attention bucket a decode asks for the next one, ahead of the
    # background queue, for the rows it continues from (a chained decode must take the
    # device tokens' row count; after a change of rows that program covers the smaller
    # bucket). A stream crossing 512 positions waited seconds for a compile on demand when
    # that request sat behind the warm-up's queue or named rows the chain did not take.
    shapes = StepShapes.default(rows=4, max_len=1024, min_prefill=16, min_attn=128)
    steps, asked = _lazy_steps_asking(tmp_path, monkeypatch, shapes)
    assert 4 in shapes.decode_batches and shapes.attn_lens == (128, 256, 512, 1024)
    steps._decode_key(1, 40, 4, None)  # 44 of 128 positions: not halfway
    assert asked == []
    steps._decode_key(1, 300, 4, None)  # 304 of 512: the 1024 bucket, needed soon
    assert asked == [(("decode", 1, 1024, 4), True)]
    asked.clear()
    steps._decode_key(1, 300, 4, 4)  # one live row, chained on a 4-row program's tokens
    assert asked == [(("decode", 4, 1024, 4), True)]
    asked.clear()
    # the engine's row moves wait for their program rather than compile it on demand
    assert not steps.swap_ready() and asked == [(("swap",), True)]


def test_prompts_prefill_together_only_on_a_program_of_their_own_buckets(tmp_path, monkeypatch):
    # A batch padded to more rows or tokens than its own buckets can cost more than its
    # prompts one by one: only a program of the same batch and token buckets (any attention
    # bucket reaching them) serves it. A missing one, like any shape a covering program
    # serves, compiles once the runner is idle (the engine says so), not inside the burst of
    # requests that met it, or once it has waited `DEFER_S`.
    shapes = StepShapes.default(rows=8, max_len=512, min_prefill=16, min_attn=128)
    steps, asked = _lazy_steps_asking(tmp_path, monkeypatch, shapes)
    lens, starts = [10, 14, 3], [0, 100, 0]  # 3 prompts: batch bucket 4, tokens 16
    assert not steps.prefill_ready(lens, starts) and asked == []
    steps.request_deferred()
    assert asked == [(("prefill", 4, 16, 128), False)]  # reaching 114 of 128 positions
    asked.clear()
    done = steps.programs._done
    done[("prefill", 8, 16, 128)] = done[("prefill", 4, 32, 128)] = object()
    assert not steps.prefill_ready(lens, starts)  # more rows or tokens: no
    done[("prefill", 4, 16, 512)] = object()
    assert steps.prefill_ready(lens, starts)  # a wider attention bucket serves
    # a decode served by a covering program: its own shape waits for an idle moment...
    done[("decode", 8, 128, 4)] = object()
    assert steps._decode_key(4, 50, 4, None) == ("decode", 8, 128, 4)
    assert asked == []
    # ... or until it has waited long enough
    monkeypatch.setattr(steps, "DEFER_S", 0.0)
    steps._decode_key(4, 50, 4, None)
    assert asked == [(("decode", 4, 128, 4), False)]
    steps.lazy = False  # everything compiles on first use
    assert steps.prefill_ready([500, 2], [0, 0])
