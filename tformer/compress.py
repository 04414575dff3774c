"""Smaller models after training: int8 weights and low-rank MLP matrices.

    qmodel = tformer.quantize_weights(model, "int8")      # for generate / beam_search / sequence_logprob
    small = tformer.compress_mlp(model, rank=96, method="svd")  # a model with cfg.mlp_rank = 96

Both return a new model and leave the argument untouched. The quantized model
is for inference (its int8 weights are not trainable); the compressed one is
an ordinary model with factored MLP matrices, fit for inference or fine-tuning.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tformer.attention import Attention
from tformer.layers import MLP
from tformer.quant import quantize_int8

# Projection weights and how many of their leading (unstacked) axes are inputs.
_ATTENTION_WEIGHTS = {"wq": 1, "wk": 1, "wv": 1, "wo": 2}
_MLP_MATRICES = ("w_in", "w_gate", "w_out")
_METHODS = ("svd", "random")


def _copy(model):
    return nnx.merge(*nnx.split(model))


def _modules(model, cls):
    return [node for _, node in nnx.iter_graph(model) if isinstance(node, cls)]


def _axes(var: nnx.Variable) -> tuple[tuple, int]:
    """(logical axes of the variable, how many leading `layers` axes it has from stacking)."""
    axes = tuple(var.get_metadata().get("out_sharding") or ())
    lead = 0
    while lead < len(axes) and axes[lead] == "layers":
        lead += 1
    return axes, lead


def _param(value, axes) -> nnx.Param:
    return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=False)


def _quantize_param(module: nnx.Module, name: str, n_in: int) -> None:
    """module.<name> -> int8 values; module.<name>_scale: per output channel (the input axes reduced)."""
    var = getattr(module, name)
    (axes, lead), w = _axes(var), var[...]
    values, scale = quantize_int8(w, axes=tuple(range(lead, lead + n_in)), scale_dtype=w.dtype)
    setattr(module, name, _param(values, axes))
    setattr(module, name + "_scale", _param(scale, axes[:lead] + axes[lead + n_in:]))


def quantize_weights(model: nnx.Module, dtype: str = "int8") -> nnx.Module:
    """A copy of `model` whose attention projections and MLP matrices are int8 with per-output-channel scales.

    W[in, out] ~= Q[in, out] * s[out] with s = max_in |W| / 127 (symmetric):
    parameter bytes of those matrices drop ~4x vs fp32, and the layers multiply
    the matmul output by s (tformer.layers.dense). Embeddings, norms, biases
    and Linformer projections stay in `param_dtype`. Inference only.
    """
    if dtype != "int8":
        raise ValueError(f"quantize_weights: dtype must be 'int8', got {dtype!r}")
    model = _copy(model)
    for attn in _modules(model, Attention):
        if hasattr(attn, "wq_scale"):
            raise ValueError("quantize_weights: the model's weights are already int8")
        for name, n_in in _ATTENTION_WEIGHTS.items():
            _quantize_param(attn, name, n_in)
    for mlp in _modules(model, MLP):
        for name in [n for n in vars(mlp) if n.startswith(_MLP_MATRICES) and not n.endswith("_scale")]:
            if isinstance(getattr(mlp, name), nnx.Param):
                _quantize_param(mlp, name, 1)
    return model


def _factor(w: np.ndarray, rank: int, method: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """U [.., in, rank], V [.., rank, out] with U V ~= w (exact at rank = min(in, out))."""
    if method == "svd":  # the best rank-r approximation (Eckart-Young), split sqrt(S) each side
        u, s, vt = np.linalg.svd(w, full_matrices=False)
        root = np.sqrt(s[..., :rank])
        return u[..., :rank] * root[..., None, :], root[..., :, None] * vt[..., :rank, :]
    # Randomized range finder (Halko et al. 2011): Q spans w's range seen through a Gaussian sketch.
    sketch = rng.standard_normal(w.shape[:-2] + (w.shape[-1], rank))
    q, _ = np.linalg.qr(w @ sketch)
    return q, np.swapaxes(q, -1, -2) @ w


def compress_mlp(model: nnx.Module, rank: int, method: str = "svd", seed: int = 0) -> nnx.Module:
    """A copy of `model` with every MLP matrix factored at `rank` (its config gets `mlp_rank=rank`).

    method "svd": truncated SVD (the best rank-`rank` approximation of each
    matrix); "random": a Gaussian random projection of the column space
    (cheaper to compute, worse at equal rank; `seed` picks the sketch). Both
    reproduce the model exactly at rank = min(d_model, d_ff).
    """
    cfg = model.cfg
    top = min(cfg.d_model, cfg.resolved_d_ff)
    if not isinstance(rank, (int, np.integer)) or not 1 <= rank <= top:
        raise ValueError(f"compress_mlp: rank must be an int in [1, min(d_model, d_ff) = {top}], got {rank!r}")
    if method not in _METHODS:
        raise ValueError(f"compress_mlp: method must be one of {_METHODS}, got {method!r}")
    if cfg.mlp_rank is not None:
        raise ValueError(f"compress_mlp: the model's MLP is already factored (ModelConfig.mlp_rank={cfg.mlp_rank})")
    new_cfg = cfg.replace(mlp_rank=int(rank))
    model = _copy(model)
    rng = np.random.default_rng(seed)
    for mlp in _modules(model, MLP):
        if hasattr(mlp, "w_in_scale"):
            raise ValueError("compress_mlp: compress before quantize_weights, not after")
        for name in _MLP_MATRICES:
            if not hasattr(mlp, name):
                continue
            var = getattr(mlp, name)
            (axes, lead), w = _axes(var), var[...]
            u, v = _factor(np.asarray(w, np.float64), int(rank), method, rng)
            delattr(mlp, name)
            setattr(mlp, name + "_u", _param(u.astype(w.dtype), axes[:lead] + (axes[lead], "mlp_rank")))
            setattr(mlp, name + "_v", _param(v.astype(w.dtype), axes[:lead] + ("mlp_rank", axes[lead + 1])))
    return _set_config(model, cfg, new_cfg)


def _set_config(model, old, new):
    for _, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Module) and getattr(node, "cfg", None) == old:
            node.cfg = new
    return model


def with_config(model: nnx.Module, **changes: Any) -> nnx.Module:
    """A copy of `model` whose ModelConfig has `changes`, for fields that leave the parameters as they are.

    E.g. `with_config(model, kv_cache_dtype="int8")` decodes a trained model
    with an int8 cache, `with_config(model, attention_topk=8)` tries top-k
    attention on it. Fields that change parameter shapes raise ValueError.
    """
    new_cfg = model.cfg.replace(**changes)
    before = jax.tree.map(jnp.shape, nnx.state(nnx.eval_shape(lambda: type(model)(model.cfg, rngs=nnx.Rngs(0)))))
    after = jax.tree.map(jnp.shape, nnx.state(nnx.eval_shape(lambda: type(model)(new_cfg, rngs=nnx.Rngs(0)))))
    if before != after:
        raise ValueError(f"with_config: {sorted(changes)} change the parameters; build and train a new model instead")
    return _set_config(_copy(model), model.cfg, new_cfg)


def param_bytes(model: nnx.Module) -> int:
    """Bytes of every parameter (int8 values and their scales included)."""
    leaves = [v[...] for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param))]
    return sum(math.prod(x.shape) * x.dtype.itemsize for x in leaves)
