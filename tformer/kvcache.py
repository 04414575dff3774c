"""The KV cache: an explicit pytree, one K and V buffer per layer.

Rows are left-aligned in time: every row writes its next token at the same
slot `index`, so a step is one `dynamic_update_slice` per layer, in place on
the loop carry, with no per-row scatter. Rows with shorter prompts carry
empty (invalid) slots on the left; per-slot `positions` keep each row's own
token positions, so causal and local masks, RoPE and learned positions see
exactly what the parallel forward sees.

With `ModelConfig.kv_cache_dtype="int8"` each layer's K and V are
`tformer.quant.Int8KV` (int8 values and one scale per token and head):
`write` quantizes the new entries, and attention reads values and scales
directly (tformer.attention).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from tformer.attention import Masking
from tformer.config import ModelConfig
from tformer.layers import DTYPE
from tformer.quant import Int8KV, quantize_int8
from tformer.sharding import constrain


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    k: tuple[jax.Array | Int8KV, ...]  # per layer [B, S, K, D]
    v: tuple[jax.Array | Int8KV, ...]  # per layer [B, S, K, D]
    positions: jax.Array  # [B, S] int32, position of the token in each slot
    valid: jax.Array  # [B, S] bool, slot holds a real token
    next_pos: jax.Array  # [B] int32, position of each row's next token
    index: jax.Array  # [] int32, next slot to write (shared by all rows)
    # Encoder-decoder only: cross-attention K/V, computed once from the source.
    cross_k: tuple[jax.Array, ...] = ()
    cross_v: tuple[jax.Array, ...] = ()
    src_valid: jax.Array | None = None  # [B, S_src] bool


def empty(num_layers: int, batch: int, length: int, kv_heads: int, head_dim: int, dtype: jnp.dtype,
          int8: bool = False) -> KVCache:
    """A cache of zeros; `int8`: K/V as int8 values with `dtype` scales per token and head."""
    axes = ("batch", "length", "act_kv_heads", "head_dim")

    def buf():  # batch over the data axes, kv heads over `tensor` (when rules are active)
        if not int8:
            return constrain(jnp.zeros((batch, length, kv_heads, head_dim), dtype), axes)
        return Int8KV(constrain(jnp.zeros((batch, length, kv_heads, head_dim), jnp.int8), axes),
                      constrain(jnp.zeros((batch, length, kv_heads), dtype), axes[:3]))

    return KVCache(
        k=tuple(buf() for _ in range(num_layers)),
        v=tuple(buf() for _ in range(num_layers)),
        positions=jnp.zeros((batch, length), jnp.int32),
        valid=jnp.zeros((batch, length), bool),
        next_pos=jnp.zeros((batch,), jnp.int32),
        index=jnp.zeros((), jnp.int32),
    )


def for_config(cfg: ModelConfig, batch: int, length: int, dtype: jnp.dtype | None = None) -> KVCache:
    """The empty self-attention cache a model with `cfg` decodes into (`dtype`: default the compute dtype)."""
    return empty(cfg.num_layers, batch, length, cfg.kv_heads, cfg.resolved_head_dim, dtype or DTYPE[cfg.dtype],
                 int8=cfg.kv_cache_dtype == "int8")


def nbytes(cache: KVCache) -> int:
    """Bytes held by the self-attention K/V (values and any scales)."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves((cache.k, cache.v)))


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


def write(buf_bskd: jax.Array | Int8KV, new_btkd: jax.Array, index: jax.Array) -> jax.Array | Int8KV:
    """Write T new entries at slot `index`, in place when `buf` is a loop carry (quantizing into int8)."""
    if isinstance(buf_bskd, Int8KV):
        values, scale = quantize_int8(new_btkd, axes=(3,), scale_dtype=buf_bskd.scale.dtype)
        return Int8KV(jax.lax.dynamic_update_slice(buf_bskd.values, values, (0, index, 0, 0)),
                      jax.lax.dynamic_update_slice(buf_bskd.scale, scale, (0, index, 0)))
    return jax.lax.dynamic_update_slice(buf_bskd, new_btkd.astype(buf_bskd.dtype), (0, index, 0, 0))
