"""The benchmark harness and its arithmetic (tformer.flops), checked against hand counts."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

import tformer
from experiments import benchmark as bm
from tformer import flops

REPO = Path(__file__).resolve().parents[1]
TINY = ("vocab_size=100", "d_model=32", "num_heads=4", "num_layers=1", "max_len=160")


def real_params(model_cls, cfg) -> int:
    abstract = nnx.eval_shape(lambda: model_cls(cfg, rngs=nnx.Rngs(0)))
    return sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


# ---------------------------------------------------------------------------
# Parameter and FLOP counts.


def test_gpt2_small_param_count_by_hand():
    cfg = tformer.gpt2_small()
    d, f, vocab, layers, max_len = 768, 3072, 50304, 12, 1024
    attn = 4 * d * d + 4 * d  # wq, wk, wv, wo + their biases
    mlp = 2 * d * f + f + d
    norms = 2 * 2 * d  # two LayerNorms (scale + bias)
    per_layer = attn + mlp + norms
    assert per_layer == 7_087_872
    non_embedding = layers * per_layer
    assert non_embedding == 85_054_464  # the "85M" of GPT-2 small
    n = non_embedding + vocab * d + 2 * d  # + tied token table + final LayerNorm
    assert n == 123_689_472
    assert flops.param_count(cfg) == n
    with_positions = n + max_len * d
    assert with_positions == 124_475_904  # the "124M"
    assert flops.param_count(cfg, include_positions=True) == with_positions
    assert real_params(tformer.DecoderLM, cfg) == with_positions
    # 6 N + 12 L d T at T = 1024: the ~0.855 GFLOP/token MFU basis.
    assert flops.train_flops_per_token(cfg, 1024) == 6 * n + 12 * layers * d * 1024 == 855_383_040


@pytest.mark.parametrize("kw", [
    dict(vocab_size=100, d_model=32, num_heads=4, num_layers=2),
    dict(vocab_size=300, d_model=48, num_heads=4, num_kv_heads=2, num_layers=2, positions="rope", norm="rmsnorm",
         activation="swiglu", use_bias=False, tie_embeddings=False),
    dict(vocab_size=130, d_model=32, num_heads=2, head_dim=24, d_ff=40, num_layers=1, norm_placement="post",
         positions="sinusoidal", vocab_multiple=64),
])
def test_param_count_matches_decoder_lm(kw):
    cfg = tformer.ModelConfig(**kw)
    assert flops.param_count(cfg, include_positions=True) == real_params(tformer.DecoderLM, cfg)


def test_param_count_matches_encoder_decoder():
    cfg = tformer.ModelConfig(vocab_size=100, d_model=32, num_heads=4, num_layers=2, num_encoder_layers=1)
    assert flops.param_count(cfg, include_positions=True) == real_params(tformer.EncoderDecoder, cfg)


def test_train_flops_encoder_decoder_by_hand():
    # The model kind comes from the config: encoder layers and cross-attention are counted.
    # d 32, 4 heads of 8, d_ff 128, LayerNorm, biases, tied, vocab 100 -> 128; 1 encoder + 2 decoder layers.
    cfg = tformer.ModelConfig(vocab_size=100, d_model=32, num_heads=4, num_layers=2, num_encoder_layers=1)
    attn = 4 * 32 * 32 + 3 * 32 + 32  # Q, K, V, O weights; their biases
    mlp = 2 * 32 * 128 + 128 + 32
    norm = 2 * 32  # LayerNorm scale + bias
    n = 1 * (attn + mlp + 2 * norm) + 2 * (2 * attn + mlp + 3 * norm) + 128 * 32 + 2 * norm
    assert flops.param_count(cfg) == n == 50_912
    assert flops.train_flops_per_token(cfg, 16) == 6 * n + 12 * 2 * 32 * 16


def test_train_flops_small_config_by_hand():
    # d 64, 2 heads of 32, d_ff 128, 2 layers, vocab 100 -> padded 128, untied, RMSNorm, no biases.
    cfg = tformer.ModelConfig(vocab_size=100, d_model=64, num_heads=2, d_ff=128, num_layers=2, norm="rmsnorm",
                              use_bias=False, tie_embeddings=False, max_len=64)
    per_layer = 4 * 64 * 64 + 2 * 64 * 128 + 2 * 64  # attention, MLP, two RMSNorm scales
    n = 2 * per_layer + 128 * 64 * 2 + 64  # layers, table + head, final norm (positions excluded)
    assert flops.param_count(cfg) == n == 82_240
    assert flops.train_flops_per_token(cfg, 32) == 6 * n + 12 * 2 * 64 * 32
    assert flops.decode_flops_per_token(cfg, 10) == 2 * n + 4 * 2 * 64 * 10


def test_mfu_arithmetic_and_bad_peak():
    # 0.855 GFLOP/token at 578k tokens/s on a 989 TFLOP/s part is the 50% MFU goal.
    assert flops.model_tflops(855_383_040, 578_000) == pytest.approx(494.41, abs=0.01)
    assert flops.mfu(855_383_040, 578_000, 989.0) == pytest.approx(0.49991, abs=1e-4)
    with pytest.raises(ValueError, match="peak_tflops must be > 0, got 0"):
        flops.mfu(1.0, 1.0, 0)


def test_decode_roofline_by_hand():
    cfg = tformer.gpt2_small()
    # Batch 64, cache of 16 + 512 slots, bf16 weights and cache.
    weights = 123_689_472 * 2
    kv = 12 * 2 * 64 * 528 * 768 * 2  # layers x (K, V) x batch x slots x (heads x head_dim) x bytes
    assert flops.kv_bytes_per_step(cfg, 64, 528, 2) == kv == 1_245_708_288
    assert flops.decode_bytes_per_step(cfg, 64, 528, 2, 2) == weights + kv
    assert flops.roofline_ms(weights + kv, 3.0e12) == pytest.approx((weights + kv) / 3.0e9)
    assert flops.roofline_ms(weights + kv, 3.0e12) == pytest.approx(0.4977, abs=1e-4)  # REFERENCE: "about 0.5"
    # Batch 1 is weight-bound: ~0.09 ms at 3 TB/s.
    b1 = flops.decode_bytes_per_step(cfg, 1, 528, 2, 2)
    assert b1 == weights + 12 * 2 * 528 * 768 * 2
    assert flops.roofline_ms(b1, 3.0e12) == pytest.approx(0.0890, abs=1e-4)
    with pytest.raises(ValueError, match="batch must be >= 1, got 0"):
        flops.decode_bytes_per_step(cfg, 0, 528, 2, 2)
    with pytest.raises(ValueError, match="bytes_per_s must be > 0"):
        flops.roofline_ms(1, 0)


# (device_kind as JAX reports it, name, peak TFLOP/s and bytes/s per JAX device)
@pytest.mark.parametrize("kind,name,peak,bw", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM", 989, 3.35e12),
    ("NVIDIA H100 PCIe", "H100 PCIe", 756, 2.0e12),
    ("NVIDIA H200", "H200", 989, 4.8e12),
    ("NVIDIA A100-SXM4-80GB", "A100", 312, 2.0e12),
    ("NVIDIA A100-PCIE-40GB", "A100", 312, 2.0e12),
    ("NVIDIA L4", "L4", 121, 0.3e12),
    ("Tesla T4", "T4", 65, 0.32e12),
    ("TPU v2", "TPU v2", 22.5, 0.35e12),  # a chip's two cores are two devices: half a chip each
    ("TPU v3", "TPU v3", 61.5, 0.45e12),
    ("TPU v4", "TPU v4", 275, 1.2e12),
    ("TPU v5 lite", "TPU v5e", 197, 0.82e12),
    ("TPU v5", "TPU v5p", 459, 2.76e12),
    ("TPU v6 lite", "TPU v6e", 918, 1.64e12),
])
def test_device_spec_lookup(kind, name, peak, bw):
    spec = flops.device_spec(kind)
    assert (spec.name, spec.peak_tflops, spec.hbm_bytes_per_s) == (name, peak, bw)


@pytest.mark.parametrize("kind,devices,chips,chip_tflops", [
    ("TPU v2", 8, 4, 45), ("TPU v3", 8, 4, 123), ("TPU v5 lite", 1, 1, 197), ("TPU v6 lite", 1, 1, 918)])
def test_colab_tpu_run_peak_counts_chips_not_cores(kind, devices, chips, chip_tflops):
    """A Colab v2-8 / v3-8 shows 8 devices on 4 chips; v5e-1 / v6e-1 one device on one chip."""
    spec = flops.device_spec(kind)
    assert spec.peak_tflops * devices == chips * chip_tflops


def test_device_spec_unknown_is_none():
    assert flops.device_spec("cpu") is None
    assert flops.device_spec("Some Future Chip") is None
    assert flops.device_spec("NVIDIA L40S") is None  # whole words: not the L4


# ---------------------------------------------------------------------------
# Config plumbing.


def test_overrides_are_typed_and_validated():
    got = bm.parse_overrides(["d_model=64", "scan_layers=true", "local_window=none", "rope_theta=500.5",
                              "attention=einsum"])
    assert got == dict(d_model=64, scan_layers=True, local_window=None, rope_theta=500.5, attention="einsum")
    with pytest.raises(ValueError, match=r"--override: unknown ModelConfig field 'd_modle'; valid fields are \["):
        bm.parse_overrides(["d_modle=64"])
    with pytest.raises(ValueError, match=r"--override expects key=value, got 'd_model'"):
        bm.parse_overrides(["d_model"])
    with pytest.raises(ValueError, match=r"--override num_layers=two: expected a value of type int"):
        bm.parse_overrides(["num_layers=two"])
    with pytest.raises(ValueError, match=r"--model='gpt3' is unknown; choose one of \['cpu_tiny', 'gpt2_small'\]"):
        bm.model_config(bm.Options(model="gpt3"))


def test_xla_flags_refused_after_backend_start():
    jax.devices()  # the backend is running in this process
    with pytest.raises(RuntimeError, match="--xla_flags must be applied before jax starts its backend"):
        bm.apply_xla_flags("--xla_gpu_enable_latency_hiding_scheduler=true")


# ---------------------------------------------------------------------------
# End to end on CPU, tiny.

REQUIRED = {"what", "tokens_per_s", "tflops", "mfu", "compile_s", "attention", "scan_layers", "remat",
            "logits_dtype", "vocab_multiple", "donate", "skip_nonfinite", "device_kind"}


def test_run_in_process_train_and_decode():
    opts = bm.Options(model="cpu_tiny", overrides=TINY, what=("train", "decode"), batch=2, seq_len=32, steps=3,
                      warmup=1, decode_batches=(2,), prompt_len=8, new_tokens=128, hbm_gbps=100.0,
                      peak_tflops=2.0, decode_repeats=5)  # 5: the best 128-token run must beat the best 1-token run
    emitted = []
    records = bm.run(opts, emit=emitted.append)
    assert records == emitted and [r["what"] for r in records] == ["train", "decode"]
    for r in records:
        assert REQUIRED <= set(r), REQUIRED - set(r)
        assert json.loads(json.dumps(r)) == r
    train, dec = records
    cfg = bm.model_config(opts)
    assert train["step_ms"] > 0 and train["compile_s"] > 0 and train["peak_memory_bytes"] > 0
    assert train["tokens_per_s"] == pytest.approx(2 * 32 / (train["step_ms"] / 1e3), rel=1e-3)
    assert train["flops_per_token"] == flops.train_flops_per_token(cfg, 32)
    assert train["mfu"] == pytest.approx(train["tflops"] / 2.0, abs=1e-4)
    assert train["attention_resolved"] == "einsum" and train["skip_nonfinite"] is False  # CPU's dense path
    assert dec["batch"] == 2 and dec["cache_len"] == 8 + 128
    assert dec["ms_per_token"] > 0 and dec["prefill_ms"] > 0 and dec["compile_s"] > 0
    assert dec["tokens_per_s"] == pytest.approx(2 / (dec["ms_per_token"] / 1e3), rel=1e-3)
    # One decode phase (127 steps < 128): it reads the slots filled by its end, 8 + 127 of the 136.
    assert dec["decode_phases"] == 1 and dec["kv_slots_read"] == 135
    assert dec["bytes_per_step"] == flops.decode_bytes_per_step(cfg, 2, 135, 4, 4)
    assert dec["roofline_ms"] == pytest.approx(dec["bytes_per_step"] / 100e9 * 1e3, rel=1e-3)
    assert dec["roofline_ratio"] == pytest.approx(dec["ms_per_token"] / dec["roofline_ms"], rel=1e-2)
    assert "tokens_per_s" in bm.table(records)


def test_train_reports_blocked_attention_for_long_causal_sequences_on_cpu():
    # `auto` resolves per call: block-causal on CPU from BLOCKED_MIN_LEN tokens, and the record says so.
    n = tformer.attention.BLOCKED_MIN_LEN
    opts = bm.Options(model="cpu_tiny", overrides=TINY, batch=1, seq_len=n, steps=1, warmup=0)
    (rec,) = bm.run(opts)
    want = "blocked" if jax.default_backend() == "cpu" else rec["attention_resolved"]
    assert rec["attention"] == "auto" and rec["attention_resolved"] == want
    (forced,) = bm.run(bm.Options(model="cpu_tiny", overrides=(*TINY, "attention=blocked"), batch=1, seq_len=30,
                                  steps=1, warmup=0))
    assert forced["attention_resolved"] == "xla"  # 30 tokens: not divisible into 4 blocks, dense fallback


def test_packed_rows_are_laid_out_as_the_input_pipeline_packs_them():
    # Segment ids count documents from 1 within each row; positions restart at 0 with every document.
    cfg = tformer.ModelConfig(vocab_size=100, d_model=32, num_heads=4, num_layers=1, max_len=256)
    batch = bm.lm_batch(cfg, 6, 256, seed=3, packed=True)
    seg, pos = np.asarray(batch["segment_ids"]), np.asarray(batch["positions"])
    assert seg.shape == pos.shape == (6, 256) and seg.dtype == pos.dtype == np.int32
    new_doc = np.diff(seg, axis=1) != 0
    assert (seg[:, 0] == 1).all() and set(np.diff(seg, axis=1).ravel()) <= {0, 1} and new_doc.any()
    assert (pos[:, 0] == 0).all() and (pos[:, 1:][new_doc] == 0).all()
    assert (np.diff(pos, axis=1)[~new_doc] == 1).all()
    (rec,) = bm.run(bm.Options(model="cpu_tiny", overrides=TINY, batch=2, seq_len=128, steps=1, warmup=0,
                               packed=True))
    assert rec["packed"] is True and rec["tokens_per_s"] > 0
    assert rec["attention_resolved"] == ("blocked" if jax.default_backend() == "cpu" else rec["attention_resolved"])


FAKE_PEER = textwrap.dedent("""
    import json, os
    def train(compile_model, B=1, steps=1):
        v, t, d, l, h = (int(x) for x in os.environ["SHAPE"].split(","))
        print(json.dumps(dict(peer="fake", what="train_step", compiled=compile_model, batch=B, seq=t,
                              shape=[v, t, d, l, h], step_ms=1000.0, tokens_per_s=1)))
    def decode(static, B=1, prompt=16, new=512):
        raise RuntimeError("no decode here")
""")


def test_cli_knobs_peer_and_json_lines(tmp_path):
    peer = tmp_path / "fake_peer.py"
    peer.write_text(FAKE_PEER)
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    cmd = [sys.executable, str(REPO / "experiments" / "benchmark.py"), "--model=cpu_tiny", "--what=train",
           *(f"--override={o}" for o in TINY), "--batch=2", "--seq_len=16", "--steps=2", "--warmup=1",
           "--scan_layers=true", "--remat=full", "--attention=einsum", "--logits_dtype=bfloat16",
           "--vocab_multiple=64", "--nodonate", "--xla_flags=--xla_gpu_autotune_level=0",
           f"--peer_script={peer}", "--peer_modes=train,decode", "--rounds=2", f"--json_out={tmp_path / 'out.jsonl'}"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [json.loads(x) for x in proc.stdout.splitlines()]  # stdout is JSON lines only
    assert lines == [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    ours = [r for r in lines if r["system"] == "tformer" and r["what"] == "train"]
    assert [r["round"] for r in ours] == [0, 1]
    for r in ours:
        assert REQUIRED <= set(r) and r["step_ms"] > 0
        assert (r["scan_layers"], r["remat"], r["attention"], r["logits_dtype"], r["vocab_multiple"],
                r["donate"]) == (True, "full", "einsum", "bfloat16", 64, False)
        assert "--xla_gpu_autotune_level=0" in r["xla_flags"]
    fake = [r for r in lines if r.get("system") == "fake"]
    assert [r["round"] for r in fake] == [0, 1]
    assert fake[0]["what"] == "train" and fake[0]["shape"] == [128, 16, 32, 1, 4] and fake[0]["batch"] == 2
    errors = [r for r in lines if "error" in r]
    assert len(errors) == 2 and all("no decode here" in r["error"] for r in errors)  # decode batches 1 and 8
    cmp = [r for r in lines if r["what"] == "compare"]
    assert [r["round"] for r in cmp] == [0, 1, "median"]
    for r, o in zip(cmp, ours):
        assert r["speedup"] == pytest.approx(1000.0 / o["step_ms"], rel=1e-3)
    assert cmp[2]["speedup"] == pytest.approx((cmp[0]["speedup"] + cmp[1]["speedup"]) / 2, rel=1e-3)
    assert "speedup" in proc.stderr and "step_ms" in proc.stderr  # the table
    # --tune_allocator (default) is recorded for tformer, passed to the peer's child, and in the ratio lines.
    assert all(r["allocator_tuned"] is True for r in ours + fake + cmp)
    assert all(r["peer_allocator_tuned"] is True for r in cmp)


def _train_faults(tmp_path, *flags):
    cmd = [sys.executable, str(REPO / "experiments" / "benchmark.py"), "--model=cpu_tiny", "--what=train",
           "--override=num_layers=1", "--batch=4", "--steps=5", "--warmup=2", *flags]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (rec,) = [json.loads(x) for x in proc.stdout.splitlines()]
    return rec


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc allocator tuning is Linux-only")
def test_tuned_allocator_step_faults_no_pages(tmp_path):
    # ~80 MB of temporaries per step: glibc returns them to the OS unless told to keep them (tformer.host).
    default = _train_faults(tmp_path, "--notune_allocator")
    bound = 50 + 0.01 * default["host_page_faults_per_step"]
    tuned = _train_faults(tmp_path, "--tune_allocator")
    if tuned["host_page_faults_per_step"] > bound:
        # On a loaded machine the kernel's own reclaim (e.g. DAMON) can take back idle pages mid-run; a tuning
        # that does not work faults every step of every run (~10k pages here), so one more run tells them apart.
        tuned = _train_faults(tmp_path, "--tune_allocator")
    assert (tuned["allocator_tuned"], default["allocator_tuned"]) == (True, False)
    faults = (tuned["host_page_faults_per_step"], default["host_page_faults_per_step"])
    assert faults[0] <= bound, f"page faults per step, tuned vs default: {faults}"


def test_cpu_xla_flags_are_added_once_and_never_override_the_user():
    from tformer import host

    env = {}
    assert host.add_cpu_xla_flags(env) == list(host.CPU_XLA_FLAGS)
    assert env["XLA_FLAGS"] == " ".join(host.CPU_XLA_FLAGS)
    assert host.add_cpu_xla_flags(env) == [] and env["XLA_FLAGS"] == " ".join(host.CPU_XLA_FLAGS)
    mine = "--xla_force_host_platform_device_count=8 --xla_cpu_multi_thread_eigen=true"
    env = {"XLA_FLAGS": mine}
    assert host.add_cpu_xla_flags(env) == [] and env["XLA_FLAGS"] == mine  # the user's value stands


def test_narrow_models_keep_ynnpack_to_dots_on_cpu_and_wide_ones_keep_the_default():
    import re

    import tformer
    from tformer import batch as batch_lib
    from tformer import host, training

    cfg = tformer.ModelConfig(vocab_size=64, d_model=32, num_heads=4, num_layers=1, d_ff=64, max_len=16)
    options = host.cpu_compiler_options(cfg.d_model)
    assert host.cpu_compiler_options(host.NARROW_D_MODEL) == {} and host.cpu_compiler_options(32, backend="gpu") == {}
    if not options:
        pytest.skip("this jaxlib has no YNNPACK fusions")
    o = training.OptimizerConfig(warmup_steps=1, total_steps=10)
    graphdef, tx, state, _ = training.create_train_state(tformer.DecoderLM, cfg, o)
    batch = batch_lib.lm_batch(np.random.default_rng(0).integers(0, 64, (12, 17)))

    def ynn_bodies(opts):
        hlo = training.make_train_step(graphdef, tx, o, compiler_options=opts).lower(state, batch).compile().as_text()
        called = re.findall(r"fusion\(.*?calls=%([\w.\-]+).*__ynn_fusion", hlo)
        return [re.search(r"%" + re.escape(c) + r" .*?\n}", hlo, re.S).group(0) for c in called]

    default, small = ynn_bodies({}), ynn_bodies(options)
    assert any(" dot(" not in b for b in default)  # YNNPACK takes elementwise/reduction fusions by default
    assert small and all(" dot(" in b for b in small)  # ... and only dots with the narrow-model option
