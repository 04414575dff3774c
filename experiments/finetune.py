"""Start a run from pretrained weights (`config.init_from`) and read a finished run's weights back.

    --config.init_from=hf:<dir>   a Hugging Face folder (config.json + *.safetensors + tokenizer.json)
    --config.init_from=<workdir>  another tformer run: its newest checkpoint, model and tokenizer

The model's architecture comes from the source; a `--config.model.*` field set
away from its default to a different value is an error naming the field. The
runtime fields (`RUNTIME_FIELDS`: dtypes, attention kernel, scan, remat, ...)
are the run's own. The tokenizer is the source's: an HF checkpoint's
`tokenizer.json` is copied to `<workdir>/hf_tokenizer/` (with its special ids)
so that resuming, sampling, evaluating and exporting read the same ids. The
weights are read on the host and placed shard by shard on the run's mesh
(`create_train_state(params=...)`); a run that resumes reads its own
checkpoint instead.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from ml_collections import ConfigDict

import tformer
from experiments.tokenizers import HF_TOKENIZER_DIR, HF_TOKENIZER_FILES, HFTokenizer, make_tokenizer
from tformer import families, hf, training
from tformer import lora as lora_lib
from tformer.checkpoint import Checkpointer, CheckpointError

HF_PREFIX = "hf:"
# Fields a run chooses for itself whatever the checkpoint: how the model runs, not what it computes.
RUNTIME_FIELDS = ("dtype", "param_dtype", "logits_dtype", "attention", "scan_layers", "remat", "vocab_multiple",
                  "kv_cache_dtype")
# Fields taken from the run's config only when it sets them away from the default (else the source's).
OPTIONAL_FIELDS = ("max_len", "dropout", "attention_dropout")
_IDS = ("pad_id", "bos_id", "eos_id")


@dataclasses.dataclass
class Source:
    """Where a run's first weights come from."""

    kind: str  # "hf" | "workdir"
    path: Path
    cfg: tformer.ModelConfig  # the source's architecture (with the run's runtime fields)
    tokenizer: str  # the tokenizer kind the run uses ("hf", "byte", "sentencepiece")


def lora_config(train: ConfigDict) -> lora_lib.LoraConfig | None:
    """The run's LoRA settings, or None when `train.lora_rank` is 0."""
    if not train.lora_rank:
        return None
    return lora_lib.LoraConfig(train.lora_rank, train.lora_alpha, train.lora_targets)


def _where(config: ConfigDict) -> str:
    return f"config.init_from={config.init_from}"


def validate(config: ConfigDict) -> None:
    """init_from's syntax and the LoRA fields, before anything runs."""
    if config.train.lora_rank < 0:
        raise ValueError(f"config.train.lora_rank must be >= 0 (0: off), got {config.train.lora_rank}")
    family = families.get(config.model.kind)
    if lora_config(config.train) is not None and not family.shards_weights:
        raise ValueError(f"config.train.lora_rank: LoRA adapts Transformer projections; model.kind "
                         f"{config.model.kind!r} has none")
    if config.init_from and config.init_from.startswith(HF_PREFIX) and not family.hf_causal_lm:
        hf_kinds = [name for name, f in families.FAMILIES.items() if f.hf_causal_lm]
        raise ValueError(f"{_where(config)}: a Hugging Face checkpoint is a decoder-only LM; set config.model.kind "
                         f"to one of {hf_kinds} (got {config.model.kind!r})")


def check_resume(workdir: Path, config: ConfigDict) -> None:
    """A run resumes with the LoRA settings it was saved with: they shape its parameters and optimizer state."""
    path = workdir / "config.json"
    if not path.is_file():
        return
    saved = json.loads(path.read_text())["config"]["train"]
    for field in ("lora_rank", "lora_alpha", "lora_targets"):
        old, new = saved.get(field, base_default(field)), config.train[field]
        if old != new:
            raise ValueError(f"--workdir={workdir} holds checkpoints trained with train.{field}={old!r}, not {new!r}; "
                             "resume with the old setting, or start fresh with a new --workdir (to fine-tune a "
                             f"finished run differently, use --config.init_from={workdir})")


def base_default(field: str):
    from experiments.configs.base import base_config

    return base_config().train[field]


def _check_hf_folder(config: ConfigDict, folder: Path) -> None:
    where = _where(config)
    if not folder.is_dir():
        raise ValueError(f"{where}: no such folder; give a directory holding config.json and *.safetensors "
                         "(as transformers' save_pretrained writes them)")
    if not (folder / "config.json").is_file():
        raise ValueError(f"{where}: the folder has no config.json (save the model with save_pretrained)")
    if not any(folder.glob("*.safetensors")):
        raise ValueError(f"{where}: the folder has no *.safetensors weights (save with safe_serialization, "
                         "the transformers default)")
    if not (folder / "tokenizer.json").is_file():
        raise ValueError(f"{where}: the folder has no tokenizer.json; the run tokenizes with the checkpoint's own "
                         "tokenizer (save a fast tokenizer there: tokenizer.save_pretrained(folder))")


def _architecture(config: ConfigDict, source_cfg: tformer.ModelConfig) -> tformer.ModelConfig:
    """The source's architecture with the run's runtime fields; a conflicting override fails naming it."""
    from experiments.configs.base import base_config

    default, given = base_config().model, config.model
    fields = dataclasses.asdict(source_cfg)
    for name, value in fields.items():
        if name in _IDS or name not in given:
            continue
        if name in RUNTIME_FIELDS:
            fields[name] = given[name]
        elif given[name] != default[name] and given[name] != value:
            if name in OPTIONAL_FIELDS:
                fields[name] = given[name]
            elif not (name == "vocab_size" and given[name] == 0):
                raise ValueError(f"config.model.{name}={given[name]!r} conflicts with the checkpoint's "
                                 f"{name}={value!r} ({_where(config)}): the architecture comes from the checkpoint; "
                                 f"drop the override (runtime fields such as {', '.join(RUNTIME_FIELDS[:5])} "
                                 "may be set)")
    try:
        return tformer.ModelConfig(**fields)
    except ValueError as e:
        raise ValueError(f"{_where(config)}: {e}") from None


def _hf_source(config: ConfigDict, folder: Path) -> Source:
    _check_hf_folder(config, folder)
    try:
        cfg = hf.config_from_hf(folder)
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{_where(config)}: {e}") from None
    cfg = _architecture(config, cfg)
    if config.data.seq_len > cfg.max_len:
        raise ValueError(f"config.data.seq_len={config.data.seq_len} exceeds the checkpoint's max_len={cfg.max_len} "
                         f"({_where(config)}); set --config.data.seq_len={cfg.max_len} or less")
    tok = HFTokenizer.from_file(folder / "tokenizer.json", cfg.bos_id, cfg.eos_id, cfg.pad_id)
    if tok.vocab_size > cfg.vocab_size:
        raise ValueError(f"{_where(config)}: tokenizer.json has {tok.vocab_size} tokens but the model's "
                         f"vocab_size is {cfg.vocab_size}; its ids would index past the embedding table (is the "
                         "tokenizer from another checkpoint?)")
    return Source("hf", folder, cfg, "hf")


def _workdir_source(config: ConfigDict, src: Path) -> Source:
    meta = read_run(src, _where(config))
    family_name = meta["config"]["model"]["kind"]
    if family_name != config.model.kind:
        raise ValueError(f"{_where(config)}: that run trained a {family_name!r} model; this config's model.kind is "
                         f"{config.model.kind!r}")
    if families.get(family_name).config_class is not tformer.ModelConfig:
        raise ValueError(f"{_where(config)}: init_from starts Transformer runs; that run is a {family_name!r} model")
    return Source("workdir", src, _architecture(config, tformer.ModelConfig(**meta["model"])), meta["tokenizer"])


def resolve(config: ConfigDict) -> Source | None:
    """The run's init_from source (checked: folder, weights, tokenizer, architecture), or None."""
    if not config.init_from:
        return None
    if config.init_from.startswith(HF_PREFIX):
        return _hf_source(config, Path(config.init_from[len(HF_PREFIX):]).expanduser())
    return _workdir_source(config, Path(config.init_from).expanduser())


def prepare(config: ConfigDict, workdir: Path) -> Source | None:
    """Resolve init_from and give `workdir` the source's tokenizer; sets `config.data.tokenizer` to match."""
    source = resolve(config)
    if source is None:
        return None
    if jax.process_index() == 0:
        if source.kind == "hf":
            _copy_hf_tokenizer(source.path, workdir / HF_TOKENIZER_DIR, source.cfg)
        elif source.tokenizer == "hf":
            shutil.copytree(source.path / HF_TOKENIZER_DIR, workdir / HF_TOKENIZER_DIR, dirs_exist_ok=True)
        elif source.tokenizer == "sentencepiece":
            for ext in (".model", ".vocab"):
                if (source.path / f"tokenizer{ext}").is_file():
                    shutil.copy2(source.path / f"tokenizer{ext}", workdir / f"tokenizer{ext}")
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("tformer:init_from_tokenizer")
    with config.unlocked():
        config.data.tokenizer = source.tokenizer
        if source.tokenizer == "sentencepiece":
            config.data.vocab_size = read_run(source.path)["config"]["data"]["vocab_size"]
    return source


def _copy_hf_tokenizer(folder: Path, dest: Path, cfg: tformer.ModelConfig) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for name in HF_TOKENIZER_FILES:
        if (folder / name).is_file():
            shutil.copy2(folder / name, dest / name)
    specials = {k: getattr(cfg, k) for k in _IDS}
    (dest / "specials.json").write_text(json.dumps(specials) + "\n")


def initial_params(source: Source, cfg: tformer.ModelConfig) -> dict:
    """The source's weights as a host (numpy) tree in `cfg`'s layout, for `create_train_state(params=...)`."""
    if source.kind == "hf":
        overrides = {k: getattr(cfg, k) for k in hf.OVERRIDABLE if k not in _IDS}
        with jax.default_device(jax.local_devices(backend="cpu")[0]):  # host memory, never one accelerator
            model = hf.load_hf_checkpoint(source.path, **overrides)
        params = nnx_params(model)
    else:
        _, params = load_params(source.path)
    return jax.tree.map(lambda x: np.asarray(x, dtype=tformer.layers.DTYPE[cfg.param_dtype]), params)


def nnx_params(model) -> dict:
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


# ---------------------------------------------------------------------------
# Reading a run back: its config and (merged) weights, for export, evaluate and init_from=<workdir>.


def read_run(workdir: Path, what: str | None = None) -> dict:
    """A run's saved config.json (model config, run config, tokenizer kind)."""
    workdir = Path(workdir)
    prefix = f"{what}: " if what else ""
    path = workdir / "config.json"
    if not workdir.is_dir():
        raise ValueError(f"{prefix}{workdir} does not exist")
    if not path.is_file():
        raise ValueError(f"{prefix}{path} not found: is {workdir} a training run's workdir?")
    try:
        meta = json.loads(path.read_text())
        for needed in (meta["model"], meta["config"]["model"]["kind"], meta["tokenizer"]):
            del needed  # each lookup fails with KeyError when the file lacks it
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{prefix}{path} is not a run config ({type(e).__name__}: {e})") from None
    return meta


def abstract_run_params(meta: dict):
    """(model class, ModelConfig, graphdef, params ShapeDtypeStructs) of a run; a LoRA run's tree has its adapters."""
    family = families.get(meta["config"]["model"]["kind"])
    cfg = family.config_class(**meta["model"])
    graphdef, abstract = training.abstract_model(family.model_class, cfg)
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), nnx.to_pure_dict(abstract))
    lcfg = lora_config(ConfigDict(meta["config"]["train"])) if "lora_rank" in meta["config"]["train"] else None
    if lcfg is not None:
        target = lora_lib.abstract_lora_params(target, lcfg)
    return family.model_class, cfg, graphdef, target


def load_params(workdir: Path, step: int | None = None, *, shardings=None, merge: bool = True):
    """(ModelConfig, params) of a run's newest (or `step`) checkpoint; with `merge` the LoRA adapters folded in.

    The parameters land on one device, or on `shardings` (a tree like the checkpoint's params); the
    optimizer state is never read.
    """
    workdir = Path(workdir)
    _, cfg, _, target = abstract_run_params(read_run(workdir))
    if shardings is None:
        shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), target)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), target, shardings)
    ckpt = Checkpointer(workdir / "checkpoints")
    try:
        if step is not None and step not in ckpt.all_steps():
            raise ValueError(f"--step={step}: no such checkpoint in {workdir / 'checkpoints'}; it holds steps "
                             f"{ckpt.all_steps()}")
        params = ckpt.restore_params(target, step)
    finally:
        ckpt.close()
    return cfg, (jax.jit(lora_lib.merged)(params) if merge else params)


def latest_step(workdir: Path) -> int:
    """The newest checkpoint step of a run (ValueError when it has none)."""
    ckpt = Checkpointer(Path(workdir) / "checkpoints")
    try:
        step = ckpt.latest_step()
    finally:
        ckpt.close()
    if step is None:
        raise CheckpointError(f"no checkpoint in {Path(workdir).absolute() / 'checkpoints'}")
    return step


def run_tokenizer(workdir: Path, meta: dict):
    """The tokenizer a run trained with (read from its workdir)."""
    return make_tokenizer(meta["tokenizer"], workdir, (), meta["config"]["data"]["vocab_size"])


def lora_savings(model_cls, cfg: tformer.ModelConfig, optim: training.OptimizerConfig, mesh, rules,
                 lcfg: lora_lib.LoraConfig, lora_plan) -> str:
    """The plan's line on LoRA: trainable parameters and optimizer state against a full fine-tune's."""
    from tformer import plan as plan_lib

    _, abstract = training.abstract_model(model_cls, cfg)
    tx = training.make_optimizer(optim, abstract)
    full_opt = plan_lib.shard_bytes(training.abstract_train_state(abstract, tx).opt_state,
                                    training.state_shardings(model_cls, cfg, tx, mesh, rules).opt_state)
    base = nnx.to_pure_dict(abstract)
    n_base = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(base))
    n_lora = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(lora_lib.adapter_shapes(base, lcfg)))
    fmt = plan_lib.fmt_bytes
    return (f"LoRA rank {lcfg.rank} on {lcfg.targets}: {n_lora:,} trainable parameters ({n_lora / n_base:.2%} of "
            f"{n_base:,}); optimizer state {fmt(lora_plan.opt_bytes)} per device vs {fmt(full_opt)} for a full "
            f"fine-tune (saves {fmt(full_opt - lora_plan.opt_bytes)} per device)")
