"""Building blocks: parameters with logical axes, embeddings, positions, norms, MLP, dropout.

Weights are stored in `param_dtype` and cast to the compute `dtype` where they
are used, so the optimizer always updates fp32 master weights.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tformer import norms
from tformer.config import ModelConfig
from tformer.sharding import active as active_rules
from tformer.sharding import axis_size, constrain

DTYPE = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str | None, ...], cfg: ModelConfig,
          std: float | None = None, init: str = "normal") -> nnx.Param:
    """A parameter tagged with logical `axes` as NNX sharding metadata (see tformer.sharding).

    Eager sharding is off: where the weights go is decided by the rule table
    when a train state or a model is placed on a mesh, not at creation.
    """
    assert len(shape) == len(axes), (shape, axes)
    dtype = DTYPE[cfg.param_dtype]
    if init == "zeros":
        value = jnp.zeros(shape, dtype)
    elif init == "ones":
        value = jnp.ones(shape, dtype)
    else:
        std = cfg.init_std if std is None else std
        value = std * jax.random.normal(rngs.params(), shape, dtype)
    return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=False)


def cast(p: nnx.Param, cfg: ModelConfig) -> jax.Array:
    return p[...].astype(DTYPE[cfg.dtype])


# Weight gradients on XLA:CPU. x^T dy contracts the B*T rows of both operands, an orientation XLA:CPU does
# not hand to YNNPACK: it runs on Eigen. Two rewrites, same maths, chosen by size (docs/benchmarks.md):
# - small activations (<= _CPU_TRANSPOSE_MAX elements, L2-resident): transpose x (or dy) first, behind a barrier
#   so XLA does not fold the transpose back, and the product is a row-major YNNPACK matmul on its threads;
# - larger ones with k > n (the MLP output projection): (dy^T x)^T, Eigen's faster orientation for that shape.
_CPU_TRANSPOSE_MAX = 1 << 17


def _contract_rows(a_rm: jax.Array, b_rn: jax.Array) -> jax.Array:
    """a^T b [m, n], contracting the rows, with a^T materialised (see above)."""
    return jax.lax.optimization_barrier(a_rm.T) @ b_rn


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _cpu_matmul(x_rk: jax.Array, w: jax.Array, w_transposed: bool) -> jax.Array:
    """x @ w (w [k, n]) or x @ w.T (w [n, k]); the weight gradient as a row-major matmul (see above)."""
    return _cpu_matmul_fwd(x_rk, w, w_transposed)[0]


def _cpu_matmul_fwd(x_rk, w, w_transposed):
    y = jax.lax.dot_general(x_rk, w, (((1,), (1,)), ((), ()))) if w_transposed else x_rk @ w
    return y, (x_rk, w)


def _cpu_matmul_bwd(w_transposed, res, dy_rn):
    x_rk, w = res
    if w_transposed:
        return dy_rn @ w, _contract_rows(dy_rn, x_rk)
    return dy_rn @ w.T, _contract_rows(x_rk, dy_rn)


_cpu_matmul.defvjp(_cpu_matmul_fwd, _cpu_matmul_bwd)


@jax.custom_vjp
def _cpu_matmul_k_gt_n(x_rk: jax.Array, w_kn: jax.Array) -> jax.Array:
    """x @ w for a weight with k > n whose gradient is computed as (dy^T x)^T (see above)."""
    return x_rk @ w_kn


def _k_gt_n_fwd(x_rk, w_kn):
    return x_rk @ w_kn, (x_rk, w_kn)


def _k_gt_n_bwd(res, dy_rn):
    x_rk, w_kn = res
    dw_nk = jax.lax.dot_general(dy_rn, x_rk, (((0,), (0,)), ((), ())))  # dy^T x, contracting the rows
    return dy_rn @ w_kn.T, jax.lax.optimization_barrier(dw_nk).T


_cpu_matmul_k_gt_n.defvjp(_k_gt_n_fwd, _k_gt_n_bwd)


def project(x: jax.Array, w: jax.Array, n_in: int = 1, *, w_transposed: bool = False) -> jax.Array:
    """`x[..., k1..kn] @ w[k1..kn, o1..om]` -> `[..., o1..om]`, done as ONE 2-D matmul.

    Equivalent to an einsum over the `n_in` trailing axes of `x`, but the
    activations are flattened to `[rows, k]` and the weight to `[k, out]`
    first. For the weight gradient XLA:CPU then contracts a plain 2-D
    cotangent instead of transposing a 3-D/4-D one (those transposes cost
    20-30% of a CPU training step, see BENCHMARKS.md); on GPU/TPU the
    reshapes of contiguous axes are free. `w_transposed`: `w` is `[out, k]`
    (a tied embedding table used as the output projection, `n_in` = 1).
    """
    k_shape = w.shape[-n_in:] if w_transposed else w.shape[:n_in]
    out_shape = w.shape[:-n_in] if w_transposed else w.shape[n_in:]
    if x.shape[x.ndim - n_in:] != k_shape:
        raise ValueError(f"project: input axes {x.shape[x.ndim - n_in:]} do not match weight axes {k_shape}")
    k, n, lead = math.prod(k_shape), math.prod(out_shape), x.shape[: x.ndim - n_in]
    mesh, rules = active_rules()
    if rules is not None and axis_size(mesh, "sequence") > 1:
        # Sequence parallelism splits the positions (a minor row axis): merging
        # them into rows would make XLA gather every position first.
        x_axes = tuple(range(x.ndim - n_in, x.ndim))
        w_axes = tuple(range(w.ndim - n_in, w.ndim)) if w_transposed else tuple(range(n_in))
        return jax.lax.dot_general(x, w, ((x_axes, w_axes), ((), ())))
    rows = math.prod(lead)
    x2, w2 = x.reshape(rows, k), w.reshape((n, k) if w_transposed else (k, n))
    on_cpu = jax.default_backend() == "cpu"
    if on_cpu and rows * (n if w_transposed else k) <= _CPU_TRANSPOSE_MAX:
        y2 = _cpu_matmul(x2, w2, w_transposed)
    elif w_transposed:
        y2 = jax.lax.dot_general(x2, w2, (((1,), (1,)), ((), ())))
    elif on_cpu and k > n:
        y2 = _cpu_matmul_k_gt_n(x2, w2)
    else:
        y2 = x2 @ w2
    return y2.reshape(lead + out_shape)


def dense(x: jax.Array, module: nnx.Module, name: str, cfg: ModelConfig, n_in: int = 1) -> jax.Array:
    """`project(x, module.<name>)`, honouring an int8 weight's per-output-channel scale.

    A weight quantized by `tformer.quantize_weights` is int8 next to a
    `<name>_scale` over its output axes; the scale multiplies the matmul's
    output (W = Q diag(s), so x W = (x Q) s), never a dequantized weight.
    """
    y = project(x, cast(getattr(module, name), cfg), n_in)
    scale = getattr(module, name + "_scale", None)
    return y if scale is None else y * cast(scale, cfg)


def dropout(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
    """Inverted dropout with an explicit key; identity when rng is None or rate is 0."""
    if rng is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def fold(rng: jax.Array | None, *data: int | jax.Array) -> jax.Array | None:
    """Derive an independent key per use site (layer, sublayer); None stays None."""
    for d in data:
        if rng is None:
            return None
        rng = jax.random.fold_in(rng, d)
    return rng


# ---------------------------------------------------------------------------
# Positions: tables are numpy constants computed once per shape (trace time),
# never per call.


@functools.cache
def sinusoid_table(max_len: int, dim: int) -> np.ndarray:
    """[max_len, dim] sin/cos table of Vaswani et al. (sin on even, cos on odd dims)."""
    pos = np.arange(max_len, dtype=np.float64)[:, None]
    inv = np.exp(-math.log(10000.0) * np.arange(0, dim, 2, dtype=np.float64) / dim)
    table = np.zeros((max_len, dim), np.float64)
    table[:, 0::2] = np.sin(pos * inv)
    table[:, 1::2] = np.cos(pos * inv)[:, : dim // 2]
    return table.astype(np.float32)


@functools.cache
def rope_table(max_len: int, head_dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin tables [max_len, head_dim // 2] for rotary embeddings."""
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    ang = np.arange(max_len, dtype=np.float64)[:, None] * inv[None, :]
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def apply_rope(x_bthd: jax.Array, positions_bt: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Rotate halves (the Llama / GPT-NeoX convention) by each token's position."""
    cos, sin = rope_table(cfg.max_len, x_bthd.shape[-1], cfg.rope_theta)
    cos = jnp.asarray(cos)[positions_bt][:, :, None, :]  # [B,T,1,D/2]
    sin = jnp.asarray(sin)[positions_bt][:, :, None, :]
    x = x_bthd.astype(jnp.float32)
    x1, x2 = jnp.split(x, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_bthd.dtype)


class Embedder(nnx.Module):
    """Token embedding (+ absolute positions) and the output projection (tied or not)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.table = param(rngs, (cfg.padded_vocab, cfg.d_model), ("vocab", "embed"), cfg)
        if cfg.positions == "learned":
            self.pos_table = param(rngs, (cfg.max_len, cfg.d_model), ("max_len", "embed"), cfg, std=0.01)
        if not cfg.tie_embeddings:
            self.head = param(rngs, (cfg.d_model, cfg.padded_vocab), ("embed", "vocab"), cfg)

    def encode(self, tokens_bt: jax.Array, positions_bt: jax.Array) -> jax.Array:
        cfg = self.cfg
        x_btd = cast(self.table, cfg)[tokens_bt]
        if cfg.scale_embeddings:
            x_btd = x_btd * jnp.asarray(math.sqrt(cfg.d_model), x_btd.dtype)
        if cfg.positions == "learned":
            x_btd = x_btd + cast(self.pos_table, cfg)[positions_bt]
        elif cfg.positions == "sinusoidal":
            table = jnp.asarray(sinusoid_table(cfg.max_len, cfg.d_model), x_btd.dtype)
            x_btd = x_btd + table[positions_bt]
        return constrain(x_btd, ("batch", "length", "act_embed"))

    def attend(self, x_btd: jax.Array) -> jax.Array:
        """The output projection (Flax's name for it): logits over the padded vocabulary.

        Padded ids get a huge negative logit.
        """
        cfg = self.cfg
        if cfg.tie_embeddings:
            logits = project(x_btd, cast(self.table, cfg), w_transposed=True)
        else:
            logits = project(x_btd, cast(self.head, cfg))
        logits = logits.astype(DTYPE[cfg.logits_dtype])
        if cfg.padded_vocab != cfg.vocab_size:
            real = jnp.arange(cfg.padded_vocab) < cfg.vocab_size
            logits = jnp.where(real, logits, jnp.asarray(-1e9, logits.dtype))
        return constrain(logits, ("batch", "length", "act_vocab"))


class Norm(nnx.Module):
    """LayerNorm or RMSNorm, statistics in fp32."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.scale = param(rngs, (cfg.d_model,), ("embed",), cfg, init="ones")
        if cfg.norm == "layernorm" and cfg.norm_bias:
            self.bias = param(rngs, (cfg.d_model,), ("embed",), cfg, init="zeros")

    def __call__(self, x: jax.Array) -> jax.Array:
        ln = self.cfg.norm == "layernorm"
        bias = getattr(self, "bias", None)
        return norms.normalize(x, self.scale[...], None if bias is None else bias[...], center=ln,
                               eps=self.cfg.norm_eps)


def rms_normalize(x: jax.Array, eps: float) -> jax.Array:
    """x / rms(x) over the last axis, in fp32 (no scale): QK-norm's per-head normalisation."""
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)).astype(x.dtype)


def gelu_exact(x: jax.Array) -> jax.Array:
    """x Phi(x) = x (1 + erf(x / sqrt 2)) / 2: the function `jax.nn.gelu(approximate=False)` computes.

    That one is written with erfc, which XLA:CPU expands into an exp and several selects per element; erf
    is one clamped polynomial. At nanoGPT's CPU shape (which uses this GELU) the erfc fusions were ~10% of
    the train step's thread time, and erf cuts the step's CPU time by ~4% (BENCHMARKS.md). Same values to
    float32 rounding (`tests/test_models.py`); in the far negative tail, where x Phi(x) is below 1e-6,
    the error is absolute, not relative.
    """
    return 0.5 * x * (1.0 + jax.lax.erf(x * jnp.asarray(0.5**0.5, x.dtype)))


_ACT = {
    "gelu": functools.partial(jax.nn.gelu, approximate=True),  # GPT-2's "gelu_new"
    "gelu_exact": gelu_exact,
    "relu": jax.nn.relu,
    "relu2": lambda x: jnp.square(jax.nn.relu(x)),  # ReLU squared (So et al., Primer)
    "silu": jax.nn.silu,
    "swiglu": jax.nn.silu,
    "geglu": functools.partial(jax.nn.gelu, approximate=True),
}


class MLP(nnx.Module):
    """Position-wise feed-forward: act(x W_in) W_out, or act(x W_gate) * (x W_in) W_out.

    With `cfg.mlp_rank` = r every matrix is stored factored, W = U V with
    U [in, r] and V [r, out] (`w_in_u`, `w_in_v`, ...), and applied as two
    thin matmuls: (d + f) r weights instead of d f per matrix.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, f = cfg.d_model, cfg.resolved_d_ff
        out_std = cfg.init_std / math.sqrt(2 * max(cfg.num_layers, 1))
        self._matrix(rngs, "w_in", (d, f), ("embed", "mlp"), cfg.init_std)
        if cfg.gated:
            self._matrix(rngs, "w_gate", (d, f), ("embed", "mlp"), cfg.init_std)
        self._matrix(rngs, "w_out", (f, d), ("mlp", "embed"), out_std)
        if cfg.use_bias:
            self.b_in = param(rngs, (f,), ("mlp",), cfg, init="zeros")
            self.b_out = param(rngs, (d,), ("embed",), cfg, init="zeros")

    def _matrix(self, rngs, name, shape, axes, std):
        cfg = self.cfg
        if cfg.mlp_rank is None:
            setattr(self, name, param(rngs, shape, axes, cfg, std=std))
            return
        # Factor std: std_u * std_v * sqrt(r) = std, so U V starts like the full matrix.
        r, fstd = cfg.mlp_rank, (std * std / cfg.mlp_rank) ** 0.25
        setattr(self, name + "_u", param(rngs, (shape[0], r), (axes[0], "mlp_rank"), cfg, std=fstd))
        setattr(self, name + "_v", param(rngs, (r, shape[1]), ("mlp_rank", axes[1]), cfg, std=fstd))

    def _apply(self, x, name):
        if self.cfg.mlp_rank is None:
            return dense(x, self, name, self.cfg)
        return dense(dense(x, self, name + "_u", self.cfg), self, name + "_v", self.cfg)

    def __call__(self, x_btd: jax.Array) -> jax.Array:
        cfg = self.cfg
        act = _ACT[cfg.activation]
        h_btf = self._apply(x_btd, "w_in")
        if cfg.use_bias:
            h_btf = h_btf + cast(self.b_in, cfg)
        if cfg.gated:
            h_btf = act(self._apply(x_btd, "w_gate")) * h_btf
        else:
            h_btf = act(h_btf)
        h_btf = constrain(h_btf, ("batch", "length", "act_mlp"))
        y_btd = self._apply(h_btf, "w_out")
        if cfg.use_bias:
            y_btd = y_btd + cast(self.b_out, cfg)
        return y_btd
