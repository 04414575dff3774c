"""Hugging Face interop: GPT-2 and Llama-family checkpoints <-> `DecoderLM`.

    model = tformer.hf.load_hf_checkpoint("path/to/checkpoint")  # config.json + *.safetensors
    tformer.hf.save_hf_checkpoint(model, "path/to/out")          # readable by transformers

Supported `model_type`s: "gpt2", "llama", and the Llama-shaped "mistral"
(sliding window -> `local_window`) and "qwen2" (q/k/v biases). Anything
tformer does not compute exactly (RoPE scaling, per-layer sliding windows, a
gate bias, ...) is refused with a ValueError naming the config field, rather
than loaded into a model that silently computes something else.

Layouts. HF GPT-2 uses `Conv1D`, whose weight is [in, out]; Llama-family
projections are `torch.nn.Linear`, whose weight is [out, in]. Heads are the
major factor of every fused "heads * head_dim" axis in both, which is also
tformer's (wq is [d, heads, head_dim]). HF Llama's `rotate_half` RoPE pairs
dim i with dim i + head_dim/2 and uses inv_freq = theta^(-2i/head_dim): the
same convention as `tformer.layers.apply_rope`, so q/k weights need no
permutation (the parity tests check this).

Tensors are read with the `safetensors` numpy API, lazily, one at a time, so
neither torch nor transformers is needed; `safetensors` is imported inside the
functions so that `import tformer` does not need it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from tformer import families
from tformer.config import ModelConfig
from tformer.layers import DTYPE
from tformer.models import DecoderLM

SUPPORTED_MODEL_TYPES = ("gpt2", "llama", "mistral", "qwen2")
_LLAMA_LIKE = ("llama", "mistral", "qwen2")

# ModelConfig fields a caller may choose when loading: they change how the
# model runs, not what it computes (max_len is checked against the weights).
OVERRIDABLE = (
    "dtype", "param_dtype", "logits_dtype", "attention", "scan_layers", "remat", "vocab_multiple",
    "max_len", "dropout", "attention_dropout", "pad_id", "bos_id", "eos_id", "init_std",
)

# GPT-2 `activation_function` -> ModelConfig.activation.
_GPT2_ACT = {"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "gelu": "gelu_exact", "relu": "relu",
             "silu": "silu", "swish": "silu"}
_GPT2_ACT_INV = {"gelu": "gelu_new", "gelu_exact": "gelu", "relu": "relu", "silu": "silu"}


# ---------------------------------------------------------------------------
# Config.


def _load_config_dict(hf_config) -> dict:
    """A config.json path or directory, a dict, or a transformers config -> dict."""
    if isinstance(hf_config, (str, Path)):
        p = Path(hf_config)
        p = p / "config.json" if p.is_dir() else p
        if not p.is_file():
            raise ValueError(f"no Hugging Face config at {p}: expected a config.json (from save_pretrained)")
        try:
            loaded = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{p} is not valid JSON ({e}); re-download or re-save the config") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"{p} holds a JSON {type(loaded).__name__}, not the config object")
        return loaded
    if hasattr(hf_config, "to_dict"):  # a transformers PretrainedConfig
        return hf_config.to_dict()
    if isinstance(hf_config, dict):
        return dict(hf_config)
    raise TypeError(f"hf_config must be a dict, a config.json path or a transformers config, got {type(hf_config)}")


def _unsupported(field: str, value: Any, why: str) -> ValueError:
    return ValueError(f"Hugging Face config field {field}={value!r} is not supported: {why}")


def _token_id(hf: dict, field: str, vocab: int, default: int) -> int:
    """An in-vocabulary token id from the HF config; the ModelConfig default otherwise."""
    v = hf.get(field)
    if isinstance(v, (list, tuple)):  # e.g. Llama 3 lists several EOS ids; tformer stops on one
        v = v[0] if v else None
    if v is None:
        return default
    if not 0 <= int(v) < vocab:
        warnings.warn(f"Hugging Face config {field}={v} is outside the vocabulary [0, {vocab}); "
                      f"using {default} instead (pass it explicitly to override)", stacklevel=3)
        return default
    return int(v)


def _rope_theta(hf: dict) -> float:
    """RoPE base from `rope_parameters` (transformers >= 5) or `rope_theta`; refuse scaled RoPE."""
    params = hf.get("rope_parameters")
    if params is not None:
        if not isinstance(params, dict) or ("rope_type" not in params and "rope_theta" not in params):
            raise _unsupported("rope_parameters", params, "per-layer-type RoPE is not implemented in tformer")
        kind = params.get("rope_type", params.get("type", "default"))
        if kind != "default":
            raise _unsupported("rope_parameters.rope_type", kind,
                               "tformer implements plain RoPE only (no linear/dynamic/yarn/llama3 scaling)")
        if params.get("partial_rotary_factor", 1.0) != 1.0:
            raise _unsupported("rope_parameters.partial_rotary_factor", params["partial_rotary_factor"],
                               "tformer rotates the whole head")
    scaling = hf.get("rope_scaling")
    if scaling is not None and scaling.get("rope_type", scaling.get("type", "default")) != "default":
        raise _unsupported("rope_scaling", scaling,
                           "tformer implements plain RoPE only (no linear/dynamic/yarn/llama3 scaling)")
    if hf.get("partial_rotary_factor", 1.0) != 1.0:
        raise _unsupported("partial_rotary_factor", hf["partial_rotary_factor"], "tformer rotates the whole head")
    theta = (params or {}).get("rope_theta", hf.get("rope_theta", 10000.0))
    return float(theta)


def _gpt2_config(hf: dict) -> dict:
    for field, ok in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                      ("add_cross_attention", False)):
        if hf.get(field, ok) != ok:
            raise _unsupported(field, hf[field], f"tformer's GPT-2 attention needs {field}={ok}")
    act = hf.get("activation_function", "gelu_new")
    if act not in _GPT2_ACT:
        raise _unsupported("activation_function", act, f"choose one of {sorted(_GPT2_ACT)}")
    d = hf["n_embd"]
    return dict(
        vocab_size=hf["vocab_size"], d_model=d, num_heads=hf["n_head"], num_layers=hf["n_layer"],
        d_ff=hf.get("n_inner") or 4 * d, max_len=hf["n_positions"], positions="learned", norm="layernorm",
        norm_eps=hf.get("layer_norm_epsilon", 1e-5), activation=_GPT2_ACT[act], use_bias=True,
        tie_embeddings=hf.get("tie_word_embeddings", True), dropout=hf.get("resid_pdrop", 0.0) or 0.0,
        attention_dropout=hf.get("attn_pdrop", 0.0) or 0.0, init_std=hf.get("initializer_range", 0.02),
    )


def _llama_config(hf: dict) -> dict:
    kind = hf["model_type"]
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise _unsupported("hidden_act", act, "tformer's gated MLP for Llama-family models is SwiGLU (silu)")
    layer_types = hf.get("layer_types") or []
    if any(t != "full_attention" for t in layer_types):
        raise _unsupported("layer_types", sorted(set(layer_types)),
                           "tformer uses one attention pattern for every layer (all 'full_attention')")
    if kind == "qwen2" and hf.get("use_sliding_window", False):
        raise _unsupported("use_sliding_window", True, "Qwen2's per-layer sliding windows are not implemented")
    window = None
    if kind == "mistral":
        # HF: key j visible to query i iff i - j < sliding_window; tformer's local_window is the same rule.
        window = hf.get("sliding_window")
    elif hf.get("sliding_window") is not None and kind != "qwen2":  # qwen2 keeps it unused unless enabled
        raise _unsupported("sliding_window", hf["sliding_window"], f"{kind} with a sliding window is not implemented")
    d, h = hf["hidden_size"], hf["num_attention_heads"]
    if kind == "llama":
        attn_bias, mlp_bias = hf.get("attention_bias", False), hf.get("mlp_bias", False)
    else:  # qwen2: q/k/v biases (no o bias); mistral: none. Absent biases load as zeros.
        attn_bias, mlp_bias = kind == "qwen2", False
    return dict(
        vocab_size=hf["vocab_size"], d_model=d, num_heads=h, num_kv_heads=hf.get("num_key_value_heads") or h,
        head_dim=hf.get("head_dim") or d // h, d_ff=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
        max_len=hf.get("max_position_embeddings", 2048), positions="rope", rope_theta=_rope_theta(hf),
        norm="rmsnorm", norm_eps=hf.get("rms_norm_eps", 1e-6), activation="swiglu",
        # One tformer flag covers every bias; biases the checkpoint lacks are loaded as zeros (exact).
        use_bias=bool(attn_bias or mlp_bias), tie_embeddings=hf.get("tie_word_embeddings", False),
        local_window=window, attention_dropout=hf.get("attention_dropout", 0.0) or 0.0,
        init_std=hf.get("initializer_range", 0.02),
    )


# Size fields that must be integers when present (a mistyped value fails naming the field).
_INT_FIELDS = ("vocab_size", "n_embd", "n_head", "n_layer", "n_positions", "n_inner", "hidden_size",
               "num_attention_heads", "num_key_value_heads", "num_hidden_layers", "intermediate_size", "head_dim",
               "max_position_embeddings")


def _check_int_fields(hf: dict) -> None:
    for field in _INT_FIELDS:
        value = hf.get(field)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"Hugging Face config field {field!r} must be an integer, got {value!r}")


def config_from_hf(hf_config: dict | str | Path | Any, **overrides: Any) -> ModelConfig:
    """`ModelConfig` equivalent to a Hugging Face GPT-2 or Llama-family config.

    hf_config: a config.json dict, its path (or its directory), or a transformers config.
    overrides: run-time choices from `OVERRIDABLE` (dtype, param_dtype, attention,
      scan_layers, ...). Architectural fields always come from the HF config.
    The vocabulary keeps tformer's `vocab_multiple` padding (padded ids are masked).
    """
    hf = _load_config_dict(hf_config)
    kind = hf.get("model_type")
    if kind not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"Hugging Face model_type={kind!r} is not supported; supported: {SUPPORTED_MODEL_TYPES}")
    bad = sorted(set(overrides) - set(OVERRIDABLE))
    if bad:
        raise ValueError(f"cannot override {bad} when loading a Hugging Face model: they come from config.json; "
                         f"overridable fields: {OVERRIDABLE}")
    _check_int_fields(hf)
    try:
        fields = _gpt2_config(hf) if kind == "gpt2" else _llama_config(hf)
    except KeyError as e:
        raise ValueError(f"Hugging Face config (model_type={kind!r}) is missing the field {e.args[0]!r}") from None
    v = fields["vocab_size"]
    eos = _token_id(hf, "eos_token_id", v, ModelConfig.eos_id)
    fields.update(bos_id=_token_id(hf, "bos_token_id", v, ModelConfig.bos_id), eos_id=eos,
                  pad_id=_token_id(hf, "pad_token_id", v, eos))  # no pad token: pad with EOS, as HF does
    fields.update(overrides)
    return ModelConfig(**fields)


def _family(cfg: ModelConfig) -> str:
    """The HF model_type that computes exactly what `cfg` does; ValueError naming the obstacle."""
    common = [("norm_placement", "pre"), ("final_norm", True), ("scale_embeddings", False), ("qk_norm", False)]
    for field, want in common:
        if getattr(cfg, field) != want:
            raise ValueError(f"ModelConfig.{field}={getattr(cfg, field)!r} has no Hugging Face GPT-2/Llama "
                             f"equivalent (needs {want!r})")
    if cfg.positions == "learned":
        problems = [("norm", cfg.norm == "layernorm"), ("activation", cfg.activation in _GPT2_ACT_INV),
                    ("use_bias", cfg.use_bias), ("norm_bias", cfg.norm_bias),
                    ("num_kv_heads", cfg.kv_heads == cfg.num_heads),
                    ("head_dim", cfg.resolved_head_dim * cfg.num_heads == cfg.d_model),
                    ("local_window", cfg.local_window is None)]
        kind = "gpt2"
    elif cfg.positions == "rope":
        problems = [("norm", cfg.norm == "rmsnorm"), ("activation", cfg.activation == "swiglu")]
        kind = "llama" if cfg.local_window is None else "mistral"
        if kind == "mistral":
            problems.append(("use_bias", not cfg.use_bias))
    else:
        raise ValueError(f"ModelConfig.positions={cfg.positions!r} has no Hugging Face GPT-2/Llama equivalent "
                         "(GPT-2 needs 'learned', Llama 'rope')")
    for field, ok in problems:
        if not ok:
            raise ValueError(f"ModelConfig.{field}={getattr(cfg, field)!r} does not fit a Hugging Face {kind} "
                             f"model (positions={cfg.positions!r}); no supported model_type computes it")
    return kind


def config_to_hf(cfg: ModelConfig) -> dict:
    """Hugging Face config.json dict computing what `cfg` computes (inverse of `config_from_hf`)."""
    kind = _family(cfg)
    ids = dict(bos_token_id=cfg.bos_id, eos_token_id=cfg.eos_id, pad_token_id=cfg.pad_id,
               tie_word_embeddings=cfg.tie_embeddings, vocab_size=cfg.vocab_size, dtype=cfg.param_dtype,
               initializer_range=cfg.init_std)
    if kind == "gpt2":
        return dict(
            model_type="gpt2", architectures=["GPT2LMHeadModel"], n_embd=cfg.d_model, n_head=cfg.num_heads,
            n_layer=cfg.num_layers, n_positions=cfg.max_len, n_inner=cfg.resolved_d_ff,
            activation_function=_GPT2_ACT_INV[cfg.activation], layer_norm_epsilon=cfg.norm_eps,
            resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.attention_dropout,
            scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False, reorder_and_upcast_attn=False, **ids,
        )
    out = dict(
        model_type=kind, architectures=["LlamaForCausalLM" if kind == "llama" else "MistralForCausalLM"],
        hidden_size=cfg.d_model, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.resolved_head_dim, intermediate_size=cfg.resolved_d_ff, num_hidden_layers=cfg.num_layers,
        max_position_embeddings=cfg.max_len, rms_norm_eps=cfg.norm_eps, hidden_act="silu",
        rope_theta=cfg.rope_theta, rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        attention_dropout=cfg.attention_dropout, **ids,
    )
    if kind == "llama":
        # tformer's MLP biases have no gate bias: it is written as zeros, which is exact.
        out.update(attention_bias=cfg.use_bias, mlp_bias=cfg.use_bias)
    else:
        out.update(sliding_window=cfg.local_window)
    return out


# ---------------------------------------------------------------------------
# The tensor-name tables: one per family, read by both load and save.


def _dims(cfg: ModelConfig, positions: int) -> dict[str, int]:
    """The sizes HF shapes are written in; `positions`: rows of GPT-2's wpe (n_positions, >= max_len)."""
    return dict(d=cfg.d_model, h=cfg.num_heads, kh=cfg.kv_heads, hd=cfg.resolved_head_dim, f=cfg.resolved_d_ff,
                v=cfg.vocab_size, p=positions)


@dataclasses.dataclass(frozen=True)
class _Tensor:
    """One HF tensor and the tformer parameter(s) it holds.

    hf: name below the base-model prefix ("{i}": the layer index).
    ours: parameter paths, space-separated (per layer: below blocks/layers);
      several are concatenated along HF's last axis (GPT-2's fused q | k | v);
      none: a tensor tformer lacks, written as zeros and loaded only when zero.
    shape: HF's shape in `_dims` sizes ("h*hd d"); why: the config fields that imply it.
    transpose: torch Linear's [out, in] against our [in, out].
    vocab: the first HF axis is the vocabulary (ours is padded to `padded_vocab`).
    rows: HF may hold more rows than ours (learned positions past max_len).
    optional: absent from a checkpoint means zeros (biases the architecture lacks).
    """

    hf: str
    ours: str
    shape: str
    why: str
    transpose: bool = False
    vocab: bool = False
    rows: bool = False
    optional: bool = False

    @property
    def paths(self) -> list[str]:
        return self.ours.split()

    def shape_of(self, dims: dict[str, int]) -> tuple[int, ...]:
        return tuple(math.prod(int(f) if f.isdigit() else dims[f] for f in axis.split("*"))
                     for axis in self.shape.split())


@dataclasses.dataclass(frozen=True)
class _Table:
    prefix: str  # the base model's ("transformer." / "model."), absent from bare base-model checkpoints
    layer: tuple[_Tensor, ...]  # per layer
    bias: tuple[_Tensor, ...]  # per layer, only when ModelConfig.use_bias
    top: tuple[_Tensor, ...]
    head: _Tensor  # the untied output projection (tied: the embedding table)


_T = _Tensor
# Conv1D weights are [in, out] like ours; c_attn's out axis is q | k | v, each heads-major.
_GPT2 = _Table("transformer.", layer=(
    _T("h.{i}.attn.c_attn.weight", "attn/wq attn/wk attn/wv", "d 3*d", "n_embd"),
    _T("h.{i}.attn.c_attn.bias", "attn/bq attn/bk attn/bv", "3*d", "n_embd"),
    _T("h.{i}.ln_1.weight", "attn_norm/scale", "d", "n_embd"),
    _T("h.{i}.ln_1.bias", "attn_norm/bias", "d", "n_embd"),
    _T("h.{i}.attn.c_proj.weight", "attn/wo", "d d", "n_embd"),
    _T("h.{i}.attn.c_proj.bias", "attn/bo", "d", "n_embd"),
    _T("h.{i}.ln_2.weight", "mlp_norm/scale", "d", "n_embd"),
    _T("h.{i}.ln_2.bias", "mlp_norm/bias", "d", "n_embd"),
    _T("h.{i}.mlp.c_fc.weight", "mlp/w_in", "d f", "n_embd, n_inner"),
    _T("h.{i}.mlp.c_fc.bias", "mlp/b_in", "f", "n_inner"),
    _T("h.{i}.mlp.c_proj.weight", "mlp/w_out", "f d", "n_inner, n_embd"),
    _T("h.{i}.mlp.c_proj.bias", "mlp/b_out", "d", "n_embd"),
), bias=(), top=(
    _T("wte.weight", "embed/table", "v d", "vocab_size, n_embd", vocab=True),
    _T("wpe.weight", "embed/pos_table", "p d", "n_positions, n_embd", rows=True),
    _T("ln_f.weight", "final_norm/scale", "d", "n_embd"),
    _T("ln_f.bias", "final_norm/bias", "d", "n_embd"),
), head=_T("lm_head.weight", "embed/head", "v d", "vocab_size, n_embd", transpose=True, vocab=True))

# torch Linear weights are [out, in]; the out axis is heads-major (view(..., heads, head_dim)).
_LLAMA = _Table("model.", layer=(
    _T("layers.{i}.self_attn.q_proj.weight", "attn/wq", "h*hd d", "num_attention_heads, head_dim", transpose=True),
    _T("layers.{i}.self_attn.k_proj.weight", "attn/wk", "kh*hd d", "num_key_value_heads, head_dim", transpose=True),
    _T("layers.{i}.self_attn.v_proj.weight", "attn/wv", "kh*hd d", "num_key_value_heads, head_dim", transpose=True),
    _T("layers.{i}.self_attn.o_proj.weight", "attn/wo", "d h*hd", "hidden_size, num_attention_heads", transpose=True),
    _T("layers.{i}.mlp.gate_proj.weight", "mlp/w_gate", "f d", "intermediate_size, hidden_size", transpose=True),
    _T("layers.{i}.mlp.up_proj.weight", "mlp/w_in", "f d", "intermediate_size, hidden_size", transpose=True),
    _T("layers.{i}.mlp.down_proj.weight", "mlp/w_out", "d f", "hidden_size, intermediate_size", transpose=True),
    _T("layers.{i}.input_layernorm.weight", "attn_norm/scale", "d", "hidden_size"),
    _T("layers.{i}.post_attention_layernorm.weight", "mlp_norm/scale", "d", "hidden_size"),
), bias=(  # Llama has none by default, Qwen2 only q/k/v: absent ones are zeros in tformer (exact)
    _T("layers.{i}.self_attn.q_proj.bias", "attn/bq", "h*hd", "attention_bias", optional=True),
    _T("layers.{i}.self_attn.k_proj.bias", "attn/bk", "kh*hd", "attention_bias", optional=True),
    _T("layers.{i}.self_attn.v_proj.bias", "attn/bv", "kh*hd", "attention_bias", optional=True),
    _T("layers.{i}.self_attn.o_proj.bias", "attn/bo", "d", "attention_bias", optional=True),
    _T("layers.{i}.mlp.up_proj.bias", "mlp/b_in", "f", "mlp_bias", optional=True),
    _T("layers.{i}.mlp.down_proj.bias", "mlp/b_out", "d", "mlp_bias", optional=True),
    _T("layers.{i}.mlp.gate_proj.bias", "", "f", "mlp_bias", optional=True),  # tformer has no gate bias
), top=(
    _T("embed_tokens.weight", "embed/table", "v d", "vocab_size, hidden_size", vocab=True),
    _T("norm.weight", "final_norm/scale", "d", "hidden_size"),
), head=_T("lm_head.weight", "embed/head", "v d", "vocab_size, hidden_size", transpose=True, vocab=True))

_TABLES = {"gpt2": _GPT2, "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA}
_LAYERS = "blocks/layers/"  # tformer's Stack keeps every layer's weights under one leading axis


def _entries(table: _Table, cfg: ModelConfig):
    """(HF name below the prefix, layer index or None, tensor) of every tensor `cfg` has, in reading order."""
    for i in range(cfg.num_layers):
        for t in table.layer + (table.bias if cfg.use_bias else ()):
            yield t.hf.format(i=i), i, t
    yield from ((t.hf, None, t) for t in table.top + (() if cfg.tie_embeddings else (table.head,)))


def _full_name(prefix: str, key: str) -> str:
    """The stored name of `key`: the output head sits beside the base model, not inside it."""
    return key if key.startswith("lm_head.") else prefix + key


# ---------------------------------------------------------------------------
# Reading tensors.

# Buffers some checkpoints carry that are not weights (recomputed by the model).
_IGNORED = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)|(layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq")


@contextlib.contextmanager
def _readable(f: Path):
    """A truncated, empty or otherwise unreadable safetensors file -> ValueError naming the file."""
    try:
        yield
    except ValueError:
        raise
    except Exception as e:
        if type(e).__name__ != "SafetensorError" and not isinstance(e, OSError):
            raise
        raise ValueError(f"{f}: not a readable safetensors file ({type(e).__name__}: {e}); it may be truncated: "
                         "re-download or re-save it") from None


class _Checkpoint:
    """The tensors of a local HF checkpoint directory, by name, read lazily and checked.

    Names are taken relative to the base-model `prefix` ("transformer." for
    GPT-2, "model." for Llama) so checkpoints of the bare base model load too.
    Every read is recorded, so `check_all_used` can name leftovers.
    """

    def __init__(self, directory: Path, prefix: str, stack: contextlib.ExitStack):
        import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy so bf16 checkpoints read)
        from safetensors import safe_open

        self.directory, self.prefix = directory, prefix
        index = directory / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index} has no 'weight_map' dict of tensor name -> shard file")
            self.source = index.name
            files = {name: directory / f for name, f in weight_map.items()}
            for f in sorted(set(files.values())):
                if not f.is_file():
                    raise ValueError(f"shard {f.name} listed in {index.name} is missing from {directory}")
        else:
            shards = sorted(directory.glob("*.safetensors"))
            if not shards:
                raise ValueError(f"no *.safetensors files in {directory} (a pytorch_model.bin checkpoint? "
                                 "re-save it with save_pretrained(..., safe_serialization=True))")
            self.source = ", ".join(f.name for f in shards)
            files = {}
            for f in shards:
                with _readable(f), safe_open(str(f), framework="np") as h:
                    for name in h.keys():
                        if name in files:
                            raise ValueError(f"tensor {name!r} is in both {files[name].name} and {f.name}; "
                                             "add a model.safetensors.index.json or remove the duplicate")
                        files[name] = f
        self._handles: dict[Path, Any] = {}
        self._open = lambda f: stack.enter_context(safe_open(str(f), framework="np"))
        # Canonical name (prefix stripped) -> (stored name, file).
        self.files: dict[str, tuple[str, Path]] = {}
        for name, f in files.items():
            key = name[len(prefix):] if name.startswith(prefix) else name
            if key in self.files:
                raise ValueError(f"tensor {name!r} and {self.files[key][0]!r} both map to {key!r}; "
                                 "the checkpoint mixes prefixed and bare names")
            self.files[key] = (name, f)
        self.used: set[str] = set()

    def has(self, key: str) -> bool:
        return key in self.files

    def get(self, key: str, shape: tuple[int, ...], why: str) -> np.ndarray:
        """Tensor `key` (prefix-free) with the `shape` the config implies (`why` names the fields)."""
        if key not in self.files:
            name = _full_name(self.prefix, key)
            raise ValueError(f"tensor {name!r} is missing from the checkpoint in {self.directory} "
                             f"(looked in {self.source}); the config expects it with shape {shape}")
        name, f = self.files[key]
        with _readable(f):
            if f not in self._handles:
                self._handles[f] = self._open(f)
            h = self._handles[f]
            if name not in h.keys():
                raise ValueError(f"tensor {name!r} is listed for {f.name} but not stored in it")
            x = h.get_tensor(name)
        if tuple(x.shape) != tuple(shape):
            raise ValueError(f"tensor {name!r} in {f.name} has shape {tuple(x.shape)}, but config.json "
                             f"({why}) implies {tuple(shape)}")
        self.used.add(key)
        return x

    def check_all_used(self):
        left = sorted(k for k in self.files if k not in self.used and not _IGNORED.fullmatch(k))
        if left:
            where = ", ".join(f"{self.files[k][0]!r} in {self.files[k][1].name}" for k in left[:5])
            more = f" and {len(left) - 5} more" if len(left) > 5 else ""
            raise ValueError(f"unexpected tensors in the checkpoint: {where}{more}; they have no place in a tformer "
                             "DecoderLM of this config (a different architecture or head?)")


def _pad_rows(x_vd: np.ndarray, rows: int) -> np.ndarray:
    """Zero rows up to tformer's padded vocabulary (the padded logits are masked anyway)."""
    return np.concatenate([x_vd, np.zeros((rows - x_vd.shape[0],) + x_vd.shape[1:], x_vd.dtype)])


def _read(ck: _Checkpoint, key: str, t: _Tensor, dims: dict[str, int], cfg: ModelConfig,
          want: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """Our parameter(s) {path: array} from HF tensor `key`, by its table entry `t`; `want`: our shapes."""
    shape = t.shape_of(dims)
    x = np.zeros(shape, np.float32) if t.optional and not ck.has(key) else ck.get(key, shape, t.why)
    if not t.ours:
        if np.any(x != 0):
            raise ValueError(f"tensor {ck.files[key][0]!r} is nonzero, but tformer's gated MLP has no gate bias "
                             "(mlp_bias=true checkpoints load only with a zero gate bias)")
        return {}
    if t.rows:
        if cfg.max_len > x.shape[0]:
            raise ValueError(f"max_len={cfg.max_len} exceeds the checkpoint's n_positions={x.shape[0]} "
                             "(learned positions cannot be extended)")
        x = x[: cfg.max_len]
    if t.vocab:  # zero rows up to tformer's padded vocabulary (the padded logits are masked anyway)
        x = np.concatenate([x, np.zeros((cfg.padded_vocab - x.shape[0],) + x.shape[1:], x.dtype)])
    x = x.T if t.transpose else x
    return {p: part.reshape(want[p]) for p, part in zip(t.paths, np.split(x, len(t.paths), axis=-1))}


def _params(ck: _Checkpoint, table: _Table, cfg: ModelConfig, dims: dict[str, int],
            want: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """Our flat parameters {path: array, layers stacked} from the checkpoint, by `table`; `want`: their shapes."""
    entries = list(_entries(table, cfg))
    mapped = {(_LAYERS if i is not None else "") + p for _, i, t in entries for p in t.paths}
    if mapped != want.keys():
        raise ValueError(f"tformer's DecoderLM parameters do not match the HF mapping at "
                         f"{sorted(mapped ^ want.keys())[:5]}; "
                         "tformer/hf.py needs updating for the model's current parameter layout")
    per_layer = {k.removeprefix(_LAYERS): shape[1:] for k, shape in want.items() if k.startswith(_LAYERS)}
    layers: list[dict[str, np.ndarray]] = [{} for _ in range(cfg.num_layers)]
    flat: dict[str, np.ndarray] = {}
    for key, i, t in entries:
        (flat if i is None else layers[i]).update(_read(ck, key, t, dims, cfg, want if i is None else per_layer))
    embed = next(t for t in table.top if t.ours == "embed/table")
    if cfg.tie_embeddings and ck.has(table.head.hf):  # some tied checkpoints store the shared matrix twice
        head = ck.get(table.head.hf, table.head.shape_of(dims), table.head.why)
        if not np.array_equal(head, ck.get(embed.hf, embed.shape_of(dims), embed.why)):
            raise ValueError("config.json says tie_word_embeddings=true but lm_head.weight differs from "
                             f"{embed.hf}; set tie_word_embeddings=false in config.json to load both")
    return flat | {_LAYERS + k: np.stack([layer[k] for layer in layers]) for k in layers[0]}


def load_hf_checkpoint(path: str | Path, *, dtype: str = "float32", param_dtype: str = "float32",
                       **overrides: Any) -> DecoderLM:
    """A `DecoderLM` holding the weights of a local Hugging Face checkpoint.

    path: a directory with config.json and model.safetensors, or sharded
      model-*.safetensors plus model.safetensors.index.json (as written by
      `save_pretrained`). GPT-2 and Llama-family (llama, mistral, qwen2) only.
    dtype / param_dtype: compute and storage dtypes ("float32", "bfloat16", ...).
    overrides: other run-time ModelConfig fields (see `OVERRIDABLE`), e.g.
      attention="xla", scan_layers=True, or a smaller max_len.
    The config is `model.cfg`. Raises ValueError naming the tensor and file
    for a missing, unexpected or wrongly shaped tensor.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise ValueError(f"{directory} is not a directory; expected a Hugging Face checkpoint directory "
                         "(config.json + *.safetensors)")
    hf = _load_config_dict(directory)
    cfg = config_from_hf(hf, dtype=dtype, param_dtype=param_dtype, **overrides)
    table = _TABLES[hf["model_type"]]
    # Build the model abstractly (no random init), then fill in the weights.
    abstract = nnx.eval_shape(lambda: DecoderLM(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    want = {k: tuple(x.shape) for k, x in traverse_util.flatten_dict(nnx.to_pure_dict(state), sep="/").items()}
    with contextlib.ExitStack() as stack:
        ck = _Checkpoint(directory, table.prefix, stack)
        params = _params(ck, table, cfg, _dims(cfg, hf.get("n_positions", cfg.max_len)), want)
        ck.check_all_used()
    dt = DTYPE[cfg.param_dtype]
    params = {k: jnp.asarray(x.astype(np.float32), dt) for k, x in params.items()}
    nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(params, sep="/"))
    return nnx.merge(graphdef, state)


# ---------------------------------------------------------------------------
# Writing.


def _write(t: _Tensor, xs: list[np.ndarray], dims: dict[str, int], dtype) -> np.ndarray:
    """HF tensor of table entry `t` from our parameter(s) `xs` (one layer): `_read` run backwards."""
    shape = t.shape_of(dims)
    if not t.ours:
        return np.zeros(shape, dtype)
    view = shape[::-1] if t.transpose else shape  # HF's tensor before its final transpose
    part = view[:-1] + (view[-1] // len(xs),)
    if t.vocab:  # drop the padded rows (the last axis once transposed)
        xs = [x[..., : dims["v"]] if t.transpose else x[: dims["v"]] for x in xs]
    x = np.concatenate([x.reshape(part) for x in xs], axis=-1)
    return x.T if t.transpose else x


def _tensors(table: _Table, cfg: ModelConfig, flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every HF tensor {stored name: array} from our flat parameters, by `table`."""
    dims, dtype = _dims(cfg, cfg.max_len), flat["embed/table"].dtype
    return {_full_name(table.prefix, key): _write(t, [flat[p] if i is None else flat[_LAYERS + p][i] for p in t.paths],
                                                  dims, dtype)
            for key, i, t in _entries(table, cfg)}


def save_hf_checkpoint(model: DecoderLM, path: str | Path) -> Path:
    """Write `model` as a Hugging Face checkpoint (config.json + model.safetensors) in directory `path`.

    GPT-2-shaped configs become "gpt2" (GPT2LMHeadModel), RoPE/RMSNorm/SwiGLU ones
    "llama" ("mistral" with a local_window); anything else raises ValueError
    naming the ModelConfig field. Weights keep their param dtype; padded
    vocabulary rows are dropped. `load_hf_checkpoint(path)` gives the model back.
    """
    from safetensors.numpy import save_file

    family = families.of_model(model)
    if not family.hf_causal_lm:
        raise ValueError(f"save_hf_checkpoint: the {family.name} family ({type(model).__name__}) has no Hugging Face "
                         f"causal-LM counterpart; export a DecoderLM (config.model.kind='lm')")
    cfg = model.cfg
    hf = config_to_hf(cfg)
    params = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    out = _tensors(_TABLES[hf["model_type"]], cfg, traverse_util.flatten_dict(params, sep="/"))
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
    # safetensors needs C-contiguous arrays; transposes and slices are views.
    save_file({k: np.ascontiguousarray(x) for k, x in out.items()}, str(directory / "model.safetensors"),
              metadata={"format": "pt"})
    return directory
