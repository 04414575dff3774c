"""LoRA (Hu et al. 2021): train a low-rank update of chosen weight matrices, the rest frozen.

tformer's projections are einsum parameters (`wq` [d, heads, head_dim],
`wo` [heads, head_dim, d], `w_in` [d, f], ...), not `nnx.Linear`s, so the
adapters live next to the parameter tree rather than as `nnx.LoRA` modules
wrapping layers. The arithmetic is `nnx.LoRA`'s: for a weight W whose input
axes flatten to `in` and output axes to `out`,

    y = x W + scale * (x A) B,   A [in, r] (random), B [r, out] (zeros),

which is the forward of W + scale * A B, so the model runs on the merged
weight `merged(params)` (a test checks this against `nnx.LoRA` itself).
`scale` = alpha / rank, as in the paper and PEFT. B starts at zero: step 0
computes exactly what the base model computes.

A LoRA parameter tree is `{"base": <the model's params>, "lora": <adapters>,
"scale": <alpha / r, a float32 scalar>}`; the adapters mirror the paths of the
weights they adapt, each `{"a": A, "b": B}` with the weight's leading (layers)
axes in front. `trainable` / `with_trainable`
pick the leaves the optimizer sees (the adapters), so the base weights are
never updated (bit-identical after training) and have no optimizer state.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

# Weight name -> number of trailing input axes; the remaining trailing axes are the output.
_IN_AXES = {"wq": 1, "wk": 1, "wv": 1, "wo": 2, "w_in": 1, "w_gate": 1, "w_out": 1}
_CORE_NDIM = {"wq": 3, "wk": 3, "wv": 3, "wo": 3, "w_in": 2, "w_gate": 2, "w_out": 2}
# Shorthands accepted in `targets`.
GROUPS = {"attn": ("wq", "wk", "wv", "wo"), "mlp": ("w_in", "w_gate", "w_out")}
DEFAULT_TARGETS = "attn,mlp"


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """rank r; alpha (scale = alpha / r; 0 means alpha = r, scale 1); targets: weight names or groups."""

    rank: int
    alpha: float = 0.0
    targets: str = DEFAULT_TARGETS

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"config.train.lora_rank must be >= 1 to train adapters (0: off), got {self.rank}")
        if not self.alpha >= 0:
            raise ValueError(f"config.train.lora_alpha must be >= 0 (0: = lora_rank), got {self.alpha}")
        self.names()

    @property
    def scale(self) -> float:
        return (self.alpha or self.rank) / self.rank

    def names(self) -> tuple[str, ...]:
        """The weight names `targets` asks for, groups expanded."""
        out = []
        for t in (s.strip() for s in self.targets.split(",")):
            if t in GROUPS:
                out += GROUPS[t]
            elif t in _IN_AXES:
                out.append(t)
            else:
                raise ValueError(f"config.train.lora_targets: unknown {t!r}; use weight names "
                                 f"{sorted(_IN_AXES)} or groups {sorted(GROUPS)}, comma-separated")
        return tuple(dict.fromkeys(out))


def is_lora(params: object) -> bool:
    return isinstance(params, dict) and set(params) == {"base", "lora", "scale"}


def lora_params(base: dict, lcfg: LoraConfig, key: jax.Array) -> dict:
    """The LoRA tree over `base` (the same arrays), with fresh adapters."""
    return {"base": base, "lora": init_adapters(base, lcfg, key), "scale": jnp.float32(lcfg.scale)}


def abstract_lora_params(base: dict, lcfg: LoraConfig) -> dict:
    """`lora_params` as ShapeDtypeStructs (allocates nothing)."""
    return {"base": base, "lora": adapter_shapes(base, lcfg), "scale": jax.ShapeDtypeStruct((), jnp.float32)}


def _target_paths(base: dict, lcfg: LoraConfig) -> list[tuple[str, ...]]:
    """Paths (dict keys) of the weights to adapt; a target naming no weight fails."""
    wanted, found = lcfg.names(), []

    def walk(tree: dict, path: tuple[str, ...]) -> None:
        for k, v in tree.items():
            if isinstance(v, dict):
                walk(v, path + (k,))
            elif k in wanted and getattr(v, "ndim", 0) >= _CORE_NDIM[k]:
                found.append(path + (k,))

    walk(base, ())
    explicit = [t.strip() for t in lcfg.targets.split(",") if t.strip() not in GROUPS]
    for name in explicit:
        if not any(p[-1] == name for p in found):
            raise ValueError(f"config.train.lora_targets: this model has no {name!r} weight to adapt")
    if not found:
        raise ValueError(f"config.train.lora_targets={lcfg.targets!r} matches no weight of this model")
    return found


def _get(tree: dict, path):
    for k in path:
        tree = tree[k]
    return tree


def _set(tree: dict, path, value) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def _factor_shapes(w_shape, name: str, rank: int):
    """(A shape, B shape): the weight's leading axes, then [in, r] and [r, out]."""
    lead = len(w_shape) - _CORE_NDIM[name]
    core = w_shape[lead:]
    n_in = _IN_AXES[name]
    d_in, d_out = math.prod(core[:n_in]), math.prod(core[n_in:])
    return tuple(w_shape[:lead]) + (d_in, rank), tuple(w_shape[:lead]) + (rank, d_out)


def adapter_shapes(base: dict, lcfg: LoraConfig) -> dict:
    """The adapters' ShapeDtypeStructs for a base parameter tree (arrays or shapes)."""
    out: dict = {}
    for path in _target_paths(base, lcfg):
        w = _get(base, path)
        a, b = _factor_shapes(tuple(w.shape), path[-1], lcfg.rank)
        _set(out, path, {"a": jax.ShapeDtypeStruct(a, w.dtype), "b": jax.ShapeDtypeStruct(b, w.dtype)})
    return out


def init_adapters(base: dict, lcfg: LoraConfig, key: jax.Array) -> dict:
    """A with nnx.LoRA's default initializer (He uniform over `in`), B zeros: the update starts at zero."""
    shapes = adapter_shapes(base, lcfg)
    keys = iter(jax.random.split(key, len(jax.tree.leaves(shapes))))

    def make(path: tuple[jax.tree_util.DictKey, ...], s: jax.ShapeDtypeStruct) -> jax.Array:
        k = next(keys)
        if path[-1].key == "b":
            return jnp.zeros(s.shape, s.dtype)
        layers = tuple(range(len(s.shape) - 2))  # stacked layers: fan-in is `in` alone
        return jax.nn.initializers.he_uniform(in_axis=-2, out_axis=-1, batch_axis=layers)(k, s.shape, s.dtype)

    return jax.tree_util.tree_map_with_path(make, shapes)


def delta(w_shape: tuple[int, ...], a: jax.Array, b: jax.Array, scale: float):
    """scale * A B, reshaped to the weight's shape."""
    ab = jnp.einsum("...ir,...ro->...io", a, b)
    return (scale * ab).reshape(w_shape)


def merged(params: dict) -> dict:
    """The model's parameter tree with every adapter folded in (W + scale A B); a plain tree passes through."""
    if not is_lora(params):
        return params
    base, scale = params["base"], params["scale"]
    out = jax.tree.map(lambda x: x, base)  # a new tree sharing the leaves

    def fold(tree: dict, path: tuple[str, ...]) -> None:
        for k, v in tree.items():
            if isinstance(v, dict) and set(v) == {"a", "b"}:
                w = _get(base, path + (k,))
                _set(out, path + (k,), w + delta(w.shape, v["a"], v["b"], scale).astype(w.dtype))
            else:
                fold(v, path + (k,))

    fold(params["lora"], ())
    return out


def trainable(params: dict):
    """What the optimizer updates: the adapters of a LoRA tree, else every parameter."""
    return params["lora"] if is_lora(params) else params


def with_trainable(params: dict, new: dict):
    """`params` with its trainable part replaced by `new` (the base weights are the same arrays)."""
    return {**params, "lora": new} if is_lora(params) else new
