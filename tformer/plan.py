"""Plan a sharded training step without running it.

`plan_train_step` builds the train state and a batch as abstract shapes
(`jax.eval_shape`: nothing is allocated), lowers and compiles the jitted step
with the rule table's shardings, and reads back what XLA decided:

  * per-device bytes of parameters and optimizer state (from the shardings),
  * argument / output / temporary (activation) bytes (`memory_analysis()`),
  * FLOPs and bytes accessed per step (`cost_analysis()`),
  * every collective in the compiled program with its result size,
  * for a pipeline (`stage` axis): stages, microbatches, virtual stages and
    the schedule's bubble fraction (S - 1) / (V M + S - 1); the stage-to-stage
    sends are the collective-permutes (the ticks are one scan, so the HLO
    holds one send each way, whatever M); for sequence parallelism the
    ring's K/V sends are collective-permutes too.

Compiling needs devices, not memory: with
`XLA_FLAGS=--xla_force_host_platform_device_count=256` (set before jax starts)
a laptop plans a 256-chip mesh. The numbers are those of the program compiled
for the backend at hand (a CPU plan shows CPU's fusion and collective choices;
on CPU a reduce-scatter is emitted as an all-reduce followed by a slice).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Iterable
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from tformer import batch as batch_lib
from tformer import pipeline, sharding, training
from tformer.config import ModelConfig
from tformer.kvcache import KVCache
from tformer.lora import LoraConfig

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
# A computation's header (`%name (params) -> type {`, `ENTRY %name ...`), and the computations an instruction calls.
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?(?P<name>[\w.\-]+)\s*[({]")
_CALLEE = re.compile(
    r"\b(?P<how>body|condition|calls|to_apply|true_computation|false_computation)=%?(?P<name>[\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective instruction of a compiled (per-device) program."""

    kind: str  # all-reduce | all-gather | reduce-scatter | ...
    name: str  # the HLO instruction name
    shapes: tuple[tuple[str, tuple[int, ...]], ...]  # (dtype, dims) of each result array
    bytes: int  # result bytes on one device (summed over a combined/tuple op)
    group_size: int | None  # devices taking part in each group, where the HLO says
    op_name: str = ""  # the jax op it came from (metadata), if recorded
    # Executions per step: the product of the known trip counts of the while loops around it (a scanned layer
    # stack's per-layer gradient all-reduce runs once per layer; a loop of unknown trip count counts once).
    runs: int = 1

    @property
    def step_bytes(self) -> int:
        """Result bytes over one step: `bytes` x `runs`."""
        return self.bytes * self.runs


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


def _runs_per_computation(hlo_text: str) -> dict[str, int]:
    """{computation: executions per run of the entry computation}: a while body runs its loop's known trip count
    times per execution of the computation holding the loop (nested loops multiply); other callees once."""
    calls: dict[str, list[tuple[str, int]]] = {}  # callee -> [(caller, factor)]
    entry, current = None, None
    for line in hlo_text.splitlines():
        if line and not line[0].isspace():
            m = _COMPUTATION.match(line)
            if m and line.rstrip().endswith("{"):
                current = m["name"]
                entry = current if line.startswith("ENTRY") else entry
            continue
        if current is None or "=" not in line:
            continue
        trips = _TRIP_COUNT.search(line)
        for m in _CALLEE.finditer(line):
            factor = int(trips.group(1)) if trips and m["how"] in ("body", "condition") else 1
            calls.setdefault(m["name"], []).append((current, factor))
        for m in _BRANCHES.finditer(line):
            for name in m.group(1).split(","):
                calls.setdefault(name.strip().lstrip("%"), []).append((current, 1))

    memo: dict[str, int] = {}

    def runs(name: str, depth: int = 0) -> int:
        if name == entry or name not in calls or depth > 64:
            return 1
        if name not in memo:
            memo[name] = sum(runs(caller, depth + 1) * factor for caller, factor in calls[name])
        return memo[name]

    return {name: runs(name) for name in calls} | ({entry: 1} if entry else {})


def parse_collectives(hlo_text: str) -> list[Collective]:
    """Collectives in compiled HLO text, one entry per instruction (`-done` halves skipped), each with the
    number of times it runs per step (`runs`, from the known trip counts of the loops around it)."""
    out = []
    runs = _runs_per_computation(hlo_text)
    current = None
    for line in hlo_text.splitlines():
        if line and not line[0].isspace():
            head = _COMPUTATION.match(line)
            current = head["name"] if head and line.rstrip().endswith("{") else current
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
            op_name=op_name.group(1) if op_name else "", runs=runs.get(current, 1),
        ))
    return out


def summarize_collectives(collectives: Iterable[Collective]) -> dict[str, dict[str, int]]:
    """{kind: {"count": instructions, "runs": executions per step, "arrays": result arrays of the instructions,
    "bytes": result bytes per step (each instruction's times its runs)}}."""
    out: dict[str, dict[str, int]] = {}
    for c in collectives:
        s = out.setdefault(c.kind, {"count": 0, "runs": 0, "arrays": 0, "bytes": 0})
        s["count"] += 1
        s["runs"] += c.runs
        s["arrays"] += len(c.shapes)
        s["bytes"] += c.step_bytes
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
    virtual_stages: int = 1  # layer groups per stage (1 = GPipe, more = interleaved)
    sequence_parts: int = 1  # sequence-parallel split of the positions (mesh axis `sequence`)

    @property
    def bubble_fraction(self) -> float:
        """Idle fraction of each stage's time in the pipeline schedule (0 without a pipeline)."""
        return pipeline.bubble_fraction(self.stages, self.microbatches, self.virtual_stages)

    @property
    def state_bytes(self) -> int:
        return self.param_bytes + self.opt_bytes

    @property
    def peak_bytes(self) -> int | None:
        """Arguments + outputs not aliased onto them + temporaries: the step's device-memory high mark."""
        return peak_bytes(self.argument_bytes, self.output_bytes, self.alias_bytes, self.temp_bytes)

    @property
    def collective_bytes(self) -> int:
        """Result bytes of every collective over one step (one inside a scanned loop counts once per trip)."""
        return sum(c.step_bytes for c in self.collectives)

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
            rows.insert(2, ("pipeline", f"{self.stages} stages x {self.microbatches} microbatches "
                                        f"({pipeline.schedule_name(self.virtual_stages)}), "
                                        f"bubble {self.bubble_fraction:.1%}"))
        if self.sequence_parts > 1:
            rows.insert(2, ("sequence", f"{self.sequence_parts}-way ring attention, "
                                        f"{self.seq_len // self.sequence_parts} positions per device"))
        width = max(len(k) for k, _ in rows)
        lines = [f"{k:<{width}}  {v}" for k, v in rows]
        summary = self.collective_summary()
        if summary:
            lines.append("")
            lines.append(f"{'collective':<20}{'ops':>6}{'runs':>6}{'arrays':>8}{'bytes':>14}")
            for kind, s in sorted(summary.items()):
                lines.append(f"{kind:<20}{s['count']:>6}{s['runs']:>6}{s['arrays']:>8}{fmt_bytes(s['bytes']):>14}")
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
    optim: training.OptimizerConfig,
    mesh: Mesh,
    rules: sharding.Rules,
    *,
    batch: int,
    seq_len: int,
    src_len: int | None = None,
    batch_shapes: dict | None = None,
    microbatches: int | None = None,
    virtual_stages: int = 1,
    lora: LoraConfig | None = None,
) -> Plan:
    """Compile (never run) one train step on `mesh` under `rules`; see the module docstring.

    `microbatches`: the pipeline's count on a mesh with a `stage` axis (default 2 x stages);
    `virtual_stages`: layer groups per stage (1 = GPipe, more = the interleaved schedule).
    `lora`: a `tformer.lora.LoraConfig`: plan the step that trains adapters only.
    """
    rules = sharding.rules_for(rules)
    sharding.check_divisibility(cfg, mesh, rules, batch, seq_len=seq_len, microbatches=microbatches,
                           virtual_stages=virtual_stages)
    graphdef, abstract = training.abstract_model(model_cls, cfg)
    tx = training.make_optimizer(optim, abstract, lora)
    state_sh = training.state_shardings(model_cls, cfg, tx, mesh, rules, lora)
    abstract_state = training.abstract_train_state(abstract, tx, lora)
    params = abstract_state.params
    shapes = batch_shapes if batch_shapes is not None else batch_lib.abstract_batch(cfg.task, batch, seq_len, src_len)
    batch_sh = training.batch_sharding(mesh, rules, shapes)

    def with_sharding(a: jax.ShapeDtypeStruct, s: NamedSharding) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)

    state_in = jax.tree.map(with_sharding, abstract_state, state_sh)
    batch_in = jax.tree.map(with_sharding, shapes, batch_sh)
    step = training.make_train_step(graphdef, tx, optim, mesh=mesh, rules=rules, state_sharding=state_sh,
                              batch_sharding=batch_sh, microbatches=microbatches, virtual_stages=virtual_stages)
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
        virtual_stages=virtual_stages,
        sequence_parts=sharding.axis_size(mesh, "sequence"),
    )


# ---------------------------------------------------------------------------
# Planning for a platform that is not here: lower (never compile) for it.

PLATFORM_NAMES = {"tpu": "tpu", "gpu": "cuda", "cuda": "cuda", "cpu": "cpu"}  # --plan_platform -> lowering platform
KERNEL_CALLS = {"tpu_custom_call": "Pallas TPU (Mosaic)", "__gpu$xla.gpu.triton": "Pallas GPU (Triton)",
                "__cudnn$fmha": "cuDNN flash attention"}
_TENSOR = re.compile(r"tensor<((?:\d+x)+)([a-z][a-z0-9]*)>")
_HLO_BYTES = {"i1": 1, "i8": 1, "ui8": 1, "i16": 2, "i32": 4, "ui32": 4, "i64": 8, "bf16": 2, "f16": 2, "f32": 4,
              "f64": 8}


def largest_tensor(stablehlo_text: str) -> tuple[str, int]:
    """(type, bytes) of the largest ranked tensor type in a lowered program's StableHLO text."""
    best = ("none", 0)
    for dims, dtype in _TENSOR.findall(stablehlo_text):
        shape = tuple(int(d) for d in dims.rstrip("x").split("x"))
        size = math.prod(shape) * _HLO_BYTES.get(dtype, 4)
        if size > best[1]:
            best = (f"{dtype}[{','.join(map(str, shape))}]", size)
    return best


_DEFINES = re.compile(r'^\s*%[\w#:]+\s*=\s*"?([\w.]+)')
_FORWARDING_OPS = ("stablehlo.case", "stablehlo.if", "stablehlo.while", "call", "func.call",
                   "stablehlo.optimization_barrier")
_SCALAR_FILL = re.compile(r"stablehlo\.broadcast_in_dim %\w+, dims = \[\] : \(tensor<[a-z0-9]+>\)")


def score_tensors(stablehlo_text: str, tq: int, tk: int) -> set[str]:
    """Tensor types of rank >= 3 ending in [.., tq, tk] that the program computes: dense attention scores,
    probabilities or masks.

    Not counted: values an op only forwards (case / call / while results) and scalar fills. Under
    differentiation a `platform_dependent` branch that is not taken still returns the residuals the other
    branches save, as zero fills; nothing reads them and XLA removes them when it compiles.
    """
    pat = re.compile(rf"tensor<((?:\d+x){{1,}}){tq}x{tk}x([a-z][a-z0-9]*)>")
    found = set()
    for line in stablehlo_text.splitlines():
        op = _DEFINES.match(line)
        if op is None or op.group(1) in _FORWARDING_OPS or _SCALAR_FILL.search(line):
            continue
        found |= {f"{m.group(2)}[{m.group(1)}{tq}x{tk}]" for m in pat.finditer(line)}
    return found


def kernel_calls(stablehlo_text: str) -> dict[str, int]:
    """{fused-kernel custom call target: count} in a lowered program's StableHLO text."""
    counts = {name: stablehlo_text.count(f"@{name}(") for name in KERNEL_CALLS}
    return {name: n for name, n in counts.items() if n}


@dataclasses.dataclass
class AttentionLine:
    """One distinct attention call of a lowered program, as the target platform runs it."""

    program: str  # train | prefill | decode
    call: Any  # tformer.flash.AttentionCall
    impl: str
    temp: tuple[str, int]  # largest tensor of the call lowered alone (forward, + backward for train)


@dataclasses.dataclass
class PlatformPlan:
    """What a config's train step, prefill and decode step run on `platform`, from programs lowered for it."""

    platform: str
    lines: list[AttentionLine]
    kernel_calls: dict[str, dict[str, int]]  # program -> {custom call target: count}
    score_tensors: dict[str, set[str]]  # program -> [.., T, T] tensor types

    def table(self) -> str:
        from tformer import flash

        rows = [f"{'program':<8} {'attention':<20} {'queries x keys':<15} {'kernel / path':<48} "
                f"largest attention temporary"]
        for ln in self.lines:
            shape = f"{ln.call.q_shape[1]} x {ln.call.k_shape[1]}"
            rows.append(f"{ln.program:<8} {ln.call.kind:<20} {shape:<15} {flash.describe(self.platform, ln.impl):<48} "
                        f"{ln.temp[0]} ({fmt_bytes(ln.temp[1])})")
        for prog, calls in self.kernel_calls.items():
            found = ", ".join(f"{KERNEL_CALLS[k]} x{n}" for k, n in calls.items()) or "none"
            scores = ", ".join(sorted(self.score_tensors[prog])) or "none"
            rows.append(f"{prog}: fused-kernel custom calls: {found}; [.., T, T] score tensors: {scores}")
        if self.platform == "cuda":
            rows.append("(cuda: a GPU present while tracing takes cuDNN for plain causal rows; without one, and for "
                        "packed / padded rows, the Pallas Triton kernel)")
        return "\n".join(rows)


def _lower_text(fn, platform: str, *args) -> str:
    """StableHLO of `fn` lowered for `platform`; traced afresh (a new function, so no cached trace skips
    the attention calls' recording)."""
    return jax.jit(lambda *a: fn(*a)).trace(*args).lower(lowering_platforms=(platform,)).as_text()


def _attention_alone(call, platform: str, grads: bool) -> tuple[str, int]:
    """Largest tensor of one recorded attention call lowered alone for `platform` (its own implementation)."""
    from tformer.attention import Masking, _attend_with

    b, tq = call.q_shape[:2]
    tk = call.k_shape[1]
    sds = jax.ShapeDtypeStruct
    q, k = sds(call.q_shape, call.dtype), sds(call.k_shape, call.dtype)
    pos = (sds((b, tq), np.int32), sds((b, tk), np.int32))
    q_seg, k_seg, same = call.seg_shapes
    segs = tuple(None if s is None else sds(s, np.int32) for s in (q_seg, k_seg))
    impl = call.impl(platform)

    def attend(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array, k_pos: jax.Array,
               q_seg: jax.Array | None, k_seg: jax.Array | None) -> jax.Array:
        masking = Masking(q_pos, k_pos, k_seg if same else q_seg, k_seg, call.causal, call.window, call.plain_causal)
        rng = jax.random.key(0) if call.rate > 0 else None
        offset = 0 if call.cache else None
        return _attend_with(impl, q, k, v, masking, call.rate, rng, call.topk, call.threshold, offset)

    def fwd_bwd(q: jax.Array, k: jax.Array, v: jax.Array, *masks: jax.Array | None
                ) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        out, vjp = jax.vjp(lambda q, k, v: attend(q, k, v, *masks), q, k, v)
        return out, vjp(out)

    return largest_tensor(_lower_text(fwd_bwd if grads else attend, platform, q, k, k, *pos, *segs))


def _programs(model_cls, cfg: ModelConfig, optim, batch: int, seq_len: int, src_len: int | None):
    """(name, fn, abstract args) for the train step, a prefill and one decode step (no mesh: one device)."""
    from flax import nnx

    graphdef, abstract = training.abstract_model(model_cls, cfg)
    tx = training.make_optimizer(optim, abstract)
    step = training.make_train_step(graphdef, tx, optim, donate=False)
    state = training.abstract_train_state(abstract, tx)
    shapes = batch_lib.abstract_batch(cfg.task, batch, seq_len, src_len)
    seq2seq = cfg.task == "seq2seq"
    prompt = 1 if seq2seq else max(1, seq_len // 2)  # an encoder-decoder prefills BOS after encoding the source
    ints = functools.partial(jax.ShapeDtypeStruct, dtype=np.int32)
    src = ints((batch, src_len or seq_len)) if seq2seq else None

    def prefill(model_state: nnx.State, tokens: jax.Array, src: jax.Array | None) -> tuple[jax.Array, KVCache]:
        model = nnx.merge(graphdef, model_state)
        cache = model.init_cache(src, seq_len) if seq2seq else model.init_cache(batch, seq_len)
        return model.extend(tokens, cache)

    def decode(model_state: nnx.State, token: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
        return nnx.merge(graphdef, model_state).extend(token, cache)

    model_state = nnx.state(nnx.eval_shape(lambda: model_cls(cfg, rngs=nnx.Rngs(0))))
    cache = jax.eval_shape(prefill, model_state, ints((batch, prompt)), src)[1]
    return [("train", step, (state, shapes)), ("prefill", prefill, (model_state, ints((batch, prompt)), src)),
            ("decode", decode, (model_state, ints((batch, 1)), cache))]


def plan_platform(model_cls: type[nnx.Module], cfg: ModelConfig, optim: training.OptimizerConfig, platform: str, *,
                  batch: int, seq_len: int, src_len: int | None = None,
                  programs: tuple[str, ...] = ("train", "prefill", "decode")) -> PlatformPlan:
    """Lower (never compile: that needs the target backend) the train step, a prefill of seq_len / 2 prompt
    tokens (an encoder-decoder: the source, then BOS) into a seq_len cache and one decode step for
    `platform` ("tpu", "gpu" or "cpu"); report per distinct attention call the implementation the platform
    runs and the largest tensor of that call lowered alone, and per program the fused-kernel custom calls
    and any [.., T, T] score tensor in the StableHLO. Works on a CPU-only machine. `programs`: which of
    train, prefill, decode to lower."""
    from tformer import flash

    if platform not in PLATFORM_NAMES:
        raise ValueError(f"unknown platform {platform!r}; choose one of tpu, gpu, cpu")
    target = PLATFORM_NAMES[platform]
    lines, calls_by_prog, scores = [], {}, {}
    for name, fn, args in _programs(model_cls, cfg, optim, batch, seq_len, src_len):
        if name not in programs:
            continue
        with flash.record_calls() as calls:
            text = _lower_text(fn, target, *args)
        calls_by_prog[name] = kernel_calls(text)
        # At T = 128 on TPU the splash kernel's own lane-wide tensors ([.., T, 128] segment ids and softmax
        # statistics) have the score shape, so that length is not searched.
        lens = {(c.q_shape[1], c.k_shape[1]) for c in calls
                if c.q_shape[1] > 1 and not (target == "tpu" and c.k_shape[1] == flash.LANES)}
        scores[name] = set().union(*(score_tensors(text, tq, tk) for tq, tk in lens)) if lens else set()
        for call in dict.fromkeys(calls):  # distinct calls, in order
            lines.append(AttentionLine(name, call, call.impl(target),
                                       _attention_alone(call, target, grads=name == "train")))
    return PlatformPlan(target, lines, calls_by_prog, scores)
