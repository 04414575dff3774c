"""Generation: parallel prefill, then one jitted decode loop over new tokens.

The whole loop is one XLA program per call shape: the KV cache is the loop
carry and is updated in place, tokens never visit the host between steps, and
layer weights are unstacked once before the loop. The loop stops as soon as
every row has emitted EOS. Works for `DecoderLM` (continue a prompt) and
`EncoderDecoder` (encode the source once, then decode from BOS).

The greedy/sampling loop and the beam loop are written once, against what a
model family provides after its prompt (`Prefilled`: first logits, a state,
one-token `step`, beam `reorder`); `tformer.rnn` decodes its carried state
through the same loops.

A call is described by two specs: `Decode` (how many tokens, when to stop,
the cache and its phases) and `Sampling` (how to pick a token). Every
argument is checked when its value is concrete (Python numbers and host
arrays); values traced inside a caller's `jax.jit` are not checked.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from jax.typing import ArrayLike

from tformer import sharding
from tformer.kvcache import KVCache


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How to pick a token from logits. temperature 0 = greedy."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"Sampling.temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k is not None and not (_is_int(self.top_k) and self.top_k >= 1):
            raise ValueError(f"Sampling.top_k must be an integer >= 1 or None, got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"Sampling.top_p must be in (0, 1] or None, got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def nucleus(self) -> bool:
        return self.top_p is not None and self.top_p < 1.0


GREEDY = Sampling()


@dataclasses.dataclass(frozen=True)
class Decode:
    """What a decode call produces: `max_new_tokens` per row, stopping at `eos_id`.

    eos_id: stop token (None: the model config's); rows that emitted it
      produce pad_id afterwards, and the loop ends once every row has. -1:
      never stop.
    cache_len: KV cache slots (None: prompt length + max_new_tokens).
    chunk: decode steps per phase; a phase attends only over the cache slots
      filled by its end (None: >= 128 steps, <= 8 phases). Same tokens for
      any value; smaller reads less cache, compiles more.
    """

    max_new_tokens: int
    eos_id: int | None = None
    cache_len: int | None = None
    chunk: int | None = None

    def __post_init__(self):
        if not (_is_int(self.max_new_tokens) and self.max_new_tokens >= 1):
            raise ValueError(f"Decode.max_new_tokens must be an integer >= 1, got {self.max_new_tokens}")
        if self.eos_id is not None and not _is_int(self.eos_id):
            raise ValueError(f"Decode.eos_id must be an integer token id (or -1, or None), got {self.eos_id}")
        if self.cache_len is not None and not (_is_int(self.cache_len) and self.cache_len >= 1):
            raise ValueError(f"Decode.cache_len must be an integer >= 1 or None, got {self.cache_len}")
        if self.chunk is not None and not (_is_int(self.chunk) and self.chunk >= 1):
            raise ValueError(f"Decode.chunk must be an integer >= 1 (decode steps per phase) or None, got {self.chunk}")


def sample_logits(logits_bv: jax.Array, rng: jax.Array, s: Sampling) -> jax.Array:
    """One token id per row from fp32 logits, honouring top-k then top-p."""
    if s.greedy:
        return jnp.argmax(logits_bv.astype(jnp.float32), axis=-1).astype(jnp.int32)
    return _sample(logits_bv, rng, s.temperature, s.top_k, s.top_p if s.nucleus else None)


def _sample(logits_bv, rng, temperature, top_k: int | None, top_p):
    """Sampling with `temperature` (> 0) and `top_p` as values that may be traced,
    so one compiled generation loop serves every temperature and nucleus size;
    `top_k` is a static size."""
    logits_bv = logits_bv.astype(jnp.float32) / temperature
    if top_k is not None and top_k < logits_bv.shape[-1]:
        kth = jax.lax.top_k(logits_bv, top_k)[0][:, -1:]
        logits_bv = jnp.where(logits_bv < kth, -jnp.inf, logits_bv)
    if top_p is not None:
        sorted_bv = jnp.sort(logits_bv, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_bv, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (always >= 1 token).
        keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p
        cutoff = jnp.min(jnp.where(keep, sorted_bv, jnp.inf), axis=-1, keepdims=True)
        logits_bv = jnp.where(logits_bv < cutoff, -jnp.inf, logits_bv)
    return jax.random.categorical(rng, logits_bv, axis=-1).astype(jnp.int32)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Generated:
    tokens: jax.Array  # [B, N] new tokens; after EOS the row holds pad_id
    lengths: jax.Array  # [B] new tokens up to and including EOS
    scores: jax.Array | None = None  # [B] beam search: best (length-normalised) log-prob
    steps: jax.Array | None = None  # [] model steps the loop ran after the prompt (fewer once every row is done)


# ---------------------------------------------------------------------------
# Host-side checks and prompt layout.


def _as_prompts(model, prompts, lengths):
    cfg = model.cfg
    p = np.asarray(prompts)
    if p.ndim != 2 or p.shape[1] < 1:
        raise ValueError(f"prompts must be an int array [batch, length>=1], got shape {p.shape}")
    if not np.issubdtype(p.dtype, np.integer):
        raise ValueError(f"prompts must hold integer token ids, got dtype {p.dtype}")
    b, t = p.shape
    lens = np.full((b,), t, np.int32) if lengths is None else np.asarray(lengths)
    if lens.size and not np.issubdtype(lens.dtype, np.integer):
        raise ValueError(f"lengths must be integers (tokens per prompt), got {lens.tolist()}")
    if lens.shape != (b,) or (lens < 1).any() or (lens > t).any():
        raise ValueError(f"lengths must be [batch] with 1 <= length <= {t}, got {lens.tolist()}")
    real = np.arange(t)[None, :] < lens[:, None]
    bad = real & ((p < 0) | (p >= cfg.vocab_size))
    if bad.any():
        i, j = map(int, np.argwhere(bad)[0])
        raise ValueError(
            f"prompt token id {int(p[i, j])} at [{i}, {j}] is outside the vocabulary [0, {cfg.vocab_size})"
        )
    # Left-align: row b's prompt ends at the last column, padding on the left.
    shift = t - lens
    cols = (np.arange(t)[None, :] - shift[:, None]) % t
    left = np.take_along_axis(np.where(real, p, 0), cols, axis=1)
    valid = np.arange(t)[None, :] >= shift[:, None]
    return jnp.asarray(left, jnp.int32), jnp.asarray(valid), t


def _resolve(cfg, decode: Decode, prompt_len: int) -> Decode:
    """`decode` with eos_id and cache_len filled in, checked against the model's bounds."""
    if not isinstance(decode, Decode):
        raise ValueError(f"decode must be a tformer.Decode(max_new_tokens=...), got {decode!r}")
    n = decode.max_new_tokens
    need = prompt_len + n
    if need > cfg.max_len:
        raise ValueError(
            f"prompt length {prompt_len} + max_new_tokens {n} = {need} exceeds the model's "
            f"max_len={cfg.max_len} (the position/cache bound); generate fewer tokens or shorten the prompt"
        )
    if decode.cache_len is not None and need > decode.cache_len:
        raise ValueError(
            f"prompt length {prompt_len} + max_new_tokens {n} = {need} exceeds cache_len={decode.cache_len}; "
            "pass a larger cache_len or generate fewer tokens"
        )
    eos = cfg.eos_id if decode.eos_id is None else decode.eos_id
    return dataclasses.replace(decode, eos_id=eos, cache_len=decode.cache_len or need)


def _as_src(model, src, src_segment_ids, batch: int, what: str):
    """Source arrays for an EncoderDecoder (None for a DecoderLM), checked against the batch."""
    if model.task != "seq2seq":
        return None, None
    if src is None:
        raise ValueError(f"EncoderDecoder {what} needs src=[batch, src_len] source tokens")
    src = jnp.asarray(src, jnp.int32)
    if src.ndim != 2 or src.shape[0] != batch:
        raise ValueError(f"src must be [batch={batch}, src_len] to match the prompts, got shape {src.shape}")
    return src, None if src_segment_ids is None else jnp.asarray(src_segment_ids, jnp.int32)


def _lengths(tokens_bn, eos_id: int) -> jax.Array:
    """New tokens per row up to and including the first EOS (all of them when there is none)."""
    is_eos = tokens_bn == eos_id
    return jnp.where(is_eos.any(1), jnp.argmax(is_eos, axis=1) + 1, tokens_bn.shape[1]).astype(jnp.int32)


# The decode loop runs in phases of `chunk` steps, and a phase's attention reads
# only the cache slots it can see (prompt + tokens up to the phase's end): each
# phase is its own loop with a static slice, so no step reads the empty tail of
# the cache. More phases = fewer slots read, more step bodies to compile.
MIN_CHUNK = 128
MAX_PHASES = 8


def decode_phases(prompt_len: int, n: int, length: int, chunk: int | None = None) -> list[tuple[int, int, int]]:
    """(first step, end step, visible slots) per phase of the n - 1 decode steps after the first token.

    Step s feeds token s and writes slot prompt_len + s, so steps [lo, hi)
    see slots [0, prompt_len + hi). `chunk` None: at least MIN_CHUNK steps and
    at most MAX_PHASES phases.
    """
    steps = n - 1
    if chunk is None:
        chunk = max(MIN_CHUNK, -(-steps // MAX_PHASES))
    return [(lo, min(lo + chunk, steps), min(length, prompt_len + min(lo + chunk, steps)))
            for lo in range(0, steps, chunk)]


# ---------------------------------------------------------------------------
# What the decode loops drive: a model family after its prompt.


@dataclasses.dataclass(frozen=True)
class Prefilled:
    """A model after its prompts, as the shared decode loops see it (built inside the jitted call).

    logits_bv: next-token logits after each row's prompt.
    state: the loop carry that `step` reads and returns (a KV cache, RNN carries).
    step: (tokens [B], state, visible) -> (logits [B, V], state); `visible` is the
      phase's static bound on the cache slots filled (None where the state does not grow).
    reorder: (state, rows [B], visible) -> the state of rows `rows` (beam search
      follows its surviving beams).
    phases: number of steps -> [(first step, end step, visible)] covering them in order.
    """

    logits_bv: jax.Array
    state: Any
    step: Callable[[jax.Array, Any, int | None], tuple[jax.Array, Any]]
    reorder: Callable[[Any, jax.Array, int | None], Any]
    phases: Callable[[int], list[tuple[int, int, int | None]]]


# A family's prefill: (model, the arrays its host-side checks produced, resolved Decode) -> Prefilled.
Prefill = Callable[[Any, tuple, Decode], Prefilled]


def _prefill(model, inputs: tuple, decode: Decode) -> Prefilled:
    """The Transformers' prefill: left-aligned prompts through the cache in one parallel pass."""
    prompt, valid, src, src_seg = inputs
    if model.task == "seq2seq":
        cache = model.init_cache(src, decode.cache_len, src_segment_ids=src_seg)
    else:
        cache = model.init_cache(prompt.shape[0], decode.cache_len)
    layers = model.decode_layers()  # unstacked once, outside the loop
    logits, cache = model.extend(prompt, cache, valid, layers)

    def step(tokens_b: jax.Array, cache: KVCache, visible: int | None) -> tuple[jax.Array, KVCache]:
        logits, cache = model.extend(tokens_b[:, None], cache, None, layers, visible=visible)
        return logits[:, 0], cache

    def reorder(cache: KVCache, rows: jax.Array, visible: int) -> KVCache:
        def take(x: jax.Array) -> jax.Array:  # only the slots this phase can have filled
            return x[rows] if x.ndim == 1 or visible >= x.shape[1] else x.at[:, :visible].set(x[rows, :visible])

        return dataclasses.replace(cache, k=jax.tree.map(take, cache.k), v=jax.tree.map(take, cache.v),
                                   positions=take(cache.positions), valid=take(cache.valid),
                                   next_pos=take(cache.next_pos))

    # Step s feeds token s and writes slot p + s (see decode_phases).
    def phases(steps: int) -> list[tuple[int, int, int]]:
        return decode_phases(prompt.shape[1], steps + 1, decode.cache_len, decode.chunk)

    return Prefilled(logits[:, -1], cache, step, reorder, phases)


# ---------------------------------------------------------------------------
# Sampling / greedy.


@functools.partial(jax.jit, static_argnames=("graphdef", "prefill", "decode", "greedy", "top_k", "layout"))
def _generate(graphdef, state, inputs, rng, temperature, top_p, *, prefill: Prefill, decode: Decode, greedy: bool,
              top_k: int | None, layout: sharding.Layout | None):
    """`decode` is resolved (eos_id, cache_len set); temperature and top_p are traced values."""
    with sharding.use_layout(layout):
        model = nnx.merge(graphdef, state)
        vocab = model.cfg.vocab_size  # sample real ids only: -1e9 / temperature is not -inf

        def pick(logits_bv: jax.Array, key: jax.Array) -> jax.Array:
            logits_bv = logits_bv[:, :vocab]
            if greedy:
                return jnp.argmax(logits_bv.astype(jnp.float32), axis=-1).astype(jnp.int32)
            return _sample(logits_bv, key, temperature, top_k, top_p)

        return _sample_loop(prefill(model, inputs, decode), pick, rng, decode, model.cfg.pad_id)


def _sample_loop(run: Prefilled, pick, rng, decode: Decode, pad_id: int) -> Generated:
    """One token per row per step, picked by `pick`, until max_new_tokens or until every row has emitted EOS."""
    n, eos_id = decode.max_new_tokens, decode.eos_id
    keys = jax.random.split(rng, n)
    first = pick(run.logits_bv, keys[0])
    out = jnp.full((first.shape[0], n), pad_id, jnp.int32).at[:, 0].set(first)

    def phase(hi: int, visible: int | None) -> tuple[Callable[[tuple], jax.Array], Callable[[tuple], tuple]]:
        # Steps until `hi` or until every row has emitted EOS: an early end costs no more steps.
        def running(carry: tuple) -> jax.Array:
            i, _, _, done, _ = carry
            return (i < hi) & ~jnp.all(done)

        def step(carry: tuple) -> tuple:
            i, tok, state, done, out = carry
            logits_bv, state = run.step(tok, state, visible)
            nxt = jnp.where(done, pad_id, pick(logits_bv, keys[1 + i]))
            out = jax.lax.dynamic_update_slice(out, nxt[:, None], (0, i + 1))
            return i + 1, nxt, state, done | (nxt == eos_id), out

        return running, step

    carry = (jnp.int32(0), first, run.state, first == eos_id, out)
    for _, hi, visible in run.phases(n - 1):
        carry = jax.lax.while_loop(*phase(hi, visible), carry)
    tokens = carry[-1]
    return Generated(tokens=tokens, lengths=_lengths(tokens, eos_id), steps=carry[0])


def _check_sampling(sampling: Sampling, rng: jax.Array | None) -> None:
    if not isinstance(sampling, Sampling):
        raise ValueError(f"sampling must be a tformer.Sampling(temperature=..., top_k=..., top_p=...), "
                         f"got {sampling!r}")
    if not sampling.greedy and rng is None:
        raise ValueError("sampling with temperature > 0 needs an explicit rng key (jax.random.key(seed))")


def generate_with(prefill: Prefill, model: nnx.Module, inputs: tuple, decode: Decode, sampling: Sampling,
                  rng: jax.Array | None, layout: sharding.Layout | None = None) -> Generated:
    """The shared greedy/sampling loop over any family's `prefill` (inputs checked, decode resolved)."""
    _check_sampling(sampling, rng)
    graphdef, state = nnx.split(model)
    return _generate(
        graphdef, state, inputs, jax.random.key(0) if rng is None else rng,
        # Values, not compile-time constants: a new temperature or top_p reuses the program.
        jnp.float32(1.0 if sampling.greedy else sampling.temperature),
        jnp.float32(sampling.top_p) if sampling.nucleus else None,
        prefill=prefill, decode=decode, greedy=sampling.greedy, top_k=None if sampling.greedy else sampling.top_k,
        layout=layout,
    )


def generate(model: nnx.Module, prompts: ArrayLike, decode: Decode, sampling: Sampling = GREEDY, *,
             lengths: ArrayLike | None = None, rng: jax.Array | None = None, src: ArrayLike | None = None,
             src_segment_ids: ArrayLike | None = None, mesh: Mesh | None = None,
             rules: str | sharding.Rules | None = None) -> Generated:
    """Generate up to `decode.max_new_tokens` after each prompt (see `Decode`, `Sampling`).

    prompts: [B, P] token ids, right-padded; `lengths` [B] (integers) gives
      each row's real length (default: all P). For an EncoderDecoder, prompts
      is usually a column of BOS and `src` [B, S] is the source.
    rng: PRNG key, needed when sampling.temperature > 0.
    mesh, rules: trace under these sharding rules (e.g. params sharded with
      the "tp" preset): activations and the KV cache get the matching
      constraints (batch over data axes, kv heads over `tensor`).
    """
    prompt, valid, p = _as_prompts(model, prompts, lengths)
    decode = _resolve(model.cfg, decode, p)
    src, src_segment_ids = _as_src(model, src, src_segment_ids, prompt.shape[0], "generation")
    return generate_with(_prefill, model, (prompt, valid, src, src_segment_ids), decode, sampling, rng,
                         sharding.layout(mesh, rules))


# ---------------------------------------------------------------------------
# Beam search.


def length_penalty(length: float | jax.Array, alpha: float) -> float | jax.Array:
    """GNMT length normalisation ((5 + |Y|) / 6) ** alpha; alpha 0 = raw log-prob."""
    return ((5.0 + length) / 6.0) ** alpha


@functools.partial(jax.jit, static_argnames=("graphdef", "prefill", "decode", "beam", "alpha", "layout"))
def _beam_search(graphdef, state, inputs, *, prefill: Prefill, decode: Decode, beam: int, alpha: float,
                 layout: sharding.Layout | None):
    with sharding.use_layout(layout):
        model = nnx.merge(graphdef, state)
        batch = inputs[0].shape[0]
        run = prefill(model, jax.tree.map(lambda x: jnp.repeat(x, beam, axis=0), inputs), decode)
        return _beam_loop(run, model.cfg, batch, decode, beam, alpha)


def _beam_loop(run: Prefilled, cfg, b: int, decode: Decode, beam: int, alpha: float) -> Generated:
    """Beam search over rows [b * beam] of `run`; stops once no row's finished top-`beam` can still change."""
    n, eos_id, pad_id, v = decode.max_new_tokens, decode.eos_id, cfg.pad_id, cfg.vocab_size
    neg = jnp.float32(-1e9)

    def step(carry: tuple, visible: int | None) -> tuple:
        i, logits, state, alive_seq, alive_lp, fin_seq, fin_score = carry
        logp = jax.nn.log_softmax(logits[:, :v].astype(jnp.float32), axis=-1).reshape(b, beam, v)
        cand = (alive_lp[:, :, None] + logp).reshape(b, beam * v)
        top_lp, top_idx = jax.lax.top_k(cand, 2 * beam)  # 2K: K may end in EOS
        parent, tok = top_idx // v, (top_idx % v).astype(jnp.int32)
        seqs = jnp.take_along_axis(alive_seq, parent[:, :, None], axis=1)
        seqs = jax.lax.dynamic_update_slice(seqs, tok[:, :, None], (0, 0, i))
        is_eos = tok == eos_id
        # Finished: merge new EOS candidates with the best so far.
        # (A candidate grown from a dead beam keeps its ~-1e9 and is never finished,
        # however much the length penalty divides it.)
        new_fin = jnp.where(is_eos & (top_lp > neg / 2), top_lp / length_penalty(i + 1.0, alpha), neg)
        fin_score, idx = jax.lax.top_k(jnp.concatenate([fin_score, new_fin], axis=1), beam)
        fin_seq = jnp.take_along_axis(jnp.concatenate([fin_seq, seqs], axis=1), idx[:, :, None], axis=1)
        # Alive: best K candidates that did not end.
        alive_lp, idx = jax.lax.top_k(jnp.where(is_eos, neg, top_lp), beam)
        alive_seq = jnp.take_along_axis(seqs, idx[:, :, None], axis=1)
        rows = (jnp.arange(b)[:, None] * beam + jnp.take_along_axis(parent, idx, axis=1)).reshape(-1)
        state = run.reorder(state, rows, visible)  # the surviving beams' states
        logits, state = run.step(jnp.take_along_axis(tok, idx, axis=1).reshape(-1), state, visible)
        return i + 1, logits, state, alive_seq, alive_lp, fin_seq, fin_score

    def running(carry: tuple, hi: int) -> jax.Array:
        i, _, _, _, alive_lp, _, fin_score = carry
        return (i < hi) & ~jnp.all(_settled(alive_lp, fin_score, i, n, alpha))

    carry = (jnp.int32(0), run.logits_bv, run.state, jnp.full((b, beam, n), pad_id, jnp.int32),
             jnp.tile(jnp.where(jnp.arange(beam) == 0, 0.0, neg), (b, 1)),  # only beam 0 starts
             jnp.full((b, beam, n), pad_id, jnp.int32), jnp.full((b, beam), neg))
    for _, hi, visible in run.phases(n):
        carry = jax.lax.while_loop(functools.partial(running, hi=hi), functools.partial(step, visible=visible), carry)
    return dataclasses.replace(_best_hypothesis(*carry[3:], n, alpha, eos_id, neg), steps=carry[0])


def _settled(alive_lp, fin_score, i, n: int, alpha: float) -> jax.Array:
    """[B] True once no alive beam can enter a row's finished top-K, so more steps cannot change the result.

    Log-probs only fall as a beam grows, so the best score an alive beam can
    still finish with is its log-prob now over the largest length penalty of
    the lengths still ahead (i + 1 .. n; the penalty is monotone in length).
    Until K hypotheses have finished the K-th score is -1e9 and nothing settles.
    """
    best_penalty = jnp.maximum(length_penalty(i + 1.0, alpha), length_penalty(float(n), alpha))
    return fin_score[:, -1] > alive_lp[:, 0] / best_penalty


def _best_hypothesis(alive_seq, alive_lp, fin_seq, fin_score, n: int, alpha: float, eos_id: int, neg) -> Generated:
    """The best finished hypothesis per row; rows where nothing finished fall back to their best unfinished beam."""
    alive_score = alive_lp / length_penalty(float(n), alpha)
    use_fin = fin_score[:, 0] > neg / 2
    best_seq = jnp.where(use_fin[:, None], fin_seq[:, 0], alive_seq[:, 0])
    best_score = jnp.where(use_fin, fin_score[:, 0], alive_score[:, 0])
    return Generated(tokens=best_seq, lengths=_lengths(best_seq, eos_id), scores=best_score)


def _check_beam(beam_size: int, length_alpha: float) -> None:
    if not (_is_int(beam_size) and beam_size >= 1):
        raise ValueError(f"beam_size must be an integer >= 1, got {beam_size}")
    if not math.isfinite(length_alpha):
        raise ValueError(f"length_alpha must be a finite number (0 = raw log-prob), got {length_alpha}")


def beam_search_with(prefill: Prefill, model: nnx.Module, inputs: tuple, decode: Decode, beam_size: int,
                     length_alpha: float, layout: sharding.Layout | None = None) -> Generated:
    """The shared beam loop over any family's `prefill` (inputs checked, decode resolved; inputs[0] is [B, ...])."""
    _check_beam(beam_size, length_alpha)
    graphdef, state = nnx.split(model)
    return _beam_search(graphdef, state, inputs, prefill=prefill, decode=decode, beam=beam_size,
                        alpha=float(length_alpha), layout=layout)


def beam_search(model: nnx.Module, prompts: ArrayLike, decode: Decode, *, beam_size: int = 4,
                length_alpha: float = 0.6, lengths: ArrayLike | None = None, src: ArrayLike | None = None,
                src_segment_ids: ArrayLike | None = None, mesh: Mesh | None = None,
                rules: str | sharding.Rules | None = None) -> Generated:
    """Beam search (GNMT length penalty); returns the best hypothesis per row.

    Same prompt conventions and `Decode` spec as `generate`. Beam size 1
    equals greedy decoding. The loop ends early once every row's best
    `beam_size` finished hypotheses can no longer change.
    """
    prompt, valid, p = _as_prompts(model, prompts, lengths)
    decode = _resolve(model.cfg, decode, p)
    src, src_segment_ids = _as_src(model, src, src_segment_ids, prompt.shape[0], "beam search")
    return beam_search_with(_prefill, model, (prompt, valid, src, src_segment_ids), decode, beam_size, length_alpha,
                            sharding.layout(mesh, rules))


@functools.partial(jax.jit, static_argnames=("graphdef", "eos_id"))
def _sequence_logprob(graphdef, state, prompt, valid, cont, src, src_seg, *, eos_id):
    model = nnx.merge(graphdef, state)
    p = prompt.shape[1]
    tokens = jnp.concatenate([prompt, cont], axis=1)
    # Left-aligned prompts: padding is its own (masked) segment, positions start
    # at each row's first real token, exactly as the cache sees them.
    v = jnp.concatenate([valid, jnp.ones(cont.shape, bool)], axis=1)
    pos = jnp.maximum(jnp.cumsum(v, axis=1) - 1, 0)
    seg = v.astype(jnp.int32)
    if model.task == "seq2seq":
        # Cross-attention pairs equal segment ids: every real source token is segment 1 here.
        src_seg = None if src_seg is None else (src_seg != 0).astype(jnp.int32)
        logits = model(src, tokens, src_segment_ids=src_seg, tgt_segment_ids=seg, tgt_positions=pos)
    else:
        logits = model(tokens, positions=pos, segment_ids=seg)
    vocab = model.cfg.vocab_size
    logp = jax.nn.log_softmax(logits[:, p - 1 : -1, :vocab].astype(jnp.float32), axis=-1)
    tok_lp = jnp.take_along_axis(logp, cont[:, :, None], axis=-1)[..., 0]
    is_eos = cont == eos_id
    before = jnp.cumsum(is_eos, axis=1) - is_eos  # EOS seen strictly before
    return jnp.sum(jnp.where(before == 0, tok_lp, 0.0), axis=1)


def sequence_logprob(model: nnx.Module, prompts: ArrayLike, continuation: ArrayLike, *,
                     lengths: ArrayLike | None = None, src: ArrayLike | None = None,
                     src_segment_ids: ArrayLike | None = None, eos_id: int | None = None) -> jax.Array:
    """Sum of log-probs of `continuation` [B, N] after each prompt (parallel forward).

    Used to score a greedy output the same way beam search scores its own.
    Stops counting after the first `eos_id` (default: the config's) in each row.
    Same prompt conventions as `generate`.
    """
    cfg = model.cfg
    prompt, valid, _ = _as_prompts(model, prompts, lengths)
    cont = np.asarray(continuation)
    if cont.ndim != 2 or cont.shape[0] != prompt.shape[0]:
        raise ValueError(f"continuation must be [batch={prompt.shape[0]}, length], got shape {cont.shape}")
    if cont.size and not np.issubdtype(cont.dtype, np.integer):
        raise ValueError(f"continuation must hold integer token ids, got dtype {cont.dtype}")
    bad = (cont < 0) | (cont >= cfg.vocab_size)
    if bad.any():
        i, j = map(int, np.argwhere(bad)[0])
        raise ValueError(f"continuation token id {int(cont[i, j])} at [{i}, {j}] is outside the vocabulary "
                         f"[0, {cfg.vocab_size})")
    src, src_segment_ids = _as_src(model, src, src_segment_ids, prompt.shape[0], "scoring")
    graphdef, state = nnx.split(model)
    return _sequence_logprob(
        graphdef, state, prompt, valid, jnp.asarray(cont, jnp.int32), src, src_segment_ids,
        eos_id=cfg.eos_id if eos_id is None else eos_id,
    )
