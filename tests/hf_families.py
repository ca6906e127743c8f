"""The builders of `hf_factory`: one tiny random Hugging Face model per family and variant.

Each builder saves a checkpoint into the directory it is given (weights, config.json, tokenizer
with the family's special tokens and real chat template, processor config for projectors) and
returns {special token: id}; `hf_factory.build` converts it. The docstrings say which parameter
kinds each one exercises. Sizes are tiny (hidden 64, vocab 512, <= 8 layers) so that a cold
build of all of them stays well under two minutes; the choices that make a kind reachable in a
tiny model (a small soft-cap, a small original context for attention temperature, larger
gate weights for the GPT-OSS SwiGLU clamp, finite clip bounds) are noted where they are made.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import family_tokenizers as ft
from hf_factory import family, randomize, round_to_f16, save

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


# ----------------------------------------------------------------------------- Nemotron-H

NEMOTRON_SPECIALS = [
    ("<unk>", True), ("<s>", True), ("</s>", True), ("<SPECIAL_10>", True),
    ("<SPECIAL_11>", True), ("<SPECIAL_12>", True), ("<think>", False), ("</think>", False),
    ("<TOOLCALL>", False), ("</TOOLCALL>", False), ("<AVAILABLE_TOOLS>", False),
    ("</AVAILABLE_TOOLS>", False), ("<TOOL_RESPONSE>", False), ("</TOOL_RESPONSE>", False),
]  # fmt: skip
NEMOTRON3_SPECIALS = [
    ("<unk>", True), ("<s>", True), ("</s>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<think>", False), ("</think>", False), ("<tool_call>", False), ("</tool_call>", False),
    ("<tool_response>", False), ("</tool_response>", False),
]  # fmt: skip
_PATTERN = {"mamba": "M", "attention": "*", "mlp": "-", "moe": "E"}
_MOE_KEYS = (
    "n_routed_experts", "num_experts_per_tok", "n_shared_experts", "moe_intermediate_size",
    "moe_shared_expert_intermediate_size", "moe_latent_size", "moe_shared_expert_overlap",
    "n_group", "topk_group", "norm_topk_prob", "routed_scaling_factor",
)  # fmt: skip
_MTP_KEYS = ("num_nextn_predict_layers", "mtp_layers_block_type")


def _nemotron_hub_config(hf: Path, layers: list[str], moe: bool) -> None:
    """Rewrite config.json the way hub Nemotron-H checkpoints write it.

    transformers 5 saves ``layers_block_type`` and every MoE default; hub configs have
    ``hybrid_override_pattern`` (M = Mamba2, * = attention, - = MLP, E = MoE) and MoE keys only
    for MoE models. The converter picks ``nemotron_h_moe`` whenever a MoE key is present, so a
    dense model must lose them (converted with ``raw_config``; transformers reads both styles).
    """
    path = hf / "config.json"
    cfg = json.loads(path.read_text())
    cfg.pop("layers_block_type")
    cfg["hybrid_override_pattern"] = "".join(_PATTERN[t] for t in layers)
    cfg["num_hidden_layers"] = len(layers)
    for key in _MTP_KEYS + (() if moe else _MOE_KEYS):
        cfg.pop(key, None)
    path.write_text(json.dumps(cfg, indent=1))


def _nemotron(hf: Path, layers: list[str], specials, template: str, **moe: Any) -> dict[str, int]:
    import torch
    from transformers import NemotronHConfig, NemotronHForCausalLM

    eos = "<|im_end|>" if moe else "<SPECIAL_12>"  # what ends an assistant turn
    ids = ft.byte_bpe_tokenizer(
        hf, pre="tekken", specials=specials, bos="<s>", eos=eos, unk="<unk>",
        specials_first=True, template=ft.family_template(template),
    )  # fmt: skip
    cfg = NemotronHConfig(
        vocab_size=ft.VOCAB_SIZE, hidden_size=64, layers_block_type=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=128,
        mamba_num_heads=4, mamba_head_dim=16, ssm_state_size=16, n_groups=2, conv_kernel=4,
        chunk_size=8, use_conv_bias=True, max_position_embeddings=1024,
        bos_token_id=ids["<s>"], eos_token_id=ids[eos], pad_token_id=ids["<unk>"], **moe,
    )  # fmt: skip
    torch.manual_seed(0)
    model = randomize(NemotronHForCausalLM(cfg), buffers=("e_score_correction_bias",))
    save(model, hf)
    _nemotron_hub_config(hf, layers, moe=bool(moe))
    return ids


@family(name="nemotron_h", arch="nemotron_h", hf_class="NemotronHForCausalLM",
        force_pre="tekken", raw_config=True)  # fmt: skip
def nemotron_h(hf: Path) -> dict[str, int]:
    """Nemotron-H / Nemotron Nano v2 style: pattern ``M-M*-`` (Mamba2, MLP, Mamba2, attention,
    MLP). Mamba2: 4 heads x 16, state 16, 2 groups (grouped gated RMSNorm), conv kernel 4 with
    bias; attention GQA 4:2 without RoPE; MLP relu^2 (no gate). Tokenizer: tekken split, the
    Nano v2 template (<SPECIAL_10/11/12> turns, <think>, <TOOLCALL>)."""
    layers = ["mamba", "mlp", "mamba", "attention", "mlp"]
    return _nemotron(hf, layers, NEMOTRON_SPECIALS, "NVIDIA-Nemotron-Nano-v2.jinja")


@family(name="nemotron_h_moe", arch="nemotron_h_moe", hf_class="NemotronHForCausalLM",
        force_pre="tekken", raw_config=True)  # fmt: skip
def nemotron_h_moe(hf: Path) -> dict[str, int]:
    """Nemotron 3 Nano (30B-A3B) style: pattern ``MEM*E``. MoE: 8 routed experts (relu^2 up/down,
    no gate), sigmoid router with a score-correction bias used for selection only, top-2,
    renormalised, x2.5, plus one shared expert. Template: Nemotron 3 Nano (ChatML, <think>,
    <tool_call><function=...>)."""
    layers = ["mamba", "moe", "mamba", "attention", "moe"]
    moe = dict(
        n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=32,
        moe_shared_expert_intermediate_size=48, n_group=1, topk_group=1, norm_topk_prob=True,
        routed_scaling_factor=2.5,
    )  # fmt: skip
    return _nemotron(
        hf, layers, NEMOTRON3_SPECIALS, "NVIDIA-Nemotron-3-Nano-30B-A3B-BF16.jinja", **moe
    )


# ----------------------------------------------------------------------------- GPT-OSS (MXFP4)

# E2M1 values of the 16 FP4 codes (bit 3 = sign), as OCP MX, transformers and ggml define them.
FP4_VALUES = (
    0.0,
    0.5,
    1.0,
    1.5,
    2.0,
    3.0,
    4.0,
    6.0,
    -0.0,
    -0.5,
    -1.0,
    -1.5,
    -2.0,
    -3.0,
    -4.0,
    -6.0,
)


def mxfp4_quantize(w):
    """Round the rows of `w` [..., K] (K % 32 == 0) to MXFP4: blocks of 32 values sharing a
    power-of-two scale 2^e (stored as the E8M0 byte e + 127) times an FP4 code each.

    Returns (codes uint8 [..., K] in 0..15, exponents int32 [..., K/32], dequantised float32
    [..., K]). The scale is the smallest that does not clip (max |x| / 2^e <= 6).
    """
    import torch

    lut = torch.tensor(FP4_VALUES[:8])
    blocks = w.float().reshape(*w.shape[:-1], w.shape[-1] // 32, 32)
    amax = blocks.abs().amax(-1).clamp_min(2.0**-100)
    e = torch.ceil(torch.log2(amax / 6.0)).clamp(-127, 127).to(torch.int32)
    scaled = blocks / torch.exp2(e.float())[..., None]
    mag = (scaled.abs()[..., None] - lut).abs().argmin(-1)
    codes = (mag | ((scaled < 0).to(torch.int64) << 3)).to(torch.uint8)
    deq = torch.tensor(FP4_VALUES)[codes.long()] * torch.exp2(e.float())[..., None]
    return codes.reshape(w.shape), e, deq.reshape(w.shape)


def _pack_hf_mxfp4(codes, e):
    """OpenAI's checkpoint layout: ``_blocks`` [..., K/32, 16] bytes (value 2i in the low nibble,
    2i+1 in the high one) and ``_scales`` [..., K/32] E8M0 bytes."""
    import torch

    c = codes.reshape(*codes.shape[:-1], codes.shape[-1] // 32, 32)
    blocks = (c[..., 0::2] | (c[..., 1::2] << 4)).to(torch.uint8)
    return blocks.contiguous(), (e + 127).to(torch.uint8).contiguous()


GPT_OSS_SPECIALS = [
    ("<|startoftext|>", True), ("<|endoftext|>", True), ("<|return|>", True),
    ("<|constrain|>", True), ("<|channel|>", True), ("<|start|>", True), ("<|end|>", True),
    ("<|message|>", True), ("<|call|>", True),
]  # fmt: skip


@family(name="gpt_oss", arch="gpt-oss", hf_class="GptOssForCausalLM", force_pre="gpt-4o",
        extra_gguf=(("mxfp4", "hf-mxfp4", "f32"),))  # fmt: skip
def gpt_oss(hf: Path) -> dict[str, int]:
    """GPT-OSS (20b-style): 4 layers alternating sliding (window 8) / full attention, GQA 4:2 with
    q/k/v/o biases and a learned sink logit per head, YaRN RoPE (factor 32 over 4096, beta
    32/1, theta 150000), MoE of 8 experts top-2 (softmax over the top-k router logits, router
    bias), clamped SwiGLU (alpha 1.702, limit 7) with biases. Expert weights are rounded to
    MXFP4 in the HF checkpoint, so ``gguf["mxfp4"]`` (converted from ``hf-mxfp4/``, OpenAI's
    blocks/scales layout, as real checkpoints ship) holds exactly the reference's weights.
    The gate/up weights are drawn 10x larger so the SwiGLU clamp at 7 is reached.
    """
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import GptOssConfig, GptOssForCausalLM

    ids = ft.byte_bpe_tokenizer(
        hf, pre="gpt-4o", specials=GPT_OSS_SPECIALS, bos="<|startoftext|>", eos="<|return|>",
        pad="<|endoftext|>", template=ft.family_template("openai-gpt-oss-120b.jinja"),
    )  # fmt: skip
    rope = {
        "rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
        "truncate": False, "original_max_position_embeddings": 4096, "rope_theta": 150000.0,
    }  # fmt: skip
    cfg = GptOssConfig(
        vocab_size=ft.VOCAB_SIZE, hidden_size=64, intermediate_size=64, num_hidden_layers=4,
        num_local_experts=8, num_experts_per_tok=2, head_dim=16, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=8, max_position_embeddings=131072,
        rope_parameters=rope, eos_token_id=ids["<|return|>"], pad_token_id=ids["<|endoftext|>"],
        bos_token_id=ids["<|startoftext|>"],
    )  # fmt: skip
    torch.manual_seed(0)
    model = randomize(GptOssForCausalLM(cfg))
    packed = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                if name.endswith("gate_up_proj"):
                    p.mul_(10.0)
                codes, e, deq = mxfp4_quantize(p.transpose(1, 2))  # rows = output features
                p.copy_(deq.transpose(1, 2))
                packed[name] = _pack_hf_mxfp4(codes, e)
    save(model, hf)
    mx = hf.parent / "hf-mxfp4"
    shutil.copytree(hf, mx)
    state = load_file(str(mx / "model.safetensors"))
    for name, (blocks, scales) in packed.items():
        del state[name]
        state[f"{name}_blocks"], state[f"{name}_scales"] = blocks, scales
    save_file(state, str(mx / "model.safetensors"), {"format": "pt"})
    config = json.loads((mx / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                   "model.embed_tokens", "lm_head"],
    }  # fmt: skip
    (mx / "config.json").write_text(json.dumps(config, indent=1))
    return ids


# ----------------------------------------------------------------------------- Mistral 3

MISTRAL_SPECIALS = [
    ("<unk>", True), ("<s>", True), ("</s>", True), ("[INST]", True), ("[/INST]", True),
    ("[AVAILABLE_TOOLS]", True), ("[/AVAILABLE_TOOLS]", True), ("[TOOL_RESULTS]", True),
    ("[/TOOL_RESULTS]", True), ("[TOOL_CALLS]", True), ("[IMG]", True), ("<pad>", True),
    ("[IMG_BREAK]", True), ("[IMG_END]", True), ("[PREFIX]", True), ("[MIDDLE]", True),
    ("[SUFFIX]", True), ("[SYSTEM_PROMPT]", True), ("[/SYSTEM_PROMPT]", True),
    ("[TOOL_CONTENT]", True), ("[ARGS]", True), ("[CALL_ID]", True), ("[THINK]", True),
    ("[/THINK]", True),
]  # fmt: skip
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


@family(name="mistral3", arch="mistral3", projector="pixtral",
        hf_class="Mistral3ForConditionalGeneration", force_pre="tekken",
        pixtral_img_break=True)  # fmt: skip
def mistral3(hf: Path) -> dict[str, int]:
    """Ministral 3 (3B/8B/14B-2512-style) with its Pixtral tower.

    Text (``ministral3``): llama-like, GQA 4:2, head_dim 16, YaRN (factor 16, beta 32/1) and the
    Llama-4 attention temperature ``q *= 1 + 0.1 * log(1 + floor(pos / orig_ctx))``; the
    original context is 16 here (16384 in real models) so that the temperature changes
    within a test prompt. Vision: Pixtral, 3 layers (the converter maps projector linear_{i}
    through the block map, so it needs >= 3), patch 16, 2-D RoPE, RMS norms, SiLU-gated MLP,
    patch merger 2x2, GELU projector; ``[IMG_BREAK]`` after each patch row, ``[IMG_END]``
    last. Template: Ministral-3-14B-Reasoning-2512 ([SYSTEM_PROMPT], [THINK], [TOOL_CALLS]).
    """
    import torch
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    ids = ft.byte_bpe_tokenizer(
        hf, pre="tekken", specials=MISTRAL_SPECIALS, bos="<s>", eos="</s>", pad="<pad>",
        unk="<unk>", specials_first=True,
        template=ft.family_template("mistralai-Ministral-3-14B-Reasoning-2512.jinja"),
    )  # fmt: skip
    rope = {
        "rope_type": "yarn", "rope_theta": 1000000.0, "factor": 16.0,
        "original_max_position_embeddings": 16, "beta_fast": 32.0, "beta_slow": 1.0,
        "mscale_all_dim": 1.0, "mscale": 1.0, "llama_4_scaling_beta": 0.1,
    }  # fmt: skip
    text = dict(
        model_type="ministral3", vocab_size=ft.VOCAB_SIZE, hidden_size=64, intermediate_size=128,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        max_position_embeddings=256, rope_parameters=rope,  # = factor x original context
        bos_token_id=ids["<s>"], eos_token_id=ids["</s>"], pad_token_id=ids["<pad>"],
        tie_word_embeddings=False,
    )  # fmt: skip
    vision = dict(
        model_type="pixtral", hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=2, head_dim=16, image_size=128, patch_size=16, rope_theta=10000.0,
        hidden_act="silu",  # as every released Mistral 3 / Pixtral (transformers' default: gelu)
    )  # fmt: skip
    cfg = Mistral3Config(
        text_config=text, vision_config=vision, image_token_index=ids["[IMG]"],
        spatial_merge_size=2, multimodal_projector_bias=False, projector_hidden_act="gelu",
        tie_word_embeddings=False,  # as the 8B/14B (the 3B ties)
    )  # fmt: skip
    torch.manual_seed(0)
    save(randomize(Mistral3ForConditionalGeneration(cfg)), hf)
    pre = {
        "image_processor_type": "PixtralImageProcessor", "image_mean": CLIP_MEAN,
        "image_std": CLIP_STD, "patch_size": 16, "size": {"longest_edge": 128},
        "do_resize": True, "do_rescale": True, "do_normalize": True, "rescale_factor": 1 / 255,
    }  # fmt: skip
    (hf / "preprocessor_config.json").write_text(json.dumps(pre, indent=1))
    return ids


# ----------------------------------------------------------------------------- Gemma 4

GEMMA4_SPECIALS = [
    ("<mask>", True), ("[multimodal]", True), ("<|tool>", True), ("<tool|>", True),
    ("<|tool_call>", True), ("<tool_call|>", True), ("<|tool_response>", True),
    ("<tool_response|>", True), ('<|"|>', True), ("<|think|>", True), ("<|channel>", True),
    ("<channel|>", True), ("<|turn>", True), ("<turn|>", True), ("<|image>", True),
    ("<|audio>", True), ("<|image|>", True), ("<|audio|>", True), ("<image|>", True),
    ("<audio|>", True), ("<|video|>", True),
]  # fmt: skip
_S, _F = "sliding_attention", "full_attention"


def _gemma4_tokenizer(hf: Path) -> dict[str, int]:
    # Gemma 4 ships tokenizer.json only; the converter types <|channel>, <|tool_call>, <|"|> etc.
    # USER_DEFINED itself ("always render these tokens, so that the chat parser can read them").
    return ft.gemma_spm_tokenizer(
        hf, GEMMA4_SPECIALS, template=ft.family_template("google-gemma-4-31B-it.jinja"),
        keep_model_file=False,
    )  # fmt: skip


def _gemma4_text(**kw: Any) -> dict[str, Any]:
    """Gemma 4 text config common to the builders: GQA 4:2, sliding head_dim 32 vs global 64,
    sliding window 8, final logit soft-capping 2 (30 in real models: reached by tiny logits
    only when small), proportional RoPE on global layers (25% of dims rotate, theta 1e6)."""
    base = dict(
        vocab_size=ft.VOCAB_SIZE, vocab_size_per_layer_input=ft.VOCAB_SIZE, hidden_size=64,
        intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        global_head_dim=64, sliding_window=8, final_logit_softcapping=2.0,
        max_position_embeddings=1024, hidden_size_per_layer_input=0,
    )  # fmt: skip
    return base | kw


# E2B/E4B style: per-layer inputs, the last 3 layers reuse earlier layers' K/V and have a
# double-wide MLP, 4:1 sliding/global pattern. llama.cpp maps a KV-shared layer to the last
# unshared layer if it is global, else to the one before (n_kv - 1 / n_kv - 2); HF to the last
# unshared layer of the same kind. They agree when the unshared layers end "sliding, global",
# as in the real E2B/E4B, so the pattern here does too.
_GEMMA4_E = dict(
    num_hidden_layers=8, layer_types=[_S, _S, _S, _S, _F, _S, _S, _F],
    hidden_size_per_layer_input=16, num_kv_shared_layers=3, use_double_wide_mlp=True,
)  # fmt: skip


def _gemma4_randomize(model):
    """`randomize`, plus the checkpoint's buffers: per-layer output scales, the vision
    standardisation, and the clipped linears' bounds (+-inf by default, finite in real
    checkpoints): bounds of +-U(1, 2) clip a share of the tiny model's activations."""
    import torch

    randomize(model, buffers=("layer_scalar", "std_bias", "std_scale"))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, b in sorted(model.named_buffers()):
            if name.endswith(("input_max", "output_max", "input_min", "output_min")):
                bound = 1.0 + torch.rand((), generator=gen).item()
                b.fill_(-bound if name.endswith("min") else bound)
    return model


@family(name="gemma4", arch="gemma4", hf_class="Gemma4ForCausalLM")
def gemma4(hf: Path) -> dict[str, int]:
    """Gemma 4 E-model text (dense): per-layer input embeddings (16 per layer) with their gate,
    projection and norm, KV sharing (layers 5-7 reuse the K/V of layer 3 if sliding, 4 if
    global), double-wide MLP on those layers, per-layer output scales, q/k norms and a
    parameter-free v norm, sliding head_dim 32 / global 64, see `_gemma4_text`."""
    import torch
    from transformers import Gemma4ForCausalLM, Gemma4TextConfig

    ids = _gemma4_tokenizer(hf)
    torch.manual_seed(0)
    save(_gemma4_randomize(Gemma4ForCausalLM(Gemma4TextConfig(**_gemma4_text(**_GEMMA4_E)))), hf)
    return ids


@family(name="gemma4_moe", arch="gemma4", hf_class="Gemma4ForCausalLM")
def gemma4_moe(hf: Path) -> dict[str, int]:
    """Gemma 4 26B-A4B style: 6 layers (5 sliding + 1 global), every layer a dense MLP plus a
    MoE block (8 experts, top-2, router with its own RMS-norm scale and per-expert output
    scales) each with its own pre/post norms; global layers share K and V (attention_k_eq_v)
    with 1 KV head (sliding layers 2). No per-layer inputs."""
    import torch
    from transformers import Gemma4ForCausalLM, Gemma4TextConfig

    ids = _gemma4_tokenizer(hf)
    cfg = Gemma4TextConfig(
        **_gemma4_text(
            num_hidden_layers=6, enable_moe_block=True, num_experts=8, top_k_experts=2,
            moe_intermediate_size=32, attention_k_eq_v=True, num_global_key_value_heads=1,
        )
    )  # fmt: skip
    torch.manual_seed(0)
    save(_gemma4_randomize(Gemma4ForCausalLM(cfg)), hf)
    return ids


@family(name="gemma4_vision_audio", arch="gemma4", projector="gemma4v",
        hf_class="Gemma4ForConditionalGeneration")  # fmt: skip
def gemma4_vision_audio(hf: Path) -> dict[str, int]:
    """Gemma 4 E-model with both encoders in one mmproj (``gemma4v`` + ``gemma4a``).

    Text: as `gemma4`. Vision: 2 layers, patch 16, 3x3 pooling (images: multiples of 48 px),
    2-D RoPE, q/k norms, clipped linears, standardisation bias/scale, GELU-gated MLP,
    projection into the text width. Audio: conformer, 2 layers of (FFN/2, chunked local
    self-attention with relative positions and logit cap, light conv, FFN/2), 2-layer conv
    subsampling of 128 mel bins (128 then 4 channels), clipped linears, per-dim query
    scales, output projection then text projection.
    """
    import torch
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration

    ids = _gemma4_tokenizer(hf)
    cfg = Gemma4Config(
        text_config=_gemma4_text(**_GEMMA4_E),
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=2, head_dim=16, patch_size=16, pooling_kernel_size=3,
            position_embedding_size=64, standardize=True, use_clipped_linears=True,
        ),
        # transformers sizes the subsampling's projection (channels[0] // 4) * channels[1]
        # though the flattened features are (mel bins // 4) * channels[1]: the first conv
        # must have 128 channels (as the real [128, 32]) for its audio tower to run at all
        audio_config=dict(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            subsampling_conv_channels=[128, 4], conv_kernel_size=5, output_proj_dims=48,
        ),
        boi_token_id=ids["<|image>"], eoi_token_id=ids["<image|>"],
        image_token_id=ids["<|image|>"], video_token_id=ids["<|video|>"],
        boa_token_id=ids["<|audio>"], eoa_token_index=ids["<audio|>"],
        audio_token_id=ids["<|audio|>"],
    )  # fmt: skip
    torch.manual_seed(0)
    save(_gemma4_randomize(Gemma4ForConditionalGeneration(cfg)), hf)
    pre = {
        "image_processor": {
            "image_processor_type": "Gemma4ImageProcessor", "image_mean": [0.0] * 3,
            "image_std": [1.0] * 3, "patch_size": 16, "pooling_kernel_size": 3,
        },
        "feature_extractor": {
            "feature_extractor_type": "Gemma4AudioFeatureExtractor", "feature_size": 128,
            "sampling_rate": 16000,
        },
    }  # fmt: skip
    (hf / "processor_config.json").write_text(json.dumps(pre, indent=1))
    return ids
