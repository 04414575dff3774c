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

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, SingleDeviceSharding

import tformer
from tformer import pipeline
from tformer import plan as plan_lib
from tformer import sharding as shd
from tformer import train_step as ts

# 4 layers (split 2 or 4 ways), 8 query / 4 KV heads (GQA, split over tensor),
# no biases (see test_sharding.py: a key bias's gradient is pure rounding noise).
CFG = tformer.ModelConfig(
    vocab_size=250, d_model=64, num_heads=8, num_kv_heads=4, d_ff=128, num_layers=4, max_len=32,
    positions="rope", norm="rmsnorm", activation="swiglu", use_bias=False, tie_embeddings=False, scan_layers=True,
)
B, T, STEPS = 8, 16, 3
OPT = ts.OptimizerConfig(learning_rate=1e-2, warmup_steps=0, total_steps=STEPS, weight_decay=0.1, clip_norm=1.0,
                         eps=1e-4)
RULES = shd.rules_for("tp")  # with layers -> stage and length -> sequence, like every preset


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
    return shd.make_mesh(shape, devices=jax.devices()[: math.prod(shape.values())])


@functools.lru_cache(maxsize=None)
def run(shape: tuple | None, microbatches: int | None, kind: str):
    """(losses, final state as numpy, final state's shardings, compiled HLO) of STEPS steps; shared by tests."""
    batches = BATCHES[kind]()
    mesh = None if shape is None else mesh_of(dict(shape))
    graphdef, tx, state, state_sh = ts.create_train_state(tformer.DecoderLM, CFG, OPT, 0, mesh,
                                                          None if mesh is None else RULES)
    if mesh is None:
        step, put = ts.make_train_step(graphdef, tx, OPT), (lambda b: b)
    else:
        batch_sh = ts.batch_sharding(mesh, RULES, batches[0])
        step = ts.make_train_step(graphdef, tx, OPT, mesh=mesh, rules=RULES, state_sharding=state_sh,
                                  batch_sharding=batch_sh, microbatches=microbatches)
        put = functools.partial(jax.device_put, device=batch_sh)
    compiled = step.lower(state, put(batches[0])).compile()
    losses = []
    for b in batches:
        state, m = compiled(state, put(b))
        losses.append(float(m["loss"]))
    shardings = jax.tree.map(lambda a: a.sharding, state)
    return losses, jax.tree.map(np.asarray, state), shardings, compiled.as_text()


def assert_same_training(got, ref, what):
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-5, err_msg=f"{what}: per-step loss differs from one device")
    flat_ref = dict(jax.tree_util.tree_leaves_with_path(ref[1].params))
    for path, value in jax.tree_util.tree_leaves_with_path(got[1].params):
        want = flat_ref[path]
        np.testing.assert_allclose(value, want, rtol=1e-5, atol=1e-5 * float(np.max(np.abs(want))),
                                   err_msg=f"{what}: parameter {jax.tree_util.keystr(path)} differs after {STEPS} steps")


PP_CASES = [  # (mesh, microbatches)
    ({"stage": 2}, 2), ({"stage": 4}, 4), ({"stage": 4}, 8), ({"data": 2, "stage": 4}, 4),
    ({"stage": 2, "tensor": 2, "data": 2}, None),  # default: 2 x stages = 4
]
SP_CASES = [({"sequence": 2}, None), ({"sequence": 4}, None), ({"data": 2, "sequence": 4}, None),
            ({"sequence": 2, "tensor": 2, "data": 2}, None)]
PLAIN = {(("stage", 4),), (("data", 2), ("stage", 4)), (("sequence", 4),)}  # also run on unpacked batches


def case_id(shape, mb):
    return "x".join(f"{k}{v}" for k, v in shape.items()) + (f"-mb{mb}" if mb else "")


@pytest.mark.parametrize("shape,mb", PP_CASES + SP_CASES, ids=[case_id(*c) for c in PP_CASES + SP_CASES])
def test_trains_like_one_device(shape, mb):
    key = tuple(shape.items())
    for kind in ("packed", "plain") if key in PLAIN else ("packed",):
        assert_same_training(run(key, mb, kind), run(None, None, kind), f"{shape} microbatches={mb} {kind}")


# ---------------------------------------------------------------------------
# Placement: each stage's devices hold only their layers (params and Adam moments).


@pytest.mark.parametrize("shape,mb", [PP_CASES[3], PP_CASES[4]], ids=[case_id(*PP_CASES[3]), case_id(*PP_CASES[4])])
def test_each_stage_holds_only_its_layers(shape, mb):
    _, state, shardings, _ = run(tuple(shape.items()), mb, "packed")
    mesh = mesh_of(shape)
    stages, per = shape["stage"], CFG.num_layers // shape["stage"]
    stage_axis = mesh.axis_names.index("stage")
    stage_of = {d: s for s in range(stages) for d in np.take(mesh.devices, s, axis=stage_axis).flat}
    leaves = jax.tree_util.tree_leaves_with_path(state)
    shs = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    stacked = 0
    for (path, leaf), sh in zip(leaves, shs, strict=True):
        name, indices = jax.tree_util.keystr(path), sh.devices_indices_map(leaf.shape)
        if "['blocks']" not in name:
            # Embeddings, head, final norm, counters: never split over stages.
            by_stage = [{str(indices[d]) for d, s in stage_of.items() if s == k} for k in range(stages)]
            assert all(b == by_stage[0] for b in by_stage), f"{name} is split over stages"
            continue
        assert leaf.shape[0] == CFG.num_layers and sh.shard_shape(leaf.shape)[0] == per, name
        for device, index in indices.items():
            s = stage_of[device]
            assert index[0] == slice(s * per, (s + 1) * per), f"{name}: a stage-{s} device holds layers {index[0]}"
        stacked += 1
    # Every stacked weight, its Adam first moment and its second moment.
    assert stacked == 3 * len(jax.tree.leaves(state.params["blocks"])), stacked


# ---------------------------------------------------------------------------
# What the compiled programs send.


def permutes_of(hlo: str, shape: tuple[int, ...]) -> list:
    return [c for c in plan_lib.parse_collectives(hlo) if c.kind == "collective-permute"
            and any(s == shape for _, s in c.shapes)]


@pytest.mark.parametrize("shape,mb", [PP_CASES[1], PP_CASES[3]], ids=[case_id(*PP_CASES[1]), case_id(*PP_CASES[3])])
def test_pipeline_sends_activations_between_stages(shape, mb):
    hlo = run(tuple(shape.items()), mb, "packed")[3]
    stages, local_rows = shape["stage"], B // mb // shape.get("data", 1)
    # GPipe: every tick but the last passes one microbatch's [rows, T, D]
    # activations to the next stage (forward), and the backward pass sends
    # their gradients back once per tick: 2 (M + S - 2) sends.
    sends = permutes_of(hlo, (local_rows, T, CFG.d_model))
    assert len(sends) == 2 * (mb + stages - 2), f"{len(sends)} activation collective-permutes"


@pytest.mark.parametrize("shape", [SP_CASES[1][0], SP_CASES[2][0]], ids=[case_id(SP_CASES[1][0], None),
                                                                         case_id(SP_CASES[2][0], None)])
def test_ring_passes_kv_blocks(shape):
    hlo = run(tuple(shape.items()), None, "packed")[3]
    n, rows = shape["sequence"], B // shape.get("data", 1)
    # Forward: K and V blocks move N - 1 times; backward: their gradients go
    # back the same N - 1 hops.
    block = (rows, T // n, CFG.kv_heads, CFG.head_dim_)
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
    graphdef, abstract = ts.abstract_model(tformer.DecoderLM, cfg)
    tx = ts.make_optimizer(OPT, abstract)
    sh = ts.state_shardings(tformer.DecoderLM, cfg, tx, mesh, RULES)
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                         ts.abstract_train_state(abstract, tx), sh)
    step = ts.make_train_step(graphdef, tx, OPT, mesh=mesh, rules=RULES, state_sharding=sh,
                              batch_sharding=ts.batch_sharding(mesh, RULES, batch))
    compiled = step.lower(state, batch).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp < 4 * full, f"{temp} temporary bytes per device; one [B, H, T, T] fp32 matrix is {4 * full}"
    biggest = largest_array(compiled.as_text())
    assert biggest <= full // 16, f"an array of {biggest} elements: more than one [B, H, T/4, T/4] block"
