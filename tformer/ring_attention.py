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

Each (query half, key half) block that no query may see is skipped
(`lax.cond`), never computed. Under a causal mask the consecutive layout
leaves device 0 with 3 such blocks to compute and device N - 1 with 4N - 1;
the zigzag layout of load-balanced ring attention
(`ModelConfig.sequence_layout="zigzag"`) gives device d blocks d and
2N - 1 - d of 2N, so every device computes 2N + 1. The layout is applied once to the batch
(`to_layout`, in the train step): masks follow positions and segments, not
slots, so nothing else changes.

Only `sequence` is manual inside the `shard_map`; `data` and `tensor` (batch
and heads) stay automatic, and inside a pipeline stage (`stage` manual) the
ring nests under the stage's `shard_map`. Each ring step is rematerialised in
the backward pass, so the saved residuals are the K/V blocks and the running
statistics, never the scores.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from tformer import sharding

if TYPE_CHECKING:  # attention imports this module
    from tformer.attention import Masking

AXIS = "sequence"
_NEG = -1e30  # as tformer.attention: fully masked rows stay finite (uniform), never NaN


def applies(q_len: int, k_len: int) -> bool:
    """Whether `attend` should run as ring attention: rules active on a mesh that splits `length` over `sequence`."""
    mesh, rules = sharding.active()
    n = sharding.axis_size(mesh, AXIS)
    if n == 1 or rules is None or sharding.logical_to_spec(("length",), rules, mesh)[0] != AXIS:
        return False
    inner = jax.sharding.get_abstract_mesh()
    if not inner.empty and AXIS in inner.manual_axes:
        return False  # already inside a ring
    if q_len % n or k_len % n:
        raise ValueError(f"sequence parallelism: lengths {q_len} (queries) and {k_len} (keys) must be divisible by "
                         f"mesh.sequence={n}; pad the sequence or pick a sequence size dividing both")
    return True


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


def _halves(t: int) -> list[slice]:
    """The two halves of a device's slots (one zigzag block each), or the whole when t is odd."""
    return [slice(0, t // 2), slice(t // 2, t)] if t % 2 == 0 else [slice(0, t)]


def _ring(q_bthd, k_bskd, v_bskd, masks, *, n: int, rule):
    """Per-device program: local queries against every K/V block as it comes round the ring.

    `rule`: the caller's `tformer.attention.Masking`, whose `dense` rule is
    evaluated on each (local queries, visiting keys) pair. Each pair is cut
    into (query half, key half) blocks; a block that no query of this device
    may see is skipped (`lax.cond`), never computed: under a causal mask that
    is every block of later positions, which the zigzag layout spreads evenly.
    """
    b, t, h, d = q_bthd.shape
    kh = k_bskd.shape[2]
    q = q_bthd.reshape(b, t, kh, h // kh, d)  # GQA: query heads grouped per KV head
    carry = (jnp.full((b, kh, h // kh, t), _NEG, jnp.float32), jnp.zeros((b, kh, h // kh, t), jnp.float32),
             jnp.zeros((b, kh, h // kh, t, d), jnp.float32))
    fold_block = jax.checkpoint(_fold_block)  # backward recomputes each block's scores

    k, v, k_pos, k_seg = k_bskd, v_bskd, masks["k_pos"], masks.get("k_seg")
    ring = [(i, (i + 1) % n) for i in range(n)]
    for step in range(n):  # static: each step's collective-permute shows in the HLO
        mask = dataclasses.replace(rule, q_pos=masks["q_pos"], k_pos=k_pos, q_seg=masks.get("q_seg"), k_seg=k_seg,
                                   plain_causal=False).dense()
        parts = []
        for qs in _halves(t):
            c_half = tuple(x[:, :, :, qs] for x in carry)
            for ks in _halves(k.shape[1]):
                c_half = jax.lax.cond(jnp.any(mask[:, qs, ks]), fold_block, lambda c, *_: c,
                                      c_half, q[:, qs], k[:, ks], v[:, ks], mask[:, qs, ks])
            parts.append(c_half)
        carry = tuple(jnp.concatenate(xs, axis=3) for xs in zip(*parts))
        if step < n - 1:
            k, v, k_pos = (jax.lax.ppermute(a, AXIS, ring) for a in (k, v, k_pos))
            k_seg = None if k_seg is None else jax.lax.ppermute(k_seg, AXIS, ring)
    _, l_bkgq, o_bkgqd = carry
    # A query that may see no key at all (padding) had every block skipped: l = 0. It gets 0 (dense attention
    # gives it the mean of the values); either way nothing reads it, as no real token attends to padding
    # and its loss weight is 0.
    o = o_bkgqd / jnp.where(l_bkgq == 0, 1.0, l_bkgq)[..., None]
    return jnp.moveaxis(o, 3, 1).reshape(b, t, h, d).astype(q_bthd.dtype)


def computed_blocks(masking: Masking, n: int) -> list[int]:
    """Per device of an n-way ring: how many (query half, key half) blocks `_ring` computes (not skips).

    `masking`: concrete [B, T] positions / segments of the rows one device of
    each ring holds, in the layout the ring sees (after `to_layout`). The
    same rule as the ring's: a block is computed iff some query may see some key.
    """
    dense = np.asarray(masking.dense())
    t = dense.shape[1] // n
    counts = []
    for dev in range(n):
        rows = dense[:, dev * t:(dev + 1) * t]
        count = 0
        for step in range(n):
            src = (dev - step) % n
            keys = rows[:, :, src * t:(src + 1) * t]
            count += sum(bool(keys[:, qs, ks].any()) for qs in _halves(t) for ks in _halves(t))
        counts.append(count)
    return counts


# ---------------------------------------------------------------------------
# The zigzag layout (balanced causal work).


def zigzag_order(t: int, n: int) -> np.ndarray:
    """Slot order of the zigzag layout: cut T into 2n blocks; device d holds blocks d and 2n - 1 - d.

    Under a causal mask, device d's early block sees the keys of d blocks and
    its late block those of 2n - 1 - d: 2n - 1 block-pairs on every device.
    """
    if t % (2 * n):
        raise ValueError(f"ModelConfig.sequence_layout='zigzag': sequence length {t} must be divisible by "
                         f"2 x mesh.sequence = {2 * n}; pad the sequence or use sequence_layout='consecutive'")
    c = t // (2 * n)
    blocks = [b for dev in range(n) for b in (dev, 2 * n - 1 - dev)]
    return np.concatenate([np.arange(b * c, (b + 1) * c) for b in blocks])


def to_layout(batch: dict, n: int) -> dict:
    """An LM batch in the zigzag layout: every [B, T] array (tokens, positions, segment ids, targets,
    weights) permuted along T the same way, positions made explicit (the slot is no longer the position).

    Attention masks follow positions and segments, never slots, and the loss
    is a sum over tokens, so the loss and gradients are those of the original
    order; logits come out in the layout's order, aligned with its targets.
    """
    t = batch["inputs"].shape[1]
    order = zigzag_order(t, n)
    if "positions" not in batch:
        batch = {**batch, "positions": jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), batch["inputs"].shape)}
    return {k: v[:, order] if v.ndim == 2 and v.shape[1] == t else v for k, v in batch.items()}


def attend(q_bthd: jax.Array, k_bskd: jax.Array, v_bskd: jax.Array, masking: Masking,
           mesh: Mesh | None = None) -> jax.Array:
    """Exact attention of sequence-split Q against sequence-split K/V; output [B, T, H, D] split like Q."""
    mesh = mesh if mesh is not None else sharding.active()[0]
    n = sharding.axis_size(mesh, AXIS)
    masks = {"q_pos": masking.q_pos, "k_pos": masking.k_pos}
    if masking.k_seg is not None:
        masks["k_seg"] = masking.k_seg
        if masking.q_seg is not None:
            masks["q_seg"] = masking.q_seg
    seq = P(None, AXIS)

    def program(q: jax.Array, k: jax.Array, v: jax.Array, masks: dict[str, jax.Array]) -> jax.Array:
        return _ring(q, k, v, masks, n=n, rule=masking)

    inner = jax.sharding.get_abstract_mesh()
    if not inner.empty and inner.manual_axes:
        mesh = inner  # nested in another shard_map (a pipeline stage): the context mesh, `stage` already manual
    run = jax.shard_map(program, mesh=mesh, in_specs=(seq, seq, seq, seq), out_specs=seq,
                        axis_names=frozenset({AXIS}), check_vma=False)
    return run(q_bthd, k_bskd, v_bskd, masks)
