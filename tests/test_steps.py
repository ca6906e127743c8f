"""The compiled steps: prefill + decode agree with one long prefill, rows are independent,
and after warm-up no request shape or sampling setting compiles anything new."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from conftest import all_logits, loaded_model, rel_err
from gguf_factory import write_tiny_gguf

from tsjax.model import load
from tsjax.sampling import SamplingParams
from tsjax.shapes import StepShapes

GREEDY = SamplingParams.greedy()


@pytest.fixture(scope="module")
def tiny_gemma3(tmp_path_factory):
    # Window 4 and 7 layers: the 20-token sequences below cross the sliding window.
    path = write_tiny_gguf(tmp_path_factory.mktemp("steps") / "g3.gguf", "gemma3")
    return load(
        path,
        progress=False,
        # position blocks 0-15, 16-23, 24-31, 32-47, 48-63: decode skips upper halves
        shapes=replace(
            StepShapes.default(rows=4, max_len=64, min_prefill=8, min_attn=16), split_span=8
        ),
        quant="f32",
    )


@pytest.fixture(scope="module")
def tiny_gemma3_skipping(tmp_path_factory):
    """tiny_gemma3 whose decode skips unreached position blocks from 1 row on (the server
    does from `tsjax.shapes.SKIP_MIN_ROWS`)."""
    path = write_tiny_gguf(tmp_path_factory.mktemp("skip") / "g3.gguf", "gemma3")
    shapes = replace(
        StepShapes.default(rows=4, max_len=64, min_prefill=8, min_attn=16),
        split_span=8,
        skip_min_rows=1,
    )
    model = load(path, progress=False, shapes=shapes, quant="f32")
    model.steps.warmup(model.params, decode_steps=(1,), max_prompt=32, batches=(1, 2))
    return model


def check_prefill_then_decode(model, prompt, n_decode, steps_per_dispatch, row=None):
    steps = model.steps
    cache, sampler = steps.new_cache(), steps.new_sampler()
    row = steps.shapes.rows - 1 if row is None else row  # default not 0: catches row mix-ups
    first, logits, cache, sampler = steps.prefill(
        model.params, cache, sampler, [prompt], [row], [GREEDY]
    )
    seq = list(prompt) + [int(first[0])]
    got = [np.asarray(logits[0])]
    eog = model.tokenizer.eog_ids
    while len(got) < n_decode + 1 and seq[-1] not in eog:
        out, last, cache, sampler = steps.decode(
            model.params, cache, sampler, [row], [seq[-1]], len(seq) - 1, steps_per_dispatch
        )
        new = [int(t) for t in out[:, 0]]
        # a row that samples an end-of-generation token halts there (`Steps._decode`): the
        # dispatch's later tokens and its last logits are not the sequence's
        stop = next((i + 1 for i, t in enumerate(new) if t in eog), None)
        seq += new[:stop]
        if stop is None:
            got.append(np.asarray(last[0]))
    assert int(cache.lengths[row]) == len(seq) - 1
    ref = all_logits(model, seq[:-1])
    # got[0] is the logits after the prompt; got[k] after `steps_per_dispatch` more tokens.
    positions = [len(prompt) - 1 + k * steps_per_dispatch for k in range(len(got))]
    for g, p in zip(got, positions, strict=True):
        assert rel_err(g, ref[p]) < 1e-4, f"position {p}"
    # Greedy decode must pick the argmax of the full-sequence logits at every position.
    assert seq[len(prompt) :] == [
        int(ref[p].argmax()) for p in range(len(prompt) - 1, len(seq) - 1)
    ]


@pytest.mark.parametrize("n_steps", [1, 3])
def test_prefill_then_decode_equals_one_prefill_tiny_sliding(tiny_gemma3, n_steps):
    check_prefill_then_decode(tiny_gemma3, [1, 5, 9, 42, 17, 3, 99, 23], 12, n_steps)


def test_decode_of_fewer_rows_than_a_cache_block(tiny_gemma3):
    """Row 0 alone decodes as a 1-row bucket inside the 4-row cache block: attention reads
    only that row of the block (tsjax.layers.attention.attend_blocks) and must still match."""
    assert tiny_gemma3.steps.blocks[0][0] == 4
    check_prefill_then_decode(tiny_gemma3, [1, 5, 9, 42, 17, 3, 99, 23], 12, 3, row=0)


def test_rows_of_one_block_at_different_positions(tiny_gemma3_skipping):
    """Decode attention skips the upper half of its bucket's last span when no row of the
    row block reaches it (a cond on the furthest row): rows 0 and 1 share a row block, one 3
    tokens long and one crossing from the lower half of the span 16-31 into its upper half,
    and both must match a full forward pass at every step, as must row 1 when it
    decodes alone (a 1-row batch inside the 4-row block)."""
    tiny_gemma3 = tiny_gemma3_skipping
    steps, params = tiny_gemma3.steps, tiny_gemma3.params
    assert steps.blocks == ((4,), (16, 24, 32, 48, 64))
    prompts = [[7, 3, 11], [(5 * i + 2) % 97 + 1 for i in range(21)]]  # row 1: 21 -> 27
    cache, sampler = steps.new_cache(), steps.new_sampler()
    first, _, cache, sampler = steps.prefill(params, cache, sampler, prompts, [0, 1], [GREEDY] * 2)
    seqs = [p + [int(t)] for p, t in zip(prompts, first, strict=True)]
    for step in range(6):
        rows = [0, 1] if step < 4 else [1]
        toks = [seqs[r][-1] for r in rows]
        max_pos = max(len(seqs[r]) - 1 for r in rows)
        out, last, cache, sampler = steps.decode(params, cache, sampler, rows, toks, max_pos, 1)
        for i, r in enumerate(rows):
            ref = all_logits(tiny_gemma3, seqs[r])[-1]
            assert rel_err(np.asarray(last[i]), ref) < 1e-4, (step, r)
            seqs[r].append(int(out[0, i]))


def test_decode_continues_from_device_tokens(tiny_gemma3):
    """`decode(tokens=None)` (the engine's pipelined dispatch, `tsjax.runner.LocalRunner`)
    feeds each row the token the previous decode sampled and gives the tokens a host round
    trip would; it refuses rows other than the previous call's, and a prefill in between."""
    prompts = [[4, 8, 15, 16], [23, 42, 9, 1, 2]]

    def run(pipelined: bool) -> np.ndarray:
        runner = tiny_gemma3.runner()
        first = runner.prefill(prompts, [0, 2], [GREEDY] * 2).get()[0]
        toks, pos, got = [int(t) for t in first], 5, []
        for k in range(4):
            feed = None if pipelined and k > 0 else toks
            out = runner.decode([0, 2], feed, pos, 3).get()
            got.append(out)
            toks, pos = [int(t) for t in out[-1]], pos + 3
        return np.concatenate(got)

    np.testing.assert_array_equal(run(True), run(False))
    runner = tiny_gemma3.runner()
    runner.prefill(prompts, [0, 2], [GREEDY] * 2)
    with pytest.raises(ValueError, match="previous decode"):
        runner.decode([0, 2], None, 5, 1)
    runner.decode([0, 2], [1, 1], 5, 1)
    with pytest.raises(ValueError, match="previous decode"):
        runner.decode([0], None, 6, 1)
    runner.decode([0, 2], None, 6, 1)  # the same rows continue
    runner.swap_rows([(1, 3)])
    with pytest.raises(ValueError, match="previous decode"):
        runner.decode([0, 2], None, 7, 1)
    # the steps themselves: device tokens continue the rows they were sampled for
    steps, params = tiny_gemma3.steps, tiny_gemma3.params
    cache, sampler = steps.new_cache(), steps.new_sampler()
    _, _, cache, sampler = steps.prefill(params, cache, sampler, prompts, [0, 2], [GREEDY] * 2)
    pending, logits, cache, sampler = steps.decode(
        params, cache, sampler, [0, 2], [1, 1], 5, 1, wait=False
    )
    assert logits is None
    with pytest.raises(ValueError, match="previous decode"):
        steps.decode(params, cache, sampler, [0], pending, 6, 1)


@pytest.mark.slow
def test_prefill_then_decode_equals_one_prefill_smollm():
    model = loaded_model("smollm2-135m", max_len=256, rows=2)
    prompt = model.tokenizer.encode("The quick brown fox jumps over the lazy dog because")
    check_prefill_then_decode(model, prompt, 8, 4)


def test_prefix_reuse_prefill_matches_fresh(tiny_gemma3):
    """Prefilling a suffix after a cached prefix equals prefilling the whole sequence."""
    steps, params = tiny_gemma3.steps, tiny_gemma3.params
    seq = [3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46, 26, 43, 38, 32, 79, 50, 28]
    cache, sampler = steps.new_cache(), steps.new_sampler()
    _, _, cache, sampler = steps.prefill(params, cache, sampler, [seq[:11]], [2], [GREEDY])
    _, logits, cache, sampler = steps.prefill(
        params, cache, sampler, [seq[11:]], [2], [GREEDY], starts=[11]
    )
    assert rel_err(logits[0], all_logits(tiny_gemma3, seq)[-1]) < 1e-4
    assert int(cache.lengths[2]) == len(seq)


def test_batched_prefill_rows_are_independent(tiny_gemma3):
    steps, params = tiny_gemma3.steps, tiny_gemma3.params
    prompts = [[1, 2, 3], [9, 8, 7, 6, 5, 4, 3, 2, 1, 10, 11], [40, 41]]
    cache, sampler = steps.new_cache(), steps.new_sampler()
    _, logits, cache, _ = steps.prefill(params, cache, sampler, prompts, [3, 0, 1], [GREEDY] * 3)
    for i, p in enumerate(prompts):
        assert rel_err(logits[i], all_logits(tiny_gemma3, p)[-1]) < 1e-4
    assert [int(x) for x in cache.lengths] == [11, 2, 0, 3]


def test_no_recompilation_after_warmup(tmp_path):
    path = write_tiny_gguf(tmp_path / "llama.gguf", "llama")
    model = load(
        path,
        progress=False,
        shapes=StepShapes.default(rows=4, max_len=128, min_prefill=16, min_attn=32),
        quant="f32",
    )
    steps = model.steps
    steps.warmup(model.params, decode_steps=(1, 4))
    compiled = steps.compiled_count()
    assert compiled > 0
    rng = np.random.default_rng(0)
    cache, sampler = steps.new_cache(), steps.new_sampler()
    for trial in range(6):
        n = int(rng.integers(1, 100))
        prompt = rng.integers(0, model.config.vocab_size, n).tolist()
        sp = SamplingParams(
            temperature=float(rng.uniform(0, 2)),
            top_k=int(rng.integers(0, 50)),
            top_p=float(rng.uniform(0.1, 1)),
            min_p=float(rng.uniform(0, 0.2)),
            repeat_penalty=float(rng.uniform(1, 1.5)),
            seed=trial,
        )
        first, _, cache, sampler = steps.prefill(
            model.params, cache, sampler, [prompt], [trial % 4], [sp]
        )
        for k in (1, 4):
            _, _, cache, sampler = steps.decode(
                model.params, cache, sampler, [trial % 4], [int(first[0])], n, k
            )
        # Several live rows, in any order, also reuse the warmed shapes.
        live = [(trial + 1) % 4, trial % 4, (trial + 2) % 4][: 1 + trial % 3]
        _, _, cache, sampler = steps.decode(
            model.params, cache, sampler, live, [1] * len(live), n, 4
        )
    assert steps.compiled_count() == compiled, "a request shape or setting recompiled"


def _decode_greedy(model, cache, sampler, rows, tokens, max_pos, n):
    """n single-step greedy decodes of `rows` fed `tokens`: ([n, len(rows)] tokens, state)."""
    out = []
    for i in range(n):
        got, _, cache, sampler = model.steps.decode(
            model.params, cache, sampler, rows, tokens, max_pos + i, 1
        )
        tokens = [int(t) for t in got[0]]
        out.append(tokens)
    return np.asarray(out), cache, sampler


def test_swap_rows_moves_keys_values_lengths_and_sampling(tmp_path):
    """Rows in different row blocks (4 | 4) holding prompts that span two and three position
    blocks (into the 32-position block 32-63, whose size differs from head_dim 16): after
    swapping them, or moving one into a free row, each continues exactly as it would have
    where it was."""
    path = write_tiny_gguf(tmp_path / "llama.gguf", "llama")
    # row blocks of 4 (the server's are 16+)
    shapes = StepShapes.default(8, 64, min_prefill=8, min_attn=16, min_row_block=4)
    model = load(path, progress=False, shapes=shapes, quant="f32")
    steps = model.steps
    assert steps.blocks == ((4, 8), (16, 32, 64))
    a, b = list(range(3, 55)), list(range(40, 58))  # 52 and 18 tokens: past the 1st block

    def fresh(rows, prompts):
        cache, sampler = steps.new_cache(), steps.new_sampler()
        first, _, cache, sampler = steps.prefill(
            model.params, cache, sampler, prompts, rows, [GREEDY] * len(rows)
        )
        return [int(t) for t in first], cache, sampler

    first, cache, sampler = fresh([1, 6], [a, b])
    want, _, _ = _decode_greedy(model, cache, sampler, [1, 6], first, 52, 5)

    first, cache, sampler = fresh([1, 6], [a, b])
    _, _, cache, sampler = steps.swap_rows(model.params, cache, sampler, [(1, 6)])
    got, _, _ = _decode_greedy(model, cache, sampler, [6, 1], first, 52, 5)
    np.testing.assert_array_equal(got, want)

    first, cache, sampler = fresh([6], [a])
    _, _, cache, sampler = steps.swap_rows(model.params, cache, sampler, [(6, 0), (5, 5)])
    assert np.asarray(cache.lengths).tolist() == [52, 0, 0, 0, 0, 0, 0, 0]
    got, _, _ = _decode_greedy(model, cache, sampler, [0], first[:1], 52, 5)
    np.testing.assert_array_equal(got[:, 0], want[:, 0])


def test_shape_arithmetic():
    """The buckets and the CPU layout's blocks (`tsjax.shapes`): the README's example of 32
    rows and 512 positions, and the narrow formats' padded decode buckets."""
    from tsjax.shapes import block_sizes, geometric_buckets, split_blocks, steps_bucket

    assert geometric_buckets(16, 100, 2) == (16, 32, 64, 100)
    assert split_blocks((128, 256, 512, 1024), 256) == (128, 256, 384, 512, 768, 1024)
    assert block_sizes((4, 16, 32)) == [4, 12, 16]
    assert [steps_bucket(n) for n in (1, 4, 5, 9)] == [4, 4, 8, 16]
    shapes = StepShapes.default(rows=32, max_len=512)
    assert shapes.cache_blocks() == ((16, 32), (128, 192, 256, 384, 512))
    assert shapes.padded_decode("bf16", cpu=True).decode_batches == (2, 4, 16, 32)
    assert shapes.padded_decode("int8", cpu=False) is shapes
    # row blocks under skip_min_rows never skip: their spans stay whole
    assert StepShapes.default(rows=4, max_len=512).split_span is None
