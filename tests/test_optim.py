"""The optimizer and its schedule: the learning-rate factor reproduces optax's schedules, warmup-stable-decay
follows the run's progress (steps or time), Muon orthogonalises the hidden matrices and leaves the rest to AdamW."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import make_cfg
from flax import nnx

import tformer
from tformer import layers, training
from tformer.batch import lm_batch


def optax_reference(o: training.OptimizerConfig) -> optax.Schedule:
    """Linear warmup joined to optax's own decay schedules: what `training.schedule` must equal."""
    warm = optax.linear_schedule(0.0, o.learning_rate, max(o.warmup_steps, 1))
    n = max(o.total_steps - o.warmup_steps, 1)
    rest = {"cosine": optax.cosine_decay_schedule(o.learning_rate, n, alpha=o.min_lr_ratio),
            "linear": optax.linear_schedule(o.learning_rate, o.learning_rate * o.min_lr_ratio, n),
            "constant": optax.constant_schedule(o.learning_rate)}[o.schedule]
    return optax.join_schedules([warm, rest], [o.warmup_steps])


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
@pytest.mark.parametrize("warmup", [0, 5])
def test_schedule_equals_optax_warmup_then_decay(kind, warmup):
    o = training.OptimizerConfig(learning_rate=3e-3, warmup_steps=warmup, total_steps=40, schedule=kind,
                                 min_lr_ratio=0.1)
    ref, ours = optax_reference(o), training.schedule(o)
    for step in range(46):
        np.testing.assert_allclose(float(ours(step)), float(ref(step)), rtol=1e-5, atol=1e-9, err_msg=f"step {step}")


def test_wsd_is_flat_then_decays_linearly_over_the_last_fraction():
    o = training.OptimizerConfig(learning_rate=1.0, warmup_steps=10, total_steps=110, schedule="wsd",
                                 decay_fraction=0.25, min_lr_ratio=0.0)
    f = [float(training.lr_factor(o, s)) for s in range(111)]
    assert f[5] == pytest.approx(0.5)  # warmup
    assert f[10:85] == [1.0] * 75  # stable until 75% of the 100 post-warmup steps
    np.testing.assert_allclose(f[85:111], np.linspace(1.0, 0.0, 26), atol=1e-6)  # then down to min_lr_ratio
    # A time-budgeted run: the progress it passes, not the step, places the decay.
    assert float(training.lr_factor(o, 20, progress=0.2)) == 1.0
    assert float(training.lr_factor(o, 20, progress=(10 + 0.875 * 100) / 110)) == pytest.approx(0.5)
    assert float(training.lr_factor(o, 20, progress=1.0)) == 0.0


def test_train_step_follows_the_progress_it_is_given():
    cfg = make_cfg(num_layers=1, init_std=0.02)
    o = training.OptimizerConfig(learning_rate=1e-2, warmup_steps=0, total_steps=100, schedule="wsd",
                                 decay_fraction=0.5, min_lr_ratio=0.0)
    graphdef, tx, state, _ = training.create_train_state(tformer.DecoderLM, cfg, o)
    step = training.make_train_step(graphdef, tx, o, donate=False)
    batch = lm_batch(jnp.asarray(np.arange(2 * 9).reshape(2, 9) % 30 + 3, jnp.int32))
    _, by_step = step(state, batch)
    _, late = step(state, batch, np.float32(0.75))
    done, final = step(state, batch, np.float32(1.0))
    assert float(by_step["lr"]) == pytest.approx(1e-2) and float(late["lr"]) == pytest.approx(5e-3)
    assert float(final["lr"]) == 0.0  # the factor scales the whole update: none at lr 0
    for a, b in zip(jax.tree.leaves(done.params), jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_muon_routes_hidden_matrices_and_leaves_embeddings_head_and_norms_to_adamw():
    cfg = make_cfg(tie_embeddings=False, use_bias=True, norm="rmsnorm")
    specs = training.muon_specs(training.abstract_model(tformer.DecoderLM, cfg)[1])
    attn, mlp = specs["blocks"]["layers"]["attn"], specs["blocks"]["layers"]["mlp"]
    # Axis 0 is the stacked `layers` axis (a batch axis for Newton-Schulz).
    assert attn["wq"] == "muon:1:2,3" and attn["wo"] == "muon:1,2:3"
    assert mlp["w_in"] == "muon:1:2" and mlp["w_out"] == "muon:1:2"
    assert specs["embed"]["table"] == specs["embed"]["head"] == "adamw"
    assert attn["bq"] == mlp["b_in"] == specs["final_norm"]["scale"] == "adamw"


def test_muon_update_is_orthogonal_for_matrices_and_adamw_elsewhere():
    cfg = make_cfg(num_layers=1, init_std=0.02)
    o = training.OptimizerConfig(name="muon", learning_rate=1e-3, muon_learning_rate=0.05, warmup_steps=0,
                                 weight_decay=0.0, clip_norm=None)
    graphdef, tx, state, _ = training.create_train_state(tformer.DecoderLM, cfg, o)
    batch = lm_batch(jnp.asarray(np.arange(4 * 13).reshape(4, 13) * 7 % 30 + 3, jnp.int32))
    adam = optax.adamw(o.learning_rate, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=0.0)

    @jax.jit
    def first_updates(params, opt_state):
        grads = jax.grad(lambda p: training.loss_sums(graphdef, p, batch, o)["loss_sum"])(params)
        return grads, tx.update(grads, opt_state, params)[0], adam.update(grads, adam.init(params), params)[0]

    grads, updates, ref = first_updates(state.params, state.opt_state)
    # AdamW's first step on the other parameters, unchanged.
    for path in (("embed", "table"), ("final_norm", "scale")):
        got, want = updates[path[0]][path[1]], ref[path[0]][path[1]]
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-9)
    # Muon: the update's singular values are close to one value (Newton-Schulz flattens the spectrum),
    # while the gradient's spread. wq [layers, embed, heads, head_dim] is one
    # [embed, heads * head_dim] matrix per layer.
    for name in ("wq", "wo"):
        u = np.asarray(updates["blocks"]["layers"]["attn"][name][0])
        g = np.asarray(grads["blocks"]["layers"]["attn"][name][0])
        rows = u.shape[0] if name == "wq" else u.shape[0] * u.shape[1]
        su, sg = (np.linalg.svd(x.reshape(rows, -1), compute_uv=False) for x in (u, g))
        top = len(su) * 3 // 4  # the smallest quarter: the input is centred (LayerNorm), rank-deficient
        # 5 quintic Newton-Schulz steps land singular values in about [0.7, 1.2] (not exactly 1): a spread
        # under 2x, against the gradient's 30x and more.
        assert su[0] / su[top] < 2.0, (name, su)
        assert sg[0] / sg[top] > 10, (name, sg)


def test_muon_trains_a_tiny_model():
    cfg = make_cfg(num_layers=1, init_std=0.02, qk_norm=True, activation="relu2")
    o = training.OptimizerConfig(name="muon", learning_rate=1e-2, muon_learning_rate=0.02, warmup_steps=0,
                                 total_steps=30, schedule="wsd")
    graphdef, tx, state, _ = training.create_train_state(tformer.DecoderLM, cfg, o)
    step = training.make_train_step(graphdef, tx, o)
    batch = lm_batch(jnp.asarray(np.tile(np.arange(17) % 5 + 3, (4, 1)), jnp.int32))
    losses = []
    for _ in range(30):
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
    assert losses[-1] < 0.2 * losses[0], losses


def test_muon_with_lora_is_refused_naming_the_fix():
    cfg = make_cfg()
    o = training.OptimizerConfig(name="muon")
    lora = tformer.LoraConfig(rank=2)
    with pytest.raises(ValueError, match=r"OptimizerConfig.name='muon' does not apply to LoRA adapters .* use "
                                         r"name='adamw' with LoRA"):
        training.create_train_state(tformer.DecoderLM, cfg, o, lora=lora)


def test_qk_norm_makes_attention_invariant_to_the_scale_of_wq_and_wk():
    model = tformer.DecoderLM(make_cfg(qk_norm=True, positions="rope", norm="rmsnorm"), rngs=nnx.Rngs(0))
    tokens = jnp.asarray([[3, 9, 4, 17, 5, 11]], jnp.int32)
    before = model(tokens)
    attn = model.blocks.layers.attn
    attn.wq[...] = attn.wq[...] * 7.0
    attn.wk[...] = attn.wk[...] * 0.2
    np.testing.assert_allclose(np.asarray(model(tokens)), np.asarray(before), rtol=1e-4, atol=1e-4)
    plain = tformer.DecoderLM(make_cfg(positions="rope", norm="rmsnorm"), rngs=nnx.Rngs(0))
    plain.blocks.layers.attn.wq[...] = plain.blocks.layers.attn.wq[...] * 7.0
    assert np.abs(np.asarray(plain(tokens)) - np.asarray(before)).max() > 1e-2  # without it, the scale matters


def test_relu2_is_relu_squared():
    cfg = make_cfg(activation="relu2", use_bias=False)
    mlp = layers.MLP(cfg, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 3, cfg.d_model))
    want = jnp.maximum(x @ mlp.w_in[...], 0.0) ** 2 @ mlp.w_out[...]
    np.testing.assert_allclose(np.asarray(mlp(x)), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_muon_on_an_fsdp_mesh_shards_its_momentum_like_the_weights_and_trains_like_one_device():
    from tformer import sharding

    cfg = make_cfg(num_layers=2, init_std=0.02, positions="rope", norm="rmsnorm", qk_norm=True, use_bias=False)
    o = training.OptimizerConfig(name="muon", learning_rate=3e-3, warmup_steps=1, total_steps=10, schedule="wsd")
    mesh, rules = sharding.make_mesh({"data": 1, "fsdp": 8, "tensor": 1}), sharding.rules_for("fsdp")
    graphdef, tx, state, state_sh = training.create_train_state(tformer.DecoderLM, cfg, o, 0, mesh, rules)
    muon_state = state.opt_state[1].inner_states["muon"].inner_state[0]
    for name in ("wq", "wo"):
        assert muon_state.mu["blocks"]["layers"]["attn"][name].sharding == \
            state.params["blocks"]["layers"]["attn"][name].sharding
    batch = lm_batch(jnp.asarray(np.arange(8 * 13).reshape(8, 13) * 5 % 30 + 3, jnp.int32))
    batch_sh = training.batch_sharding(mesh, rules, batch)
    step = training.make_train_step(graphdef, tx, o, mesh=mesh, rules=rules, state_sharding=state_sh,
                                    batch_sharding=batch_sh)
    graphdef1, tx1, state1, _ = training.create_train_state(tformer.DecoderLM, cfg, o)
    step1 = training.make_train_step(graphdef1, tx1, o)
    for i in range(3):
        state, m = step(state, jax.device_put(batch, batch_sh), np.float32(i / 3))
        state1, m1 = step1(state1, batch, np.float32(i / 3))
        np.testing.assert_allclose(float(m["loss"]), float(m1["loss"]), rtol=1e-5)


@pytest.mark.parametrize("max_norm", [1e5, 0.5])  # the norm is ~9e3: kept as it is, then scaled down
def test_global_norm_and_its_clip_are_optax(max_norm):
    ks = jax.random.split(jax.random.key(5), 4)
    # Sizes that chunk (4 x 64 x 32), that do not (65 x 3), a short vector and a scalar; rows far from zero.
    tree = {"w": 1e2 * jax.random.normal(ks[0], (4, 64, 32)), "odd": jax.random.normal(ks[1], (65, 3)),
            "v": jax.random.normal(ks[2], (32,)), "s": jnp.asarray(3.0)}
    want = optax.tree.norm(tree)
    np.testing.assert_allclose(float(jax.jit(training.global_norm)(tree)), float(want), rtol=1e-6)
    ours, theirs = training.clip_by_global_norm(max_norm), optax.clip_by_global_norm(max_norm)
    got = jax.jit(lambda t: ours.update(t, ours.init(t))[0])(tree)
    ref = theirs.update(tree, theirs.init(tree))[0]
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    assert jax.tree.structure(ours.init(tree)) == jax.tree.structure(theirs.init(tree))  # checkpoints unchanged
