"""Logical axes of projector params and the rules that map them onto a mesh, in the style of
`tsjax.sharding` (whose `logical_to_spec` and `put` do the mapping).

The tower has its own logical names (its heads and FFN are not the text model's): heads and
the FFN dimension split over `tp` (column-split q/k/v/up, row-split o/down), images over
`dp`, everything else whole. The input projection's output axis is the text model's `embed`.

    plan = VisionShardingPlan(mesh, proj_cfg)
    proj = load_projector(path, device_put=plan.device_put)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import ModuleType

import jax
from jax.sharding import Mesh, NamedSharding

from tsjax.sharding import LogicalAxes, logical_to_spec, put
from tsjax.vision import vit
from tsjax.vision.config import VisionConfig

VISION_RULES: dict[str, str | None] = {
    "images": "dp",
    "layers": None,
    "vision_embed": None,
    "vision_heads": "tp",
    "vision_ffw": "tp",
    "vision_patch": None,
    "vision_patches": None,
    "embed": None,
}


def vision_sizes(cfg: VisionConfig) -> dict[str, int]:
    """Indivisible units per logical axis (heads count in heads)."""
    return {
        "layers": cfg.n_layers,
        "vision_embed": cfg.dim,
        "vision_heads": cfg.n_heads,
        "vision_ffw": cfg.ffn_dim,
        "vision_patch": 3 * cfg.patch_size**2,
        "vision_patches": cfg.n_patches,
        "embed": cfg.text_dim,
    }


def param_axes(family: ModuleType, path: Sequence[str]) -> LogicalAxes:
    """Logical axes of the param at `path` (from the params root) of a projector family."""
    path = tuple(path)
    axes = family.PARAM_AXES.get(path)
    if axes is None and path and path[0] == family.TOWER:
        axes = vit.param_axes(path[1:])
    if axes is None:
        raise KeyError(f"no logical axes for projector parameter {'/'.join(path)}")
    return axes


@dataclass(frozen=True)
class VisionShardingPlan:
    """The shardings of one projector's params (and its image batches) on a mesh."""

    mesh: Mesh
    cfg: VisionConfig
    rules: Mapping[str, str | None] = field(default_factory=lambda: dict(VISION_RULES))

    @property
    def family(self) -> ModuleType:
        from tsjax.vision.projector import PROJECTORS

        return PROJECTORS[self.cfg.projector_type]

    def named(self, axes: LogicalAxes) -> NamedSharding:
        spec = logical_to_spec(axes, self.mesh, vision_sizes(self.cfg), self.rules)
        return NamedSharding(self.mesh, spec)

    def param(self, path: Sequence[str]) -> NamedSharding:
        return self.named(param_axes(self.family, path))

    def params(self, tree) -> dict:
        """Shardings for a params pytree keyed like it."""
        return jax.tree_util.tree_map_with_path(
            lambda p, _: self.param(tuple(k.key for k in p)), tree
        )

    def images(self, n: int) -> NamedSharding:
        """A batch of n images [n, S, S, 3], split over `dp` when n divides."""
        return NamedSharding(
            self.mesh, logical_to_spec(("images",), self.mesh, {"images": n}, self.rules)
        )

    def device_put(self, path: Sequence[str], array) -> jax.Array:
        """`load_projector`'s hook: each device gets only its slice."""
        return put(array, self.param(path))
