"""Reductions over the last axis that XLA:CPU keeps in one kernel with their producer: sum, max, softmax.

XLA:CPU splits a float reduction over more than 32 elements into a reduce-window and a
reduce (`TreeReductionRewriter`): two kernels, the first not fused with the elementwise
work that produces its input. Here, on CPU, a row is first folded in halves
(`x[..., :n/2] + x[..., n/2:]`, elementwise, which XLA fuses into the reduction's input)
until it is 32 long or odd, then reduced: one fused kernel. Pairwise folding is also the
more accurate summation order. GPU/TPU reduce a row in one kernel and take jnp's (each function is
a `jax.lax.platform_dependent` choice, so a program lowered for them on a CPU host has no folds).
Measured at nanoGPT's CPU shape (docs/benchmarks.md): LayerNorm's row sums folded made the
train step 3-4% faster than chunked sums behind a barrier, and attention over 64 keys with this
softmax ~10% faster per layer than `jax.nn.dot_product_attention`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_WINDOW = 32  # XLA:CPU's tree-reduction window: reductions this long or shorter stay one fused kernel


def _fold(x: jax.Array, op) -> jax.Array:
    """`op` of the two halves of the last axis, repeated while it is even and longer than 32."""
    while x.shape[-1] > _WINDOW and x.shape[-1] % 2 == 0:
        half = x.shape[-1] // 2
        x = op(x[..., :half], x[..., half:])
    return x


def _on_cpu(x: jax.Array, cpu, other) -> jax.Array:
    """`cpu(x)` in a program lowered for CPU, `other(x)` for GPU/TPU (`jax.lax.platform_dependent`)."""
    return jax.lax.platform_dependent(x, cpu=cpu, default=other)


def row_sum(x: jax.Array) -> jax.Array:
    """Sum over the last axis, kept as a length-1 axis."""
    return _on_cpu(x, lambda x: jnp.sum(_fold(x, jnp.add), axis=-1, keepdims=True),
                   lambda x: jnp.sum(x, axis=-1, keepdims=True))


def row_max(x: jax.Array) -> jax.Array:
    """Max over the last axis, kept as a length-1 axis."""
    return _on_cpu(x, lambda x: jnp.max(_fold(x, jnp.maximum), axis=-1, keepdims=True),
                   lambda x: jnp.max(x, axis=-1, keepdims=True))


@jax.custom_vjp
def softmax(x: jax.Array) -> jax.Array:
    """`jax.nn.softmax(x, axis=-1)` with `row_max` / `row_sum`; gradient y * (g - sum(g * y))."""
    e = jnp.exp(x - row_max(x))
    return e / row_sum(e)


def _softmax_fwd(x):
    y = softmax(x)
    return y, y


def _softmax_bwd(y, g):
    return (y * (g - row_sum(g * y)),)


softmax.defvjp(_softmax_fwd, _softmax_bwd)


def sum_of_squares(x: jax.Array) -> jax.Array:
    """sum(x**2) in fp32 over every element: on CPU over rows of 32, then over the rows' sums.

    A whole array does not fold (that would be one kernel with 32 outputs); the barrier keeps
    XLA from merging the two sums back into one long one.
    """
    x = x.astype(jnp.float32)
    if x.size <= _WINDOW or x.size % _WINDOW:
        return jnp.sum(x * x)

    def rows_first(x: jax.Array) -> jax.Array:
        return jnp.sum(jax.lax.optimization_barrier(jnp.sum(jnp.square(x.reshape(-1, _WINDOW)), axis=-1)))

    return _on_cpu(x, rows_first, lambda x: jnp.sum(x * x))
