"""Reference outputs for the tiny models of `hf_factory`: transformers on the HF weights, and
llama.cpp (through llama-cpp-python, when installed) on the converted GGUF files.

transformers on the HF checkpoint is the independent reference for every family; llama.cpp is
the second one (it is the engine those GGUF files are made for). llama-cpp-python is not a test
dependency and CI does not build it: the ``llama_cpp_*`` helpers skip the calling test when it
is missing. All outputs are float32 NumPy arrays computed on the CPU, eager attention, no cache.

    m = hf_factory.build("gemma3_vision")
    hf_logits(m, ids)                                  # [T, V]
    px = pixel_inputs(m, image)                        # HF inputs for a uint8 [H, W, 3] image
    hf_image_features(m, px)                           # [n_image_tokens, E_text]
    hf_multimodal_logits(m, ids, px)                   # [T, V], image tokens already in `ids`
    llama_cpp_logits(m.gguf["f32"], ids)               # [T, V]
    mtmd_image_embeddings(m, image)                    # [n, E_text] from llama.cpp's mtmd

`pixel_inputs` does no resampling: pass an image whose size the family accepts as is (a
multiple of the patch grid; Gemma 3: exactly its image size), so that these references compare
the models, not the resamplers. Preprocessing parity (resize, letterbox) is the serving code's
own test, against mtmd.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import Any

import numpy as np
from hf_factory import TinyModel


def rel_err(ours, ref) -> float:
    """max |ours - ref| / max |ref|: the project's parity measure."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def hf_model(m: TinyModel):
    """The HF model of `m` (its `hf_class`), float32, eager attention, eval mode; cached."""
    return _hf_model(m.hf_dir, m.hf_class)


@functools.cache
def _hf_model(hf_dir: Path, hf_class: str):
    import torch
    import transformers

    cls = getattr(transformers, hf_class)
    model = cls.from_pretrained(str(hf_dir), dtype=torch.float32, attn_implementation="eager")
    return model.eval()


def hf_logits(m: TinyModel, ids: list[int], **forward_kwargs: Any) -> np.ndarray:
    """Full-sequence float32 logits [T, V] of one prompt from transformers on the HF weights."""
    import torch

    with torch.no_grad():
        out = hf_model(m)(input_ids=torch.tensor([ids]), use_cache=False, **forward_kwargs)
    return out.logits[0].float().numpy()


def hf_gguf_logits(m: TinyModel, ids: list[int], outtype: str = "f32", **config) -> np.ndarray:
    """Logits [T, V] from transformers' own GGUF loader on `m.gguf[outtype]`.

    Only meaningful where that loader reads the family correctly (qwen35/qwen35moe; gemma3 text
    with ``query_pre_attn_scalar=head_dim``); `config` overrides what it reads wrongly.
    """
    import torch
    from transformers import AutoModelForCausalLM

    path = m.gguf[outtype]
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32,
        attn_implementation="eager", **config,
    ).eval()  # fmt: skip
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float().numpy()


# ----------------------------------------------------------------------------- vision


def pixel_inputs(m: TinyModel, image: np.ndarray) -> dict[str, Any]:
    """The HF vision inputs for a uint8 [H, W, 3] image, normalised with the checkpoint's
    mean/std and packed as the family's get_image_features expects, without resizing."""
    import torch

    pre = _preprocessor(m)
    x = torch.from_numpy(image.astype(np.float32) / 255.0).permute(2, 0, 1)  # [3, H, W]
    mean = torch.tensor(pre["image_mean"], dtype=torch.float32)[:, None, None]
    std = torch.tensor(pre["image_std"], dtype=torch.float32)[:, None, None]
    x = (x - mean) / std
    h, w = image.shape[:2]
    vc = m.config["vision_config"]
    if m.projector == "gemma3":
        if (h, w) != (vc["image_size"],) * 2:
            raise ValueError(f"gemma3 takes {vc['image_size']}x{vc['image_size']} images as is")
        return {"pixel_values": x[None]}
    if m.projector == "pixtral":
        return {"pixel_values": x[None], "image_sizes": torch.tensor([[h, w]])}
    if m.projector == "qwen3vl_merger":
        return _qwen_patches(
            x, vc["patch_size"], vc["spatial_merge_size"], vc["temporal_patch_size"]
        )
    if m.projector == "gemma4v":
        return _gemma4_patches(x, vc["patch_size"], vc["pooling_kernel_size"])
    raise ValueError(f"no vision inputs for {m.name}")


def _preprocessor(m: TinyModel) -> dict[str, Any]:
    import json

    for name in ("preprocessor_config.json", "processor_config.json"):
        path = m.hf_dir / name
        if path.is_file():
            cfg = json.loads(path.read_text())
            return cfg.get("image_processor", cfg)
    raise FileNotFoundError(f"{m.hf_dir} has no preprocessor config")


def _qwen_patches(x, p: int, merge: int, t: int) -> dict[str, Any]:
    """Qwen2-VL packing: the image repeated over `t` frames, cut in p x p patches, rows of
    (C, t, p, p) values, each merge x merge block of patches contiguous."""
    import torch

    _, h, w = x.shape
    gh, gw = h // p, w // p
    if gh * p != h or gw * p != w or gh % merge or gw % merge:
        raise ValueError(f"{h}x{w} is not a multiple of patch {p} x merge {merge}")
    v = x[None].repeat(t, 1, 1, 1).reshape(t, 3, gh // merge, merge, p, gw // merge, merge, p)
    v = v.permute(2, 5, 3, 6, 1, 0, 4, 7).reshape(gh * gw, 3 * t * p * p)
    return {"pixel_values": v, "image_grid_thw": torch.tensor([[1, gh, gw]])}


def _gemma4_patches(x, p: int, pool: int) -> dict[str, Any]:
    """Gemma 4 packing: [1, n_patches, p*p*3] patches in row-major order (values in [0, 1]
    *before* normalisation: the tower rescales them itself) and their (x, y) positions."""
    import torch

    _, h, w = x.shape
    gh, gw = h // p, w // p
    if gh * p != h or gw * p != w or gh % pool or gw % pool:
        raise ValueError(f"{h}x{w} is not a multiple of patch {p} x pooling {pool}")
    v = x.reshape(3, gh, p, gw, p).permute(1, 3, 2, 4, 0).reshape(1, gh * gw, p * p * 3)
    yy, xx = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    pos = torch.stack([xx.reshape(-1), yy.reshape(-1)], -1)[None]
    return {"pixel_values": v, "image_position_ids": pos}


def hf_image_features(m: TinyModel, inputs: dict[str, Any]) -> np.ndarray:
    """Image embeddings [n_tokens, E_text] from the HF vision tower + projector (what replaces
    the image placeholder tokens in the text model's input embeddings)."""
    import torch

    with torch.no_grad():
        out = hf_model(m).model.get_image_features(**inputs)
    feats = out.pooler_output if hasattr(out, "pooler_output") else out
    if isinstance(feats, (list, tuple)):
        feats = torch.cat([f.reshape(-1, f.shape[-1]) for f in feats], 0)
    return feats.reshape(-1, feats.shape[-1]).float().numpy()


def hf_multimodal_logits(
    m: TinyModel, ids: list[int], inputs: dict[str, Any], **forward_kwargs: Any
) -> np.ndarray:
    """Logits [T, V] of a prompt whose image placeholder tokens are already expanded in `ids`
    (one per image embedding, the checkpoint's image token id), with the image `inputs`."""
    import torch

    kw = dict(forward_kwargs)
    if m.projector == "gemma3" and "token_type_ids" not in kw:
        # Gemma 3 attends bidirectionally inside an image span; HF needs the span marked.
        img = m.config["image_token_index"]
        kw["token_type_ids"] = torch.tensor([[int(t == img) for t in ids]])
    if m.projector == "qwen3vl_merger" and "mm_token_type_ids" not in kw:
        # M-RoPE: transformers gives image tokens (t, h, w) positions only where marked
        img = m.config["image_token_id"]
        kw["mm_token_type_ids"] = torch.tensor([[int(t == img) for t in ids]])
    with torch.no_grad():
        out = hf_model(m)(input_ids=torch.tensor([ids]), use_cache=False, **inputs, **kw)
    return out.logits[0].float().numpy()


# ----------------------------------------------------------------------------- llama.cpp


@contextlib.contextmanager
def llama_cpp_gelu():
    """Make transformers' tanh-GELU round like llama.cpp's CPU GELU while inside.

    ggml-cpu computes GELU through a table indexed by the input rounded to fp16, holding fp16
    outputs (``GGML_GELU_FP16`` in ggml-cpu/vec.h; exact beyond |x| >= 10). That alone puts the
    Gemma families' logits 5e-4 (gemma3) to 1e-2 (gemma4 MoE: routing near-ties flip) away from
    the float32 reference; with this emulation they agree to ~1e-3. Use it only when comparing
    with llama.cpp: tsjax must match the plain float32 reference.
    """
    import torch
    from transformers.activations import GELUTanh

    forward = GELUTanh.forward

    def rounded(self, x):
        y = forward(self, x.half().float()).half().float()
        return torch.where(x <= -10, torch.zeros_like(x), torch.where(x >= 10, x, y))

    GELUTanh.forward = rounded
    try:
        yield
    finally:
        GELUTanh.forward = forward


def llama_cpp():
    """The llama_cpp module, or skip the calling test (it is an optional second reference)."""
    import pytest

    return pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python is not installed (optional second reference)"
    )


@functools.cache
def _llama(path: Path, n_ctx: int = 512):
    lc = llama_cpp()
    return lc.Llama(
        model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True,
        verbose=False, type_k=0, type_v=0, n_threads=2,  # f32 KV cache: no rounding there
    )  # fmt: skip


def llama_cpp_logits(path: Path, ids: list[int]) -> np.ndarray:
    """Full-sequence logits [T, V] from llama.cpp on the GGUF at `path` (f32 KV cache)."""
    llm = _llama(Path(path))
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


@functools.cache
def _mtmd(text: Path, mmproj: Path):
    """An mtmd context for (text GGUF, projector GGUF), CPU, 2 threads; cached."""
    llama_cpp()
    from llama_cpp import mtmd_cpp as mtmd

    params = mtmd.mtmd_context_params_default()
    params.use_gpu = False
    params.n_threads = 2
    params.print_timings = False
    ctx = mtmd.mtmd_init_from_file(str(mmproj).encode(), _llama(Path(text)).model, params)
    assert ctx, f"mtmd_init_from_file failed for {mmproj}"
    return ctx


def _mtmd_chunks(m: TinyModel, bitmap, prompt: bytes, mmproj: str):
    """Tokenize `prompt` (with mtmd's media marker where the media goes) around one bitmap."""
    import ctypes

    from llama_cpp import mtmd_cpp as mtmd

    ctx = _mtmd(m.gguf["f32"], m.mmproj[mmproj])
    text = mtmd.mtmd_input_text(prompt, len(prompt), True, True)
    chunks = mtmd.mtmd_input_chunks_init()
    bitmaps = (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap)
    rc = mtmd.mtmd_tokenize(ctx, chunks, ctypes.byref(text), bitmaps, 1)
    assert rc == 0, f"mtmd_tokenize: {rc}"
    return ctx, chunks


def _media_embeddings(m: TinyModel, bitmap, mmproj: str) -> np.ndarray:
    from llama_cpp import mtmd_cpp as mtmd

    marker = mtmd.mtmd_default_marker()
    ctx, chunks = _mtmd_chunks(m, bitmap, marker, mmproj)
    width = m.text_config["hidden_size"]
    for i in range(mtmd.mtmd_input_chunks_size(chunks)):
        chunk = mtmd.mtmd_input_chunks_get(chunks, i)
        if mtmd.mtmd_input_chunk_get_type(chunk) != 0:  # not text
            n = mtmd.mtmd_input_chunk_get_n_tokens(chunk)
            assert mtmd.mtmd_encode_chunk(ctx, chunk) == 0
            out = mtmd.mtmd_get_output_embd(ctx)
            return np.ctypeslib.as_array(out, shape=(n * width,)).reshape(n, width).copy()
    raise AssertionError("mtmd produced no media chunk")


def mtmd_image_embeddings(m: TinyModel, image: np.ndarray, mmproj: str = "f32") -> np.ndarray:
    """llama.cpp's (mtmd) embeddings [n, E_text] for a uint8 [H, W, 3] image, its own
    preprocessing included (resize/letterbox as mtmd does); skips without llama-cpp-python."""
    import ctypes

    llama_cpp()
    from llama_cpp import mtmd_cpp as mtmd

    h, w, _ = image.shape
    data = (ctypes.c_uint8 * image.size).from_buffer_copy(np.ascontiguousarray(image).tobytes())
    return _media_embeddings(m, mtmd.mtmd_bitmap_init(w, h, data), mmproj)


def mtmd_audio_embeddings(m: TinyModel, samples: np.ndarray, mmproj: str = "f32") -> np.ndarray:
    """llama.cpp's (mtmd) embeddings [n, E_text] for float32 mono 16 kHz `samples`."""
    import ctypes

    llama_cpp()
    from llama_cpp import mtmd_cpp as mtmd

    s = np.ascontiguousarray(samples, np.float32)
    data = (ctypes.c_float * s.size).from_buffer_copy(s.tobytes())
    return _media_embeddings(m, mtmd.mtmd_bitmap_init_from_audio(s.size, data), mmproj)
