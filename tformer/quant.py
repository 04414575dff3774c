"""Symmetric int8 quantization: the int8 KV cache entry and int8 weights share one rule.

    x ~= values * scale,  values = round(x / scale) in [-127, 127],  scale = max|x| / 127

taken over the reduced axes (a token-and-head's head_dim for the cache, a
weight's input axes for a projection). Zero groups get scale 0 and values 0.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

INT8_MAX = 127.0


def quantize_int8(x: jax.Array, axes: tuple[int, ...],
                  scale_dtype: jnp.dtype = jnp.float32) -> tuple[jax.Array, jax.Array]:
    """(int8 values shaped like x, scale with `axes` reduced away) with x ~= values * scale."""
    x32 = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x32), axis=axes, keepdims=True)
    scale = amax / INT8_MAX
    values = jnp.round(x32 / jnp.where(scale > 0, scale, 1.0))
    values = jnp.clip(values, -INT8_MAX, INT8_MAX).astype(jnp.int8)
    return values, jnp.squeeze(scale, axis=axes).astype(scale_dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Int8KV:
    """One layer's cached keys or values in int8: x[b, s, k, :] ~= values[b, s, k, :] * scale[b, s, k].

    Indexing slices the leading (batch, slot) axes of both arrays, so code that
    slices a cache buffer (`buf[:, :visible]`) works on either kind.
    """

    values: jax.Array  # [B, S, K, D] int8
    scale: jax.Array  # [B, S, K], one per token and head

    @property
    def shape(self) -> tuple[int, ...]:
        return self.values.shape

    @property
    def ndim(self) -> int:
        return self.values.ndim

    def __getitem__(self, idx) -> Int8KV:
        return Int8KV(self.values[idx], self.scale[idx])

    def dequantize(self, dtype: jnp.dtype = jnp.float32) -> jax.Array:
        """The full-precision view (tests and debugging; the decode loop never builds it)."""
        return (self.values.astype(jnp.float32) * self.scale[..., None].astype(jnp.float32)).astype(dtype)
