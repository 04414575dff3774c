"""Cheaper variants compute what they claim: exact limits, causality, cached == parallel,
int8 close enough to decode the same tokens, and bad settings rejected by name."""

import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import tformer
from tformer.attention import Masking, _banded_attention, _einsum_attention, _masked_probs
from tformer.compress import param_bytes, with_config

V = 64


def make_cfg(**kw):
    base = dict(vocab_size=V, d_model=32, num_heads=4, num_kv_heads=2, num_layers=2, d_ff=48, max_len=32,
                vocab_multiple=64, init_std=0.3, positions="rope")
    base.update(kw)
    return tformer.ModelConfig(**base)


def qkv(b=2, t=13, h=4, kh=2, d=8, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(ks[0], (b, t, h, d)), jax.random.normal(ks[1], (b, t, kh, d)),
            jax.random.normal(ks[2], (b, t, kh, d)))


def packed_masking(t=13, window=None, causal=True):
    """Row 0: one plain sequence. Row 1: two packed documents, then padding (segment 0)."""
    seg = np.ones((2, t), np.int32)
    seg[1, 5:10], seg[1, 10:] = 2, 0
    pos = np.tile(np.arange(t), (2, 1))
    pos[1, 5:] = np.arange(t - 5)  # positions restart per document
    return Masking(jnp.asarray(pos), jnp.asarray(pos), jnp.asarray(seg), jnp.asarray(seg), causal=causal,
                   window=window)


REAL = np.array([[1] * 13, [1] * 10 + [0] * 3], np.float32)[:, :, None, None]  # packed_masking's real queries


def jitted(model, method="__call__"):
    """`model.<method>` compiled once (eager dispatch of every op is the slow part of these tests)."""
    graphdef, state = nnx.split(model)
    return jax.jit(lambda state, *a: getattr(nnx.merge(graphdef, state), method)(*a)).__get__(state)


def value_and_grads(fn, q, k, v):
    """Output and input gradients over the real queries (a padding query's output is never used)."""

    def real_only(q, k, v):
        out = fn(q, k, v)
        return out * REAL[: out.shape[0], : out.shape[1]]

    def both(q, k, v):
        out, vjp = jax.vjp(real_only, q, k, v)
        return (out,) + vjp(jnp.cos(out))

    return jax.jit(both)(q, k, v)


def assert_close(a, b, tol):
    """Each pair equal to `tol` relative to its largest entry (gradients reach ~10: fp32 sums reorder)."""
    for x, y in zip(a, b, strict=True):
        y = np.asarray(y)
        np.testing.assert_allclose(np.asarray(x), y, atol=tol * max(1.0, float(np.abs(y).max())), rtol=0)


# ---------------------------------------------------------------------------
# Exact limits.


def test_topk_all_keys_and_threshold_zero_equal_dense():
    q, k, v = qkv()
    mask = packed_masking(window=4).dense()
    dense = value_and_grads(lambda *a: _einsum_attention(*a, mask, 0.0, None), q, k, v)
    for kw in (dict(topk=13), dict(threshold=0.0)):
        got = value_and_grads(lambda *a, kw=kw: _einsum_attention(*a, mask, 0.0, None, **kw), q, k, v)
        assert_close(got, dense, 1e-6)


def test_topk_and_threshold_keep_what_they_say():
    logits = jax.random.normal(jax.random.key(3), (2, 3, 7, 9)) * 3
    mask = jnp.asarray(np.tril(np.ones((7, 9), bool), 2))  # row i allows i + 3 keys
    allowed = mask.sum(-1)
    p = _masked_probs(logits, mask, topk=4)
    assert ((p > 0).sum(-1) == np.minimum(4, allowed)).all()
    assert float(jnp.max(jnp.where(mask, 0.0, p))) == 0.0
    kept_min = jnp.min(jnp.where(p > 0, jnp.where(mask, logits, jnp.inf), jnp.inf), -1)
    dropped_max = jnp.max(jnp.where((p == 0) & mask, logits, -jnp.inf), -1)
    assert bool(jnp.all(kept_min > dropped_max))
    dense = _masked_probs(logits, mask)
    p = _masked_probs(logits, mask, threshold=0.1)
    np.testing.assert_allclose(np.asarray(p.sum(-1)), 1.0, atol=1e-6)
    assert bool(jnp.all((p > 0) == (dense >= 0.1) | (dense == dense.max(-1, keepdims=True))))


@pytest.mark.parametrize("window", [1, 5, 40])
def test_banded_window_equals_masked_dense(window):
    q, k, v = qkv()
    m = packed_masking(window=window)
    dense = value_and_grads(lambda *a: _einsum_attention(*a, m.dense(), 0.0, None), q, k, v)
    banded = value_and_grads(lambda *a: _banded_attention(*a, m, 0.0, None), q, k, v)
    assert_close(banded, dense, 1e-6)
    plain = Masking(m.q_pos[:1] * 0 + jnp.arange(13), m.k_pos[:1] * 0 + jnp.arange(13), window=window,
                    plain_causal=True)
    assert_close(_banded_attention(q[:1], k[:1], v[:1], plain, 0.0, None),
                 _einsum_attention(q[:1], k[:1], v[:1], plain.dense(), 0.0, None), 1e-6)


def test_banded_window_never_builds_a_length_squared_array():
    t, w = 512, 16
    q, k, v = qkv(b=1, t=t)
    m = Masking(jnp.arange(t)[None], jnp.arange(t)[None], window=w, plain_causal=True)
    cfg = make_cfg(local_window=w, max_len=t)
    jaxpr = jax.make_jaxpr(jax.grad(lambda q: tformer.attention.attend(q, k, v, m, cfg).sum()))(q)
    sizes = [math.prod(var.aval.shape) for eqn in jaxpr.eqns for var in eqn.outvars]
    assert max(sizes) < t * t, max(sizes)  # the dense mask alone would be t * t
    assert max(sizes) <= 4 * t * 2 * w  # O(T x window): heads x T x 2 blocks of keys


def encdec_pair(**lowrank):
    src = np.array([[5, 6, 7, 8, 9, 10, 11, 12], [13, 14, 15, 16, 17, 0, 0, 0]])
    cfg = make_cfg(num_encoder_layers=2, max_len=8, positions="sinusoidal")
    dense = tformer.EncoderDecoder(cfg, rngs=nnx.Rngs(0))
    low = tformer.EncoderDecoder(cfg.replace(**lowrank), rngs=nnx.Rngs(0))
    return dense, low, jnp.asarray(src)


def test_nystrom_with_a_landmark_per_token_equals_dense():
    dense, low, src = encdec_pair(attention_lowrank="nystrom", lowrank_dim=8)
    real = np.asarray(src != 0)[:, :, None]
    got, want = jitted(low, "encode")(src), jitted(dense, "encode")(src)
    np.testing.assert_allclose(np.asarray(got) * real, np.asarray(want) * real, atol=1e-4)
    _, low2, _ = encdec_pair(attention_lowrank="nystrom", lowrank_dim=3)
    assert float(jnp.max(jnp.abs(jitted(low2, "encode")(src) - want))) > 1e-3  # fewer landmarks: approximate


def test_linformer_with_identity_projections_equals_dense():
    dense, low, src = encdec_pair(attention_lowrank="linformer", lowrank_dim=8)
    src = src.at[1].set(jnp.arange(20, 28))  # no padding: Linformer mixes every row of the source
    eye = jnp.broadcast_to(jnp.eye(8), (2, 8, 8))
    state = nnx.state(low)
    pure = nnx.to_pure_dict(state)
    for name, val in jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(dense)))[0]:
        node = pure
        for key in name[:-1]:
            node = node[key.key]
        node[name[-1].key] = val
    pure["encoder"]["layers"]["attn"]["proj_k"] = eye
    pure["encoder"]["layers"]["attn"]["proj_v"] = eye
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(low, state)
    tgt = jnp.ones((2, 3), jnp.int32)
    np.testing.assert_allclose(np.asarray(jitted(low)(src, tgt)), np.asarray(jitted(dense)(src, tgt)), atol=1e-4)


@pytest.mark.parametrize("method", ["svd", "random"])
def test_compress_mlp_at_full_rank_is_the_model(method):
    model = tformer.DecoderLM(make_cfg(activation="swiglu"), rngs=nnx.Rngs(0))
    toks = jax.random.randint(jax.random.key(1), (2, 12), 3, V)
    full = tformer.compress_mlp(model, 32, method)
    assert full.cfg.mlp_rank == 32 and model.cfg.mlp_rank is None
    want = jitted(model)(toks)
    np.testing.assert_allclose(np.asarray(jitted(full)(toks)), np.asarray(want), atol=1e-5)
    small = tformer.compress_mlp(model, 8, method)
    assert float(jnp.max(jnp.abs(jitted(small)(toks) - want))) > 1e-3
    # Three matrices per layer: 2 layers x 3 x (32 + 48) x 8 instead of 2 x 3 x 32 x 48 weights.
    assert param_bytes(model) - param_bytes(small) == 4 * 2 * 3 * (32 * 48 - (32 + 48) * 8)


# ---------------------------------------------------------------------------
# Causality and cached == parallel.

CAUSAL_VARIANTS = {
    "topk": dict(attention_topk=3), "threshold": dict(attention_threshold=0.2), "window": dict(local_window=4),
    "int8_cache": dict(kv_cache_dtype="int8"), "mlp_rank": dict(mlp_rank=8),
    "window_topk": dict(local_window=6, attention_topk=2),
}


@pytest.mark.parametrize("name", sorted(CAUSAL_VARIANTS))
def test_causal_and_cached_equals_parallel(name):
    model = tformer.DecoderLM(make_cfg(**CAUSAL_VARIANTS[name]), rngs=nnx.Rngs(0))
    toks = jax.random.randint(jax.random.key(2), (2, 16), 3, V)
    forward, extend = jitted(model), jitted(model, "extend")
    full = jax.nn.log_softmax(forward(toks)[..., :V], -1)
    changed = jax.nn.log_softmax(forward(toks.at[:, 9].set((toks[:, 9] + 1) % V))[..., :V], -1)
    np.testing.assert_array_equal(np.asarray(full[:, :9]), np.asarray(changed[:, :9]))  # causal: bit-exact
    assert float(jnp.max(jnp.abs(full[:, 9:] - changed[:, 9:]))) > 1e-4
    # Prefill 6 tokens, then one at a time.
    cache = model.init_cache(2, 20)
    logits, cache = extend(toks[:, :6], cache)
    steps = [logits]
    for i in range(6, 16):
        logits, cache = extend(toks[:, i : i + 1], cache)
        steps.append(logits)
    cached = jax.nn.log_softmax(jnp.concatenate(steps, 1)[..., :V], -1)
    delta = float(jnp.max(jnp.abs(cached - full)))
    if name == "int8_cache":
        print(f"int8 cache: max |delta log-prob| vs the fp32 parallel forward = {delta:.2e}")
        assert 0 < delta < 0.1  # random weights with init_std 0.3: peaky logits; see the trained-model test
        assert isinstance(cache.k[0], tformer.quant.Int8KV) and cache.k[0].values.dtype == jnp.int8
    else:
        assert delta < 2e-5


@pytest.mark.parametrize("name", ["window", "int8_cache", "int8_weights"])
def test_generate_beam_search_and_scoring_agree_for_each_variant(name):
    if name == "int8_weights":
        model = tformer.quantize_weights(tformer.DecoderLM(make_cfg(), rngs=nnx.Rngs(0)), "int8")
    else:
        model = tformer.DecoderLM(make_cfg(**CAUSAL_VARIANTS[name]), rngs=nnx.Rngs(0))
    prompts = np.array([[11, 12, 13, 14, 15], [21, 22, 0, 0, 0]])
    out = tformer.generate(model, prompts, tformer.Decode(6, eos_id=-1), lengths=[5, 2])
    beam = tformer.beam_search(model, prompts, tformer.Decode(6, eos_id=-1), lengths=[5, 2], beam_size=1)
    np.testing.assert_array_equal(np.asarray(beam.tokens), np.asarray(out.tokens))
    if name != "int8_cache":  # scoring is a parallel forward: it reads no cache
        lp = tformer.sequence_logprob(model, prompts, out.tokens, lengths=[5, 2], eos_id=-1)
        np.testing.assert_allclose(np.asarray(lp), np.asarray(beam.scores) * ((5 + 6) / 6) ** 0.6, atol=1e-4)


def test_int8_cache_bytes():
    cfg = make_cfg(num_layers=2, num_kv_heads=4, head_dim=32)
    fp32 = tformer.kvcache.for_config(cfg, 8, 64)
    int8 = tformer.kvcache.for_config(cfg.replace(kv_cache_dtype="int8"), 8, 64)
    # int8 values plus one fp32 scale per token and head of 32 values: (32 + 4) / (4 * 32) of the bytes.
    assert tformer.kvcache.nbytes(int8) * 4 * 32 == tformer.kvcache.nbytes(fp32) * (32 + 4)


# ---------------------------------------------------------------------------
# A briefly trained lm_tiny decodes the same tokens with int8 cache / weights.


def _text_batches(data, seq, batch, steps):
    rng = np.random.default_rng(0)
    for _ in range(steps):
        starts = rng.integers(0, len(data) - seq - 1, batch)
        rows = np.stack([data[s : s + seq + 1] for s in starts])
        yield {"inputs": rows[:, :-1], "targets": rows[:, 1:]}


@pytest.fixture(scope="module")
def trained_lm():
    """lm_tiny's architecture (d 128, 4 layers, SwiGLU, RoPE) trained 250 steps on tformer's own source bytes."""
    cfg = tformer.ModelConfig(vocab_size=259, d_model=128, num_heads=4, num_layers=4, max_len=128, positions="rope",
                              norm="rmsnorm", activation="swiglu", d_ff=384, use_bias=False)
    o = tformer.OptimizerConfig(learning_rate=4e-3, warmup_steps=30, total_steps=250, weight_decay=0.1)
    graphdef, tx, state, _ = tformer.create_train_state(tformer.DecoderLM, cfg, o, 0)
    step = tformer.make_train_step(graphdef, tx, o)
    root = Path(tformer.__file__).parent  # byte ids shifted past pad/bos/eos
    data = np.frombuffer(b"".join(p.read_bytes() for p in sorted(root.glob("*.py"))), np.uint8).astype(np.int32) + 3
    for batch in _text_batches(data, 64, 16, 250):
        state, m = step(state, batch)
    assert float(m["loss"]) < 2.5  # it has learned something
    return nnx.merge(graphdef, state.params), data


@pytest.mark.parametrize("variant", ["int8_cache", "int8_weights"])
def test_int8_greedy_agrees_with_fp32_on_a_trained_lm(trained_lm, variant):
    """16 prompts x 16 greedy tokens = 256 positions: at each, the int8 model's greedy pick after the fp32 prefix.

    Scored along fp32's own greedy continuation, so one near-tie early in a
    row does not decide the rest of it; the free-running agreement (each
    model decoding on its own) is printed next to it.
    """
    model, data = trained_lm
    prompts = np.stack([data[s : s + 32] for s in range(1000, 1000 + 16 * 3001, 3001)])
    other = with_config(model, kv_cache_dtype="int8") if variant == "int8_cache" else tformer.quantize_weights(model)
    ref = np.asarray(tformer.generate(model, prompts, tformer.Decode(16, eos_id=-1)).tokens)
    free = np.asarray(tformer.generate(other, prompts, tformer.Decode(16, eos_id=-1)).tokens)
    tokens = jnp.asarray(np.concatenate([prompts, ref], 1))  # the int8 path reads an int8 cache throughout
    fp32 = jitted(model, "extend")(tokens, model.init_cache(16, 48))[0][:, 31:47, :259]
    int8 = jitted(other, "extend")(tokens, other.init_cache(16, 48))[0][:, 31:47, :259]
    assert (np.asarray(jnp.argmax(fp32, -1)) == ref).mean() > 0.99  # the scoring pass is the decode's own
    agree = (np.asarray(jnp.argmax(int8, -1)) == ref).mean()
    delta = float(jnp.max(jnp.abs(jax.nn.log_softmax(int8, -1) - jax.nn.log_softmax(fp32, -1))))
    print(f"{variant}: greedy agreement {agree:.1%} of {ref.size} positions (free-running {(free == ref).mean():.1%}),"
          f" max |delta log-prob| {delta:.3g}")
    assert ref.size == 256 and agree >= 0.95


def test_int8_weights_bytes_and_dtypes(trained_lm):
    model, _ = trained_lm
    q = tformer.quantize_weights(model, "int8")
    attn, mlp = q.blocks.layers.attn, q.blocks.layers.mlp
    assert attn.wq[...].dtype == jnp.int8 and attn.wo_scale[...].shape == (4, 128)  # per layer, per output
    assert mlp.w_out[...].dtype == jnp.int8 and mlp.w_in_scale[...].shape == (4, 384)
    quantized = 4 * (4 * 128 * 128 + 3 * 128 * 384)  # int8 elements
    scales = 4 * (3 * 128 + 128 + 2 * 384 + 128) * 4  # fp32 bytes
    assert param_bytes(model) - param_bytes(q) == 4 * quantized - (quantized + scales)


# ---------------------------------------------------------------------------
# Bad settings.


@pytest.mark.parametrize("kw, field", [
    (dict(attention_lowrank="linformer", lowrank_dim=8), "attention_lowrank"),  # a causal decoder (no encoder)
    (dict(attention_lowrank="svd", lowrank_dim=8, num_encoder_layers=1), "attention_lowrank"),
    (dict(attention_lowrank="nystrom", num_encoder_layers=1), "lowrank_dim"),
    (dict(lowrank_dim=8), "lowrank_dim"),
    (dict(attention_topk=0), "attention_topk"),
    (dict(attention_threshold=1.0), "attention_threshold"),
    (dict(attention_threshold=-0.1), "attention_threshold"),
    (dict(kv_cache_dtype="float8"), "kv_cache_dtype"),
    (dict(kv_cache_dtype="int4"), "kv_cache_dtype"),
    (dict(mlp_rank=33), "mlp_rank"),  # min(d_model 32, d_ff 48) = 32
    (dict(mlp_rank=0), "mlp_rank"),
])
def test_invalid_settings_name_the_field(kw, field):
    with pytest.raises(ValueError, match=rf"ModelConfig\.{field}:"):
        make_cfg(**kw)


def test_invalid_compression_arguments():
    model = tformer.DecoderLM(make_cfg(), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"compress_mlp: rank must be .* = 32\], got 33"):
        tformer.compress_mlp(model, 33)
    with pytest.raises(ValueError, match="compress_mlp: method"):
        tformer.compress_mlp(model, 8, method="pca")
    with pytest.raises(ValueError, match="quantize_weights: dtype must be 'int8'"):
        tformer.quantize_weights(model, "int4")
    with pytest.raises(ValueError, match="with_config: .*mlp_rank"):
        with_config(model, mlp_rank=8)
