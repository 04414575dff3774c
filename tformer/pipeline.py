"""Pipeline (layer) parallelism: a GPipe fill-drain schedule over the `stage` mesh axis.

The stacked decoder blocks (leading `layers` axis, split over `stage` by the
rule `layers -> stage`) form `S` contiguous groups of `L / S` layers; stage
`s` holds only its group's weights (and so only their Adam moments). The
global batch is cut into `M` microbatches. At tick `t` (0 <= t < M + S - 1)
stage `s` runs its layers on microbatch `t - s` (when 0 <= t - s < M) and
passes the result to stage `s + 1` with one `ppermute`; stage 0 reads the
embedded microbatches, the last stage's outputs go to the head. Idle ticks
(the bubble, a fraction (S - 1) / (M + S - 1) of each stage's time) compute on
zeros and their results are discarded, so gradients (plain `jax.grad`
through `shard_map`, `scan` and `ppermute`) are exactly those of the
unpipelined model. (With dropout, each microbatch draws its own masks, so
the pipelined model is the same in distribution, not bit for bit.)

Only the `stage` axis is manual inside the `shard_map`; `data`, `fsdp` and
`tensor` stay automatic, so the rule table's other splits compose unchanged.
The embedding runs outside the pipeline on every stage (replicated over
`stage`); the output head and the loss run outside it too, with the batch
rows split over `stage` as well, so each stage computes 1 / S of the logits.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from tformer import families
from tformer import sharding as shd
from tformer.attention import Masking, self_masking
from tformer.layers import dropout, fold
from tformer.models import _REMAT, _default_positions, check_tokens

AXIS = "stage"


def num_stages(mesh: Mesh | None) -> int:
    return shd.axis_size(mesh, AXIS)


def resolve_microbatches(mesh: Mesh | None, microbatches: int | None) -> int:
    """The microbatch count: the given one, or 2 x stages by default (0 / None)."""
    return microbatches if microbatches else 2 * num_stages(mesh)


def bubble_fraction(stages: int, microbatches: int) -> float:
    """Idle fraction of each stage's time in a GPipe fill-drain schedule: (S - 1) / (M + S - 1)."""
    return (stages - 1) / (microbatches + stages - 1)


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


def _stage_layers(graphdef, state, x, masking: Masking, first_layer, cfg, rng):
    """This stage's L / S blocks on one microbatch (scanned, or unrolled like `Stack`)."""

    def body(x, inp):
        layer_state, i = inp
        return nnx.merge(graphdef, layer_state)(x, masking, rng=fold(rng, i)), None

    if cfg.remat != "none":
        body = jax.checkpoint(body, policy=_REMAT[cfg.remat], prevent_cse=not cfg.scan_layers)
    n = jax.tree.leaves(state)[0].shape[0]
    layer_ids = first_layer + jnp.arange(n)
    if cfg.scan_layers:
        return jax.lax.scan(body, x, (state, layer_ids))[0]
    for i in range(n):
        x, _ = body(x, (jax.tree.map(lambda a, i=i: a[i], state), layer_ids[i]))
    return x


def _fetch(x_local, t: int, chunk: int):
    """Stage 0's input at tick t < M (garbage on the other stages, which read their carry)."""
    owner, i = divmod(t, chunk)
    return x_local[i] if owner == 0 else jax.lax.ppermute(x_local[i], AXIS, [(owner, 0)])


def _deliver(outs: list, s, stages: int, chunk: int | None):
    """The last stage's outputs, microbatch block k to stage k (receivers of nothing get zeros); with no
    `chunk` (S does not divide M), every output stacked, to be read from the last stage."""
    if chunk is None:
        return jnp.stack(outs).astype(jnp.float32)[None]
    blocks = [jnp.stack(outs[k * chunk:(k + 1) * chunk]) for k in range(stages)]
    mine = jnp.where(s == stages - 1, blocks[-1], 0)
    for k in range(stages - 1):
        mine = mine + jax.lax.ppermute(blocks[k], AXIS, [(stages - 1, k)])
    return mine


def run_blocks(stack, x_mbtd, pos_mbt, seg_mbt, *, mesh: Mesh, default_positions: bool, rng=None):
    """The GPipe schedule over `stack`'s layers: [M, b, T, D] microbatches in, same shape out.

    When S divides M, microbatches [k M / S, (k + 1) M / S) enter and leave on
    stage k (in and out split over `stage`): stage 0 fetches each input with
    one collective-permute and the last stage hands each output block back
    with one, so the head that follows runs split over stages. Otherwise the
    inputs and outputs are replicated over `stage` (an all-reduce / all-gather).
    """
    cfg = stack.cfg
    graphdef, state = nnx.split(stack.layers)
    stages, m = num_stages(mesh), x_mbtd.shape[0]
    per_stage = stack.n // stages
    forward = [(i, i + 1) for i in range(stages - 1)]
    spread = m % stages == 0
    chunk = m // stages if spread else m
    dtype = x_mbtd.dtype

    def stage_program(state, x_local, masks):
        x_local = x_local.astype(dtype)
        pos_mbt, seg_mbt = masks["pos"], masks.get("seg")
        s = jax.lax.axis_index(AXIS)
        carry = jnp.zeros_like(x_local[0])
        outs = []
        for t in range(m + stages - 1):  # static: each tick's collective-permute shows in the HLO
            mb = jnp.clip(t - s, 0, m - 1)  # the microbatch this stage works on at tick t
            x = jnp.where(s == 0, _fetch(x_local, t, chunk), carry) if t < m else carry  # stage 0 idle from tick M
            seg = None if seg_mbt is None else seg_mbt[mb]
            masking = self_masking(pos_mbt[mb], seg, cfg, causal=True, default_positions=default_positions)
            y = _stage_layers(graphdef, state, x, masking, s * per_stage, cfg, fold(rng, mb))
            if t >= stages - 1:
                outs.append(y)  # meaningful on the last stage only: microbatch t - (S - 1)
            if t < m + stages - 2:
                carry = jax.lax.ppermute(y, AXIS, forward)
        return _deliver(outs, s, stages, chunk if spread else None)

    x_spec = P(AXIS) if spread else P()
    run = jax.shard_map(stage_program, mesh=mesh, in_specs=(P(AXIS), x_spec, P()), out_specs=P(AXIS),
                        axis_names=frozenset({AXIS}), check_vma=False)
    masks = {"pos": pos_mbt} if seg_mbt is None else {"pos": pos_mbt, "seg": seg_mbt}
    if spread:
        return run(state, x_mbtd, masks)
    # Replicated over stages, the input's gradient is an all-reduce over them,
    # which XLA:CPU fails to compile in bf16 ("Invalid binary instruction
    # opcode copy"): cross the boundary in fp32 (cast back inside).
    return run(state, x_mbtd.astype(jnp.float32), masks)[stages - 1].astype(dtype)


def logits_and_targets(model, batch: dict, dropout_rng=None, *, mesh: Mesh, microbatches: int | None = None):
    """`tformer.batch.logits_and_targets` with the decoder blocks run as a pipeline (DecoderLM batches only)."""
    if "stage" not in families.of_model(model).mesh_axes:
        pipelined = ", ".join(f.model_class.__name__ for f in families.FAMILIES.values() if "stage" in f.mesh_axes)
        raise ValueError(f"pipeline parallelism (mesh.stage={num_stages(mesh)}) supports {pipelined} only, not "
                         f"{type(model).__name__}; use mesh.stage=1 (data / fsdp / tensor / sequence) for it")
    logits = decoder_logits(model, batch["inputs"], positions=batch.get("positions"),
                            segment_ids=batch.get("segment_ids"), dropout_rng=dropout_rng, mesh=mesh,
                            microbatches=resolve_microbatches(mesh, microbatches))
    weights = batch.get("weights")
    return logits, batch["targets"], jnp.ones(batch["targets"].shape, jnp.float32) if weights is None else weights


def decoder_logits(model, tokens_bt, *, positions=None, segment_ids=None, dropout_rng=None,
                   mesh: Mesh, microbatches: int):
    """`DecoderLM.__call__` with the blocks run as a pipeline over `mesh`'s `stage` axis."""
    cfg = model.cfg
    check_tokens(tokens_bt, cfg)
    b = tokens_bt.shape[0]
    if b % microbatches:
        raise ValueError(f"batch size {b} is not divisible by mesh.microbatches={microbatches}")
    if cfg.num_layers % num_stages(mesh):
        raise ValueError(f"ModelConfig.num_layers={cfg.num_layers} is not divisible by "
                         f"mesh.stage={num_stages(mesh)}")
    pos = _default_positions(tokens_bt, positions)
    x = dropout(model.embed.encode(tokens_bt, pos), cfg.dropout, fold(dropout_rng, 0))
    split = _split_microbatches
    seg = None if segment_ids is None else split(segment_ids, microbatches)
    y = run_blocks(model.blocks, split(x, microbatches), split(pos, microbatches), seg, mesh=mesh,
                   default_positions=positions is None, rng=fold(dropout_rng, 1))
    with shd.use_rules(mesh, _head_rules(mesh, b)):
        return model._head(_merge_microbatches(y))


def _head_rules(mesh: Mesh, batch: int):
    """The active rules with the batch also split over `stage` (when it divides).

    The output head (the largest matmul of a small model, and its logits the
    largest activation) would otherwise run on the whole batch on every
    stage; split by rows, each stage does 1 / S of it.
    """
    _, rules = shd.active()
    if rules is None:
        return None
    axes = shd.logical_to_spec(("batch",), rules, mesh)[0]
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    parts = math.prod(mesh.shape[a] for a in axes) * num_stages(mesh)
    return rules if batch % parts else {**rules, "batch": axes + (AXIS,)}
