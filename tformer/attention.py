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
upper triangle; same maths as the dense path). "auto" picks cuDNN where it
applies, "blocked" on CPU for long causal self-attention, else XLA.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tformer import ring_attention
from tformer.config import ModelConfig
from tformer.layers import apply_rope, cast, dropout, param, project
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


def self_masking(positions_bt, segment_ids_bt, cfg: ModelConfig, causal: bool, default_positions: bool = True
                 ) -> Masking:
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


def _einsum_attention(q, k, v, mask_bqk, rate, rng):
    b, tq, h, d = q.shape
    kh = k.shape[2]
    q = q.reshape(b, tq, kh, h // kh, d)  # GQA: query heads grouped per kv head
    logits = jnp.einsum("bqkgd,bskd->bkgqs", q, k, preferred_element_type=jnp.float32)
    logits = logits / math.sqrt(d)
    logits = jnp.where(mask_bqk[:, None, None], logits, _NEG)
    probs = jax.nn.softmax(logits, axis=-1)
    probs = dropout(probs, rate, rng).astype(v.dtype)
    out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v)
    return out.reshape(b, tq, h, d)


# Block-causal attention: query block i of `BLOCKS` attends to keys
# [0, (i+1) T/BLOCKS) only, so (BLOCKS+1)/(2 BLOCKS) of the T x T work is done
# (5/8 for 4 blocks). Chosen by "auto" on CPU from BLOCKED_MIN_LEN tokens up
# (both measured on XLA:CPU, see BENCHMARKS.md); GPUs use flash kernels.
BLOCKS = 4
BLOCKED_MIN_LEN = 128


def _blocked_applies(masking: Masking, seq_lens: tuple[int, int] | None) -> bool:
    """Plain causal self-attention (positions 0..T-1, no window) over T divisible by BLOCKS."""
    if seq_lens is None or not (masking.plain_causal and masking.window is None):
        return False
    tq, tk = seq_lens
    return tq == tk and tq % BLOCKS == 0


def _blocked_causal_attention(q, k, v, blocks: int = BLOCKS):
    """Exact causal attention skipping the fully masked blocks above the diagonal."""
    t = q.shape[1]
    n = t // blocks
    outs = []
    for i in range(blocks):
        end = (i + 1) * n
        # Query i * n + a sees key j iff j <= i * n + a: a trace-time constant.
        mask = np.arange(end)[None, :] <= np.arange(i * n, end)[:, None]
        outs.append(_einsum_attention(q[:, i * n : end], k[:, :end], v[:, :end], mask[None], 0.0, None))
    return jnp.concatenate(outs, axis=1)


def resolve_impl(cfg: ModelConfig, dtype, masking: Masking, training_dropout: bool,
                 seq_lens: tuple[int, int] | None = None) -> str:
    """The implementation `attend` will use for this call (`seq_lens`: query and key lengths)."""
    impl = cfg.attention
    if training_dropout:
        return "einsum"  # the only path with attention dropout
    if impl == "auto":
        if jax.default_backend() == "cpu":
            ok = _blocked_applies(masking, seq_lens) and seq_lens[0] >= BLOCKED_MIN_LEN
            return "blocked" if ok else "xla"
        ok = (
            jax.default_backend() == "gpu"
            and dtype in (jnp.bfloat16, jnp.float16)
            and masking.plain_causal
            and cfg.head_dim_ <= 128
            and cfg.head_dim_ % 8 == 0
        )
        return "cudnn" if ok else "xla"
    if impl == "cudnn" and not masking.plain_causal:
        return "xla"  # segments/padding/cache need a dense mask
    if impl == "blocked" and not _blocked_applies(masking, seq_lens):
        return "xla"  # windows, segments, caches, cross-attention: dense mask
    return impl


def attend(q_bthd, k_bskd, v_bskd, masking: Masking, cfg: ModelConfig, rng=None) -> jax.Array:
    """Scaled dot-product attention with GQA; output [B, T, H, D]."""
    training_dropout = rng is not None and cfg.attention_dropout > 0
    impl = resolve_impl(cfg, q_bthd.dtype, masking, training_dropout, (q_bthd.shape[1], k_bskd.shape[1]))
    if impl == "cudnn":
        window = None if masking.window is None else (masking.window - 1, 0)
        try:
            return jax.nn.dot_product_attention(
                q_bthd, k_bskd, v_bskd, is_causal=masking.causal, local_window_size=window,
                implementation="cudnn",
            )
        except Exception:  # unsupported shape/dtype/version: fall back, same maths
            impl = "xla"
    if impl == "blocked":
        return _blocked_causal_attention(q_bthd, k_bskd, v_bskd)
    mask = masking.dense()
    if impl == "xla":
        return jax.nn.dot_product_attention(q_bthd, k_bskd, v_bskd, mask=mask[:, None], implementation="xla")
    return _einsum_attention(q_bthd, k_bskd, v_bskd, mask, cfg.attention_dropout if training_dropout else 0.0, rng)


class Attention(nnx.Module):
    """Q/K/V/O projections with grouped K/V heads; self- or cross-attention."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, cross: bool = False):
        self.cfg = cfg
        self.cross = cross
        d, h, kh, hd = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.head_dim_
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

    def _rope(self, x, positions):
        return apply_rope(x, positions, self.cfg) if self.cfg.positions == "rope" and not self.cross else x

    def query(self, x_btd, positions_bt):
        cfg = self.cfg
        q = project(x_btd, cast(self.wq, cfg))
        if cfg.use_bias:
            q = q + cast(self.bq, cfg)
        q = constrain(q, ("batch", "length", "act_heads", "head_dim"))
        return self._rope(q, positions_bt)

    def key_value(self, x_bsd, positions_bs):
        cfg = self.cfg
        k = project(x_bsd, cast(self.wk, cfg))
        v = project(x_bsd, cast(self.wv, cfg))
        if cfg.use_bias:
            k, v = k + cast(self.bk, cfg), v + cast(self.bv, cfg)
        k = constrain(k, ("batch", "length", "act_kv_heads", "head_dim"))
        v = constrain(v, ("batch", "length", "act_kv_heads", "head_dim"))
        return self._rope(k, positions_bs), v

    def output(self, o_bthd):
        cfg = self.cfg
        y = project(o_bthd, cast(self.wo, cfg), n_in=2)
        if cfg.use_bias:
            y = y + cast(self.bo, cfg)
        return y

    def __call__(self, x_btd, masking: Masking, *, kv_src=None, rng=None):
        """Attention over `kv_src` (cross) or `x` itself, all positions at once."""
        q = self.query(x_btd, masking.q_pos)
        k, v = self.key_value(x_btd if kv_src is None else kv_src, masking.k_pos)
        if ring_attention.applies(q.shape[1], k.shape[1]):  # a mesh with a `sequence` axis
            if rng is not None and self.cfg.attention_dropout > 0:
                raise ValueError("ModelConfig.attention_dropout > 0 is not supported with sequence parallelism "
                                 "(mesh.sequence > 1); set attention_dropout=0 or mesh.sequence=1")
            return self.output(ring_attention.attend(q, k, v, masking))
        return self.output(attend(q, k, v, masking, self.cfg, rng))
