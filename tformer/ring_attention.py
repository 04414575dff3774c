"""Sequence parallelism: ring attention over the `sequence` mesh axis (Liu et al., 2023).

With the rule `length -> sequence`, activations between blocks are split
along positions: each of the N devices of the `sequence` axis holds T / N
consecutive positions. Attention needs every key for every query, so each
device keeps its query block and passes its K/V block (with the keys'
positions and segment ids) around the ring with `ppermute`, N - 1 times,
folding each visiting block into an online softmax (running max, running
denominator, running weighted sum). No device ever holds more than a
[B, H, T / N, T / N] block of scores, and the mask of each block is the exact
per-token rule of `tformer.attention.Masking` (causal, window, packed
segments, padding) evaluated on the visiting keys' own positions and
segments, so the result equals dense attention up to summation order.

Only `sequence` is manual inside the `shard_map`; `data` and `tensor` (batch
and heads) stay automatic. Each ring step is rematerialised in the backward
pass, so the saved residuals are the K/V blocks and the running statistics,
never the scores.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from tformer import sharding as shd

AXIS = "sequence"
_NEG = -1e30  # as tformer.attention: fully masked rows stay finite (uniform), never NaN


def applies(q_len: int, k_len: int) -> bool:
    """Whether `attend` should run as ring attention: rules active on a mesh that splits `length` over `sequence`."""
    mesh, rules = shd.active()
    n = shd.axis_size(mesh, AXIS)
    if n == 1 or rules is None or shd.logical_to_spec(("length",), rules, mesh)[0] != AXIS:
        return False
    inner = jax.sharding.get_abstract_mesh()
    if not inner.empty and AXIS in inner.manual_axes:
        return False  # already inside a ring
    if q_len % n or k_len % n:
        raise ValueError(f"sequence parallelism: lengths {q_len} (queries) and {k_len} (keys) must be divisible by "
                         f"mesh.sequence={n}; pad the sequence or pick a sequence size dividing both")
    return True


def _block_mask(q_pos, k_pos, q_seg, k_seg, causal: bool, window: int | None):
    """[B, Tq, Tk] visibility, the rule of `Masking.dense` on one (query block, key block) pair."""
    q, k = q_pos[:, :, None], k_pos[:, None, :]
    m = jnp.ones((q.shape[0], q.shape[1], k.shape[2]), bool)
    if causal:
        m &= k <= q
    if window is not None:
        m &= (q - k) < window
    if k_seg is not None:
        m &= k_seg[:, None, :] != 0
        if q_seg is not None:
            m &= q_seg[:, :, None] == k_seg[:, None, :]
    return m


def _fold_block(carry, q_bqkgd, k_bskd, v_bskd, mask_bqs):
    """One online-softmax update with a visiting K/V block."""
    m_bkgq, l_bkgq, o_bkgqd = carry
    s = jnp.einsum("bqkgd,bskd->bkgqs", q_bqkgd, k_bskd, preferred_element_type=jnp.float32)
    s = s / math.sqrt(q_bqkgd.shape[-1])
    s = jnp.where(mask_bqs[:, None, None], s, _NEG)
    m_new = jnp.maximum(m_bkgq, jnp.max(s, axis=-1))
    p = jnp.exp(s - m_new[..., None])
    scale = jnp.exp(m_bkgq - m_new)
    l_new = l_bkgq * scale + jnp.sum(p, axis=-1)
    o_new = o_bkgqd * scale[..., None] + jnp.einsum("bkgqs,bskd->bkgqd", p.astype(v_bskd.dtype), v_bskd,
                                                     preferred_element_type=jnp.float32)
    return m_new, l_new, o_new


def _ring(q_bthd, k_bskd, v_bskd, masks, *, n: int, causal: bool, window: int | None):
    """Per-device program: local queries against every K/V block as it comes round the ring."""
    b, t, h, d = q_bthd.shape
    kh = k_bskd.shape[2]
    q = q_bthd.reshape(b, t, kh, h // kh, d)  # GQA: query heads grouped per KV head
    carry = (jnp.full((b, kh, h // kh, t), _NEG, jnp.float32), jnp.zeros((b, kh, h // kh, t), jnp.float32),
             jnp.zeros((b, kh, h // kh, t, d), jnp.float32))
    fold_block = jax.checkpoint(_fold_block)  # backward recomputes each block's scores
    k, v, k_pos, k_seg = k_bskd, v_bskd, masks["k_pos"], masks.get("k_seg")
    ring = [(i, (i + 1) % n) for i in range(n)]
    for step in range(n):  # static: each step's collective-permute shows in the HLO
        mask = _block_mask(masks["q_pos"], k_pos, masks.get("q_seg"), k_seg, causal, window)
        carry = fold_block(carry, q, k, v, mask)
        if step < n - 1:
            k, v, k_pos = (jax.lax.ppermute(a, AXIS, ring) for a in (k, v, k_pos))
            k_seg = None if k_seg is None else jax.lax.ppermute(k_seg, AXIS, ring)
    _, l_bkgq, o_bkgqd = carry
    o = o_bkgqd / l_bkgq[..., None]
    return jnp.moveaxis(o, 3, 1).reshape(b, t, h, d).astype(q_bthd.dtype)


def attend(q_bthd, k_bskd, v_bskd, masking, mesh: Mesh | None = None) -> jax.Array:
    """Exact attention of sequence-split Q against sequence-split K/V; output [B, T, H, D] split like Q."""
    mesh = mesh if mesh is not None else shd.active()[0]
    n = shd.axis_size(mesh, AXIS)
    masks = {"q_pos": masking.q_pos, "k_pos": masking.k_pos}
    if masking.k_seg is not None:
        masks["k_seg"] = masking.k_seg
        if masking.q_seg is not None:
            masks["q_seg"] = masking.q_seg
    seq = P(None, AXIS)

    def program(q, k, v, masks):
        return _ring(q, k, v, masks, n=n, causal=masking.causal, window=masking.window)

    run = jax.shard_map(program, mesh=mesh, in_specs=(seq, seq, seq, seq), out_specs=seq,
                        axis_names=frozenset({AXIS}), check_vma=False)
    return run(q_bthd, k_bskd, v_bskd, masks)
