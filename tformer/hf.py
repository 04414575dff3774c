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
import functools
import json
import operator
import re
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

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


def config_from_hf(hf_config, **overrides) -> ModelConfig:
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
    common = [("norm_placement", "pre"), ("final_norm", True), ("scale_embeddings", False)]
    for field, want in common:
        if getattr(cfg, field) != want:
            raise ValueError(f"ModelConfig.{field}={getattr(cfg, field)!r} has no Hugging Face GPT-2/Llama "
                             f"equivalent (needs {want!r})")
    if cfg.positions == "learned":
        problems = [("norm", cfg.norm == "layernorm"), ("activation", cfg.activation in _GPT2_ACT_INV),
                    ("use_bias", cfg.use_bias), ("num_kv_heads", cfg.kv_heads == cfg.num_heads),
                    ("head_dim", cfg.head_dim_ * cfg.num_heads == cfg.d_model),
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
            n_layer=cfg.num_layers, n_positions=cfg.max_len, n_inner=cfg.d_ff_,
            activation_function=_GPT2_ACT_INV[cfg.activation], layer_norm_epsilon=cfg.norm_eps,
            resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.attention_dropout,
            scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False, reorder_and_upcast_attn=False, **ids,
        )
    out = dict(
        model_type=kind, architectures=["LlamaForCausalLM" if kind == "llama" else "MistralForCausalLM"],
        hidden_size=cfg.d_model, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.head_dim_, intermediate_size=cfg.d_ff_, num_hidden_layers=cfg.num_layers,
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
            name = key if key.startswith("lm_head.") else self.prefix + key
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


def _stack(layers: list[dict]) -> dict:
    """Per-layer param dicts -> one dict with a leading `layers` axis (tformer's Stack layout)."""
    return jax.tree.map(lambda *xs: np.stack(xs), *layers)


def _head_vd(ck: _Checkpoint, cfg: ModelConfig, embed_key: str, why: str) -> np.ndarray | None:
    """The output projection [V, d] for untied models; for tied ones check a stored copy and return None."""
    shape = (cfg.vocab_size, cfg.d_model)
    if not cfg.tie_embeddings:
        return ck.get("lm_head.weight", shape, why)
    if ck.has("lm_head.weight"):  # some tied checkpoints store the shared matrix twice
        head = ck.get("lm_head.weight", shape, why)
        if not np.array_equal(head, ck.get(embed_key, shape, why)):
            raise ValueError("config.json says tie_word_embeddings=true but lm_head.weight differs from "
                             f"{embed_key}; set tie_word_embeddings=false in config.json to load both")
    return None


def _layer_tensor(ck: _Checkpoint, prefix: str, name: str, shape: tuple[int, ...], why: str) -> np.ndarray:
    return ck.get(prefix + name, shape, why)


def _gpt2_params(ck: _Checkpoint, cfg: ModelConfig, n_positions: int) -> dict:
    d, h, hd, f, v = cfg.d_model, cfg.num_heads, cfg.head_dim_, cfg.d_ff_, cfg.vocab_size
    layers = []
    for i in range(cfg.num_layers):
        get = functools.partial(_layer_tensor, ck, f"h.{i}.")
        # Conv1D weights are [in, out]: c_attn's out axis is q | k | v, each heads-major.
        qkv_w = get("attn.c_attn.weight", (d, 3 * d), "n_embd")
        qkv_b = get("attn.c_attn.bias", (3 * d,), "n_embd")
        w_dhk = [w.reshape(d, h, hd) for w in np.split(qkv_w, 3, axis=1)]
        b_hk = [b.reshape(h, hd) for b in np.split(qkv_b, 3)]
        layers.append({
            "attn_norm": {"scale": get("ln_1.weight", (d,), "n_embd"), "bias": get("ln_1.bias", (d,), "n_embd")},
            "attn": {"wq": w_dhk[0], "wk": w_dhk[1], "wv": w_dhk[2], "bq": b_hk[0], "bk": b_hk[1], "bv": b_hk[2],
                     "wo": get("attn.c_proj.weight", (d, d), "n_embd").reshape(h, hd, d),
                     "bo": get("attn.c_proj.bias", (d,), "n_embd")},
            "mlp_norm": {"scale": get("ln_2.weight", (d,), "n_embd"), "bias": get("ln_2.bias", (d,), "n_embd")},
            "mlp": {"w_in": get("mlp.c_fc.weight", (d, f), "n_embd, n_inner"),
                    "b_in": get("mlp.c_fc.bias", (f,), "n_inner"),
                    "w_out": get("mlp.c_proj.weight", (f, d), "n_inner, n_embd"),
                    "b_out": get("mlp.c_proj.bias", (d,), "n_embd")},
        })
    wte_vd = ck.get("wte.weight", (v, d), "vocab_size, n_embd")
    wpe_pd = ck.get("wpe.weight", (n_positions, d), "n_positions, n_embd")
    if cfg.max_len > wpe_pd.shape[0]:
        raise ValueError(f"max_len={cfg.max_len} exceeds the checkpoint's n_positions={wpe_pd.shape[0]} "
                         "(learned positions cannot be extended)")
    embed = {"table": _pad_rows(wte_vd, cfg.padded_vocab), "pos_table": wpe_pd[: cfg.max_len]}
    head_vd = _head_vd(ck, cfg, "wte.weight", "vocab_size, n_embd")
    if head_vd is not None:
        embed["head"] = _pad_rows(head_vd, cfg.padded_vocab).T
    return {"embed": embed, "blocks": {"layers": _stack(layers)},
            "final_norm": {"scale": ck.get("ln_f.weight", (d,), "n_embd"), "bias": ck.get("ln_f.bias", (d,), "n_embd")}}


def _llama_params(ck: _Checkpoint, cfg: ModelConfig) -> dict:
    d, h, kh, hd, f, v = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.head_dim_, cfg.d_ff_, cfg.vocab_size
    layers = []
    for i in range(cfg.num_layers):
        p = f"layers.{i}."

        def get(name, shape, why, p=p):
            return ck.get(p + name, shape, why)

        def bias(name, shape, why, p=p):
            # Biases the architecture lacks (all of Llama's by default, Qwen2's o_proj) are zero in tformer.
            return ck.get(p + name, shape, why) if ck.has(p + name) else np.zeros(shape, np.float32)

        # torch Linear weights are [out, in]; the out axis is heads-major (view(..., heads, head_dim)).
        attn = {
            "wq": get("self_attn.q_proj.weight", (h * hd, d), "num_attention_heads, head_dim").T.reshape(d, h, hd),
            "wk": get("self_attn.k_proj.weight", (kh * hd, d), "num_key_value_heads, head_dim").T.reshape(d, kh, hd),
            "wv": get("self_attn.v_proj.weight", (kh * hd, d), "num_key_value_heads, head_dim").T.reshape(d, kh, hd),
            "wo": get("self_attn.o_proj.weight", (d, h * hd), "hidden_size, num_attention_heads").T.reshape(h, hd, d),
        }
        mlp = {
            "w_gate": get("mlp.gate_proj.weight", (f, d), "intermediate_size, hidden_size").T,
            "w_in": get("mlp.up_proj.weight", (f, d), "intermediate_size, hidden_size").T,
            "w_out": get("mlp.down_proj.weight", (d, f), "hidden_size, intermediate_size").T,
        }
        if cfg.use_bias:
            attn.update(bq=bias("self_attn.q_proj.bias", (h * hd,), "attention_bias").reshape(h, hd),
                        bk=bias("self_attn.k_proj.bias", (kh * hd,), "attention_bias").reshape(kh, hd),
                        bv=bias("self_attn.v_proj.bias", (kh * hd,), "attention_bias").reshape(kh, hd),
                        bo=bias("self_attn.o_proj.bias", (d,), "attention_bias"))
            mlp.update(b_in=bias("mlp.up_proj.bias", (f,), "mlp_bias"),
                       b_out=bias("mlp.down_proj.bias", (d,), "mlp_bias"))
            gate_b = bias("mlp.gate_proj.bias", (f,), "mlp_bias")
            if np.any(gate_b != 0):
                raise ValueError(f"tensor {ck.files[p + 'mlp.gate_proj.bias'][0]!r} is nonzero, but tformer's gated "
                                 "MLP has no gate bias (mlp_bias=true checkpoints load only with a zero gate bias)")
        layers.append({"attn_norm": {"scale": get("input_layernorm.weight", (d,), "hidden_size")}, "attn": attn,
                       "mlp_norm": {"scale": get("post_attention_layernorm.weight", (d,), "hidden_size")}, "mlp": mlp})
    embed = {"table": _pad_rows(ck.get("embed_tokens.weight", (v, d), "vocab_size, hidden_size"), cfg.padded_vocab)}
    head_vd = _head_vd(ck, cfg, "embed_tokens.weight", "vocab_size, hidden_size")
    if head_vd is not None:
        embed["head"] = _pad_rows(head_vd, cfg.padded_vocab).T
    return {"embed": embed, "blocks": {"layers": _stack(layers)},
            "final_norm": {"scale": ck.get("norm.weight", (d,), "hidden_size")}}


def _flat(tree: dict) -> dict[str, Any]:
    return {"/".join(str(getattr(k, "key", k)) for k in path): x
            for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def load_hf_checkpoint(path, *, dtype: str = "float32", param_dtype: str = "float32", **overrides) -> DecoderLM:
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
    with contextlib.ExitStack() as stack:
        if hf["model_type"] == "gpt2":
            ck = _Checkpoint(directory, "transformer.", stack)
            params = _gpt2_params(ck, cfg, hf["n_positions"])
        else:
            ck = _Checkpoint(directory, "model.", stack)
            params = _llama_params(ck, cfg)
        ck.check_all_used()

    # Build the model abstractly (no random init), then fill in the weights.
    abstract = nnx.eval_shape(lambda: DecoderLM(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    want, got = _flat(nnx.to_pure_dict(state)), _flat(params)
    if want.keys() != got.keys() or any(tuple(want[k].shape) != tuple(got[k].shape) for k in want):
        diff = sorted((want.keys() ^ got.keys()) | {k for k in want.keys() & got.keys()
                                                    if tuple(want[k].shape) != tuple(got[k].shape)})
        raise ValueError(f"tformer's DecoderLM parameters do not match the HF mapping at {diff[:5]}; "
                         "tformer/hf.py needs updating for the model's current parameter layout")
    dt = DTYPE[cfg.param_dtype]
    nnx.replace_by_pure_dict(state, jax.tree.map(lambda x: jnp.asarray(x.astype(np.float32), dt), params))
    return nnx.merge(graphdef, state)


# ---------------------------------------------------------------------------
# Writing.


def _to_numpy(model) -> dict:
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def _gpt2_tensors(cfg: ModelConfig, p: dict) -> dict[str, np.ndarray]:
    """GPT2LMHeadModel tensors (Conv1D weights are [in, out], as ours) from our parameter tree `p`."""
    d, v = cfg.d_model, cfg.vocab_size
    lay, emb = p["blocks"]["layers"], p["embed"]
    out: dict[str, np.ndarray] = {}
    pre = "transformer."
    for i in range(cfg.num_layers):
        layer = operator.itemgetter(i)
        a, m, n1, n2 = (jax.tree.map(layer, lay[k]) for k in ("attn", "mlp", "attn_norm", "mlp_norm"))
        out |= {
            f"{pre}h.{i}.ln_1.weight": n1["scale"], f"{pre}h.{i}.ln_1.bias": n1["bias"],
            f"{pre}h.{i}.attn.c_attn.weight": np.concatenate([a[k].reshape(d, d) for k in ("wq", "wk", "wv")], 1),
            f"{pre}h.{i}.attn.c_attn.bias": np.concatenate([a[k].reshape(d) for k in ("bq", "bk", "bv")]),
            f"{pre}h.{i}.attn.c_proj.weight": a["wo"].reshape(d, d), f"{pre}h.{i}.attn.c_proj.bias": a["bo"],
            f"{pre}h.{i}.ln_2.weight": n2["scale"], f"{pre}h.{i}.ln_2.bias": n2["bias"],
            f"{pre}h.{i}.mlp.c_fc.weight": m["w_in"], f"{pre}h.{i}.mlp.c_fc.bias": m["b_in"],
            f"{pre}h.{i}.mlp.c_proj.weight": m["w_out"], f"{pre}h.{i}.mlp.c_proj.bias": m["b_out"],
        }
    out |= {f"{pre}wte.weight": emb["table"][:v], f"{pre}wpe.weight": emb["pos_table"],
            f"{pre}ln_f.weight": p["final_norm"]["scale"], f"{pre}ln_f.bias": p["final_norm"]["bias"]}
    return out


def _llama_tensors(cfg: ModelConfig, p: dict) -> dict[str, np.ndarray]:
    """LlamaForCausalLM tensors (nn.Linear weights are [out, in]) from our parameter tree `p`."""
    d, h, kh, hd, v = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.head_dim_, cfg.vocab_size
    lay, emb = p["blocks"]["layers"], p["embed"]
    out: dict[str, np.ndarray] = {}
    pre = "model."
    for i in range(cfg.num_layers):
        a, m = jax.tree.map(operator.itemgetter(i), lay["attn"]), jax.tree.map(operator.itemgetter(i), lay["mlp"])
        q = f"{pre}layers.{i}."
        out |= {
            q + "input_layernorm.weight": lay["attn_norm"]["scale"][i],
            q + "post_attention_layernorm.weight": lay["mlp_norm"]["scale"][i],
            q + "self_attn.q_proj.weight": a["wq"].reshape(d, h * hd).T,
            q + "self_attn.k_proj.weight": a["wk"].reshape(d, kh * hd).T,
            q + "self_attn.v_proj.weight": a["wv"].reshape(d, kh * hd).T,
            q + "self_attn.o_proj.weight": a["wo"].reshape(h * hd, d).T,
            q + "mlp.gate_proj.weight": m["w_gate"].T, q + "mlp.up_proj.weight": m["w_in"].T,
            q + "mlp.down_proj.weight": m["w_out"].T,
        }
        if cfg.use_bias:
            out |= {q + "self_attn.q_proj.bias": a["bq"].reshape(-1),
                    q + "self_attn.k_proj.bias": a["bk"].reshape(-1),
                    q + "self_attn.v_proj.bias": a["bv"].reshape(-1), q + "self_attn.o_proj.bias": a["bo"],
                    q + "mlp.gate_proj.bias": np.zeros_like(m["b_in"]), q + "mlp.up_proj.bias": m["b_in"],
                    q + "mlp.down_proj.bias": m["b_out"]}
    out |= {f"{pre}embed_tokens.weight": emb["table"][:v], f"{pre}norm.weight": p["final_norm"]["scale"]}
    return out


def save_hf_checkpoint(model: DecoderLM, path) -> Path:
    """Write `model` as a Hugging Face checkpoint (config.json + model.safetensors) in directory `path`.

    GPT-2-shaped configs become "gpt2" (GPT2LMHeadModel), RoPE/RMSNorm/SwiGLU ones
    "llama" ("mistral" with a local_window); anything else raises ValueError
    naming the ModelConfig field. Weights keep their param dtype; padded
    vocabulary rows are dropped. `load_hf_checkpoint(path)` gives the model back.
    """
    from safetensors.numpy import save_file

    if not isinstance(model, DecoderLM):
        raise ValueError(f"save_hf_checkpoint needs a DecoderLM, got {type(model).__name__}")
    cfg = model.cfg
    hf = config_to_hf(cfg)
    p = _to_numpy(model)
    out = _gpt2_tensors(cfg, p) if hf["model_type"] == "gpt2" else _llama_tensors(cfg, p)
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = p["embed"]["head"][:, :cfg.vocab_size].T
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
    # safetensors needs C-contiguous arrays; transposes and slices are views.
    save_file({k: np.ascontiguousarray(x) for k, x in out.items()}, str(directory / "model.safetensors"),
              metadata={"format": "pt"})
    return directory
