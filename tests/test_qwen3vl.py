"""Qwen 3.5 with its vision projector (`qwen3vl_merger`), on the factory's tiny random model
(`hf_factory.build("qwen35_vision")`: transformers' Qwen3_5ForConditionalGeneration,
converted by llama.cpp's converter):

- image embeddings against transformers (HF weights, the same pixels) and llama.cpp's mtmd
  (the same mmproj, its own preprocessing: dynamic resolution, bicubic) on non-square images,
  one taken as is and one resized up to the minimum pixel count;
- the token budget of dynamic resolution (`fit_size`) against transformers' smart_resize;
- every position's logits of a prompt with an image and text after it (M-RoPE positions: the
  image's tokens on its grid, the text after it max(rows, cols) positions on) against
  transformers; the same through a chunked prefill (the text after the image in a chunk of
  its own, its shift read from the cache) and a decode step; the token layout and the last
  logits against llama.cpp's mtmd on the same GGUF pair;
- the engine: a follow-up turn resumes after the image and answers as a fresh prefill does;
- the server end to end: an image through the OpenAI API, a follow-up that reuses the cache
  through it, and Ollama's chat.
"""

from __future__ import annotations

import base64
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err
from PIL import Image

from tsjax.model import load
from tsjax.sampling import SamplingParams
from tsjax.spans import span_inputs
from tsjax.vision.preprocess import fit_size

pytestmark = pytest.mark.slow


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    smooth = np.stack([(xx * 2) % 256, (yy * 2) % 256, (xx + yy) % 256], -1)
    return ((smooth + rng.integers(0, 64, (h, w, 3))) % 256).astype(np.uint8)


ASIS = _image(128, 96)  # 4 x 3 tokens: a multiple of 32 px within the limits, not resized
SMALL = _image(70, 100, seed=1)  # under 8 tokens: scaled up to 96 x 128 (3 x 4 tokens)


@pytest.fixture(scope="module")
def tiny():
    from hf_factory import build

    return build("qwen35_vision")


@pytest.fixture(scope="module")
def model(tiny):
    return load(
        tiny.gguf["f32"], mmproj=str(tiny.mmproj["f32"]), max_len=128, rows=2,
        progress=False, quant="f32",
    )  # fmt: skip


def test_image_embeddings_match_transformers_and_mtmd(tiny, model):
    import hf_reference as ref

    proj = model.projector
    assert proj.config.projector_type == "qwen3vl_merger" and proj.config.dynamic
    img = proj.prepare(Image.fromarray(ASIS))
    assert img.tokens == 12 and img.pixels.shape == (128, 96, 3)  # 4 x 3 tokens
    ours = proj.embed([img])[0]
    want = ref.hf_image_features(tiny, ref.pixel_inputs(tiny, ASIS))
    assert ours.shape == want.shape == (12, tiny.text_config["hidden_size"])
    assert rel_err(ours, want) < 1e-3
    small = proj.prepare(Image.fromarray(SMALL))
    assert small.tokens == 12 and small.pixels.shape == (96, 128, 3)  # 3 x 4 tokens
    ref.llama_cpp()  # the rest needs llama.cpp (optional second reference)
    assert rel_err(ours, ref.mtmd_image_embeddings(tiny, ASIS)) < 1e-3
    # mtmd resizes SMALL itself: equal embeddings mean equal preprocessing
    theirs = ref.mtmd_image_embeddings(tiny, SMALL)
    assert rel_err(proj.embed([small])[0], theirs) < 1e-3


def test_param_axes_and_sharded_load(tiny, model):
    """Every param has logical axes of its rank; the fused q/k/v splits by heads over tp
    (each of q, k, v whole per head); a projector loaded onto a mesh encodes the same."""
    import jax

    from tsjax.vision import load_projector
    from tsjax.vision.projector import PROJECTORS
    from tsjax.vision.sharding import VisionShardingPlan, param_axes

    proj, family = model.projector, PROJECTORS["qwen3vl_merger"]
    for path, leaf in jax.tree_util.tree_flatten_with_path(proj.params)[0]:
        keys = tuple(k.key for k in path)
        assert len(param_axes(family, keys)) == leaf.ndim, keys
    plan = VisionShardingPlan(jax.sharding.AbstractMesh((2, 2), ("dp", "tp")), proj.config)
    qkv = plan.named(param_axes(family, ("tower", "layers", "qkv", "weight")))
    assert tuple(qkv.spec) == (None, None, "tp")  # [L, 3, N*H, D]
    sharded = load_projector(tiny.mmproj["f32"], mesh=jax.make_mesh((1, 1), ("dp", "tp")))
    img = proj.prepare(Image.fromarray(ASIS))
    np.testing.assert_allclose(sharded.embed([img])[0], proj.embed([img])[0], rtol=1e-6, atol=1e-7)


def test_fit_size_matches_smart_resize(model):
    """llama.cpp's float32 sizing against transformers' smart_resize (float64) on sizes that
    hit the round, the min-pixels and the max-pixels branches."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    lo, hi = 8 * 32 * 32, 4096 * 32 * 32
    for w, h in [(96, 128), (100, 70), (7, 5), (1000, 333), (4000, 3000), (333, 5000)]:
        want = smart_resize(h, w, factor=32, min_pixels=lo, max_pixels=hi)
        assert fit_size(w, h, model.projector.config) == (want[1], want[0]), (w, h)


def _messages() -> list[dict]:
    return [{"role": "user", "content": [
        {"type": "text", "text": "look at this"}, {"type": "image"},
        {"type": "text", "text": "and say what you see in it, in many words"},
    ]}]  # fmt: skip


def _prompt(model):
    return model.chat_prompt(_messages(), [Image.fromarray(ASIS)])


def _hf_ids(tiny, prompt) -> list[int]:
    ids = list(prompt.ids)
    for s in prompt.spans:
        ids[s.start : s.end] = [tiny.config["image_token_id"]] * s.length
    return ids


def test_logits_with_an_image_match_transformers(tiny, model):
    import hf_reference as ref
    import torch

    prompt = _prompt(model)
    (span,) = prompt.spans
    assert span.grid == (4, 3) and len(prompt) - span.end > 10  # text after the image
    begin, end = (
        model.tokenizer.encode(t, add_bos=False) for t in ("<|vision_start|>", "<|vision_end|>")
    )
    assert prompt.ids[span.start - 1 : span.start] == begin
    assert prompt.ids[span.end : span.end + 1] == end
    pixels = ref.pixel_inputs(tiny, ASIS)
    want = ref.hf_multimodal_logits(tiny, _hf_ids(tiny, prompt), pixels)
    steps = model.steps
    host = span_inputs([list(prompt.spans)], np.zeros(1, np.int32), len(prompt),
                       model.config.dim, np.float32, mrope=True)  # fmt: skip
    ours = np.asarray(
        steps.forward_fn(
            model.params, steps.new_cache(), jnp.asarray([prompt.ids]), jnp.zeros((1,), jnp.int32),
            jax.tree.map(jnp.asarray, host), attn_len=steps.attn_len_for(len(prompt)),
        )[0]
    )  # fmt: skip
    assert rel_err(ours, want) < 1e-3
    # positions matter: the image at consecutive 1-D positions is far off
    flat = ref.hf_multimodal_logits(
        tiny,
        _hf_ids(tiny, prompt),
        pixels,
        mm_token_type_ids=torch.zeros((1, len(prompt)), dtype=torch.int64),
    )
    assert rel_err(flat[span.end :], want[span.end :]) > 1e-2

    # a chunked prefill: the image and its end marker, then the text after it (its rope
    # shift read from the cache), then one decode step
    cut = span.end + 1
    cache, sampler = steps.new_cache(), steps.new_sampler()
    greedy = [SamplingParams.greedy()]
    _, _, cache, sampler = steps.prefill(model.params, cache, sampler, [prompt.ids[:cut]], [0],
                                         greedy, spans=[list(prompt.spans)])  # fmt: skip
    first, logits, cache, sampler = steps.prefill(
        model.params, cache, sampler, [prompt.ids[cut:]], [0], greedy, starts=[cut]
    )
    assert rel_err(np.asarray(logits[0]), want[-1]) < 1e-3
    nxt = int(first[0])
    _, logits, cache, sampler = steps.decode(model.params, cache, sampler, [0], [nxt],
                                             len(prompt))  # fmt: skip
    after = ref.hf_multimodal_logits(tiny, _hf_ids(tiny, prompt) + [nxt], pixels)
    assert rel_err(np.asarray(logits[0]), after[-1]) < 1e-3


def test_layout_and_logits_match_llama_cpp(tiny, model, tmp_path):
    """llama.cpp's mtmd on the same GGUF pair and text: the same token sequence (the image's
    12 positions between <|vision_start|> and <|vision_end|>) and, after the text that
    follows the image at llama.cpp's M-RoPE positions, the same last logits."""
    import hf_reference as ref
    from vision_factory import mtmd_prompt

    from tsjax.vision.prompt import IMAGE_MARK, inline_images

    ref.llama_cpp()
    prompt = _prompt(model)
    text = model.template.render(inline_images(_messages()))
    seq, logits = mtmd_prompt(tiny.mmproj["f32"], tiny.gguf["f32"],
                              text.replace(IMAGE_MARK, "<__media__>"), ASIS,
                              tmp_path / "mtmd.npz")  # fmt: skip
    (span,) = prompt.spans
    ours = list(prompt.ids)
    ours[span.start : span.end] = [-1] * span.length
    assert seq == ours
    _, last, _, _ = model.steps.prefill(
        model.params, model.steps.new_cache(), model.steps.new_sampler(), [prompt.ids], [0],
        [SamplingParams.greedy()], spans=[list(prompt.spans)],
    )  # fmt: skip
    assert rel_err(np.asarray(last[0]), logits) < 1e-3


def test_engine_reuses_the_cache_through_an_image(model):
    """A conversation's next turn resumes from the row's state after the image (the rope
    shift and the recurrent states saved there), and a prompt with another image in the
    same place from a checkpoint before it; each answers as a fresh prefill does."""
    import asyncio

    from serve.engine import Engine, EventKind, GenerationRequest

    prompt = _prompt(model)
    (span,) = prompt.spans
    greedy = SamplingParams.greedy()

    def turn(eng, ids, spans, **kw) -> tuple[list, int]:
        """(each answer token's (id, the best log-probabilities), cached prompt tokens)."""

        async def main():
            req = GenerationRequest(ids, greedy, 6, spans=tuple(spans), logprobs=True, **kw)
            return [ev async for ev in eng.generate(req)]

        events = asyncio.run(main())
        assert events[-1].kind is EventKind.DONE, events[-1]
        lps = [lp for ev in events if ev.kind is EventKind.TOKEN for lp in ev.logprobs]
        return [(lp.token, np.array([v for _, v in lp.top])) for lp in lps], events[
            -1
        ].stats.cached_tokens

    def same(a, b) -> bool:  # the same tokens, log-probabilities to float32 noise
        return [t for t, _ in a] == [t for t, _ in b] and all(
            np.abs(x - y).max() < 1e-4 for (_, x), (_, y) in zip(a, b, strict=True)
        )

    eng = Engine(model, decode_steps=4, prefill_chunk=32)
    eng.start()
    try:
        a1, cached = turn(eng, prompt.ids, prompt.spans)
        assert cached == 0
        a1 = [t for t, _ in a1]
        p2 = prompt.ids + a1 + model.tokenizer.encode(" and then what", add_bos=False)
        a2, cached = turn(eng, p2, prompt.spans)
        assert cached == len(prompt) + len(a1) - 1  # everything but the last answer token
        fresh, cached = turn(eng, p2, prompt.spans, reuse_prefix=False)
        assert cached == 0 and same(a2, fresh)
    finally:
        eng.stop()
    eng = Engine(model, decode_steps=4, prefill_chunk=32)
    eng.start()
    try:
        # a checkpoint where the image starts, as a chat's resume point would put one
        turn(eng, prompt.ids, prompt.spans, checkpoints=(span.start,))
        # another image (3 x 4 tokens) in the same place: the row resumes from that
        # checkpoint, whose rope shift is the text's, not the first image's
        other = model.chat_prompt(_messages(), [Image.fromarray(SMALL)])
        assert other.spans[0].start == span.start and other.spans[0].grid == (3, 4)
        a3, cached = turn(eng, other.ids, other.spans)
        assert cached == span.start
        fresh, _ = turn(eng, other.ids, other.spans, reuse_prefix=False)
        assert same(a3, fresh)
    finally:
        eng.stop()


def _png(a: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_server_openai_image_and_follow_up(tiny, tmp_path):
    """An image through OpenAI chat completions (resized up to 3 x 4 tokens; the prompt's
    tokens counted with them), a follow-up turn that reuses the cache through the image, and
    the image through Ollama's chat; none compiles a prefill (warmed at start)."""
    openai = pytest.importorskip("openai")
    from live_server import LiveServer, free_port

    from serve.app import create_app
    from serve.settings import Settings

    port = free_port()
    settings = Settings(
        model=str(tiny.gguf["f32"]), mmproj=str(tiny.mmproj["f32"]), host="127.0.0.1",
        port=port, rows=1, max_len=128, prefill_chunk=32, upload_dir=str(tmp_path),
    )  # fmt: skip
    app = create_app(settings)
    server = LiveServer(app, port)
    url = server.start(timeout=600)
    try:
        hub = app.state.hub
        warm = sorted(k for k in hub.model.steps.programs.keys() if k[0] == "span_prefill")
        assert warm  # the prefills of chunks with an image, from the smallest image's on
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        name = hub.model.name
        parts = [{"type": "text", "text": "What is this?"},
                 {"type": "image_url", "image_url": {"url": _png(SMALL)}}]  # fmt: skip
        lib = hub.model.chat_prompt(
            [{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                          {"type": "image"}]}], [Image.fromarray(SMALL)],
        )  # fmt: skip
        assert lib.spans[0].grid == (3, 4)
        msgs = [{"role": "user", "content": parts}]
        r = client.chat.completions.create(model=name, messages=msgs, max_tokens=6,
                                           temperature=0)  # fmt: skip
        assert r.usage.prompt_tokens == len(lib.ids)
        follow = [*msgs, {"role": "assistant", "content": r.choices[0].message.content},
                  {"role": "user", "content": "And the colours?"}]  # fmt: skip
        again = client.chat.completions.create(model=name, messages=follow, max_tokens=6,
                                               temperature=0)  # fmt: skip
        assert again.usage.prompt_tokens > r.usage.prompt_tokens
        assert again.usage.prompt_tokens_details.cached_tokens > lib.spans[0].end
        # Ollama's images go before the message's text
        ollama = pytest.importorskip("ollama")
        png = base64.b64decode(_png(SMALL).split(",", 1)[1])
        msg = {"role": "user", "content": "What is this?", "images": [png]}
        o = ollama.Client(host=url).chat(model=name, messages=[msg],
                                         options={"num_predict": 4, "temperature": 0})  # fmt: skip
        first = [{"type": "image"}, {"type": "text", "text": "What is this?"}]
        lib = hub.model.chat_prompt([{"role": "user", "content": first}], [png])
        assert o.prompt_eval_count == len(lib.ids)
        now = sorted(k for k in hub.model.steps.programs.keys() if k[0] == "span_prefill")
        assert now == warm  # no image request compiled a prefill
    finally:
        server.stop()
