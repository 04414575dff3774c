"""The training batch layout, defined once: keys, dtypes and meaning per task ("lm" | "seq2seq", the data trained on).

A batch is a dict of [batch, length] arrays. For a `DecoderLM` ("lm"):
`inputs` (tokens), `targets` (the next tokens), `weights` (1.0 for a real
target, 0.0 for padding), `segment_ids` (packed documents, 0 = padding) and
`positions` (restarting per document); only `inputs` and `targets` are
required. For an `EncoderDecoder` ("seq2seq"): `src`, `tgt_inputs` (the
target shifted right after BOS), `tgt_targets`, `tgt_weights`, and optional
`src_segment_ids` / `tgt_segment_ids` for packed pairs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.typing import ArrayLike

# task -> {key: dtype}; the first keys are required, the rest optional.
LAYOUT: dict[str, dict[str, type]] = {
    "lm": {"inputs": jnp.int32, "targets": jnp.int32, "weights": jnp.float32, "segment_ids": jnp.int32,
           "positions": jnp.int32},
    "seq2seq": {"src": jnp.int32, "tgt_inputs": jnp.int32, "tgt_targets": jnp.int32, "tgt_weights": jnp.float32,
                "src_segment_ids": jnp.int32, "tgt_segment_ids": jnp.int32},
}
REQUIRED = {"lm": ("inputs", "targets"), "seq2seq": ("src", "tgt_inputs", "tgt_targets", "tgt_weights")}
# The keys a data pipeline produces (and a plan compiles for) per task.
KEYS = {"lm": ("inputs", "targets", "weights", "segment_ids", "positions"),
        "seq2seq": ("src", "tgt_inputs", "tgt_targets", "tgt_weights")}


def _check_task(task: str) -> None:
    if task not in LAYOUT:
        raise ValueError(f"unknown task {task!r}; choose one of {sorted(LAYOUT)}")


def abstract_batch(task: str, batch: int, seq_len: int, src_len: int | None = None) -> dict:
    """ShapeDtypeStructs of a training batch with the pipeline's keys (`KEYS[task]`)."""
    _check_task(task)
    lengths = {"src": src_len or seq_len}
    return {k: jax.ShapeDtypeStruct((batch, lengths.get(k, seq_len)), LAYOUT[task][k]) for k in KEYS[task]}


def lm_batch(tokens_bt1: ArrayLike) -> dict:
    """An LM batch from token windows [B, T + 1]: inputs, next-token targets, unit weights."""
    tokens = jnp.asarray(tokens_bt1, jnp.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": jnp.ones(tokens[:, 1:].shape, jnp.float32)}


def logits_and_targets(model: nnx.Module, batch: dict, dropout_rng: jax.Array | None = None):
    """Teacher-forced logits and (targets, weights) of `batch` under `model` (by `model.task`)."""
    task = model.task
    missing = [k for k in REQUIRED[task] if k not in batch]
    if missing:
        raise ValueError(f"a {task} batch needs keys {list(REQUIRED[task])}; missing {missing}")
    if task == "seq2seq":
        logits = model(batch["src"], batch["tgt_inputs"], src_segment_ids=batch.get("src_segment_ids"),
                       tgt_segment_ids=batch.get("tgt_segment_ids"), dropout_rng=dropout_rng)
        return logits, batch["tgt_targets"], batch["tgt_weights"]
    logits = model(batch["inputs"], positions=batch.get("positions"), segment_ids=batch.get("segment_ids"),
                   dropout_rng=dropout_rng)
    weights = batch.get("weights")
    if weights is None:
        weights = jnp.ones(batch["targets"].shape, jnp.float32)
    return logits, batch["targets"], weights


def target_length(task: str, batch: dict) -> int:
    """Tokens per row the loss is taken over (for FLOPs per token)."""
    _check_task(task)
    return int(np.shape(batch["tgt_inputs" if task == "seq2seq" else "inputs"])[1])
