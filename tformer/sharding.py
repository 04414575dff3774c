"""Sharding rules as data: logical axis names -> mesh axes.

Every parameter carries logical axis names in its `axes` metadata (for example
`('embed', 'mlp')`); stacked layers get a leading `'layers'` axis. A rule table
maps each logical name to a mesh axis (or a tuple of them, or None). The same
table constrains activations at block boundaries via `constrain`.

The model code never names a mesh axis: change the table, change the plan.

Two more mesh axes exist when their size is above 1: `stage` (pipeline
parallelism: the `layers` axis of the stacked blocks is split into contiguous
groups, see tformer.pipeline) and `sequence` (sequence parallelism: the
`length` axis of activations is split, attention runs as ring attention, see
tformer.ring_attention). Every preset maps `layers -> stage` and
`length -> sequence`; on a mesh without those axes the rules drop out.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")  # always present (size 1 allowed)
# Present only when larger than 1, so meshes without them read as before.
# Order of the built mesh: stage outermost (the slow links between hosts).
OPTIONAL_AXES = ("stage", "sequence")
_ORDER = ("stage", "data", "fsdp", "sequence", "tensor")
Rules = Mapping[str, Any]  # logical name -> None | mesh axis | tuple of mesh axes

# Batch is split over both data axes: FSDP is data parallelism whose parameters
# are also sharded, so every device still gets its own slice of the batch.
_BATCH = ("data", "fsdp")

PRESETS: dict[str, dict[str, Any]] = {
    # Replicated parameters; gradients all-reduced over the batch axes.
    "dp": {"batch": _BATCH},
    # Parameters (and so optimizer state) sharded along `embed` over fsdp;
    # XLA all-gathers them per layer and reduce-scatters the gradients.
    "fsdp": {"batch": _BATCH, "embed": "fsdp"},
    # Megatron: QKV / MLP-up split by output columns (heads / mlp), attention
    # out / MLP-down split by input rows: one reduction per block.
    "tp": {
        "batch": _BATCH,
        "heads": "tensor",
        "kv_heads": "tensor",
        "mlp": "tensor",
        "vocab": "tensor",
        "act_heads": "tensor",
        "act_kv_heads": "tensor",
        "act_mlp": "tensor",
        "act_vocab": "tensor",
    },
}
PRESETS["fsdp_tp"] = {**PRESETS["tp"], "embed": "fsdp"}
PRESETS["dp_tp"] = PRESETS["tp"]
# Pipeline and sequence parallelism: in every preset, inert without the axes.
for _table in PRESETS.values():
    _table.update({"layers": "stage", "length": "sequence"})


def rules_for(preset: str | Rules) -> dict[str, Any]:
    """A rule table from a preset name or an explicit mapping."""
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ValueError(f"unknown sharding preset {preset!r}; choose one of {sorted(PRESETS)}")
        return dict(PRESETS[preset])
    return dict(preset)


def logical_to_spec(axes: Sequence[str | None], rules: Rules, mesh: Mesh | None = None) -> P:
    """PartitionSpec for logical `axes` under `rules`.

    A mesh axis is used at most once per array (first logical axis wins), and
    axes of size 1 in `mesh` are dropped so specs stay readable.
    """
    used: set[str] = set()
    out = []
    for name in axes:
        target = rules.get(name) if name is not None else None
        if target is None:
            out.append(None)
            continue
        targets = (target,) if isinstance(target, str) else tuple(target)
        targets = tuple(
            t for t in targets if t not in used and (mesh is None or mesh.shape.get(t, 1) > 1)
        )
        used.update(targets)
        out.append(None if not targets else targets[0] if len(targets) == 1 else targets)
    return P(*out)


# ---------------------------------------------------------------------------
# The active (mesh, rules) used by `constrain` while a step is being traced.


@dataclasses.dataclass
class _Active(threading.local):
    mesh: Mesh | None = None
    rules: Rules | None = None


_active = _Active()


@contextlib.contextmanager
def use_rules(mesh: Mesh | None, rules: Rules | None):
    """Activate `rules` on `mesh` for `constrain` calls traced inside."""
    prev = active()
    _active.mesh, _active.rules = mesh, rules
    try:
        yield
    finally:
        _active.mesh, _active.rules = prev


def active() -> tuple[Mesh | None, Rules | None]:
    """The (mesh, rules) activated by the innermost `use_rules`."""
    return _active.mesh, _active.rules


def axis_size(mesh: Mesh | None, axis: str) -> int:
    """Size of `axis` in `mesh` (1 when absent or without a mesh)."""
    return 1 if mesh is None else dict(mesh.shape).get(axis, 1)


def _without(target: str | tuple[str, ...], drop: set[str]) -> str | tuple[str, ...] | None:
    kept = tuple(a for a in ((target,) if isinstance(target, str) else target) if a not in drop)
    return None if not kept else kept[0] if len(kept) == 1 else kept


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Sharding constraint on an activation by logical axes; no-op without rules."""
    mesh, rules = _active.mesh, _active.rules
    if mesh is None or rules is None or mesh.size == 1:
        return x
    spec = logical_to_spec(axes, rules, mesh)
    inner = jax.sharding.get_abstract_mesh()
    if not inner.empty and inner.manual_axes:
        # Inside a shard_map (pipeline stage, ring attention): the manual axes
        # are already split by hand, so constrain only over the automatic ones.
        manual = set(inner.manual_axes)
        spec = P(*(None if t is None else _without(t, manual) for t in spec))
        return jax.lax.with_sharding_constraint(x, NamedSharding(inner, spec))
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


# ---------------------------------------------------------------------------
# Parameters.


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def param_axes(var: nnx.Variable) -> tuple[str | None, ...]:
    """Logical axes of a (possibly layer-stacked) variable."""
    axes = tuple(var.get_metadata().get("axes", ()))
    extra = var.ndim - len(axes) if hasattr(var, "ndim") else np.ndim(var[...]) - len(axes)
    if extra < 0:
        raise ValueError(f"variable of shape {var.shape} has more logical axes {axes} than dims")
    return ("layers",) * extra + axes


def state_specs(state, rules: Rules, mesh: Mesh | None = None):
    """PartitionSpec pytree (same structure as `state`, Variables as leaves)."""
    return jax.tree.map(
        lambda v: logical_to_spec(param_axes(v), rules, mesh) if _is_var(v) else P(),
        state,
        is_leaf=_is_var,
    )


def state_shardings(state, mesh: Mesh, rules: Rules):
    """NamedSharding pytree for an nnx.State (abstract or concrete)."""
    specs = state_specs(state, rules, mesh)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda s: isinstance(s, P))


# ---------------------------------------------------------------------------
# Meshes.


def make_mesh(
    shape: Mapping[str, int] | Sequence[int] = (-1, 1, 1),
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """A (data, fsdp, tensor) mesh, plus `stage` / `sequence` axes when given > 1; one `-1` fills the rest.

    >>> make_mesh({'data': -1, 'tensor': 2})  # 8 devices -> (4, 1, 2)
    >>> make_mesh({'data': 2, 'stage': 4})    # 8 devices -> stage=4, data=2, fsdp=1, tensor=1
    """
    names = MESH_AXES + OPTIONAL_AXES
    if isinstance(shape, Mapping):
        unknown = set(shape) - set(names)
        if unknown:
            raise ValueError(f"unknown mesh axes {sorted(unknown)}; tformer's mesh axes are {names}")
        sizes = {a: shape.get(a, 1) for a in names}
    else:
        dims = list(shape)
        if len(dims) != len(MESH_AXES):
            raise ValueError(f"mesh shape {tuple(dims)} must have {len(MESH_AXES)} entries {MESH_AXES}; "
                             f"pass a dict to use {OPTIONAL_AXES}")
        sizes = {**dict(zip(MESH_AXES, dims)), **{a: 1 for a in OPTIONAL_AXES}}
    dims = [sizes[a] for a in names]
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if dims.count(-1) > 1:
        raise ValueError(f"mesh shape {sizes}: at most one axis may be -1")
    if any(d == 0 or d < -1 for d in dims):
        raise ValueError(f"mesh shape {sizes}: sizes must be positive or -1")
    known = math.prod(d for d in dims if d != -1)
    if -1 in dims:
        if n % known:
            raise ValueError(
                f"mesh shape {sizes}: the fixed axes ({known} devices) do not divide "
                f"the {n} available devices; pick sizes whose product divides {n}"
            )
        dims[dims.index(-1)] = n // known
    sizes = dict(zip(names, dims))
    if math.prod(dims) != n:
        raise ValueError(
            f"mesh shape {sizes} needs {math.prod(dims)} devices but {n} are "
            f"available; make the product equal {n} or use -1 for one axis"
        )
    axes = tuple(a for a in _ORDER if a in MESH_AXES or sizes[a] > 1)
    return jax.make_mesh(
        tuple(sizes[a] for a in axes), axes, axis_types=(AxisType.Auto,) * len(axes), devices=devices
    )


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def check_divisibility(cfg, mesh: Mesh, rules: Rules, global_batch: int | None = None, *,
                       seq_len: int | None = None, microbatches: int | None = None) -> None:
    """Fail early, naming the field, when a sharded dimension does not split evenly.

    Pipeline meshes (`stage` > 1) also need layers divisible by stages and the
    global batch by (data axes) x `microbatches`; sequence meshes need
    `seq_len` divisible by `sequence`.
    """
    stages, seq_parts = axis_size(mesh, "stage"), axis_size(mesh, "sequence")
    if stages > 1 and seq_parts > 1:
        raise ValueError(f"mesh.stage={stages} and mesh.sequence={seq_parts}: pipeline and sequence "
                         "parallelism do not combine; set one of them to 1")
    if cfg.num_layers % stages:
        raise ValueError(f"ModelConfig.num_layers={cfg.num_layers} is not divisible by mesh.stage={stages}; "
                         f"valid stage sizes are {_divisors(cfg.num_layers)}")
    if seq_len is not None and seq_len % seq_parts:
        raise ValueError(f"sequence length {seq_len} is not divisible by mesh.sequence={seq_parts}; "
                         f"valid sequence sizes are {_divisors(seq_len)}")
    sizes = {
        "heads": ("num_heads", cfg.num_heads),
        "kv_heads": ("num_kv_heads", cfg.kv_heads),
        "mlp": ("d_ff", cfg.d_ff_),
        "vocab": ("vocab_size (padded)", cfg.padded_vocab),
        "embed": ("d_model", cfg.d_model),
    }
    for logical, (field, size) in sizes.items():
        spec = logical_to_spec((logical,), rules, mesh)[0]
        if spec is None:
            continue
        parts = math.prod(mesh.shape[a] for a in ((spec,) if isinstance(spec, str) else spec))
        if size % parts:
            raise ValueError(
                f"{field}={size} is not divisible by the {parts}-way sharding of logical axis "
                f"{logical!r} (mesh {dict(mesh.shape)}); change the mesh or the model size"
            )
    if global_batch is not None:
        spec = logical_to_spec(("batch",), rules, mesh)[0]
        axes = () if spec is None else (spec,) if isinstance(spec, str) else spec
        parts = math.prod(mesh.shape[a] for a in axes)
        if global_batch % parts:
            raise ValueError(
                f"global batch size {global_batch} is not divisible by the {parts} devices of the "
                f"data axes {axes}; use a multiple of {parts}"
            )
        if stages > 1:
            m = 2 * stages if not microbatches else microbatches
            if global_batch % (parts * m):
                valid = _divisors(global_batch // parts)
                raise ValueError(
                    f"global batch size {global_batch} is not divisible by data axes ({parts}) x "
                    f"mesh.microbatches ({m}); valid microbatches for this batch are {valid}"
                )


# ---------------------------------------------------------------------------
# Multi-host start-up.


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    auto: bool = False,
) -> bool:
    """Join a multi-process JAX run; returns whether `jax.distributed.initialize` was called.

    With `coordinator_address` ("host:port" of process 0), `num_processes` and
    `process_id`, the processes rendezvous there (any platform, CPU included).
    With `auto=True` and no address, JAX detects the cluster itself (Cloud TPU
    slices, SLURM, Open MPI, or the JAX_COORDINATOR_ADDRESS environment
    variable). Must run before anything touches the devices.
    """
    if coordinator_address is None and not auto:
        if num_processes not in (None, 1) or process_id not in (None, 0):
            raise ValueError(
                "num_processes / process_id were given without a coordinator address; pass "
                "coordinator_address='host:port' (process 0's), or auto=True on TPU / SLURM"
            )
        return False
    if coordinator_address is not None and (num_processes is None or process_id is None):
        raise ValueError(
            f"coordinator_address={coordinator_address!r} also needs num_processes and process_id "
            "(this process's rank, 0 on the coordinator's host)"
        )
    if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"process_id={process_id} must be in [0, num_processes={num_processes})")
    # Cross-process collectives between CPU devices need a transport (jaxlib ships
    # gloo over TCP); GPU and TPU backends ignore this setting.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)
    return True
