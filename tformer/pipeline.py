"""Pipeline (layer) parallelism over the `stage` mesh axis: GPipe and the interleaved (circular) schedule.

The stacked blocks (leading `layers` axis, L layers) are cut into S x V
groups of L / (S V) consecutive layers, S = stages, V = virtual stages
(`virtual_stages`, 1 = GPipe); group g = r S + s runs on stage s (its r-th
"repeat"), so every microbatch goes round the ring of stages V times. The
global batch is cut into M microbatches. At tick t (0 <= t < V M + S - 1)
stage s works on unit u = t - s, i.e. microbatch u mod M on its repeat
u // M, when 0 <= u < V M, and passes the result to stage s + 1 (the last
stage to stage 0, for the next repeat) with one `ppermute`. Stage 0 takes a
new microbatch at ticks t < M and afterwards the last stage's output of the
previous repeat, which it has kept in a buffer of M slots (it is ready in
time when M >= S). Each stage is busy V M of the V M + S - 1 ticks: the
bubble is (S - 1) / (V M + S - 1).

The ticks run as one `lax.scan`, so the program (and its compile time) does
not grow with M. Idle ticks compute on stale data whose results are never
read, so gradients (plain `jax.grad` through `shard_map`, `scan` and
`ppermute`) are exactly those of the unpipelined model. (With dropout, each
microbatch draws its own masks: the same model in distribution, not bit for
bit.)

Placement: a stage's devices hold only its own V groups and their Adam
moments. The state stores each stack in *schedule order*: its rows cut into
S contiguous blocks of L / S (the rule `layers -> stage` splits them so),
block s holding groups s, s + S, ..., s + (V - 1) S in that order
(`to_schedule_order`); the step views a stack as [S, V, L / (S V)] with the
S axis on `stage`, so no layer weight moves between stages. For V = 1 the
two orders coincide. Everything outside the train state sees model order:
`tformer.training.create_train_state(virtual_stages=V)` is the one way in
(fresh or given weights, permuted once) and `to_model_order` the one way
out (checkpoints, unpipelined evaluation, decoding, export; see
`training.model_order_state`), so a checkpoint is the same whatever the mesh.

Only `stage` is manual inside the `shard_map`; `data`, `fsdp`, `tensor` and
`sequence` stay automatic, so the rule table's other splits (and ring
attention, itself a `shard_map` over `sequence`) compose unchanged. The
embedding runs outside the pipeline (replicated over `stage`); the output
head and the loss too, with the batch rows split over `stage` as well, so
each stage computes 1 / S of the logits.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from tformer import families, sharding
from tformer.attention import Masking, self_masking
from tformer.layers import dropout, fold
from tformer.models import DecoderLM, EncoderDecoder, Stack, check_tokens, positions_or_default, run_layers

AXIS = "stage"


def num_stages(mesh: Mesh | None) -> int:
    return sharding.axis_size(mesh, AXIS)


def resolve_microbatches(mesh: Mesh | None, microbatches: int | None) -> int:
    """The microbatch count: the given one, or 2 x stages by default (0 / None)."""
    return microbatches if microbatches else 2 * num_stages(mesh)


def bubble_fraction(stages: int, microbatches: int, virtual_stages: int = 1) -> float:
    """Idle fraction of each stage's time: (S - 1) / (V M + S - 1) (V = 1: GPipe's fill-drain)."""
    return (stages - 1) / (virtual_stages * microbatches + stages - 1)


def schedule_unit(t, stage, microbatches: int, virtual_stages: int = 1) -> tuple:
    """What `stage` computes at tick `t`: (microbatch, repeat, busy).

    Unit u = t - stage is microbatch u mod M on repeat u // M (layer group repeat x S + stage); the stage is
    busy when 0 <= u < V M (otherwise its result is stale and never read). `t` and `stage` may be Python
    ints or traced arrays: `run_blocks`' scan calls it, and so does `schedule_table`.
    """
    u = t - stage
    busy = (u >= 0) & (u < virtual_stages * microbatches)
    return u % microbatches, jnp.clip(u // microbatches, 0, virtual_stages - 1), busy


def schedule_table(stages: int, microbatches: int, virtual_stages: int = 1) -> list[list[tuple[int, int] | None]]:
    """table[tick][stage] = (microbatch, layer group) that stage runs at that tick, None when idle: the
    ticks of `run_blocks`, V M + S - 1 of them (for a diagram; each stage is busy V M ticks)."""
    table = []
    for t in range(virtual_stages * microbatches + stages - 1):
        row = []
        for s in range(stages):
            i, r, busy = schedule_unit(t, s, microbatches, virtual_stages)
            row.append((int(i), int(r) * stages + s) if bool(busy) else None)
        table.append(row)
    return table


def schedule_name(virtual_stages: int) -> str:
    return "GPipe" if virtual_stages == 1 else f"interleaved, {virtual_stages} virtual stages"


def check_schedule(num_layers: int, stages: int, microbatches: int, virtual_stages: int,
                   field: str = "num_layers") -> None:
    """Fail before tracing, naming the field, when the schedule cannot run (see module docstring)."""
    if virtual_stages < 1:
        raise ValueError(f"mesh.virtual_stages={virtual_stages} must be >= 1 (1 = GPipe)")
    groups = stages * virtual_stages
    if num_layers % groups:
        valid = [v for v in range(1, num_layers + 1) if num_layers % (stages * v) == 0]
        raise ValueError(f"ModelConfig.{field}={num_layers} is not divisible by mesh.stage={stages} x "
                         f"mesh.virtual_stages={virtual_stages}; valid virtual_stages here are {valid}")
    if virtual_stages > 1 and microbatches < stages:
        raise ValueError(f"mesh.microbatches={microbatches} < mesh.stage={stages}: the interleaved schedule "
                         f"(mesh.virtual_stages={virtual_stages}) needs at least one microbatch per stage, so a "
                         "microbatch's next repeat finds stage 0 free; raise microbatches or set virtual_stages=1")


def schedule_permutation(num_layers: int, stages: int, virtual_stages: int) -> np.ndarray:
    """Row j of a stack in schedule order holds model layer `perm[j]`.

    Model layer (r S + s) P + k (group r S + s, P = L / (S V) layers a group)
    sits at row (s V + r) P + k: stage s's contiguous block of L / S rows is
    its groups s, s + S, ... in the order its repeats run them.
    """
    if num_layers % (stages * virtual_stages):
        raise ValueError(f"a stack of {num_layers} layers does not split into mesh.stage={stages} x "
                         f"mesh.virtual_stages={virtual_stages} groups; use a model whose layers they divide")
    model_rsk = np.arange(num_layers).reshape(virtual_stages, stages, -1)
    return model_rsk.transpose(1, 0, 2).reshape(-1)


def _reorder(tree, stages: int, virtual_stages: int, inverse: bool):
    if stages == 1 or virtual_stages == 1:
        return tree  # the two orders coincide

    def one(path: tuple, a):
        if not any(isinstance(k, jax.tree_util.DictKey) and k.key == "layers" for k in path):
            return a
        perm = schedule_permutation(a.shape[0], stages, virtual_stages)
        return a[np.argsort(perm) if inverse else perm]

    return jax.tree_util.tree_map_with_path(one, tree)


def schedule_order(tree, stages: int, virtual_stages: int):
    """`tree` (params, a TrainState, a LoRA tree, optimizer state) with every stacked-layer array put from
    model order into the schedule order of (stages, virtual_stages).

    Stacked-layer arrays are the leaves under a `layers` key (a `Stack`'s
    blocks; Adam's moments and LoRA adapters mirror those paths); the rest is
    returned as is. Works on numpy and jax arrays, inside or outside jit.
    """
    return _reorder(tree, stages, virtual_stages, inverse=False)


def model_order(tree, stages: int, virtual_stages: int):
    """Inverse of `schedule_order`: stacked-layer arrays back in model order."""
    return _reorder(tree, stages, virtual_stages, inverse=True)


def _split_microbatches(a: jax.Array, m: int) -> jax.Array:
    """[B, ...] -> [M, B / M, ...] with microbatch i = rows i, i + M, i + 2M, ...

    Row r = j * M + i goes to (i, j): each device's contiguous slice of the
    batch (the data axes split rows) holds a slice of every microbatch, so
    the split moves nothing between devices.
    """
    return jnp.swapaxes(a.reshape((a.shape[0] // m, m) + a.shape[1:]), 0, 1)


def _merge_microbatches(a: jax.Array) -> jax.Array:
    """Inverse of `_split_microbatches`."""
    a = jnp.swapaxes(a, 0, 1)
    return a.reshape((a.shape[0] * a.shape[1],) + a.shape[2:])


# A layer call for microbatch i: (block, x, side inputs of microbatch i, rng) -> x.
LayerFn = Callable[[nnx.Module, jax.Array, dict, jax.Array | None], jax.Array]


def run_blocks(stack: Stack, x_mbtd: jax.Array, side: dict, layer_fn: LayerFn, *, mesh: Mesh,
               rng: jax.Array | None = None, virtual_stages: int = 1) -> jax.Array:
    """`stack`'s layers as the pipeline schedule: [M, b, T, D] microbatches in, same shape out.

    `side`: per-microbatch inputs of the layers ([M, ...] arrays: positions,
    segment ids, an encoder's output), replicated over `stage`; microbatch i's
    slice goes to `layer_fn`. Float inputs cross the `shard_map` boundary in
    fp32: replicated over stages, their gradient is an all-reduce over them,
    which XLA:CPU fails to compile in bf16 ("Invalid binary instruction opcode
    copy"); they are cast back inside.
    """
    stages, v, m = num_stages(mesh), virtual_stages, x_mbtd.shape[0]
    check_schedule(stack.n, stages, m, v)
    per_group = stack.n // (stages * v)
    graphdef, state = nnx.split(stack.layers)
    # Schedule order [L, ...] -> [S, V, L / (S V), ...]: group r S + s at [s, r]; the S axis is the stored
    # split over `stage`, so the view moves nothing.
    groups = jax.tree.map(lambda a: a.reshape((stages, v, per_group) + a.shape[1:]), state)
    dtypes = jax.tree.map(lambda a: a.dtype, (x_mbtd, side))
    to_f32 = jax.tree.map(lambda a: a.astype(jnp.float32) if jnp.issubdtype(a.dtype, jnp.floating) else a,
                          (x_mbtd, side))

    def stage_program(groups: nnx.State, inputs: tuple[jax.Array, dict]) -> jax.Array:
        x_all, side = jax.tree.map(lambda a, d: a.astype(d), inputs, dtypes)
        s = jax.lax.axis_index(AXIS)
        ring = [(i, (i + 1) % stages) for i in range(stages)]

        def tick(carry: tuple[jax.Array, jax.Array, jax.Array], t: jax.Array
                 ) -> tuple[tuple[jax.Array, jax.Array, jax.Array], None]:
            incoming, buf, out = carry
            i, r, _ = schedule_unit(t, s, m, v)  # this stage's microbatch and repeat (idle: stale, never read)
            first = jnp.where(t < m, x_all[jnp.minimum(t, m - 1)], buf[i])  # stage 0: new, or a next repeat
            x = jnp.where(s == 0, first, incoming)
            group = jax.tree.map(lambda a: a[0, r], groups)
            side_i = jax.tree.map(lambda a: a[i], side)
            y = run_layers(graphdef, group, x, lambda blk, x, rr: layer_fn(blk, x, side_i, rr), stack.cfg,
                           fold(rng, i), first_layer=(r * stages + s) * per_group)
            # The last stage's final repeat writes microbatch i's output last: earlier writes are overwritten.
            out = jax.lax.dynamic_update_index_in_dim(out, y, i, 0)
            sent = jax.lax.ppermute(y, AXIS, ring)
            # Stage 0 files the last stage's output of unit t - (S - 1); it is read at that unit + M >= t + 1.
            buf = jax.lax.dynamic_update_index_in_dim(buf, sent, (t - stages + 1) % m, 0)
            return (sent, buf, out), None

        zeros = jnp.zeros_like(x_all)
        carry = (zeros[0], zeros, zeros)
        (_, _, out), _ = jax.lax.scan(tick, carry, jnp.arange(v * m + stages - 1))
        return out.astype(jnp.float32)[None]

    run = jax.shard_map(stage_program, mesh=mesh, in_specs=(P(AXIS), P()), out_specs=P(AXIS),
                        axis_names=frozenset({AXIS}), check_vma=False)
    return run(groups, to_f32)[stages - 1].astype(x_mbtd.dtype)


def logits_and_targets(model: nnx.Module, batch: dict, dropout_rng: jax.Array | None = None, *, mesh: Mesh,
                       microbatches: int | None = None, virtual_stages: int = 1
                       ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`tformer.batch.logits_and_targets` with the blocks run as a pipeline (both stacks of an EncoderDecoder)."""
    family = families.of_model(model)
    if "stage" not in family.mesh_axes:
        pipelined = ", ".join(f.model_class.__name__ for f in families.FAMILIES.values() if "stage" in f.mesh_axes)
        raise ValueError(f"pipeline parallelism (mesh.stage={num_stages(mesh)}) supports {pipelined} only, not "
                         f"{type(model).__name__}; use mesh.stage=1 (data / fsdp / tensor / sequence) for it")
    m = resolve_microbatches(mesh, microbatches)
    if family.task == "seq2seq":
        logits = encoder_decoder_logits(model, batch["src"], batch["tgt_inputs"],
                                        src_segment_ids=batch.get("src_segment_ids"),
                                        tgt_segment_ids=batch.get("tgt_segment_ids"), dropout_rng=dropout_rng,
                                        mesh=mesh, microbatches=m, virtual_stages=virtual_stages)
        return logits, batch["tgt_targets"], batch["tgt_weights"]
    logits = decoder_logits(model, batch["inputs"], positions=batch.get("positions"),
                            segment_ids=batch.get("segment_ids"), dropout_rng=dropout_rng, mesh=mesh,
                            microbatches=m, virtual_stages=virtual_stages)
    weights = batch.get("weights")
    return logits, batch["targets"], jnp.ones(batch["targets"].shape, jnp.float32) if weights is None else weights


def _check_batch(b: int, microbatches: int) -> None:
    if b % microbatches:
        raise ValueError(f"batch size {b} is not divisible by mesh.microbatches={microbatches}")


def decoder_logits(model: DecoderLM, tokens_bt: jax.Array, *, positions: jax.Array | None = None,
                   segment_ids: jax.Array | None = None, dropout_rng: jax.Array | None = None,
                   mesh: Mesh, microbatches: int, virtual_stages: int = 1) -> jax.Array:
    """`DecoderLM.__call__` with the blocks run as a pipeline over `mesh`'s `stage` axis."""
    cfg = model.cfg
    check_tokens(tokens_bt, cfg)
    _check_batch(tokens_bt.shape[0], microbatches)
    check_schedule(cfg.num_layers, num_stages(mesh), microbatches, virtual_stages)
    pos = positions_or_default(tokens_bt, positions)
    x = dropout(model.embed.encode(tokens_bt, pos), cfg.dropout, fold(dropout_rng, 0))
    split = _split_microbatches
    side = {"pos": split(pos, microbatches)}
    if segment_ids is not None:
        side["seg"] = split(segment_ids, microbatches)
    plain = positions is None

    def layer_fn(blk: nnx.Module, x: jax.Array, side_i: dict, rng: jax.Array | None) -> jax.Array:
        masking = self_masking(side_i["pos"], side_i.get("seg"), cfg, causal=True, default_positions=plain)
        return blk(x, masking, rng=rng)

    y = run_blocks(model.blocks, split(x, microbatches), side, layer_fn, mesh=mesh, rng=fold(dropout_rng, 1),
                   virtual_stages=virtual_stages)
    return _head(model, y, mesh)


def encoder_decoder_logits(model: EncoderDecoder, src_bs: jax.Array, tgt_inputs_bt: jax.Array, *,
                           src_segment_ids: jax.Array | None = None, tgt_segment_ids: jax.Array | None = None,
                           dropout_rng: jax.Array | None = None, mesh: Mesh, microbatches: int,
                           virtual_stages: int = 1) -> jax.Array:
    """`EncoderDecoder.__call__` with both stacks run as pipelines: the encoder's layers over the stages, then
    the decoder's, each microbatch's encoder output feeding its cross-attention on every stage."""
    cfg = model.cfg
    check_tokens(src_bs, cfg, "src")
    check_tokens(tgt_inputs_bt, cfg, "tgt_inputs")
    _check_batch(src_bs.shape[0], microbatches)
    for field in ("num_encoder_layers", "num_layers"):
        check_schedule(getattr(cfg, field), num_stages(mesh), microbatches, virtual_stages, field)
    split, m = _split_microbatches, microbatches
    enc_rng, dec_rng = fold(dropout_rng, 0), fold(dropout_rng, 1)
    src_seg = model._src_segments(src_bs, src_segment_ids)
    src_pos = positions_or_default(src_bs, None)
    x = dropout(model.embed.encode(src_bs, src_pos), cfg.dropout, fold(enc_rng, 0))

    def encoder_fn(blk: nnx.Module, x: jax.Array, side_i: dict, rng: jax.Array | None) -> jax.Array:
        return blk(x, self_masking(side_i["pos"], side_i["seg"], cfg, causal=False), rng=rng)

    enc = run_blocks(model.encoder, split(x, m), {"pos": split(src_pos, m), "seg": split(src_seg, m)}, encoder_fn,
                     mesh=mesh, rng=fold(enc_rng, 1), virtual_stages=virtual_stages)
    if cfg.norm_placement == "pre" and cfg.final_norm:
        enc = model.encoder_norm(enc)
    pos = positions_or_default(tgt_inputs_bt, None)
    side = {"pos": split(pos, m), "enc": enc, "src_seg": split(src_seg, m)}
    if tgt_segment_ids is not None:
        side["seg"] = split(tgt_segment_ids, m)

    def decoder_fn(blk: nnx.Module, x: jax.Array, side_i: dict, rng: jax.Array | None) -> jax.Array:
        masking = self_masking(side_i["pos"], side_i.get("seg"), cfg, causal=True)
        cross = Masking(q_pos=side_i["pos"], k_pos=jnp.zeros_like(side_i["src_seg"]), q_seg=side_i.get("seg"),
                        k_seg=side_i["src_seg"], causal=False)
        return blk(x, masking, enc_bsd=side_i["enc"], cross_masking=cross, rng=rng)

    x = dropout(model.embed.encode(tgt_inputs_bt, pos), cfg.dropout, fold(dec_rng, 0))
    y = run_blocks(model.decoder, split(x, m), side, decoder_fn, mesh=mesh, rng=fold(dec_rng, 1),
                   virtual_stages=virtual_stages)
    return _head(model, y, mesh)


def _head(model, y_mbtd, mesh: Mesh):
    """The output head on the merged microbatches, its rows split over `stage` too (`_head_rules`)."""
    with sharding.use_rules(mesh, _head_rules(mesh, y_mbtd.shape[0] * y_mbtd.shape[1])):
        return model._head(_merge_microbatches(y_mbtd))


def _head_rules(mesh: Mesh, batch: int):
    """The active rules with the batch also split over `stage` (when it divides).

    The output head (the largest matmul of a small model, and its logits the
    largest activation) would otherwise run on the whole batch on every
    stage; split by rows, each stage does 1 / S of it.
    """
    _, rules = sharding.active()
    if rules is None:
        return None
    axes = sharding.logical_to_spec(("batch",), rules, mesh)[0]
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    parts = math.prod(mesh.shape[a] for a in axes) * num_stages(mesh)
    return rules if batch % parts else {**rules, "batch": axes + (AXIS,)}

