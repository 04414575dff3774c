"""Flash attention kernels: numerics in Pallas interpret mode, and the kernels in programs lowered for TPU / GPU.

Interpret mode runs each Pallas kernel's own program (forward and its custom
VJP) on the CPU, so the TPU splash kernel and the GPU Triton kernel are
checked against the einsum reference here; lowering for "tpu" / "cuda" on
this CPU-only machine checks that the real train steps hold the kernels'
custom calls and no [.., T, T] score tensor.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tformer
from tformer import flash, training
from tformer import plan as plan_lib
from tformer.attention import Masking, _einsum_attention, resolve_impl

B, H, D = 2, 4, 32
# Max abs error over real rows, relative to the reference's largest magnitude for bf16 (its rounding step
# grows with the value: gradients of size ~6 round in steps of 1/32).
TOL = {"float32": 1e-5, "bfloat16": 2e-2}


def _positions(seg):
    """Positions restarting at every segment start (0 on padding)."""
    starts = np.concatenate([np.ones((seg.shape[0], 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    cols = np.arange(seg.shape[1])
    return np.where(seg > 0, cols - np.maximum.accumulate(np.where(starts, cols, 0), axis=1), 0).astype(np.int32)


def _case(name: str, t: int = 128) -> tuple[Masking, int]:
    """(masking, kv heads) of one named case; `t` queries (and keys, except cross-attention)."""
    arange = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (B, t))
    if name == "causal":
        return Masking(arange, arange, causal=True, plain_causal=True), H
    if name in ("packed", "window"):  # documents of 40, 50, rest / 30, rest - 9, then 9 padding slots
        seg = np.array([[1] * 40 + [2] * 50 + [3] * (t - 90), [1] * 30 + [2] * (t - 39) + [0] * 9], np.int32)
        pos, seg = jnp.asarray(_positions(seg)), jnp.asarray(seg)
        return Masking(pos, pos, seg, seg, causal=True, window=20 if name == "window" else None), 2
    if name in ("padding", "encoder"):  # rows of t and t - 37 real tokens, then padding
        seg = jnp.asarray((np.arange(t)[None] < np.array([[t], [t - 37]])).astype(np.int32))
        return Masking(arange, arange, seg, seg, causal=name == "padding"), 2 if name == "padding" else H
    if name == "cross":  # 96 source slots, the second row's last 30 are padding
        src = jnp.asarray((np.arange(96)[None] < np.array([[96], [66]])).astype(np.int32))
        return Masking(arange, jnp.zeros((B, 96), jnp.int32), k_seg=src, causal=False), 2
    raise ValueError(name)


def _qkv(masking: Masking, kv_heads: int, dtype, seed: int = 0):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    tq, tk = masking.q_pos.shape[1], masking.k_pos.shape[1]
    q = jax.random.normal(kq, (B, tq, H, D), jnp.float32)
    k = jax.random.normal(kk, (B, tk, kv_heads, D), jnp.float32)
    v = jax.random.normal(kv, (B, tk, kv_heads, D), jnp.float32)
    return tuple(x.astype(dtype) for x in (q, k, v))


def _value_and_grads(fn, q, k, v, real_bt):
    """Output and d(sum(out * cot))/d(q, k, v) with a cotangent on real query rows only."""
    cot = jax.random.normal(jax.random.key(7), q.shape, jnp.float32) * real_bt[:, :, None, None]

    def loss(q, k, v):
        return jnp.sum(fn(q, k, v).astype(jnp.float32) * cot)

    return jax.jit(lambda q, k, v: (fn(q, k, v), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)))(q, k, v)


def kernel_errors(kernel: str, case: str, dtype: str) -> tuple[float, float]:
    """(forward, gradient) max abs difference of `kernel` in interpret mode vs the einsum path, real rows only
    (bf16: relative to the largest reference magnitude)."""
    masking, kv_heads = _case(case, t=120 if case == "packed" else 128)
    q, k, v = _qkv(masking, kv_heads, jnp.dtype(dtype))
    real = np.ones(masking.q_pos.shape, bool) if masking.q_seg is None else np.asarray(masking.q_seg) > 0
    run = flash.splash_attention if kernel == "splash" else flash.triton_attention

    out, grads = _value_and_grads(lambda q, k, v: run(q, k, v, masking, interpret=True), q, k, v, real)
    ref, ref_grads = _value_and_grads(lambda q, k, v: _einsum_attention(q, k, v, masking.dense(), 0.0, None),
                                      q, k, v, real)
    for r in ref_grads:
        assert float(jnp.max(jnp.abs(r.astype(jnp.float32)))) > 0.1  # not vacuous
    def err(a, b):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        scale = 1.0 if dtype == "float32" else float(np.max(np.abs(b)))
        return float(np.max(np.abs(a - b))) / scale

    return err(np.asarray(out)[real], np.asarray(ref)[real]), max(err(g, r) for g, r in zip(grads, ref_grads))


# "packed": GQA, documents with restarting positions, a padded row, and 120 slots (padded to 128 inside).
# (fp32 "packed" runs in test_splash_separate_backward_kernels_match_einsum, with the other backward kernels.)
SPLASH_CASES = [("causal", "float32"), ("window", "float32"), ("encoder", "float32"), ("cross", "float32"),
                ("packed", "bfloat16")]
TRITON_CASES = [("packed", "float32"), ("encoder", "float32"), ("packed", "bfloat16")]


@pytest.mark.parametrize("case,dtype", SPLASH_CASES)
def test_splash_kernel_matches_einsum_with_gradients(case, dtype):
    """TPU splash attention (interpret mode): plain causal; packed rows with restarting positions, padding and
    GQA, 120 slots padded up to a lane multiple; local window; bidirectional; cross with source padding."""
    fwd, grad = kernel_errors("splash", case, dtype)
    assert fwd <= TOL[dtype] and grad <= TOL[dtype], (fwd, grad)


def test_splash_separate_backward_kernels_match_einsum(monkeypatch):
    """Beyond MAX_FUSED_KV_BLOCKS key blocks splash runs its separate dq and dk/dv kernels (forced here)."""
    monkeypatch.setattr(flash, "MAX_FUSED_KV_BLOCKS", 0)
    flash._splash_kernel.cache_clear()
    try:
        fwd, grad = kernel_errors("splash", "packed", "float32")
    finally:
        flash._splash_kernel.cache_clear()
    assert fwd <= TOL["float32"] and grad <= TOL["float32"], (fwd, grad)


@pytest.mark.parametrize("case,dtype", TRITON_CASES)
def test_triton_kernel_matches_einsum_with_gradients(case, dtype):
    """GPU Pallas flash attention (interpret mode): packed + padded rows with GQA (120 -> 128 slots), and
    bidirectional with padding."""
    fwd, grad = kernel_errors("triton", case, dtype)
    assert fwd <= TOL[dtype] and grad <= TOL[dtype], (fwd, grad)


@pytest.mark.parametrize("kernel", ["splash", "triton"])
def test_kernel_prefill_over_a_kv_cache_matches_einsum(kernel):
    """New tokens at cache slots [64, 192) of 256 (the offset traced), earlier slots filled, later ones empty,
    the second row left-padded by 5: the kernels run over the cache slots and keep the new rows."""
    valid = np.zeros((B, 256), np.int32)
    valid[:, :192] = 1
    valid[1, :5] = 0
    pos = jnp.asarray(np.maximum(np.cumsum(valid, axis=1) - 1, 0) * valid, jnp.int32)
    masking = Masking(pos[:, 64:192], pos, jnp.asarray(valid[:, 64:192]), jnp.asarray(valid), causal=True)
    q, k, v = _qkv(Masking(pos[:, 64:192], pos), 2, jnp.float32, seed=3)
    run = flash.splash_attention if kernel == "splash" else flash.triton_attention
    out = jax.jit(lambda q, k, v, off: run(q, k, v, masking, q_offset=off, interpret=True))(q, k, v, jnp.int32(64))
    ref = _einsum_attention(q, k, v, masking.dense(), 0.0, None)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=1e-5)


def test_kernel_choice_per_platform_and_fallback_reasons():
    """Where the kernels apply, and the reason they give where they do not."""
    cfg = tformer.ModelConfig(vocab_size=64, d_model=128, num_heads=4, num_kv_heads=2, max_len=512, attention="auto")

    def choice(case, platform, t=128, attention="auto", cache=False):
        m, _ = _case(case, t)
        lens = (m.q_pos.shape[1], m.k_pos.shape[1])
        return resolve_impl(cfg.replace(attention=attention), jnp.bfloat16, m, False, lens, platform, cache)

    assert [choice(c, "tpu") for c in ("causal", "packed", "window", "encoder", "cross")] == ["splash"] * 5
    assert [choice(c, "cuda") for c in ("causal", "packed", "encoder")] == ["triton"] * 3
    assert choice("window", "cuda") == "banded" and choice("cross", "cuda") == "xla"
    assert choice("causal", "cpu") == "blocked" and choice("packed", "cpu") == "blocked"
    # "auto" keeps short sequences dense; "flash" takes the kernel from 8 queries.
    assert choice("causal", "tpu", t=96) == "xla" and choice("causal", "tpu", t=96, attention="flash") == "splash"
    m = _case("causal", 1)[0]
    assert flash.kernel_for("tpu", m, (1, 512), jnp.bfloat16, 32, auto=True, cache=True) == (
        None, "1 queries (< 128: a decode step or a short sequence)")
    assert flash.kernel_for("cuda", _case("cross")[0], (128, 96), jnp.bfloat16, 32, auto=True)[1] == (
        "the Triton kernel has one segment row for queries and keys: no cross-attention")
    # Dropout and top-k need the explicit scores on every platform.
    assert resolve_impl(cfg.replace(attention="flash"), jnp.float32, _case("causal")[0], True, (128, 128), "tpu") \
        == "einsum"


# ---------------------------------------------------------------------------
# Programs lowered for TPU / GPU on this CPU-only machine.


def _config(name: str, **model):
    """An experiments/ config's ModelConfig (tokenizer-independent), with `model` fields replaced."""
    import importlib

    from experiments import run_config

    config = importlib.import_module(f"experiments.configs.{name}").get_config()
    return dataclasses.replace(run_config.plan_model_config(config), **model), run_config.optim_config(config)


def _train_plan(model_cls, cfg, optim, platform, **shape):
    return plan_lib.plan_platform(model_cls, cfg, optim, platform, programs=("train",), **shape)


@pytest.mark.parametrize("platform,call", [("tpu", "tpu_custom_call"), ("gpu", "__gpu$xla.gpu.triton")])
def test_lm_gpt2_small_train_step_lowered_for_accelerators_holds_the_kernel_and_no_scores(platform, call):
    """lm_gpt2_small ("auto"; 2 layers and a small vocabulary to stay quick, T = 1024 and 12 heads kept) on a
    packed batch: the lowered train step has the kernel's custom call and no [.., 1024, 1024] tensor."""
    cfg, optim = _config("lm_gpt2_small", num_layers=2, vocab_size=300)
    assert cfg.attention == "auto" and cfg.num_heads == 12
    p = _train_plan(tformer.DecoderLM, cfg, optim, platform, batch=2, seq_len=1024)
    assert p.kernel_calls["train"].get(call, 0) >= 1 and not p.score_tensors["train"], p.table()
    assert [ln.impl for ln in p.lines] == ["splash" if platform == "tpu" else "triton"]
    assert flash.KERNEL_NAMES[p.lines[0].impl] in p.table()


@pytest.mark.parametrize("platform,call", [("tpu", "tpu_custom_call"), ("gpu", "__gpu$xla.gpu.triton")])
def test_seq2seq_base_train_step_lowered_for_accelerators_holds_the_kernel(platform, call):
    """seq2seq_base (1 + 1 layers, small vocabulary, 8 heads kept; T = 256 rather than its 128, which equals
    the TPU lane width, so the splash kernel's own [.., T, 128] tensors would read as scores): encoder self-,
    decoder self- and cross-attention. TPU: splash for all three, no [.., T, T] tensor; GPU: Triton for the
    two self-attentions, cross-attention dense (the Triton kernel has one segment row)."""
    cfg, optim = _config("seq2seq_base", num_layers=1, num_encoder_layers=1, vocab_size=300, dropout=0.0,
                         max_len=256)
    p = _train_plan(tformer.EncoderDecoder, cfg, optim, platform, batch=2, seq_len=256, src_len=256)
    impls = {ln.call.kind: ln.impl for ln in p.lines}
    assert p.kernel_calls["train"].get(call, 0) >= 1, p.table()
    if platform == "tpu":
        assert set(impls.values()) == {"splash"} and not p.score_tensors["train"], p.table()
    else:
        assert impls == {"self, bidirectional": "triton", "self, causal": "triton", "cross": "xla"}, p.table()


@pytest.mark.parametrize("attention", ["flash", "auto"])
def test_gqa_packed_bf16_decoder_lowered_for_tpu_and_cuda(attention):
    """The issue's DecoderLM: bf16, T = 512, GQA, packed batch; tpu: splash and no scores, cuda: Triton."""
    cfg = tformer.ModelConfig(vocab_size=300, d_model=256, num_heads=8, num_kv_heads=2, num_layers=1, max_len=512,
                              dtype="bfloat16", attention=attention)
    for platform, call in (("tpu", "tpu_custom_call"), ("gpu", "__gpu$xla.gpu.triton")):
        p = _train_plan(tformer.DecoderLM, cfg, training.OptimizerConfig(), platform, batch=2, seq_len=512)
        assert p.kernel_calls["train"].get(call, 0) >= 1 and not p.score_tensors["train"], p.table()


def test_cpu_lowering_keeps_the_cpu_path():
    """The same "auto" program lowered for CPU has no kernel custom call (the platform branch follows lowering),
    and the score check finds the CPU path's [B, T, T] mask of the packed rows (the check can fail)."""
    cfg = tformer.ModelConfig(vocab_size=300, d_model=128, num_heads=4, num_kv_heads=2, num_layers=1, max_len=256,
                              attention="auto")
    p = _train_plan(tformer.DecoderLM, cfg, training.OptimizerConfig(), "cpu", batch=2, seq_len=256)
    assert not p.kernel_calls["train"] and [ln.impl for ln in p.lines] == ["blocked"]
    assert "i1[2x256x256]" in p.score_tensors["train"], p.table()


def test_sequence_parallel_flash_raises_naming_the_limit():
    from flax import nnx

    from tformer import sharding
    from tformer.attention import Attention

    cfg = tformer.ModelConfig(vocab_size=64, d_model=32, num_heads=2, num_layers=1, max_len=64, attention="flash")
    attn = Attention(cfg, rngs=nnx.Rngs(0))
    pos = jnp.broadcast_to(jnp.arange(16), (2, 16))
    mesh = sharding.make_mesh({"data": 1, "sequence": 2}, devices=jax.devices()[:2])
    with sharding.use_rules(mesh, sharding.rules_for("dp")), pytest.raises(ValueError, match="attention='flash' is not "
                                                                                   "supported with sequence"):
        jax.eval_shape(lambda x: attn(x, Masking(pos, pos)), jax.ShapeDtypeStruct((2, 16, 32), jnp.float32))


def test_splash_kernel_under_a_mesh_runs_per_shard_and_matches_einsum():
    """Batch split over `data`, query and K/V heads over `tensor` (GQA groups whole): the kernel runs inside a
    shard_map over every mesh axis (a Mosaic call cannot be partitioned automatically) with the same result."""
    from tformer import sharding

    masking, kv_heads = _case("packed", t=128)
    q, k, v = _qkv(masking, kv_heads, jnp.float32, seed=5)
    mesh = sharding.make_mesh({"data": 2, "tensor": 2}, devices=jax.devices()[:4])

    def run(q, k, v):
        with sharding.use_rules(mesh, sharding.rules_for("dp_tp")):
            return flash.splash_attention(q, k, v, masking, interpret=True)

    lowered = jax.jit(run).lower(q, k, v)
    assert "shard_map" in lowered.as_text() or "sdy.manual_computation" in lowered.as_text()
    out = lowered.compile()(q, k, v)
    ref = _einsum_attention(q, k, v, masking.dense(), 0.0, None)
    real = np.asarray(masking.q_seg) > 0
    np.testing.assert_allclose(np.asarray(out)[real], np.asarray(ref)[real], atol=1e-5, rtol=1e-5)
