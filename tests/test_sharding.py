"""SPMD sharding on 8 fake CPU devices (see conftest.py): data / FSDP / tensor parallelism.

Every mesh must train exactly like one device; parameters must be laid out as
the rule table says; the compiled programs must hold the collectives each
strategy implies; generation and checkpoints must not care about the mesh;
the plan must match a hand count.
"""

import collections
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_trains_alike
from flax import nnx
from jax.sharding import NamedSharding, SingleDeviceSharding

import tformer
from tformer import plan as plan_lib
from tformer import sharding, training

# 8 query heads / 4 KV heads (GQA), d_ff 128 and a padded vocab of 256 all
# split 4 ways, so every preset works up to tensor=4. No biases: the gradient
# of a key bias is analytically zero (softmax ignores a constant shift), and
# Adam turns its rounding noise into full-size steps that differ with the
# reduction order, so it could not be compared across meshes.
CFG = tformer.ModelConfig(
    vocab_size=250, d_model=64, num_heads=8, num_kv_heads=4, d_ff=128, num_layers=2, max_len=32,
    positions="rope", norm="rmsnorm", activation="swiglu", use_bias=False, tie_embeddings=False,
)
L, B, T, D = CFG.num_layers, 8, 16, CFG.d_model
# Adam divides each gradient entry by its own running magnitude, so an entry
# that is ~1e-4 of the typical size turns fp32 summation-order noise into a
# ~1e-3 relative change of its step. eps=1e-4 (not 1e-8) keeps that division
# well-conditioned; the comparison is then about sharding, not about Adam.
OPT = training.OptimizerConfig(learning_rate=1e-2, warmup_steps=0, total_steps=3, weight_decay=0.1, clip_norm=1.0,
                         eps=1e-4)
STEPS = 3


def lm_batches(cfg=CFG, n=STEPS, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        tokens = rng.integers(3, cfg.vocab_size, (B, T + 1)).astype(np.int32)
        weights = (rng.random((B, T)) > 0.1).astype(np.float32)
        out.append({"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": weights})
    return out


def mesh_of(shape):
    return sharding.make_mesh(shape, devices=jax.devices()[: math.prod(shape)])


def train(model_cls, cfg, batches, mesh=None, rules=None):
    """(per-step [loss, grad norm], final params as numpy, initial state, compiled HLO) after len(batches) steps."""
    graphdef, tx, state, state_sh = training.create_train_state(model_cls, cfg, OPT, 0, mesh, rules)
    initial = jax.tree.map(lambda a: (a.shape, a.sharding), state)
    if mesh is None:
        step = training.make_train_step(graphdef, tx, OPT)
        def put(b):
            return b
    else:
        batch_sh = training.batch_sharding(mesh, rules, batches[0])
        step = training.make_train_step(graphdef, tx, OPT, mesh=mesh, rules=rules, state_sharding=state_sh,
                                  batch_sharding=batch_sh)
        def put(b):
            return jax.device_put(b, batch_sh)
    compiled = step.lower(state, put(batches[0])).compile()
    losses = []
    for b in batches:
        state, m = compiled(state, put(b))
        losses.append([float(m["loss"]), float(m["grad_norm"])])
    return losses, jax.tree.map(np.asarray, state.params), initial, compiled.as_text()


@functools.cache
def single_device_run():
    return train(tformer.DecoderLM, CFG, lm_batches())


def assert_same_training(run, ref):
    assert_trains_alike(run[0], run[1], ref[0], ref[1], OPT, STEPS, "sharded run")


# ---------------------------------------------------------------------------
# Expected per-device shard shapes, written from the strategies' definitions
# (not from the rule code): for each parameter, by how much each dimension is
# divided. F = fsdp size, T = tensor size. Layer-stacked weights lead with the
# (never split) layers dimension.


def expected_divisors(preset: str, F: int, Tn: int) -> dict[str, tuple[int, ...]]:
    fsdp = preset in ("fsdp", "fsdp_tp")
    tp = preset in ("tp", "dp_tp", "fsdp_tp")
    e = F if fsdp else 1  # FSDP: every weight is split along d_model (embed)
    t = Tn if tp else 1  # Megatron: heads / kv heads / mlp / vocab split over tensor
    return {
        # Column-parallel: Q, K, V split by (kv) heads; MLP up/gate by d_ff.
        "wq": (1, e, t, 1), "wk": (1, e, t, 1), "wv": (1, e, t, 1),
        "w_in": (1, e, t), "w_gate": (1, e, t),
        # Row-parallel: attention output and MLP down split by their input rows.
        "wo": (1, t, 1, e), "w_out": (1, t, e),
        # Vocabulary-parallel embedding and output head.
        "table": (t, e), "head": (e, t),
        # Norm scales: only FSDP splits them.
        "attn_norm/scale": (1, e), "mlp_norm/scale": (1, e), "final_norm/scale": (e,),
    }


def param_key(path) -> str:
    names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    if names[-1] == "scale":
        return f"{names[-2]}/scale"
    return names[-1]


def assert_shards(preset, mesh, params_shapes_shardings):
    F, Tn = mesh.shape["fsdp"], mesh.shape["tensor"]
    div = expected_divisors(preset, F, Tn)
    seen = set()
    for path, (shape, leaf_sharding) in jax.tree_util.tree_leaves_with_path(
        params_shapes_shardings, is_leaf=lambda x: isinstance(x, tuple) and len(x) == 2
    ):
        key = param_key(path)
        want = tuple(s // d for s, d in zip(shape, div[key], strict=True))
        assert leaf_sharding.shard_shape(shape) == want, (
            f"{preset} on {dict(mesh.shape)}: {jax.tree_util.keystr(path)} {shape} has shards "
            f"{leaf_sharding.shard_shape(shape)}, want {want}"
        )
        seen.add(key)
    assert seen == set(div), f"parameters not checked: {set(div) - seen}"


@pytest.mark.parametrize("preset", sorted(sharding.PRESETS))
def test_rule_table_gives_expected_shard_shapes(preset):
    mesh = mesh_of((2, 2, 2)) if "fsdp" in preset else mesh_of((2, 1, 4))
    _, abstract = training.abstract_model(tformer.DecoderLM, CFG)
    shapes = jax.tree.map(lambda v: v.shape, nnx.to_pure_dict(abstract))
    shardings = training.param_shardings(abstract, mesh, sharding.rules_for(preset))
    assert_shards(preset, mesh, jax.tree.map(lambda a, s: (a, s), shapes, shardings,
                                             is_leaf=lambda x: isinstance(x, tuple)))


# ---------------------------------------------------------------------------
# Collectives in the compiled step.


NORMS = ("attn_norm/scale", "mlp_norm/scale", "final_norm/scale")


def param_sizes(divide_by: dict[str, int] | None = None, exclude=()) -> collections.Counter:
    """Element counts of every per-layer parameter (the unit XLA gathers / reduces)."""
    _, abstract = training.abstract_model(tformer.DecoderLM, CFG)
    sizes = collections.Counter()
    for path, a in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(abstract)):
        if param_key(path) in exclude:
            continue
        n = math.prod(a.shape[1:]) if path[0].key == "blocks" else math.prod(a.shape)
        copies = L if path[0].key == "blocks" else 1
        sizes[n // (divide_by or {}).get(param_key(path), 1)] += copies
    return sizes


def arrays_of(collectives, kind, group=None):
    return [(s, c) for c in collectives if c.kind == kind and (group is None or c.group_size == group)
            for _, s in c.shapes]


def sizes_of(collectives, kind, group=None, scale=1) -> collections.Counter:
    return collections.Counter(math.prod(s) * scale for s, _ in arrays_of(collectives, kind, group))


def contains(big: collections.Counter, small: collections.Counter) -> bool:
    return all(big[k] >= v for k, v in small.items())


def check_dp_collectives(cs, n):
    # Gradients are summed over all devices: one (combined) all-reduce whose
    # arrays include a full-size gradient for every parameter.
    assert contains(sizes_of(cs, "all-reduce", n), param_sizes()), "a parameter gradient is not all-reduced"
    # Parameters are replicated: no weight is gathered.
    gathered = sizes_of(cs, "all-gather")
    assert not set(gathered) & set(param_sizes(exclude=NORMS)), f"DP all-gathers a weight-sized array: {gathered}"
    assert not arrays_of(cs, "reduce-scatter")


def check_fsdp_collectives(cs, n):
    # Every weight is stored 1/n per device and all-gathered to full size before
    # use. Except the token-embedding table, which is only indexed: XLA moves
    # the looked-up rows (an all-to-all) instead of gathering the whole table.
    gathered = sizes_of(cs, "all-gather", n)
    assert contains(gathered, param_sizes(exclude=("table",))), f"a parameter is never all-gathered: {gathered}"
    # Gradients are reduced over all n devices and each device keeps its shard.
    # TPU/GPU emit this as a reduce-scatter; XLA:CPU has no reduce-scatter
    # kernel and emits an all-reduce of the full gradient followed by a
    # dynamic-slice (inspected in the HLO). Accept either, per parameter.
    # The embedding table's gradient is a scatter-add of rows, which travel
    # back by all-to-all like the lookup did.
    reduced = sizes_of(cs, "all-reduce", n) + sizes_of(cs, "reduce-scatter", n, scale=n)
    assert contains(reduced, param_sizes(exclude=("table",))), "a parameter gradient is not reduced across FSDP"
    assert len(arrays_of(cs, "all-to-all", n)) >= 2, "embedding rows: one exchange forward, one backward"


def check_tp_collectives(cs, n, local_batch):
    # Megatron: one all-reduce of the [batch, length, d_model] activations
    # (XLA may flatten them to [batch * length, d_model]) per sublayer and
    # direction: after attention's output projection and the MLP's down
    # projection (forward), and for the input gradient of the Q/K/V and MLP
    # up/gate projections (backward; XLA combines the Q, K and V partial
    # gradients into one instruction with three arrays, and may fold a small
    # unrelated reduction into it): 4 per layer. Plus the vocabulary-parallel
    # ends: the embedding lookup (forward) and the output head's input
    # gradient (backward).
    act = local_batch * T * D
    acts = [c for c in cs if c.kind == "all-reduce" and c.group_size == n
            and any(math.prod(s) == act and s[-1] == D for _, s in c.shapes)]
    assert len(acts) == 4 * L + 2, f"expected {4 * L + 2} activation all-reduces, found {len(acts)}: {acts}"
    # Weights stay sharded: no weight matrix is ever gathered. (Small arrays
    # are: the per-shard argmax of the logits for the accuracy metric; their
    # size may equal a norm scale's, so only matrices are compared.)
    gathered = sizes_of(cs, "all-gather")
    assert not set(gathered) & set(param_sizes(exclude=NORMS)), f"TP all-gathers a weight-sized array: {gathered}"


CASES = {  # id: (preset, (data, fsdp, tensor))
    "dp-8x1x1": ("dp", (8, 1, 1)),
    "fsdp-1x8x1": ("fsdp", (1, 8, 1)),
    "tp-1x1x4": ("tp", (1, 1, 4)),
    "fsdp_tp-2x2x2": ("fsdp_tp", (2, 2, 2)),
    "dp_tp-4x1x2": ("dp_tp", (4, 1, 2)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_mesh_trains_like_one_device(case):
    """Per mesh: the state is born sharded per the rules, the compiled step holds the
    strategy's collectives, and 3 steps equal the single-device run."""
    preset, shape = CASES[case]
    mesh, rules = mesh_of(shape), sharding.rules_for(preset)
    run = train(tformer.DecoderLM, CFG, lm_batches(), mesh, rules)
    _, _, initial, hlo = run

    # (2) Parameters and Adam moments are created with the rule table's shards.
    assert_shards(preset, mesh, initial.params)
    for moment in ("mu", "nu"):
        found = [st for st in jax.tree.leaves(initial.opt_state, is_leaf=lambda x, m=moment: hasattr(x, m))
                 if hasattr(st, moment)]
        assert found, f"no Adam {moment} in the optimizer state"
        assert_shards(preset, mesh, getattr(found[0], moment))

    # (3) The collectives of the compiled step.
    cs = plan_lib.parse_collectives(hlo)
    data = shape[0] * shape[1]
    if preset == "dp":
        check_dp_collectives(cs, 8)
    elif preset == "fsdp":
        check_fsdp_collectives(cs, 8)
    elif preset == "tp":
        check_tp_collectives(cs, shape[2], B)
    elif preset == "dp_tp":
        check_tp_collectives(cs, shape[2], B // data)
        # ... and the tensor-sharded gradients are all-reduced over the data axis.
        assert contains(sizes_of(cs, "all-reduce", shape[0]), param_sizes(
            {k: shape[2] for k in ("wq", "wk", "wv", "w_in", "w_gate", "wo", "w_out", "table", "head")}))
    else:  # fsdp_tp: parameters are gathered over fsdp, activations reduced over tensor
        assert arrays_of(cs, "all-gather", shape[1]) and arrays_of(cs, "all-reduce", shape[2])

    # (1) Same losses and parameters as one device.
    assert_same_training(run, single_device_run())


def test_encoder_decoder_trains_like_one_device():
    cfg = CFG.replace(num_encoder_layers=1, num_layers=1, positions="sinusoidal", tie_embeddings=True)
    rng = np.random.default_rng(1)
    batches = [{"src": rng.integers(3, 250, (B, 12)).astype(np.int32),
                "tgt_inputs": rng.integers(3, 250, (B, T)).astype(np.int32),
                "tgt_targets": rng.integers(3, 250, (B, T)).astype(np.int32),
                "tgt_weights": np.ones((B, T), np.float32)} for _ in range(STEPS)]
    mesh = mesh_of((4, 1, 2))
    ref = train(tformer.EncoderDecoder, cfg, batches)
    run = train(tformer.EncoderDecoder, cfg, batches, mesh, sharding.rules_for("dp_tp"))
    assert_same_training(run, ref)


# ---------------------------------------------------------------------------
# Generation.


def shard_model(model, mesh, rules):
    graphdef, state = nnx.split(model)
    sh = sharding.state_shardings(state, mesh, rules)
    return nnx.merge(graphdef, jax.device_put(state, sh))


def test_generation_is_mesh_independent():
    # A larger init spreads the logits, so greedy choices are not near-ties.
    cfg = CFG.replace(init_std=0.3, eos_id=2, num_layers=1)
    model = tformer.DecoderLM(cfg, rngs=nnx.Rngs(3))
    prompts = np.random.default_rng(0).integers(3, 250, (B, 5)).astype(np.int32)
    lengths = [5, 3, 4, 5, 2, 5, 1, 4]
    ref = tformer.generate(model, prompts, tformer.Decode(8, eos_id=-1), lengths=lengths)
    assert len(np.unique(np.asarray(ref.tokens))) > 8, "degenerate reference: the comparison would prove little"
    for preset, shape in [("tp", (1, 1, 4)), ("dp_tp", (4, 1, 2))]:  # tensor alone; data x tensor
        mesh, rules = mesh_of(shape), sharding.rules_for(preset)
        sharded = shard_model(model, mesh, rules)
        wq = sharded.blocks.layers.attn.wq[...]
        assert wq.sharding.shard_shape(wq.shape)[2] == CFG.num_heads // shape[2], "query heads split over tensor"
        out = tformer.generate(sharded, prompts, tformer.Decode(8, eos_id=-1), lengths=lengths, mesh=mesh, rules=rules)
        np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens), err_msg=f"{preset} {shape}")


def test_kv_cache_is_sharded():
    mesh, rules = mesh_of((4, 1, 2)), sharding.rules_for("dp_tp")
    model = shard_model(tformer.DecoderLM(CFG, rngs=nnx.Rngs(0)), mesh, rules)

    @jax.jit
    def cache():
        with sharding.use_rules(mesh, rules):
            return model.init_cache(B, 16)

    c = cache()
    k = c.k[0]
    # Batch over the data axis (4), KV heads over tensor (2).
    assert k.shape == (B, 16, CFG.kv_heads, CFG.resolved_head_dim)
    assert k.sharding.shard_shape(k.shape) == (B // 4, 16, CFG.kv_heads // 2, CFG.resolved_head_dim)


# ---------------------------------------------------------------------------
# Checkpoints across meshes.


def test_checkpoint_restores_onto_other_meshes(tmp_path):
    from tformer.checkpoint import Checkpointer, abstract_like

    cfg = CFG.replace(num_layers=1)
    save_mesh = mesh_of((2, 1, 4))
    _, tx, state, _ = training.create_train_state(tformer.DecoderLM, cfg, OPT, 7, save_mesh,
                                                  sharding.rules_for("dp_tp"))
    # Make the optimizer moments non-trivial without compiling a train step.
    state = training.TrainState(step=state.step + 5, params=state.params,
                          opt_state=jax.tree.map(lambda m: m + 0.5 if m.dtype == jnp.float32 else m, state.opt_state),
                          rng=state.rng)
    expected = jax.tree.map(np.asarray, state)
    ckpt = Checkpointer(tmp_path, async_save=False)
    ckpt.save(5, state)
    ckpt.wait()

    targets = {
        "dp 8x1x1": (mesh_of((8, 1, 1)), "dp"),
        "tp 1x1x2 on devices 0-1": (mesh_of((1, 1, 2)), "tp"),
        "single device": (None, None),
    }
    for name, (mesh, preset) in targets.items():
        if mesh is None:
            dev = SingleDeviceSharding(jax.devices()[0])
            shardings = jax.tree.map(lambda _, d=dev: d, state)
        else:
            shardings = training.state_shardings(tformer.DecoderLM, cfg, tx, mesh, sharding.rules_for(preset))
        restored, _ = Checkpointer(tmp_path).restore(5, target=abstract_like(state, shardings))
        for (path, got), want, sh in zip(jax.tree_util.tree_leaves_with_path(restored), jax.tree.leaves(expected),
                                         jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(
                                             x, (NamedSharding, SingleDeviceSharding)))):
            assert got.sharding.is_equivalent_to(sh, got.ndim), f"{name}: {jax.tree_util.keystr(path)} sharding"
            np.testing.assert_array_equal(np.asarray(got), want, err_msg=f"{name}: {jax.tree_util.keystr(path)}")


# ---------------------------------------------------------------------------
# Plan mode against a hand count.


PLAN_CFG = CFG.replace(num_layers=1)


def hand_param_bytes(preset: str, F: int, Tn: int) -> int:
    """Per-device parameter bytes of PLAN_CFG, counted by hand (fp32)."""
    c = PLAN_CFG
    V, Dm, H, K, hd, Ff = c.padded_vocab, c.d_model, c.num_heads, c.kv_heads, c.resolved_head_dim, c.resolved_d_ff
    fsdp = F if preset in ("fsdp", "fsdp_tp") else 1
    tp = Tn if preset in ("tp", "dp_tp", "fsdp_tp") else 1
    matrices = c.num_layers * (Dm * H * hd + 2 * Dm * K * hd + H * hd * Dm + 3 * Dm * Ff) + 2 * V * Dm
    norms = (2 * c.num_layers + 1) * Dm
    return 4 * (matrices // (fsdp * tp) + norms // fsdp)


@pytest.mark.parametrize("preset,shape", [("dp", (8, 1, 1)), ("fsdp", (1, 8, 1)), ("tp", (1, 1, 4)),
                                          ("dp_tp", (2, 1, 4)), ("fsdp_tp", (2, 2, 2))])
def test_plan_matches_hand_count(preset, shape):
    mesh = mesh_of(shape)
    p = plan_lib.plan_train_step(tformer.DecoderLM, PLAN_CFG, OPT, mesh, preset, batch=B, seq_len=T)
    want = hand_param_bytes(preset, shape[1], shape[2])
    assert p.param_bytes == want
    # Adam: two moments per parameter, same layout, plus scalar counters.
    assert 2 * want <= p.opt_bytes <= 2 * want + 64
    # XLA's own accounting of the step's inputs: state + this device's batch
    # rows (inputs, targets, segment_ids, positions: int32; weights: fp32) + step + rng.
    rows = B // (shape[0] * shape[1])
    assert p.batch_bytes == 5 * 4 * rows * T
    assert p.argument_bytes == p.param_bytes + p.opt_bytes + p.batch_bytes + 4 + 8
    assert p.flops and p.flops > 0 and p.temp_bytes is not None
    kinds = p.collective_summary()
    full = hand_param_bytes("dp", 1, 1)
    if preset == "dp":  # only the gradient all-reduce: every gradient at full size
        assert set(kinds) == {"all-reduce"} and p.collective_bytes >= full
    if preset == "fsdp":  # every parameter but the (only indexed) embedding table gathered whole
        assert kinds["all-gather"]["bytes"] >= full - 4 * PLAN_CFG.padded_vocab * D
    assert "collective" in p.table()


def test_divisibility_errors_name_the_problem():
    with pytest.raises(ValueError, match="num_kv_heads=4 is not divisible by the 8-way"):
        sharding.check_divisibility(CFG, mesh_of((1, 1, 8)), sharding.rules_for("tp"))
    with pytest.raises(ValueError, match="global batch size 6 is not divisible by the 8 devices"):
        sharding.check_divisibility(CFG, mesh_of((8, 1, 1)), sharding.rules_for("dp"), 6)
    with pytest.raises(ValueError, match="needs 6 devices but 8 are available"):
        sharding.make_mesh((3, 2, 1))
    with pytest.raises(ValueError, match="do not divide the 8 available devices"):
        sharding.make_mesh((3, -1, 1))
    assert dict(sharding.make_mesh({"data": -1, "tensor": 2}).shape) == {"data": 4, "fsdp": 1, "tensor": 2}


def test_collective_parser_reads_tuples_async_and_groups():
    hlo = "\n".join([
        "  %all-reduce.1 = (f32[4,16]{1,0}, /*index=1*/bf16[8]{0}) all-reduce(%a, %b), channel_id=1, "
        "replica_groups=[2,4]<=[8], to_apply=%add",
        "  %ag = ((f32[2,3]{1,0}), (f32[8,3]{1,0})) all-gather-start(%x), replica_groups={{0,1,2,3},{4,5,6,7}}",
        "  %ag.done = f32[8,3]{1,0} all-gather-done(%ag)",
        "  ROOT %rs = f32[16]{0} reduce-scatter(%y), replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_1'}",
        "  %add.3 = f32[16]{0} add(%p, %q)",
    ])
    cs = plan_lib.parse_collectives(hlo)
    assert [(c.kind, c.bytes, c.group_size) for c in cs] == [
        ("all-reduce", 4 * 64 + 2 * 8, 4), ("all-gather", 4 * 24, 4), ("reduce-scatter", 64, 4)]


def test_collectives_in_loops_count_once_per_trip():
    """A collective in a while body runs trip-count times per step (nested loops multiply); branches once."""
    hlo = "\n".join([
        "%inner_body (p: f32[4]) -> f32[4] {",
        "  %ar.in = f32[4]{0} all-reduce(%p), replica_groups=[1,8]<=[8], to_apply=%add",
        "}",
        "%outer_body (p: f32[4]) -> f32[4] {",
        "  %ar.out = f32[8]{0} all-reduce(%p), replica_groups=[1,8]<=[8], to_apply=%add",
        '  %w2 = f32[4]{0} while(%p), condition=%c2, body=%inner_body, backend_config={"known_trip_count":{"n":"3"}}',
        "}",
        "%branch (p: f32[4]) -> f32[4] {",
        "  %cp = f32[2]{0} collective-permute(%p), source_target_pairs={{0,1}}",
        "}",
        "ENTRY %main (a: f32[4]) -> f32[4] {",
        "  %ar.top = f32[16]{0} all-reduce(%a), replica_groups=[1,8]<=[8], to_apply=%add",
        '  %w1 = f32[4]{0} while(%a), condition=%c1, body=%outer_body, backend_config={"known_trip_count":{"n":"12"}}',
        "  %unknown = f32[4]{0} while(%a), condition=%c3, body=%branch_loop",
        "  ROOT %k = f32[4]{0} conditional(%i, %a), branch_computations={%branch, %other}",
        "}",
    ])
    cs = plan_lib.parse_collectives(hlo)
    assert [(c.name, c.bytes, c.runs) for c in cs] == [("ar.in", 16, 36), ("ar.out", 32, 12), ("cp", 8, 1),
                                                       ("ar.top", 64, 1)]
    summary = plan_lib.summarize_collectives(cs)
    assert summary["all-reduce"] == {"count": 3, "runs": 49, "arrays": 3, "bytes": 16 * 36 + 32 * 12 + 64}


@pytest.mark.slow
def test_scanned_layers_plan_the_traffic_of_unrolled_ones():
    """Data parallel: the gradient all-reduce of a scanned layer stack sits in the backward loop's body, once per
    layer; per step it moves what the unrolled program's all-reduce moves (before, the plan counted it once)."""
    cfg = CFG.replace(num_layers=3)
    mesh = mesh_of((8, 1, 1))
    plans = {scan: plan_lib.plan_train_step(tformer.DecoderLM, cfg.replace(scan_layers=scan), OPT, mesh, "dp",
                                            batch=B, seq_len=T) for scan in (False, True)}
    in_loop = [c for c in plans[True].collectives if c.runs == 3]
    assert in_loop, "no collective in the scanned backward loop"
    assert plans[True].collective_bytes == plans[False].collective_bytes
    # Every gradient is all-reduced at least once: at least the (replicated) parameters' bytes.
    assert plans[True].collective_bytes >= plans[True].param_bytes


def test_plan_command_line_on_fake_devices():
    """`train.py --plan --plan_devices=16`: no data, no training, a 16-device plan printed."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, str(repo / "experiments/train.py"), f"--config={repo}/experiments/configs/lm_tiny.py",
           "--plan", "--plan_devices=16", "--config.model.d_model=32", "--config.model.d_ff=64",
           "--config.model.num_layers=1", "--config.data.seq_len=32", "--config.mesh.data=4",
           "--config.mesh.tensor=4", "--config.mesh.preset=dp_tp"]
    out = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "16 cpu devices" in out.stdout and "data=4 x fsdp=1 x tensor=4" in out.stdout, out.stdout
    assert "all-reduce" in out.stdout and "params + optimizer" in out.stdout
    # A mesh the model cannot split fails with the reason, before compiling.
    bad = subprocess.run(cmd + ["--config.mesh.tensor=8", "--config.mesh.data=2"], cwd=repo, env=env,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and "num_heads=4 is not divisible by the 8-way" in bad.stderr, bad.stderr[-2000:]


def test_rule_table_conflicts_raise_and_presets_are_separate_tables():
    rules = {"batch": ("data", "fsdp"), "embed": "fsdp"}
    with pytest.raises(ValueError, match=r"logical axes 'batch' and 'embed' of one array \('batch', 'length', "
                                         r"'embed'\) both map to mesh axis 'fsdp'"):
        sharding.logical_to_spec(("batch", "length", "embed"), rules)
    assert sharding.logical_to_spec(("embed", "mlp"), rules) == jax.sharding.PartitionSpec("fsdp", None)
    presets = sharding.PRESETS
    assert presets["dp_tp"] is not presets["tp"] and presets["dp_tp"] == presets["tp"]
    sharding.rules_for("dp_tp")["heads"] = None  # a copy: the preset is untouched
    assert sharding.PRESETS["dp_tp"]["heads"] == "tensor"
    # Logical names live in Flax NNX sharding metadata, the stacked `layers` axis included.
    _, abstract = training.abstract_model(tformer.DecoderLM, CFG)
    assert abstract["blocks"]["layers"]["attn"]["wq"].get_metadata()["out_sharding"] == (
        "layers", "embed", "heads", "head_dim")
