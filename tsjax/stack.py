"""The layer stack as data: which kind each layer is, how the decoder loops over the layers
(segments), and the parameter table every layer kind declares. Plain Python: the loader, the
sharding rules and the cache read it without building a model.

Segments. The decoder runs the layers as a sequence of segments, each one or more consecutive
layers of one kind: unrolled (CPU, `tsjax.models.decoder.unroll_layers_default`), every layer
is its own segment, with its own params subtree `layers_<i>`; scanned (accelerators), each
run of equal-kind layers is one segment looped by `nn.scan` over params stacked on a leading
layer axis: `layers` when one run covers the whole stack, `layers_<first>_<last>` otherwise.
A segment holds one cache state (`tsjax.cache`), stacked the same way.

The parameter table. Every parameter is declared once, as a `Param`: its GGUF tensor name, its
path in the params tree, and the logical axes of the array as loaded (a float Linear's
`weight` is [out, in], GGUF's own orientation). The loader reads the GGUF names and paths
(`ParamTable.placements`), the sharding rules read the axes (`ParamTable.axes`), and a test
checks that every parameter a model creates has exactly one entry. The narrow formats' leaves
(`tsjax.quantize`: an int8 `kernel` [in, out] with `kernel_scale` [out] and `input_scale`
[in]; the block formats' `q`/`qs` with `d`/`m`) take their axes from the float weight they
replace, so they need no entries.

A Flax declaration alone could not carry this: the params come from GGUF files, not from an
initializer, so their tensor names need a table anyway; the narrow formats make new leaves
after loading; and Flax's boxed logical-partitioning metadata would have to be unboxed around
every step, the loader and the lockstep channel. One plain table serves all of them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

LogicalAxes = tuple[str | None, ...]

#: The kind of every layer of the dense families: attention + gated MLP
#: (`tsjax.models.decoder.DecoderLayer`).
ATTENTION = "attention"

#: The recurrent kinds: a Gated DeltaNet layer (`tsjax.layers.deltanet`, Qwen 3.5) and a Mamba2
#: layer (`tsjax.layers.mamba2`, Nemotron-H), each keeping a `tsjax.cache.recurrent` state. A
#: family registers the block that runs each (`tsjax.models.decoder.BLOCKS`).
DELTANET = "deltanet"
MAMBA2 = "mamba2"

#: Leaves the narrow formats make in place of a Linear's float `weight` (see module docstring):
#: int8's, and the block formats' (`tsjax.kernels.blocks`: values `q` [..., out, in] or `qs`
#: [..., out, in/2], block scales `d` and offsets `m` [..., in/32, out]); and beside (or instead
#: of) an expert matrix's `weight` (`tsjax.layers.experts`: int8 blocks' `scales`, MXFP4's
#: `scales` and `nibbles`).
NARROW_LEAVES = ("kernel", "kernel_scale", "input_scale", "q", "qs", "d", "m", "scales", "nibbles")


@dataclass(frozen=True)
class Param:
    """One parameter: GGUF's tensor name (a layer's without its `blk.<i>.` prefix), its path
    under the layer's (or the model's) params, and the logical axes of the array as loaded."""

    gguf: str
    path: tuple[str, ...]
    axes: LogicalAxes


@dataclass(frozen=True)
class Segment:
    """Consecutive layers [first, first + count) of one kind, looped as one unit."""

    kind: str
    first: int
    count: int
    stacked: bool  # params (and cache state) stacked on a leading layer axis, one nn.scan
    whole: bool = False  # the only segment: named plainly `layers`

    @property
    def layers(self) -> range:
        return range(self.first, self.first + self.count)

    @property
    def name(self) -> str:
        """Its params key: `layers_<i>` (one unrolled layer), `layers` (the whole stack,
        scanned) or `layers_<first>_<last>` (a scanned run)."""
        if not self.stacked:
            return f"layers_{self.first}"
        if self.whole:
            return "layers"
        return f"layers_{self.first}_{self.first + self.count - 1}"


_UNROLLED = re.compile(r"layers_\d+")
_STACKED = re.compile(r"layers(_\d+_\d+)?")


def layer_plan(kinds: Sequence[str], unrolled: bool) -> tuple[Segment, ...]:
    """The segments of a stack whose layer i has kind kinds[i]: one per layer (unrolled), or
    one per run of equal kinds (scanned)."""
    if unrolled:
        return tuple(Segment(k, i, 1, False) for i, k in enumerate(kinds))
    runs: list[list] = []
    for i, k in enumerate(kinds):
        if runs and runs[-1][0] == k:
            runs[-1][2] += 1
        else:
            runs.append([k, i, 1])
    return tuple(Segment(k, first, n, True, len(runs) == 1) for k, first, n in runs)


def narrow_axes(weight_axes: LogicalAxes, leaf: str) -> LogicalAxes:
    """Axes of a narrow-format leaf from those of the float weight [..., out, in] it
    replaces: `kernel` [..., in, out], `kernel_scale` [..., out], `input_scale` [..., in];
    `q` / `qs` as the weight, `d` / `m` [..., in blocks, out]; an expert matrix's block
    `scales` [..., out, in/32] and MXFP4 `nibbles` [..., out, in/32, 16] (a block is never
    split: the input axis is never split for experts)."""
    *lead, out, inp = weight_axes
    by_leaf = {
        "kernel": (*lead, inp, out),
        "kernel_scale": (*lead, out),
        "input_scale": (*lead, inp),
        "q": weight_axes,
        "qs": weight_axes,
        "d": (*lead, inp, out),
        "m": (*lead, inp, out),
        "scales": weight_axes,
        "nibbles": (*weight_axes, None),
    }
    return by_leaf[leaf]


@dataclass(frozen=True)
class Placement:
    """Where one parameter of a model comes from: its full params path and axes (a stacked
    segment's with the leading `layers` axis), and its GGUF tensors, one per layer stacked."""

    path: tuple[str, ...]
    axes: LogicalAxes
    tensors: tuple[str, ...]
    stacked: bool


class ParamTable:
    """The model-wide parameters (`head`) and each layer kind's: `kinds` maps a kind to its
    layer module, whose `PARAMS` declare them. The mapping is read at each lookup, so a kind
    registered later is seen."""

    def __init__(self, head: Sequence[Param], kinds: Mapping[str, Any]):
        self.head = tuple(head)
        self.kinds = kinds

    def kind_params(self, kind: str) -> tuple[Param, ...]:
        return tuple(self.kinds[kind].PARAMS)

    def placements(self, segments: Sequence[Segment]) -> list[Placement]:
        """Every parameter a model of these segments may have (a family's config decides
        which it does: biases, extra norms, a separate output projection)."""
        out = [Placement(p.path, p.axes, (p.gguf,), False) for p in self.head]
        for seg in segments:
            for p in self.kind_params(seg.kind):
                names = tuple(f"blk.{i}.{p.gguf}" for i in seg.layers)
                axes = ("layers", *p.axes) if seg.stacked else p.axes
                out.append(Placement((seg.name, *p.path), axes, names, seg.stacked))
        return out

    def axes(self, path: Sequence[str]) -> LogicalAxes:
        """Logical axes of the parameter at `path` (dict keys from the params root): under a
        stacked segment with the leading layer axis, under an unrolled layer without. A
        layer's path is looked up among every kind's params (kinds must agree on a path they
        share). KeyError for a parameter nobody declared."""
        path = tuple(path)
        if path and path[-1] in NARROW_LEAVES and not self._declared(path):
            # a Linear's weight, or the embedding table the block formats hold in blocks too
            # (a parameter declared under the same name, e.g. Mamba2's `d`, is itself)
            base = "embedding" if tuple(path[:-1]) == ("embed",) else "weight"
            return narrow_axes(self.axes((*path[:-1], base)), path[-1])
        if path and (_UNROLLED.fullmatch(path[0]) or _STACKED.fullmatch(path[0])):
            found = {p.axes for k in self.kinds for p in self.kind_params(k) if p.path == path[1:]}
            if len(found) == 1:
                (axes,) = found
                return ("layers", *axes) if _STACKED.fullmatch(path[0]) else axes
        else:
            for p in self.head:
                if p.path == path:
                    return p.axes
        raise KeyError(f"no logical axes for parameter {'/'.join(path)}")

    def _declared(self, path: tuple[str, ...]) -> bool:
        """Whether some layer kind or the head declares `path` itself."""
        if _UNROLLED.fullmatch(path[0]) or _STACKED.fullmatch(path[0]):
            return any(p.path == path[1:] for k in self.kinds for p in self.kind_params(k))
        return any(p.path == path for p in self.head)
