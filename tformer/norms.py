"""LayerNorm / RMSNorm (`tformer.layers.Norm`) with a hand-written gradient and CPU-friendly row sums.

Autodiff of `(x - mean(x)) * rsqrt(mean((x - mean)^2) + eps)` gives two dependent
reductions forward and two more backward over each row. Each row sum here is
`tformer.reductions.row_sum`, which XLA:CPU runs as one kernel fused with its producer
(rather than an unfused reduce-window and a reduce); the scale and bias gradients sum
columns over a 2-D [rows, d] view, as XLA:CPU splits a [B, T, d] one into a slow 3-D
reduce-window (docs/benchmarks.md has the figures). Forward: one pass for the
sum and the sum of squares around a shift (the row's first element, the textbook
guard against cancellation: var = E[(x-K)^2] - E[x-K]^2); backward: the two sums
of the standard formula, dx = rstd * (g - mean(g) - xhat * mean(g * xhat)).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from tformer import reductions


def _stats(x: jax.Array, center: bool, eps: float) -> tuple[jax.Array, jax.Array]:
    """(mean or 0, 1/sqrt(var + eps)) over the last axis, each [..., 1]; RMSNorm's 'var' is the mean square."""
    d = x.shape[-1]
    if not center:
        return jnp.zeros_like(x[..., :1]), jax.lax.rsqrt(reductions.row_sum(x * x) / d + eps)
    shift = x[..., :1]
    xs = x - shift
    m = reductions.row_sum(xs) / d
    return shift + m, jax.lax.rsqrt(jnp.maximum(reductions.row_sum(xs * xs) / d - m * m, 0.0) + eps)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _norm(x, scale, bias, center: bool, eps: float):
    return _norm_fwd(x, scale, bias, center, eps)[0]


def _norm_fwd(x, scale, bias, center, eps):
    mean, rstd = _stats(x, center, eps)
    xhat = (x - mean) * rstd
    return xhat * scale + bias, (xhat, rstd, scale)


def _norm_bwd(center, eps, res, dy):
    del eps
    xhat, rstd, scale = res
    d = xhat.shape[-1]
    g = dy * scale
    dx = g - xhat * (reductions.row_sum(g * xhat) / d)
    if center:
        dx = dx - reductions.row_sum(g) / d
    # Column sums over a 2-D [rows, d] view: XLA:CPU splits a [B, T, d] one into a slow 3-D reduce-window.
    dy_rd, xhat_rd = dy.reshape(-1, d), xhat.reshape(-1, d)
    return dx * rstd, jnp.sum(dy_rd * xhat_rd, 0), jnp.sum(dy_rd, 0)


_norm.defvjp(_norm_fwd, _norm_bwd)


def normalize(x: jax.Array, scale: jax.Array, bias: jax.Array | None, *, center: bool, eps: float) -> jax.Array:
    """`(x - mean) / sqrt(var + eps) * scale + bias` over the last axis, statistics in fp32, x's dtype out.
    `center=False`: RMSNorm (no mean; var = mean square). `bias` None: no bias."""
    b = jnp.zeros(x.shape[-1:], jnp.float32) if bias is None else bias.astype(jnp.float32)
    y = _norm(x.astype(jnp.float32), scale.astype(jnp.float32), b, center, float(eps))
    return y.astype(x.dtype)
