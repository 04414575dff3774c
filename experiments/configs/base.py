"""Defaults shared by every config; each config file overrides what it needs.

`model` and `optim` are generated from tformer.ModelConfig and
tformer.OptimizerConfig (every field, with the dataclass's default), so any
field can be overridden from the command line in every config and the two
can never disagree. The runner adds `model.kind` (lm | seq2seq), takes
`model.vocab_size` 0 to mean the tokenizer's size and `optim.total_steps` 0 to
mean `train.num_steps`; the special token ids come from the tokenizer.
`data`, `train` and `mesh` are read by experiments/train.py.
"""

import dataclasses

from ml_collections import ConfigDict, config_dict

import tformer

# Set by the runner from the tokenizer, never by a config.
TOKENIZER_FIELDS = ("pad_id", "bos_id", "eos_id")
_TYPES = {"int": int, "float": float, "str": str, "bool": bool}


def _field_value(f: dataclasses.Field):
    """The dataclass default; a None default becomes a typed placeholder so that flags can set it."""
    if f.default is not None:
        return f.default
    base = str(f.type).replace("| None", "").replace("None |", "").strip()
    return config_dict.placeholder(_TYPES[base])


def dataclass_defaults(cls, skip: tuple[str, ...] = ()) -> ConfigDict:
    """A ConfigDict with every field of the dataclass `cls` at its default."""
    return ConfigDict({f.name: _field_value(f) for f in dataclasses.fields(cls) if f.name not in skip})


def base_config() -> ConfigDict:
    c = ConfigDict()
    c.init_from = ""  # "" | hf:<dir> (a Hugging Face folder) | <workdir> (a tformer run): see experiments/finetune.py
    c.model = dataclass_defaults(tformer.ModelConfig, skip=TOKENIZER_FIELDS)
    c.model.kind = "lm"
    c.model.vocab_size = 0  # 0: take the tokenizer's size
    c.optim = dataclass_defaults(tformer.OptimizerConfig)
    c.optim.total_steps = 0  # 0: = train.num_steps
    c.data = ConfigDict(dict(
        corpus="stdlib",        # stdlib | a text file or directory | numbers:<direction> | a TSV / "src,tgt" files
        tokenizer="byte",       # byte | sentencepiece | hf (set by init_from=hf:<dir>)
        vocab_size=4096,        # sentencepiece only
        seq_len=256,            # LM rows
        src_len=32, tgt_len=64,  # seq2seq
        max_bytes=0,            # cap on training text (0: all)
        validation_fraction=0.02,  # a single text file: the share of its lines held out
        num_train=20_000, num_valid=500,  # numbers task
    ))
    c.train = ConfigDict(dict(
        batch_size=32, num_steps=1000, seed=0,
        log_every=50, eval_every=250, eval_batches=16, eval_batch_size=0,  # 0: = batch_size
        checkpoint_every=250, keep_checkpoints=3,
        num_samples=3, sample_tokens=120, sample_prompts="def |class |import ",
        temperature=0.8, top_k=40, beam_size=1, eval_decode_examples=500,
        # LoRA (tformer/lora.py): rank 0 = off; alpha 0 = rank; targets: weight names or groups attn, mlp.
        lora_rank=0, lora_alpha=0.0, lora_targets="attn,mlp",
        profile_steps="",       # "START,END": jax.profiler trace of steps START..END-1 (experiments/profiling.py)
        # Wall-clock seconds for the whole run, 0 = off (experiments/budget.py): training stops at the step
        # boundary that leaves room for the final eval (measured) plus `time_budget_margin_s` (the final
        # checkpoint, samples, metrics); the learning-rate schedule decays over the time, not num_steps.
        time_budget_s=0.0, time_budget_margin_s=1.0,
    ))
    # stage: pipeline stages; sequence: sequence-parallel split; microbatches: pipeline microbatches (0: 2 x stage);
    # virtual_stages: layer groups per stage (1: GPipe; V > 1: the interleaved schedule, bubble / ~V).
    c.mesh = ConfigDict(dict(data=-1, fsdp=1, tensor=1, stage=1, sequence=1, microbatches=0, virtual_stages=1,
                             preset="dp"))
    return c
