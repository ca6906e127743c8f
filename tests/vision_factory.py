"""A tiny random Gemma 3 vision model, converted by llama.cpp's own converter, and the
references it is checked against.

    tiny = build_tiny_gemma3_vision(tmp_path)     # HF checkpoint, text GGUF, mmproj GGUFs
    hf_image_features(tiny.hf_dir, pixels)        # transformers: [n, tokens, text D]
    hf_multimodal_logits(tiny.hf_dir, ids, image_mask, pixels)   # the whole model's logits
    mtmd_image_embeddings(tiny.mmproj, tiny.text_gguf, [rgb_uint8, ...])   # llama.cpp's mtmd

The route is the one `shared/recipes/gemma3` tried: a tiny SentencePiece tokenizer with
Gemma's special tokens (`<start_of_image>` and friends user-defined, as in the real repos),
then transformers builds a random Gemma3ForConditionalGeneration (text: 6 layers, so five
sliding-window layers and one global, window 24; vision: SigLIP 2 layers, 56 px images of
7 px patches = 8 x 8, pooled 2 x 2 into 16 tokens; norms and the projection randomised,
non-trivial image mean/std), its vision tower is saved under the hub's
`vision_tower.vision_model.*` names, and llama.cpp's `convert_hf_to_gguf.py` writes the text
model (f32) and, with `--mmproj`, the projector (f32 and f16). The converter comes from the
llama-cpp-python source distribution (`pip download`, cached under ~/.cache/tsjax).

mtmd runs in a subprocess (this file as a script): a llama.cpp build for another CPU dies
with SIGILL, which must not take pytest with it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from converter import converter_root

TEXT_DIM = 64
TEXT = dict(
    hidden_size=TEXT_DIM,
    intermediate_size=128,
    num_hidden_layers=6,  # llama.cpp makes every 6th Gemma 3 layer global (no pattern in GGUF)
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=32,
    query_pre_attn_scalar=32,  # llama.cpp scales queries by 1/sqrt(head_dim) (not in GGUF)
    sliding_window=24,  # past an image span (16): llama.cpp and transformers mask it alike
    max_position_embeddings=512,
    rope_parameters={
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
    },
)
SPECIAL = [
    "<mask>",
    "[multimodal]",
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_image>",
    "<end_of_image>",
    "<image_soft_token>",
]
VISION = dict(
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=56,
    patch_size=7,
    layer_norm_eps=1e-6,
    vision_use_head=False,
)
TOKENS_PER_IMAGE = 16  # (56 / 7 / 2)^2: the converter writes scale_factor 2
IMAGE_MEAN = [0.48, 0.46, 0.41]
IMAGE_STD = [0.27, 0.26, 0.28]


@dataclass(frozen=True)
class TinyVision:
    hf_dir: Path
    mmproj: Path  # f32
    mmproj_f16: Path
    text_gguf: Path


def build_tiny_gemma3_vision(out: Path, seed: int = 0) -> TinyVision:
    """Write the HF checkpoint and convert it; returns the paths."""
    out = Path(out)
    hf_dir = out / "hf"
    _write_hf(hf_dir, seed)
    tree = converter_root()  # the pinned, checksummed llama.cpp tree (tests/converter.py)
    mmproj, mmproj16 = out / "mmproj-tiny-f32.gguf", out / "mmproj-tiny-f16.gguf"
    text = out / "tiny-gemma3-f32.gguf"
    runs = [[str(hf_dir), "--outtype", "f32", "--outfile", str(text)]] + [
        [str(hf_dir), "--mmproj", "--outtype", t, "--outfile", str(p)]
        for t, p in (("f32", mmproj), ("f16", mmproj16))
    ]
    driver = (
        "import runpy, sys\n"
        f"conv = {str(tree / 'convert_hf_to_gguf.py')!r}\n"
        f"for args in {runs!r}:\n"
        "    sys.argv = [conv] + args\n"
        "    runpy.run_path(conv, run_name='__main__')\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree), str(tree / "gguf-py")])}
    proc = subprocess.run([sys.executable, "-c", driver], env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"convert_hf_to_gguf.py failed:\n{proc.stderr[-3000:]}")
    return TinyVision(hf_dir, mmproj, mmproj16, text)


_WORDS = (
    "the a of to and in is it you that he was for on are with as I his they be at one have"
    " this from or had by hot word but what some we can out other were all there when up use"
    " your how said an each she which do their time if will way about many then them write"
    " would like so these her long make thing see him two has look more day could go come did"
    " number sound no most people my over know water than call first who may down side been"
    " now find any new work part take get place made live where after back little only round"
    " man year came show every good me give our under name very through just form picture"
).split()


def _write_tokenizer(hf_dir: Path, seed: int) -> dict[str, int]:
    """A tiny SentencePiece BPE model with Gemma's ids (pad 0, eos 1, bos 2, unk 3) and its
    special tokens user-defined; `added_tokens.json` makes the converter type them so (as the
    real repos do), so that `<start_of_image>` is one token for llama.cpp and for tsjax."""
    import random

    import sentencepiece as spm

    rng = random.Random(seed)
    corpus = hf_dir / "corpus.txt"
    lines = (" ".join(rng.choice(_WORDS) for _ in range(12)) for _ in range(2000))
    corpus.write_text("\n".join(lines) + "\n")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(hf_dir / "spm"), vocab_size=400, model_type="bpe",
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>",
        bos_piece="<bos>", unk_piece="<unk>", user_defined_symbols=SPECIAL, byte_fallback=True,
        add_dummy_prefix=False, split_by_whitespace=False, normalization_rule_name="identity",
        character_coverage=1.0, minloglevel=2,
    )  # fmt: skip
    (hf_dir / "spm.model").rename(hf_dir / "tokenizer.model")
    for name in ("spm.vocab", "corpus.txt"):
        (hf_dir / name).unlink()
    sp = spm.SentencePieceProcessor(model_file=str(hf_dir / "tokenizer.model"))
    ids = {t: sp.piece_to_id(t) for t in SPECIAL}
    (hf_dir / "added_tokens.json").write_text(json.dumps(ids, indent=1))
    return {"vocab": sp.vocab_size(), **ids}


def _write_hf(hf_dir: Path, seed: int) -> None:
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3TextConfig,
        SiglipVisionConfig,
    )

    hf_dir.mkdir(parents=True, exist_ok=True)
    tok = _write_tokenizer(hf_dir, seed)
    cfg = Gemma3Config(
        text_config=Gemma3TextConfig(vocab_size=tok["vocab"], **TEXT),
        vision_config=SiglipVisionConfig(**VISION),
        mm_tokens_per_image=TOKENS_PER_IMAGE,
        boi_token_index=tok["<start_of_image>"],
        eoi_token_index=tok["<end_of_image>"],
        image_token_index=tok["<image_soft_token>"],
    )
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # LayerNorm weights/biases, soft_emb_norm: not the init's 1/0
                p.copy_(p + torch.randn_like(p) * 0.2)
        # HF initialises the projection to zeros; the converter writes it F16 even with
        # --outtype f32, so make it exactly fp16-representable (lossless round trip).
        w = model.model.multi_modal_projector.mm_input_projection_weight
        w.normal_(0, 0.2)
        w.copy_(w.half().float())
    model.save_pretrained(str(hf_dir), safe_serialization=True)
    # transformers 5 saves the tower as vision_tower.*; the converter (and the hub) use
    # vision_tower.vision_model.*. transformers loads both.
    path = hf_dir / "model.safetensors"
    state = {}
    for k, v in load_file(str(path)).items():
        if k.startswith("vision_tower.") and not k.startswith("vision_tower.vision_model."):
            k = "vision_tower.vision_model." + k[len("vision_tower.") :]
        state[k] = v.contiguous()
    save_file(state, str(path), metadata={"format": "pt"})
    pre = {
        "image_processor_type": "Gemma3ImageProcessor",
        "image_mean": IMAGE_MEAN,
        "image_std": IMAGE_STD,
        "image_seq_length": TOKENS_PER_IMAGE,
        "size": {"height": VISION["image_size"], "width": VISION["image_size"]},
        "resample": 2,
        "do_pan_and_scan": False,
    }
    (hf_dir / "preprocessor_config.json").write_text(json.dumps(pre, indent=1))


_hf_models: dict = {}


def hf_image_features(hf_dir: Path, pixels: np.ndarray) -> np.ndarray:
    """transformers' Gemma 3 vision tower + projector on pixels [n, S, S, 3] (normalized,
    channels last) -> [n, tokens, text D] float32."""
    import torch

    model = _hf_image_model(hf_dir)
    pv = torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2)))
    with torch.no_grad():
        f = model.model.get_image_features(pixel_values=pv)
    f = getattr(f, "pooler_output", f)
    f = f[0] if isinstance(f, tuple | list) and len(f) == 1 else f
    return np.asarray(f, np.float32).reshape(len(pixels), -1, TEXT_DIM)


def hf_multimodal_logits(
    hf_dir: Path, ids: list[int], image_starts: list[int], pixels: np.ndarray
) -> np.ndarray:
    """transformers' Gemma3ForConditionalGeneration on one prompt: `ids` with the images'
    positions (TOKENS_PER_IMAGE from each start) set to its image token and marked as image
    tokens (token_type_ids 1: bidirectional among themselves), pixels [n, S, S, 3]
    normalized. Returns all-position logits [T, V] float32."""
    import torch

    _hf_image_model(hf_dir)
    model = _hf_models[str(hf_dir)]
    ids = list(ids)
    types = [0] * len(ids)
    for s in image_starts:
        ids[s : s + TOKENS_PER_IMAGE] = [model.config.image_token_id] * TOKENS_PER_IMAGE
        types[s : s + TOKENS_PER_IMAGE] = [1] * TOKENS_PER_IMAGE
    pv = torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2)))
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor([ids]),
            pixel_values=pv,
            token_type_ids=torch.tensor([types]),
        )
    return out.logits[0].float().numpy()


def _hf_image_model(hf_dir: Path):
    import torch
    from transformers import Gemma3ForConditionalGeneration

    key = str(hf_dir)
    if key not in _hf_models:
        m = Gemma3ForConditionalGeneration.from_pretrained(key, dtype=torch.float32).eval()
        _hf_models[key] = m
    return _hf_models[key]


class MtmdCrashed(RuntimeError):
    """The llama.cpp subprocess died from a signal (e.g. SIGILL: built for another CPU)."""


def mtmd_image_embeddings(mmproj: Path, text_gguf: Path, images: list[np.ndarray], out: Path):
    """llama.cpp's mtmd (llama-cpp-python) on RGB uint8 images [H, W, 3]: preprocessing and
    encoding as llama.cpp does them. Returns one [tokens, text D] array per image."""
    z = _run_mtmd("mtmd", mmproj, text_gguf, images, out)
    return [z[f"arr_{i}"] for i in range(len(images))]


def _run_mtmd(mode: str, mmproj: Path, text_gguf: Path, arrays: list, out: Path) -> dict:
    """This file's `mode` entry point in a subprocess (llama.cpp may die of a signal) on
    `arrays`; what it wrote to `out` (an .npz), by name."""
    src = out.with_suffix(".in.npz")
    np.savez(src, *arrays)
    proc = subprocess.run(
        [sys.executable, __file__, mode, str(mmproj), str(text_gguf), str(src), str(out)],
        capture_output=True,
        text=True,
    )
    if proc.returncode < 0:
        raise MtmdCrashed(f"llama.cpp died with signal {-proc.returncode}: {proc.stderr[-500:]}")
    if proc.returncode:
        raise RuntimeError(f"mtmd reference failed:\n{proc.stderr[-3000:]}")
    with np.load(out) as z:
        return dict(z)


def _mtmd_main(mmproj: str, text_gguf: str, src: str, dst: str) -> None:
    import ctypes

    import llama_cpp
    from llama_cpp import mtmd_cpp as M

    llm = llama_cpp.Llama(model_path=text_gguf, n_ctx=256, verbose=False, n_threads=2)
    width = llm.n_embd()  # the text model's D (any projector family)
    cp = M.mtmd_context_params_default()
    cp.use_gpu, cp.print_timings, cp.n_threads, cp.warmup = False, False, 2, False
    cp.flash_attn_type = 0  # disabled: flash attention would round K/V to f16
    ctx = M.mtmd_init_from_file(mmproj.encode(), llm.model, cp)
    assert ctx, "mtmd_init_from_file failed"
    out = []
    with np.load(src) as z:
        images = [z[f"arr_{i}"] for i in range(len(z.files))]
    for img in images:
        h, w, _ = img.shape
        buf = (ctypes.c_uint8 * img.size).from_buffer_copy(np.ascontiguousarray(img).tobytes())
        bitmap = M.mtmd_bitmap_init(w, h, buf)
        marker = M.mtmd_default_marker()
        text = M.mtmd_input_text(marker, len(marker), False, True)
        chunks = M.mtmd_input_chunks_init()
        bitmaps = (M.mtmd_bitmap_p_ctypes * 1)(bitmap)
        assert M.mtmd_tokenize(ctx, chunks, ctypes.byref(text), bitmaps, 1) == 0
        for i in range(M.mtmd_input_chunks_size(chunks)):
            chunk = M.mtmd_input_chunks_get(chunks, i)
            if M.mtmd_input_chunk_get_type(chunk) == M.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                n = M.mtmd_input_chunk_get_n_tokens(chunk)
                assert M.mtmd_encode_chunk(ctx, chunk) == 0
                emb = np.ctypeslib.as_array(M.mtmd_get_output_embd(ctx), shape=(n * width,))
                out.append(emb.reshape(n, width).copy())
        M.mtmd_input_chunks_free(chunks)
        M.mtmd_bitmap_free(bitmap)
    M.mtmd_free(ctx)
    np.savez(dst, *out)


def mtmd_prompt(
    mmproj: Path, text_gguf: Path, text: str, image: np.ndarray, out: Path
) -> tuple[list[int], np.ndarray]:
    """llama.cpp's mtmd on one prompt: `text` with one `<__media__>` marker (special tokens
    parsed, nothing added) and an RGB uint8 image [H, W, 3]. Returns (the token sequence
    llama.cpp runs, -1 at the image's positions; the last position's logits [V])."""
    src = out.with_suffix(".in.npz")
    np.savez(src, image=image, text=np.frombuffer(text.encode(), np.uint8))
    proc = subprocess.run(
        [sys.executable, __file__, "mtmd-prompt", str(mmproj), str(text_gguf), str(src), str(out)],
        capture_output=True,
        text=True,
    )
    if proc.returncode < 0:
        raise MtmdCrashed(f"llama.cpp died with signal {-proc.returncode}: {proc.stderr[-500:]}")
    if proc.returncode:
        raise RuntimeError(f"mtmd reference failed:\n{proc.stderr[-3000:]}")
    with np.load(out) as z:
        return z["seq"].tolist(), z["logits"]


def _mtmd_prompt_main(mmproj: str, text_gguf: str, src: str, dst: str) -> None:
    import ctypes

    import llama_cpp
    from llama_cpp import mtmd_cpp as M

    # float32 keys and values, one batch for the whole prompt (an image is never split)
    llm = llama_cpp.Llama(
        model_path=text_gguf, n_ctx=256, n_batch=256, n_ubatch=256, type_k=0, type_v=0,
        flash_attn=False, verbose=False, n_threads=2,
    )  # fmt: skip
    cp = M.mtmd_context_params_default()
    cp.use_gpu, cp.print_timings, cp.n_threads, cp.warmup = False, False, 2, False
    cp.flash_attn_type = 0
    ctx = M.mtmd_init_from_file(mmproj.encode(), llm.model, cp)
    assert ctx, "mtmd_init_from_file failed"
    with np.load(src) as z:
        img, text = z["image"], z["text"].tobytes()
    h, w, _ = img.shape
    buf = (ctypes.c_uint8 * img.size).from_buffer_copy(np.ascontiguousarray(img).tobytes())
    bitmap = M.mtmd_bitmap_init(w, h, buf)
    inp = M.mtmd_input_text(text, len(text), False, True)
    chunks = M.mtmd_input_chunks_init()
    bitmaps = (M.mtmd_bitmap_p_ctypes * 1)(bitmap)
    assert M.mtmd_tokenize(ctx, chunks, ctypes.byref(inp), bitmaps, 1) == 0
    seq: list[int] = []
    for i in range(M.mtmd_input_chunks_size(chunks)):
        chunk = M.mtmd_input_chunks_get(chunks, i)
        if M.mtmd_input_chunk_get_type(chunk) == M.MTMD_INPUT_CHUNK_TYPE_TEXT:
            n = ctypes.c_size_t()
            toks = M.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
            seq += [int(toks[j]) for j in range(n.value)]
        else:
            seq += [-1] * M.mtmd_input_chunk_get_n_tokens(chunk)
    past = llama_cpp.llama_pos(0)
    rc = M.mtmd_helper_eval_chunks(ctx, llm._ctx.ctx, chunks, 0, 0, 256, True, ctypes.byref(past))
    assert rc == 0, rc
    n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(llm.model))
    logits = np.ctypeslib.as_array(
        llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(n_vocab,)
    ).copy()
    np.savez(dst, seq=np.asarray(seq, np.int64), logits=logits)


def mtmd_audio_embeddings(
    mmproj: Path, text_gguf: Path, clips: list[np.ndarray], out: Path
) -> list[tuple[list[int], np.ndarray]]:
    """llama.cpp's mtmd on 16 kHz mono float clips: its features, 30 s chunks and encoder.
    Returns per clip (the token sequence mtmd makes of the clip alone, -1 at its embedded
    positions; the embeddings [tokens, text D], every chunk's in order)."""
    z = _run_mtmd("mtmd-audio", mmproj, text_gguf, clips, out)
    return [(z[f"seq_{i}"].tolist(), z[f"emb_{i}"]) for i in range(len(clips))]


def _mtmd_audio_main(mmproj: str, text_gguf: str, src: str, dst: str) -> None:
    import ctypes

    import llama_cpp
    from llama_cpp import mtmd_cpp as M

    llm = llama_cpp.Llama(model_path=text_gguf, n_ctx=256, verbose=False, n_threads=2)
    width = llm.n_embd()
    cp = M.mtmd_context_params_default()
    cp.use_gpu, cp.print_timings, cp.n_threads, cp.warmup = False, False, 2, False
    cp.flash_attn_type = 0
    ctx = M.mtmd_init_from_file(mmproj.encode(), llm.model, cp)
    assert ctx, "mtmd_init_from_file failed"
    assert M.mtmd_support_audio(ctx), "mtmd sees no audio encoder in the file"
    out = {}
    with np.load(src) as z:
        clips = [z[f"arr_{i}"] for i in range(len(z.files))]
    for k, clip in enumerate(clips):
        data = np.ascontiguousarray(clip, np.float32)
        buf = (ctypes.c_float * data.size).from_buffer_copy(data.tobytes())
        bitmap = M.mtmd_bitmap_init_from_audio(data.size, buf)
        marker = M.mtmd_default_marker()
        text = M.mtmd_input_text(marker, len(marker), False, True)
        chunks = M.mtmd_input_chunks_init()
        bitmaps = (M.mtmd_bitmap_p_ctypes * 1)(bitmap)
        assert M.mtmd_tokenize(ctx, chunks, ctypes.byref(text), bitmaps, 1) == 0
        seq, embs = [], []
        for i in range(M.mtmd_input_chunks_size(chunks)):
            chunk = M.mtmd_input_chunks_get(chunks, i)
            if M.mtmd_input_chunk_get_type(chunk) == M.MTMD_INPUT_CHUNK_TYPE_TEXT:
                n = ctypes.c_size_t()
                toks = M.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
                seq += [int(toks[j]) for j in range(n.value)]
                continue
            n = M.mtmd_input_chunk_get_n_tokens(chunk)
            seq += [-1] * n
            assert M.mtmd_encode_chunk(ctx, chunk) == 0
            emb = np.ctypeslib.as_array(M.mtmd_get_output_embd(ctx), shape=(n * width,))
            embs.append(emb.reshape(n, width).copy())
        out[f"seq_{k}"] = np.asarray(seq, np.int64)
        out[f"emb_{k}"] = np.concatenate(embs)
        M.mtmd_input_chunks_free(chunks)
        M.mtmd_bitmap_free(bitmap)
    M.mtmd_free(ctx)
    np.savez(dst, **out)


if __name__ == "__main__" and sys.argv[1] == "mtmd-audio":
    _mtmd_audio_main(*sys.argv[2:6])
if __name__ == "__main__" and sys.argv[1] == "mtmd":
    _mtmd_main(*sys.argv[2:6])
if __name__ == "__main__" and sys.argv[1] == "mtmd-prompt":
    _mtmd_prompt_main(*sys.argv[2:6])
