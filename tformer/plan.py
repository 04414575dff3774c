"""Plan a sharded training step without running it.

`plan_train_step` builds the train state and a batch as abstract shapes
(`jax.eval_shape`: nothing is allocated), lowers and compiles the jitted step
with the rule table's shardings, and reads back what XLA decided:

  * per-device bytes of parameters and optimizer state (from the shardings),
  * argument / output / temporary (activation) bytes (`memory_analysis()`),
  * FLOPs and bytes accessed per step (`cost_analysis()`),
  * every collective in the compiled program with its result size,
  * for a pipeline (`stage` axis): stages, microbatches and the GPipe bubble
    fraction (S - 1) / (M + S - 1); the stage-to-stage sends are the
    collective-permutes (one per tick and direction: the schedule is
    unrolled, so the HLO holds each of them); for sequence parallelism the
    ring's K/V sends are collective-permutes too.

Compiling needs devices, not memory: with
`XLA_FLAGS=--xla_force_host_platform_device_count=256` (set before jax starts)
a laptop plans a 256-chip mesh. The numbers are those of the program compiled
for the backend at hand (a CPU plan shows CPU's fusion and collective choices;
on CPU a reduce-scatter is emitted as an all-reduce followed by a slice).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from tformer import batch as batch_lib
from tformer import pipeline
from tformer import sharding as shd
from tformer import training as ts
from tformer.config import ModelConfig

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute",
               "collective-broadcast", "ragged-all-to-all")

_DTYPE_BYTES = {"pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "s32": 4, "u32": 4,
                "s64": 8, "u64": 8, "f16": 2, "bf16": 2, "f32": 4, "f64": 8, "c64": 8, "c128": 16,
                "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3": 1, "f8e5m2fnuz": 1, "f8e4m3fnuz": 1, "f8e4m3b11fnuz": 1}

# `%name = <type> <op>(` where <type> is an array type or a (possibly nested,
# commented) tuple of them; async collectives appear as `<op>-start`.
_INSTR = re.compile(
    r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<type>.*?)\s+"
    r"(?P<op>" + "|".join(re.escape(c) for c in COLLECTIVES) + r")(?P<start>-start)?\("
)
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([\d,]*)\]")
_GROUPS_IOTA = re.compile(r"replica_groups=\[(\d+),(\d+)\]<=")
_GROUPS_LIST = re.compile(r"replica_groups=\{(\{[\d,]*\})")
_GROUPS_MESH = re.compile(r"replica_groups=mesh\[([^\]]*)\](?:,\s*device_ids=\(\S*\))?\s*\{([^}]*)\}")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective instruction of a compiled (per-device) program."""

    kind: str  # all-reduce | all-gather | reduce-scatter | ...
    name: str  # the HLO instruction name
    shapes: tuple[tuple[str, tuple[int, ...]], ...]  # (dtype, dims) of each result array
    bytes: int  # result bytes on one device (summed over a combined/tuple op)
    group_size: int | None  # devices taking part in each group, where the HLO says
    op_name: str = ""  # the jax op it came from (metadata), if recorded


def _array_bytes(dtype: str, dims: tuple[int, ...]) -> int:
    if dtype not in _DTYPE_BYTES:
        return 0  # token[] and other non-array results
    return _DTYPE_BYTES[dtype] * math.prod(dims)


def _group_size(line: str) -> int | None:
    m = _GROUPS_IOTA.search(line)
    if m:
        return int(m.group(2))
    m = _GROUPS_LIST.search(line)
    if m:
        inner = m.group(1).strip("{}")
        return len(inner.split(",")) if inner else None
    m = _GROUPS_MESH.search(line)
    if m:
        # e.g. mesh['axis_0'=2,'axis_1'=4] {'axis_1'}: the product of the named axes.
        sizes = {k.strip().strip("'"): int(v) for k, v in (kv.split("=") for kv in m.group(1).split(",") if "=" in kv)}
        named = [a.strip().strip("'") for a in m.group(2).split(",") if a.strip()]
        return math.prod(sizes.get(a, 1) for a in named) if named else None
    return None


def parse_collectives(hlo_text: str) -> list[Collective]:
    """Collectives in compiled HLO text, one entry per instruction (`-done` halves skipped)."""
    out = []
    for line in hlo_text.splitlines():
        m = _INSTR.match(line)
        if not m:
            continue
        arrays = [(d, tuple(int(x) for x in dims.split(",") if x)) for d, dims in _ARRAY.findall(m["type"])]
        arrays = [a for a in arrays if a[0] in _DTYPE_BYTES]
        if m["start"]:
            # Async starts return (operands, results[, scratch]): keep the results.
            if m["op"] == "all-gather":
                arrays = arrays[len(arrays) // 2:]
            elif m["op"] == "collective-permute":
                arrays = arrays[1:2]
        op_name = _OP_NAME.search(line)
        out.append(Collective(
            kind=m["op"], name=m["name"], shapes=tuple(arrays),
            bytes=sum(_array_bytes(d, s) for d, s in arrays), group_size=_group_size(line),
            op_name=op_name.group(1) if op_name else "",
        ))
    return out


def summarize_collectives(collectives: Iterable[Collective]) -> dict[str, dict[str, int]]:
    """{kind: {"count": instructions, "arrays": result arrays, "bytes": result bytes}}."""
    out: dict[str, dict[str, int]] = {}
    for c in collectives:
        s = out.setdefault(c.kind, {"count": 0, "arrays": 0, "bytes": 0})
        s["count"] += 1
        s["arrays"] += len(c.shapes)
        s["bytes"] += c.bytes
    return out


@dataclasses.dataclass
class Plan:
    """What one device holds and does for one training step under a mesh and rules."""

    mesh_shape: dict[str, int]
    rules: dict[str, Any]
    global_batch: int
    seq_len: int
    num_params: int  # whole model
    param_bytes: int  # per device
    opt_bytes: int  # per device (Adam moments, counters...)
    batch_bytes: int  # per device
    argument_bytes: int | None  # memory_analysis: inputs of the step (state + batch)
    output_bytes: int | None
    alias_bytes: int | None  # outputs written in place over donated inputs
    temp_bytes: int | None  # activations and other scratch
    generated_code_bytes: int | None
    flops: float | None  # per device, per step
    bytes_accessed: float | None
    collectives: list[Collective]
    stages: int = 1  # pipeline stages (mesh axis `stage`)
    microbatches: int = 1  # pipeline microbatches per step (1 without a pipeline)
    sequence_parts: int = 1  # sequence-parallel split of the positions (mesh axis `sequence`)

    @property
    def bubble_fraction(self) -> float:
        """Idle fraction of each stage's time in the GPipe schedule (0 without a pipeline)."""
        return pipeline.bubble_fraction(self.stages, self.microbatches)

    @property
    def state_bytes(self) -> int:
        return self.param_bytes + self.opt_bytes

    @property
    def peak_bytes(self) -> int | None:
        """Arguments + outputs not aliased onto them + temporaries: the step's device-memory high mark."""
        return peak_bytes(self.argument_bytes, self.output_bytes, self.alias_bytes, self.temp_bytes)

    @property
    def collective_bytes(self) -> int:
        return sum(c.bytes for c in self.collectives)

    def collective_summary(self) -> dict[str, dict[str, int]]:
        return summarize_collectives(self.collectives)

    def table(self) -> str:
        """A readable report."""
        n = math.prod(self.mesh_shape.values())
        rows = [
            ("mesh", " x ".join(f"{k}={v}" for k, v in self.mesh_shape.items()) + f"  ({n} devices)"),
            ("batch", f"{self.global_batch} x {self.seq_len} tokens "
                      f"({self.global_batch * self.seq_len // n} per device)"),
            ("parameters", f"{self.num_params:,} ({fmt_bytes(self.param_bytes)} per device)"),
            ("optimizer state", f"{fmt_bytes(self.opt_bytes)} per device"),
            ("params + optimizer", f"{fmt_bytes(self.state_bytes)} per device"),
            ("step arguments", fmt_bytes(self.argument_bytes)),
            ("temporaries (activations)", fmt_bytes(self.temp_bytes)),
            ("peak (args + outputs + temps)", fmt_bytes(self.peak_bytes)),
            ("FLOPs per step", "n/a" if self.flops is None else f"{self.flops:.3e} per device"),
            ("bytes accessed per step", fmt_bytes(self.bytes_accessed)),
            ("collective bytes per step", fmt_bytes(self.collective_bytes)),
        ]
        if self.stages > 1:
            rows.insert(2, ("pipeline", f"{self.stages} stages x {self.microbatches} microbatches (GPipe), "
                                        f"bubble {self.bubble_fraction:.1%}"))
        if self.sequence_parts > 1:
            rows.insert(2, ("sequence", f"{self.sequence_parts}-way ring attention, "
                                        f"{self.seq_len // self.sequence_parts} positions per device"))
        width = max(len(k) for k, _ in rows)
        lines = [f"{k:<{width}}  {v}" for k, v in rows]
        summary = self.collective_summary()
        if summary:
            lines.append("")
            lines.append(f"{'collective':<20}{'ops':>6}{'arrays':>8}{'bytes':>14}")
            for kind, s in sorted(summary.items()):
                lines.append(f"{kind:<20}{s['count']:>6}{s['arrays']:>8}{fmt_bytes(s['bytes']):>14}")
        else:
            lines.append("(no collectives)")
        return "\n".join(lines)


def fmt_bytes(b: float | None) -> str:
    if b is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(b) < 1024 or unit == "TiB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.2f} {unit}"
        b /= 1024
    return f"{b:.2f} TiB"


def shard_bytes(tree: Any, shardings: Any) -> int:
    """Bytes one device holds of `tree` (arrays or ShapeDtypeStructs) under `shardings` (max over devices)."""
    total = 0
    for a, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))):
        total += math.prod(s.shard_shape(a.shape)) * np.dtype(a.dtype).itemsize
    return total


def _cost(compiled) -> dict:
    try:
        cost = compiled.cost_analysis()
    except Exception:
        return {}
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return dict(cost or {})


def peak_bytes(argument: int | None, output: int | None, alias: int | None, temp: int | None) -> int | None:
    """A compiled program's device-memory high mark by XLA's plan: its arguments, the outputs not written in
    place over donated arguments, and its temporaries (None without arguments or temporaries)."""
    if argument is None or temp is None:
        return None
    return argument + (output or 0) - (alias or 0) + temp


def compiled_peak_bytes(compiled: jax.stages.Compiled) -> int | None:
    """`peak_bytes` of a compiled program's `memory_analysis()` (None where the backend has none)."""
    m = _memory_fields(compiled)
    return peak_bytes(m["argument_bytes"], m["output_bytes"], m["alias_bytes"], m["temp_bytes"])


def _memory_fields(compiled) -> dict:
    """XLA's memory analysis of `compiled` as Plan's `*_bytes` fields (None where the backend has none)."""
    try:
        mem = compiled.memory_analysis()
    except Exception:  # not every backend implements it
        mem = None
    names = ("argument", "output", "alias", "temp", "generated_code")
    return {f"{n}_bytes": None if mem is None else int(getattr(mem, f"{n}_size_in_bytes", 0)) for n in names}


def plan_train_step(
    model_cls: type[nnx.Module],
    cfg: ModelConfig,
    optim: ts.OptimizerConfig,
    mesh: Mesh,
    rules,
    *,
    batch: int,
    seq_len: int,
    src_len: int | None = None,
    batch_shapes: dict | None = None,
    microbatches: int | None = None,
) -> Plan:
    """Compile (never run) one train step on `mesh` under `rules`; see the module docstring.

    `microbatches`: the pipeline's count on a mesh with a `stage` axis (default 2 x stages).
    """
    rules = shd.rules_for(rules)
    shd.check_divisibility(cfg, mesh, rules, batch, seq_len=seq_len, microbatches=microbatches)
    graphdef, abstract = ts.abstract_model(model_cls, cfg)
    tx = ts.make_optimizer(optim, abstract)
    state_sh = ts.state_shardings(model_cls, cfg, tx, mesh, rules)
    abstract_state = ts.abstract_train_state(abstract, tx)
    params = abstract_state.params
    shapes = batch_shapes if batch_shapes is not None else batch_lib.abstract_batch(cfg.kind, batch, seq_len, src_len)
    batch_sh = ts.batch_sharding(mesh, rules, shapes)

    def with_sharding(a, s):
        return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)

    state_in = jax.tree.map(with_sharding, abstract_state, state_sh)
    batch_in = jax.tree.map(with_sharding, shapes, batch_sh)
    step = ts.make_train_step(graphdef, tx, optim, mesh=mesh, rules=rules, state_sharding=state_sh,
                              batch_sharding=batch_sh, microbatches=microbatches)
    compiled = step.lower(state_in, batch_in).compile()
    cost = _cost(compiled)
    return Plan(
        mesh_shape=dict(mesh.shape),
        rules=dict(rules),
        global_batch=batch,
        seq_len=seq_len,
        num_params=sum(math.prod(a.shape) for a in jax.tree.leaves(params)),
        param_bytes=shard_bytes(params, state_sh.params),
        opt_bytes=shard_bytes(abstract_state.opt_state, state_sh.opt_state),
        batch_bytes=shard_bytes(shapes, batch_sh),
        **_memory_fields(compiled),
        flops=cost.get("flops"),
        bytes_accessed=cost.get("bytes accessed"),
        collectives=parse_collectives(compiled.as_text()),
        stages=pipeline.num_stages(mesh),
        microbatches=pipeline.resolve_microbatches(mesh, microbatches) if pipeline.num_stages(mesh) > 1 else 1,
        sequence_parts=shd.axis_size(mesh, "sequence"),
    )
