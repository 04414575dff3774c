"""Fused (flash) attention kernels, one per target platform, chosen when the program is lowered.

`attention="flash"` and `"auto"` (see `tformer.attention.resolve_impl`) pick a
kernel per platform and `tformer.attention.attend` joins the choices with
`jax.lax.platform_dependent`, so the branch taken follows the platforms the
program is lowered for (`.lower(lowering_platforms=("tpu",))` on a CPU-only
machine included), not the backend present while tracing:

  * TPU: "splash", Pallas splash attention
    (`jax.experimental.pallas.ops.tpu.splash_attention`): static causal /
    local-window / full mask, packed rows and padding as its `SegmentIds`,
    GQA by its own K/V head grouping. Self- and cross-attention, prefill.
  * GPU: "cudnn" (cuDNN's flash attention, `jax.nn.dot_product_attention`)
    for plain causal rows when a GPU is present while tracing (cuDNN refuses
    to trace without one); otherwise "triton", the Pallas GPU flash kernel
    (`jax.experimental.pallas.ops.gpu.attention.mha`) with one segment-id row
    shared by queries and keys: self-attention (causal or bidirectional,
    packed, padded, GQA by repeating K/V heads) without a local window.
  * CPU: the XLA paths of `tformer.attention` ("blocked", "banded", "xla").

The kernels use the slot order for causality and windows: exact (same maths
as the dense rule of `tformer.attention.Masking`) when positions increase by
one per slot within each segment, as in plain, packed (positions restarting
per document) and padded rows, the condition "blocked" and "banded" already
rely on. Padding queries (segment 0) may differ from the dense path, whose
fully masked rows average every key; no real token reads them.

Block sizes (`block_size`): the sequence is padded up to a multiple of 128
(a TPU lane row; padding keys get segment 0 and are never visible to real
queries) and the query / key blocks are the largest of 512, 256, 128 dividing
that length: long blocks amortise the per-block overhead, 128 is the least a
TPU lane tile and the Triton kernel's forward block take. Splash's backward is
its fused kernel (dq, dk, dv in one pass) while the keys span at most
`MAX_FUSED_KV_BLOCKS` blocks: it keeps one fp32 dq partial per key block, so
beyond that (e.g. 16 blocks, 6 GiB for GPT-2 small at 16 x 8,192) the separate
dq and dk/dv kernels run instead, whose memory stays linear in the length.
The Triton backward uses its own default 32 x 32 blocks (they fit a GPU's
shared memory for head_dim <= 128).

A prefill over a KV cache (new tokens at slots [i, i + T) of S, `i` traced)
runs the kernel as causal self-attention over all S slots with the new
queries placed at their slots and the other rows dropped: S / T times the
prefill's own work, memory still linear in S.

Shapes a kernel cannot take use the platform's dense path, and the reason is
logged once: fewer than `MIN_KERNEL_LEN` queries under "auto" (one block of
scores is no bigger than the kernel's own tiles; the cached decode step is one
query) or fewer than 8 under "flash", head_dim not a multiple of 8, and on GPU
cross-attention and local windows.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import logging
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from tformer import sharding

if TYPE_CHECKING:  # attention imports this module
    from tformer.attention import Masking

log = logging.getLogger(__name__)

LANES = 128  # TPU lane width: kernel lengths are padded to a multiple of it
BLOCKS = (512, 256, 128)  # preferred query / key block sizes, largest first
MIN_KERNEL_LEN = 128  # "auto": queries below this stay dense
MAX_FUSED_KV_BLOCKS = 4  # splash: one fused backward kernel up to this many key blocks (see the module docstring)
PLATFORMS = ("tpu", "cuda", "cpu")  # lowering platforms attend chooses between ("cpu": every other one)
KERNEL_NAMES = {
    "splash": "Pallas TPU splash attention (tpu_custom_call)",
    "triton": "Pallas GPU flash attention (Triton custom call)",
    "cudnn": "cuDNN flash attention (custom call)",
}


def block_size(length: int) -> int:
    """Query / key block for a kernel over `length` slots (already a multiple of LANES)."""
    return next(b for b in BLOCKS if length % b == 0)


def padded(length: int) -> int:
    return -(-length // LANES) * LANES


_LOGGED: set[str] = set()


def note_fallback(platform: str, reason: str, level: int = logging.INFO) -> None:
    """Log, once per distinct message, why a platform's kernel was not used."""
    msg = f"attention on {platform}: {reason}; using the dense path"
    if msg not in _LOGGED:
        _LOGGED.add(msg)
        log.log(level, msg)


@functools.cache
def gpu_present() -> bool:
    """Whether a CUDA GPU is visible (cuDNN can only be traced then)."""
    try:
        return bool(jax.devices("cuda"))
    except RuntimeError:
        return False


def kernel_for(platform: str, masking: Masking, seq_lens: tuple[int, int] | None, dtype: jnp.dtype, head_dim: int,
               auto: bool, cache: bool = False) -> tuple[str | None, str]:
    """(kernel, why not): the kernel `platform` runs for this attention call, or None and the reason.

    `cache`: causal self-attention of new tokens over KV-cache slots (a prefill; `attend`'s `q_offset` says
    where the new tokens start).
    """
    if seq_lens is None:
        return None, "no static lengths"
    tq, tk = seq_lens
    least = MIN_KERNEL_LEN if auto else 8
    if tq < least:
        return None, f"{tq} queries (< {least}: a decode step or a short sequence)"
    if head_dim % 8:
        return None, f"head_dim {head_dim} is not a multiple of 8"
    if platform == "tpu":
        return "splash", ""
    if platform != "cuda":
        return None, "no kernel on this platform"
    if (gpu_present() and masking.plain_causal and not cache and tq == tk and head_dim <= 128
            and dtype in (jnp.bfloat16, jnp.float16)):
        return "cudnn", ""
    if masking.window is not None:
        return None, "the Triton kernel has no local window (banded path)"
    if not cache and (tq != tk or masking.q_seg is not masking.k_seg):
        return None, "the Triton kernel has one segment row for queries and keys: no cross-attention"
    return "triton", ""


# ---------------------------------------------------------------------------
# Segment ids and padding shared by the kernels.


def _segments(masking, b: int, tq: int, tk: int) -> tuple[jax.Array, jax.Array] | None:
    """(q [B, Tq], kv [B, Tk]) ids whose equality is the masking's segment rule, or None (no segments)."""
    if masking.k_seg is None:
        return None
    if masking.q_seg is None:  # keys with segment 0 are padding; every other key is visible
        return jnp.ones((b, tq), jnp.int32), (masking.k_seg != 0).astype(jnp.int32)
    return masking.q_seg.astype(jnp.int32), masking.k_seg.astype(jnp.int32)


def _pad_len(x: jax.Array, to: int, axis: int = 1) -> jax.Array:
    if x.shape[axis] == to:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, to - x.shape[axis])
    return jnp.pad(x, widths)


def _kernel_inputs(q, k, v, masking, causal_self: bool):
    """Pad lengths to multiples of LANES; the added keys get segment 0 (invisible to real queries).

    Causal self-attention needs no segments for that: real queries never see later slots.
    """
    b, tq = q.shape[:2]
    tk = k.shape[1]
    pq, pk = padded(tq), padded(tk)
    segs = _segments(masking, b, tq, tk)
    if segs is None and (pq, pk) != (tq, tk) and not causal_self:
        segs = (jnp.ones((b, tq), jnp.int32), jnp.ones((b, tk), jnp.int32))
    if segs is not None:
        segs = (_pad_len(segs[0], pq), _pad_len(segs[1], pk))
    return _pad_len(q, pq), _pad_len(k, pk), _pad_len(v, pk), segs


# ---------------------------------------------------------------------------
# TPU: splash attention.


@functools.lru_cache(maxsize=64)
def _splash_kernel(heads: int, tq: int, tk: int, causal: bool, window: int | None, interpret: bool):
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    if window is not None:
        mask = sa.LocalMask((tq, tk), window_size=(window - 1, 0), offset=0)
    elif causal:
        mask = sa.CausalMask((tq, tk))
    else:
        mask = sa.FullMask((tq, tk))
    bq, bk = block_size(tq), block_size(tk)
    fused = tk // bk <= MAX_FUSED_KV_BLOCKS
    dq_blocks = {} if fused else dict(block_q_dq=bq, block_kv_dq=bk)
    sizes = sa.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq, block_kv_dkv=bk,
                          block_kv_dkv_compute=bk, use_fused_bwd_kernel=fused, **dq_blocks)
    with jax.ensure_compile_time_eval():  # concrete mask tables, so the cached kernel holds no tracer
        return sa.make_splash_mha(sa.MultiHeadMask([mask] * heads), head_shards=1, q_seq_shards=1,
                                  block_sizes=sizes, interpret=interpret)


def _at_cache_slots(q_bthd, masking, q_offset, cache_len: int, seg_q_bt):
    """A prefill over a KV cache as causal self-attention over the cache: the T new queries sit at slots
    [q_offset, q_offset + T) of a [B, S, H, D] query array (`q_offset` may be traced), the other rows are
    computed and dropped; `seg_q_bt` becomes their segment row. Returns (queries, masking, take_rows)."""
    b, t, h, d = q_bthd.shape
    q = jax.lax.dynamic_update_slice(jnp.zeros((b, cache_len, h, d), q_bthd.dtype), q_bthd, (0, q_offset, 0, 0))
    full = dataclasses.replace(masking, q_seg=seg_q_bt(q_offset, t))

    def take_rows(o_bshd: jax.Array) -> jax.Array:
        return jax.lax.dynamic_slice_in_dim(o_bshd, q_offset, t, axis=1)

    return q, full, take_rows


def splash_attention(q_bthd: jax.Array, k_bskd: jax.Array, v_bskd: jax.Array, masking: Masking, *,
                     q_offset: jax.Array | None = None, interpret: bool = False) -> jax.Array:
    """Splash attention of [B, T, H, D] queries over [B, S, K, D] keys/values (K divides H); output [B, T, H, D].

    `q_offset`: the queries are new tokens at cache slots [q_offset, q_offset + T) of the keys (a prefill).
    """
    take_rows = None
    if q_offset is not None:
        def seg_rows(offset: jax.Array, t: int) -> jax.Array:
            q_seg = jnp.ones(q_bthd.shape[:2], jnp.int32) if masking.q_seg is None else masking.q_seg
            return jax.lax.dynamic_update_slice(jnp.zeros_like(masking.k_seg, jnp.int32), q_seg, (0, offset))

        q_bthd, masking, take_rows = _at_cache_slots(q_bthd, masking, q_offset, k_bskd.shape[1], seg_rows)
    b, tq, h, d = q_bthd.shape
    tk = k_bskd.shape[1]
    q, k, v, segs = _kernel_inputs(q_bthd / math.sqrt(d), k_bskd, v_bskd, masking, masking.causal and tq == tk)
    window = masking.window if masking.causal else None
    kernel = _splash_kernel(h, q.shape[1], k.shape[1], masking.causal, window, interpret)

    def one_row(q_htd: jax.Array, k_hsd: jax.Array, v_hsd: jax.Array, seg_q: jax.Array | None,
                seg_kv: jax.Array | None) -> jax.Array:
        from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds

        ids = None if seg_q is None else SegmentIds(seg_q, seg_kv)
        return kernel(q_htd, k_hsd, v_hsd, segment_ids=ids)

    def run(q: jax.Array, k: jax.Array, v: jax.Array, segs: tuple[jax.Array, jax.Array] | None) -> jax.Array:
        heads_first = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))
        seg_q, seg_kv = (None, None) if segs is None else segs
        return jnp.swapaxes(jax.vmap(one_row)(*heads_first, seg_q, seg_kv), 1, 2)

    out = _per_shard(run, q, k, v, segs)[:, :tq].astype(q_bthd.dtype)
    return out if take_rows is None else take_rows(out)


# ---------------------------------------------------------------------------
# GPU: the Pallas (Triton) flash kernel, and cuDNN where a GPU is present.


def triton_attention(q_bthd: jax.Array, k_bskd: jax.Array, v_bskd: jax.Array, masking: Masking, *,
                     q_offset: jax.Array | None = None, interpret: bool = False) -> jax.Array:
    """The Pallas GPU flash kernel over self-attention (one segment row for queries and keys); [B, T, H, D].

    `q_offset`: as `splash_attention`; the cache's validity row is then the segment row of both sides
    (the new tokens' own validity was written into it at their slots).
    """
    from jax.experimental.pallas.ops.gpu import attention as gpu_attention

    take_rows = None
    if q_offset is not None:
        q_bthd, masking, take_rows = _at_cache_slots(q_bthd, masking, q_offset, k_bskd.shape[1],
                                                     lambda *_: masking.k_seg)
    b, t, h, d = q_bthd.shape
    g = h // k_bskd.shape[2]
    k, v = (jnp.repeat(x, g, axis=2) if g > 1 else x for x in (k_bskd, v_bskd))  # GQA: one K/V head per query head
    q, k, v, segs = _kernel_inputs(q_bthd, k, v, masking, masking.causal)

    def run(q: jax.Array, k: jax.Array, v: jax.Array, segs: tuple[jax.Array, jax.Array] | None) -> jax.Array:
        seg = None if segs is None else segs[0]
        return gpu_attention.mha(q, k, v, seg, sm_scale=1.0 / math.sqrt(d), causal=masking.causal,
                                 interpret=interpret)

    out = _per_shard(run, q, k, v, segs)[:, :t]
    return out if take_rows is None else take_rows(out)


def cudnn_attention(q_bthd: jax.Array, k_bskd: jax.Array, v_bskd: jax.Array, masking: Masking) -> jax.Array:
    window = None if masking.window is None else (masking.window - 1, 0)
    return jax.nn.dot_product_attention(q_bthd, k_bskd, v_bskd, is_causal=masking.causal, local_window_size=window,
                                        implementation="cudnn")


# ---------------------------------------------------------------------------
# Sharding: a kernel is one custom call XLA cannot split, so under a mesh it runs per shard.


def _per_shard(run, q, k, v, segs):
    """`run(q, k, v, segs)` per device over the active mesh: batch split as the rules say, heads too when query
    and K/V heads split alike (GQA groups stay whole); the automatic partitioner cannot split a custom call."""
    mesh, rules = sharding.active()
    if mesh is None or mesh.size == 1:
        return run(q, k, v, segs)
    inner = jax.sharding.get_abstract_mesh()
    manual = set() if inner.empty else set(inner.manual_axes)
    free = frozenset(a for a in mesh.axis_names if a not in manual)  # all of them: a Mosaic call must be fully manual
    if not free:
        return run(q, k, v, segs)

    def spec(axes: tuple[str | None, ...]) -> P:
        s = sharding.logical_to_spec(axes, rules, mesh)
        return P(*(sharding._without(t, manual) if t is not None else None for t in s))

    q_spec = spec(("batch", None, "act_heads", None))
    kv_spec = spec(("batch", None, "act_kv_heads", None))
    if q_spec[2] != kv_spec[2]:
        q_spec, kv_spec = P(q_spec[0], None, None, None), P(kv_spec[0], None, None, None)
    seg_spec = P(q_spec[0], None)
    seg_specs = None if segs is None else (seg_spec, seg_spec)
    return jax.shard_map(run, mesh=mesh if inner.empty else inner, in_specs=(q_spec, kv_spec, kv_spec, seg_specs),
                         out_specs=q_spec, axis_names=free, check_vma=False)(q, k, v, segs)


@dataclasses.dataclass(frozen=True)
class _KernelMask:
    """The part of `tformer.attention.Masking` the kernels read (slot order stands for the positions)."""

    q_seg: jax.Array | None
    k_seg: jax.Array | None
    causal: bool
    window: int | None
    plain_causal: bool


@functools.partial(jax.jit, static_argnames=("kernel", "causal", "window", "plain_causal", "same", "layout",
                                              "context"))
def _kernel_call(q, k, v, q_seg, k_seg, q_offset, *, kernel, causal, window, plain_causal, same, layout, context):
    """One kernel call as its own jitted function: identical calls (every layer of an unrolled stack, every
    forward retrace) reuse one trace. `layout` and `context` (the abstract mesh) only key that cache."""
    del context
    masking = _KernelMask(k_seg if same else q_seg, k_seg, causal, window, plain_causal)
    with sharding.use_layout(layout):
        if kernel == "splash":
            return splash_attention(q, k, v, masking, q_offset=q_offset)
        if kernel == "triton":
            return triton_attention(q, k, v, masking, q_offset=q_offset)
    raise ValueError(f"unknown attention kernel {kernel!r}; choose one of {sorted(KERNEL_NAMES)}")


def kernel_attention(kernel: str, q_bthd: jax.Array, k_bskd: jax.Array, v_bskd: jax.Array, masking: Masking,
                     q_offset: jax.Array | None = None) -> jax.Array:
    """Run `kernel` ("splash", "triton", "cudnn") on one attention call (`q_offset`: a prefill's first slot)."""
    if kernel == "cudnn":
        return cudnn_attention(q_bthd, k_bskd, v_bskd, masking)
    mesh, rules = sharding.active()
    same = masking.q_seg is masking.k_seg
    return _kernel_call(q_bthd, k_bskd, v_bskd, None if same else masking.q_seg, masking.k_seg, q_offset,
                        kernel=kernel, causal=masking.causal, window=masking.window,
                        plain_causal=masking.plain_causal, same=same,
                        layout=None if mesh is None else sharding.layout(mesh, rules),
                        context=jax.sharding.get_abstract_mesh())


def describe(platform: str, impl: str) -> str:
    """A readable name for what `platform` runs (a kernel, or one of tformer.attention's dense paths)."""
    return KERNEL_NAMES.get(impl, f"dense XLA path {impl!r}")


# ---------------------------------------------------------------------------
# What each attention call chose: recorded while tracing, for `tformer.plan.plan_platform`.


@dataclasses.dataclass(frozen=True)
class AttentionCall:
    """One traced attention call: shapes, the masking's form, and the implementation per platform."""

    q_shape: tuple[int, ...]
    k_shape: tuple[int, ...]
    dtype: str
    causal: bool
    window: int | None
    plain_causal: bool
    seg_shapes: tuple  # (q_seg shape or None, k_seg shape or None, q_seg is k_seg)
    cache: bool  # causal attention over KV-cache slots
    impls: tuple[tuple[str, str], ...]  # (platform, implementation) for PLATFORMS
    rate: float = 0.0
    topk: int | None = None
    threshold: float | None = None

    @property
    def kind(self) -> str:
        if self.cache:
            return "self, cached" if self.q_shape[1] > 1 else "self, decode step"
        q_seg, k_seg, same = self.seg_shapes
        if self.q_shape[1] != self.k_shape[1] or (k_seg is not None and not same):
            return "cross"
        return "self, causal" if self.causal else "self, bidirectional"

    def impl(self, platform: str) -> str:
        return dict(self.impls)[platform]


_CALLS: contextvars.ContextVar[list | None] = contextvars.ContextVar("tformer_attention_calls", default=None)


@contextlib.contextmanager
def record_calls():
    """Collect an `AttentionCall` for every attention call traced inside (duplicates included)."""
    calls: list[AttentionCall] = []
    token = _CALLS.set(calls)
    try:
        yield calls
    finally:
        _CALLS.reset(token)


def record(call_fn: Callable[[], Any]) -> None:
    """Append `call_fn()` to the active recording, if any (built lazily: recording is rare)."""
    calls = _CALLS.get()
    if calls is not None:
        calls.append(call_fn())
