"""The KV cache: an explicit pytree, one K and V buffer per layer.

Rows are left-aligned in time: every row writes its next token at the same
slot `index`, so a step is one `dynamic_update_slice` per layer, in place on
the loop carry, with no per-row scatter. Rows with shorter prompts carry
empty (invalid) slots on the left; per-slot `positions` keep each row's own
token positions, so causal and local masks, RoPE and learned positions see
exactly what the parallel forward sees.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from tformer.attention import Masking
from tformer.sharding import constrain


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    k: tuple[jax.Array, ...]  # per layer [B, S, K, D]
    v: tuple[jax.Array, ...]  # per layer [B, S, K, D]
    positions: jax.Array  # [B, S] int32, position of the token in each slot
    valid: jax.Array  # [B, S] bool, slot holds a real token
    next_pos: jax.Array  # [B] int32, position of each row's next token
    index: jax.Array  # [] int32, next slot to write (shared by all rows)
    # Encoder-decoder only: cross-attention K/V, computed once from the source.
    cross_k: tuple[jax.Array, ...] = ()
    cross_v: tuple[jax.Array, ...] = ()
    src_valid: jax.Array | None = None  # [B, S_src] bool


def empty(num_layers: int, batch: int, length: int, kv_heads: int, head_dim: int, dtype) -> KVCache:
    def z():  # batch over the data axes, kv heads over `tensor` (when rules are active)
        return constrain(jnp.zeros((batch, length, kv_heads, head_dim), dtype),
                         ("batch", "length", "act_kv_heads", "head_dim"))

    return KVCache(
        k=tuple(z() for _ in range(num_layers)),
        v=tuple(z() for _ in range(num_layers)),
        positions=jnp.zeros((batch, length), jnp.int32),
        valid=jnp.zeros((batch, length), bool),
        next_pos=jnp.zeros((batch,), jnp.int32),
        index=jnp.zeros((), jnp.int32),
    )


def advance(cache: KVCache, valid_bt: jax.Array, window: int | None = None) -> tuple[KVCache, jax.Array, Masking]:
    """Record T new tokens (some possibly padding) at slot `index`.

    Returns the cache with updated positions/validity (K/V are written by the
    layers), the new tokens' positions [B, T] and the self-attention masking
    of the new tokens against every slot.
    """
    t = valid_bt.shape[1]
    steps = jnp.cumsum(valid_bt.astype(jnp.int32), axis=1)
    pos_bt = jnp.where(valid_bt, cache.next_pos[:, None] + steps - 1, 0)
    positions = jax.lax.dynamic_update_slice(cache.positions, pos_bt, (0, cache.index))
    valid = jax.lax.dynamic_update_slice(cache.valid, valid_bt, (0, cache.index))
    new = dataclasses.replace(
        cache, positions=positions, valid=valid, next_pos=cache.next_pos + steps[:, -1], index=cache.index + t
    )
    masking = Masking(
        q_pos=pos_bt,
        k_pos=positions,
        q_seg=valid_bt.astype(jnp.int32),
        k_seg=valid.astype(jnp.int32),
        causal=True,
        window=window,
    )
    return new, pos_bt, masking


def write(buf_bskd: jax.Array, new_btkd: jax.Array, index: jax.Array) -> jax.Array:
    """Write T new entries at slot `index`, in place when `buf` is a loop carry."""
    return jax.lax.dynamic_update_slice(buf_bskd, new_btkd.astype(buf_bskd.dtype), (0, index, 0, 0))
