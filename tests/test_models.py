"""The models compute what they claim: cached decoding == the parallel forward,
causality, packing and padding isolation, dropout, attention implementations.

Tiny models with a large init_std, so attention is far from uniform and the
logits differ clearly between positions (a test that a wrong mask would fail).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import V, make_cfg
from flax import nnx

from tformer import DecoderLM, EncoderDecoder, ModelConfig
from tformer import attention as attention_lib
from tformer import layers as layers_lib
from tformer.attention import Masking, attend, resolve_impl
from tformer.layers import project


def left_align(prompts_bp, lengths_b):
    """Right-padded prompts -> left-aligned tokens and validity, as the cache expects."""
    b, p = prompts_bp.shape
    tokens = np.zeros((b, p), np.int32)
    valid = np.zeros((b, p), bool)
    for i, n in enumerate(lengths_b):
        tokens[i, p - n:] = prompts_bp[i, :n]
        valid[i, p - n:] = True
    return jnp.asarray(tokens), jnp.asarray(valid)


@functools.partial(jax.jit, static_argnums=0)
def cached_and_parallel(graphdef, state, prompt_bp, valid_bp, cont_bn, seqs_bt, src_bs):
    """Logits from prefill + one-token cached steps, and from the parallel forward.

    seqs_bt: each row's prompt then its continuation, left-aligned at position
    0 (what `model(...)` sees); anything after a row's real tokens is causally
    invisible to them (tested separately).
    """
    model = nnx.merge(graphdef, state)
    b, p = prompt_bp.shape
    n = cont_bn.shape[1]
    encdec = isinstance(model, EncoderDecoder)
    cache = model.init_cache(src_bs, p + n) if encdec else model.init_cache(b, p + n)
    first, cache = model.extend(prompt_bp, cache, valid_bp)

    def step(cache, tok_b):
        logits, cache = model.extend(tok_b[:, None], cache)
        return cache, logits[:, 0]

    _, rest = jax.lax.scan(step, cache, cont_bn.T)
    cached = jnp.concatenate([first, rest.transpose(1, 0, 2)], axis=1)  # [B, P + N, V]
    parallel = model(src_bs, seqs_bt) if encdec else model(seqs_bt)
    return cached, parallel


def check_cache_parity(model, lengths, n=3, atol=1e-5, rtol=1e-5, src=None):
    rng = np.random.default_rng(0)
    b, p = len(lengths), max(lengths)
    # Garbage (not pad) after each prompt: it must be ignored.
    prompts = rng.integers(3, V, (b, p))
    cont = rng.integers(3, V, (b, n))
    prompt_left, valid = left_align(prompts, lengths)
    seqs = rng.integers(3, V, (b, p + n))
    for i, length in enumerate(lengths):
        seqs[i, : length + n] = np.concatenate([prompts[i, :length], cont[i]])
    graphdef, state = nnx.split(model)
    cached, parallel = cached_and_parallel(graphdef, state, prompt_left, valid, jnp.asarray(cont, jnp.int32),
                                           jnp.asarray(seqs, jnp.int32), src)
    for row, length in enumerate(lengths):
        got = np.asarray(cached[row, p - length :], np.float32)[:, :V]
        want = np.asarray(parallel[row, : length + n], np.float32)[:, :V]
        np.testing.assert_allclose(got, want, atol=atol, rtol=rtol, err_msg=f"row {row} (prompt length {length})")


DECODER_VARIANTS = {
    "mha-learned-pre-layernorm": dict(num_layers=2),
    "gqa-rope-rmsnorm-swiglu-scan": dict(num_kv_heads=2, positions="rope", norm="rmsnorm", activation="swiglu",
                                        scan_layers=True, num_layers=2, use_bias=False, tie_embeddings=False),
    "mqa-sinusoidal-post-ln-relu": dict(num_kv_heads=1, positions="sinusoidal", norm_placement="post",
                                       activation="relu", scale_embeddings=True),
    "gqa-rope-local-window-einsum": dict(num_kv_heads=2, positions="rope", local_window=3, attention="einsum"),
    "mha-learned-local-window-geglu": dict(local_window=2, activation="geglu", remat="full"),
    "gqa-rope-qk-norm-relu2": dict(num_kv_heads=2, positions="rope", norm="rmsnorm", activation="relu2",
                                  qk_norm=True, use_bias=False),
    # No position encoding (causality alone orders the tokens), and the two XLA paths forced by name: the
    # parallel forward's 8 positions take the block-causal path (T divisible by its 4 blocks).
    "mha-nopos-xla": dict(positions="none", attention="xla"),
    "gqa-rope-blocked": dict(num_kv_heads=2, positions="rope", attention="blocked"),
}


@pytest.mark.parametrize("variant", list(DECODER_VARIANTS))
def test_decoder_cached_decode_matches_parallel_forward(variant):
    model = DecoderLM(make_cfg(**DECODER_VARIANTS[variant]), rngs=nnx.Rngs(1))
    check_cache_parity(model, lengths=[5, 2, 4])


def test_decoder_cached_decode_matches_parallel_forward_bf16():
    model = DecoderLM(make_cfg(dtype="bfloat16", positions="rope", num_kv_heads=2), rngs=nnx.Rngs(2))
    # Same maths in a different order: bf16 rounding, not a semantic gap (a
    # wrong mask or position moves these logits by O(1)).
    check_cache_parity(model, lengths=[4, 2], atol=0.06, rtol=0.02)


ENCDEC_VARIANTS = {
    "mha-sinusoidal-post-ln": dict(positions="sinusoidal", norm_placement="post", activation="relu",
                                  scale_embeddings=True),
    "gqa-rope-pre-rmsnorm-swiglu-scan": dict(num_kv_heads=2, positions="rope", norm="rmsnorm",
                                            activation="swiglu", scan_layers=True, num_layers=2),
    "mqa-learned-local-window": dict(num_kv_heads=1, local_window=2),
    "mha-rope-qk-norm": dict(positions="rope", qk_norm=True),  # cross-attention's q and k normalised too
}


@pytest.mark.parametrize("variant", list(ENCDEC_VARIANTS))
def test_encdec_cached_decode_matches_parallel_forward(variant):
    model = EncoderDecoder(make_cfg(num_encoder_layers=1, **ENCDEC_VARIANTS[variant]), rngs=nnx.Rngs(3))
    # Sources of different real lengths, padded with pad_id.
    src = jnp.asarray([[5, 6, 7, 8, 9, 10], [11, 12, 0, 0, 0, 0], [13, 14, 15, 16, 0, 0]], jnp.int32)
    check_cache_parity(model, lengths=[3, 1, 2], src=src)


# ---------------------------------------------------------------------------
# Causality, packing, padding.


@pytest.fixture(scope="module")
def rope_lm():
    return DecoderLM(make_cfg(positions="rope", num_kv_heads=2), rngs=nnx.Rngs(4))


@pytest.fixture(scope="module")
def encdec():
    return EncoderDecoder(make_cfg(num_encoder_layers=1), rngs=nnx.Rngs(5))


def _jit_call(model):
    graphdef, state = nnx.split(model)

    @jax.jit
    def call(*args, **kw):
        return nnx.merge(graphdef, state)(*args, **kw)

    return call


@pytest.mark.parametrize("kind", ["learned", "rope"])
def test_decoder_is_causal(kind, rope_lm):
    model = rope_lm if kind == "rope" else DecoderLM(make_cfg(), rngs=nnx.Rngs(6))
    call = _jit_call(model)
    rng = np.random.default_rng(1)
    x = rng.integers(3, V, (1, 12))
    batch = np.repeat(x, 12, axis=0)
    for t in range(12):  # row t: everything after t replaced
        batch[t, t + 1 :] = rng.integers(3, V, 11 - t)
    logits = np.asarray(call(jnp.asarray(batch)))
    original = logits[11]  # row 11 has nothing after position 11 to change
    for t in range(11):
        np.testing.assert_allclose(logits[t, : t + 1], original[: t + 1], atol=1e-5, rtol=1e-5, err_msg=f"t={t}")
        assert not np.allclose(logits[t, t + 1 :], original[t + 1 :], atol=1e-3), "the changes must matter"


def test_encdec_decoder_is_causal(encdec):
    call = _jit_call(encdec)
    rng = np.random.default_rng(2)
    src = jnp.asarray(np.repeat(rng.integers(3, V, (1, 7)), 2, axis=0))
    tgt = np.repeat(rng.integers(3, V, (1, 10)), 2, axis=0)
    tgt[1, 6:] = rng.integers(3, V, 4)
    logits = np.asarray(call(src, jnp.asarray(tgt)))
    np.testing.assert_allclose(logits[0, :6], logits[1, :6], atol=1e-5, rtol=1e-5)
    assert not np.allclose(logits[0, 6:], logits[1, 6:], atol=1e-3)


def test_packed_documents_are_independent(rope_lm):
    rng = np.random.default_rng(3)
    a, b = rng.integers(3, V, 5), rng.integers(3, V, 4)
    packed = np.concatenate([a, b, [0, 0, 0]])[None]
    seg = np.array([[1] * 5 + [2] * 4 + [0] * 3])
    pos = np.array([list(range(5)) + list(range(4)) + [0] * 3])
    call = _jit_call(rope_lm)
    out = np.asarray(call(jnp.asarray(packed), positions=jnp.asarray(pos), segment_ids=jnp.asarray(seg)))
    # Each document alone from position 0 (b then junk, which it cannot see).
    alone = np.asarray(call(jnp.asarray(np.stack([a, np.concatenate([b, [7]])]))))
    np.testing.assert_allclose(out[0, :5], alone[0], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(out[0, 5:9], alone[1, :4], atol=1e-5, rtol=1e-5)
    assert np.isfinite(out).all(), "fully masked padding rows must stay finite"


def test_encoder_padding_never_leaks(encdec):
    graphdef, state = nnx.split(encdec)

    @jax.jit
    def run(src, tgt, seg):
        model = nnx.merge(graphdef, state)
        return model.encode(src, src_segment_ids=seg), model(src, tgt, src_segment_ids=seg)

    rng = np.random.default_rng(4)
    real = rng.integers(3, V, (2, 5))
    tgt = jnp.asarray(rng.integers(3, V, (2, 6)))
    # Row 0: the source of interest. Row 1: another source (the checks are not vacuous).
    short = np.concatenate([real, np.zeros((2, 2), int)], axis=1)  # pad_id padding, two counts
    long = np.concatenate([real, np.zeros((2, 7), int)], axis=1)
    enc_s, logits_s = run(jnp.asarray(short), tgt, None)
    enc_l, logits_l = run(jnp.asarray(long), tgt, None)
    np.testing.assert_allclose(np.asarray(enc_s)[:, :5], np.asarray(enc_l)[:, :5], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(logits_s), np.asarray(logits_l), atol=1e-5, rtol=1e-5)
    # Arbitrary tokens in the padding when segment ids mark it as padding.
    junk = np.concatenate([real, rng.integers(3, V, (2, 7))], axis=1)
    seg = jnp.asarray((np.arange(12) < 5).astype(np.int32)[None].repeat(2, 0))
    enc_j, logits_j = run(jnp.asarray(junk), tgt, seg)
    np.testing.assert_allclose(np.asarray(enc_j)[:, :5], np.asarray(enc_s)[:, :5], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(logits_j), np.asarray(logits_s), atol=1e-5, rtol=1e-5)
    # Same target, another source: different logits.
    _, swapped = run(jnp.asarray(short[::-1].copy()), tgt, None)
    assert not np.allclose(np.asarray(swapped)[0], np.asarray(logits_s)[0], atol=1e-3)


# ---------------------------------------------------------------------------
# Padded vocabulary, dropout, attention implementations.


def test_padded_vocab_never_affects_softmax(rope_lm):
    cfg = rope_lm.cfg
    assert cfg.padded_vocab > cfg.vocab_size
    logits = _jit_call(rope_lm)(jnp.asarray([[5, 6, 7, 8]]))
    assert logits.shape[-1] == cfg.padded_vocab
    full = jax.nn.log_softmax(logits, axis=-1)
    sliced = jax.nn.log_softmax(logits[..., : cfg.vocab_size], axis=-1)
    np.testing.assert_allclose(np.asarray(full[..., : cfg.vocab_size]), np.asarray(sliced), atol=1e-6, rtol=1e-6)
    assert float(jnp.max(jnp.exp(full[..., cfg.vocab_size :]))) == 0.0


def test_dropout_keys():
    cfg = make_cfg(dropout=0.2, attention_dropout=0.3, num_layers=1)
    model = DecoderLM(cfg, rngs=nnx.Rngs(7))
    plain = DecoderLM(cfg.replace(dropout=0.0, attention_dropout=0.0), rngs=nnx.Rngs(7))
    graphdef, state = nnx.split(model)

    @jax.jit
    def call(x, rng):
        return nnx.merge(graphdef, state)(x, dropout_rng=rng)

    x = jnp.asarray([[5, 6, 7, 8, 9, 10]])
    a, a2, b = call(x, jax.random.key(1)), call(x, jax.random.key(1)), call(x, jax.random.key(2))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(a2))
    assert not np.allclose(np.asarray(a), np.asarray(b), atol=1e-3)
    det = np.asarray(_jit_call(model)(x))
    np.testing.assert_allclose(det, np.asarray(_jit_call(plain)(x)), atol=1e-6, rtol=1e-6)
    assert not np.allclose(np.asarray(a), det, atol=1e-3)


def _random_qkv(b=2, t=7, h=4, kh=2, d=8, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(ks[0], (b, t, h, d)), jax.random.normal(ks[1], (b, t, kh, d)),
            jax.random.normal(ks[2], (b, t, kh, d)))


@pytest.mark.parametrize("case", ["causal", "segments-padding", "window", "bidirectional-padding"])
def test_attention_implementations_agree(case):
    cfg = ModelConfig(vocab_size=V, d_model=32, num_heads=4, num_kv_heads=2, max_len=16)
    q, k, v = _random_qkv()
    pos = jnp.broadcast_to(jnp.arange(7), (2, 7))
    seg = None
    causal, window = True, None
    if case == "segments-padding":
        seg = jnp.asarray([[1, 1, 1, 2, 2, 0, 0], [1, 1, 1, 1, 1, 1, 0]])
        pos = jnp.asarray([[0, 1, 2, 0, 1, 0, 0], [0, 1, 2, 3, 4, 5, 0]])
    elif case == "window":
        window = 3
    elif case == "bidirectional-padding":
        seg = jnp.asarray([[1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1]])
        causal = False
    def masking_of(pos, seg):
        return Masking(q_pos=pos, k_pos=pos, q_seg=seg, k_seg=seg, causal=causal, window=window,
                       plain_causal=seg is None and window is None)

    impls = ("einsum", "xla", "auto", "cudnn", "blocked")

    @jax.jit
    def run(q, k, v, pos, seg):
        return [attend(q, k, v, masking_of(pos, seg), cfg.replace(attention=i)) for i in impls]

    outs = run(q, k, v, pos, seg)
    masking = masking_of(pos, seg)
    ref = outs[0]
    real = np.ones((2, 7), bool) if seg is None else np.asarray(seg) != 0
    for impl, out in zip(impls[1:], outs[1:]):
        # Padding queries attend to nothing; their output is unspecified.
        np.testing.assert_allclose(np.asarray(out)[real], np.asarray(ref)[real], atol=1e-5, rtol=1e-5,
                                   err_msg=impl)
    # A direct dense softmax over the mask, for the reference itself.
    dense = np.asarray(masking.dense())
    g = q.reshape(2, 7, 2, 2, 8)
    s = np.einsum("bqkgd,bskd->bkgqs", g, k) / np.sqrt(8)
    s = np.where(dense[:, None, None], s, -1e30)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    want = np.einsum("bkgqs,bskd->bqkgd", p, np.asarray(v)).reshape(2, 7, 4, 8)
    np.testing.assert_allclose(np.asarray(ref)[real], want[real], atol=1e-5, rtol=1e-5)


def test_auto_attention_falls_back_on_cpu():
    cfg = make_cfg(num_kv_heads=2, dtype="bfloat16")
    q, k, v = _random_qkv()
    masking = Masking(q_pos=jnp.broadcast_to(jnp.arange(7), (2, 7)), k_pos=jnp.broadcast_to(jnp.arange(7), (2, 7)),
                      plain_causal=True)
    # Seven queries: below flash.MIN_KERNEL_LEN, so "auto" stays dense on every platform (on CPU the einsum
    # path, whose softmax keeps its reductions fused).
    on_cpu = jax.default_backend() == "cpu"
    assert resolve_impl(cfg, jnp.bfloat16, masking, False, (7, 7)) == ("einsum" if on_cpu else "xla")
    x = jnp.asarray([[5, 6, 7, 8, 9]])
    auto, ein, cud = (_jit_call(DecoderLM(make_cfg(attention=a, num_layers=1), rngs=nnx.Rngs(8)))(x)
                      for a in ("auto", "einsum", "cudnn"))
    np.testing.assert_allclose(np.asarray(auto), np.asarray(ein), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(cud), np.asarray(ein), atol=1e-5, rtol=1e-5)


def _causal(t, b=2, **kw):
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    return Masking(q_pos=pos, k_pos=pos, causal=True, plain_causal=True, **kw)


def _packed(t):
    """Two rows of packed documents (positions restart per document), the second ending in 3 padding slots."""
    seg = np.array([[1] * 5 + [2] * 7 + [3] * (t - 12), [1] * 3 + [2] * (t - 6) + [0] * 3], np.int32)
    starts = np.concatenate([np.ones((2, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    cols = np.arange(t)
    pos = np.where(seg > 0, cols - np.maximum.accumulate(np.where(starts, cols, 0), axis=1), 0)
    return Masking(q_pos=jnp.asarray(pos), k_pos=jnp.asarray(pos), q_seg=jnp.asarray(seg), k_seg=jnp.asarray(seg))


@pytest.mark.parametrize("kv_heads,rows", [(4, "plain"), (2, "plain"), (1, "plain"), (2, "packed")])
def test_blocked_attention_matches_einsum_with_gradients(kv_heads, rows):
    """Packed rows too: every real query's output and every gradient (padding queries' outputs carry no loss)."""
    cfg = ModelConfig(vocab_size=V, d_model=32, num_heads=4, num_kv_heads=kv_heads, max_len=32)
    t = 16
    q, k, v = _random_qkv(t=t, kh=kv_heads, seed=kv_heads)
    masking = _causal(t) if rows == "plain" else _packed(t)
    assert resolve_impl(cfg.replace(attention="blocked"), jnp.float32, masking, False, (t, t)) == "blocked"
    real = np.ones((2, t), bool) if masking.q_seg is None else np.asarray(masking.q_seg) > 0
    cot = jax.random.normal(jax.random.key(9), q.shape) * real[:, :, None, None]

    def value_and_grads(impl):
        c = cfg.replace(attention=impl)
        def f(q, k, v):
            return jnp.sum(attend(q, k, v, masking, c) * cot)
        return jax.jit(lambda q, k, v: (attend(q, k, v, masking, c), jax.grad(f, argnums=(0, 1, 2))(q, k, v)))(q, k, v)

    out, grads = value_and_grads("blocked")
    ref_out, ref_grads = value_and_grads("einsum")
    np.testing.assert_allclose(np.asarray(out)[real], np.asarray(ref_out)[real], atol=1e-6, rtol=1e-6)
    for name, g, r in zip("qkv", grads, ref_grads):
        assert float(jnp.max(jnp.abs(r))) > 0.1, name  # not vacuous
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=2e-6, rtol=1e-6, err_msg=f"d{name}")


def test_blocked_attention_in_a_model_matches_einsum_with_gradients():
    cfg = make_cfg(num_layers=2, max_len=32)
    x = jnp.asarray(np.random.default_rng(6).integers(3, V, (2, 32)))
    model = DecoderLM(cfg, rngs=nnx.Rngs(10))
    graphdef, state = nnx.split(model)

    def run(impl):
        g = nnx.graphdef(DecoderLM(cfg.replace(attention=impl), rngs=nnx.Rngs(10)))

        def loss(st):
            logits = nnx.merge(g, st)(x)
            return jnp.mean(jax.nn.log_softmax(logits[..., :V])[..., 0]), logits

        return jax.jit(jax.value_and_grad(loss, has_aux=True))(state)

    (_, blocked), g_blocked = run("blocked")
    (_, ref), g_ref = run("einsum")
    np.testing.assert_allclose(np.asarray(blocked), np.asarray(ref), atol=1e-5, rtol=1e-5)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_blocked), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-4, err_msg=str(path))


def test_blocked_attention_only_where_it_applies():
    cfg = make_cfg()
    blocked, auto = cfg.replace(attention="blocked"), cfg.replace(attention="auto")
    n = attention_lib.BLOCKED_MIN_LEN
    # Windows take the banded path; bidirectional, cross-attention (different lengths), lengths not divisible:
    # dense. Packed rows (segments, positions restarting) stay blocked.
    assert resolve_impl(blocked, jnp.float32, _causal(n, window=3), False, (n, n)) == "banded"
    packed = dataclasses.replace(_causal(n), plain_causal=False, q_seg=jnp.ones((2, n), jnp.int32))
    assert resolve_impl(blocked, jnp.float32, packed, False, (n, n)) == "blocked"
    assert resolve_impl(auto, jnp.float32, packed, False, (n, n)) == ("blocked" if jax.default_backend() == "cpu"
                                                                      else "xla")
    bidirectional = dataclasses.replace(_causal(n), plain_causal=False, causal=False)
    assert resolve_impl(blocked, jnp.float32, bidirectional, False, (n, n)) == "xla"
    assert resolve_impl(blocked, jnp.float32, _causal(n), False, (n, n // 2)) == "xla"
    assert resolve_impl(blocked, jnp.float32, _causal(n + 1), False, (n + 1, n + 1)) == "xla"
    assert resolve_impl(blocked, jnp.float32, _causal(n), True, (n, n)) == "einsum"  # attention dropout
    on_cpu = jax.default_backend() == "cpu"
    assert resolve_impl(auto, jnp.float32, _causal(n), False, (n, n)) == ("blocked" if on_cpu else "xla")
    assert resolve_impl(auto, jnp.float32, _causal(n // 2), False, (n // 2, n // 2)) == ("einsum" if on_cpu
                                                                                          else "xla")


def test_project_is_the_einsum():
    ks = jax.random.split(jax.random.key(11), 5)
    x = jax.random.normal(ks[0], (2, 3, 8))
    w3 = jax.random.normal(ks[1], (8, 4, 5))
    np.testing.assert_allclose(np.asarray(project(x, w3)), np.asarray(jnp.einsum("btd,dhk->bthk", x, w3)),
                               atol=1e-5, rtol=1e-5)
    o = jax.random.normal(ks[2], (2, 3, 4, 5))
    wo = jax.random.normal(ks[3], (4, 5, 8))
    np.testing.assert_allclose(np.asarray(project(o, wo, n_in=2)), np.asarray(jnp.einsum("bthk,hkd->btd", o, wo)),
                               atol=1e-5, rtol=1e-5)
    table = jax.random.normal(ks[4], (7, 8))
    np.testing.assert_allclose(np.asarray(project(x, table, w_transposed=True)),
                               np.asarray(jnp.einsum("btd,vd->btv", x, table)), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="do not match weight axes"):
        project(x, wo, n_in=2)


@pytest.mark.parametrize("kv_heads, bias, rope", [(4, True, False), (2, False, True)])
def test_fused_qkv_projection_is_the_three_projections_with_gradients(kv_heads, bias, rope, monkeypatch):
    cfg = make_cfg(num_kv_heads=kv_heads, use_bias=bias, positions="rope" if rope else "learned")
    attn = attention_lib.Attention(cfg, rngs=nnx.Rngs(3))
    for name in ("bq", "bk", "bv") if bias else ():  # zeros at init: make the biases count
        getattr(attn, name)[...] = jax.random.normal(jax.random.key(len(name)), getattr(attn, name).shape)
    x = jax.random.normal(jax.random.key(4), (2, 6, cfg.d_model))
    masking = attention_lib.self_masking(jnp.broadcast_to(jnp.arange(6), (2, 6)), None, cfg, causal=True)
    graphdef, state = nnx.split(attn)

    def loss(state, x):
        return jnp.sum(jnp.sin(nnx.merge(graphdef, state)(x, masking)))

    fused = jax.value_and_grad(loss, argnums=(0, 1))(state, x)
    assert attn._fuse_qkv()
    monkeypatch.setattr(attention_lib.Attention, "_fuse_qkv", lambda self: False)
    separate = jax.value_and_grad(loss, argnums=(0, 1))(state, x)
    for a, b in zip(jax.tree.leaves(fused), jax.tree.leaves(separate)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("k, n", [(24, 8), (8, 24), (16, 16)])  # k > n takes the (dy^T x)^T weight gradient
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("transpose_max", [0, layers_lib._CPU_TRANSPOSE_MAX])  # each weight-gradient rewrite
def test_project_gradients_are_the_einsum_gradients(k, n, dtype, transpose_max, monkeypatch):
    monkeypatch.setattr(layers_lib, "_CPU_TRANSPOSE_MAX", transpose_max)
    ks = jax.random.split(jax.random.key(k * n), 4)
    x = jax.random.normal(ks[0], (2, 5, k)).astype(dtype)
    w = jax.random.normal(ks[1], (k, n)).astype(dtype)
    ct = jax.random.normal(ks[2], (2, 5, n)).astype(dtype)
    table = jax.random.normal(ks[3], (n, k)).astype(dtype)  # a tied embedding table as the output projection

    def grads(f, w):
        y, vjp = jax.vjp(f, x, w)
        return (y, *vjp(ct))

    cases = [(project, "btk,kn->btn", w), (functools.partial(project, w_transposed=True), "btk,nk->btn", table)]
    for f, spec, weight in cases:
        got = jax.jit(lambda f=f, weight=weight: grads(f, weight))()
        want = jax.jit(lambda spec=spec, weight=weight: grads(lambda x, w: jnp.einsum(spec, x, w), weight))()
        tol = 1e-5 if dtype == jnp.float32 else 2e-2
        for g, e in zip(got, want):
            assert g.dtype == e.dtype and g.shape == e.shape
            np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(e, np.float32), atol=tol, rtol=tol)


def test_packed_seq2seq_pairs_are_independent(encdec):
    rng = np.random.default_rng(5)
    src_a, src_b = rng.integers(3, V, 4), rng.integers(3, V, 3)
    tgt_a, tgt_b = rng.integers(3, V, 3), rng.integers(3, V, 5)
    src = np.concatenate([src_a, src_b, [0]])[None]
    src_seg = np.array([[1] * 4 + [2] * 3 + [0]])
    src_pos = np.array([[0, 1, 2, 3, 0, 1, 2, 0]])
    tgt = np.concatenate([tgt_a, tgt_b])[None]
    tgt_seg = np.array([[1] * 3 + [2] * 5])
    tgt_pos = np.array([[0, 1, 2, 0, 1, 2, 3, 4]])
    call = _jit_call(encdec)
    packed = np.asarray(call(*map(jnp.asarray, (src, tgt)), src_segment_ids=jnp.asarray(src_seg),
                             tgt_segment_ids=jnp.asarray(tgt_seg), src_positions=jnp.asarray(src_pos),
                             tgt_positions=jnp.asarray(tgt_pos)))
    # Each pair alone (two rows, pad_id-padded sources, junk after the short target).
    alone_src = np.array([np.concatenate([src_a, [0, 0, 0, 0]]), np.concatenate([src_b, [0] * 5])])
    alone_tgt = np.array([np.concatenate([tgt_a, [9] * 5]), tgt_b.tolist() + [9] * 3])
    alone = np.asarray(call(jnp.asarray(alone_src), jnp.asarray(alone_tgt)))
    np.testing.assert_allclose(packed[0, :3], alone[0, :3], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(packed[0, 3:], alone[1, :5], atol=1e-5, rtol=1e-5)


def test_out_of_range_token_ids_are_named_when_concrete():
    cfg = make_cfg()
    model = DecoderLM(cfg, rngs=nnx.Rngs(0))
    for bad in (-1, V):
        tokens = np.full((2, 4), 3)
        tokens[1, 2] = bad
        with pytest.raises(ValueError, match=rf"tokens: token id {bad} is outside the vocabulary \[0, {V}\)"):
            model(tokens)
    encdec = EncoderDecoder(make_cfg(num_encoder_layers=1), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=rf"src: token id {V} is outside the vocabulary"):
        encdec(np.full((2, 4), V), np.full((2, 3), 3))
    # Inside jit the ids are traced values: not checked (documented), and the call still runs.
    assert jax.jit(lambda t: model(t))(jnp.full((2, 4), 3)).shape == (2, 4, cfg.padded_vocab)
    with pytest.raises(ValueError, match=r"ModelConfig.num_encoder_layers=1: a DecoderLM has no encoder"):
        DecoderLM(make_cfg(num_encoder_layers=1), rngs=nnx.Rngs(0))
    assert (DecoderLM.task, EncoderDecoder.task, cfg.task, encdec.cfg.task) == ("lm", "seq2seq", "lm", "seq2seq")


def test_gelu_exact_is_jax_exact_gelu_with_gradients():
    # tformer's erf form against jax.nn.gelu(approximate=False) (erfc form): values and derivatives, fp32,
    # across the range activations take (the far tail is below 1e-6 in both).
    from tformer.layers import gelu_exact

    x = jnp.linspace(-12.0, 12.0, 4001, dtype=jnp.float32)
    ref = functools.partial(jax.nn.gelu, approximate=False)
    np.testing.assert_allclose(gelu_exact(x), ref(x), rtol=1e-5, atol=1e-6)
    d_ours, d_ref = (jax.vmap(jax.grad(f))(x) for f in (gelu_exact, ref))
    np.testing.assert_allclose(d_ours, d_ref, rtol=1e-5, atol=1e-6)
    assert gelu_exact(jnp.ones(3, jnp.bfloat16)).dtype == jnp.bfloat16


def test_norm_bias_false_is_a_layernorm_without_bias():
    cfg = make_cfg(norm_bias=False)
    model = DecoderLM(cfg, rngs=nnx.Rngs(0))
    paths = ["/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))]
    assert not [p for p in paths if "norm" in p and p.endswith("bias")], paths
    with_bias = DecoderLM(make_cfg(), rngs=nnx.Rngs(0))  # the same weights plus zero biases: the same logits
    assert len(nnx.to_flat_state(nnx.state(with_bias, nnx.Param))) == len(paths) + 2 * cfg.num_layers + 1
    tokens = jnp.arange(12).reshape(2, 6) % V
    np.testing.assert_allclose(np.asarray(model(tokens)), np.asarray(with_bias(tokens)), atol=1e-6)


@pytest.mark.parametrize("center", [True, False])
def test_norm_is_the_textbook_formula_with_gradients(center):
    from tformer import norms

    ks = jax.random.split(jax.random.key(21), 4)
    # Rows far from zero mean (1e3 + N(0, 1)): a one-pass variance without its shift would lose ~all digits.
    x = jax.random.normal(ks[0], (3, 5, 128)) + jnp.array([0.0, 1e3, -7.0])[:, None, None]
    scale, bias = 1 + 0.1 * jax.random.normal(ks[1], (128,)), jax.random.normal(ks[2], (128,))
    ct = jax.random.normal(ks[3], x.shape)

    def textbook(x, s, b):  # two passes: the mean, then the variance around it
        if center:
            x = x - x.mean(-1, keepdims=True)
        return x * jax.lax.rsqrt((x * x).mean(-1, keepdims=True) + 1e-5) * s + b

    def ours(x, s, b):
        return norms.normalize(x, s, b, center=center, eps=1e-5)

    got, want = jax.vjp(jax.jit(ours), x, scale, bias), jax.vjp(textbook, x, scale, bias)
    np.testing.assert_allclose(np.asarray(got[0]), np.asarray(want[0]), atol=2e-4, rtol=1e-4)
    for g, w in zip(got[1](ct), want[1](ct)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=2e-3, rtol=1e-3)
    half = norms.normalize(x.astype(jnp.bfloat16), scale, None, center=center, eps=1e-5)
    assert half.dtype == jnp.bfloat16
