"""tformer.runtime: the backend, chips, dtype and peak a notebook reports, and the CPU fallback said plainly."""

import types

import jax

from tformer import runtime


def _devices(platform: str, kind: str, n: int) -> list:
    return [types.SimpleNamespace(platform=platform, device_kind=kind, id=i) for i in range(n)]


def test_colab_v2_8_is_8_devices_on_4_chips_in_bf16(tmp_path):
    rt = runtime.describe_runtime(_devices("tpu", "TPU v2", 8), dev_root=tmp_path)
    assert (rt.backend, rt.device_count, rt.chips, rt.dtype, rt.peak_tflops) == ("tpu", 8, 4, "bfloat16", 180.0)
    assert "8 devices (TPU v2, 4 chips)" in rt.summary() and "peak 180 TFLOP/s" in rt.summary()


def test_colab_v5e_1_and_a_gpu_report_their_peak(tmp_path):
    v5e = runtime.describe_runtime(_devices("tpu", "TPU v5 lite", 1), dev_root=tmp_path)
    t4 = runtime.describe_runtime(_devices("gpu", "Tesla T4", 1), dev_root=tmp_path)
    assert (v5e.chips, v5e.peak_tflops, t4.peak_tflops, t4.dtype) == (1, 197.0, 65.0, "bfloat16")


def test_unknown_accelerator_says_no_mfu(tmp_path):
    rt = runtime.describe_runtime(_devices("tpu", "TPU v9 future", 4), dev_root=tmp_path)
    assert rt.peak_tflops is None and "no MFU" in rt.summary()


def test_cpu_fallback_is_said_plainly_and_uses_fp32(tmp_path):
    rt = runtime.describe_runtime(jax.devices("cpu")[:1], dev_root=tmp_path)  # no device files: nothing attached
    assert (rt.backend, rt.dtype, rt.attached, rt.peak_tflops) == ("cpu", "float32", None, None)
    assert "NO accelerator in use" in rt.summary() and "Change runtime type" in rt.summary()


def test_cpu_fallback_with_an_attached_tpu_blames_the_jax_install(tmp_path):
    (tmp_path / "vfio").mkdir()
    (tmp_path / "vfio" / "0").touch()  # how a v5e / v6e chip shows up
    rt = runtime.describe_runtime(jax.devices("cpu")[:1], dev_root=tmp_path)
    assert rt.attached == "TPU"
    assert "A TPU is attached" in rt.summary() and "never `pip install -U jax`" in rt.summary()
