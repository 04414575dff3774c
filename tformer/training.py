"""Training as pure functions over a `TrainState` pytree.

The NNX model is split once into a static graph definition and a plain nested
dict of parameters; the jitted step merges them back at trace time. This
keeps NNX's Python bookkeeping out of the per-step path, makes the state a
pytree that optax, orbax and `jax.jit` shardings all understand, and lets
parameters and optimizer state be created directly sharded.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from tformer import batch as batch_lib
from tformer import lora as lora_lib
from tformer import pipeline, reductions, ring_attention, sharding
from tformer.config import ModelConfig

PyTree = Any  # a nested structure of arrays (jax.tree)
Params = dict  # nested dict of arrays (nnx.to_pure_dict of the model's Params)


SCHEDULES = ("cosine", "linear", "constant", "wsd")
OPTIMIZERS = ("adamw", "muon")


def _check(cond: bool, field: str, msg: str) -> None:
    # `not cond` (rather than a negated comparison) also rejects NaN.
    if not cond:
        raise ValueError(f"OptimizerConfig.{field}: {msg}")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW (or Muon for the hidden matrices) with warmup + decay, clipping and masked weight decay.

    The schedule is a function of the step (warmup) and of the run's progress
    in [0, 1] (`lr_factor`): step / total_steps, or, under a time budget, the
    share of the training time spent, whichever is further.
    """

    learning_rate: float = 3e-4
    warmup_steps: int = 100
    total_steps: int = 10_000
    # After warmup: cosine | linear | constant | wsd (warmup-stable-decay: constant, then a linear decay
    # over the last `decay_fraction` of the run).
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.2  # wsd only
    # "adamw", or "muon": momentum orthogonalised by Newton-Schulz (optax.contrib) for the hidden weight
    # matrices (attention and MLP), AdamW at `learning_rate` for the rest (embeddings, output head, norms, biases).
    name: str = "adamw"
    muon_learning_rate: float = 0.02  # muon only: the matrices' peak learning rate
    muon_beta: float = 0.95  # muon only: its (Nesterov) momentum
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    decay_embeddings: bool = False  # norms and biases are never decayed
    clip_norm: float | None = 1.0
    grad_accum_steps: int = 1
    z_loss: float = 0.0  # PaLM's log(Z)^2 penalty; 0 = off
    label_smoothing: float = 0.0
    skip_nonfinite: bool = True  # drop an update whose loss/grads are not finite

    def __post_init__(self):
        _check(self.learning_rate > 0, "learning_rate", f"must be > 0, got {self.learning_rate}")
        _check(self.warmup_steps >= 0, "warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        _check(self.total_steps >= 1, "total_steps", f"must be >= 1, got {self.total_steps}")
        _check(self.schedule in SCHEDULES, "schedule", f"unknown {self.schedule!r}; choose one of {SCHEDULES}")
        _check(0.0 < self.decay_fraction <= 1.0, "decay_fraction", f"must be in (0, 1], got {self.decay_fraction}")
        _check(self.name in OPTIMIZERS, "name", f"unknown optimizer {self.name!r}; choose one of {OPTIMIZERS}")
        _check(self.muon_learning_rate > 0, "muon_learning_rate", f"must be > 0, got {self.muon_learning_rate}")
        _check(0.0 <= self.muon_beta < 1.0, "muon_beta", f"must be in [0, 1), got {self.muon_beta}")
        _check(0.0 <= self.min_lr_ratio <= 1.0, "min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        _check(0.0 <= self.b1 < 1.0, "b1", f"must be in [0, 1), got {self.b1}")
        _check(0.0 <= self.b2 < 1.0, "b2", f"must be in [0, 1), got {self.b2}")
        _check(self.eps > 0, "eps", f"must be > 0, got {self.eps}")
        _check(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        _check(self.clip_norm is None or self.clip_norm > 0, "clip_norm",
               f"must be > 0 or None (no clipping), got {self.clip_norm}")
        _check(self.grad_accum_steps >= 1, "grad_accum_steps", f"must be >= 1, got {self.grad_accum_steps}")
        _check(self.z_loss >= 0, "z_loss", f"must be >= 0 (0 = off), got {self.z_loss}")
        _check(0.0 <= self.label_smoothing < 1.0, "label_smoothing", f"must be in [0, 1), got {self.label_smoothing}")


def lr_factor(optim: OptimizerConfig, step: jax.Array | int, progress: jax.Array | float | None = None) -> jax.Array:
    """The learning rate as a multiple of its peak (in [0, 1]) at `step`, with the run `progress` done.

    `progress` (None: step / total_steps) places the decay: its position is
    (progress * total - warmup) / (total - warmup), clipped to [0, 1], which for
    progress = step / total is the step's place between the end of warmup and
    total_steps. A time-budgeted run passes the larger of that and its spent
    share of the training time, so the decay ends when the time does.
    """
    step = jnp.asarray(step, jnp.float32)
    total, warmup = float(optim.total_steps), float(optim.warmup_steps)
    progress = step / total if progress is None else jnp.asarray(progress, jnp.float32)
    warm = jnp.minimum(step / warmup, 1.0) if warmup > 0 else jnp.float32(1.0)
    d = jnp.clip((progress * total - warmup) / max(total - warmup, 1.0), 0.0, 1.0)
    low = optim.min_lr_ratio
    if optim.schedule == "cosine":
        rest = low + (1.0 - low) * 0.5 * (1.0 + jnp.cos(jnp.pi * d))
    elif optim.schedule == "linear":
        rest = 1.0 - (1.0 - low) * d
    elif optim.schedule == "wsd":
        start = 1.0 - optim.decay_fraction
        rest = 1.0 - (1.0 - low) * jnp.clip((d - start) / optim.decay_fraction, 0.0, 1.0)
    else:
        rest = jnp.float32(1.0)
    return jnp.where(step < warmup, warm, rest).astype(jnp.float32)


def schedule(optim: OptimizerConfig) -> optax.Schedule:
    """The learning rate at each step of a run that ends at `total_steps` (no time budget)."""
    return lambda count: optim.learning_rate * lr_factor(optim, count)


def decay_mask(abstract_state: nnx.State, optim: OptimizerConfig) -> Params:
    """True for weight matrices: >= 2 logical axes (layers excluded), optional embeddings."""

    def decide(v: nnx.Variable) -> bool:
        axes = [a for a in sharding.param_axes(v) if a != "layers"]
        if len(axes) < 2:
            return False  # biases, norm scales
        if axes[0] in ("vocab", "max_len"):  # token / position embedding tables
            return optim.decay_embeddings
        return True

    return nnx.to_pure_dict(jax.tree.map(decide, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable)))


def global_norm(tree: PyTree) -> jax.Array:
    """The L2 norm of all leaves together (optax.tree.norm). On one device each leaf's sum of squares is
    `reductions.sum_of_squares` (XLA:CPU splits one long sum into an unfused reduce-window and a reduce per leaf:
    ~1% of a CPU train step at nanoGPT's shape); on a mesh optax's, whose partial sums follow the sharding."""
    mesh, _ = sharding.active()
    if mesh is not None and mesh.size > 1:
        return optax.tree.norm(tree)
    return jnp.sqrt(sum(reductions.sum_of_squares(x) for x in jax.tree.leaves(tree)))


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """optax.clip_by_global_norm (the same maths and the same empty state) over `global_norm`."""

    def update(updates: PyTree, state: optax.EmptyState, params: PyTree = None) -> tuple[PyTree, optax.EmptyState]:
        del params
        norm = global_norm(updates)
        keep = norm < max_norm
        return jax.tree.map(lambda u: jax.lax.select(keep, u, (u / norm.astype(u.dtype)) * max_norm), updates), state

    return optax.GradientTransformation(optax.init_empty_state, update)


def make_optimizer(optim: OptimizerConfig, abstract_state: nnx.State,
                   lora: lora_lib.LoraConfig | None = None) -> optax.GradientTransformation:
    """AdamW (or Muon + AdamW) over the model's parameters, or with `lora` over the adapters only (all
    decayed). Its learning rates are the peaks: the train step scales its updates by `lr_factor`."""
    mask = decay_mask(abstract_state, optim)
    if lora is not None:
        if optim.name != "adamw":
            raise ValueError(f"OptimizerConfig.name={optim.name!r} does not apply to LoRA adapters (low-rank "
                             "factors, not whole matrices); use name='adamw' with LoRA")
        mask = jax.tree.map(lambda _: True, lora_lib.adapter_shapes(nnx.to_pure_dict(abstract_state), lora))
    parts = []
    if optim.clip_norm is not None:
        parts.append(clip_by_global_norm(optim.clip_norm))
    if optim.name == "muon":
        parts.append(_muon(optim, abstract_state, mask))
    else:
        parts.append(_adamw(optim, mask))
    return optax.chain(*parts)


def _adamw(optim: OptimizerConfig, mask: Any) -> optax.GradientTransformation:
    return optax.adamw(optim.learning_rate, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                       weight_decay=optim.weight_decay, mask=mask)


def muon_specs(abstract_state: nnx.State) -> Params:
    """Per parameter: "adamw", or "muon:<reduction axes>:<output axes>" (comma-separated axis numbers).

    Muon takes the hidden weight matrices, whatever their rank: the input
    axes are the reduction axes and the rest the output axes (wq [embed,
    heads, head_dim] orthogonalises as an [embed, heads * head_dim] matrix,
    wo [heads, head_dim, embed] as [heads * head_dim, embed]); a stacked
    `layers` axis is a batch axis (one matrix per layer). A matrix reads from
    or writes to the residual stream (has an `embed` axis); embedding tables,
    the output head (anything over the vocabulary or positions), biases and
    norm scales go to AdamW.
    """

    def decide(v: nnx.Variable) -> str:
        axes = sharding.param_axes(v)
        named = [(i, a) for i, a in enumerate(axes) if a != "layers"]
        names = [a for _, a in named]
        if len(named) < 2 or "embed" not in names or "vocab" in names or "max_len" in names:
            return "adamw"  # vectors, per-head biases ([heads, head_dim]), tables over tokens or positions
        n_in = len(named) - 1 if named[-1][1] == "embed" else 1  # a projection back to the residual stream
        red = [str(i) for i, _ in named[:n_in]]
        out = [str(i) for i, _ in named[n_in:]]
        return f"muon:{','.join(red)}:{','.join(out)}"

    return nnx.to_pure_dict(jax.tree.map(decide, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable)))


def _muon(optim: OptimizerConfig, abstract_state: nnx.State, mask: Params) -> optax.GradientTransformation:
    """optax.contrib's Muon (Nesterov momentum, 5 Newton-Schulz steps, width scaling) on the hidden matrices,
    AdamW on the rest; both decay the weights `mask` marks."""
    from optax.contrib import MuonDimensionNumbers, scale_by_muon
    from optax.contrib._muon import scale_by_shape

    specs = muon_specs(abstract_state)
    labels = jax.tree.map(lambda s: s.split(":")[0], specs)

    def dims(spec: str) -> MuonDimensionNumbers:
        _, red, out = spec.split(":")
        return MuonDimensionNumbers(tuple(int(a) for a in red.split(",")), tuple(int(a) for a in out.split(",")))

    def dim_numbers(updates: PyTree) -> PyTree:
        # The muon branch sees the AdamW leaves as MaskedNode (optax.partition); the spec tree must match.
        return jax.tree.map(lambda s, u: dims(s) if s != "adamw" else optax.MaskedNode(), specs, updates)

    def branch_mask(label: str) -> Callable[[PyTree], PyTree]:
        return lambda updates: jax.tree.map(lambda m, lab, u: bool(m) and lab == label, mask, labels, updates)

    matrices = optax.chain(
        scale_by_muon(beta=optim.muon_beta, weight_dimension_numbers=dim_numbers),
        scale_by_shape(weight_dimension_numbers=dim_numbers),
        optax.add_decayed_weights(optim.weight_decay, branch_mask("muon")),
        optax.scale(-optim.muon_learning_rate),
    )
    return optax.partition({"muon": matrices, "adamw": _adamw(optim, branch_mask("adamw"))}, labels)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    step: jax.Array  # [] int32
    params: Params
    opt_state: Any
    rng: jax.Array  # raw uint32 key data (checkpoint-friendly)


# ---------------------------------------------------------------------------
# Losses.


def cross_entropy(logits_btv: jax.Array, targets_bt: jax.Array, weights_bt: jax.Array, z_loss: float = 0.0,
                  label_smoothing: float = 0.0):
    """Sums (not means) so microbatches and devices add up exactly."""
    logits = logits_btv.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets_bt[..., None], axis=-1)[..., 0]
    nll = lse - target_logit
    loss = nll
    if label_smoothing:
        # Smooth over the real vocabulary only: padded ids hold -1e9 logits.
        real = logits > -1e8
        mean_logit = jnp.sum(jnp.where(real, logits, 0.0), -1) / jnp.sum(real, -1)
        loss = (1 - label_smoothing) * nll + label_smoothing * (lse - mean_logit)
    if z_loss:
        loss = loss + z_loss * lse**2
    # "The target is the top logit" as target >= max: the max is logsumexp's own (XLA shares it), where an
    # argmax is a second, (value, index) reduction that XLA:CPU runs unvectorized (~1% of a small CPU step).
    # Differs from argmax == target only on exact ties.
    correct = (target_logit >= jnp.max(logits, axis=-1)).astype(jnp.float32)
    w = weights_bt.astype(jnp.float32)
    return {
        "loss_sum": jnp.sum(loss * w),
        "nll_sum": jnp.sum(nll * w),
        "weight_sum": jnp.sum(w),
        "correct_sum": jnp.sum(correct * w),
    }


def loss_sums(graphdef: nnx.GraphDef, params: Params, batch: dict, optim: OptimizerConfig,
              dropout_rng: jax.Array | None = None, microbatches: int | None = None, virtual_stages: int = 1):
    """Summed loss terms of `batch`; on a mesh with a `stage` axis the blocks run as a pipeline (tformer.pipeline)."""
    model = nnx.merge(graphdef, lora_lib.merged(params))
    mesh, _ = sharding.active()
    batch = _sequence_layout(model, batch, mesh)
    if pipeline.num_stages(mesh) > 1:
        logits, targets, weights = pipeline.logits_and_targets(model, batch, dropout_rng, mesh=mesh,
                                                               microbatches=microbatches,
                                                               virtual_stages=virtual_stages)
    else:
        logits, targets, weights = batch_lib.logits_and_targets(model, batch, dropout_rng)
    return cross_entropy(logits, targets, weights, optim.z_loss, optim.label_smoothing)


def _sequence_layout(model, batch: dict, mesh) -> dict:
    """The batch in the ring's token layout (`ModelConfig.sequence_layout`) on a mesh with a `sequence` axis."""
    n = sharding.axis_size(mesh, ring_attention.AXIS)
    if n == 1 or model.cfg.sequence_layout == "consecutive":
        return batch
    if model.task != "lm":
        raise ValueError(f"ModelConfig.sequence_layout={model.cfg.sequence_layout!r} applies to DecoderLM batches "
                         f"only, not {type(model).__name__}'s; use sequence_layout='consecutive'")
    return ring_attention.to_layout(batch, n)


# ---------------------------------------------------------------------------
# State creation (directly sharded) and the steps.


def abstract_model(model_cls: type[nnx.Module], cfg: ModelConfig):
    """(graphdef, abstract nnx.State with logical-axes metadata); allocates nothing."""
    return nnx.split(nnx.eval_shape(lambda: model_cls(cfg, rngs=nnx.Rngs(0))))


def abstract_train_state(abstract: nnx.State, tx: optax.GradientTransformation,
                         lora: lora_lib.LoraConfig | None = None) -> TrainState:
    """The TrainState as ShapeDtypeStructs (allocates nothing): a restore target, a plan's input."""
    params = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), nnx.to_pure_dict(abstract))
    if lora is not None:
        params = lora_lib.abstract_lora_params(params, lora)
    return TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
        opt_state=jax.eval_shape(tx.init, lora_lib.trainable(params)),
        rng=jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0))),
    )


def param_shardings(abstract_state: nnx.State, mesh: Mesh, rules: sharding.Rules | None) -> Params:
    return nnx.to_pure_dict(sharding.state_shardings(abstract_state, mesh, rules))


def state_shardings(model_cls: type[nnx.Module], cfg: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh,
                    rules: sharding.Rules | None, lora: lora_lib.LoraConfig | None = None):
    """NamedSharding pytree of a TrainState, from the rule table (LoRA adapters, being small, replicated)."""
    _, abstract = abstract_model(model_cls, cfg)
    p_sh = param_shardings(abstract, mesh, rules)
    p_abs = nnx.to_pure_dict(abstract)
    rep = NamedSharding(mesh, P())
    if lora is not None:
        p_abs = lora_lib.abstract_lora_params(p_abs, lora)
        p_sh = {"base": p_sh, "lora": jax.tree.map(lambda _: rep, p_abs["lora"]), "scale": rep}
    opt_abs = jax.eval_shape(tx.init, lora_lib.trainable(p_abs))
    opt_sh = sharding.optimizer_shardings(tx, opt_abs, lora_lib.trainable(p_sh), mesh)
    return TrainState(step=rep, params=p_sh, opt_state=opt_sh, rng=rep)


def create_train_state(model_cls: type[nnx.Module], cfg: ModelConfig, optim: OptimizerConfig, seed: int = 0,
                       mesh: Mesh | None = None, rules: sharding.Rules | None = None, params: Params | None = None,
                       lora: lora_lib.LoraConfig | None = None, virtual_stages: int = 1):
    """(graphdef, tx, state, state_shardings or None). Sharded at birth when a mesh is given.

    `virtual_stages` > 1 on a mesh with a `stage` axis: the state stores its
    stacked layers in the interleaved schedule's order (`pipeline.schedule_order`,
    so each stage's devices hold their own layer groups); train and eval it
    with steps made with the same `virtual_stages`, and take it back to model
    order with `in_model_order` (checkpoints, decoding, export).

    `params` (e.g. `nnx.to_pure_dict(nnx.state(tformer.load_hf_checkpoint(path)))`)
    starts from given weights instead of a fresh init, to fine-tune; they must
    have the structure, shapes and dtypes of `model_cls(cfg)`'s parameters.
    `lora`: the state's params are a LoRA tree (`tformer.lora`) over them, and
    the optimizer (and its state) covers the adapters only.
    """
    graphdef, abstract = abstract_model(model_cls, cfg)
    tx = make_optimizer(optim, abstract, lora)
    if params is not None:
        _check_params(params, nnx.to_pure_dict(abstract))

    def init(given: Params | None) -> TrainState:
        p = nnx.to_pure_dict(nnx.state(model_cls(cfg, rngs=nnx.Rngs(seed)))) if given is None else given
        if lora is not None:
            p = lora_lib.lora_params(p, lora, jax.random.key(seed + 2))
        state = TrainState(
            step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(lora_lib.trainable(p)),
            rng=jax.random.key_data(jax.random.key(seed + 1)),
        )
        return pipeline.schedule_order(state, pipeline.num_stages(mesh), virtual_stages)

    if mesh is None:
        return graphdef, tx, jax.jit(init)(params), None
    shardings = state_shardings(model_cls, cfg, tx, mesh, rules, lora)
    if params is not None:  # placed shard by shard: never whole on one device
        params = jax.device_put(params, shardings.params["base"] if lora is not None else shardings.params)
    return graphdef, tx, jax.jit(init, out_shardings=shardings)(params), shardings


def in_model_order(tree: PyTree, mesh: Mesh | None, virtual_stages: int, shardings: Any = None) -> PyTree:
    """A state (or params) of `create_train_state(mesh=mesh, virtual_stages=...)` with its stacked layers in
    model order, placed on `shardings` (the state's own): what checkpoints, decoding and export read.

    The identity when the two orders coincide (no `stage` axis, or V = 1);
    otherwise a new copy (the stages' groups move once, not every step).
    """
    stages = pipeline.num_stages(mesh)
    if stages == 1 or virtual_stages == 1:
        return tree
    fn = functools.partial(pipeline.model_order, stages=stages, virtual_stages=virtual_stages)
    return jax.jit(fn, out_shardings=shardings)(tree)


def in_schedule_order(tree: PyTree, mesh: Mesh | None, virtual_stages: int, shardings: Any = None) -> PyTree:
    """Inverse of `in_model_order`: a model-order state (e.g. a restored checkpoint) in the schedule's order."""
    stages = pipeline.num_stages(mesh)
    if stages == 1 or virtual_stages == 1:
        return tree
    fn = functools.partial(pipeline.schedule_order, stages=stages, virtual_stages=virtual_stages)
    return jax.jit(fn, out_shardings=shardings)(tree)


def _check_params(given: Params, expected: Params) -> None:
    """Fail naming the first parameter whose path, shape or dtype differs from the model's."""
    def flat(tree: Params) -> dict[str, jax.Array]:
        return {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(tree)}

    got, want = flat(given), flat(expected)
    for name in sorted(set(want) | set(got)):
        if name not in got:
            raise ValueError(f"create_train_state(params=...): parameter {name} is missing; "
                             "pass the full parameter dict of a model built with the same ModelConfig")
        if name not in want:
            raise ValueError(f"create_train_state(params=...): unexpected parameter {name} for this ModelConfig")
        g, w = got[name], want[name]
        if tuple(g.shape) != tuple(w.shape) or jnp.dtype(g.dtype) != jnp.dtype(w.dtype):
            raise ValueError(f"create_train_state(params=...): parameter {name} is {g.dtype}{list(g.shape)}, "
                             f"the model needs {w.dtype}{list(w.shape)}; build the ModelConfig that made them")


def _microbatches(batch: dict, k: int) -> dict:
    def split(x: jax.Array) -> jax.Array:
        if x.shape[0] % k:
            raise ValueError(f"batch size {x.shape[0]} is not divisible by grad_accum_steps={k}")
        return x.reshape((k, x.shape[0] // k) + x.shape[1:])

    return jax.tree.map(split, batch)


def _summed_grads(graphdef: nnx.GraphDef, optim: OptimizerConfig, params: Params, trainable: Params, batch: dict,
                  key: jax.Array, microbatches: int | None, virtual_stages: int) -> tuple[dict, Params]:
    """(loss sums, gradients of the summed loss w.r.t. `trainable`) over the batch, accumulated over
    `optim.grad_accum_steps` microbatches (scanned); microbatch i draws its dropout from fold(key, i)."""

    def sums_and_grads(t: Params, mb: dict, i: int | jax.Array) -> tuple[dict, Params]:
        rng = jax.random.fold_in(key, i)

        def f(t: Params) -> tuple[jax.Array, dict]:
            s = loss_sums(graphdef, lora_lib.with_trainable(params, t), mb, optim, rng, microbatches,
                          virtual_stages)
            return s["loss_sum"], s

        (_, s), g = jax.value_and_grad(f, has_aux=True)(t)
        return s, g

    if optim.grad_accum_steps == 1:
        return sums_and_grads(trainable, batch, 0)
    mbs = _microbatches(batch, optim.grad_accum_steps)

    def body(acc: tuple[dict, Params], inp: tuple[dict, jax.Array]) -> tuple[tuple[dict, Params], None]:
        mb, i = inp
        s, g = sums_and_grads(trainable, mb, i)
        return jax.tree.map(jnp.add, acc, (s, g)), None

    first = jax.tree.map(lambda x: x[0], mbs)
    zero = jax.tree.map(jnp.zeros_like, jax.eval_shape(lambda: sums_and_grads(trainable, first, 0)))
    (sums, grads), _ = jax.lax.scan(body, zero, (mbs, jnp.arange(optim.grad_accum_steps)))
    return sums, grads


def train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, optim: OptimizerConfig, state: TrainState,
               batch: dict, progress: jax.Array | None = None, *, layout: sharding.Layout | None = None,
               microbatches: int | None = None, virtual_stages: int = 1):
    """One optimizer step (pure). Loss is normalised over the whole (accumulated) batch.

    `progress`: the run's progress in [0, 1] for the learning-rate schedule
    (`lr_factor`; None: step / total_steps). An array, so a time-budgeted run
    feeds its spent share of time each step without recompiling.

    `layout` (static): the mesh and rule table activation constraints follow.
    `microbatches`: the pipeline's count on a mesh with a `stage` axis (default 2 x stages);
    `virtual_stages`: layer groups per stage (1 = GPipe, more = the interleaved schedule, whose state
    stores its stacked layers in schedule order: `create_train_state(virtual_stages=...)`).
    """
    with sharding.use_layout(layout):
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        # Gradients of the trainable leaves only (LoRA: the adapters; the base weights get none).
        trainable = lora_lib.trainable(state.params)

        sums, grads = _summed_grads(graphdef, optim, state.params, trainable, batch, key, microbatches,
                                    virtual_stages)
        denom = jnp.maximum(sums["weight_sum"], 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        grad_norm = global_norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, trainable)
        factor = lr_factor(optim, state.step, progress)  # the optimizer's rates are the peaks
        updates = jax.tree.map(lambda u: u * factor.astype(u.dtype), updates)
        params = optax.apply_updates(trainable, updates)
        loss = sums["loss_sum"] / denom
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        if optim.skip_nonfinite:
            def keep(new: PyTree, old: PyTree) -> PyTree:
                return jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)

            params, opt_state = keep(params, trainable), keep(opt_state, state.opt_state)
        params = lora_lib.with_trainable(state.params, params)
        new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=state.rng)
        metrics = {
            "loss": loss,
            "nll": sums["nll_sum"] / denom,
            "accuracy": sums["correct_sum"] / denom,
            "tokens": sums["weight_sum"],
            "grad_norm": grad_norm,
            "lr": optim.learning_rate * factor,
            "finite": finite,
        }
        return new_state, metrics


class TrainStep:
    """`step(state, batch, progress=None) -> (state, metrics)`: jitted, with shardings and donated state.

    jit's `in_shardings` cannot cover an optional argument, so the step with a
    `progress` (a time-budgeted run) is its own jitted function, built on first use.
    """

    def __init__(self, fn: Callable, state_sharding: Any, batch_sharding: Any, donate: bool,
                 compiler_options: dict[str, str] | None = None):
        self._fn, self._state_sharding, self._batch_sharding, self._donate = fn, state_sharding, batch_sharding, donate
        self._options = dict(compiler_options or {})
        self._jitted: dict[bool, Callable] = {}

    def _get(self, with_progress: bool) -> Callable:
        if with_progress not in self._jitted:
            kw = {}
            if self._state_sharding is not None:
                kw["in_shardings"] = (self._state_sharding, self._batch_sharding) + ((None,) if with_progress else ())
                kw["out_shardings"] = (self._state_sharding, None)
            if self._options:
                kw["compiler_options"] = self._options
            self._jitted[with_progress] = jax.jit(self._fn, donate_argnums=(0,) if self._donate else (), **kw)
        return self._jitted[with_progress]

    def __call__(self, state: TrainState, batch: dict, progress: jax.Array | None = None):
        return self._get(progress is not None)(state, batch, *(() if progress is None else (progress,)))

    def lower(self, state: Any, batch: Any, progress: Any = None):
        return self._get(progress is not None).lower(state, batch, *(() if progress is None else (progress,)))


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, optim: OptimizerConfig, *,
                    mesh: Mesh | None = None, rules: sharding.Rules | None = None, state_sharding: Any = None,
                    batch_sharding: Any = None, donate: bool = True, microbatches: int | None = None,
                    virtual_stages: int = 1, compiler_options: dict[str, str] | None = None) -> TrainStep:
    """Jitted `step(state, batch, progress=None) -> (state, metrics)` with shardings and donated state.

    `compiler_options`: XLA options for this program (`jax.jit`'s), e.g. `tformer.host.cpu_compiler_options`,
    which the runners pass.
    """
    fn = functools.partial(train_step, graphdef, tx, optim, layout=sharding.layout(mesh, rules),
                           microbatches=microbatches, virtual_stages=virtual_stages)
    return TrainStep(fn, state_sharding, batch_sharding, donate, compiler_options)


def eval_sums(graphdef: nnx.GraphDef, optim: OptimizerConfig, params: Params, batch: dict, *,
              layout: sharding.Layout | None = None, microbatches: int | None = None, virtual_stages: int = 1):
    """Summed NLL / weights / correct over a batch, no dropout."""
    with sharding.use_layout(layout):
        return loss_sums(graphdef, params, batch, optim, None, microbatches, virtual_stages)


def make_eval_step(graphdef: nnx.GraphDef, optim: OptimizerConfig, *, mesh: Mesh | None = None,
                   rules: sharding.Rules | None = None, params_sharding: Any = None, batch_sharding: Any = None,
                   microbatches: int | None = None, virtual_stages: int = 1):
    fn = functools.partial(eval_sums, graphdef, optim, layout=sharding.layout(mesh, rules), microbatches=microbatches,
                           virtual_stages=virtual_stages)
    kw = {} if params_sharding is None else {"in_shardings": (params_sharding, batch_sharding)}
    return jax.jit(fn, **kw)


def batch_sharding(mesh: Mesh, rules: sharding.Rules | None, batch: dict) -> dict:
    """Leading (batch) dimension over the data axes, the rest replicated."""
    spec = sharding.logical_to_spec(("batch",), rules, mesh)
    return jax.tree.map(lambda x: NamedSharding(mesh, P(spec[0], *([None] * (x.ndim - 1)))), batch)
