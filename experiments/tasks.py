"""The data side of a run: its tokenizer, train and validation splits, and the pairs a translation is scored on.

A run's task follows its model family (`tformer.families`): "lm" reads text
(the stdlib, a file or a directory), "seq2seq" reads (source, target) pairs
(the synthetic numbers task or a parallel corpus).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path

import jax
from absl import logging
from ml_collections import ConfigDict

from experiments import corpora, decode, input_pipeline
from experiments.run_config import family_of
from experiments.tokenizers import Tokenizer, make_tokenizer


@dataclasses.dataclass
class Task:
    """Everything data-side a run needs: tokenizer, splits, and how to score them."""

    name: str  # "lm" | "seq2seq" (the family's task)
    tokenizer: Tokenizer
    train: input_pipeline.Split
    valid: input_pipeline.Split
    valid_pairs: list | None = None  # seq2seq: raw (src, tgt) for exact match / BLEU


def build_task(config: ConfigDict, workdir: Path) -> Task:
    """The task of `config`'s model family, its tokenizer trained (or loaded) in `workdir`."""
    build = {"lm": _lm_task, "seq2seq": _seq2seq_task}[family_of(config).task]
    return build(config.data, workdir)


def _lm_task(d: ConfigDict, workdir: Path) -> Task:
    if d.corpus == "stdlib":
        corpus = corpora.stdlib_corpus(d.max_bytes or None)
    else:
        corpus = corpora.read_text_corpus(d.corpus, validation_fraction=d.validation_fraction)
    if not corpus["train"] or not corpus["validation"]:
        raise corpora.DataError(f"{d.corpus}: too little text for both a train and a validation split")
    tok = make_tokenizer(d.tokenizer, workdir, corpus["train"], d.vocab_size)
    sets = input_pipeline.make_lm_datasets(tok, corpus, d.seq_len)
    return Task("lm", tok, sets["train"], sets["validation"])


def _seq2seq_task(d: ConfigDict, workdir: Path) -> Task:
    if d.corpus.startswith("numbers:"):
        pairs = corpora.numbers_task(d.corpus.split(":", 1)[1], d.num_train, d.num_valid, seed=0)
    else:
        all_pairs = corpora.read_parallel_corpus(*d.corpus.split(",")[:2])
        if len(all_pairs) < 2:
            raise corpora.DataError(f"{d.corpus}: {len(all_pairs)} sentence pair(s); a run needs at least 2 "
                                    "(one to train on, one to validate on)")
        n_valid = max(1, min(d.num_valid, len(all_pairs) // 10))
        pairs = {"train": all_pairs[:-n_valid], "validation": all_pairs[-n_valid:]}
    texts = [s for s, _ in pairs["train"]] + [t for _, t in pairs["train"]]
    tok = make_tokenizer(d.tokenizer, workdir, texts, d.vocab_size)
    sets = input_pipeline.make_seq2seq_datasets(tok, tok, pairs, d.src_len, d.tgt_len)
    if sets["validation"].num_truncated:
        logging.warning("%d validation pairs exceed src_len/tgt_len and were truncated",
                        sets["validation"].num_truncated)
    return Task("seq2seq", tok, sets["train"], sets["validation"], pairs["validation"])


def load_task(config: ConfigDict, workdir: Path) -> Task:
    """build_task; in a multi-process run one process trains a sentencepiece tokenizer, the others load it."""
    if jax.process_count() == 1 or config.data.tokenizer != "sentencepiece":
        return build_task(config, workdir)
    from jax.experimental import multihost_utils

    task = build_task(config, workdir) if jax.process_index() == 0 else None
    multihost_utils.sync_global_devices("tformer:tokenizer")
    return task or build_task(config, workdir)


def check_sample_prompts(config: ConfigDict, task: Task, max_len: int) -> None:
    """The end-of-run samples must fit the model: checked before training, not after it."""
    if task.name != "lm":
        return
    try:
        decode.encode_prompts(task.tokenizer, decode.sample_prompts(config.train.sample_prompts,
                                                                    config.train.num_samples), max_len)
    except ValueError as e:
        raise ValueError(f"config.train.sample_prompts: {e}") from None


def evaluate(task: Task, config: ConfigDict, eval_fn: Callable, params, batch_shardings: dict,
             model: Callable[[], object]) -> dict:
    """Mean loss / accuracy over `train.eval_batches` validation batches, plus perplexity and bits per byte
    (LM) or exact match and BLEU (seq2seq). `eval_fn(params, batch)` gives the summed NLL / weights /
    correct of a global batch (tformer.training.make_eval_step); `model()` the merged model, for decoding."""
    t = config.train
    bs = t.eval_batch_size or t.batch_size
    sums = None
    batches = input_pipeline.eval_batches(task.valid, bs, jax.process_index(), jax.process_count())
    for _, batch in zip(range(t.eval_batches), batches):
        s = eval_fn(params, input_pipeline.global_batch(batch, batch_shardings, bs))
        sums = s if sums is None else jax.tree.map(lambda a, b: a + b, sums, s)
    sums = jax.tree.map(float, sums)
    w = max(sums["weight_sum"], 1.0)
    out = {"loss": sums["nll_sum"] / w, "accuracy": sums["correct_sum"] / w}
    if task.name == "lm":
        out["perplexity"] = math.exp(min(out["loss"], 50.0))
        out["bits_per_byte"] = input_pipeline.bits_per_byte(sums["nll_sum"], sums["weight_sum"], task.valid)
    else:
        d = config.data
        out.update(decode.translation_scores(model(), task.tokenizer, task.valid_pairs[: t.eval_decode_examples],
                                             d.src_len, d.tgt_len, t.beam_size))
    return out
