"""The recurrent layers (Gated DeltaNet, Mamba2) against transformers' torch modules.

Each test builds transformers' layer with a tiny config and random weights, turns its weights
into GGUF tensors the way llama.cpp's converter does (`ssm_a` = -exp(A_log), squeezed conv,
value heads reordered to tiled, Mamba2's reshaped norm...), loads them through the layer's
own parameter table (`PARAMS`: GGUF name -> param path), and compares the outputs over
sequences longer than two chunks: one prefill, a prefix then the rest from the returned
state, prefill then single decode steps, and a padded batch of different lengths. Our own
chunked and token-by-token forms must agree as well.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import rel_err

from tsjax.cache.recurrent import RecurrentState
from tsjax.cache.state import Step
from tsjax.layers.deltanet import GatedDeltaNet
from tsjax.layers.mamba2 import Mamba2

TOL = 1e-4
D = 32  # model dim


def params_from_gguf(tensors: dict[str, np.ndarray], table) -> dict:
    """The layer's params tree from GGUF tensors, through its table alone (1:1)."""
    params: dict = {}
    for p in table:
        node = params
        for key in p.path[:-1]:
            node = node.setdefault(key, {})
        node[p.path[-1]] = jnp.asarray(tensors[p.gguf])
    assert len(tensors) == len(table), sorted(tensors)
    return params


def randomize(module: torch.nn.Module, seed: int) -> None:
    """Every weight random, norms around 1 (so a missing or extra +1 shows)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if "norm" in name:
                p.copy_(1.0 + 0.2 * r)
            elif name in ("A_log", "dt_bias", "D", "conv1d.bias"):
                p.copy_(0.5 * r)
            else:
                p.copy_(r * p.shape[-1] ** -0.5)


def step_of(starts, counts, t: int, rows=None) -> Step:
    starts = jnp.asarray(starts, jnp.int32)
    positions = starts[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
    rows = None if rows is None else jnp.asarray(rows, jnp.int32)
    return Step(positions, rows, jnp.asarray(counts, jnp.int32))


@partial(jax.jit, static_argnums=(0, 5))
def run(layer, params, x, state, step, recurrent=None, index=0):
    """One call of `layer` on its state (`index`: its layer in a stacked state, traced as
    in a scanned segment)."""
    return layer.apply({"params": params}, x, state, index, step, recurrent)


def hf_forward(module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return module(torch.from_numpy(np.asarray(x))).numpy()


# -- Gated DeltaNet (Qwen 3.5) ----------------------------------------------------------------

HK, HV, DK, DV, KCONV = 2, 4, 16, 16, 4  # Hv > Hk: the converter's head reorder matters


def deltanet_gguf(m) -> dict[str, np.ndarray]:
    """transformers' Qwen3_5GatedDeltaNet weights as llama.cpp's converter writes them
    (`conversion/qwen.py`: Qwen3NextModel + _LinearAttentionVReorderBase)."""
    r = HV // HK

    def tiled(w, dim, head):  # value heads grouped by key head -> tiled
        shape = list(w.shape)
        w = w.reshape(*shape[:dim], HK, r, head, *shape[dim + 1 :])
        return np.swapaxes(w, dim, dim + 1).reshape(shape)

    sd = {k: v.detach().numpy().astype(np.float32) for k, v in m.state_dict().items()}
    qk = 2 * HK * DK
    qkv = sd["in_proj_qkv.weight"]
    conv = sd["conv1d.weight"].squeeze(1)
    return {
        "attn_qkv.weight": np.concatenate([qkv[:qk], tiled(qkv[qk:], 0, DV)]),
        "attn_gate.weight": tiled(sd["in_proj_z.weight"], 0, DV),
        "ssm_beta.weight": tiled(sd["in_proj_b.weight"], 0, 1),
        "ssm_alpha.weight": tiled(sd["in_proj_a.weight"], 0, 1),
        "ssm_conv1d.weight": np.concatenate([conv[:qk], tiled(conv[qk:], 0, DV)]),
        "ssm_dt.bias": tiled(sd["dt_bias"], 0, 1),
        "ssm_a": -np.exp(tiled(sd["A_log"], 0, 1)),
        "ssm_norm.weight": sd["norm.weight"],
        "ssm_out.weight": tiled(sd["out_proj.weight"], 1, DV),
    }


@pytest.fixture(scope="module")
def deltanet():
    from transformers.models.qwen3_5.configuration_qwen3_5 import Qwen3_5TextConfig
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5GatedDeltaNet

    cfg = Qwen3_5TextConfig(
        hidden_size=D,
        num_hidden_layers=1,
        layer_types=["linear_attention"],
        linear_conv_kernel_dim=KCONV,
        linear_key_head_dim=DK,
        linear_value_head_dim=DV,
        linear_num_key_heads=HK,
        linear_num_value_heads=HV,
        rms_norm_eps=1e-6,
    )
    hf = Qwen3_5GatedDeltaNet(cfg, 0).float().eval()
    randomize(hf, 0)
    layer = GatedDeltaNet(HK, HV, DK, DV, KCONV, cfg.rms_norm_eps)
    return hf, layer, params_from_gguf(deltanet_gguf(hf), GatedDeltaNet.PARAMS)


# -- Mamba2 (Nemotron-H) ----------------------------------------------------------------------

NH, HD, NG, NS, MCHUNK = 4, 8, 2, 16, 32  # heads, head dim, groups, state size, chunk


def mamba2_gguf(m) -> dict[str, np.ndarray]:
    """transformers' NemotronHMamba2Mixer weights as llama.cpp's converter writes them
    (`conversion/mamba.py` Mamba2Model.modify_tensors)."""
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in m.state_dict().items()}
    return {
        "ssm_in.weight": sd["in_proj.weight"],
        "ssm_conv1d.weight": sd["conv1d.weight"].squeeze(1),
        "ssm_conv1d.bias": sd["conv1d.bias"],
        "ssm_dt.bias": sd["dt_bias"],
        "ssm_a": -np.exp(sd["A_log"])[:, None],
        "ssm_d": sd["D"][:, None],
        "ssm_norm.weight": sd["norm.weight"].reshape(NG, NH * HD // NG),
        "ssm_out.weight": sd["out_proj.weight"],
    }


@pytest.fixture(scope="module")
def mamba2():
    from transformers import NemotronHConfig
    from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHMamba2Mixer

    cfg = NemotronHConfig(
        hidden_size=D,
        layers_block_type=["linear_attention"],
        mamba_num_heads=NH,
        mamba_head_dim=HD,
        ssm_state_size=NS,
        n_groups=NG,
        conv_kernel=KCONV,
        chunk_size=MCHUNK,
        layer_norm_epsilon=1e-5,
    )
    hf = NemotronHMamba2Mixer(cfg, 0).float().eval()
    randomize(hf, 1)
    layer = Mamba2(NH, HD, NG, NS, KCONV, cfg.layer_norm_epsilon, chunk=MCHUNK, conv_bias=True)
    return hf, layer, params_from_gguf(mamba2_gguf(hf), Mamba2.PARAMS)


LAYERS = ["deltanet", "mamba2"]
T = 150  # > two chunks of either layer
CUT = 70  # where a prefix ends


@pytest.fixture(params=LAYERS)
def case(request):
    return request.getfixturevalue(request.param)


def inputs(b: int, t: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((b, t, D)).astype(np.float32)


def test_prefill_matches_transformers(case):
    """One prefill of T tokens (2 rows, fresh states) equals transformers' layer."""
    hf, layer, params = case
    x = inputs(2, T)
    out, _ = run(
        layer, params, jnp.asarray(x), layer.new_state(None, 2), step_of([0, 0], [T, T], T)
    )
    assert rel_err(out, hf_forward(hf, x)) < TOL


def prefix(layer, params, x, rows: int = 2):
    """The first CUT tokens of x [2, >= CUT, D] from fresh states (a shape shared by the
    tests, so compiled once)."""
    step = step_of([0] * rows, [CUT] * rows, CUT)
    return run(layer, params, jnp.asarray(x[:, :CUT]), layer.new_state(None, rows), step)


def test_prefix_then_rest_continues_the_state(case):
    """A prefix, then the rest from the state it returned (prefix reuse), equals one
    prefill."""
    hf, layer, params = case
    x = inputs(2, T, seed=1)
    a, state = prefix(layer, params, x)
    rest = T - CUT
    b, _ = run(layer, params, jnp.asarray(x[:, CUT:]), state, step_of([CUT] * 2, [rest] * 2, rest))
    assert rel_err(np.concatenate([a, b], axis=1), hf_forward(hf, x)) < TOL


def test_decode_steps_continue_the_prefill(case):
    """Prefill, then single decode steps over the cache rows up to T (on a stacked state),
    equal one prefill; a row that idles (count 0, fed noise) keeps its state and takes its
    next token later; the state's other layers are untouched."""
    hf, layer, params = case
    x = inputs(2, T, seed=2)
    ref = hf_forward(hf, x)
    out, unstacked = prefix(layer, params, x)
    # Decode on a stacked state (a scanned segment of 3 layers), this layer's at index 1.
    state = jax.tree.map(lambda a: jnp.stack([a + 1, a, a - 1]), unstacked)
    outs = [[out[0]], [out[1]]]
    pos = [CUT, CUT]
    rng = np.random.default_rng(3)
    i = 0
    while pos != [T, T]:
        active = [pos[0] < T, pos[1] < T and i % 3 != 1]  # row 1 idles every third step
        tok = rng.standard_normal((2, 1, D)).astype(np.float32)
        for r in range(2):
            if active[r]:
                tok[r] = x[r, pos[r] : pos[r] + 1]
        o, state = run(layer, params, jnp.asarray(tok), state, step_of(pos, active, 1), None, 1)
        for r in range(2):
            if active[r]:
                outs[r].append(np.asarray(o[r]))
                pos[r] += 1
        i += 1
    for got, was in zip(jax.tree.leaves(state), jax.tree.leaves(unstacked), strict=True):
        np.testing.assert_array_equal(got[0], was + 1)  # the other layers' untouched
        np.testing.assert_array_equal(got[2], was - 1)
    for r in range(2):
        assert rel_err(np.concatenate(outs[r], axis=0), ref[r]) < TOL


def test_padded_batch_rows_match_their_own_runs(case):
    """One prefill of rows with different lengths, right-padded to T and written to chosen
    cache rows that hold earlier sequences (one batch row past the cache: dropped): each
    row's outputs equal transformers' on its own unpadded sequence, and so does one decode
    step from the states they left (afresh, and padding never entered them); the cache row
    nobody wrote keeps what it held."""
    hf, layer, params = case
    lengths = [T, 37, 65, 1]
    rows = [2, 0, 5, 1]  # a cache of 4 rows: 5 is batch padding
    x = inputs(4, T + 1, seed=4)
    # Leftovers of earlier sequences in every row: a step from position 0 starts afresh.
    rng = np.random.default_rng(5)
    state = jax.tree.map(
        lambda a: jnp.asarray(rng.standard_normal(a.shape), a.dtype), layer.new_state(None, 4)
    )
    before = state
    out, state = run(
        layer, params, jnp.asarray(x[:, :T]), state, step_of([0] * 4, lengths, T, rows)
    )
    tok, pos, active = np.zeros((4, 1, D), np.float32), [0] * 4, [False] * 4
    for r, n in enumerate(lengths):
        if rows[r] < 4:
            assert rel_err(out[r, :n], hf_forward(hf, x[r : r + 1, :n])[0]) < TOL
            tok[rows[r]], pos[rows[r]], active[rows[r]] = x[r, n : n + 1], n, True
    nxt, state = run(layer, params, jnp.asarray(tok), state, step_of(pos, active, 1))
    for r, n in enumerate(lengths):
        if rows[r] < 4:
            assert rel_err(nxt[rows[r], 0], hf_forward(hf, x[r : r + 1, : n + 1])[0, -1]) < TOL
    for got, was in zip(jax.tree.leaves(state), jax.tree.leaves(before), strict=True):
        np.testing.assert_array_equal(got[3], was[3])  # nobody wrote row 3


def test_chunked_equals_token_by_token(case):
    """Our chunked form equals our token-by-token one (outputs and final state), from a
    nonzero state, over lengths that are not multiples of the chunk."""
    _, layer, params = case
    x = inputs(2, T, seed=5)
    _, state = prefix(layer, params, x)
    step = step_of([CUT] * 2, [T - CUT, T - CUT - 30], T - CUT)
    a, sa = run(layer, params, jnp.asarray(x[:, CUT:]), state, step, False)
    b, sb = run(layer, params, jnp.asarray(x[:, CUT:]), state, step, True)
    assert rel_err(a[0], b[0]) < TOL and rel_err(a[1, :-30], b[1, :-30]) < TOL
    assert rel_err(sa.ssm, sb.ssm) < TOL
    np.testing.assert_array_equal(sa.conv, sb.conv)


@pytest.mark.parametrize("layers", [None, 2])
def test_state_rows_swap_checkpoint_restore(layers):
    """The cache's row operations on a recurrent state (stacked or not): a swap exchanges
    rows (their checkpoints with them), a checkpoint saves chosen rows, a restore brings
    them back; padding rows (index >= B) change nothing."""
    rng = np.random.default_rng(0)
    state = jax.tree.map(
        lambda a: jnp.asarray(rng.standard_normal(a.shape), a.dtype),
        RecurrentState.create(layers, 4, 6, 4, (2, 3, 5)),
    )
    ax = 0 if layers is None else 1

    def rows(a, order):
        return np.take(np.asarray(a), order, axis=ax)

    swapped = state.swap(jnp.asarray([0, 3, 9]), jnp.asarray([3, 0, 9]))
    for got, was in zip(jax.tree.leaves(swapped), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(got, rows(was, [3, 1, 2, 0]))
    saved = state.checkpoint(jnp.asarray([1, 2, 7]), jnp.asarray([True, False, True]))
    np.testing.assert_array_equal(saved.conv, state.conv)
    np.testing.assert_array_equal(rows(saved.saved_ssm, [1]), rows(state.ssm, [1]))
    np.testing.assert_array_equal(
        rows(saved.saved_ssm, [0, 2, 3]), rows(state.saved_ssm, [0, 2, 3])
    )
    moved = replace(saved, conv=saved.conv * 2, ssm=saved.ssm * 2)  # the rows go on
    back = moved.restore(jnp.asarray([1, 3]), jnp.asarray([True, False]))
    np.testing.assert_array_equal(rows(back.conv, [1]), rows(state.conv, [1]))
    np.testing.assert_array_equal(rows(back.ssm, [0, 2, 3]), rows(moved.ssm, [0, 2, 3]))
