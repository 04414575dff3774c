"""What this JAX runtime is: backend, devices, chips, compute dtype and peak, said plainly.

When the installed jax cannot drive the accelerator a machine has (a Colab TPU runtime after a
`pip install -U jax` that no longer matches libtpu, say), JAX falls back to the CPU with one log
warning, and everything then runs a hundred times slower in silence. `describe_runtime` names the
backend JAX really uses, and, on CPU, whether a TPU or GPU is attached that it failed to use.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax

from tformer import flops

# Device files an attached accelerator shows even when JAX cannot open it: TPU v2-v4 and v5p chips
# appear as /dev/accel<n>, v5e and v6e as VFIO groups /dev/vfio/<n>, NVIDIA GPUs as /dev/nvidia<n>.
_ACCELERATOR_FILES = (("TPU", "accel[0-9]*"), ("TPU", "vfio/[0-9]*"), ("GPU", "nvidia[0-9]*"))


@dataclasses.dataclass(frozen=True)
class Runtime:
    """The devices JAX uses. `dtype` is the compute dtype to pick: bf16 on TPU and GPU, fp32 on CPU."""

    backend: str  # "tpu", "gpu" or "cpu"
    device_count: int
    device_kind: str
    spec: flops.DeviceSpec | None  # None: a CPU, or an accelerator missing from flops.DEVICE_SPECS
    attached: str | None  # "TPU" / "GPU": an accelerator the machine has that JAX is not using

    @property
    def on_cpu(self) -> bool:
        return self.backend == "cpu"

    @property
    def dtype(self) -> str:
        return "float32" if self.on_cpu else "bfloat16"

    @property
    def chips(self) -> int | None:
        return None if self.spec is None else self.device_count // self.spec.devices_per_chip

    @property
    def peak_tflops(self) -> float | None:
        """Dense bf16 peak of all devices together (the MFU denominator), None where unknown."""
        return None if self.spec is None else self.spec.peak_tflops * self.device_count

    def summary(self) -> str:
        devices = f"{self.device_count} device{'s' if self.device_count > 1 else ''}"
        if not self.on_cpu:
            chips = f", {self.chips} chip{'s' if self.chips > 1 else ''}" if self.chips else ""
            peak = (f"; peak {self.peak_tflops:g} TFLOP/s bf16 (MFU is reported against it)" if self.peak_tflops
                    else "; peak unknown (not in tformer.flops.DEVICE_SPECS): no MFU")
            return (f"backend {self.backend}: {devices} ({self.device_kind}{chips}); the mesh spans all of them; "
                    f"compute dtype {self.dtype}{peak}")
        lines = [f"backend cpu: {devices}. NO accelerator in use: running on the CPU in float32, at the CPU times "
                 "stated beside the long cells."]
        if self.attached:
            lines.append(f"A {self.attached} is attached to this machine, but the installed jax {jax.__version__} "
                         "cannot use it (its jaxlib / libtpu / CUDA plugin do not match). Restart the runtime "
                         "(Runtime > Restart session) and keep the runtime's own jax: never `pip install -U jax`.")
        else:
            lines.append("On Colab: Runtime > Change runtime type > a TPU (v2-8, v5e-1 or v6e-1) or a GPU, "
                         "then run all cells again.")
        return "\n".join(lines)


def attached_accelerator(dev_root: str | Path = "/dev") -> str | None:
    """"TPU" or "GPU" if the machine exposes one under `dev_root`, else None (whatever JAX makes of it)."""
    root = Path(dev_root)
    for name, pattern in _ACCELERATOR_FILES:
        if any(root.glob(pattern)):
            return name
    return None


def describe_runtime(devices: list | None = None, dev_root: str | Path = "/dev") -> Runtime:
    """The runtime of `devices` (default: `jax.devices()`), all of one kind as JAX gives them."""
    devices = jax.devices() if devices is None else devices
    first = devices[0]
    backend = first.platform
    spec = None if backend == "cpu" else flops.device_spec(first.device_kind)
    attached = attached_accelerator(dev_root) if backend == "cpu" else None
    return Runtime(backend=backend, device_count=len(devices), device_kind=first.device_kind, spec=spec,
                   attached=attached)
