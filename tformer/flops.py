"""FLOP and byte arithmetic for MFU and decode rooflines (pure Python).

Everything here is closed-form arithmetic over a `ModelConfig`, so a test can
check it against a count written out by hand and against the real model.
"""

from __future__ import annotations

import dataclasses
import re

from tformer.config import ModelConfig


def param_count(cfg: ModelConfig, include_positions: bool = False) -> int:
    """Parameters of the model `cfg` describes (`cfg.task`), counting the padded vocabulary as stored.

    The learned position table is left out unless `include_positions`: it is
    a lookup, not a matmul, so the 6N training-FLOP rule excludes it.
    """
    encoder_decoder = cfg.task == "seq2seq"
    d, f, h, kh, hd = cfg.d_model, cfg.resolved_d_ff, cfg.num_heads, cfg.kv_heads, cfg.resolved_head_dim
    bias = cfg.use_bias
    attn = d * h * hd * 2 + d * kh * hd * 2 + (h * hd + 2 * kh * hd + d if bias else 0)
    mlp = d * f * (3 if cfg.gated else 2) + (f + d if bias else 0)
    norm = d * (2 if cfg.norm == "layernorm" else 1)
    dec_layer = attn + mlp + 2 * norm + ((attn + norm) if encoder_decoder else 0)
    total = cfg.num_layers * dec_layer + cfg.padded_vocab * d
    if not cfg.tie_embeddings:
        total += d * cfg.padded_vocab
    if cfg.norm_placement == "pre" and cfg.final_norm:
        total += norm * (2 if encoder_decoder else 1)
    if encoder_decoder:
        total += cfg.num_encoder_layers * (attn + mlp + 2 * norm)
    if include_positions and cfg.positions == "learned":
        total += cfg.max_len * d
    return total


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """6 N + 12 L d T (Kaplan et al. / PaLM appendix B), N without position table.

    The attention term uses d = num_heads * head_dim (the width of QK^T and AV).
    The causal mask is not discounted, as in the PaLM and nanoGPT MFU figures.
    """
    n = param_count(cfg)
    return 6.0 * n + 12.0 * cfg.num_layers * cfg.num_heads * cfg.resolved_head_dim * seq_len


def model_tflops(flops_per_token: float, tokens_per_s: float) -> float:
    """Achieved model TFLOP/s (useful FLOPs only: no remat recompute)."""
    return flops_per_token * tokens_per_s / 1e12


def mfu(flops_per_token: float, tokens_per_s: float, peak_tflops: float) -> float:
    """Model FLOPs utilisation in [0, 1]: achieved model FLOP/s over the device peak."""
    if peak_tflops <= 0:
        raise ValueError(f"peak_tflops must be > 0, got {peak_tflops}")
    return model_tflops(flops_per_token, tokens_per_s) / peak_tflops


def decode_flops_per_token(cfg: ModelConfig, context_len: float) -> float:
    """Forward-only FLOPs to emit one token: 2 N + 4 L d S over S attended positions."""
    return 2.0 * param_count(cfg) + 4.0 * cfg.num_layers * cfg.num_heads * cfg.resolved_head_dim * context_len


# ---------------------------------------------------------------------------
# Decode: one step reads every weight once plus the K/V it attends over.


def kv_bytes_per_step(cfg: ModelConfig, batch: int, context_len: int, kv_bytes: int) -> int:
    """K and V bytes one decode step reads: layers x 2 x batch x context x kv_heads x head_dim x bytes."""
    return cfg.num_layers * 2 * batch * context_len * cfg.kv_heads * cfg.resolved_head_dim * kv_bytes


def decode_bytes_per_step(cfg: ModelConfig, batch: int, context_len: int, bytes_per_param: int, kv_bytes: int) -> int:
    """Bytes one decode step must move from memory: all weights once + the KV cache.

    Weights exclude the position table (one row per token is read, not the
    table); the token table is counted in full because the (tied) output
    projection reads all of it. `context_len` is the number of cache slots
    attended over (for `tformer.generate`, the mean over steps of the slots
    its decode phase reads: see `tformer.generate.decode_phases`).
    """
    for name, v in (("batch", batch), ("context_len", context_len), ("bytes_per_param", bytes_per_param),
                    ("kv_bytes", kv_bytes)):
        if v < 1:
            raise ValueError(f"decode_bytes_per_step: {name} must be >= 1, got {v}")
    return param_count(cfg) * bytes_per_param + kv_bytes_per_step(cfg, batch, context_len, kv_bytes)


def roofline_ms(num_bytes: float, bytes_per_s: float) -> float:
    """Time to stream `num_bytes` at `bytes_per_s`, in milliseconds (the bandwidth lower bound)."""
    if bytes_per_s <= 0:
        raise ValueError(f"bytes_per_s must be > 0, got {bytes_per_s}")
    return num_bytes / bytes_per_s * 1e3


# ---------------------------------------------------------------------------
# Known accelerators: dense bf16 peak (spec sheets, no sparsity) and memory bandwidth.


@dataclasses.dataclass(frozen=True)
class DeviceSpec:
    """One accelerator type, specified per chip and divided over the JAX devices a chip exposes.

    JAX counts devices, not chips: on TPU v2 and v3 each chip's two TensorCores are two JAX devices (a
    Colab "v2-8" or "v3-8" shows 8 devices on 4 chips); TPU v4 and v5p fuse their two cores into one
    device (megacore); v5e and v6e chips have one core; a GPU is one device. `peak_tflops` and
    `hbm_bytes_per_s` are therefore per JAX device, so a run's peak is `peak_tflops * jax.device_count()`
    on any of them.
    """

    name: str
    chip_tflops: float  # dense bf16 TFLOP/s per chip (the T4 has no bf16 units: its fp16 figure)
    chip_bytes_per_s: float  # memory bandwidth per chip (HBM; GDDR6 on the L4 and T4)
    devices_per_chip: int = 1

    @property
    def peak_tflops(self) -> float:
        return self.chip_tflops / self.devices_per_chip

    @property
    def hbm_bytes_per_s(self) -> float:
        return self.chip_bytes_per_s / self.devices_per_chip


# `jax.Device.device_kind` strings as JAX reports them: "TPU v2", "TPU v3", "TPU v4", "TPU v5 lite" (v5e),
# "TPU v5" (v5p), "TPU v6 lite" (v6e); "NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe", "NVIDIA H200",
# "NVIDIA A100-SXM4-40GB", "NVIDIA L4", "Tesla T4". Each pattern matches whole words of the lower-cased
# string (so "l4" is not "l40s"), first match wins: the more specific names ("v5 lite", "h100 pcie")
# come before the ones they contain ("tpu v5", "h100"). Colab's TPU runtimes: v2-8 and v3-8 (4 chips,
# 8 devices), v5e-1 and v6e-1 (1 chip, 1 device).
DEVICE_SPECS: tuple[tuple[tuple[str, ...], DeviceSpec], ...] = (
    (("h100 pcie",), DeviceSpec("H100 PCIe", 756.0, 2.0e12)),
    (("h100",), DeviceSpec("H100 SXM", 989.0, 3.35e12)),
    (("h200",), DeviceSpec("H200", 989.0, 4.8e12)),
    (("a100",), DeviceSpec("A100", 312.0, 2.0e12)),
    (("l4",), DeviceSpec("L4", 121.0, 0.3e12)),
    (("t4",), DeviceSpec("T4", 65.0, 0.32e12)),
    (("v6 lite", "v6e"), DeviceSpec("TPU v6e", 918.0, 1.64e12)),
    (("v5 lite", "v5e", "v5litepod"), DeviceSpec("TPU v5e", 197.0, 0.82e12)),
    (("v5p", "tpu v5"), DeviceSpec("TPU v5p", 459.0, 2.76e12)),
    (("tpu v4",), DeviceSpec("TPU v4", 275.0, 1.2e12)),
    (("tpu v3",), DeviceSpec("TPU v3", 123.0, 0.9e12, devices_per_chip=2)),
    (("tpu v2",), DeviceSpec("TPU v2", 45.0, 0.7e12, devices_per_chip=2)),  # Jouppi et al. 2020, table 3
)


def device_spec(device_kind: str) -> DeviceSpec | None:
    """The spec for a `jax.devices()[0].device_kind` string, or None (e.g. CPU, or a chip not listed)."""
    kind = device_kind.lower()
    for patterns, spec in DEVICE_SPECS:
        if any(re.search(rf"\b{re.escape(p)}\b", kind) for p in patterns):
            return spec
    return None


# ---------------------------------------------------------------------------
# x86 CPUs: a nominal fp32 peak from /proc/cpuinfo.

# fp32 FLOP per cycle per core by the widest vector ISA the CPU reports, assuming two FMA pipes of that
# width (an FMA counts 2): AVX-512 2 x 16 x 2, AVX2 + FMA 2 x 8 x 2, else SSE (4-wide add and mul pipes).
# An upper bound: Zen 4 and client Intel cores run 512-bit FMAs at half that rate.
CPU_FLOP_PER_CYCLE = (("avx512f", 64), ("fma", 32), ("sse2", 8))


def cpu_fp32_peak(cpuinfo: str, cores: int | None = None) -> dict | None:
    """Nominal fp32 peak of the CPU `cpuinfo` (the text of /proc/cpuinfo) describes: cores x FLOP/cycle x clock.

    Cores: distinct (physical id, core id) pairs (SMT siblings share a core's FMA pipes), or `cores` if
    given. Clock: the largest "cpu MHz" the kernel reports (on a VM, usually the nominal clock; boost
    clocks can be higher). None where the text has no flags or clock (not x86 Linux).
    """
    blocks = [dict(line.split(":", 1) for line in block.splitlines() if ":" in line)
              for block in cpuinfo.strip().split("\n\n") if block.strip()]
    blocks = [{k.strip(): v.strip() for k, v in b.items()} for b in blocks]
    flags = set(next((b["flags"] for b in blocks if "flags" in b), "").split())
    mhz = [float(b["cpu MHz"]) for b in blocks if "cpu MHz" in b]
    if not flags or not mhz:
        return None
    isa, per_cycle = next(((f, n) for f, n in CPU_FLOP_PER_CYCLE if f in flags), ("none", 8))
    if cores is None:
        ids = {(b.get("physical id"), b.get("core id")) for b in blocks if "processor" in b}
        cores = len(ids) if all(k != (None, None) for k in ids) else sum("processor" in b for b in blocks)
    ghz = max(mhz) / 1e3
    return dict(model=next((b["model name"] for b in blocks if "model name" in b), "unknown"), cores=cores,
                isa={"avx512f": "avx512", "fma": "avx2+fma"}.get(isa, "sse"), avx2="avx2" in flags,
                avx512="avx512f" in flags, flop_per_cycle=per_cycle, ghz=round(ghz, 3),
                gflops=round(cores * per_cycle * ghz, 1),
                how=f"{cores} cores x {per_cycle} fp32 FLOP/cycle (two {isa} FMA pipes) x {ghz:.2f} GHz "
                    "(cpu MHz in /proc/cpuinfo)")
