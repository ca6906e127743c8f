"""The MoE layer against transformers' torch MoE blocks (GPT-OSS, Qwen3.5-MoE, Nemotron-H,
Gemma 4), with the torch weights mapped the way llama.cpp's converter writes them into a GGUF
([E, out, in]; GPT-OSS's interleaved gate/up split, Gemma 4's merged gate_up split, its
per-expert scale as the down projection's scale); the grouped dispatch (row tiles of every
size, ragged GEMMs, split experts) against a dense all-experts reference; the weight formats
(bf16, int8 blocks, MXFP4 decoded in the step); and experts split over a fake 4-device CPU
mesh (a subprocess, as in test_sharding.py) giving the unsharded values exactly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tsjax.layers.experts import activation_fn, bf16_bits, tile_rows
from tsjax.layers.moe import (
    MOE_PARAM_AXES,
    MOE_RULES,
    ExpertParallel,
    MoE,
    MoESpec,
    moe_param_axes,
    route,
)

REPO = Path(__file__).resolve().parent.parent
D, F, E = 32, 16, 8
ROWS = (1, 2, 3, 4)  # decode-sized batches: [rows, 1, D]
PREFILL = 256
SHARED = ("gate", "up", "down")


def _rel_err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b)))


def _fill(module, seed: int, scale: float = 1.0):
    """Random weights for every param and buffer of a torch module (their inits are empty or
    zeros): std `scale` / sqrt(fan-in), so pre-activations are O(scale)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, t in list(module.named_parameters()) + list(module.named_buffers()):
            fan_in = t.shape[-1] if t.ndim > 1 else 1
            t.copy_(torch.randn(t.shape, generator=g) * scale / fan_in**0.5)


def _np(t) -> np.ndarray:
    return t.detach().numpy().astype(np.float32)


# -- each family: its torch block, our spec, and the converter's mapping ---------------------


def gpt_oss():
    from transformers.models.gpt_oss.configuration_gpt_oss import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP

    cfg = GptOssConfig(
        hidden_size=D, intermediate_size=F, num_local_experts=E, num_experts_per_tok=4
    )
    block = GptOssMLP(cfg).eval()
    _fill(block, 0, scale=4.0)  # pre-activations beyond the +-7 clamp
    ex = block.experts
    # convert_hf_to_gguf (gpt_oss.py): gate_up [E, D, 2F] -> [E, 2F, D], even rows gate, odd up
    gate_up = np.swapaxes(_np(ex.gate_up_proj), 1, 2)
    bias = _np(ex.gate_up_proj_bias)
    params = {
        "router": {"weight": _np(block.router.weight), "bias": _np(block.router.bias)},
        "gate": {"weight": gate_up[:, ::2]},
        "up": {"weight": gate_up[:, 1::2]},
        "down": {"weight": np.swapaxes(_np(ex.down_proj), 1, 2)},
        "gate_bias": bias[:, ::2],
        "up_bias": bias[:, 1::2],
        "down_bias": _np(ex.down_proj_bias),
    }
    spec = MoESpec(
        E, 4, F, softmax_topk=True, router_bias=True, activation="swiglu_oai", expert_bias=True
    )
    return spec, params, lambda x, r: block(x)[0]


def qwen35moe():
    from transformers.models.qwen3_5_moe.configuration_qwen3_5_moe import Qwen3_5MoeTextConfig
    from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import Qwen3_5MoeSparseMoeBlock

    cfg = Qwen3_5MoeTextConfig(
        hidden_size=D,
        moe_intermediate_size=F,
        shared_expert_intermediate_size=24,
        num_experts=E,
        num_experts_per_tok=2,
    )
    block = Qwen3_5MoeSparseMoeBlock(cfg).eval()
    _fill(block, 1)
    gate_up = _np(block.experts.gate_up_proj)  # [E, 2F, D]: the converter splits it in halves
    sh = block.shared_expert
    params = {
        "router": {"weight": _np(block.gate.weight)},
        "gate": {"weight": gate_up[:, :F]},
        "up": {"weight": gate_up[:, F:]},
        "down": {"weight": _np(block.experts.down_proj)},
        "shared": {n: {"weight": _np(getattr(sh, f"{n}_proj").weight)} for n in SHARED},
        "shared_gate": {"weight": _np(block.shared_expert_gate.weight)},  # GGUF [D] -> [1, D]
    }
    spec = MoESpec(E, 2, F, normalize=True, shared_ffn_dim=24, shared_gate=True)
    return spec, params, lambda x, r: block(x)


def nemotron_h_moe(latent: int = 0, groups: int = 1):
    from transformers.models.nemotron_h.configuration_nemotron_h import NemotronHConfig
    from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHMoE

    cfg = NemotronHConfig(
        hidden_size=D,
        moe_intermediate_size=F,
        moe_shared_expert_intermediate_size=24,
        n_routed_experts=E,
        num_experts_per_tok=2,
        n_group=groups,
        topk_group=1 if groups > 1 else 1,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        mlp_hidden_act="relu2",
        moe_latent_size=latent or None,
    )
    block = NemotronHMoE(cfg).eval()
    _fill(block, 2)
    d_e = latent or D
    params = {
        "router": {
            "weight": _np(block.gate.weight),
            "selection_bias": _np(block.gate.e_score_correction_bias),
        },
        "up": {"weight": _np(block.experts.up_proj)},
        "down": {"weight": _np(block.experts.down_proj)},
        "shared": {
            "up": {"weight": _np(block.shared_experts.up_proj.weight)},
            "down": {"weight": _np(block.shared_experts.down_proj.weight)},
        },
    }
    assert params["up"]["weight"].shape == (E, F, d_e)
    if latent:
        params["latent_down"] = {"weight": _np(block.fc1_latent_proj.weight)}
        params["latent_up"] = {"weight": _np(block.fc2_latent_proj.weight)}
    spec = MoESpec(
        E,
        2,
        F,
        scoring="sigmoid",
        selection_bias=True,
        normalize=True,
        routed_scale=2.5,
        n_groups=groups,
        groups_used=1,
        activation="relu2",
        latent_dim=latent,
        shared_ffn_dim=24,
    )
    return spec, params, lambda x, r: block(x)


def gemma4():
    import torch
    from transformers.models.gemma4.configuration_gemma4 import Gemma4TextConfig
    from transformers.models.gemma4.modeling_gemma4 import Gemma4TextExperts, Gemma4TextRouter

    cfg = Gemma4TextConfig(
        hidden_size=D,
        moe_intermediate_size=F,
        num_experts=E,
        top_k_experts=2,
        enable_moe_block=True,
        hidden_activation="gelu_pytorch_tanh",
    )
    router, experts = Gemma4TextRouter(cfg).eval(), Gemma4TextExperts(cfg).eval()
    _fill(router, 3, scale=4.0)
    _fill(experts, 4)
    with torch.no_grad():
        router.per_expert_scale.copy_(0.5 + router.per_expert_scale.abs())
    gate_up = _np(experts.gate_up_proj)  # GGUF ffn_gate_up_exps: gate rows first
    params = {
        "router": {"weight": _np(router.proj.weight), "input_scale": _np(router.scale)},
        "expert_scale": _np(router.per_expert_scale),  # GGUF ffn_down_exps.scale
        "gate": {"weight": gate_up[:, :F]},
        "up": {"weight": gate_up[:, F:]},
        "down": {"weight": _np(experts.down_proj)},
    }
    spec = MoESpec(
        E,
        2,
        F,
        normalize=True,
        router_norm=True,
        norm_eps=cfg.rms_norm_eps,
        expert_scale=True,
        activation="gelu_tanh",
    )

    def run(x, r):
        _, w, idx = router(r.reshape(-1, D))
        return experts(x.reshape(-1, D), idx, w).reshape(x.shape)

    return spec, params, run


FAMILIES = {
    "gpt-oss": gpt_oss,
    "qwen35moe": qwen35moe,
    "nemotron_h_moe": nemotron_h_moe,
    "nemotron_h_moe-latent-groups": lambda: nemotron_h_moe(latent=24, groups=4),
    "gemma4": gemma4,
}


def _inputs(shape, seed):
    rng = np.random.default_rng(seed)
    return rng.standard_normal(shape).astype(np.float32), rng.standard_normal(shape).astype(
        np.float32
    )


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_moe_matches_transformers(family):
    """Decode-sized batches (1-4 rows of one token) and a 256-token prefill: max relative
    error below 1e-4 against the torch block (float32)."""
    import torch

    spec, params, torch_fn = FAMILIES[family]()
    moe = MoE(spec)
    variables = {"params": jax.tree.map(jnp.asarray, params)}
    assert jax.tree.structure(variables) == jax.tree.structure(
        moe.init(jax.random.PRNGKey(0), jnp.zeros((1, 1, D)))
    ), "the mapped params are the layer's own tree"
    apply = jax.jit(moe.apply)
    for shape in [(b, 1, D) for b in ROWS] + [(1, PREFILL, D)]:
        x, r = _inputs(shape, sum(shape))
        router_x = r if family == "gemma4" else None
        ours = apply(variables, x, router_x)
        with torch.no_grad():
            ref = torch_fn(torch.from_numpy(x), torch.from_numpy(r)).numpy()
        assert _rel_err(ours, ref) < 1e-4, (family, shape, _rel_err(ours, ref))


# -- the dispatch against a dense reference --------------------------------------------------


def dense_reference(x, params, spec, weights, experts):
    """Every expert on every row (float64 numpy), then each row's chosen ones weighted."""
    act = activation_fn(spec.activation, spec.swiglu_alpha, spec.swiglu_limit)
    x = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
    out = np.zeros_like(x)
    for e in range(spec.n_experts):

        def proj(name, h, e=e):
            y = h @ np.asarray(params[name]["weight"][e], np.float64).T
            return y + params[name + "_bias"][e] if name + "_bias" in params else y

        gate = proj("gate", x) if spec.gated else None
        y = proj("down", np.asarray(act(gate, proj("up", x))))
        w = np.where(np.asarray(experts) == e, np.asarray(weights), 0.0).sum(-1)
        out += w[:, None] * y
    return out


def _routed_only(spec: MoESpec, params: dict) -> tuple[MoESpec, dict]:
    """The family's spec and params without the shared expert and the latent projection."""
    from dataclasses import replace

    keep = {k: v for k, v in params.items() if k not in ("shared", "shared_gate")}
    keep = {k: v for k, v in keep.items() if not k.startswith("latent")}
    if spec.latent_dim:  # the experts' inner size becomes D: give them D-wide weights
        rng = np.random.default_rng(9)
        keep["up"] = {"weight": rng.standard_normal((E, F, D)).astype(np.float32) / D**0.5}
        keep["down"] = {"weight": rng.standard_normal((E, D, F)).astype(np.float32) / F**0.5}
    return replace(spec, shared_ffn_dim=0, shared_gate=False, latent_dim=0), keep


@pytest.mark.parametrize("family", ["gpt-oss", "nemotron_h_moe-latent-groups"])
def test_grouped_dispatch_equals_dense(family):
    """Row tiles of 1, 8 and 64 rows and ragged GEMMs give the dense all-experts values, for
    batches where experts get no rows, one, or many (gated with biases; ungated, grouped)."""
    spec, params = _routed_only(*FAMILIES[family]()[:2])
    variables = {"params": jax.tree.map(jnp.asarray, params)}
    for n_tokens in (3, 96):
        x, r = _inputs((n_tokens, D), n_tokens)
        router_x = jnp.asarray(r) if spec.router_norm else None
        xr = np.asarray(x if router_x is None else r)
        weights, experts = _reference_route(spec, params, xr)
        ref = dense_reference(x, params, spec, weights, experts)
        for impl, tile in [("tiles", 1), ("tiles", 8), ("tiles", 64), ("ragged", 0)]:
            moe = MoE(spec, impl=impl, tile=tile or None)
            out = jax.jit(moe.apply)(variables, x, router_x)
            assert _rel_err(out, ref) < 1e-5, (family, n_tokens, impl, tile)


def _reference_route(spec, params, xr):
    """The router's choice, via `route` on float32 logits made here."""
    from tsjax.layers.norms import rms_norm

    r = params["router"]
    xr = jnp.asarray(xr, jnp.float32)
    if spec.router_norm:
        xr = rms_norm(xr, jnp.asarray(r["input_scale"]) * D**-0.5, spec.norm_eps)
    logits = xr @ jnp.asarray(r["weight"]).T + jnp.asarray(r.get("bias", 0.0))
    weights, experts = route(logits, spec, r.get("selection_bias"))
    if spec.expert_scale:
        weights = weights * jnp.asarray(params["expert_scale"])[experts]
    return np.asarray(weights), np.asarray(experts)


def test_route_variants():
    """The routing rules on hand-made logits: softmax-after-top-k, renormalisation, the
    selection bias choosing without weighing, and grouped choice."""
    logits = jnp.asarray([[2.0, 1.0, 0.5, -1.0]])
    w, e = route(logits, MoESpec(4, 2, 8, softmax_topk=True))
    np.testing.assert_allclose(w, [[1 / (1 + np.exp(-1.0)), 1 / (1 + np.exp(1.0))]], rtol=1e-6)
    assert e.tolist() == [[0, 1]]
    p = np.exp([2.0, 1.0, 0.5, -1.0]) / np.exp([2.0, 1.0, 0.5, -1.0]).sum()
    w, _ = route(logits, MoESpec(4, 2, 8))
    np.testing.assert_allclose(w, [p[:2]], rtol=1e-6)
    w, _ = route(logits, MoESpec(4, 2, 8, normalize=True, routed_scale=3.0))
    np.testing.assert_allclose(w, [3 * p[:2] / p[:2].sum()], rtol=1e-6)
    sig = MoESpec(4, 2, 8, scoring="sigmoid", selection_bias=True)
    w, e = route(logits, sig, jnp.asarray([0.0, 0.0, 0.0, 5.0]))
    assert e.tolist() == [[3, 0]]  # the bias picks expert 3 ...
    np.testing.assert_allclose(w, [[1 / (1 + np.exp(1.0)), 1 / (1 + np.exp(-2.0))]], rtol=1e-6)
    grouped = MoESpec(4, 2, 8, n_groups=2, groups_used=1)
    _, e = route(jnp.asarray([[2.0, -3.0, 1.5, 1.4]]), grouped)
    assert e.tolist() == [[2, 3]]  # group {2, 3} scores 2.9 > 2 + (-3): expert 0 is out


def test_tile_rows():
    assert [tile_rows(n, 32) for n in (4, 32, 64, 256, 2048, 65536)] == [1, 1, 8, 16, 64, 64]


# -- weight formats --------------------------------------------------------------------------


def _q8(w: np.ndarray) -> dict:
    """int8 with one float scale per 32 weights (Q8_0's layout)."""
    blocks = w.reshape(*w.shape[:-1], -1, 32)
    scale = np.abs(blocks).max(-1) / 127.0
    q = np.round(blocks / np.where(scale > 0, scale, 1)[..., None]).astype(np.int8)
    return {"weight": q.reshape(w.shape), "scales": scale.astype(np.float32)}


def _mxfp4(w: np.ndarray) -> tuple[dict, np.ndarray]:
    """gguf's own MXFP4 quantizer -> the layer's leaves and gguf's dequantized float32."""
    from gguf import GGMLQuantizationType as Q
    from gguf import quants

    from tsjax import mxfp4

    raw = quants.quantize(w, Q.MXFP4)
    scales, nibbles = mxfp4.unpack(raw, w.shape)
    return {"scales": scales, "nibbles": nibbles}, quants.dequantize(raw, Q.MXFP4)


def test_weight_formats():
    """bf16, int8-block and MXFP4 experts decode in the step to what they hold: the layer
    equals the dense reference on the decoded weights (MXFP4's from gguf.quants.dequantize)."""
    from dataclasses import replace

    spec, params = _routed_only(*gpt_oss()[:2])
    spec = replace(spec, ffn_dim=2 * F)  # blocks of 32 along every matrix's input
    rng = np.random.default_rng(5)
    for name, shape in (("gate", (E, 2 * F, D)), ("up", (E, 2 * F, D)), ("down", (E, D, 2 * F))):
        params[name] = {"weight": 2 * rng.standard_normal(shape).astype(np.float32) / D**0.5}
    params["gate_bias"] = params["up_bias"] = rng.standard_normal((E, 2 * F)).astype(np.float32)
    x, _ = _inputs((40, D), 7)
    weights, experts = _reference_route(spec, params, x)
    for quant in ("int8", "mxfp4", "bf16"):
        qp, decoded = dict(params), dict(params)
        for name in ("gate", "up", "down"):
            w = params[name]["weight"]
            if quant == "int8":
                qp[name] = _q8(w)
                q = qp[name]
                deq = q["weight"].reshape(*w.shape[:-1], -1, 32) * q["scales"][..., None]
                decoded[name] = {"weight": deq.reshape(w.shape)}
            elif quant == "mxfp4":
                qp[name], deq = _mxfp4(w)
                decoded[name] = {"weight": deq.reshape(w.shape)}
            else:
                qp[name] = {"weight": bf16_bits(w)}
                decoded[name] = {"weight": np.asarray(jnp.asarray(w, jnp.bfloat16), np.float32)}
        moe = MoE(spec, quant=quant)
        tree = jax.tree.structure(moe.init(jax.random.PRNGKey(0), jnp.zeros((1, D))))
        variables = {"params": jax.tree.map(jnp.asarray, qp)}
        assert jax.tree.structure(variables) == tree, quant
        ref = dense_reference(x, decoded, spec, weights, experts)
        # bf16 multiplies bf16-rounded activations; the others are exact decodes
        tol = 1e-2 if quant == "bf16" else 1e-5
        for tile in (1, 8):
            out = jax.jit(MoE(spec, quant=quant, tile=tile).apply)(variables, x)
            assert _rel_err(out, ref) < tol, (quant, tile, _rel_err(out, ref))


def test_param_axes():
    """Every param of every family has logical axes of its rank, with "experts" first on the
    expert leaves (and nowhere else); the rule splits experts over tp."""
    from dataclasses import replace

    assert MOE_RULES["experts"] == "tp" and MOE_RULES["expert_ffw"] is None
    for family in FAMILIES:
        spec, _, _ = FAMILIES[family]()
        spec = replace(spec, ffn_dim=32, latent_dim=32 if spec.latent_dim else 0)
        for quant in (None, "int8", "mxfp4"):
            shapes = jax.eval_shape(
                MoE(spec, quant=quant).init, jax.random.PRNGKey(0), jnp.zeros((1, D))
            )["params"]
            for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
                keys = tuple(k.key for k in path)
                axes = moe_param_axes(keys)
                assert len(axes) == leaf.ndim, (family, quant, keys, axes, leaf.shape)
                if keys[0] in ("gate", "up", "down", "gate_bias", "up_bias", "down_bias"):
                    assert axes[0] == "experts", (keys, axes)
                else:
                    assert "experts" not in axes, (keys, axes)
    assert ("router", "weight") in MOE_PARAM_AXES


# -- experts split over a mesh ---------------------------------------------------------------


def mesh_case() -> dict:
    """Run in the subprocess: a layer unsharded and with its experts split (tp=4; dp=2 rows x
    tp=2 experts), tiles and ragged: {case: (max |difference|, max |unsharded|)}. Cases:
    gpt-oss and qwen35moe's routed experts alone, nemotron_h_moe with its shared expert."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from tsjax.sharding import logical_to_spec, make_mesh

    out = {}
    for family in ("gpt-oss", "qwen35moe", "nemotron_h_moe"):
        spec, params, _ = FAMILIES[family]()
        if family == "qwen35moe":
            spec, params = _routed_only(spec, params)
        variables = {"params": jax.tree.map(jnp.asarray, params)}
        x, _ = _inputs((8, 3, D), 3)
        for impl in ("tiles", "ragged"):
            ref = np.asarray(jax.jit(MoE(spec, impl=impl).apply)(variables, x))
            for mesh_spec, rows in (("tp=4", None), ("dp=2,tp=2", "dp")):
                mesh = make_mesh(mesh_spec)
                sizes = {"experts": E, "expert_ffw": F, "embed": D, "ffw": 24}
                # the shared expert replicated: split over tp (the dense MLP's Megatron
                # split, tested in test_sharding.py) its partial sums round differently
                rules = {**MOE_RULES, "ffw": None}

                def shard(path, leaf, mesh=mesh, sizes=sizes, rules=rules):
                    axes = moe_param_axes(tuple(k.key for k in path)[1:])  # under "params"
                    return NamedSharding(mesh, logical_to_spec(axes, mesh, sizes, rules))

                sharded = jax.device_put(
                    variables, jax.tree_util.tree_map_with_path(shard, variables)
                )
                xs = jax.device_put(x, NamedSharding(mesh, P(rows)))
                moe = MoE(spec, impl=impl, parallel=ExpertParallel(mesh, "tp", rows))
                got = np.asarray(jax.jit(moe.apply)(sharded, xs))
                diff = float(np.max(np.abs(got - ref)))
                out[f"{family} {impl} {mesh_spec}"] = (diff, float(np.max(np.abs(ref))))
    return out


@pytest.mark.slow
def test_experts_split_over_mesh():
    """Experts split over tp (4 devices; and dp=2 rows x tp=2 experts) give the unsharded
    values. Each (token, choice) output is computed on one device and the psum adds zeros,
    so what remains is XLA fusing the two programs differently (measured: gpt-oss bit for
    bit; qwen35moe's routed experts 1.2e-7 of outputs up to 2.7; nemotron_h_moe with its
    shared expert 2.4e-6 of 14)."""
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
        "JAX_PLATFORMS": "cpu",
    }
    proc = subprocess.run(
        [sys.executable, __file__, "--mesh-case"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=280,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    diffs = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(diffs) == 12
    for case, (diff, scale) in diffs.items():
        assert diff <= 1e-6 * scale, (case, diff, scale)


if __name__ == "__main__" and sys.argv[1:] == ["--mesh-case"]:
    sys.path.insert(0, str(REPO / "tests"))
    print(json.dumps(mesh_case()))


# -- the default format of a whole model ------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "family,file",
    [
        ("gpt_oss", "mxfp4"),
        ("gpt_oss", "q8_0"),
        ("qwen35moe", "q8_0"),
        ("nemotron_h_moe", "q8_0"),
        ("gemma4_moe", "q8_0"),
    ],  # fmt: skip
)
def test_default_format_holds_experts_in_int8_blocks(family, file):
    """On CPU the default ("auto") loads a MoE model in the block format with its routed
    experts as int8 blocks of 32, read tensor by tensor from the file: a Q8_0 or MXFP4 file's
    experts come back exactly, and the next-token distributions stay near float32's (the
    dense weights and activations are quantized as in any block model)."""
    from conftest import all_logits
    from flax.traverse_util import flatten_dict
    from hf_factory import build

    from tsjax.layers.experts import all_experts
    from tsjax.model import load
    from tsjax.quantize import is_expert_matrix
    from tsjax.quants import BLOCK_QUANTS
    from tsjax.shapes import StepShapes

    path = build(family).gguf[file]
    shapes = StepShapes.default(rows=1, max_len=64, min_prefill=16, min_attn=64)
    exact = load(path, progress=False, shapes=shapes, quant="f32")
    auto = load(path, progress=False, shapes=shapes)
    assert auto.quant in BLOCK_QUANTS and "experts in int8 blocks" in auto.quant_reason
    want = {k[:-1]: v for k, v in flatten_dict(exact.params).items() if is_expert_matrix(k)}
    got = flatten_dict(auto.params)
    assert want
    for proj, w in want.items():
        m = {"weight": got[(*proj, "weight")], "scales": got[(*proj, "scales")]}
        assert m["weight"].dtype == jnp.int8, proj
        np.testing.assert_array_equal(np.asarray(all_experts(m, jnp.float32)), w, str(proj))
    ids = [1, *((i * 37 + 11) % 200 + 2 for i in range(30))]
    p, q = (jax.nn.log_softmax(all_logits(m, ids), -1) for m in (exact, auto))
    kl = np.sum(np.exp(p) * (p - q), -1)
    assert kl.max() < 0.1, kl.max()  # measured 0.002-0.04; a misread expert gives > 1
