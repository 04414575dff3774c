"""Multi-head attention: masks, implementations, and the projection module.

Masks are built from per-token positions and segment ids rather than passed
around as dense matrices, so one description covers causal, padding, packed
documents, local windows and cached decoding:

  key j is visible to query i  iff  seg[j] != 0 and seg[i] == seg[j]
                                    and (not causal or pos[j] <= pos[i])
                                    and (window is None or pos[i] - pos[j] < window)

Segment 0 marks padding. Implementations: "einsum" (the reference, and the
only one with attention dropout), "xla" (`jax.nn.dot_product_attention`),
"cudnn" (flash attention on GPU, bf16/fp16) and "blocked" (block-causal:
query block i of n attends only to keys [0, (i+1) T/n), skipping the masked
upper triangle; same maths as the dense path when positions increase along
the slots within each segment). "flash" and "auto" choose per platform when
the program is lowered (`jax.lax.platform_dependent`, see `tformer.flash`):
the Pallas splash kernel on TPU, cuDNN or the Pallas Triton kernel on GPU,
and on CPU "blocked" for long causal self-attention (packed rows included),
else XLA; "auto" keeps short sequences and the cached decode step dense.

Cheaper variants (ModelConfig fields, see README "What each cheaper variant
costs and buys"):
  * `local_window`: self-attention is computed banded, in blocks of `window`
    queries that each read their own and the previous key block, so time and
    memory are O(T x window); exact when positions increase along the slots
    within each segment (plain, packed and left-padded rows all do).
  * `attention_topk` / `attention_threshold`: the scores are sparsified per
    query after masking (einsum or banded path; in cached decode too).
  * `attention_lowrank`: Linformer / Nystrom encoder self-attention (below).
  * int8 KV cache (`tformer.quant.Int8KV` keys/values): scores are computed
    from the int8 values and scaled per key afterwards, the value scales are
    folded into the probabilities, so no dequantized cache is built.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tformer import flash, reductions, ring_attention
from tformer.config import ModelConfig
from tformer.layers import apply_rope, cast, dense, dropout, param, project, rms_normalize
from tformer.quant import Int8KV
from tformer.sharding import active as active_rules
from tformer.sharding import constrain

_NEG = -1e30  # finite, so fully masked rows (padding queries) stay NaN-free


@dataclasses.dataclass(frozen=True)
class Masking:
    """Who may attend to whom, described per token (see module docstring)."""

    q_pos: jax.Array  # [B, Tq] int32
    k_pos: jax.Array  # [B, Tk] int32
    q_seg: jax.Array | None = None  # [B, Tq] int32, 0 = padding
    k_seg: jax.Array | None = None  # [B, Tk]
    causal: bool = True
    window: int | None = None
    # Plain causal self-attention: positions 0..T-1 in every row, no segments,
    # so `causal` (and `window`) alone describe the mask and flash kernels apply.
    plain_causal: bool = False

    def first_keys(self, n: int) -> Masking:
        """The same rule over keys [0, n) only: a cached decode step whose later slots are still empty."""
        return dataclasses.replace(
            self, k_pos=self.k_pos[:, :n], k_seg=None if self.k_seg is None else self.k_seg[:, :n])

    def dense(self) -> jax.Array:
        """Boolean mask [B, Tq, Tk]; True = may attend."""
        q, k = self.q_pos[:, :, None], self.k_pos[:, None, :]
        m = jnp.ones(q.shape[:1] + (q.shape[1], k.shape[2]), bool)
        if self.causal:
            m &= k <= q
        if self.window is not None:
            m &= (q - k) < self.window
        if self.k_seg is not None:
            ks = self.k_seg[:, None, :]
            m &= ks != 0
            if self.q_seg is not None:
                m &= self.q_seg[:, :, None] == ks
        return m


def self_masking(positions_bt: jax.Array, segment_ids_bt: jax.Array | None, cfg: ModelConfig, causal: bool,
                 default_positions: bool = True) -> Masking:
    """Self-attention masking; `default_positions`: positions are the default 0..T-1 (not given by the caller)."""
    return Masking(
        q_pos=positions_bt,
        k_pos=positions_bt,
        q_seg=segment_ids_bt,
        k_seg=segment_ids_bt,
        causal=causal,
        window=cfg.local_window if causal else None,
        plain_causal=causal and default_positions and segment_ids_bt is None,
    )


def _masked_probs(logits, mask, topk: int | None = None, threshold: float | None = None):
    """softmax over the allowed keys, optionally keeping only the top-k scores or the weights >= threshold.

    Top-k keeps every score tied with the k-th largest. The threshold never
    drops a row's largest weight (so a row is never empty) and renormalises.
    """
    logits = jnp.where(mask, logits, _NEG)
    if topk is not None:
        kth = jax.lax.top_k(logits, min(topk, logits.shape[-1]))[0][..., -1:]
        logits = jnp.where(logits >= jax.lax.stop_gradient(kth), logits, _NEG)
    probs = reductions.softmax(logits)  # on CPU its max and sum stay fused kernels
    if threshold is not None:
        cut = jnp.minimum(threshold, jnp.max(probs, axis=-1, keepdims=True))
        probs = jnp.where(probs >= jax.lax.stop_gradient(cut), probs, 0.0)
        probs = probs / jnp.sum(probs, axis=-1, keepdims=True)
    return probs


def _einsum_attention(q, k, v, mask_bqk, rate, rng, topk=None, threshold=None):
    b, tq, h, d = q.shape
    kh = k.shape[2]
    q = q.reshape(b, tq, kh, h // kh, d)  # GQA: query heads grouped per kv head
    logits = jnp.einsum("bqkgd,bskd->bkgqs", q, k, preferred_element_type=jnp.float32)
    logits = logits / math.sqrt(d)
    probs = _masked_probs(logits, mask_bqk[:, None, None], topk, threshold)
    probs = dropout(probs, rate, rng).astype(v.dtype)
    out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v)
    return out.reshape(b, tq, h, d)


def _int8_attention(q, k: Int8KV, v: Int8KV, mask_bqk, topk=None, threshold=None):
    """Attention over an int8 cache: q.(s_j k_j) = s_j (q.k_j) and sum_j p_j s_j v_j = sum_j (p_j s_j) v_j.

    The int8 values feed the two contractions directly (cast to the compute
    dtype as operands); the per-token-and-head scales multiply the [.., Tq, S]
    scores and probabilities, never a [B, S, K, D] tensor.
    """
    b, tq, h, d = q.shape
    kh = k.shape[2]
    q = q.reshape(b, tq, kh, h // kh, d)
    logits = jnp.einsum("bqkgd,bskd->bkgqs", q, k.values.astype(q.dtype), preferred_element_type=jnp.float32)
    logits = logits * (k.scale.astype(jnp.float32).transpose(0, 2, 1)[:, :, None, None, :] / math.sqrt(d))
    probs = _masked_probs(logits, mask_bqk[:, None, None], topk, threshold)
    probs = probs * v.scale.astype(jnp.float32).transpose(0, 2, 1)[:, :, None, None, :]
    out = jnp.einsum("bkgqs,bskd->bqkgd", probs.astype(q.dtype), v.values.astype(q.dtype),
                     preferred_element_type=jnp.float32)
    return out.reshape(b, tq, h, d).astype(q.dtype)


def _banded_attention(q, k, v, masking: Masking, rate, rng, topk=None, threshold=None):
    """Local-window self-attention in O(T x window): query block i reads key blocks i-1 and i only.

    Blocks hold c = min(window, T) slots, so every key a query may see (at
    most window - 1 slots back, when positions increase along the slots within
    a segment) lies in its own or the previous block. The full masking rule is
    applied inside the band, so causality, padding and segments hold exactly.
    """
    b, t, h, d = q.shape
    c = min(masking.window, t)
    n = -(-t // c)
    pad = n * c - t

    def blocks(x: jax.Array) -> jax.Array:  # [B, T, ...] -> [B * n, c, ...], zero-padded at the end
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return x.reshape((b * n, c) + x.shape[2:])

    # [B * n, c, ...] -> [B * n, 2c, ...]: previous block (zeros before the first), then own
    def with_prev(x: jax.Array) -> jax.Array:
        if n == 1:  # window >= T: one block holds every key
            return x
        x = x.reshape((b, n) + x.shape[1:])
        prev = jnp.pad(x, [(0, 0), (1, 0)] + [(0, 0)] * (x.ndim - 2))[:, :-1]
        return jnp.concatenate([prev, x], axis=2).reshape((b * n, 2 * c) + x.shape[3:])

    real = jnp.ones((b, t), jnp.int32)  # segment 0 marks the zero padding added here
    k_seg = real if masking.k_seg is None else masking.k_seg
    q_seg = k_seg if masking.q_seg is None and masking.k_seg is None else masking.q_seg
    band = Masking(
        q_pos=blocks(masking.q_pos), k_pos=with_prev(blocks(masking.k_pos)),
        q_seg=None if q_seg is None else blocks(q_seg), k_seg=with_prev(blocks(k_seg)),
        causal=masking.causal, window=masking.window,
    )
    out = _einsum_attention(blocks(q), with_prev(blocks(k)), with_prev(blocks(v)), band.dense(), rate, rng,
                            topk, threshold)
    return out.reshape(b, n * c, h, d)[:, :t]


# Block-causal attention: query block i of `BLOCKS` attends to keys
# [0, (i+1) T/BLOCKS) only, so (BLOCKS+1)/(2 BLOCKS) of the T x T work is done
# (5/8 for 4 blocks). Chosen by "auto" on CPU from BLOCKED_MIN_LEN tokens up
# (both measured on XLA:CPU, see BENCHMARKS.md); GPUs use flash kernels.
BLOCKS = 4
BLOCKED_MIN_LEN = 128


def _blocked_applies(masking: Masking, seq_lens: tuple[int, int] | None) -> bool:
    """Causal self-attention (no window) over T divisible by BLOCKS: plain, or packed / padded rows."""
    if seq_lens is None or not masking.causal or masking.window is not None:
        return False
    tq, tk = seq_lens
    return tq == tk and tq % BLOCKS == 0


def _blocked_causal_attention(q, k, v, masking: Masking, blocks: int = BLOCKS):
    """Causal attention skipping the blocks above the diagonal.

    Exact when no key above the diagonal is visible, i.e. when positions
    increase along the slots within each segment (plain, packed and
    left-padded rows all do; the same condition as "banded").
    """
    t = q.shape[1]
    n = t // blocks
    dense_bqk = None if masking.plain_causal else masking.dense()
    outs = []
    for i in range(blocks):
        end = (i + 1) * n
        if dense_bqk is None:  # query i * n + a sees key j iff j <= i * n + a: a trace-time constant
            mask = (np.arange(end)[None, :] <= np.arange(i * n, end)[:, None])[None]
        else:
            mask = dense_bqk[:, i * n : end, :end]
        outs.append(_einsum_attention(q[:, i * n : end], k[:, :end], v[:, :end], mask, 0.0, None))
    return jnp.concatenate(outs, axis=1)


def lowering_platform(platform: str | None = None) -> str:
    """The `jax.lax.platform_dependent` branch a platform takes: "tpu", "cuda" or "cpu" (every other one)."""
    p = platform or jax.default_backend()
    return {"tpu": "tpu", "gpu": "cuda", "cuda": "cuda"}.get(p, "cpu")


def resolve_impl(cfg: ModelConfig, dtype: jnp.dtype, masking: Masking, training_dropout: bool,
                 seq_lens: tuple[int, int] | None = None, platform: str | None = None, cache: bool = False) -> str:
    """The implementation `attend` uses for this call when lowered for `platform` (default: the backend here).

    `seq_lens`: query and key lengths; `cache`: causal attention of new tokens over KV-cache slots.
    "auto" and "flash" take the platform's kernel (`tformer.flash`) where it applies, else the dense path
    ("auto" keeps fewer than `flash.MIN_KERNEL_LEN` queries dense). On CPU "auto" is "blocked" from
    `BLOCKED_MIN_LEN` causal tokens, else "einsum" (whose softmax keeps XLA:CPU's reductions fused). A
    local window over equal query and key lengths (self-attention, or a prefill into an empty cache: slots
    align) goes "banded" unless a kernel or cuDNN's own windowed flash kernel runs; top-k / threshold need
    the explicit scores.
    """
    platform = lowering_platform(platform)
    banded = masking.window is not None and seq_lens is not None and seq_lens[0] == seq_lens[1]
    if training_dropout or cfg.attention_topk is not None or cfg.attention_threshold is not None:
        return "banded" if banded else "einsum"  # the paths with dropout and explicit scores
    impl = cfg.attention
    if impl in ("auto", "flash"):
        if platform != "cpu":
            kernel, why = flash.kernel_for(platform, masking, seq_lens, dtype, cfg.resolved_head_dim,
                                           auto=impl == "auto", cache=cache)
            if kernel is not None:
                return kernel
            flash.note_fallback(platform, why, logging.WARNING if impl == "flash" else logging.INFO)
            impl = "xla"
        else:
            ok = _blocked_applies(masking, seq_lens) and seq_lens[0] >= BLOCKED_MIN_LEN
            impl = "blocked" if ok else "einsum"  # dense, with tformer.reductions' softmax
    if impl == "cudnn" and not masking.plain_causal:
        impl = "xla"  # segments/padding/cache need a dense mask
    if impl == "blocked" and not _blocked_applies(masking, seq_lens):
        impl = "xla"  # windows, segments, caches, cross-attention: dense mask
    return "banded" if banded and impl != "cudnn" else impl


def attend(q_bthd: jax.Array, k_bskd: jax.Array, v_bskd: jax.Array, masking: Masking, cfg: ModelConfig,
           rng: jax.Array | None = None, q_offset: jax.Array | None = None) -> jax.Array:
    """Scaled dot-product attention with GQA; output [B, T, H, D].

    `k_bskd` / `v_bskd` may be `Int8KV` (an int8 cache), read without dequantizing. `q_offset`: the
    queries are new tokens at KV-cache slots [q_offset, q_offset + T) (self-attention over a cache).
    Where the implementation differs by platform ("auto", "flash"), each platform's choice is a
    `jax.lax.platform_dependent` branch: the platforms the program is lowered for pick.
    """
    topk, threshold = cfg.attention_topk, cfg.attention_threshold
    if isinstance(k_bskd, Int8KV):
        return _int8_attention(q_bthd, k_bskd, v_bskd, masking.dense(), topk, threshold)
    training_dropout = rng is not None and cfg.attention_dropout > 0
    rate = cfg.attention_dropout if training_dropout else 0.0
    seq_lens, cache = (q_bthd.shape[1], k_bskd.shape[1]), q_offset is not None and masking.causal
    impls = {p: resolve_impl(cfg, q_bthd.dtype, masking, training_dropout, seq_lens, platform=p, cache=cache)
             for p in flash.PLATFORMS}

    flash.record(lambda: flash.AttentionCall(
        tuple(q_bthd.shape), tuple(k_bskd.shape), str(q_bthd.dtype), masking.causal, masking.window,
        masking.plain_causal, (None if masking.q_seg is None else tuple(masking.q_seg.shape),
                               None if masking.k_seg is None else tuple(masking.k_seg.shape),
                               masking.q_seg is masking.k_seg), cache, tuple(impls.items()), rate, topk, threshold))

    def branch(impl: str) -> Callable[[jax.Array, jax.Array, jax.Array], jax.Array]:
        return lambda q, k, v: _attend_with(impl, q, k, v, masking, rate, rng, topk, threshold,
                                            q_offset if cache else None)

    if len(set(impls.values())) == 1:
        return branch(impls["cpu"])(q_bthd, k_bskd, v_bskd)
    return jax.lax.platform_dependent(q_bthd, k_bskd, v_bskd, tpu=branch(impls["tpu"]), cuda=branch(impls["cuda"]),
                                      default=branch(impls["cpu"]))


def _attend_with(impl: str, q_bthd, k_bskd, v_bskd, masking: Masking, rate, rng, topk, threshold, q_offset):
    """One implementation of `attend` (see `resolve_impl`)."""
    if impl in ("splash", "triton") or (impl == "cudnn" and flash.gpu_present()):
        return flash.kernel_attention(impl, q_bthd, k_bskd, v_bskd, masking, q_offset)
    if impl == "cudnn":
        window = None if masking.window is None else (masking.window - 1, 0)
        try:
            return jax.nn.dot_product_attention(
                q_bthd, k_bskd, v_bskd, is_causal=masking.causal, local_window_size=window,
                implementation="cudnn",
            )
        except Exception:  # unsupported shape/dtype/version: fall back, same maths
            impl = "banded" if window is not None and q_bthd.shape[1] == k_bskd.shape[1] else "xla"
    if impl == "banded":
        return _banded_attention(q_bthd, k_bskd, v_bskd, masking, rate, rng, topk, threshold)
    if impl == "blocked":
        return _blocked_causal_attention(q_bthd, k_bskd, v_bskd, masking)
    mask = masking.dense()
    if impl == "xla":
        return jax.nn.dot_product_attention(q_bthd, k_bskd, v_bskd, mask=mask[:, None], implementation="xla")
    return _einsum_attention(q_bthd, k_bskd, v_bskd, mask, rate, rng, topk, threshold)


# ---------------------------------------------------------------------------
# Low-rank bidirectional self-attention (the encoder).


def _key_valid(masking: Masking, b: int, s: int) -> jax.Array:
    return jnp.ones((b, s), bool) if masking.k_seg is None else masking.k_seg != 0


def linformer_attention(q_bthd: jax.Array, k_bskd: jax.Array, v_bskd: jax.Array, masking: Masking, proj_k_sr: jax.Array,
                        proj_v_sr: jax.Array) -> jax.Array:
    """Linformer (Wang et al. 2020): keys and values projected along the length, S -> r rows.

    `proj_*` are [max_len, r]; rows [0, S) are used. Padding keys are zeroed
    before the projection. The projected rows mix the whole source, so packed
    segments are not kept apart (bidirectional, unpacked sources only).
    O(S r) time and memory instead of O(S^2).
    """
    b, s = k_bskd.shape[:2]
    keep = _key_valid(masking, b, s)[:, :, None, None].astype(k_bskd.dtype)
    k_r = jnp.einsum("bskd,sr->brkd", k_bskd * keep, proj_k_sr[:s].astype(k_bskd.dtype))
    v_r = jnp.einsum("bskd,sr->brkd", v_bskd * keep, proj_v_sr[:s].astype(v_bskd.dtype))
    all_visible = jnp.ones((1, 1, k_r.shape[1]), bool)
    return _einsum_attention(q_bthd, k_r, v_r, all_visible, 0.0, None)


def _iterative_pinv(a_bhmn: jax.Array, iters: int = 6) -> jax.Array:
    """Nystromformer's Moore-Penrose iteration: Z <- Z (13 I - A Z (15 I - A Z (7 I - A Z))) / 4.

    Z0 = A^T / (max column sum * max row sum) keeps ||I - A Z0|| < 1 for the
    non-negative, row-stochastic A; all-zero rows/columns (dropped landmarks)
    stay zero in Z.
    """
    eye = jnp.eye(a_bhmn.shape[-1], dtype=a_bhmn.dtype)
    col = jnp.max(jnp.sum(jnp.abs(a_bhmn), axis=-2), axis=-1)
    row = jnp.max(jnp.sum(jnp.abs(a_bhmn), axis=-1), axis=-1)
    z = jnp.swapaxes(a_bhmn, -1, -2) / (col * row)[..., None, None]
    for _ in range(iters):
        az = a_bhmn @ z
        z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
    return z


def nystrom_attention(q_bthd: jax.Array, k_bskd: jax.Array, v_bskd: jax.Array, masking: Masking,
                      landmarks: int) -> jax.Array:
    """Nystromformer (Xiong et al. 2021): softmax(QK^T) ~= F A^+ B with m landmarks (segment means).

    F = softmax(Q Kl^T), A = softmax(Ql Kl^T), B = softmax(Ql K^T), where Ql, Kl
    average contiguous groups of the valid tokens; A^+ is the paper's iterative
    Moore-Penrose pseudo-inverse, smooth and so differentiable (an SVD pinv's
    singular-value cutoff is not, and trained badly). m = min(landmarks, S);
    at m = S (one landmark per token F A^+ B is softmax(QK^T)) the exact dense
    attention is computed instead, values and gradients. O(S m + m^3) per head.
    Empty groups (all padding) are dropped.
    """
    b, _, h, d = q_bthd.shape
    s, kh = k_bskd.shape[1], k_bskd.shape[2]
    if landmarks >= s:  # exact: one landmark per token
        return _einsum_attention(q_bthd, k_bskd, v_bskd, masking.dense(), 0.0, None)
    f32 = jnp.float32
    q = q_bthd.astype(f32) / math.sqrt(d)
    k = jnp.repeat(k_bskd.astype(f32), h // kh, axis=2)  # GQA: one key head per query head
    v = jnp.repeat(v_bskd.astype(f32), h // kh, axis=2)
    valid_bs = _key_valid(masking, b, s)
    group = np.arange(s) * landmarks // s  # contiguous, near-equal groups (trace-time constant)
    member_bsm = jnp.asarray(group[:, None] == np.arange(landmarks)[None, :])[None] & valid_bs[:, :, None]
    count_bm = jnp.sum(member_bsm, axis=1)
    mean = member_bsm.astype(f32) / jnp.maximum(count_bm, 1)[:, None, :]
    ql = jnp.einsum("bsm,bshd->bhmd", mean, q)  # queries' landmarks (positions 0..S-1 are the keys')
    kl = jnp.einsum("bsm,bshd->bhmd", mean, k)
    used = (count_bm > 0)[:, None, None, :]  # [B, 1, 1, m]
    f = _masked_probs(jnp.einsum("bthd,bhmd->bhtm", q, kl), used)
    a = _masked_probs(jnp.einsum("bhmd,bhnd->bhmn", ql, kl), used) * jnp.swapaxes(used, -1, -2)
    bmat = _masked_probs(jnp.einsum("bhmd,bshd->bhms", ql, k), valid_bs[:, None, None, :])
    bv = jnp.einsum("bhms,bshd->bhmd", bmat, v)  # m x S times S x D first: never an S x S matrix
    out = jnp.einsum("bhtm,bhmd->bthd", f, _iterative_pinv(a) @ bv)
    return out.astype(q_bthd.dtype)


class Attention(nnx.Module):
    """Q/K/V/O projections with grouped K/V heads; self- or cross-attention.

    `lowrank`: this is bidirectional self-attention that uses
    `cfg.attention_lowrank` (the encoder's); Linformer adds its two length
    projections [max_len, lowrank_dim].
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, cross: bool = False, lowrank: bool = False):
        self.cfg = cfg
        self.cross = cross
        self.lowrank = lowrank and cfg.attention_lowrank is not None and not cross
        d, h, kh, hd = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.resolved_head_dim
        out_std = cfg.init_std / math.sqrt(2 * max(cfg.num_layers, 1))
        self.wq = param(rngs, (d, h, hd), ("embed", "heads", "head_dim"), cfg)
        self.wk = param(rngs, (d, kh, hd), ("embed", "kv_heads", "head_dim"), cfg)
        self.wv = param(rngs, (d, kh, hd), ("embed", "kv_heads", "head_dim"), cfg)
        self.wo = param(rngs, (h, hd, d), ("heads", "head_dim", "embed"), cfg, std=out_std)
        if cfg.use_bias:
            self.bq = param(rngs, (h, hd), ("heads", "head_dim"), cfg, init="zeros")
            self.bk = param(rngs, (kh, hd), ("kv_heads", "head_dim"), cfg, init="zeros")
            self.bv = param(rngs, (kh, hd), ("kv_heads", "head_dim"), cfg, init="zeros")
            self.bo = param(rngs, (d,), ("embed",), cfg, init="zeros")
        if self.lowrank and cfg.attention_lowrank == "linformer":
            r = cfg.lowrank_dim
            self.proj_k = param(rngs, (cfg.max_len, r), ("max_len", "lowrank"), cfg, std=1.0 / math.sqrt(r))
            self.proj_v = param(rngs, (cfg.max_len, r), ("max_len", "lowrank"), cfg, std=1.0 / math.sqrt(r))

    def _rope(self, x, positions):
        """QK-norm (if on), then RoPE (self-attention with rope positions): the same for a parallel forward
        and a cached decode step, which both come through `query` / `key_value`."""
        if self.cfg.qk_norm:
            x = rms_normalize(x, self.cfg.norm_eps)
        return apply_rope(x, positions, self.cfg) if self.cfg.positions == "rope" and not self.cross else x

    def query(self, x_btd: jax.Array, positions_bt: jax.Array) -> jax.Array:
        cfg = self.cfg
        q = dense(x_btd, self, "wq", cfg)
        if cfg.use_bias:
            q = q + cast(self.bq, cfg)
        q = constrain(q, ("batch", "length", "act_heads", "head_dim"))
        return self._rope(q, positions_bt)

    def key_value(self, x_bsd: jax.Array, positions_bs: jax.Array) -> tuple[jax.Array, jax.Array]:
        cfg = self.cfg
        k = dense(x_bsd, self, "wk", cfg)
        v = dense(x_bsd, self, "wv", cfg)
        if cfg.use_bias:
            k, v = k + cast(self.bk, cfg), v + cast(self.bv, cfg)
        k = constrain(k, ("batch", "length", "act_kv_heads", "head_dim"))
        v = constrain(v, ("batch", "length", "act_kv_heads", "head_dim"))
        return self._rope(k, positions_bs), v

    def _fuse_qkv(self) -> bool:
        """Self-attention's three projections as one matmul: float weights, one device. On a mesh the three
        stay apart, so each weight is gathered, and its gradient reduced, as the sharding rules lay it out
        (joining tensor-sharded heads would regather them)."""
        mesh, _ = active_rules()
        quantized = any(hasattr(self, f"{n}_scale") for n in ("wq", "wk", "wv"))
        return not quantized and (mesh is None or mesh.size == 1)

    def query_key_value(self, x_btd: jax.Array, masking: Masking) -> tuple[jax.Array, jax.Array, jax.Array]:
        """`query` and `key_value` of x itself as ONE [d, (H + 2 KH) * D] matmul: the weights are joined per
        call (a copy of 3 d^2 numbers), so the forward runs one matmul instead of three and the backward one
        input gradient (no sum of three) and one weight gradient; on CPU at d = 128 that is ~3% of a train
        step (docs/benchmarks.md). The parameters stay three arrays, so checkpoints, LoRA, quantization and
        the cached decode (`query` / `key_value`) see the same layout."""
        cfg = self.cfg
        d, h, kh, hd = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.resolved_head_dim
        w = jnp.concatenate([cast(self.wq, cfg).reshape(d, h * hd), cast(self.wk, cfg).reshape(d, kh * hd),
                             cast(self.wv, cfg).reshape(d, kh * hd)], axis=1)
        y = project(x_btd, w)
        if cfg.use_bias:
            y = y + jnp.concatenate([cast(self.bq, cfg).reshape(-1), cast(self.bk, cfg).reshape(-1),
                                     cast(self.bv, cfg).reshape(-1)])
        q, k, v = jnp.split(y, [h * hd, (h + kh) * hd], axis=-1)
        q = constrain(q.reshape(x_btd.shape[:2] + (h, hd)), ("batch", "length", "act_heads", "head_dim"))
        k = constrain(k.reshape(x_btd.shape[:2] + (kh, hd)), ("batch", "length", "act_kv_heads", "head_dim"))
        v = constrain(v.reshape(x_btd.shape[:2] + (kh, hd)), ("batch", "length", "act_kv_heads", "head_dim"))
        return self._rope(q, masking.q_pos), self._rope(k, masking.k_pos), v

    def output(self, o_bthd: jax.Array) -> jax.Array:
        cfg = self.cfg
        y = dense(o_bthd, self, "wo", cfg, n_in=2)
        if cfg.use_bias:
            y = y + cast(self.bo, cfg)
        return y

    def __call__(self, x_btd: jax.Array, masking: Masking, *, kv_src: jax.Array | None = None,
                 rng: jax.Array | None = None):
        """Attention over `kv_src` (cross) or `x` itself, all positions at once."""
        if kv_src is None and self._fuse_qkv():
            q, k, v = self.query_key_value(x_btd, masking)
        else:
            q = self.query(x_btd, masking.q_pos)
            k, v = self.key_value(x_btd if kv_src is None else kv_src, masking.k_pos)
        if self.lowrank:
            if masking.causal:
                raise ValueError("ModelConfig.attention_lowrank: low-rank attention is bidirectional only, not causal")
            if self.cfg.attention_lowrank == "linformer":
                o = linformer_attention(q, k, v, masking, cast(self.proj_k, self.cfg), cast(self.proj_v, self.cfg))
            else:
                o = nystrom_attention(q, k, v, masking, self.cfg.lowrank_dim)
            return self.output(o)
        if ring_attention.applies(q.shape[1], k.shape[1]):  # a mesh with a `sequence` axis
            if self.cfg.attention == "flash":
                raise ValueError("ModelConfig.attention='flash' is not supported with sequence parallelism "
                                 "(mesh.sequence > 1): ring attention folds each visiting K/V block with its own "
                                 "blocked online softmax (never more than [T/N, T/N] scores); use attention='auto' "
                                 "or mesh.sequence=1")
            if rng is not None and self.cfg.attention_dropout > 0:
                raise ValueError("ModelConfig.attention_dropout > 0 is not supported with sequence parallelism "
                                 "(mesh.sequence > 1); set attention_dropout=0 or mesh.sequence=1")
            return self.output(ring_attention.attend(q, k, v, masking))
        return self.output(attend(q, k, v, masking, self.cfg, rng))
