"""Meshes, logical axis names and the rules that map them onto a mesh (JAX SPMD).

Every parameter (in the parameter table, `tsjax.stack`) and cache array is described
once by *logical* axis names (what an axis means: `q_heads`, `ffw`, `batch`, ...). A small
table of *rules* says which mesh axis each logical axis is split over; the compiler (GSPMD)
then partitions the compiled steps and inserts the collectives. Changing the parallelism is
changing the mesh, never the model code.

Mesh axes:

- `tp` (tensor parallel): query heads, the FFN dimension and the vocabulary are split, so each
  device holds 1/tp of every large matrix (Megatron style: column-split q/k/v/gate/up, row-split
  o/down, one all-reduce after each). KV heads are split too when there are at least as many of
  them as `tp` devices (and they divide evenly); otherwise each device keeps all KV heads, which
  is what grouped-query attention with few KV heads needs.
  The recurrent layers (`tsjax.layers.deltanet`, `tsjax.layers.mamba2`) split their heads
  (`ssm_heads`: gate, beta/alpha/dt, output projection and the recurrent state; Mamba2's norm
  groups, `ssm_groups`, are whole sets of heads); their fused input projections and
  convolutions (`ssm_channels`: q/k/v or z/x/B/C/dt side by side) stay whole on every device.
- `dp` (data parallel): the cache rows (decode slots) and the sampler state are split, so each
  group of devices holds and decodes a share of the rows; weights are replicated across `dp`.

A logical axis whose size does not divide by its mesh axis is left unsplit (replicated) rather
than padded: correctness first, and the startup report shows what was split.

    mesh = make_mesh("dp=2,tp=2")
    plan = ShardingPlan(mesh, cfg, rows=8, max_len=2048)
    plan.cache(abstract_cache)    # a Cache of NamedShardings
    plan.device_put(path, array)  # the loader's per-leaf hook: each device gets its slice
"""

from __future__ import annotations

import functools
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tsjax.cache import Cache, StackedKV
from tsjax.layers.moe import MOE_RULES
from tsjax.models import ModelConfig
from tsjax.models.config import SSMConfig
from tsjax.models.decoder import PARAM_TABLE
from tsjax.sampling import SamplerState
from tsjax.stack import LogicalAxes

log = logging.getLogger("tsjax")

MESH_AXES = ("dp", "tp")  # the order devices are laid out in: tp innermost (fastest links)

# logical axis -> mesh axis (None: never split).
DEFAULT_RULES: dict[str, str | None] = {
    "batch": "dp",
    "seq": None,
    "embed": None,
    "q_heads": "tp",
    "kv_heads": "tp",
    "head_dim": None,
    "ffw": "tp",
    "vocab": "tp",
    "layers": None,
    "ssm_heads": "tp",
    "ssm_groups": "tp",
    "ssm_channels": None,
    **MOE_RULES,  # whole experts split over tp (expert parallelism), each expert unsplit
}

CACHE_KV_AXES: LogicalAxes = StackedKV.AXES  # [L, B, K, S, H]


def param_axes(path: Sequence[str]) -> LogicalAxes:
    """Logical axes of the parameter at `path` (a tuple of dict keys from the params root), as
    the parameter table declares them (`tsjax.stack.ParamTable.axes`): under a stacked
    segment ("layers") with a leading layer axis, under "layers_<i>" (unrolled) without."""
    return PARAM_TABLE.axes(path)


def sampler_axes(ndim: int) -> LogicalAxes:
    """Every sampler array has the row axis first ([B] or [B, X])."""
    return ("batch",) + (None,) * (ndim - 1)


# -- meshes ---------------------------------------------------------------------------------


_MESH_ITEM = re.compile(r"^\s*([a-z]+)\s*[=:]\s*(-?\d+)\s*$")


def parse_mesh(spec: str | Mapping[str, int] | None) -> dict[str, int]:
    """ "dp=2,tp=2" (or a mapping) -> {"dp": 2, "tp": 2}. One size may be -1: all devices left.

    An empty spec means one device. Unknown axis names fail here, at the edge, not as a
    confusing sharding error inside the first compile."""
    if spec is None:
        return {}
    if isinstance(spec, str):
        out: dict[str, int] = {}
        for item in filter(None, (s.strip() for s in spec.split(","))):
            m = _MESH_ITEM.match(item)
            if not m:
                raise ValueError(f"bad mesh item {item!r}: expected name=size, e.g. 'dp=2,tp=4'")
            if m.group(1) in out:
                raise ValueError(f"mesh axis {m.group(1)!r} given twice in {spec!r}")
            out[m.group(1)] = int(m.group(2))
    else:
        out = {str(k): int(v) for k, v in spec.items()}
    for name, size in out.items():
        if name not in MESH_AXES:
            raise ValueError(f"unknown mesh axis {name!r}; expected some of {MESH_AXES}")
        if size == 0 or size < -1:
            raise ValueError(f"mesh axis {name}={size}: sizes are >= 1 (or -1 for the rest)")
    if sum(1 for v in out.values() if v == -1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {out}")
    return out


def make_mesh(
    spec: str | Mapping[str, int] | None, devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """A mesh with axes ("dp", "tp") over `devices` (default: every device of every process).

    The sizes must multiply to the number of devices (a -1 axis takes what is left): silently
    leaving devices idle is a deployment bug. `tp` is the innermost axis, so on GPUs and TPUs
    its collectives run over the closest devices."""
    sizes = parse_mesh(spec)
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    known = math.prod(v for v in sizes.values() if v != -1)
    for name, v in sizes.items():
        if v == -1:
            if n % known:
                raise ValueError(f"mesh {sizes}: {n} devices do not divide by {known}")
            sizes[name] = n // known
    if not sizes:
        sizes = {"tp": n} if n == 1 else {}
        if not sizes:
            raise ValueError(f"{n} devices: give a mesh, e.g. 'tp={n}' or 'dp=2,tp={n // 2}'")
    shape = tuple(sizes.get(a, 1) for a in MESH_AXES)
    if math.prod(shape) != n:
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, shape, strict=True))} needs {math.prod(shape)} devices,"
            f" there are {n}; use -1 for one axis to take the rest"
        )
    try:
        # Topology-aware order (ICI rings on TPU, NVLink islands on GPU) when JAX knows one.
        arr = mesh_utils.create_device_mesh(shape, devices)
    except Exception:  # CPU devices, odd subsets: plain order is fine there
        arr = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(arr, MESH_AXES)


def mesh_summary(mesh: Mesh) -> str:
    """One line: the mesh shape and the process count."""
    axes = ", ".join(f"{a}={s}" for a, s in mesh.shape.items())
    procs = len({d.process_index for d in mesh.devices.flat})
    return f"mesh ({axes}) over {mesh.devices.size} devices in {procs} process(es)"


def device_report(mesh: Mesh | None = None, held: Mapping[int, int] | None = None) -> list[str]:
    """One line per device of the mesh (or every device): coordinates, the bytes of `held`
    (device id -> bytes, e.g. `bytes_per_device((params, cache))`), and memory in use.

    Memory stats come from the runtime where it has them (GPU, TPU); XLA:CPU reports none, so
    the line says so instead of printing a made-up number."""
    if mesh is None:
        devices = [(d, ()) for d in jax.devices()]
    else:
        devices = [(d, tuple(int(i) for i in idx)) for idx, d in np.ndenumerate(mesh.devices)]
    lines = []
    for d, coords in devices:
        where = f" at {dict(zip(MESH_AXES, coords, strict=True))}" if coords else ""
        mem = "memory stats n/a"
        if d.process_index == jax.process_index():
            try:
                st = d.memory_stats() or {}
            except Exception:  # some runtimes raise instead of returning None
                st = {}
            if "bytes_in_use" in st:
                limit = st.get("bytes_limit")
                mem = f"{st['bytes_in_use'] / 2**20:.0f} MiB in use" + (
                    f" of {limit / 2**20:.0f} MiB" if limit else ""
                )
        else:
            mem = "on another process"
        mine = f"holds {held[d.id] / 2**20:.1f} MiB, " if held and d.id in held else ""
        lines.append(
            f"  device {d.id} ({d.platform} {d.device_kind}, process {d.process_index}){where}:"
            f" {mine}{mem}"
        )
    return lines


# -- rules -> shardings ---------------------------------------------------------------------


def logical_sizes(cfg: ModelConfig, rows: int, max_len: int) -> dict[str, int]:
    """How many indivisible units each logical axis has: heads count in heads (a head is never
    split across devices), every other axis in elements. Where layers differ (Gemma 4's KV
    heads and MLP widths), the units all of them divide into: an axis is split the same way
    in every layer or in none."""
    layers = range(cfg.n_layers)
    return {
        "batch": rows,
        "seq": max_len,
        "embed": cfg.dim,
        "q_heads": cfg.n_heads,
        "kv_heads": math.gcd(*(cfg.kv_heads_at(i) for i in layers)),
        "head_dim": cfg.head_dim,
        "ffw": math.gcd(*(cfg.ffn_dim_at(i) for i in layers)),
        "vocab": cfg.vocab_size,
        "layers": cfg.n_layers,
        **({} if cfg.ssm is None else ssm_sizes(cfg.ssm)),
        "experts": cfg.moe.n_experts if cfg.moe else 0,
        "expert_ffw": cfg.moe.ffn_dim if cfg.moe else 0,
    }


def ssm_sizes(ssm: SSMConfig) -> dict[str, int]:
    """The recurrent layers' logical sizes: heads (DeltaNet's value heads, Mamba2's heads) and
    Mamba2's groups, in whole units."""
    return {"ssm_heads": ssm.time_step_rank, "ssm_groups": ssm.group_count}


def logical_to_spec(
    axes: LogicalAxes,
    mesh: Mesh,
    sizes: Mapping[str, int],
    rules: Mapping[str, str | None] = DEFAULT_RULES,
) -> PartitionSpec:
    """Map logical axes to a PartitionSpec. An axis stays unsplit when its rule names no
    mesh axis, that mesh axis has size 1, its units do not divide evenly, or an earlier axis
    of the same array already uses that mesh axis."""
    used: set[str] = set()
    out: list[str | None] = []
    for name in axes:
        mesh_axis = rules.get(name) if name is not None else None
        n = mesh.shape.get(mesh_axis, 1) if mesh_axis else 1
        if n == 1 or mesh_axis in used or sizes.get(name, 0) % n:
            out.append(None)
            continue
        used.add(mesh_axis)
        out.append(mesh_axis)
    while out and out[-1] is None:
        out.pop()
    return PartitionSpec(*out)


@dataclass(frozen=True)
class ShardingPlan:
    """All the shardings one model needs on one mesh: params, cache, sampler, host inputs."""

    mesh: Mesh
    cfg: ModelConfig
    rows: int
    max_len: int
    rules: Mapping[str, str | None] = field(default_factory=lambda: dict(DEFAULT_RULES))

    @property
    def sizes(self) -> dict[str, int]:
        return logical_sizes(self.cfg, self.rows, self.max_len)

    def named(self, axes: LogicalAxes) -> NamedSharding:
        return NamedSharding(self.mesh, logical_to_spec(axes, self.mesh, self.sizes, self.rules))

    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    def param(self, path: Sequence[str]) -> NamedSharding:
        return self.named(param_axes(path))

    def params(self, tree) -> dict:
        """Shardings for a params pytree (arrays or ShapeDtypeStructs) keyed like it."""
        return jax.tree_util.tree_map_with_path(
            lambda p, _: self.param(tuple(k.key for k in p)), tree
        )

    def cache(self, cache: Cache) -> Cache:
        """Shardings of `cache` (arrays or `jax.eval_shape`'s structs), keyed like it: each
        state names its arrays' logical axes (`tsjax.cache.LayerState.shardings`), sized by
        the array itself, so a blocked cache's block whose rows do not divide over `dp` is
        kept whole on that axis."""

        def named(axes: LogicalAxes, shape: tuple[int, ...]) -> NamedSharding:
            sizes = dict(zip(axes, shape, strict=True))
            return NamedSharding(self.mesh, logical_to_spec(axes, self.mesh, sizes, self.rules))

        return cache.shardings(named)

    def sampler(self) -> SamplerState:
        # Built on the host (a few KB): its construction draws PRNG keys, which eval_shape
        # cannot trace through numpy.
        return jax.tree.map(
            lambda s: self.named(sampler_axes(s.ndim)), SamplerState.create(self.rows)
        )

    def device_put(self, path: Sequence[str], array) -> jax.Array:
        """The loader's hook: build the global array from the host array, copying to each
        device only the slice it holds (no full copy on any one device, nothing staged)."""
        return put(array, self.param(path))

    def describe(self) -> list[str]:
        """What is split over which mesh axis (for the startup report)."""
        kv = logical_to_spec(CACHE_KV_AXES, self.mesh, self.sizes, self.rules)
        lines = [
            f"  kv cache [L,B,K,S,H] {kv}; q_heads={self.cfg.n_heads}"
            f" kv_heads={self.cfg.n_kv_heads} ffw={self.cfg.ffn_dim} rows={self.rows}"
        ]
        ffn = (("moe", "up"), "[experts,out,in]") if self.cfg.moe else (("mlp", "up"), "[out,in]")
        for path, shape in [(("attn", "q"), "[out,in]"), (("attn", "k"), "[out,in]"), ffn]:
            full = ("layers", *path, "weight")
            lines.append(f"  {'/'.join(full)} {shape} {self.param(full).spec}")
        return lines


def put(array, sharding: NamedSharding) -> jax.Array:
    """Host (numpy) or device data -> a global array with `sharding`, one slice per device.

    `make_array_from_callback` asks only for the slices this process's devices hold, so the
    same call works on one host and on many (each process passes the same host data)."""
    a = array if isinstance(array, np.ndarray) else np.asarray(array)
    return jax.make_array_from_callback(a.shape, sharding, lambda idx: a[idx])


def constrain_inputs(fn, shardings: tuple):
    """`fn` with its leading positional arguments constrained to `shardings` (pytrees)."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        head = [
            jax.lax.with_sharding_constraint(a, sh) for a, sh in zip(args, shardings, strict=False)
        ]
        return fn(*head, *args[len(head) :], **kwargs)

    return wrapped


def put_tree(tree, shardings):
    """`put` over matching pytrees (shardings may be one sharding for every leaf)."""
    if isinstance(shardings, NamedSharding):
        return jax.tree.map(lambda a: put(a, shardings), tree)
    return jax.tree.map(put, tree, shardings)


def bytes_per_device(tree) -> dict[int, int]:
    """Bytes each device holds of the arrays in `tree` (this process's devices), from each
    array's shape and sharding alone: also right for an array a step has taken (donated)."""
    out: dict[int, int] = {}
    for a in jax.tree_util.tree_leaves(tree):
        shard = int(np.prod(a.sharding.shard_shape(a.shape))) * a.dtype.itemsize
        for d in a.sharding.addressable_devices:
            out[d.id] = out.get(d.id, 0) + shard
    return out


# -- several hosts --------------------------------------------------------------------------


def initialize_distributed(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: Sequence[int] | None = None,
) -> bool:
    """Join a multi-process JAX job before anything touches a device.

    With no arguments, `jax.distributed.initialize()` finds the job from its environment on
    TPU slices, SLURM and Open MPI; JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
    JAX_PROCESS_ID (JAX's own variables) fill in for a plain GPU node or a handful of hosts.
    Returns whether this is a multi-process job now."""
    kwargs = {
        k: v
        for k, v in dict(
            coordinator_address=coordinator,
            num_processes=num_processes,
            process_id=process_id,
            local_device_ids=local_device_ids,
        ).items()
        if v is not None
    }
    jax.distributed.initialize(**kwargs)
    log.info(
        "jax.distributed: process %d of %d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return jax.process_count() > 1
