"""The engine: continuous batching gives the same tokens as running alone, aborts free rows,
prefix reuse prefills only the new suffix, and bad requests are refused before queueing."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time

import pytest
from gguf_factory import write_tiny_gguf

from serve.engine import Engine, EventKind, FinishReason, GenerationRequest
from serve.engine.scheduler import Scheduler
from tsjax.generation import PromptTooLongError, generate
from tsjax.model import load
from tsjax.sampling import SamplingParams
from tsjax.shapes import StepShapes

ROWS = 16


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    path = write_tiny_gguf(tmp_path_factory.mktemp("engine") / "llama.gguf", "llama")
    model = load(
        path,
        progress=False,
        shapes=StepShapes.default(rows=ROWS, max_len=128, min_prefill=16, min_attn=32),
        quant="f32",
    )
    eng = Engine(model, decode_steps=4, prefill_chunk=32)
    eng.warmup()
    eng.start()
    yield eng
    eng.stop()


def run(engine, reqs):
    async def one(req):
        events = [ev async for ev in engine.generate(req)]
        return events

    async def main():
        return await asyncio.gather(*(one(r) for r in reqs))

    return asyncio.run(main())


def text_of(events):
    return "".join(ev.text for ev in events if ev.kind is EventKind.TOKEN)


def test_single_request_equals_library_generate(engine):
    prompt = [1, 5, 9, 42, 17, 3]
    req = GenerationRequest(prompt, SamplingParams.greedy(), max_tokens=20, reuse_prefix=False)
    (events,) = run(engine, [req])
    done = events[-1]
    want = generate(engine.model, prompt, sampling=SamplingParams.greedy(), max_tokens=20)
    assert text_of(events) == want.text
    assert done.kind is EventKind.DONE
    assert done.finish_reason.value == want.finish_reason
    assert done.stats.completion_tokens == len(want.tokens)


def test_seeded_request_same_alone_or_beside_fifteen_others(engine):
    sp = SamplingParams(temperature=1.0, top_k=50, top_p=0.95, seed=1234)
    prompt = [2, 7, 1, 8, 2, 8]
    alone = run(engine, [GenerationRequest(prompt, sp, 24, reuse_prefix=False)])[0]
    others = [
        GenerationRequest(
            [3 + i, 1, 4, 1, 5][: 2 + i % 4],
            SamplingParams(temperature=0.9, seed=i),
            24 + i,
            reuse_prefix=False,
        )
        for i in range(15)
    ]
    mine = GenerationRequest(prompt, sp, 24, reuse_prefix=False)
    results = run(engine, others[:7] + [mine] + others[7:])
    assert text_of(results[7]) == text_of(alone)
    assert all(r[-1].kind is EventKind.DONE for r in results)


def submit_together(engine, reqs):
    """Queue `reqs` while the loop cannot admit any (it holds the same lock), so it admits
    them at once; their events, each list ending at its DONE."""
    events = [[] for _ in reqs]
    done = threading.Semaphore(0)

    def sink_for(i):
        def sink(ev):
            events[i].append(ev)
            if ev.kind is EventKind.DONE:
                done.release()

        return sink

    with engine._cv:
        for i, req in enumerate(reqs):
            engine.submit(req, sink_for(i))
    for _ in reqs:
        assert done.acquire(timeout=120)
    return events


def test_prompts_admitted_together_prefill_in_one_call_each_as_alone(engine):
    """Requests admitted at once prefill in one call per token bucket (the prompt that needs
    a bigger bucket gets its own), and each gets the tokens it gets alone: greedy, seeded,
    and one whose prompt resumes a prefix a row holds."""
    seeded = SamplingParams(temperature=1.0, top_k=50, top_p=0.95, seed=99)
    greedy = SamplingParams.greedy()
    reqs = [
        # resumes the row of its own run alone (admitted first: the others take low rows)
        GenerationRequest([4, 4, 2, 9, 1, 1, 3, 5, 7], greedy, 12),
        GenerationRequest([1, 5, 9, 42, 17, 3], greedy, 12, reuse_prefix=False),
        GenerationRequest([2, 7, 1, 8], seeded, 12, reuse_prefix=False),
        GenerationRequest(list(range(3, 23)), greedy, 12, reuse_prefix=False),  # 20: bucket 32
        GenerationRequest([9, 8, 7], seeded, 12, reuse_prefix=False),
    ]
    alone = {
        i: run(engine, [dataclasses.replace(r, id=f"{r.id}-alone", reuse_prefix=False)])[0]
        for i, r in [*enumerate(reqs)][::-1]  # the first last: its row keeps its prompt
    }
    before = engine.prefills
    together = submit_together(engine, reqs)
    assert engine.prefills - before == 2  # four prompts of bucket 16, one of bucket 32
    assert together[0][-1].stats.cached_tokens == 8  # all but its last token
    for got, want in zip(together, [alone[i] for i in range(len(reqs))], strict=True):
        assert got[-1].kind is EventKind.DONE
        assert text_of(got) == text_of(want)


def test_a_burst_arriving_at_an_idle_engine_is_admitted_together(engine, monkeypatch):
    """Requests a few milliseconds apart, from idle, prefill in one call: the engine waits
    for the burst to finish arriving (until none has come for BURST_QUIET_S) before it
    starts the first. Widened here so that a loaded machine does not split the burst."""
    monkeypatch.setattr(engine, "BURST_QUIET_S", 0.25)
    monkeypatch.setattr(engine, "BURST_WAIT_S", 5.0)
    prompts = [[3, 1, 4, 1, 5], [2, 7, 1, 8, 2], [1, 4, 1, 4, 2]]
    done = threading.Semaphore(0)
    events = [[] for _ in prompts]
    before = engine.prefills
    for i, p in enumerate(prompts):

        def sink(ev, i=i):
            events[i].append(ev)
            if ev.kind is EventKind.DONE:
                done.release()

        engine.submit(GenerationRequest(p, SamplingParams.greedy(), 4, reuse_prefix=False), sink)
        time.sleep(0.02)
    for _ in prompts:
        assert done.acquire(timeout=120)
    assert engine.prefills - before == 1
    assert all(e[-1].kind is EventKind.DONE for e in events)


def test_abort_frees_the_row(engine):
    async def main():
        req = GenerationRequest([4, 4, 4], SamplingParams(temperature=1.0, seed=1), 100)
        agen = engine.generate(req)
        async for ev in agen:
            if ev.kind is EventKind.TOKEN:
                break
        await agen.aclose()  # the client went away
        for _ in range(200):
            if engine.status()["active_requests"] == 0:
                return True
            await asyncio.sleep(0.01)
        return False

    assert asyncio.run(main())


def test_prefix_reuse_counts_cached_tokens_and_keeps_output(engine):
    turn1 = [11, 12, 13, 14, 15, 16, 17, 18]
    r1 = run(engine, [GenerationRequest(turn1, SamplingParams.greedy(), 6)])[0]
    answer = [t for ev in r1 if ev.kind is EventKind.TOKEN for t in ev.token_ids][:6]
    turn2 = turn1 + answer + [19, 20, 21]
    r2 = run(engine, [GenerationRequest(turn2, SamplingParams.greedy(), 8)])[0]
    stats = r2[-1].stats
    assert stats.cached_tokens >= len(turn1), stats
    fresh = generate(engine.model, turn2, sampling=SamplingParams.greedy(), max_tokens=8)
    assert text_of(r2) == fresh.text


def test_stop_string_and_length(engine):
    prompt = [1, 5, 9, 42, 17, 3]
    full = generate(engine.model, prompt, sampling=SamplingParams.greedy(), max_tokens=30)
    if len(full.text) < 6:
        pytest.skip("tiny model ended too early to pick a stop string")
    stop = full.text[3:5]
    (events,) = run(
        engine,
        [GenerationRequest(prompt, SamplingParams.greedy(), 30, stop=(stop,), reuse_prefix=False)],
    )
    assert text_of(events) == full.text[: full.text.index(stop)]
    assert events[-1].finish_reason is FinishReason.STOP
    assert events[-1].stop_sequence == stop  # which stop string ended it (Anthropic reports it)
    (events,) = run(
        engine, [GenerationRequest(prompt, SamplingParams.greedy(), 3, reuse_prefix=False)]
    )
    if events[-1].stats.completion_tokens == 3:
        assert events[-1].finish_reason is FinishReason.LENGTH
    assert events[-1].stop_sequence is None


def test_pipelined_dispatches_give_the_tokens_of_unpipelined_ones(engine, monkeypatch):
    """The engine sends the next decode dispatch before reading the current one (fed on the
    device): requests of different lengths, finishing at different steps (limits, a stop
    string), seeded sampling among them, give exactly what an engine that reads every
    dispatch before the next gives, and the pipelined path really ran."""
    prompt = [1, 5, 9, 42, 17, 3]
    full = generate(engine.model, prompt, sampling=SamplingParams.greedy(), max_tokens=30)
    stop = (full.text[4:6],) if len(full.text) >= 6 else ()

    def requests():
        reqs = [
            GenerationRequest([2 + i, 9, 4, 7][: 1 + i % 4], sp, 5 + 3 * i, reuse_prefix=False)
            for i, sp in enumerate(
                [SamplingParams.greedy()] * 3
                + [SamplingParams(temperature=0.8, seed=i) for i in range(3)]
            )
        ]
        return reqs + [GenerationRequest(prompt, SamplingParams.greedy(), 30, stop=stop)]

    fed_on_device = []

    def spy_on(runner):
        decode = runner.decode

        def spy(rows, tokens, *args, **kwargs):
            fed_on_device.append(tokens is None)
            return decode(rows, tokens, *args, **kwargs)

        monkeypatch.setattr(runner, "decode", spy)

    spy_on(engine.runner)
    piped = run(engine, requests())
    assert sum(fed_on_device) >= 3, fed_on_device
    engine.stop()  # the two engines share the model's compiled steps: one at a time
    plain = Engine(engine.model, decode_steps=4, prefill_chunk=32, pipeline=False)
    spy_on(plain.runner)
    plain.start()
    try:
        fed_on_device.clear()
        unpiped = run(plain, requests())
        assert not any(fed_on_device)
    finally:
        plain.stop()
        engine.start()
    for a, b in zip(piped, unpiped, strict=True):
        assert text_of(a) == text_of(b)
        assert a[-1].finish_reason == b[-1].finish_reason
        assert a[-1].stats.completion_tokens == b[-1].stats.completion_tokens


def test_prompt_too_long_is_refused_before_queueing(engine):
    with pytest.raises(PromptTooLongError, match="128"):
        engine.check(GenerationRequest([1] * 200))
    with pytest.raises(ValueError):
        engine.check(GenerationRequest([]))


def test_grammar_constrained_row_beside_a_free_one(engine):
    """A constrained request follows its grammar while a neighbour decodes untouched."""
    import re

    from tsjax.grammar import GrammarFactory

    factory = GrammarFactory(engine.model.tokenizer, engine.model.config.vocab_size)
    prompt = [1, 5, 9, 42, 17, 3]
    free = generate(engine.model, prompt, sampling=SamplingParams.greedy(), max_tokens=12)
    constrained = GenerationRequest(
        [2, 4, 6],
        SamplingParams(temperature=1.0, seed=5),
        40,
        constraint=factory.regex(r"(ab|ba){2,4}"),
        reuse_prefix=False,
    )
    plain = GenerationRequest(prompt, SamplingParams.greedy(), 12, reuse_prefix=False)
    got_c, got_p = run(engine, [constrained, plain])
    assert re.fullmatch(r"(ab|ba){2,4}", text_of(got_c)), text_of(got_c)
    assert got_c[-1].finish_reason is FinishReason.STOP
    assert text_of(got_p) == free.text


def _four_short_then_a_long_one(engine, monkeypatch) -> list[list[int]]:
    """Four short requests and a long one admitted fifth (a row past 3: decode bucket 16);
    asserts the long one's tokens equal a solo run's; returns the rows of every decode."""
    decoded_rows: list = []
    decode = engine.runner.decode

    def spy_decode(rows, *args, **kwargs):
        decoded_rows.append(list(rows))
        return decode(rows, *args, **kwargs)

    monkeypatch.setattr(engine.runner, "decode", spy_decode)
    short = [
        GenerationRequest([2 + i, 7, 11], SamplingParams.greedy(), 2, reuse_prefix=False)
        for i in range(4)
    ]
    long_prompt = [1, 5, 9, 42, 17, 3]
    long = GenerationRequest(long_prompt, SamplingParams.greedy(), 24, reuse_prefix=False)
    *_, events = run(engine, [*short, long])
    want = generate(engine.model, long_prompt, sampling=SamplingParams.greedy(), max_tokens=24)
    assert text_of(events) == want.text
    return decoded_rows


def test_live_rows_are_compacted_and_keep_their_output(engine, monkeypatch):
    """The long request is moved to row 0 once the four short ones before it finish, so
    decode drops to the 1-row bucket; its tokens equal a solo run's."""
    moves: list = []
    swap = engine.runner.swap_rows

    def spy(pairs):
        moves.append(list(pairs))
        return swap(pairs)

    monkeypatch.setattr(engine.runner, "swap_rows", spy)
    decoded_rows = _four_short_then_a_long_one(engine, monkeypatch)
    assert any(b == 0 and a >= 4 for pairs in moves for a, b in pairs), moves
    assert decoded_rows[-1] == [0]


def test_scheduler_admits_low_rows_and_compacts():
    s = Scheduler(16, (1, 4, 16))
    reqs = [GenerationRequest([i, 1], SamplingParams.greedy(), 4) for i in range(6)]
    for r in reqs:
        s.enqueue(r)
    rows = [s.admit()[1].index for _ in reqs]
    assert rows[:4] == [0, 1, 2, 3] and all(r < 16 for r in rows[4:])
    for i in (0, 1, 3, 4):  # leave rows[2] and rows[5] live: two rows need the 4-row bucket
        s.release(s.rows[rows[i]], [9])
    pairs = s.compaction()
    assert [a for a, _ in pairs] == [rows[5]] and all(b < 4 and b != rows[2] for _, b in pairs)
    a, b = pairs[0]
    s.swap(a, b)
    assert s.rows[b].request is reqs[5] and s.rows[a].request is None and s.rows[a].tokens == [9]
    assert s.compaction() == []


def test_scheduler_imports_no_jax():
    """The scheduler is plain Python: importing it (its package included) starts no JAX, so
    the bucket arithmetic it shares with the steps lives in `tsjax.shapes`."""
    import subprocess
    import sys

    code = (
        "import sys, serve.engine.scheduler\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib', 'flax'))\n"
        "print(heavy)\n"
        "raise SystemExit(1 if heavy else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_observers_see_every_event_with_its_request(engine, caplog):
    """`Engine.add_observer`: each request's events, in order, with the request; an observer
    that raises is logged and the request is unharmed."""
    seen: list = []

    def record(req, ev):
        seen.append((req.id, ev.kind))

    def broken(req, ev):
        raise RuntimeError("an observer's own bug")

    engine.add_observer(record)
    engine.add_observer(broken)
    try:
        reqs = [
            GenerationRequest([1, 5, 9, i], SamplingParams.greedy(), 4, reuse_prefix=False)
            for i in range(2)
        ]
        results = run(engine, reqs)
    finally:
        engine.remove_observer(record)
        engine.remove_observer(broken)
    for req, events in zip(reqs, results, strict=True):
        assert [k for i, k in seen if i == req.id] == [ev.kind for ev in events]
        assert events[-1].kind is EventKind.DONE
    assert any("observer failed" in r.getMessage() for r in caplog.records)


def test_memory_report(engine):
    """Params and cache bytes (the tiny llama's blocked float32 cache: keys and values of
    every layer, row and position, plus the lengths), all on the one device."""
    import jax

    cfg = engine.model.config
    mem = engine.memory()
    assert mem.params_bytes == sum(x.nbytes for x in jax.tree.leaves(engine.model.params))
    kv = 2 * cfg.n_layers * ROWS * cfg.n_kv_heads * 128 * cfg.head_dim * 4
    assert mem.cache_bytes == kv + ROWS * 4
    assert mem.per_device == {jax.devices()[0].id: mem.params_bytes + mem.cache_bytes}


def test_scheduler_reuses_prefixes_only_where_the_cache_rewinds():
    """A cache with a state that cannot rewind to any prefix (a recurrent layer's) reuses no
    prefix; one of keys and values reuses the longest."""
    for rewinds, want in ((True, 5), (False, 0)):
        s = Scheduler(4, (1, 4), rewinds=rewinds)
        s.enqueue(GenerationRequest([1, 2, 3], SamplingParams.greedy(), 4))
        _, row, _ = s.admit()
        s.release(row, [1, 2, 3, 4, 5])
        s.enqueue(GenerationRequest([1, 2, 3, 4, 5, 6], SamplingParams.greedy(), 4))
        assert s.admit()[2] == want


# -- log-probabilities, n answers, prompt scoring, embeddings -------------------------------


def _log_softmax(x):
    import numpy as np

    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def test_logprobs_are_the_raw_log_softmax_of_each_step(engine):
    """Through the engine (prefill's first token, then decode dispatches of several steps):
    each generated token's log-probability and its top 20 are the log-softmax of the
    model's logits for the sequence so far, whatever the temperature and filters (raw, not
    the sampling distribution); the prompt's come with the first event."""
    import numpy as np
    from conftest import all_logits

    prompt = [1, 5, 9, 42, 17, 3, 8]
    sp = SamplingParams(temperature=1.3, top_k=5, top_p=0.8, seed=3)
    req = GenerationRequest(prompt, sp, 9, reuse_prefix=False, logprobs=True, prompt_logprobs=True)
    (events,) = run(engine, [req])
    got = [e for ev in events for e in ev.logprobs]
    tokens = [e.token for e in got]
    assert tokens == [t for ev in events for t in ev.token_ids][: len(tokens)]
    assert len(got) == events[-1].stats.completion_tokens
    ref = _log_softmax(all_logits(engine.model, prompt + tokens))
    for j, e in enumerate(got):
        row = ref[len(prompt) - 1 + j]
        assert abs(e.logprob - row[e.token]) < 1e-4
        ids = [i for i, _ in e.top]
        assert ids == list(np.argsort(-row, kind="stable")[:20])
        assert np.allclose([v for _, v in e.top], row[ids], atol=1e-4)
        assert all(a >= b for (_, a), (_, b) in zip(e.top, e.top[1:], strict=False))
    scored = events[0].prompt_logprobs
    assert scored[0] is None and len(scored) == len(prompt)
    for t in range(1, len(prompt)):
        assert scored[t].token == prompt[t]
        assert abs(scored[t].logprob - ref[t - 1][prompt[t]]) < 1e-4


def test_n_answers_share_one_prefill_and_have_their_own_seeds(engine):
    """n answers: the prompt is prefilled once (all but its last token, then copied), each
    answer samples with seed + i (answer i of a repeat is answer i again; the answers
    differ), and each answer's events carry its index and its own stats."""
    prompt = [7, 3, 11, 13, 2, 5, 19, 23]
    sp = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, seed=11)
    before = engine.prefill_tokens
    (events,) = run(engine, [GenerationRequest(prompt, sp, 12, reuse_prefix=False, n=3)])
    assert engine.prefill_tokens - before == len(prompt) - 1
    done = [ev for ev in events if ev.kind is EventKind.DONE]
    assert sorted(ev.index for ev in done) == [0, 1, 2]
    texts = [[t for ev in events if ev.index == i for t in ev.token_ids] for i in range(3)]
    assert len({tuple(t) for t in texts}) == 3, texts
    (again,) = run(engine, [GenerationRequest(prompt, sp, 12, reuse_prefix=False, n=3)])
    assert texts == [[t for ev in again if ev.index == i for t in ev.token_ids] for i in range(3)]
    # answer 1 of seed 11 is answer 0 of seed 12
    one = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, seed=12)
    (single,) = run(engine, [GenerationRequest(prompt, one, 12, reuse_prefix=False)])
    assert [t for ev in single for t in ev.token_ids] == texts[1]
    assert all(ev.stats.prompt_tokens == len(prompt) for ev in done)


def test_n_answers_greedy_equal_one_answer(engine):
    """Greedy answers of a shared prefill are the single answer, each one: the copied rows
    hold the same keys and values as the prefilled one."""
    prompt = [4, 8, 15, 16, 23, 42]
    greedy = SamplingParams.greedy()
    (one,) = run(engine, [GenerationRequest(prompt, greedy, 10, reuse_prefix=False)])
    (three,) = run(engine, [GenerationRequest(prompt, greedy, 10, reuse_prefix=False, n=3)])
    want = text_of(one)
    assert [
        "".join(ev.text for ev in three if ev.index == i and ev.kind is EventKind.TOKEN)
        for i in range(3)
    ] == [want] * 3


def test_abort_of_an_n_request_ends_every_answer(engine):
    async def main():
        req = GenerationRequest([4, 4, 4, 9], SamplingParams(temperature=1.0, seed=1), 100, n=3)
        agen = engine.generate(req)
        async for ev in agen:
            if ev.kind is EventKind.TOKEN:
                break
        await agen.aclose()
        for _ in range(200):
            if engine.status()["active_requests"] == 0:
                return True
            await asyncio.sleep(0.01)
        return False

    assert asyncio.run(main())


def test_n_beyond_the_rows_is_refused_and_queues_otherwise(engine):
    with pytest.raises(ValueError, match="n must be between 1 and 16"):
        engine.check(GenerationRequest([1, 2], SamplingParams.greedy(), 4, n=17))
    # more answers than rows are free: the request waits for them, then runs
    reqs = [GenerationRequest([2, 3, 5, i], SamplingParams.greedy(), 6, reuse_prefix=False,
                              n=6) for i in range(4)]  # fmt: skip
    results = run(engine, reqs)
    for events in results:
        assert sorted(ev.index for ev in events if ev.kind is EventKind.DONE) == list(range(6))


def test_prefill_only_requests_score_and_embed_the_prompt(engine):
    """max_tokens 0 with prompt_logprobs scores the prompt without generating; `embed`
    gives the mean of the final-normed states; neither reuses nor generates."""
    import numpy as np
    from conftest import all_logits

    prompt = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4]
    (scored,) = run(engine, [GenerationRequest(prompt, SamplingParams.greedy(), 0,
                                               prompt_logprobs=True)])  # fmt: skip
    (done,) = scored
    assert done.kind is EventKind.DONE and done.stats.completion_tokens == 0
    ref = _log_softmax(all_logits(engine.model, prompt))
    got = [e.logprob for e in done.prompt_logprobs[1:]]
    assert np.allclose(got, [ref[t - 1][prompt[t]] for t in range(1, len(prompt))], atol=1e-4)
    (embedded,) = run(engine, [GenerationRequest(prompt, SamplingParams.greedy(), 0,
                                                 embed=True)])  # fmt: skip
    vec = embedded[-1].embedding
    assert vec.shape == (engine.model.config.dim,) and np.isfinite(vec).all()
    # a prompt longer than the prefill chunk (32) pools over its chunks alike
    (long,) = run(engine, [GenerationRequest(prompt * 3, SamplingParams.greedy(), 0,
                                             embed=True)])  # fmt: skip
    assert long[-1].embedding.shape == vec.shape and not np.allclose(long[-1].embedding, vec)


def test_no_compiles_when_requests_vary_logprobs_and_n(engine):
    """After warm-up, logprobs on or off, prompt scoring, n answers and embeddings (prompts
    inside the warmed prefill buckets) compile nothing new: they are array data."""
    steps = engine.model.steps
    run(engine, [GenerationRequest([1, 2, 3], SamplingParams.greedy(), 2)])  # settle
    before = steps.compiled_count()
    reqs = [
        GenerationRequest([5, 6, 7, 8], SamplingParams(seed=1), 6, logprobs=True),
        GenerationRequest([5, 6, 7, 9], SamplingParams(seed=2), 5, n=4, logprobs=True),
        GenerationRequest([9, 9, 8], SamplingParams.greedy(), 3, n=2, prompt_logprobs=True),
        GenerationRequest([1, 2, 3, 4, 5], SamplingParams.greedy(), 0, prompt_logprobs=True),
        GenerationRequest([1, 2, 3, 4, 5, 6], SamplingParams.greedy(), 0, embed=True),
        GenerationRequest([4, 3, 2], SamplingParams.greedy(), 7),
    ]
    run(engine, reqs)
    assert steps.compiled_count() == before, "a logprobs / n / embedding request recompiled"


def test_embedding_inputs_truncate_or_refuse():
    """An embedding input past the window is cut to it (Ollama's `truncate`, the default) or
    refused with a 400 naming the input; ids outside the vocabulary and empty inputs too."""
    from types import SimpleNamespace

    from serve.errors import ApiError
    from serve.translation.embedding import input_ids

    model = SimpleNamespace(
        tokenizer=SimpleNamespace(max_piece_bytes=1),
        tokenize_prompt=lambda text: ([ord(c) % 50 for c in text], []),
        config=SimpleNamespace(vocab_size=50),
        max_len=8,
        projector=None,
    )
    assert input_ids(model, "abcdefghijk", True, "input") == input_ids(model, "abcdefgh", True, "x")
    # far past any window: cut in characters before tokenizing, or refused by its length
    long = "abcdefgh" * 10_000
    assert input_ids(model, long, True, "input") == input_ids(model, "abcdefgh", True, "x")
    with pytest.raises(ApiError) as e:
        input_ids(model, long, False, "input")
    assert e.value.status == 400 and "characters" in str(e.value)
    assert input_ids(model, [1, 2, 3], False, "input") == [1, 2, 3]
    for item, truncate in (("abcdefghijk", False), ([], True), ([1, 50], True), ("", True)):
        with pytest.raises(ApiError) as e:
            input_ids(model, item, truncate, "input[1]")
        assert e.value.status == 400 and e.value.param == "input[1]"


def test_scheduler_resumes_a_recurrent_row_only_from_its_saved_states():
    """A cache that cannot rewind: a row resumes from its own state (where the last request
    stopped, if exactly known) or from a checkpoint slot, the longest one inside the shared
    prefix; a shared prefix with neither at its end is not a hit."""
    greedy = SamplingParams.greedy()
    s = Scheduler(2, (1, 2), rewinds=False, checkpoints=2)

    def admit(prompt, **kw):
        s.enqueue(GenerationRequest(prompt, greedy, 4, **kw))
        _, row, reuse = s.admit()
        return row, reuse

    row, reuse = admit(list(range(10)), checkpoints=(4, 10))
    assert reuse == 0 and s.plan_checkpoints(row, [4, 10], 0) == {4: 0, 10: 1}
    s.release(row, list(range(13)), live=13)
    row, reuse = admit(list(range(16)))  # continues the answer: the row's own state
    assert (row.index, reuse, row.resume) == (0, 13, -1)
    assert s.plan_checkpoints(row, [16], reuse) == {16: 0}  # the shortest prefix gives way
    s.release(row, list(range(16)) + [99], live=0)  # ended inexactly: no own state
    row, reuse = admit(list(range(14)) + [50])  # the longest saved state inside the prefix
    assert (row.index, reuse, row.resume) == (0, 10, 1)
    assert row.saved == [0, 10]  # the state at 16 is past the shared prefix: gone
    s.release(row, list(range(14)) + [50], live=0)
    row, reuse = admit(list(range(9)) + [60])  # 9 tokens shared, no state saved there
    assert reuse == 0


def test_a_failing_prefill_answers_its_request_and_frees_its_row(engine, monkeypatch):
    # A request whose prefill raised was answered by nobody (it had left the queue and was
    # not live yet): its client waited forever and its row stayed taken.
    real = engine.runner.prefill
    calls = []

    def fails_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("a broken program")
        return real(*args, **kwargs)

    monkeypatch.setattr(engine.runner, "prefill", fails_once)
    prompt = [4, 8, 15, 16, 23, 42]
    reqs = [GenerationRequest(prompt, SamplingParams.greedy(), 8, reuse_prefix=False)
            for _ in range(2)]  # fmt: skip
    first, second = run(engine, reqs)
    assert first[-1].kind is EventKind.ERROR and "a broken program" in first[-1].error
    assert second[-1].kind in (EventKind.ERROR, EventKind.DONE)  # beside it: answered too
    assert all(r.request is None for r in engine.scheduler.rows)
    (again,) = run(engine, [GenerationRequest(prompt, SamplingParams.greedy(), 8,
                                              reuse_prefix=False)])  # fmt: skip
    assert again[-1].kind is EventKind.DONE and text_of(again)


def test_rows_stay_put_while_the_swap_is_not_compiled(engine, monkeypatch):
    """Moving rows is an optimization: while its program is still to be compiled (lazy
    programs, `Steps.swap_ready`) the engine decodes the wider bucket instead of waiting for
    a compile (12 s on a loaded machine, every stream with it); the output is the same."""
    moves: list = []
    monkeypatch.setattr(engine.runner, "can_swap", lambda: False)
    monkeypatch.setattr(engine.runner, "swap_rows", lambda pairs: moves.append(pairs))
    decoded_rows = _four_short_then_a_long_one(engine, monkeypatch)
    assert moves == [] and len(decoded_rows[-1]) == 1 and decoded_rows[-1][0] >= 4


def test_stop_answers_clients_while_a_step_hangs(tmp_path, monkeypatch):
    """A loop stuck in a step (or a compile) at shutdown does not hold its clients: `stop`
    answers them itself after `STOP_ANSWER_S`, and the loop's own answer, once the step
    returns, reaches neither the client nor the observers a second time."""
    path = write_tiny_gguf(tmp_path / "llama.gguf", "llama")
    shapes = StepShapes.default(rows=2, max_len=64, min_prefill=16, min_attn=32)
    eng = Engine(load(path, progress=False, shapes=shapes, quant="f32"), decode_steps=1)
    eng.warmup()
    finals = []
    eng.add_observer(lambda req, ev: ev.kind in (EventKind.DONE, EventKind.ERROR)
                     and finals.append(ev))  # fmt: skip
    entered, gate = threading.Event(), threading.Event()
    decode = eng.runner.decode

    def hangs(*args, **kwargs):
        entered.set()
        gate.wait(60)
        return decode(*args, **kwargs)

    monkeypatch.setattr(eng.runner, "decode", hangs)
    eng.start()
    got: dict = {}
    req = GenerationRequest([1, 5, 9], SamplingParams.greedy(), 40, reuse_prefix=False)
    client = threading.Thread(target=lambda: got.update(events=run(eng, [req])[0]))
    client.start()
    assert entered.wait(60)
    stopper = threading.Thread(target=eng.stop)
    t0 = time.perf_counter()
    stopper.start()
    client.join(eng.STOP_ANSWER_S + 20)
    answered = time.perf_counter() - t0
    try:
        assert not client.is_alive(), "the client waited for the stuck step"
        last = got["events"][-1]
        assert last.kind is EventKind.ERROR and "shutting down" in last.error
        assert answered < eng.STOP_ANSWER_S + 10
    finally:
        gate.set()
        stopper.join(60)
    assert not stopper.is_alive()
    assert len(finals) == 1  # the loop's own "shutting down" went nowhere
