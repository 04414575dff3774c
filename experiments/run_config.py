"""A run's config: the command line's overrides checked, every section validated, turned into dataclasses.

`validate` runs before anything else (no data, no devices); `model_config` /
`optim_config` build the library's dataclasses from the checked sections.
An error names the field (`config.<section>.<field>`) and the fix.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import sys

import jax
from absl import flags
from ml_collections import ConfigDict

from experiments.tokenizers import Tokenizer
from tformer import families, sharding, training

# Runner fields that must be >= the bound (an int or float); `eval_batch_size` 0 means `batch_size`.
_AT_LEAST = {
    "train": dict(batch_size=1, num_steps=1, seed=0, log_every=1, eval_every=1, eval_batches=1, eval_batch_size=0,
                  checkpoint_every=1, keep_checkpoints=1, num_samples=0, sample_tokens=1, temperature=0.0,
                  top_k=0, beam_size=1, eval_decode_examples=1, time_budget_s=0.0, time_budget_margin_s=0.0),
    "data": dict(vocab_size=2, seq_len=1, src_len=1, tgt_len=1, max_bytes=0, num_train=1, num_valid=1),
}
_CHOICES = {("data", "tokenizer"): ("byte", "sentencepiece", "hf")}
SECTIONS = ("model", "optim", "data", "train", "mesh")


def to_dataclass(cls, section: dict, name: str):
    """Build a config dataclass; unknown fields fail naming the field and the valid ones."""
    _check_fields(section, name, {f.name for f in dataclasses.fields(cls)})
    try:
        return cls(**section)
    except (TypeError, ValueError) as e:
        raise ValueError(f"config.{name}: {e}") from None


def _check_fields(section, name: str, valid: set[str]) -> None:
    unknown = sorted(set(section.keys()) - valid)
    if unknown:
        raise ValueError(f"config.{name}: unknown field(s) {unknown}; valid fields are {sorted(valid)}")


def family_of(config: ConfigDict) -> families.Family:
    """The model family `config.model.kind` names (lm, seq2seq, rnn_lm, rnn_seq2seq)."""
    name = config.model.get("kind")
    if name not in families.FAMILIES:
        raise ValueError(f"config.model.kind: unknown {name!r}; choose one of {sorted(families.FAMILIES)}")
    return families.FAMILIES[name]


def validate(config: ConfigDict) -> None:
    """Every section present with known fields, and every runner field in range: before anything runs."""
    from experiments.configs.base import TOKENIZER_FIELDS, base_config

    ref = base_config()
    for name in SECTIONS:
        if name not in config:
            raise ValueError(f"config.{name}: section missing; start from experiments/configs/base.py")
    family = family_of(config)
    for name in SECTIONS:
        valid = set(ref[name].keys())
        if name == "model":  # the family's own config dataclass (the RNNs have theirs)
            valid = {f.name for f in dataclasses.fields(family.config_class)} - set(TOKENIZER_FIELDS) | {"kind"}
        _check_fields(config[name], name, valid)
    for section, bounds in _AT_LEAST.items():
        for field, low in bounds.items():
            value = config[section][field]
            if not value >= low:  # `not >=` also rejects NaN
                raise ValueError(f"config.{section}.{field} must be >= {low}, got {value}")
    for (section, field), choices in _CHOICES.items():
        if config[section][field] not in choices:
            raise ValueError(f"config.{section}.{field}: unknown {config[section][field]!r}; choose one of {choices}")
    if not 0.0 <= config.data.validation_fraction < 1.0:
        raise ValueError(f"config.data.validation_fraction must be in [0, 1), got {config.data.validation_fraction}")
    _validate_mesh(config.mesh)
    from experiments import finetune, profiling  # init_from, LoRA, profile_steps: their own modules

    finetune.validate(config)
    profiling.parse_steps(config.train.profile_steps, config.train.num_steps)
    family.check_mesh({a: config.mesh[a] for a in sharding.OPTIONAL_AXES + ("tensor",) if config.mesh[a] != -1})


def _validate_mesh(mesh: ConfigDict) -> None:
    axes = sharding.MESH_AXES + sharding.OPTIONAL_AXES
    for axis in axes:
        if mesh[axis] != -1 and mesh[axis] < 1:
            raise ValueError(f"config.mesh.{axis} must be >= 1, or -1 for the remaining devices; got {mesh[axis]}")
    if sum(mesh[a] == -1 for a in axes) > 1:
        shape = {a: mesh[a] for a in axes}
        raise ValueError(f"config.mesh: at most one axis may be -1, got {shape}")
    if mesh.microbatches < 0:
        raise ValueError(f"config.mesh.microbatches must be >= 1, or 0 for 2 x stage; got {mesh.microbatches}")
    if mesh.virtual_stages < 1:
        raise ValueError(f"config.mesh.virtual_stages must be >= 1 (1 = GPipe); got {mesh.virtual_stages}")
    if mesh.preset not in sharding.PRESETS:
        raise ValueError(f"config.mesh.preset: unknown {mesh.preset!r}; choose one of {sorted(sharding.PRESETS)}")


def model_config(config: ConfigDict, tok: Tokenizer):
    """The model config of a run: vocab_size 0 follows the tokenizer, whose special ids are used."""
    m = {k: v for k, v in config.model.to_dict().items() if k != "kind"}
    if not m["vocab_size"]:
        m["vocab_size"] = tok.vocab_size
    elif m["vocab_size"] < tok.vocab_size:
        raise ValueError(f"config.model.vocab_size={m['vocab_size']} is smaller than the tokenizer's "
                         f"{tok.vocab_size}; set it to 0 to follow the tokenizer")
    m.update(pad_id=tok.pad_id, bos_id=tok.bos_id, eos_id=tok.eos_id)
    return to_dataclass(family_of(config).config_class, m, "model")


def plan_model_config(config: ConfigDict):
    """The model config without building the data: vocab from the config or the tokenizer's known size."""
    from experiments.tokenizers import ByteTokenizer

    if config.data.tokenizer == "byte" or config.model.vocab_size:
        return model_config(config, ByteTokenizer())
    # A sentencepiece model has exactly the vocab_size it is trained with; ids as the byte tokenizer's.
    with config.unlocked():
        sized = ConfigDict(config.to_dict())
    sized.model.vocab_size = config.data.vocab_size
    return model_config(sized, ByteTokenizer())


def total_steps(config: ConfigDict) -> int:
    """The schedule's length: `optim.total_steps`, or `train.num_steps` where that is 0."""
    return config.optim.total_steps or config.train.num_steps


def optim_config(config: ConfigDict) -> training.OptimizerConfig:
    o = config.optim.to_dict()
    o["total_steps"] = total_steps(config)
    return to_dataclass(training.OptimizerConfig, o, "optim")


def make_run_mesh(config: ConfigDict) -> jax.sharding.Mesh:
    """The run's mesh; without a -1, a mesh smaller than the host uses its first devices. An axis the model
    family cannot run on fails here, in one line naming the family and the mesh field."""
    shape = {k: config.mesh[k] for k in sharding.MESH_AXES + sharding.OPTIONAL_AXES}
    devices = jax.devices()
    if -1 not in shape.values() and math.prod(shape.values()) < len(devices):
        devices = devices[: math.prod(shape.values())]
    mesh = sharding.make_mesh(shape, devices=devices)
    family_of(config).check_mesh(dict(mesh.shape))  # `validate` checked the sizes given; this, a -1 axis
    return mesh


# ---------------------------------------------------------------------------
# The command line's `--config.<section>.<field>=value` overrides.


def _config_file(argv: list[str]) -> str | None:
    """The `--config=<file>[:<arg>]` (or `--config <file>`) of `argv`, as given."""
    for i, arg in enumerate(argv[1:], 1):
        if arg.startswith("--config="):
            return arg[len("--config="):]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def load_config_file(spec: str | None) -> ConfigDict:
    """What `--config=<file>[:<arg>]` builds (its `get_config()`), or the base config when there is none."""
    from experiments.configs.base import base_config

    if not spec:
        return base_config()
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("_run_config_file", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def _unknown_override(argv: list[str]) -> str | None:
    """The first `--config.<section>.<field>` of `argv` that the run's config file does not have, as an error
    line listing the fields that file's section does have (an RNN config's model fields are RNNConfig's)."""
    ref = load_config_file(_config_file(argv))
    for arg in argv[1:]:
        if not arg.startswith("--config."):
            continue
        path = arg[len("--config."):].split("=", 1)[0].split(".")
        if path[0] not in ref:
            return f"--config.{path[0]}: unknown section; valid sections are {sorted(ref.keys())}"
        if len(path) > 1 and isinstance(ref[path[0]], ConfigDict) and path[1] not in ref[path[0]]:
            return (f"--config.{'.'.join(path)}: unknown field {path[1]!r} of config.{path[0]}; valid fields are "
                    f"{sorted(ref[path[0]].keys())}")
    return None


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with an override of a field the config lacks as one `error:` line."""
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError):  # what ml_collections raises for such an override
        line = _unknown_override(argv)
        if line is None or "--verbose" in argv:
            raise
        print(f"error: {line}", file=sys.stderr)
        sys.exit(1)
