"""Deterministic batches whose position in the data is just the step number.

Text is tokenized once into fixed-size rows (a `Split`); `batch_at(split,
step, ...)` is a pure function of (rows, step, batch_size, seed), so resuming
from a checkpoint needs nothing but the step, and each host can compute its
own slice of the global batch without talking to the others.

Batch keys (all numpy; int32 unless noted), exactly what the train step reads:

  LM (packed, teacher forcing):
    inputs       [B, T]  tokens fed to the model
    targets      [B, T]  the next token of each input
    weights      [B, T]  float32; 1 where the target is scored, else 0
    segment_ids  [B, T]  1, 2, 3, ... per document piece within a row; 0 = padding
    positions    [B, T]  position within the document piece, from 0

  seq2seq:
    src          [B, S]  source tokens + EOS, then PAD (the model masks src == PAD)
    tgt_inputs   [B, T]  BOS + target tokens (teacher forcing: shifted right)
    tgt_targets  [B, T]  target tokens + EOS
    tgt_weights  [B, T]  float32; 1 on real target tokens (EOS included)

Bits per byte. In an LM split, the scored targets (weights == 1) are exactly
each document's tokens plus its EOS; BOS is never scored. `Split.num_bytes` is
the matching text size: the UTF-8 bytes of every document plus 1 per document
for its EOS. Over a full pass of `eval_batches`:

    bits_per_byte = nll_sum_nats / ln(2) / split.num_bytes

(`bits_per_byte` below does this, and scales for a partial pass).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import hashlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence

import grain
import jax
import numpy as np

from experiments.tokenizers import BOS_ID, EOS_ID, PAD_ID, ByteTokenizer, Tokenizer

__all__ = [
    "Split",
    "make_lm_datasets",
    "make_seq2seq_datasets",
    "pack_documents",
    "batch_at",
    "eval_batches",
    "num_eval_batches",
    "bits_per_byte",
    "global_batch",
    "Prefetcher",
    "LM_KEYS",
    "SEQ2SEQ_KEYS",
]

LM_KEYS = ("inputs", "targets", "weights", "segment_ids", "positions")
SEQ2SEQ_KEYS = ("src", "tgt_inputs", "tgt_targets", "tgt_weights")


@dataclasses.dataclass(frozen=True)
class Split:
    """One split, as rows ready to batch, plus what is needed to report per-byte metrics.

    `arrays` all share a leading row dimension. They are stored compactly (an
    LM split keeps one `tokens` [N, T+1] window per row instead of separate
    inputs and targets; weights are uint8) and widened to the batch dtypes by
    `batch_at` and `eval_batches`.
    """

    arrays: dict[str, np.ndarray]
    num_examples: int  # documents (LM) or sentence pairs (seq2seq)
    num_tokens: int  # targets with weight 1
    num_bytes: int  # UTF-8 bytes of the scored text, +1 per example for its EOS
    num_truncated: int = 0  # seq2seq pairs cut to fit src_len / tgt_len

    @property
    def num_rows(self) -> int:
        return len(next(iter(self.arrays.values())))


# ---------------------------------------------------------------------------
# Tokenizing.


def _encode_all(tokenizer: Tokenizer, texts: Sequence[str]) -> list[np.ndarray]:
    if isinstance(tokenizer, ByteTokenizer):  # 10x faster than a list of Python ints
        return [np.frombuffer(t.encode("utf-8"), np.uint8).astype(np.int32) + tokenizer.offset for t in texts]
    if hasattr(tokenizer, "encode_batch"):
        return [np.asarray(ids, np.int32) for ids in tokenizer.encode_batch(list(texts))]
    return [np.asarray(tokenizer.encode(t), np.int32) for t in texts]


def _small_int_dtype(max_value: int):
    return np.int16 if max_value < 2**15 else np.int32


# ---------------------------------------------------------------------------
# Language modelling: packing documents into rows.


def pack_documents(docs_ids: Sequence[np.ndarray], seq_len: int, bos_id: int = BOS_ID, eos_id: int = EOS_ID,
                   pad_id: int = PAD_ID) -> dict[str, np.ndarray]:
    """Packs tokenized documents into rows of `seq_len` inputs.

    Each document becomes [BOS] + ids + [EOS]; the documents are concatenated
    into one stream, and row r is the window stream[r*T : r*T + T + 1]
    (inputs = window[:-1], targets = window[1:]). Consecutive windows overlap
    by one token, so every stream token after the first is a target exactly
    once. The last row is padded with PAD.

    A document that runs past the end of a row continues at the start of the
    next row as a new segment whose positions restart at 0 (it cannot attend
    to its part in the previous row). Restarting keeps every position below
    T, which learned position tables need.

    A target is weighted only if it is in the same document as its input:
    this drops the EOS -> next BOS transition (attention never crosses
    documents, so that prediction would be unlearnable) and padding.

    Returns `tokens` [N, T+1] int32, `segment_ids` and `positions` [N, T]
    (int16 where they fit), `weights` [N, T] uint8.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    if not docs_ids:
        raise ValueError("no documents to pack")
    t = seq_len
    lengths = np.array([len(ids) + 2 for ids in docs_ids], np.int64)
    stream = np.concatenate([np.concatenate([[bos_id], ids, [eos_id]]).astype(np.int32) for ids in docs_ids])
    doc_of = np.repeat(np.arange(len(docs_ids), dtype=np.int64), lengths)
    num_rows = max(1, math.ceil((len(stream) - 1) / t))
    pad = num_rows * t + 1 - len(stream)
    stream = np.concatenate([stream, np.full(pad, pad_id, np.int32)])
    doc_of = np.concatenate([doc_of, np.full(pad, -1, np.int64)])

    starts_n1 = np.arange(num_rows, dtype=np.int64)[:, None] * t
    cols_t = np.arange(t, dtype=np.int64)[None, :]
    tokens = stream[starts_n1 + np.arange(t + 1)[None, :]]
    doc_in_nt = doc_of[starts_n1 + cols_t]
    doc_tgt_nt = doc_of[starts_n1 + cols_t + 1]
    real_nt = doc_in_nt >= 0

    new_seg_nt = np.ones_like(real_nt)
    new_seg_nt[:, 1:] = doc_in_nt[:, 1:] != doc_in_nt[:, :-1]
    segment_ids = np.where(real_nt, np.cumsum(new_seg_nt, axis=1), 0)
    seg_start_nt = np.maximum.accumulate(np.where(new_seg_nt, cols_t, 0), axis=1)
    positions = np.where(real_nt, cols_t - seg_start_nt, 0)
    weights = real_nt & (doc_tgt_nt == doc_in_nt)

    small = _small_int_dtype(t)
    return {
        "tokens": tokens,
        "segment_ids": segment_ids.astype(small),
        "positions": positions.astype(small),
        "weights": weights.astype(np.uint8),
    }


def make_lm_split(tokenizer: Tokenizer, docs: Sequence[str], seq_len: int) -> Split:
    """Tokenizes and packs one split's documents (see `pack_documents`)."""
    docs_ids = _encode_all(tokenizer, docs)
    arrays = pack_documents(docs_ids, seq_len, tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id)
    num_tokens = int(arrays["weights"].sum(dtype=np.int64))
    expected = sum(len(ids) + 1 for ids in docs_ids)
    assert num_tokens == expected, (num_tokens, expected)  # the bits-per-byte contract
    num_bytes = sum(tokenizer.num_bytes(d) for d in docs) + len(docs)
    return Split(arrays, num_examples=len(docs), num_tokens=num_tokens, num_bytes=num_bytes)


def make_lm_datasets(tokenizer: Tokenizer, corpus: Mapping[str, Sequence[str]], seq_len: int) -> dict[str, Split]:
    """{split name: packed `Split`} for every non-empty split of `corpus` ({'train': [doc, ...], ...})."""
    return {name: make_lm_split(tokenizer, docs, seq_len) for name, docs in corpus.items() if docs}


# ---------------------------------------------------------------------------
# Sequence to sequence.


def make_seq2seq_split(
    tokenizer_src: Tokenizer, tokenizer_tgt: Tokenizer, pairs: Sequence[tuple[str, str]], src_len: int, tgt_len: int
) -> Split:
    """One row per (source, target) pair, PAD-filled to `src_len` / `tgt_len`.

    A source longer than src_len - 1 tokens is cut to src_len - 1 and still
    ends in EOS; a target longer than tgt_len - 1 tokens is cut to tgt_len - 1
    (its EOS then falls off the end of tgt_targets, so the model is never
    taught to stop early). Each pair cut on either side counts once in
    `num_truncated`; the trainer should report it, since truncated
    references make BLEU meaningless for those pairs.
    """
    if src_len < 2 or tgt_len < 2:
        raise ValueError(f"src_len and tgt_len must be at least 2, got {src_len}, {tgt_len}")
    if not pairs:
        raise ValueError("no sentence pairs")
    srcs = _encode_all(tokenizer_src, [s for s, _ in pairs])
    tgts = _encode_all(tokenizer_tgt, [t for _, t in pairs])
    n = len(pairs)
    src = np.full((n, src_len), PAD_ID, np.int32)
    tgt_inputs = np.full((n, tgt_len), PAD_ID, np.int32)
    tgt_targets = np.full((n, tgt_len), PAD_ID, np.int32)
    tgt_weights = np.zeros((n, tgt_len), np.uint8)
    truncated = 0
    for i, (s_ids, t_ids) in enumerate(zip(srcs, tgts)):
        truncated += len(s_ids) > src_len - 1 or len(t_ids) > tgt_len - 1
        s_ids = s_ids[: src_len - 1]
        src[i, : len(s_ids)] = s_ids
        src[i, len(s_ids)] = EOS_ID
        full = np.concatenate([[BOS_ID], t_ids, [EOS_ID]]).astype(np.int32)[: tgt_len + 1]
        tgt_inputs[i, : len(full) - 1] = full[:-1]
        tgt_targets[i, : len(full) - 1] = full[1:]
        tgt_weights[i, : len(full) - 1] = 1
    num_bytes = sum(tokenizer_tgt.num_bytes(t) for _, t in pairs) + n
    arrays = {"src": src, "tgt_inputs": tgt_inputs, "tgt_targets": tgt_targets, "tgt_weights": tgt_weights}
    return Split(arrays, n, int(tgt_weights.sum(dtype=np.int64)), num_bytes, truncated)


def make_seq2seq_datasets(
    tokenizer_src: Tokenizer,
    tokenizer_tgt: Tokenizer,
    pairs_by_split: Mapping[str, Sequence[tuple[str, str]]],
    src_len: int,
    tgt_len: int,
) -> dict[str, Split]:
    """{split name: `Split`} for every non-empty split (see `make_seq2seq_split`)."""
    return {
        name: make_seq2seq_split(tokenizer_src, tokenizer_tgt, pairs, src_len, tgt_len)
        for name, pairs in pairs_by_split.items()
        if pairs
    }


# ---------------------------------------------------------------------------
# Batching: pure functions of (rows, step).


def _arrays(split) -> dict[str, np.ndarray]:
    return split.arrays if isinstance(split, Split) else dict(split)


def _finish(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Widens compact stored rows into the batch dtypes; splits `tokens` windows."""
    batch = {}
    for key, value in rows.items():
        if key == "tokens":
            batch["inputs"] = np.ascontiguousarray(value[:, :-1], np.int32)
            batch["targets"] = np.ascontiguousarray(value[:, 1:], np.int32)
        elif key.endswith("weights"):
            batch[key] = value.astype(np.float32)
        else:
            batch[key] = value.astype(np.int32)
    return batch


def _local_range(batch_size: int, process_index: int, process_count: int) -> range:
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if batch_size % process_count:
        raise ValueError(f"global batch size {batch_size} is not divisible by process_count {process_count}")
    per = batch_size // process_count
    return range(process_index * per, (process_index + 1) * per)


@functools.lru_cache(maxsize=16)
def _shuffled(num_rows: int, seed: int):
    # grain's shuffled MapDataset is a random-access permutation (a Feistel
    # network, O(1) memory): index f maps to row perm_{s + epoch}[f % N]
    # with epoch = f // N, so any flat index is computed directly, no state.
    # grain adds the epoch to the seed, so seeds 0 and 1 would replay each
    # other's epochs one apart; hashing the seed first keeps runs apart.
    mixed = int.from_bytes(hashlib.sha256(f"batch_at/{seed}".encode()).digest()[:4], "big")
    return grain.MapDataset.range(num_rows).shuffle(seed=mixed)


def batch_at(
    split,
    step: int,
    batch_size: int,
    seed: int = 0,
    shuffle: bool = True,
    process_index: int = 0,
    process_count: int = 1,
) -> dict[str, np.ndarray]:
    """The training batch for global step `step`, or this process's slice of it.

    The global batch holds flat example indices step*B ... step*B + B - 1 of
    an endless sequence of epochs; flat index f is row perm_e[f % N] of epoch
    e = f // N, where perm_e is a permutation seeded by (seed, e) (identity
    with shuffle=False). Every epoch therefore visits every row exactly once,
    even when B does not divide N (a batch may straddle two epochs).

    With process_count > 1, returns rows [p*B/P, (p+1)*B/P) of the global
    batch for process p; the slices concatenate to the global batch.
    `split` is a `Split` or a plain dict of row arrays.
    """
    arrays = _arrays(split)
    num_rows = len(next(iter(arrays.values())))
    if step < 0 or batch_size < 1:
        raise ValueError(f"need step >= 0 and batch_size >= 1, got {step}, {batch_size}")
    flat = [step * batch_size + i for i in _local_range(batch_size, process_index, process_count)]
    if shuffle:
        order = _shuffled(num_rows, seed)
        rows = np.fromiter((order[f] for f in flat), np.int64, len(flat))
    else:
        rows = np.asarray(flat, np.int64) % num_rows
    return _finish({k: v[rows] for k, v in arrays.items()})


def num_eval_batches(split, batch_size: int) -> int:
    """How many batches `eval_batches` yields."""
    arrays = _arrays(split)
    return math.ceil(len(next(iter(arrays.values()))) / batch_size)


def eval_batches(split, batch_size: int, process_index: int = 0,
                 process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
    """Every row once, in order, in global batches of `batch_size` (or this process's slice).

    The last batch is filled up with all-zero rows (PAD tokens, weight 0,
    segment 0), so summing weighted metrics over all batches covers every
    scored token exactly once and every batch has the same shape (one compile).
    """
    arrays = _arrays(split)
    num_rows = len(next(iter(arrays.values())))
    local = _local_range(batch_size, process_index, process_count)
    for start in range(0, num_rows, batch_size):
        idx = np.arange(start + local.start, start + local.stop)
        real = idx < num_rows
        rows = {}
        for key, value in arrays.items():
            taken = value[np.where(real, idx, 0)]
            taken[~real] = 0
            rows[key] = taken
        yield _finish(rows)


def bits_per_byte(nll_sum_nats: float, weight_sum: float, split: Split) -> float:
    """Bits per UTF-8 byte from summed token NLL (nats) over scored targets of `split`.

    Exact when the sums cover the whole split (weight_sum == split.num_tokens,
    i.e. a full `eval_batches` pass); otherwise the split's average bytes per
    token stands in for the bytes of the tokens that were scored.
    """
    if weight_sum <= 0:
        return float("nan")
    covered_bytes = split.num_bytes * (weight_sum / split.num_tokens)
    return float(nll_sum_nats) / math.log(2) / covered_bytes


# ---------------------------------------------------------------------------
# Onto the devices: each process's slice joined into global arrays, built ahead of the step that needs it.


def global_batch(local: dict, shardings: dict, batch_size: int) -> dict:
    """The global [batch_size, ...] arrays whose rows on this process are `local` (its `batch_at` slice)."""
    return {
        k: jax.make_array_from_process_local_data(shardings[k], v, (batch_size,) + v.shape[1:])
        for k, v in local.items()
    }


class Prefetcher:
    """Iterates `make(step)` over `steps`, building the next `depth` batches on a background thread.

    The batch for step s+1 is gathered and placed on the devices while step s
    runs, so the accelerator never waits for the host's numpy work.
    """

    def __init__(self, make: Callable[[int], dict], steps: range, depth: int = 2):
        self._make, self._steps = make, iter(steps)
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="prefetch")
        self._queue = collections.deque()
        for _ in range(depth):
            self._submit_next()

    def _submit_next(self) -> None:
        step = next(self._steps, None)
        if step is not None:
            self._queue.append(self._pool.submit(self._make, step))

    def __iter__(self) -> Iterator[dict]:
        while self._queue:
            batch = self._queue.popleft().result()
            self._submit_next()
            yield batch

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
