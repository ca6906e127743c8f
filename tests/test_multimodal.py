"""Images in a prompt, end to end in the library and the engine, on the tiny random Gemma 3
with a projector (`vision_factory`): the multimodal prompt's logits against transformers'
Gemma3ForConditionalGeneration on the HF weights and against llama.cpp's mtmd on the same
GGUF pair (its token layout too), the engine's chunked prefill against one full prefill,
prefix reuse through an image (and never through a different one), no compiles after
warm-up, and the image encoder's batching."""

from __future__ import annotations

import asyncio
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err
from PIL import Image
from test_engine import run, text_of
from vision_factory import MtmdCrashed, hf_multimodal_logits, mtmd_prompt

from serve.engine import Engine, EventKind, GenerationRequest
from serve.engine.encoder import ImageEncoder
from tsjax.generation import PromptTooLongError, generate
from tsjax.model import load
from tsjax.sampling import SamplingParams
from tsjax.spans import EmbedSpan, span_inputs
from tsjax.vision.prompt import IMAGE_MARK, NoProjectorError, inline_images

pytestmark = pytest.mark.slow

_rng = np.random.default_rng(0)
WIDE = _rng.integers(0, 256, (40, 90, 3), dtype=np.uint8)  # letterboxed top and bottom
TALL = _rng.integers(0, 256, (70, 30, 3), dtype=np.uint8)
OTHER = _rng.integers(0, 256, (56, 56, 3), dtype=np.uint8)


def _chat(*parts) -> list[dict]:
    """One user message of text and image parts ("<img>" marks an image part)."""
    content = [{"type": "image"} if p == "<img>" else {"type": "text", "text": p} for p in parts]
    return [{"role": "user", "content": content}]


def _images(*arrays) -> list[Image.Image]:
    return [Image.fromarray(a) for a in arrays]


@pytest.fixture(scope="module")
def model(tiny_vision):
    # a bare mmproj file name resolves beside the model
    return load(
        tiny_vision.text_gguf,
        mmproj=tiny_vision.mmproj.name,
        max_len=128,
        rows=2,
        progress=False,
        quant="f32",  # compared with transformers' float32 logits
    )


def _forward(model, prompt, causal=False) -> np.ndarray:
    host = span_inputs(
        [list(prompt.spans)], np.zeros(1, np.int32), len(prompt), model.config.dim, np.float32
    )
    if causal:
        host = host._replace(key_end=np.arange(1, len(prompt) + 1, dtype=np.int32)[None])
    steps = model.steps
    return np.asarray(
        steps.forward_fn(
            model.params,
            steps.new_cache(),
            jnp.asarray([prompt.ids]),
            jnp.zeros((1,), jnp.int32),
            jax.tree.map(jnp.asarray, host),
            attn_len=steps.attn_len_for(len(prompt)),
        )[0]
    )


def test_logits_match_transformers(tiny_vision, model):
    """Two images inside the text: every position's logits (the prompt is longer than the
    sliding window, so window and global layers both see image keys), on both cache
    layouts. The same prompt with causal attention over the images is far off, so the
    bidirectional span is what makes it match."""
    msgs = _chat("what is in the picture you see there", "<img>", "and this one", "<img>", "so?")
    prompt = model.chat_prompt(msgs, _images(WIDE, TALL))
    starts = [s.start for s in prompt.spans]
    assert len(prompt) > 3 * model.config.layer_windows[0]
    pixels = np.stack([model.projector.prepare(a).pixels for a in _images(WIDE, TALL)])
    ref = hf_multimodal_logits(tiny_vision.hf_dir, prompt.ids, starts, pixels)
    assert rel_err(_forward(model, prompt), ref) < 1e-3
    assert rel_err(_forward(model, prompt, causal=True), ref) > 1e-2
    # the stacked cache layout (accelerators' scanned layers), through the prefill step
    stacked = load(tiny_vision.text_gguf, max_len=128, unrolled=False, progress=False, quant="f32")
    _, logits, _, _ = stacked.steps.prefill(
        stacked.params,
        stacked.steps.new_cache(),
        stacked.steps.new_sampler(),
        [prompt.ids],
        [0],
        [SamplingParams.greedy()],
        spans=[list(prompt.spans)],
    )
    assert rel_err(np.asarray(logits[0]), ref[-1]) < 1e-3
    with pytest.raises(NoProjectorError, match="--mmproj"):
        stacked.chat_prompt(msgs, _images(WIDE, TALL))


def test_layout_and_logits_match_llama_cpp(tiny_vision, model, tmp_path):
    """llama.cpp's mtmd on the same GGUF pair and text: the same token sequence (the image
    wrapped in <start_of_image> ... <end_of_image>, nothing around it) and last logits."""
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python is not installed (pip install '.[bench]')")
    msgs = _chat("describe the picture", "<img>", "in a few words")
    text = model.template.render(inline_images(msgs))
    try:
        seq, ref = mtmd_prompt(
            tiny_vision.mmproj,
            tiny_vision.text_gguf,
            text.replace(IMAGE_MARK, "<__media__>"),
            WIDE,
            tmp_path / "mtmd.npz",
        )
    except MtmdCrashed as e:
        pytest.skip(f"llama-cpp-python crashed (built for another CPU? rebuild portable): {e}")
    prompt = model.chat_prompt(msgs, _images(WIDE))
    (span,) = prompt.spans
    assert [-1 if span.start <= i < span.end else t for i, t in enumerate(prompt.ids)] == seq
    _, logits, _, _ = model.steps.prefill(
        model.params,
        model.steps.new_cache(),
        model.steps.new_sampler(),
        [prompt.ids],
        [0],
        [SamplingParams.greedy()],
        spans=[list(prompt.spans)],
    )
    assert rel_err(np.asarray(logits[0]), ref) < 1e-3


def test_engine_chunks_like_one_prefill(model):
    """The engine prefills 16 tokens at a time, so chunks end before each image and each
    image runs whole; greedy tokens equal one full prefill's (`tsjax.generate`)."""
    msgs = _chat("look", "<img>", "and compare with", "<img>", "which one is darker?")
    prompt = model.chat_prompt(msgs, _images(WIDE, TALL))
    want = generate(model, prompt, sampling=SamplingParams.greedy(), max_tokens=12)
    engine = Engine(model, prefill_chunk=16)
    engine.start()
    try:
        req = GenerationRequest(
            prompt.ids, SamplingParams.greedy(), 12, reuse_prefix=False, spans=prompt.spans
        )
        (events,) = run(engine, [req])
    finally:
        engine.stop()
    done = events[-1]
    assert done.kind is EventKind.DONE, done.error
    tokens = [t for ev in events if ev.kind is EventKind.TOKEN for t in ev.token_ids]
    assert tokens[: len(want.tokens)] == want.tokens and text_of(events) == want.text
    assert done.stats.prompt_tokens == len(prompt.ids)  # image positions count


def test_prefix_reuse_through_an_image(model):
    """A follow-up turn about the same picture reuses the cache through it; the same words
    about another picture reuse only what precedes it."""
    engine = Engine(model, prefill_chunk=32)
    engine.start()
    sp = SamplingParams.greedy()
    try:
        first = _chat("what is this", "<img>", "tell me")
        p1 = model.chat_prompt(first, _images(WIDE))
        (ev1,) = run(engine, [GenerationRequest(p1.ids, sp, 6, spans=p1.spans)])
        answer = text_of(ev1)
        follow = first + [
            {"role": "assistant", "content": answer},
            {"role": "user", "content": "and the colours?"},
        ]
        p2 = model.chat_prompt(follow, _images(WIDE))
        (ev2,) = run(engine, [GenerationRequest(p2.ids, sp, 4, spans=p2.spans)])
        assert ev2[-1].stats.cached_tokens >= p2.spans[0].end
        p3 = model.chat_prompt(first, _images(OTHER))
        (ev3,) = run(engine, [GenerationRequest(p3.ids, sp, 4, spans=p3.spans)])
        assert ev3[-1].stats.cached_tokens == p3.spans[0].start
    finally:
        engine.stop()


def test_no_compiles_after_warmup(model):
    """Warm-up compiles the image prefill's buckets beside the text ones: then neither a text
    request nor an image request compiles anything."""
    engine = Engine(model, prefill_chunk=32)
    assert engine.span_lens() == (16, 32, 64)  # a chunk reaching an image runs it whole
    engine.warmup()
    before = model.steps.compiled_count()
    engine.start()
    try:
        text = model.chat_prompt(_chat("hello there"))
        image = model.chat_prompt(_chat("<img>", "what now"), _images(TALL))
        sp = SamplingParams.greedy()
        events = run(
            engine,
            [
                GenerationRequest(text.ids, sp, 5, reuse_prefix=False),
                GenerationRequest(image.ids, sp, 5, reuse_prefix=False, spans=image.spans),
            ],
        )
    finally:
        engine.stop()
    assert all(ev[-1].kind is EventKind.DONE for ev in events)
    assert model.steps.compiled_count() == before


def test_engine_refuses_bad_spans(model):
    engine = Engine(model)
    ids = [2] + [5] * 30
    bad = EmbedSpan(3, np.zeros((4, model.config.dim + 1), np.float32), "aa")
    with pytest.raises(ValueError, match="width"):
        engine.check(GenerationRequest(ids, spans=(bad,)))
    many = model.chat_prompt(_chat(*["<img>"] * 8, "all of them?"), _images(*[WIDE] * 8))
    assert len(many.spans) == 8 and len(many) > model.max_len
    with pytest.raises(PromptTooLongError):
        engine.check(GenerationRequest(many.ids, spans=many.spans))


def test_encoder_batches_and_dedupes(model):
    """Concurrent requests' images go through the projector together, each distinct one
    once, and come back as the projector's own embeddings."""
    proj = model.projector
    a, b = (proj.prepare(x) for x in _images(WIDE, TALL))
    encoder = ImageEncoder(proj, max_batch=4)

    async def main():
        first = asyncio.ensure_future(encoder.embed([a, b, a]))
        second = asyncio.ensure_future(encoder.embed([b]))
        await asyncio.sleep(0)  # both submitted before the encoder starts
        encoder.start()
        return await first, await second

    try:
        (ea, eb, ea2), (eb2,) = asyncio.run(main())
    finally:
        encoder.stop()
    assert (encoder.stats.images, encoder.stats.batches) == (2, 1)
    want = proj.embed([a, b])
    np.testing.assert_allclose(ea, want[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(eb, want[1], rtol=1e-5, atol=1e-6)
    assert ea2 is ea and eb2 is eb
    with pytest.raises(RuntimeError, match="stopped"):
        encoder.submit([a])
