"""Pipeline (`stage`) and sequence (`sequence`) parallelism on 8 fake CPU devices (see conftest.py).

Every mesh must train exactly like one device (plain batches, and packed
documents with segment ids, restarting positions and padding); each stage
must hold only its own layers and their Adam moments; the compiled programs
must send activations / K-V blocks with collective-permutes and, for
sequence parallelism, never hold a [B, H, T, T] score matrix; bad meshes
must fail before compiling, naming the field; checkpoints and generation
must not care about the mesh.
"""

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_trains_alike
from flax import nnx
from jax.sharding import NamedSharding, SingleDeviceSharding

import tformer
from tformer import plan as plan_lib
from tformer import ring_attention, sharding, training

# 4 layers (split 2 or 4 ways), 8 query / 4 KV heads (GQA, split over tensor),
# no biases (see test_sharding.py: a key bias's gradient is pure rounding noise).
CFG = tformer.ModelConfig(
    vocab_size=250, d_model=64, num_heads=8, num_kv_heads=4, d_ff=128, num_layers=4, max_len=32,
    positions="rope", norm="rmsnorm", activation="swiglu", use_bias=False, tie_embeddings=False, scan_layers=True,
)
B, T, STEPS = 8, 16, 3
OPT = training.OptimizerConfig(learning_rate=1e-2, warmup_steps=0, total_steps=STEPS, weight_decay=0.1, clip_norm=1.0,
                         eps=1e-4)
RULES = sharding.rules_for("tp")  # with layers -> stage and length -> sequence, like every preset


def plain_batches(seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(STEPS):
        tokens = rng.integers(3, CFG.vocab_size, (B, T + 1)).astype(np.int32)
        weights = (rng.random((B, T)) > 0.1).astype(np.float32)
        out.append({"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": weights})
    return out


def packed_batches(seed=1):
    """Rows of 1-3 documents (segment ids 1, 2, 3; positions restart) and tail padding (segment 0).

    The last row is all padding; one document boundary falls inside every
    4-position sequence shard in some row, so the ring's masks must be exact.
    """
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(STEPS):
        tokens = rng.integers(3, CFG.vocab_size, (B, T + 1)).astype(np.int32)
        seg = np.zeros((B, T), np.int32)
        pos = np.zeros((B, T), np.int32)
        for r in range(B - 1):
            end = T - int(rng.integers(0, 6)) if r % 2 else T  # odd rows padded
            cuts = sorted(rng.choice(np.arange(1, end), size=int(rng.integers(0, 3)), replace=False).tolist())
            for i, (a, b) in enumerate(zip([0] + cuts, cuts + [end])):
                seg[r, a:b] = i + 1
                pos[r, a:b] = np.arange(b - a)
        tokens[:, :-1][seg == 0] = 0
        out.append({"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": seg, "positions": pos,
                    "weights": (seg != 0).astype(np.float32)})
    return out


BATCHES = {"plain": plain_batches, "packed": packed_batches}


def mesh_of(shape: dict):
    return sharding.make_mesh(shape, devices=jax.devices()[: math.prod(shape.values())])


CFG8 = CFG.replace(num_layers=8)  # stage 4 x 2 virtual stages: 8 layer groups


def run(shape: tuple | None, microbatches: int | None, kind: str, virtual_stages: int = 1, cfg=CFG):
    """(per-step [loss, grad norm], final state as numpy, its shardings, compiled HLO) of STEPS steps."""
    return _run(shape, microbatches, kind, virtual_stages, cfg)


def _train_setup(model_cls, cfg, batches, shape, microbatches, virtual_stages=1):
    """(state, jitted step, batch placement) for `model_cls` on the mesh `shape` (None: one device)."""
    mesh = None if shape is None else mesh_of(dict(shape))
    graphdef, tx, state, state_sh = training.create_train_state(model_cls, cfg, OPT, 0, mesh,
                                                          None if mesh is None else RULES,
                                                          virtual_stages=virtual_stages)
    if mesh is None:
        return state, training.make_train_step(graphdef, tx, OPT), (lambda b: b)
    batch_sh = training.batch_sharding(mesh, RULES, batches[0])
    step = training.make_train_step(graphdef, tx, OPT, mesh=mesh, rules=RULES, state_sharding=state_sh,
                              batch_sharding=batch_sh, microbatches=microbatches, virtual_stages=virtual_stages)
    return state, step, functools.partial(jax.device_put, device=batch_sh)


@functools.cache
def _run(shape, microbatches, kind, virtual_stages, cfg):
    batches = BATCHES[kind]()
    state, step, put = _train_setup(tformer.DecoderLM, cfg, batches, shape, microbatches, virtual_stages)
    compiled = step.lower(state, put(batches[0])).compile()
    losses = []
    for b in batches:
        state, m = compiled(state, put(b))
        losses.append([float(m["loss"]), float(m["grad_norm"])])
    shardings = jax.tree.map(lambda a: a.sharding, state)
    mesh = None if shape is None else mesh_of(dict(shape))
    in_model_order = training.in_model_order(state, mesh, virtual_stages, shardings)
    # The state as trained (schedule order under virtual stages) is kept on the devices for the placement test.
    return losses, jax.tree.map(np.asarray, in_model_order), shardings, compiled.as_text(), state


def assert_same_training(got, ref, what):
    assert_trains_alike(got[0], got[1].params, ref[0], ref[1].params, OPT, STEPS, what)


PP_CASES = [  # (mesh, microbatches, virtual stages)
    ({"stage": 2}, 2, 1), ({"stage": 4}, 4, 1), ({"data": 2, "stage": 4}, 4, 1),
    ({"stage": 2, "tensor": 2, "data": 2}, None, 2),  # default: 2 x stages = 4 microbatches
    ({"stage": 4, "data": 2}, 4, 2),  # 8 layers (CFG8): stage s holds groups s and s + 4
    ({"data": 2, "stage": 2, "sequence": 2}, None, 1),  # ring attention inside each pipeline stage
    ({"stage": 2, "tensor": 2, "sequence": 2}, None, 1),
]
SP_CASES = [({"sequence": 2}, None, 1), ({"sequence": 4}, None, 1), ({"data": 2, "sequence": 4}, None, 1),
            ({"sequence": 2, "tensor": 2, "data": 2}, None, 1)]
PLAIN = {(("data", 2), ("stage", 4)), (("sequence", 4),)}  # also run on unpacked batches


def case_id(shape, mb, v=1):
    return "x".join(f"{k}{v}" for k, v in shape.items()) + (f"-mb{mb}" if mb else "") + (f"-v{v}" if v > 1 else "")


def cfg_for(shape, v):
    return CFG8 if shape.get("stage", 1) * v > CFG.num_layers else CFG


@pytest.mark.parametrize("shape,mb,v", PP_CASES + SP_CASES, ids=[case_id(*c) for c in PP_CASES + SP_CASES])
def test_trains_like_one_device(shape, mb, v):
    # Tolerances: see assert_same_training.
    key, cfg = tuple(shape.items()), cfg_for(shape, v)
    for kind in ("packed", "plain") if key in PLAIN else ("packed",):
        assert_same_training(run(key, mb, kind, v, cfg), run(None, None, kind, 1, cfg),
                             f"{shape} microbatches={mb} virtual_stages={v} {kind}")


# ---------------------------------------------------------------------------
# Placement: each stage's devices hold only their layers (params and Adam moments).


def _stage_of_device(mesh) -> dict:
    stage_axis = mesh.axis_names.index("stage")
    return {d: s for s in range(mesh.shape["stage"]) for d in np.take(mesh.devices, s, axis=stage_axis).flat}


def _is_stacked(path) -> bool:
    return any(isinstance(k, jax.tree_util.DictKey) and k.key == "layers" for k in path)


@pytest.mark.parametrize("shape,mb,v", PP_CASES[2:5], ids=[case_id(*c) for c in PP_CASES[2:5]])
def test_each_stage_holds_only_its_layers(shape, mb, v):
    # Stage s's devices hold a block of L / S rows of every stacked weight and of its Adam moments; under
    # virtual stages that block is groups s, s + S, ... (schedule order), so the step moves no layer weights.
    cfg = cfg_for(shape, v)
    _, in_model_order, shardings, _, stored = run(tuple(shape.items()), mb, "packed", v, cfg)
    stages, per = shape["stage"], cfg.num_layers // shape["stage"]
    stage_of = _stage_of_device(mesh_of(shape))
    leaves = jax.tree_util.tree_leaves_with_path(stored)
    shs = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    stacked = 0
    for (path, leaf), sh in zip(leaves, shs, strict=True):
        name, indices = jax.tree_util.keystr(path), sh.devices_indices_map(leaf.shape)
        if not _is_stacked(path):
            # Embeddings, head, final norm, counters: never split over stages.
            by_stage = [{str(indices[d]) for d, s in stage_of.items() if s == k} for k in range(stages)]
            assert all(b == by_stage[0] for b in by_stage), f"{name} is split over stages"
            continue
        assert leaf.shape[0] == cfg.num_layers and sh.shard_shape(leaf.shape)[0] == per, name
        for device, index in indices.items():
            s = stage_of[device]
            assert index[0] == slice(s * per, (s + 1) * per), f"{name}: a stage-{s} device holds rows {index[0]}"
        stacked += 1
    # Every stacked weight, its Adam first moment and its second moment.
    assert stacked == 3 * len(jax.tree.leaves(in_model_order.params["blocks"])), stacked


@pytest.mark.slow
def test_virtual_stages_hold_their_layer_groups():
    # (stage 4, virtual 2, data 2), 8 layers in 8 groups of 1: every device's shard of every stacked weight and
    # of its Adam mu / nu is [2, ...] and holds model layers s and s + 4 of its stage s, i.e. the one-device
    # run's layers s and s + 4 (to the runs' rounding; neighbouring layers differ by O(lr) after 3 steps).
    shape, mb, v = PP_CASES[4]
    key, cfg = tuple(shape.items()), cfg_for(shape, v)
    _, _, _, hlo, stored = run(key, mb, "packed", v, cfg)
    ref = run(None, None, "packed", 1, cfg)[1]
    # So the step gathers no layer weights: with every weight replicated or split over `stage` alone (tensor 1),
    # the program has no all-gather at all (a state holding contiguous layers all-gathered the groups every step).
    assert not [c for c in plan_lib.parse_collectives(hlo) if c.kind == "all-gather"]
    stages, groups = shape["stage"], shape["stage"] * v
    stage_of = _stage_of_device(mesh_of(shape))
    flat_ref = dict(jax.tree_util.tree_leaves_with_path(ref))
    checked = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(stored):
        if not _is_stacked(path):
            continue
        want_all = flat_ref[path]
        tol = 1e-3 * float(np.max(np.abs(want_all))) + 1e-12
        for shard in leaf.addressable_shards:
            s = stage_of[shard.device]
            got = np.asarray(shard.data)
            want = want_all[[g for g in range(groups) if g % stages == s]]
            assert got.shape == want.shape == (v,) + leaf.shape[1:], (jax.tree_util.keystr(path), got.shape)
            err = float(np.max(np.abs(got - want)))
            assert err <= tol, f"{jax.tree_util.keystr(path)} on a stage-{s} device: off by {err:.3g} (tol {tol:.3g})"
        checked += 1
    assert checked == 3 * len(jax.tree.leaves(ref.params["blocks"])), checked  # params, Adam mu, Adam nu


# ---------------------------------------------------------------------------
# What the compiled programs send.


def permutes_of(hlo: str, shape: tuple[int, ...]) -> list:
    return [c for c in plan_lib.parse_collectives(hlo) if c.kind == "collective-permute"
            and any(s == shape for _, s in c.shapes)]


@pytest.mark.parametrize("shape,mb,v", PP_CASES[1:3], ids=[case_id(*c) for c in PP_CASES[1:3]])
def test_pipeline_sends_activations_between_stages(shape, mb, v):
    # The ticks are one scan: its body passes one microbatch's [rows, T, D] activations to the next stage,
    # and the backward scan sends their gradients back: 2 collective-permutes in the program, whatever M.
    hlo = run(tuple(shape.items()), mb, "packed", v)[3]
    local_rows = B // mb // shape.get("data", 1)
    assert len(permutes_of(hlo, (local_rows, T, CFG.d_model))) == 2


def compiled_text(shape: dict, microbatches: int, virtual_stages: int = 1, batch: int = B) -> str:
    """The compiled train step's HLO on abstract inputs (nothing runs)."""
    mesh = mesh_of(shape)
    graphdef, abstract = training.abstract_model(tformer.DecoderLM, CFG)
    tx = training.make_optimizer(OPT, abstract)
    sh = training.state_shardings(tformer.DecoderLM, CFG, tx, mesh, RULES)
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                         training.abstract_train_state(abstract, tx), sh)
    tok = jax.ShapeDtypeStruct((batch, T), jnp.int32)
    lm_batch = {"inputs": tok, "targets": tok}
    step = training.make_train_step(graphdef, tx, OPT, mesh=mesh, rules=RULES, state_sharding=sh,
                              batch_sharding=training.batch_sharding(mesh, RULES, lm_batch), microbatches=microbatches,
                              virtual_stages=virtual_stages)
    return step.lower(state, lm_batch).compile().as_text()


def test_schedule_program_does_not_grow_with_microbatches():
    # An unrolled schedule holds every tick's layers and sends: at M = 16 it has 33 ticks to M = 4's 9, and
    # the program ~3x the instructions. The scanned one holds one tick; only XLA's shape-dependent fusion
    # choices move its instruction count (by under 1% in experiments/schedules.py's figures).
    count = {m: len(re.findall(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=", compiled_text({"stage": 2}, m, 2, batch=16),
                               re.M)) for m in (4, 16)}
    assert abs(count[16] - count[4]) <= 0.05 * count[4], count


@pytest.mark.parametrize("shape", [SP_CASES[1][0], SP_CASES[2][0]], ids=[case_id(SP_CASES[1][0], None),
                                                                         case_id(SP_CASES[2][0], None)])
def test_ring_passes_kv_blocks(shape):
    hlo = run(tuple(shape.items()), None, "packed")[3]
    n, rows = shape["sequence"], B // shape.get("data", 1)
    # Forward: K and V blocks move N - 1 times; backward: their gradients go
    # back the same N - 1 hops.
    block = (rows, T // n, CFG.kv_heads, CFG.resolved_head_dim)
    assert len(permutes_of(hlo, block)) == 4 * (n - 1)
    # The visiting keys' positions and segment ids travel with them (forward only).
    assert len(permutes_of(hlo, (rows, T // n))) == 2 * (n - 1)


def largest_array(hlo: str) -> int:
    return max(math.prod(int(x) for x in dims.split(",") if x) for _, dims in plan_lib._ARRAY.findall(hlo))


def test_ring_attention_never_holds_the_full_score_matrix():
    # Einsum attention on one device materialises [B, H, T, T] fp32 scores;
    # the 4-way sequence-parallel step at T = 2,048 must not, on any device:
    # its largest array is one [B, H, T / 4, T / 4] block of scores, and all
    # its temporaries together stay below the one score matrix.
    cfg = tformer.ModelConfig(vocab_size=64, d_model=32, num_heads=2, num_layers=1, max_len=2048, attention="einsum",
                              positions="rope", norm="rmsnorm", use_bias=False)
    b, t, h = 1, 2048, cfg.num_heads
    full = b * h * t * t
    batch = {"inputs": jax.ShapeDtypeStruct((b, t), jnp.int32), "targets": jax.ShapeDtypeStruct((b, t), jnp.int32)}
    one = plan_lib.plan_train_step(tformer.DecoderLM, cfg, OPT, mesh_of({"data": 1}), "dp", batch=b, seq_len=t,
                                   batch_shapes=batch)
    assert one.temp_bytes >= 4 * full, "the one-device reference should hold the fp32 [B, H, T, T] scores"
    mesh = mesh_of({"sequence": 4})
    graphdef, abstract = training.abstract_model(tformer.DecoderLM, cfg)
    tx = training.make_optimizer(OPT, abstract)
    sh = training.state_shardings(tformer.DecoderLM, cfg, tx, mesh, RULES)
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                         training.abstract_train_state(abstract, tx), sh)
    step = training.make_train_step(graphdef, tx, OPT, mesh=mesh, rules=RULES, state_sharding=sh,
                              batch_sharding=training.batch_sharding(mesh, RULES, batch))
    compiled = step.lower(state, batch).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp < 4 * full, f"{temp} temporary bytes per device; one [B, H, T, T] fp32 matrix is {4 * full}"
    biggest = largest_array(compiled.as_text())
    assert biggest <= full // 16, f"an array of {biggest} elements: more than one [B, H, T/4, T/4] block"


# ---------------------------------------------------------------------------
# Bad meshes fail before anything compiles, naming the field.


def test_bad_meshes_fail_naming_the_field():
    with pytest.raises(ValueError, match=r"num_layers=4 is not divisible by mesh.stage=3; valid stage sizes are "
                                         r"\[1, 2, 4\]"):
        sharding.check_divisibility(CFG, mesh_of({"stage": 3}), RULES, B)
    with pytest.raises(ValueError, match=r"global batch size 8 is not divisible by data axes \(2\) x "
                                         r"mesh.microbatches \(8\); valid microbatches for this batch are \[1, 2, 4\]"):
        sharding.check_divisibility(CFG, mesh_of({"data": 2, "stage": 4}), RULES, B)  # default 2 x 4 microbatches
    with pytest.raises(ValueError, match=r"sequence length 18 is not divisible by mesh.sequence=4; valid sequence "
                                         r"sizes are \[1, 2, 3, 6, 9, 18\]"):
        sharding.check_divisibility(CFG, mesh_of({"sequence": 4}), RULES, B, seq_len=18)
    with pytest.raises(ValueError, match=r"num_layers=4 is not divisible by mesh.stage=4 x mesh.virtual_stages=2; "
                                         r"valid virtual_stages here are \[1\]"):
        sharding.check_divisibility(CFG, mesh_of({"stage": 4}), RULES, B, microbatches=4, virtual_stages=2)
    with pytest.raises(ValueError, match=r"mesh.microbatches=2 < mesh.stage=4: the interleaved schedule"):
        sharding.check_divisibility(CFG8, mesh_of({"stage": 4}), RULES, B, microbatches=2, virtual_stages=2)
    with pytest.raises(ValueError, match=r"unknown mesh axes \['pipe'\]"):
        sharding.make_mesh({"pipe": 2})


def abstract_step(model_cls, cfg, mesh, batch, microbatches=None):
    """Trace (never compile) a train step: errors raised while tracing come before any compile."""
    graphdef, abstract = training.abstract_model(model_cls, cfg)
    tx = training.make_optimizer(OPT, abstract)
    state = training.abstract_train_state(abstract, tx)
    step = functools.partial(training.train_step, graphdef, tx, OPT, layout=sharding.layout(mesh, RULES),
                             microbatches=microbatches)
    return jax.eval_shape(step, state, batch)


def test_step_refuses_what_the_mesh_cannot_run():
    lm_batch = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), plain_batches()[0])
    with pytest.raises(ValueError, match=r"batch size 8 is not divisible by mesh.microbatches=3"):
        abstract_step(tformer.DecoderLM, CFG, mesh_of({"stage": 2}), lm_batch, microbatches=3)
    with pytest.raises(ValueError, match=r"lengths 16 \(queries\) and 16 \(keys\) must be divisible by "
                                         r"mesh.sequence=3"):
        abstract_step(tformer.DecoderLM, CFG, mesh_of({"sequence": 3}), lm_batch)
    s2s = CFG.replace(num_encoder_layers=3)
    i32 = jax.ShapeDtypeStruct((B, T), jnp.int32)
    s2s_batch = {"src": i32, "tgt_inputs": i32, "tgt_targets": i32, "tgt_weights": i32}
    with pytest.raises(ValueError, match=r"ModelConfig.num_encoder_layers=3 is not divisible by mesh.stage=2 x "
                                         r"mesh.virtual_stages=1"):
        abstract_step(tformer.EncoderDecoder, s2s, mesh_of({"stage": 2}), s2s_batch)


# ---------------------------------------------------------------------------
# Checkpoints, generation and the plan.


def test_checkpoint_saved_under_a_pipeline_restores_anywhere(tmp_path):
    from tformer.checkpoint import Checkpointer, abstract_like

    save_mesh = mesh_of({"data": 2, "stage": 4})
    _, tx, state, _ = training.create_train_state(tformer.DecoderLM, CFG, OPT, 7, save_mesh, RULES)
    state = training.TrainState(step=state.step + 5, params=state.params,
                          opt_state=jax.tree.map(lambda m: m + 0.5 if m.dtype == jnp.float32 else m, state.opt_state),
                          rng=state.rng)
    wq = state.params["blocks"]["layers"]["attn"]["wq"]
    assert wq.sharding.shard_shape(wq.shape)[0] == 1, "saved with one layer per stage"
    expected = jax.tree.map(np.asarray, state)
    ckpt = Checkpointer(tmp_path, async_save=False)
    ckpt.save(5, state)
    ckpt.wait()
    dp = training.state_shardings(tformer.DecoderLM, CFG, tx, mesh_of({"data": 8}), sharding.rules_for("dp"))
    one = jax.tree.map(lambda _: SingleDeviceSharding(jax.devices()[0]), state)
    for name, shardings in (("(8,1,1)", dp), ("one device", one)):
        restored, _ = Checkpointer(tmp_path).restore(5, target=abstract_like(state, shardings))
        for (path, got), want, sh in zip(jax.tree_util.tree_leaves_with_path(restored), jax.tree.leaves(expected),
                                         jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(
                                             x, (NamedSharding, SingleDeviceSharding)))):
            assert got.sharding.is_equivalent_to(sh, got.ndim), f"{name}: {jax.tree_util.keystr(path)} sharding"
            np.testing.assert_array_equal(np.asarray(got), want, err_msg=f"{name}: {jax.tree_util.keystr(path)}")


def test_generation_with_pipeline_placed_parameters():
    cfg = CFG.replace(init_std=0.3, eos_id=2)  # spread logits: greedy choices are not near-ties
    model = tformer.DecoderLM(cfg, rngs=nnx.Rngs(3))
    prompts = np.random.default_rng(0).integers(3, 250, (B, 5)).astype(np.int32)
    lengths = [5, 3, 4, 5, 2, 5, 1, 4]
    ref = tformer.generate(model, prompts, tformer.Decode(6, eos_id=-1), lengths=lengths)
    assert len(np.unique(np.asarray(ref.tokens))) > 8, "degenerate reference: the comparison would prove little"
    mesh = mesh_of({"data": 2, "stage": 4})
    graphdef, state = nnx.split(model)
    placed = nnx.merge(graphdef, jax.device_put(state, sharding.state_shardings(state, mesh, RULES)))
    wq = placed.blocks.layers.attn.wq[...]
    assert wq.sharding.shard_shape(wq.shape)[0] == 1, "one layer per stage"
    out = tformer.generate(placed, prompts, tformer.Decode(6, eos_id=-1), lengths=lengths, mesh=mesh, rules=RULES)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))


def test_plan_reports_the_schedule():
    mesh = mesh_of({"data": 2, "stage": 2})
    p = plan_lib.plan_train_step(tformer.DecoderLM, CFG, OPT, mesh, RULES, batch=B, seq_len=T, microbatches=4,
                                 virtual_stages=2)
    assert (p.stages, p.microbatches, p.virtual_stages) == (2, 4, 2)
    assert p.bubble_fraction == pytest.approx(1 / 9)  # (S - 1) / (V M + S - 1)
    assert "2 stages x 4 microbatches (interleaved, 2 virtual stages), bubble 11.1%" in p.table()
    # Per device: the embedding and head whole, two of the four layers (fp32; Adam: 2 moments + a counter).
    c = CFG
    layer = c.d_model * c.num_heads * c.resolved_head_dim * 2 + 2 * c.d_model * c.kv_heads * c.resolved_head_dim \
        + 3 * c.d_model * c.resolved_d_ff + 2 * c.d_model
    ends = 2 * c.padded_vocab * c.d_model + c.d_model
    assert p.param_bytes == 4 * (ends + 2 * layer)
    # Activation sends of [1 row, T, D] fp32: one forward and one backward in the scanned schedule.
    shape = ("f32", (1, T, c.d_model))
    act = [x for x in p.collectives if x.kind == "collective-permute" and x.shapes == (shape,)]
    assert len(act) == 2 and sum(x.bytes for x in act) == 2 * 4 * math.prod(shape[1])


# ---------------------------------------------------------------------------
# A pipelined EncoderDecoder: both stacks split over the stages.

S2S = CFG.replace(num_encoder_layers=2, num_layers=2)


def s2s_batches(seed=2):
    """Packed pairs: rows of 1-2 (source, target) segments, tail padding, and the last row all padding."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(STEPS):
        src_seg, tgt_seg = np.zeros((B, T), np.int32), np.zeros((B, T), np.int32)
        for r in range(B - 1):
            src_end, tgt_end = T - int(rng.integers(0, 5)), T - int(rng.integers(0, 5))
            src_cut, tgt_cut = (int(rng.integers(2, src_end - 2)), int(rng.integers(2, tgt_end - 2))) if r % 2 \
                else (src_end, tgt_end)
            src_seg[r, :src_cut], src_seg[r, src_cut:src_end] = 1, 2
            tgt_seg[r, :tgt_cut], tgt_seg[r, tgt_cut:tgt_end] = 1, 2
        tokens = rng.integers(3, CFG.vocab_size, (3, B, T)).astype(np.int32)
        src = np.where(src_seg != 0, tokens[0], 0)
        out.append({"src": src, "tgt_inputs": np.where(tgt_seg != 0, tokens[1], 0), "tgt_targets": tokens[2],
                    "tgt_weights": (tgt_seg != 0).astype(np.float32), "src_segment_ids": src_seg,
                    "tgt_segment_ids": tgt_seg})
    return out


@functools.cache
def run_s2s(shape: tuple | None, microbatches: int | None):
    batches = s2s_batches()
    state, step, put = _train_setup(tformer.EncoderDecoder, S2S, batches, shape, microbatches)
    losses = []
    for b in batches:
        state, m = step(state, put(b))
        losses.append([float(m["loss"]), float(m["grad_norm"])])
    return losses, jax.tree.map(np.asarray, state)


@pytest.mark.parametrize("shape", [{"data": 4, "stage": 2}, {"data": 2, "stage": 2, "tensor": 2}],
                         ids=["data4xstage2", "data2xstage2xtensor2"])
def test_encoder_decoder_pipeline_trains_like_one_device(shape):
    # Same tolerance argument as test_trains_like_one_device: fp32, only summation order differs.
    assert_same_training(run_s2s(tuple(shape.items()), 2), run_s2s(None, None), f"EncoderDecoder on {shape}")


# ---------------------------------------------------------------------------
# The zigzag sequence layout: balanced causal ring attention.


def test_zigzag_layout_trains_like_one_device():
    # The layout permutes every [B, T] array of the batch once; masks follow positions and segments and the
    # loss is a sum over tokens, so losses and parameters match one device (same tolerance argument as above).
    zigzag = CFG.replace(sequence_layout="zigzag")
    got = run((("data", 2), ("sequence", 4)), None, "packed", 1, zigzag)
    assert_same_training(got, run(None, None, "packed"), "zigzag layout on data 2 x sequence 4")


def test_zigzag_layout_gives_every_device_the_same_causal_work():
    t, n = 64, 4
    pos = np.arange(t, dtype=np.int32)[None]
    order = ring_attention.zigzag_order(t, n)
    assert sorted(order.tolist()) == list(range(t))
    # Each device's slots split into two halves and each visiting K/V block too: 4 blocks a ring step.
    # Zigzag: 3 on the diagonal step (one is above it), then 2 a step: 2n + 1 on every device.
    zigzag = tformer.attention.Masking(q_pos=pos[:, order], k_pos=pos[:, order])
    assert ring_attention.computed_blocks(zigzag, n) == [2 * n + 1] * n
    # Consecutive: device d needs every block of the d devices before it and 3 of its own.
    consecutive = tformer.attention.Masking(q_pos=pos, k_pos=pos)
    assert ring_attention.computed_blocks(consecutive, n) == [3 + 4 * d for d in range(n)]
    with pytest.raises(ValueError, match=r"sequence length 36 must be divisible by 2 x mesh.sequence = 8"):
        ring_attention.zigzag_order(36, 4)
