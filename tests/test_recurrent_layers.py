"""The recurrent layers (Gated DeltaNet, Mamba2) against transformers' torch modules.

The weights are the tiny factory models' (`hf_factory`: qwen35, nemotron_h): each test takes
layer 0's mixer from the HF model (`Qwen3_5GatedDeltaNet`, `NemotronHMamba2Mixer`) and the same
layer's tensors from the GGUF that llama.cpp's converter made of it, loaded through the layer's
own parameter table alone (`PARAMS`: GGUF name -> param path), with the sizes from the file's
`ssm.*` metadata (`SSMConfig`). So the converter's layout (`ssm_a` = -exp(A_log), the squeezed
conv, DeltaNet's value heads reordered to tiled, Mamba2's reshaped norm) is the real one.

Sequences are longer than two chunks (chunk 64 for both layers): a padded batch of different
lengths into chosen cache rows, a prefix then the rest from the returned state, prefill then
single decode steps, and our chunked form against our token-by-token one. The calls share
four compiled programs per layer (a [4, 150] prefill, chunked or token by token, and a 4-row
decode step on a state of one layer or of a stacked segment).
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import rel_err

from tsjax.cache import STATES, KVLayout, RecurrentState
from tsjax.cache.state import Step
from tsjax.gguf import GGUFFile
from tsjax.layers.deltanet import GatedDeltaNet
from tsjax.layers.mamba2 import Mamba2
from tsjax.models.config import SSMConfig
from tsjax.stack import DELTANET, MAMBA2, Segment

TOL = 1e-4
CHUNK = 64
ROWS = 4  # cache rows
T = 150  # tokens of every prefill call: > two chunks
CUT = 70  # where a prefix ends

#: kind -> (factory model, layer module, the HF mixer of layer 0, GGUF eps key).
LAYERS = {
    DELTANET: ("qwen35", GatedDeltaNet, lambda m: m.model.layers[0].linear_attn, "layer_norm_rms"),
    MAMBA2: ("nemotron_h", Mamba2, lambda m: m.model.layers[0].mixer, "layer_norm"),
}


@pytest.fixture(scope="module", params=list(LAYERS))
def case(request) -> SimpleNamespace:
    """hf: transformers' layer; layer: ours; params: from the GGUF through `PARAMS`; tensors:
    the GGUF's layer-0 tensors; ssm: the file's sizes."""
    from hf_factory import build
    from hf_reference import hf_model

    name, cls, mixer, eps_key = LAYERS[request.param]
    m = build(name)
    g = GGUFFile(m.gguf["f32"])
    ssm = SSMConfig.from_gguf(g)
    layer = cls.from_ssm(ssm, float(g.meta(f"{g.architecture}.attention.{eps_key}_epsilon")))
    layer = layer.clone(chunk=CHUNK)
    tensors = {p.gguf: g.tensor(f"blk.0.{p.gguf}") for p in cls.PARAMS}
    params: dict = {}
    for p in cls.PARAMS:  # the table alone places every tensor
        node = params
        for key in p.path[:-1]:
            node = node.setdefault(key, {})
        node[p.path[-1]] = jnp.asarray(tensors[p.gguf])
    hf = mixer(hf_model(m))
    return SimpleNamespace(kind=request.param, g=g, ssm=ssm, hf=hf, layer=layer, params=params)


@partial(jax.jit, static_argnums=(0, 5))
def run(layer, params, x, state, step, recurrent=None, index=0):
    """One call of `layer` on its state (`index`: its layer in a stacked state, traced as
    in a scanned segment)."""
    return layer.apply({"params": params}, x, state, index, step, recurrent)


def step_of(starts, counts, t: int, rows=None) -> Step:
    starts = jnp.asarray(starts, jnp.int32)
    positions = starts[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
    rows = None if rows is None else jnp.asarray(rows, jnp.int32)
    return Step(positions, rows, jnp.asarray(counts, jnp.int32))


def prefill(c, x, state, starts, counts, rows=range(ROWS), recurrent=None):
    """One [ROWS, T] prefill call (the shape every test shares): row r's tokens x[r]
    (right-padded to T) from position starts[r], counts[r] of them real, into cache row
    rows[r]."""
    step = step_of(starts, counts, T, list(rows))
    return run(c.layer, c.params, jnp.asarray(x[:, :T]), state, step, recurrent)


def leftovers(c, seed: int, layers: int | None = None) -> RecurrentState:
    """A state whose rows hold earlier sequences (random)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda a: jnp.asarray(rng.standard_normal(a.shape), a.dtype),
        c.layer.new_state(layers, ROWS),
    )


def inputs(c, t: int, seed: int) -> np.ndarray:
    """[ROWS, t, D] standard normal (what the layer's input norm hands it, roughly)."""
    d = c.params["out"]["weight"].shape[0]
    return np.random.default_rng(seed).standard_normal((ROWS, t, d)).astype(np.float32)


def hf_forward(c, x: np.ndarray) -> np.ndarray:
    """transformers' layer on one sequence x [t, D] -> [t, D]."""
    with torch.no_grad():
        return c.hf(torch.from_numpy(np.asarray(x)[None])).numpy()[0]


def test_params_are_the_gguf_tensors(case):
    """The table names every tensor of the layer's mixer in the converted file, with the
    shape the layer creates, and every param the layer creates has an entry."""
    c = case
    own = {"attn_norm.weight", "post_attention_norm.weight"}  # the block's, not the mixer's
    own |= {f"ffn_{w}.weight" for w in ("gate", "up", "down")}
    in_file = {n[len("blk.0.") :] for n in c.g.tensor_names() if n.startswith("blk.0.")}
    assert {p.gguf for p in type(c.layer).PARAMS} == in_file - own
    x = jnp.zeros((1, 1, c.params["out"]["weight"].shape[0]))
    init = partial(c.layer.init, jax.random.key(0), x, c.layer.new_state(None, 1), 0)
    made = jax.eval_shape(init, step_of([0], [1], 1))["params"]
    assert jax.tree.map(lambda a: a.shape, made) == jax.tree.map(lambda a: a.shape, c.params)


def test_states_of_a_config(case):
    """`STATES` makes the layer's state from a model's `ssm` sizes, stacked or not; the
    sharding rules split its heads and the head-indexed params over tp, its rows over dp,
    and leave the fused projection and conv whole."""
    from jax.sharding import PartitionSpec as P

    from tsjax.sharding import logical_to_spec, ssm_sizes

    c = case
    cfg = SimpleNamespace(ssm=c.ssm)
    for seg, layers in ((Segment(c.kind, 0, 3, True), 3), (Segment(c.kind, 2, 1, False), None)):
        state = STATES[c.kind](cfg, seg, KVLayout(), ROWS, 512, jnp.bfloat16)
        want = c.layer.new_state(layers, ROWS, KVLayout().checkpoints)
        assert jax.tree.map(lambda a: (a.shape, a.dtype), state) == jax.tree.map(
            lambda a: (a.shape, a.dtype), want
        )

    class FakeMesh:
        shape = {"dp": 2, "tp": 2}

    sizes = {"batch": ROWS, **ssm_sizes(c.ssm)}  # the factory's: 4 heads, 2 groups
    specs = state.shardings(lambda axes, shape: logical_to_spec(axes, FakeMesh(), sizes))
    assert (specs.conv, specs.ssm) == (P("dp"), P("dp", "tp"))
    axes = {p.gguf: logical_to_spec(p.axes, FakeMesh(), sizes) for p in type(c.layer).PARAMS}
    assert axes["ssm_out.weight"] == P(None, "tp") and axes["ssm_a"] == P("tp")
    assert axes["ssm_conv1d.weight"] == P()


def test_padded_batch_matches_transformers(case):
    """One prefill of rows of different lengths (one of T, more than two chunks), right-padded
    and written to chosen cache rows that hold earlier sequences (one batch row past the
    cache: dropped): each row's outputs equal transformers' on its own unpadded sequence, and
    so does a decode step from the states they left (afresh; padding never entered them);
    the cache row nobody wrote keeps what it held, through the decode step too (idle)."""
    c = case
    lengths = [T, 37, 65, 1]
    rows = [2, 0, 5, 1]  # 5: batch padding
    x = inputs(c, T + 1, seed=4)
    before = leftovers(c, 5)
    out, state = prefill(c, x, before, [0] * ROWS, lengths, rows)
    tok, pos, active = np.zeros((ROWS, 1, x.shape[-1]), np.float32), [0] * ROWS, [False] * ROWS
    for r, n in enumerate(lengths):
        if rows[r] < ROWS:
            assert rel_err(out[r, :n], hf_forward(c, x[r, :n])) < TOL
            tok[rows[r]], pos[rows[r]], active[rows[r]] = x[r, n : n + 1], n, True
    nxt, state = run(c.layer, c.params, jnp.asarray(tok), state, step_of(pos, active, 1))
    for r, n in enumerate(lengths):
        if rows[r] < ROWS:
            assert rel_err(nxt[rows[r], 0], hf_forward(c, x[r, : n + 1])[-1]) < TOL
    for got, was in zip(jax.tree.leaves(state), jax.tree.leaves(before), strict=True):
        np.testing.assert_array_equal(got[3], was[3])  # nobody wrote row 3


def test_prefix_then_rest_continues_the_state(case):
    """A prefix, then the rest from the state it returned (prefix reuse), equals one
    prefill: cut inside the first chunk, past the second, after one token, and a row that
    takes no part in the first call and all T tokens in the second."""
    c = case
    x = inputs(c, T, seed=1)
    cuts = [CUT, 130, 1, 0]
    a, state = prefill(c, x, leftovers(c, 6), [0] * ROWS, cuts)
    rest = np.stack([np.roll(x[r], -n, axis=0) for r, n in enumerate(cuts)])
    b, _ = prefill(c, rest, state, cuts, [T - n for n in cuts])
    for r, n in enumerate(cuts):
        got = np.concatenate([a[r, :n], b[r, : T - n]])
        assert rel_err(got, hf_forward(c, x[r])) < TOL


def test_decode_steps_continue_the_prefill(case):
    """Prefill, then single decode steps over the cache rows up to T (on a stacked state, as
    in a scanned segment), equal one prefill; a row that idles (count 0, fed noise) keeps its
    state and takes its next token later; rows that idle throughout and the state's other
    layers are untouched; one decode program whatever the rows do."""
    c = case
    x = inputs(c, T, seed=2)
    out, state = prefill(c, x, leftovers(c, 7), [0] * ROWS, [CUT, CUT, 0, 0])
    before = state
    state = jax.tree.map(lambda a: jnp.stack([a + 1, a, a - 1]), state)  # this layer: 1
    outs = [[out[0, :CUT]], [out[1, :CUT]]]
    pos = [CUT, CUT, 0, 0]
    rng = np.random.default_rng(3)
    i = 0
    compiled = run._cache_size()
    while pos[:2] != [T, T]:
        active = [pos[0] < T, pos[1] < T and i % 3 != 1, False, False]  # row 1 idles at times
        tok = rng.standard_normal((ROWS, 1, x.shape[-1])).astype(np.float32)
        for r in range(2):
            if active[r]:
                tok[r] = x[r, pos[r] : pos[r] + 1]
        o, state = run(c.layer, c.params, jnp.asarray(tok), state, step_of(pos, active, 1), None, 1)
        for r in range(2):
            if active[r]:
                outs[r].append(np.asarray(o[r]))
                pos[r] += 1
        i += 1
    assert run._cache_size() == compiled + 1
    for got, was in zip(jax.tree.leaves(state), jax.tree.leaves(before), strict=True):
        np.testing.assert_array_equal(got[0], was + 1)  # the other layers' untouched
        np.testing.assert_array_equal(got[2], was - 1)
        np.testing.assert_array_equal(got[1, 2:], was[2:])  # rows that idled throughout
    for r in range(2):
        assert rel_err(np.concatenate(outs[r], axis=0), hf_forward(c, x[r])) < TOL


def test_chunked_equals_token_by_token(case):
    """Our chunked form equals our token-by-token one (outputs and final state) from a
    nonzero state, over lengths that are not multiples of the chunk."""
    c = case
    x = inputs(c, T, seed=5)
    counts = [T, T - 30, 65, 0]
    start = leftovers(c, 8)
    starts = [CUT, CUT, 3, 9]  # not 0: every row continues its state
    a, sa = prefill(c, x, start, starts, counts, recurrent=False)
    b, sb = prefill(c, x, start, starts, counts, recurrent=True)
    for r, n in enumerate(counts):
        if n:
            assert rel_err(a[r, :n], b[r, :n]) < TOL
    assert rel_err(sa.ssm, sb.ssm) < TOL
    np.testing.assert_array_equal(sa.conv, sb.conv)
    np.testing.assert_array_equal(sa.ssm[3], start.ssm[3])


@pytest.mark.parametrize("layers", [None, 2])
def test_state_rows_swap_checkpoint_restore(layers):
    """The cache's row operations on a recurrent state (stacked or not): a swap exchanges
    rows (their checkpoints with them), a checkpoint saves chosen rows, a restore brings
    them back; padding rows (index >= B) change nothing."""
    rng = np.random.default_rng(0)
    state = jax.tree.map(
        lambda a: jnp.asarray(rng.standard_normal(a.shape), a.dtype),
        RecurrentState.create(layers, 4, 6, 4, (2, 3, 5), slots=2),
    )
    ax = 0 if layers is None else 1

    def rows(a, order):
        return np.take(np.asarray(a), order, axis=ax)

    swapped = state.swap(jnp.asarray([0, 3, 9]), jnp.asarray([3, 0, 9]))
    for got, was in zip(jax.tree.leaves(swapped), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(got, rows(was, [3, 1, 2, 0]))
    # row 1 into slot 1 of 2, row 2 not (slot -1), row 7 is padding
    saved = state.checkpoint(jnp.asarray([1, 2, 7]), jnp.asarray([1, -1, 0]))
    np.testing.assert_array_equal(saved.conv, state.conv)
    slot = (slice(None),) * (ax + 1) + (1,)
    np.testing.assert_array_equal(rows(saved.saved_ssm[slot], [1]), rows(state.ssm, [1]))
    np.testing.assert_array_equal(
        rows(saved.saved_ssm, [0, 2, 3]), rows(state.saved_ssm, [0, 2, 3])
    )
    kept = (slice(None),) * (ax + 1) + (0,)
    np.testing.assert_array_equal(saved.saved_ssm[kept], state.saved_ssm[kept])
    moved = replace(saved, conv=saved.conv * 2, ssm=saved.ssm * 2)  # the rows go on
    back = moved.restore(jnp.asarray([1, 3]), jnp.asarray([1, -1]))
    np.testing.assert_array_equal(rows(back.conv, [1]), rows(state.conv, [1]))
    np.testing.assert_array_equal(rows(back.ssm, [0, 2, 3]), rows(moved.ssm, [0, 2, 3]))
