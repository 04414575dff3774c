"""The recurrent baseline: LSTM / GRU language model and RNN encoder-decoder.

Built on Flax NNX's own cells (`nnx.LSTMCell`, `nnx.OptimizedLSTMCell`,
`nnx.GRUCell`) scanned over time by `nnx.RNN`: step t needs the carry of step
t - 1, so a forward pass over T tokens is T dependent steps per layer however
many devices there are. That sequential critical path is what the Transformer
removed; `experiments/study.py` measures it against `DecoderLM`.

The models mirror the Transformer's interface so the runner treats them alike:
  * `__call__`: teacher-forced logits for a whole batch, same signature as
    `DecoderLM` / `EncoderDecoder` (`positions` / `segment_ids` are accepted
    and ignored: the LM reads packed rows as one stream, BOS marks a document);
  * `init_state` + `extend` / `step`: tokens against a carried state, the
    RNN's KV cache; `extend` by a prompt, then `step` one token at a time,
    computes the logits of `__call__` (tests/test_rnn.py). A step costs the
    same at every position: the state does not grow.
`generate` and `beam_search` below decode with that state through `tformer.generate`'s loops.

Every weight carries logical axis names (NNX `out_sharding` metadata) like the Transformer's (the cell
size is the logical axis `rnn`, which no preset shards), so the rule tables,
weight decay mask and checkpoints work unchanged: data parallel and FSDP over
`embed` split an RNN, tensor parallelism has nothing of it to split.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from jax.typing import ArrayLike

from tformer.generate import GREEDY, Decode, Generated, Prefilled, Sampling, beam_search_with, generate_with

CELLS = {"lstm": nnx.LSTMCell, "optimized_lstm": nnx.OptimizedLSTMCell, "gru": nnx.GRUCell}
ATTENTION = ("none", "luong")
_DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class RNNConfig:
    """Architecture of an `RNNLM` or `RNNSeq2Seq` (embeddings and cells are `d_model` wide)."""

    vocab_size: int = 256
    d_model: int = 256
    num_layers: int = 2  # stacked cells; the encoder-decoder has this many on each side
    cell: str = "lstm"  # lstm | optimized_lstm (one fused gate matmul) | gru
    attention: str = "none"  # seq2seq: none (final state only) | luong (global attention over encoder outputs)
    max_len: int = 1024  # longest sequence the runner decodes to (an RNN itself has no bound)
    tie_embeddings: bool = True
    unroll: int = 1  # lax.scan unroll of the time loop
    dtype: str = "float32"
    param_dtype: str = "float32"
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2

    def __post_init__(self):
        checks = [
            (self.vocab_size >= 2, "vocab_size", f"must be >= 2, got {self.vocab_size}"),
            (self.d_model >= 1, "d_model", f"must be >= 1, got {self.d_model}"),
            (self.num_layers >= 1, "num_layers", f"must be >= 1, got {self.num_layers}"),
            (self.cell in CELLS, "cell", f"unknown {self.cell!r}; choose one of {sorted(CELLS)}"),
            (self.attention in ATTENTION, "attention", f"unknown {self.attention!r}; choose one of {ATTENTION}"),
            (self.max_len >= 2, "max_len", f"must be >= 2, got {self.max_len}"),
            (self.unroll >= 1, "unroll", f"must be >= 1, got {self.unroll}"),
            (self.dtype in _DTYPES, "dtype", f"unknown {self.dtype!r}; choose one of {_DTYPES}"),
            (self.param_dtype in _DTYPES, "param_dtype", f"unknown {self.param_dtype!r}; choose one of {_DTYPES}"),
        ]
        for ok, field, msg in checks:
            if not ok:
                raise ValueError(f"RNNConfig.{field}: {msg}")


def param_count(cfg: RNNConfig, seq2seq: bool = False) -> int:
    """Parameters of the model `cfg` builds (embedding, cells, head, attention)."""
    d, v = cfg.d_model, cfg.vocab_size
    gates = {"lstm": 4, "optimized_lstm": 4, "gru": 3}[cfg.cell]
    per_layer = gates * (2 * d * d + d)  # input and recurrent kernels, one bias per gate
    stacks = 2 if seq2seq else 1
    attn = 3 * d * d if seq2seq and cfg.attention == "luong" else 0
    head = 0 if cfg.tie_embeddings else d * v + v
    return v * d + stacks * cfg.num_layers * per_layer + attn + head


def train_flops_per_token(cfg: RNNConfig, seq2seq: bool = False) -> float:
    """6 x the weights a token multiplies (forward + backward matmuls); the embedding lookup is free
    unless it is also the tied output projection. seq2seq counts the encoder once per target token."""
    lookup = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model
    return 6.0 * (param_count(cfg, seq2seq) - lookup)


def _dtype(name: str):
    return jnp.dtype(name)


def _axes(*names: str) -> dict:
    """Variable metadata naming a weight's logical axes, as tformer.layers.param sets it: NNX sharding
    metadata that tformer.sharding resolves by its rule table (no eager sharding at creation)."""
    return {"out_sharding": names, "eager_sharding": False}


def _stack(cfg: RNNConfig, rngs: nnx.Rngs) -> nnx.List:
    """`num_layers` cells, each scanned over time by `nnx.RNN` (returning its final carry)."""
    meta = dict(kernel_metadata=_axes("embed", "rnn"), recurrent_kernel_metadata=_axes("rnn_in", "rnn"),
                bias_metadata=_axes("rnn"))
    return nnx.List([
        nnx.RNN(CELLS[cfg.cell](cfg.d_model, cfg.d_model, dtype=_dtype(cfg.dtype), param_dtype=_dtype(cfg.param_dtype),
                                rngs=rngs, **meta), return_carry=True, unroll=cfg.unroll, rngs=False)
        for _ in range(cfg.num_layers)
    ])


def _zero_carry(cfg: RNNConfig, batch: int):
    """One zero carry per layer: (c, h) for an LSTM, h for a GRU."""
    h = jnp.zeros((batch, cfg.d_model), _dtype(cfg.dtype))
    return tuple(h if cfg.cell == "gru" else (h, h) for _ in range(cfg.num_layers))


def _run_stack(layers: nnx.List, x_btd, carry, lengths=None):
    """Every layer over the whole sequence: (outputs [B, T, D], final carry per layer).

    `lengths` [B]: the carry returned is the one after each row's last real
    token (right padding beyond it is read but does not reach the carry).
    """
    new = []
    for rnn, c0 in zip(layers, carry):
        c, x_btd = rnn(x_btd, initial_carry=c0, seq_lengths=lengths)
        new.append(c)
    return x_btd, tuple(new)


def _step_stack(layers: nnx.List, x_bd, carry):
    """One time step of every layer, calling the cells directly (no scan): the decode loop's body."""
    new = []
    for rnn, c in zip(layers, carry):
        c, x_bd = rnn.cell(c, x_bd)
        new.append(c)
    return x_bd, tuple(new)


class _EmbedHead(nnx.Module):
    """Token embedding and the output projection (tied to it or not)."""

    def __init__(self, cfg: RNNConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.table = nnx.Embed(cfg.vocab_size, cfg.d_model, dtype=_dtype(cfg.dtype),
                               param_dtype=_dtype(cfg.param_dtype), rngs=rngs,
                               embedding_init=nnx.initializers.normal(cfg.d_model ** -0.5),
                               embedding_metadata=_axes("vocab", "embed"))
        if not cfg.tie_embeddings:
            self.head = nnx.Linear(cfg.d_model, cfg.vocab_size, dtype=_dtype(cfg.dtype),
                                   param_dtype=_dtype(cfg.param_dtype), rngs=rngs,
                                   kernel_metadata=_axes("embed", "vocab"), bias_metadata=_axes("vocab"))

    def __call__(self, tokens_bt: jax.Array) -> jax.Array:
        return self.table(tokens_bt)

    def logits(self, x_btd: jax.Array) -> jax.Array:
        out = self.table.attend(x_btd) if self.cfg.tie_embeddings else self.head(x_btd)
        return out.astype(jnp.float32)


class RNNLM(nnx.Module):
    """Stacked LSTM / GRU language model: the recurrent counterpart of `DecoderLM`."""

    config_class = RNNConfig
    task = "lm"  # the batch layout it trains on

    def __init__(self, cfg: RNNConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = _EmbedHead(cfg, rngs=rngs)
        self.layers = _stack(cfg, rngs)

    def __call__(self, tokens_bt: jax.Array, *, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None, dropout_rng: jax.Array | None = None) -> jax.Array:
        """Logits [B, T, V]; position t depends on tokens [0, t] only (causal by construction)."""
        del positions, segment_ids, dropout_rng  # one stream per row; no dropout
        logits, _ = self.extend(tokens_bt, self.init_state(tokens_bt.shape[0]))
        return logits

    def init_state(self, batch: int):
        """The empty state (zero carries): the RNN's counterpart of an empty KV cache."""
        return _zero_carry(self.cfg, batch)

    def extend(self, tokens_bt: jax.Array, state: tuple, lengths: jax.Array | None = None) -> tuple[jax.Array, tuple]:
        """Run T new tokens from `state`: (logits [B, T, V], state after each row's `lengths` tokens)."""
        x, state = _run_stack(self.layers, self.embed(tokens_bt), state, lengths)
        return self.embed.logits(x), state

    def step(self, tokens_b: jax.Array, state: tuple) -> tuple[jax.Array, tuple]:
        """One token per row: (logits [B, V], new state); equals `extend` by one token."""
        x, state = _step_stack(self.layers, self.embed(tokens_b), state)
        return self.embed.logits(x), state


class RNNSeq2Seq(nnx.Module):
    """RNN encoder-decoder (Sutskever et al. 2014), optionally with Luong et al. (2015) global attention.

    The decoder starts from the encoder's final carry (layer by layer); with
    `attention="luong"` each decoder output also attends over every encoder
    output (general score h^T W e, then tanh(W_c [context; h])), without input
    feeding, so the decoder's recurrence stays the same as without attention.
    """

    config_class = RNNConfig
    task = "seq2seq"

    def __init__(self, cfg: RNNConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = _EmbedHead(cfg, rngs=rngs)
        self.encoder = _stack(cfg, rngs)
        self.decoder = _stack(cfg, rngs)
        if cfg.attention == "luong":
            kw = dict(use_bias=False, dtype=_dtype(cfg.dtype), param_dtype=_dtype(cfg.param_dtype), rngs=rngs)
            self.score = nnx.Linear(cfg.d_model, cfg.d_model, kernel_metadata=_axes("rnn_in", "embed"), **kw)
            self.combine = nnx.Linear(2 * cfg.d_model, cfg.d_model, kernel_metadata=_axes("rnn_in", "embed"), **kw)

    def init_state(self, src_bs: jax.Array, *, src_segment_ids: jax.Array | None = None) -> dict:
        """Encode the source (right-padded with pad_id) once: decoder carry, encoder outputs, source mask."""
        valid_bs = src_bs != self.cfg.pad_id if src_segment_ids is None else src_segment_ids != 0
        lengths = jnp.maximum(jnp.sum(valid_bs, axis=1), 1)
        enc_bsd, carry = _run_stack(self.encoder, self.embed(src_bs), _zero_carry(self.cfg, src_bs.shape[0]), lengths)
        return {"carry": carry, "enc": enc_bsd, "src_valid": valid_bs}

    def attention_weights(self, x_btd: jax.Array, state: dict) -> jax.Array:
        """Luong attention weights [B, T, S] of decoder outputs over the source positions."""
        scores = jnp.einsum("btd,bsd->bts", self.score(x_btd), state["enc"]).astype(jnp.float32)
        scores = jnp.where(state["src_valid"][:, None, :], scores, -1e9)
        return jax.nn.softmax(scores, axis=-1)

    def extend(self, tokens_bt: jax.Array, state: dict, lengths: jax.Array | None = None, *,
               return_attention: bool = False) -> tuple:
        """Decoder over T new target tokens from `state`: (logits [B, T, V], new state[, attention])."""
        x, carry = _run_stack(self.decoder, self.embed(tokens_bt), state["carry"], lengths)
        logits, weights = self._output(x, state)
        out = (logits, {**state, "carry": carry})
        return out + (weights,) if return_attention else out

    def step(self, tokens_b: jax.Array, state: dict) -> tuple[jax.Array, dict]:
        """One target token per row: (logits [B, V], new state); equals `extend` by one token."""
        x, carry = _step_stack(self.decoder, self.embed(tokens_b), state["carry"])
        logits, _ = self._output(x[:, None], state)
        return logits[:, 0], {**state, "carry": carry}

    def _output(self, x_btd, state: dict):
        """Logits of decoder outputs, through Luong attention when configured: (logits, weights or None)."""
        if self.cfg.attention != "luong":
            return self.embed.logits(x_btd), None
        weights = self.attention_weights(x_btd, state)
        context = jnp.einsum("bts,bsd->btd", weights.astype(x_btd.dtype), state["enc"])
        return self.embed.logits(jnp.tanh(self.combine(jnp.concatenate([context, x_btd], axis=-1)))), weights

    def __call__(self, src_bs: jax.Array, tgt_inputs_bt: jax.Array, *, src_segment_ids: jax.Array | None = None,
                 tgt_segment_ids: jax.Array | None = None, tgt_positions: jax.Array | None = None,
                 src_positions: jax.Array | None = None, dropout_rng: jax.Array | None = None) -> jax.Array:
        """Teacher-forced logits [B, T, V] (same signature as `EncoderDecoder`; one pair per row)."""
        del tgt_segment_ids, tgt_positions, src_positions, dropout_rng
        logits, _ = self.extend(tgt_inputs_bt, self.init_state(src_bs, src_segment_ids=src_segment_ids))
        return logits


# ---------------------------------------------------------------------------
# Decoding with a carried state: the prefill, step and beam reorder that
# tformer.generate's shared greedy / sampling / beam loops drive.


def _prompts(model, prompts, lengths, src):
    prompt = jnp.asarray(prompts, jnp.int32)
    if prompt.ndim != 2 or prompt.shape[1] < 1:
        raise ValueError(f"prompts must be [batch, length >= 1] token ids, got shape {prompt.shape}")
    if lengths is None:
        lengths = jnp.full((prompt.shape[0],), prompt.shape[1], jnp.int32)
    lengths = jnp.asarray(lengths, jnp.int32)
    if lengths.shape != (prompt.shape[0],):
        raise ValueError(f"lengths must be [batch={prompt.shape[0]}], got shape {lengths.shape}")
    if model.task == "seq2seq":  # a source to encode
        if src is None:
            raise ValueError("RNNSeq2Seq decoding needs src=[batch, src_len] source tokens")
        src = jnp.asarray(src, jnp.int32)
        if src.ndim != 2 or src.shape[0] != prompt.shape[0]:
            raise ValueError(f"src must be [batch={prompt.shape[0]}, src_len] to match the prompts, got {src.shape}")
    return prompt, lengths, src


def _prefill(model, inputs: tuple, decode: Decode) -> Prefilled:
    """Each row's state after its right-padded prompt, and the logits of its last real token.

    A step costs the same at every position (the state does not grow), so the
    whole decode is one phase with nothing to bound.
    """
    del decode
    prompt, lengths, src = inputs
    state = model.init_state(src) if model.task == "seq2seq" else model.init_state(prompt.shape[0])
    logits, state = model.extend(prompt, state, lengths)
    last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
    return Prefilled(last, state, step=lambda tokens_b, state, _: model.step(tokens_b, state),
                     reorder=lambda state, rows, _: jax.tree.map(lambda x: x[rows], state),
                     phases=lambda steps: [(0, steps, None)] if steps else [])


def _resolve(model, decode: Decode) -> Decode:
    return dataclasses.replace(decode, eos_id=model.cfg.eos_id if decode.eos_id is None else decode.eos_id)


def generate(model: RNNLM | RNNSeq2Seq, prompts: ArrayLike, decode: Decode, sampling: Sampling = GREEDY, *,
             lengths: ArrayLike | None = None, rng: jax.Array | None = None, src: ArrayLike | None = None) -> Generated:
    """`tformer.generate` for the RNN models: prompts [B, P] right-padded to `lengths`; one carry per row.

    Produces `decode.max_new_tokens` per row (`decode.cache_len` and `chunk` do not apply: the state does
    not grow); each new token costs one step of every layer, whatever its position.
    """
    prompt, lengths, src = _prompts(model, prompts, lengths, src)
    return generate_with(_prefill, model, (prompt, lengths, src), _resolve(model, decode), sampling, rng)


def beam_search(model: RNNLM | RNNSeq2Seq, prompts: ArrayLike, decode: Decode, *, beam_size: int = 4,
                length_alpha: float = 0.6, lengths: ArrayLike | None = None, src: ArrayLike | None = None) -> Generated:
    """`tformer.beam_search` for the RNN models (GNMT length penalty); the state follows each surviving beam."""
    prompt, lengths, src = _prompts(model, prompts, lengths, src)
    return beam_search_with(_prefill, model, (prompt, lengths, src), _resolve(model, decode), beam_size, length_alpha)
