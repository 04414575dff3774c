"""Defaults shared by every config; each config file overrides what it needs.

Sections map onto tformer's dataclasses: `model` -> tformer.ModelConfig (plus
`kind`: lm | seq2seq), `optim` -> tformer.OptimizerConfig. `data`, `train`
and `mesh` are read by experiments/train.py.
"""

from ml_collections import ConfigDict


def base_config() -> ConfigDict:
    c = ConfigDict()
    c.model = ConfigDict(dict(kind="lm", vocab_size=0))  # 0: take the tokenizer's size
    c.optim = ConfigDict(dict(learning_rate=3e-3, warmup_steps=100, total_steps=0,  # 0: = train.num_steps
                              weight_decay=0.1, clip_norm=1.0, b2=0.95))
    c.data = ConfigDict(dict(
        corpus="stdlib",        # stdlib | a text file or directory | numbers:<direction> | a TSV / "src,tgt" files
        tokenizer="byte",       # byte | sentencepiece
        vocab_size=4096,        # sentencepiece only
        seq_len=256,            # LM rows
        src_len=32, tgt_len=64,  # seq2seq
        max_bytes=0,            # cap on training text (0: all)
        num_train=20_000, num_valid=500,  # numbers task
    ))
    c.train = ConfigDict(dict(
        batch_size=32, num_steps=1000, seed=0,
        log_every=50, eval_every=250, eval_batches=16, eval_batch_size=0,  # 0: = batch_size
        checkpoint_every=250, keep_checkpoints=3,
        num_samples=3, sample_tokens=120, sample_prompts="def |class |import ",
        temperature=0.8, top_k=40, beam_size=1, eval_decode_examples=500,
    ))
    # stage: pipeline stages; sequence: sequence-parallel split; microbatches: pipeline microbatches (0: 2 x stage).
    c.mesh = ConfigDict(dict(data=-1, fsdp=1, tensor=1, stage=1, sequence=1, microbatches=0, preset="dp"))
    return c
