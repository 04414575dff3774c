"""Sharding rules as data: logical axis names -> mesh axes.

Every parameter carries logical axis names as Flax NNX sharding metadata
(`nnx.Param(..., out_sharding=('embed', 'mlp'))`); stacked layers get a
leading `'layers'` axis from `nnx.vmap`'s `transform_metadata`. A rule table
maps each logical name to a mesh axis (or a tuple of them, or None) and is
resolved with Flax's logical-rule mechanism (`flax.linen.logical_to_mesh_axes`,
`nnx.logical_axis_rules`). The same table constrains activations at block
boundaries via `constrain`.

Rules reach traced code one way: a hashable `Layout` (mesh + rule pairs),
passed as a static argument to every jitted entry point, which activates it
with `use_layout` while tracing.

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
import contextvars
import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import optax
from flax import linen, nnx
from flax.core import spmd as flax_spmd
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from tformer.config import ModelConfig

MESH_AXES = ("data", "fsdp", "tensor")  # always present (size 1 allowed)
# Present only when larger than 1, so meshes without them read as before.
# Order of the built mesh: stage outermost (the slow links between hosts).
OPTIONAL_AXES = ("stage", "sequence")
_ORDER = ("stage", "data", "fsdp", "sequence", "tensor")
Rules = Mapping[str, Any]  # logical name -> None | mesh axis | tuple of mesh axes

# Batch is split over both data axes: FSDP is data parallelism whose parameters
# are also sharded, so every device still gets its own slice of the batch.
_BATCH = ("data", "fsdp")

# Megatron: QKV / MLP-up split by output columns (heads / mlp), attention
# out / MLP-down split by input rows: one reduction per block.
_TP = {
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "vocab": "tensor",
    "act_heads": "tensor",
    "act_kv_heads": "tensor",
    "act_mlp": "tensor",
    "act_vocab": "tensor",
}

PRESETS: dict[str, dict[str, Any]] = {
    # Replicated parameters; gradients all-reduced over the batch axes.
    "dp": {"batch": _BATCH},
    # Parameters (and so optimizer state) sharded along `embed` over fsdp;
    # XLA all-gathers them per layer and reduce-scatters the gradients.
    "fsdp": {"batch": _BATCH, "embed": "fsdp"},
    "tp": {"batch": _BATCH, **_TP},
    # The same table as "tp" (its batch already spans the data axes), under its own name.
    "dp_tp": {"batch": _BATCH, **_TP},
    "fsdp_tp": {"batch": _BATCH, **_TP, "embed": "fsdp"},
}
# Pipeline and sequence parallelism: in every preset, inert without the axes.
for _table in PRESETS.values():
    _table.update({"layers": "stage", "length": "sequence"})


def rules_for(preset: str | Rules) -> dict[str, Any]:
    """A rule table (a fresh dict) from a preset name or an explicit mapping."""
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ValueError(f"unknown sharding preset {preset!r}; choose one of {sorted(PRESETS)}")
        return dict(PRESETS[preset])
    return dict(preset)


def _targets(target) -> tuple[str, ...]:
    return () if target is None else (target,) if isinstance(target, str) else tuple(target)


def flax_rules(rules: Rules) -> tuple[tuple[str, Any], ...]:
    """The table in Flax's `LogicalRules` form: hashable (logical, mesh axes) pairs."""
    return tuple((name, target if target is None or isinstance(target, str) else tuple(target))
                 for name, target in sorted(rules.items()))


# Why a wrapper over Flax's `logical_to_mesh_axes`: Flax neither refuses two logical axes of one array on one
# mesh axis nor drops size-1 mesh axes.
def logical_to_spec(axes: Sequence[str | None], rules: Rules, mesh: Mesh | None = None) -> P:
    """PartitionSpec for logical `axes` under `rules` (Flax's `logical_to_mesh_axes`).

    A mesh axis can split an array only once: two logical axes of one array
    mapped to the same mesh axis raise. Axes of size 1 in `mesh` are dropped
    so specs stay readable.
    """
    owner: dict[str, str] = {}
    for name in axes:
        for t in _targets(rules.get(name)) if name is not None else ():
            if t in owner:
                raise ValueError(
                    f"logical axes {owner[t]!r} and {name!r} of one array {tuple(axes)} both map to mesh axis "
                    f"{t!r}; change the rule table so each mesh axis splits an array at most once")
            owner[t] = name
    spec = linen.logical_to_mesh_axes(tuple(axes), flax_rules(rules))

    def keep(entry: str | tuple[str, ...] | None) -> str | tuple[str, ...] | None:
        kept = tuple(t for t in _targets(entry) if mesh is None or mesh.shape.get(t, 1) > 1)
        return None if not kept else kept[0] if len(kept) == 1 else kept

    return P(*(keep(e) for e in spec))


# ---------------------------------------------------------------------------
# The one way rules reach traced code: a static, hashable Layout.


@dataclasses.dataclass(frozen=True)
class Layout:
    """A mesh and a rule table (Flax `LogicalRules` pairs); hashable, so a static jit argument."""

    mesh: Mesh
    rules: tuple[tuple[str, Any], ...]

    @property
    def table(self) -> dict[str, Any]:
        return dict(self.rules)


def layout(mesh: Mesh | None, rules: str | Rules | None = None) -> Layout | None:
    """The Layout of `rules` (default: data parallel) on `mesh`; None without a mesh."""
    if mesh is None:
        return None
    return Layout(mesh, flax_rules(rules_for("dp" if rules is None else rules)))


# Why not `jax.set_mesh`: layouts are activated while tracing inside jit, where `jax.set_mesh` refuses to run.
_MESH: contextvars.ContextVar[Mesh | None] = contextvars.ContextVar("tformer_mesh", default=None)


@contextlib.contextmanager
def use_layout(lay: Layout | None):
    """Activate `lay` (Flax's `nnx.logical_axis_rules` + its mesh) for `constrain` calls traced inside."""
    token = _MESH.set(None if lay is None else lay.mesh)
    try:
        with nnx.logical_axis_rules(() if lay is None else lay.rules):
            yield
    finally:
        _MESH.reset(token)


def use_rules(mesh: Mesh | None, rules: Rules | None):
    """`use_layout` from a mesh and a rule table (None, None: no constraints)."""
    return use_layout(None if mesh is None or rules is None else layout(mesh, rules))


def active() -> tuple[Mesh | None, Rules | None]:
    """The (mesh, rule table) of the innermost active layout; (None, None) without one."""
    mesh, rules = _MESH.get(), flax_spmd.get_logical_axis_rules()
    return (None, None) if mesh is None or not rules else (mesh, dict(rules))


def axis_size(mesh: Mesh | None, axis: str) -> int:
    """Size of `axis` in `mesh` (1 when absent or without a mesh)."""
    return 1 if mesh is None else dict(mesh.shape).get(axis, 1)


def _without(target: str | tuple[str, ...], drop: set[str]) -> str | tuple[str, ...] | None:
    kept = tuple(a for a in ((target,) if isinstance(target, str) else target) if a not in drop)
    return None if not kept else kept[0] if len(kept) == 1 else kept


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Sharding constraint on an activation by logical axes; no-op without an active layout."""
    mesh, rules = _MESH.get(), flax_spmd.get_logical_axis_rules()
    if mesh is None or not rules or mesh.size == 1:
        return x
    spec = logical_to_spec(axes, dict(rules), mesh)
    inner = jax.sharding.get_abstract_mesh()
    if not inner.empty and inner.manual_axes:
        # Inside a shard_map (pipeline stage, ring attention): the manual axes
        # are already split by hand, so constrain only over the automatic ones.
        manual = set(inner.manual_axes)
        spec = P(*(None if t is None else _without(t, manual) for t in spec))
        return jax.lax.with_sharding_constraint(x, NamedSharding(inner, spec))
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


# ---------------------------------------------------------------------------
# Parameters and optimizer state.


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def param_axes(var: nnx.Variable) -> tuple[str | None, ...]:
    """Logical axes of a variable: its NNX `out_sharding` metadata (stacked layers included)."""
    axes = tuple(var.get_metadata().get("out_sharding") or ())
    if len(axes) != len(var.shape):
        raise ValueError(f"variable of shape {var.shape} has logical axes {axes}: one name per dimension needed")
    return axes


# Why not `nnx.get_partition_spec`: it keeps a logical name without a rule as a mesh-axis name (P('fsdp', 'rnn')
# where this gives P('fsdp', None)) and skips `logical_to_spec`'s checks.
def state_specs(state: nnx.State, rules: Rules, mesh: Mesh | None = None) -> Any:
    """PartitionSpec pytree (same structure as `state`, Variables as leaves)."""
    return jax.tree.map(
        lambda v: logical_to_spec(param_axes(v), rules, mesh) if _is_var(v) else P(),
        state,
        is_leaf=_is_var,
    )


def state_shardings(state: nnx.State, mesh: Mesh, rules: Rules) -> Any:
    """NamedSharding pytree for an nnx.State (abstract or concrete)."""
    specs = state_specs(state, rules, mesh)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda s: isinstance(s, P))


def optimizer_shardings(tx: optax.GradientTransformation, abstract_opt: Any, params_shardings: Any,
                        mesh: Mesh) -> Any:
    """Optimizer-state shardings: leaves that mirror a parameter (Adam's mu, nu, ...) take its
    sharding (`optax.tree_map_params`); the rest (counters) are replicated."""
    replicated = NamedSharding(mesh, P())
    try:
        return optax.tree_map_params(
            tx, lambda _, s: s, abstract_opt, params_shardings,
            transform_non_params=lambda _: replicated, is_leaf=lambda x: isinstance(x, NamedSharding),
        )
    except (ValueError, TypeError):  # a partitioned optimizer (Muon + AdamW): its states hold masked param trees
        return _shardings_by_path(abstract_opt, params_shardings, replicated)


def _shardings_by_path(abstract_opt: Any, params_shardings: Any, replicated: NamedSharding) -> Any:
    """A state leaf whose key path ends with a parameter's path, and has its shape's rank, takes its sharding."""
    by_path = {tuple(k): s for k, s in jax.tree_util.tree_leaves_with_path(
        params_shardings, is_leaf=lambda x: isinstance(x, NamedSharding))}

    def pick(path: tuple, leaf: Any) -> NamedSharding:
        for start in range(len(path)):
            s = by_path.get(tuple(path[start:]))
            if s is not None and len(s.spec) <= len(getattr(leaf, "shape", ())):
                return s
        return replicated

    return jax.tree_util.tree_map_with_path(pick, abstract_opt)


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


def check_divisibility(cfg: ModelConfig, mesh: Mesh, rules: Rules, global_batch: int | None = None, *,
                       seq_len: int | None = None, microbatches: int | None = None, virtual_stages: int = 1) -> None:
    """Fail early, naming the field, when a sharded dimension does not split evenly.

    Pipeline meshes (`stage` > 1) also need layers divisible by stages (x
    `virtual_stages`), the global batch by (data axes) x `microbatches` and,
    interleaved, microbatches >= stages; sequence meshes need `seq_len`
    divisible by `sequence`.
    """
    stages, seq_parts = axis_size(mesh, "stage"), axis_size(mesh, "sequence")
    if cfg.num_layers % stages:
        raise ValueError(f"ModelConfig.num_layers={cfg.num_layers} is not divisible by mesh.stage={stages}; "
                         f"valid stage sizes are {_divisors(cfg.num_layers)}")
    if seq_len is not None and seq_len % seq_parts:
        raise ValueError(f"sequence length {seq_len} is not divisible by mesh.sequence={seq_parts}; "
                         f"valid sequence sizes are {_divisors(seq_len)}")
    sizes = {
        "heads": ("num_heads", cfg.num_heads),
        "kv_heads": ("num_kv_heads", cfg.kv_heads),
        "mlp": ("d_ff", cfg.resolved_d_ff),
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
    if stages > 1:
        from tformer import pipeline  # the schedule's own rule (pipeline imports this module)

        m = 2 * stages if not microbatches else microbatches
        for field in ("num_layers", "num_encoder_layers") if cfg.num_encoder_layers else ("num_layers",):
            pipeline.check_schedule(getattr(cfg, field), stages, m, virtual_stages, field)


# ---------------------------------------------------------------------------
# Multi-host start-up.


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    auto: bool = False,
    **init_kwargs: Any,
) -> bool:
    """Join a multi-process JAX run; returns whether `jax.distributed.initialize` was called.

    With `coordinator_address` ("host:port" of process 0), `num_processes` and
    `process_id`, the processes rendezvous there (any platform, CPU included).
    With `auto=True` and no address, JAX detects the cluster itself (Cloud TPU
    slices, SLURM, Open MPI, or the JAX_COORDINATOR_ADDRESS environment
    variable). Must run before anything touches the devices. `init_kwargs` go to
    `jax.distributed.initialize` (e.g. `heartbeat_timeout_seconds`).
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
                               process_id=process_id, **init_kwargs)
    return True
