"""Time Gemma 3's image encoder (SigLIP-So400m + projector) on one 896x896 image.

Real dimensions, random weights (no real mmproj is available here): 27 layers, dim 1152,
16 heads, FFN 4304, 14 px patches (64 x 64 = 4096 patches), pooled 4 x 4 into 256 tokens,
projected to the text width (640, Gemma 3 270M's). Reports the preprocessing of a photo-sized
JPEG, the first call (compile + run) and the steady-state encode time.

    python benchmarks/vision_encode.py                 # the full tower
    python benchmarks/vision_encode.py --layers 3      # quicker, for comparing variants
    python benchmarks/vision_encode.py --compare-attention   # one layer's attention, A/B
    python benchmarks/vision_encode.py --ttft gemma3-270m    # + time to first token

`--ttft MODEL` hosts the random tower as MODEL's projector (its text width) and times a chat
prompt with one 896x896 image through the engine, as the server runs it: preprocessing, the
encoder, then the prefill of the prompt with the image's 256 positions (one compiled chunk) to
the first token; a text-only prompt of the same length beside it for the prefill's share.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from tsjax.vision import Projector, VisionConfig
from tsjax.vision.gemma3 import module as gemma3_module


def so400m_config(layers: int, text_dim: int) -> VisionConfig:
    return VisionConfig(
        projector_type="gemma3",
        image_size=896,
        patch_size=14,
        dim=1152,
        ffn_dim=4304,
        n_layers=layers,
        n_heads=16,
        head_dim=72,
        norm_eps=1e-6,
        activation="gelu_tanh",
        image_mean=(0.5, 0.5, 0.5),
        image_std=(0.5, 0.5, 0.5),
        text_dim=text_dim,
        merge=4,
        image_begin="<start_of_image>",
        image_end="<end_of_image>",
        bidirectional=True,
    )


def random_params(module, cfg: VisionConfig) -> dict:
    """Weights ~ N(0, 0.02) (norm scales near 1), made on the device by the module's init."""
    pixels = jnp.zeros((1, cfg.image_size, cfg.image_size, 3), jnp.float32)
    return jax.jit(module.init)(jax.random.key(0), pixels)["params"]


def compare_attention(rounds: int = 3) -> None:
    """`tsjax.vision.vit.full_attention` against `jax.nn.dot_product_attention` at one
    SigLIP layer's shape (4096 patches, 16 heads of 72), alternating runs."""
    from tsjax.vision.vit import full_attention

    q = jax.random.normal(jax.random.key(0), (1, 4096, 16, 72), jnp.float32)
    variants = {
        "jax.nn.dot_product_attention": jax.jit(lambda q: jax.nn.dot_product_attention(q, q, q)),
        "full_attention": jax.jit(lambda q: full_attention(q, q, q, 72**-0.5)),
    }
    outs = [jax.block_until_ready(f(q)) for f in variants.values()]
    print(f"max abs difference {float(jnp.abs(outs[0] - outs[1]).max()):.1e}")
    for _ in range(rounds):
        for name, f in variants.items():
            t0 = time.perf_counter()
            jax.block_until_ready(f(q))
            print(f"  {name}: {time.perf_counter() - t0:.2f} s")


def ttft(proj: Projector, model_name: str, jpeg: bytes, repeat: int) -> None:
    """Time to first token of a one-image chat prompt through the engine (see the docstring)."""
    from serve.engine import Engine, EventKind, GenerationRequest
    from tsjax.model import load
    from tsjax.sampling import SamplingParams
    from tsjax.spans import EmbedSpan

    model = load(model_name, max_len=1024, progress=False)
    if model.config.dim != proj.config.text_dim:
        raise SystemExit(f"--text-dim must be {model.config.dim} for {model.name}")
    model.projector = proj
    t0 = time.perf_counter()
    secs = proj.warmup()
    print(f"projector warm-up (compile only): {secs:.1f} s")
    engine = Engine(model, prefill_chunk=512)
    t0 = time.perf_counter()
    engine.warmup()
    print(f"engine warm-up (text and image prefill buckets {engine.span_lens()}):"
          f" {time.perf_counter() - t0:.1f} s")  # fmt: skip
    engine.start()
    messages = [{"role": "user", "content": [{"type": "image"},
                 {"type": "text", "text": "Describe this picture in one sentence."}]}]  # fmt: skip
    greedy = SamplingParams.greedy()

    def first_token(req: GenerationRequest) -> float:
        """Seconds from submission to the first token event."""
        done = threading.Event()
        out: dict = {}

        def sink(ev):
            if ev.kind is EventKind.TOKEN and "t" not in out:
                out["t"] = time.perf_counter()
            if ev.kind in (EventKind.DONE, EventKind.ERROR):
                out["ev"] = ev
                done.set()

        t = time.perf_counter()
        engine.submit(req, sink)
        done.wait()
        assert out["ev"].kind is EventKind.DONE, out["ev"].error
        return out["t"] - t

    from tsjax.vision.prompt import IMAGE_MARK

    text, controls = model.template.render_marked(
        messages, model.tokenizer.control_texts, image_placeholder=IMAGE_MARK
    )
    ids, starts = model.tokenize_prompt(text, controls)
    try:
        for i in range(repeat):
            t0 = time.perf_counter()
            img = proj.prepare(jpeg)
            t1, c1 = time.perf_counter(), time.process_time()
            (emb,) = proj.embed([img])
            t2, c2 = time.perf_counter(), time.process_time()
            span = EmbedSpan(starts[0], emb, img.digest, True)
            req = GenerationRequest(ids, greedy, 2, reuse_prefix=False, spans=(span,))
            to_token = first_token(req)
            plain = first_token(GenerationRequest([2] + [107] * (len(ids) - 1), greedy, 2,
                                                  reuse_prefix=False))  # fmt: skip
            print(
                f"ttft {i + 1}: {t1 - t0 + t2 - t1 + to_token:.2f} s = preprocess"
                f" {(t1 - t0) * 1e3:.0f} ms + encode {t2 - t1:.2f} s + prefill to first token"
                f" {to_token:.2f} s ({len(ids)} tokens; text-only prompt as long: {plain:.2f} s);"
                f" the encode took {c2 - c1:.0f} CPU s (this process, every thread), load"
                f" average {os.getloadavg()[0]:.1f}"
            )
    finally:
        engine.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=27)
    ap.add_argument("--text-dim", type=int, default=640)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--compare-attention", action="store_true")
    ap.add_argument("--ttft", metavar="MODEL", default=None,
                    help="also time a one-image prompt to its first token on MODEL")  # fmt: skip
    args = ap.parse_args()
    if args.compare_attention:
        return compare_attention()

    cfg = so400m_config(args.layers, args.text_dim)
    dtype = jnp.dtype(args.dtype)
    module = gemma3_module(cfg, dtype)
    t0 = time.perf_counter()
    params = jax.block_until_ready(random_params(module, cfg))
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
    print(
        f"{jax.devices()[0].device_kind}: {args.layers} layers, {n_params / 1e6:.0f}M params"
        f" {args.dtype}, made in {time.perf_counter() - t0:.1f} s"
    )
    proj = Projector(Path("random-so400m"), cfg, params, module, buckets=(1,))

    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, (1536, 2048, 3), dtype=np.uint8))
    buf = io.BytesIO()
    photo.save(buf, "JPEG", quality=90)
    jpeg = buf.getvalue()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        img = proj.prepare(jpeg)
        times.append(time.perf_counter() - t0)
    print(f"preprocess 2048x1536 JPEG -> 896x896: {statistics.median(times) * 1e3:.0f} ms")
    if args.ttft:
        return ttft(proj, args.ttft, jpeg, args.repeat)

    pixels = img.pixels[None]
    t0 = time.perf_counter()
    out = jax.block_until_ready(proj.encode(pixels))
    print(f"first encode (compile + run): {time.perf_counter() - t0:.1f} s -> {out.shape}")
    times = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        jax.block_until_ready(proj.encode(pixels))
        times.append(time.perf_counter() - t0)
    # matmuls 2*P*(4*D^2 + 2*D*F) and attention 4*P^2*D per layer, P = 4096 patches
    p, d, f = cfg.n_patches, cfg.dim, cfg.ffn_dim
    flops = cfg.n_layers * (2 * p * (4 * d * d + 2 * d * f) + 4 * p * p * d)
    med = statistics.median(times)
    runs = ", ".join(f"{t:.2f}" for t in times)
    print(
        f"encode 1 image x {cfg.tokens_per_image} tokens: median {med:.2f} s of {args.repeat}"
        f" ({runs}), {flops / med / 1e9:.0f} GFLOP/s"
    )


if __name__ == "__main__":
    main()
