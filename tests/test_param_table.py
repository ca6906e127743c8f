"""The parameter table (`tsjax.stack`, declared in `tsjax.models.decoder`): every
parameter each family's model creates has exactly one entry, in both layer layouts; the
loader reads every tensor of the file through it, and the sharding rules give each parameter
(the narrow formats' leaves included) axes that fit its array."""

from __future__ import annotations

import jax
import pytest
from gguf_factory import ARCHS, write_tiny_gguf

from tsjax.gguf import GGUFFile
from tsjax.loader import load_params, param_shapes
from tsjax.models import ARCHITECTURES, Decoder, config_from_gguf
from tsjax.models.decoder import BLOCKS, HEAD_PARAMS, PARAM_TABLE
from tsjax.sharding import param_axes
from tsjax.stack import Param, ParamTable, Segment, layer_plan

FAMILIES = [a for a in ARCHS if a in ARCHITECTURES]


def _paths(tree) -> list[tuple[str, ...]]:
    return [tuple(k.key for k in p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("params")
    return {a: write_tiny_gguf(d / f"{a}.gguf", a) for a in FAMILIES}


def test_table_declares_each_parameter_once():
    for params in [HEAD_PARAMS, *(cls.PARAMS for cls in BLOCKS.values())]:
        assert len({p.path for p in params}) == len(params)
        assert len({p.gguf for p in params}) == len(params)
    # kinds that share a path agree on its axes (a layer's lookup spans every kind)
    by_path: dict = {}
    for cls in BLOCKS.values():
        for p in cls.PARAMS:
            assert by_path.setdefault(p.path, p.axes) == p.axes, p


@pytest.mark.parametrize("unrolled", [True, False])
@pytest.mark.parametrize("arch", FAMILIES)
def test_every_parameter_has_one_entry_and_the_loader_and_sharding_agree(files, arch, unrolled):
    g = GGUFFile(files[arch])
    model = Decoder(config_from_gguf(g), unrolled=unrolled)
    shapes = param_shapes(model)
    places = {}
    for place in PARAM_TABLE.placements(model.plan()):
        assert place.path not in places, place.path
        places[place.path] = place
    leaves = dict(jax.tree_util.tree_leaves_with_path(shapes))
    for path in _paths(shapes):
        place = places[path]  # an entry for every parameter the model creates
        leaf = leaves[tuple(jax.tree_util.DictKey(k) for k in path)]
        assert param_axes(path) == place.axes
        assert len(place.axes) == leaf.ndim, (path, place.axes, leaf.shape)
        assert len(place.tensors) == (leaf.shape[0] if place.stacked else 1)
    # the loader reads exactly the file's tensors, once each, into the model's own tree
    params, stats = load_params(g, model, progress=False)
    assert sorted(_paths(params)) == sorted(_paths(shapes))
    assert stats.n_tensors == len(g.tensor_names())


@pytest.mark.parametrize("quant", ["bf16", "int8", "q4"])
def test_narrow_leaves_take_the_axes_of_their_weight(files, quant):
    from tsjax.model import load

    m = load(files["gemma3"], max_len=32, progress=False, quant=quant)
    for path, leaf in zip(_paths(m.params), jax.tree.leaves(m.params), strict=True):
        axes = param_axes(path)
        assert len(axes) == leaf.ndim, (path, axes, leaf.shape)
    layer = m.params.get("layers") or m.params["layers_0"]
    # bf16 / int8: the tied embedding's copy in the narrow format; q4: the tied projection
    # runs on the table's own blocks (no copy)
    assert ("lm_head" in m.params) == (quant != "q4")
    if quant == "int8":
        assert param_axes(("layers_0", "mlp", "down", "kernel")) == ("ffw", "embed")
        assert param_axes(("layers_0", "mlp", "down", "kernel_scale")) == ("embed",)
        assert param_axes(("layers_0", "mlp", "down", "input_scale")) == ("ffw",)
        assert layer["mlp"]["down"]["kernel"].dtype == "int8"


def test_segments_and_their_names():
    kinds = ("attention",) * 3 + ("recurrent",) * 2 + ("attention",)
    assert [s.name for s in layer_plan(kinds, unrolled=True)] == [f"layers_{i}" for i in range(6)]
    plan = layer_plan(kinds, unrolled=False)
    assert [(s.kind, s.name, s.count) for s in plan] == [
        ("attention", "layers_0_2", 3),
        ("recurrent", "layers_3_4", 2),
        ("attention", "layers_5_5", 1),
    ]
    assert [s.name for s in layer_plan(("attention",) * 4, unrolled=False)] == ["layers"]
    # a kind's parameters are found under any segment name, stacked ones with the layer axis
    table = ParamTable(HEAD_PARAMS, {**BLOCKS, "recurrent": _Recurrent})
    assert table.axes(("layers_3_4", "mixer", "a")) == ("layers", "heads")
    assert table.axes(("layers_4", "mixer", "a")) == ("heads",)
    names = [p.tensors for p in table.placements(plan) if p.path[0] == "layers_3_4"]
    assert names == [("blk.3.ssm_a", "blk.4.ssm_a")]
    with pytest.raises(KeyError):
        table.axes(("layers_4", "mixer", "nope"))
    assert Segment("attention", 0, 1, False).layers == range(0, 1)


class _Recurrent:
    PARAMS = (Param("ssm_a", ("mixer", "a"), ("heads",)),)
