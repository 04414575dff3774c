"""Host memory: keep freed memory in the process instead of handing it back to the OS.

XLA:CPU allocates a step's temporaries (activations and gradients: about
285 MB for the reference CPU workload of BENCHMARKS.md) when the step starts
and frees them when it ends. By default glibc returns blocks that large to
the kernel (they are mmap'd, or trimmed off the heap, or live in per-thread
arenas), so the next step touches fresh pages again: about 80,000 page
faults per step on that workload, where the kernel maps and zeroes memory
for a fifth of the step. `tune_allocator` tells glibc to keep freed memory
and reuse it, so a steady-state step faults no pages at all.

The price: the process's resident memory stays at its peak instead of
shrinking between steps. The experiment runners call it by default
(`--tune_allocator`); library users opt in.
"""

from __future__ import annotations

import ctypes
import os
import sys

# glibc's mallopt(3) parameters.
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

_SETTINGS = (
    (_M_ARENA_MAX, 1),  # one heap for all threads: worker-thread arenas would mmap large blocks
    (_M_MMAP_MAX, 0),  # large blocks come from the heap, never from a fresh mmap
    (_M_TRIM_THRESHOLD, 2**31 - 1),  # never trim the top of the heap back to the OS
    (_M_TOP_PAD, 256 << 20),  # grow the heap in 256 MB steps
)


def tune_allocator() -> bool:
    """Make glibc's malloc keep and reuse freed memory; True where it took effect.

    Call it before the first JAX computation: threads that already allocated
    keep their own arenas. A no-op returning False off Linux/glibc.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
        gnu = ctypes.CDLL(None).gnu_get_libc_version  # glibc only (musl has no arenas to tune)
    except (OSError, AttributeError):
        return False
    del gnu
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return all(mallopt(param, value) == 1 for param, value in _SETTINGS)


# XLA:CPU flags the runners (experiments/train.py, experiments/benchmark.py) set before JAX starts its backend.
# The dots XLA:CPU does not hand to YNNPACK (the weight gradients, contracting the rows) run on Eigen, which
# splits each over its own thread pool; at these sizes the hand-offs cost more than the split gains. Off, the
# train step's CPU time fell 6-10% at nanoGPT's CPU shape and ~2% at the reference CPU shape, alternated
# (BENCHMARKS.md).
CPU_XLA_FLAGS = ("--xla_cpu_multi_thread_eigen=false",)


def add_cpu_xla_flags(env: dict | None = None) -> list[str]:
    """Append the `CPU_XLA_FLAGS` that XLA_FLAGS in `env` (default os.environ) does not set yet; returns them.

    A flag the user already set (to any value) is left alone. Only effective before the backend starts.
    """
    env = os.environ if env is None else env
    given = env.get("XLA_FLAGS", "")
    added = [f for f in CPU_XLA_FLAGS if f.split("=")[0] not in given]
    if added:
        env["XLA_FLAGS"] = " ".join([given, *added]).strip()
    return added


# YNNPACK (jaxlib >= 0.10) takes XLA:CPU's dots and also its elementwise and reduction fusions. For a narrow
# model the latter ran several times slower than XLA's own loops (the softmax gradient's sum over keys: 0.75 ms
# of a 20 ms step at nanoGPT's CPU shape, four times over), while at d_model 256 they pay. Measured in one
# process, alternated, YNNPACK for single dots only against the default: d_model 128 at nanoGPT's shape
# (12 x 64 tokens) 0.90, at lm_speedrun's (16 x 128) 0.94, at lm_tiny's (32 x 128) 0.90; d_model 256 at the
# reference CPU shape (8 x 256) 1.07 (docs/benchmarks.md). Nothing between 128 and 256 was measured.
NARROW_D_MODEL = 256
_DOTS_ONLY = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}


def cpu_compiler_options(d_model: int, backend: str | None = None) -> dict[str, str]:
    """Per-program XLA options for a CPU train step (`jax.jit`'s `compiler_options`): YNNPACK for dots only
    when d_model < `NARROW_D_MODEL`; {} otherwise, off CPU, and on a jaxlib without YNNPACK (whose XLA
    would reject the option)."""
    import jax
    from jaxlib import version

    if (backend or jax.default_backend()) != "cpu" or d_model >= NARROW_D_MODEL:
        return {}
    try:
        new_enough = tuple(int(p) for p in version.__version__.split(".")[:2]) >= (0, 10)
    except ValueError:
        new_enough = False
    return dict(_DOTS_ONLY) if new_enough else {}
