"""Generation: parallel prefill, then one jitted `lax.scan` over new tokens.

The whole loop is one XLA program per call shape: the KV cache is the scan
carry and is updated in place, tokens never visit the host between steps, and
layer weights are unstacked once before the loop. Works for `DecoderLM`
(continue a prompt) and `EncoderDecoder` (encode the source once, then decode
from BOS).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tformer import sharding as shd


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How to pick a token from logits. temperature 0 = greedy."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"Sampling.temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"Sampling.top_k must be >= 1 or None, got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"Sampling.top_p must be in (0, 1] or None, got {self.top_p}")


def sample_logits(logits_bv: jax.Array, rng: jax.Array, s: Sampling) -> jax.Array:
    """One token id per row from fp32 logits, honouring top-k then top-p."""
    if s.temperature == 0.0:
        return jnp.argmax(logits_bv.astype(jnp.float32), axis=-1).astype(jnp.int32)
    use_top_p = s.top_p is not None and s.top_p < 1.0
    return _sample(logits_bv, rng, s.temperature, s.top_k, s.top_p if use_top_p else None)


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
    lens = np.full((b,), t, np.int32) if lengths is None else np.asarray(lengths, np.int32)
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


def _check_length(cfg, prompt_len: int, max_new_tokens: int, cache_len: int | None) -> int:
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    need = prompt_len + max_new_tokens
    if need > cfg.max_len:
        raise ValueError(
            f"prompt length {prompt_len} + max_new_tokens {max_new_tokens} = {need} exceeds the model's "
            f"max_len={cfg.max_len} (the position/cache bound); generate fewer tokens or shorten the prompt"
        )
    if cache_len is not None and need > cache_len:
        raise ValueError(
            f"prompt length {prompt_len} + max_new_tokens {max_new_tokens} = {need} exceeds cache_len={cache_len}; "
            "pass a larger cache_len or generate fewer tokens"
        )
    return cache_len or need


def _is_encdec(model) -> bool:
    return hasattr(model, "encoder")


def _as_src(model, src, src_segment_ids, batch: int, what: str):
    """Source arrays for an EncoderDecoder (None for a DecoderLM), checked against the batch."""
    if not _is_encdec(model):
        return None, None
    if src is None:
        raise ValueError(f"EncoderDecoder {what} needs src=[batch, src_len] source tokens")
    src = jnp.asarray(src, jnp.int32)
    if src.ndim != 2 or src.shape[0] != batch:
        raise ValueError(f"src must be [batch={batch}, src_len] to match the prompts, got shape {src.shape}")
    return src, None if src_segment_ids is None else jnp.asarray(src_segment_ids, jnp.int32)


def _start(model, prompt, valid, length, src, src_segment_ids):
    """Fresh cache with the prompt prefilled (in one parallel pass)."""
    if _is_encdec(model):
        cache = model.init_cache(src, length, src_segment_ids=src_segment_ids)
    else:
        cache = model.init_cache(prompt.shape[0], length)
    layers = model.decode_layers()
    logits, cache = model.extend(prompt, cache, valid, layers)
    return logits[:, -1], cache, layers


# ---------------------------------------------------------------------------
# Sampling / greedy.


def _with_rules(fn):
    """Trace `fn` under the (mesh, rules) passed as the static `plan` argument."""

    def wrapped(*args, plan=None, **kw):
        mesh, rules = plan if plan is not None else (None, None)
        with shd.use_rules(mesh, None if rules is None else dict(rules)):
            return fn(*args, **kw)

    wrapped.__name__ = fn.__name__
    return wrapped


def _plan(mesh, rules):
    if mesh is None:
        return None
    return (mesh, tuple(sorted(shd.rules_for(rules if rules is not None else "dp").items())))


# The decode loop runs in phases of `chunk` steps, and a phase's attention reads
# only the cache slots it can see (prompt + tokens up to the phase's end): each
# phase is its own lax.scan with a static slice, so no step reads the empty
# tail of the cache. More phases = fewer slots read, more step bodies to compile.
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


def _check_decode_chunk(decode_chunk: int | None) -> None:
    if decode_chunk is not None and decode_chunk < 1:
        raise ValueError(f"decode_chunk must be >= 1 (decode steps per phase) or None, got {decode_chunk}")


@functools.partial(
    jax.jit, static_argnames=("graphdef", "n", "length", "greedy", "top_k", "eos_id", "pad_id", "plan", "chunk")
)
@_with_rules
def _generate(graphdef, state, prompt, valid, rng, src, src_seg, temperature, top_p, *, n, length, greedy, top_k,
              eos_id, pad_id, chunk):
    model = nnx.merge(graphdef, state)
    vocab = model.cfg.vocab_size  # sample real ids only: -1e9 / temperature is not -inf

    def pick(logits_bv, key):
        logits_bv = logits_bv[:, :vocab]
        if greedy:
            return jnp.argmax(logits_bv.astype(jnp.float32), axis=-1).astype(jnp.int32)
        return _sample(logits_bv, key, temperature, top_k, top_p)

    last_logits, cache, layers = _start(model, prompt, valid, length, src, src_seg)
    keys = jax.random.split(rng, n)
    first = pick(last_logits, keys[0])
    done = first == eos_id

    def phase(visible):
        def step(carry, key):
            tok, cache, done = carry
            logits, cache = model.extend(tok[:, None], cache, None, layers, visible=visible)
            nxt = jnp.where(done, pad_id, pick(logits[:, 0], key))
            return (nxt, cache, done | (nxt == eos_id)), nxt

        return step

    carry, new = (first, cache, done), [first[:, None]]
    for lo, hi, visible in decode_phases(prompt.shape[1], n, length, chunk):
        carry, rest = jax.lax.scan(phase(visible), carry, keys[1 + lo : 1 + hi])
        new.append(rest.T)
    tokens = jnp.concatenate(new, axis=1)
    is_eos = tokens == eos_id
    lengths = jnp.where(is_eos.any(1), jnp.argmax(is_eos, axis=1) + 1, n)
    return Generated(tokens=tokens, lengths=lengths.astype(jnp.int32))


def generate(
    model,
    prompts,
    *,
    max_new_tokens: int,
    lengths=None,
    rng: jax.Array | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    cache_len: int | None = None,
    src=None,
    src_segment_ids=None,
    mesh=None,
    rules=None,
    decode_chunk: int | None = None,
) -> Generated:
    """Generate `max_new_tokens` after each prompt.

    prompts: [B, P] token ids, right-padded; `lengths` [B] gives each row's
      real length (default: all P). For an EncoderDecoder, prompts is usually
      a column of BOS and `src` [B, S] is the source.
    rng: PRNG key, needed when temperature > 0.
    eos_id: stop token (default: the config's); rows that emitted it produce
      pad_id afterwards. Pass -1 to never stop.
    mesh, rules: trace under these sharding rules (e.g. params sharded with
      the "tp" preset): activations and the KV cache get the matching
      constraints (batch over data axes, kv heads over `tensor`).
    decode_chunk: decode steps per phase; a phase attends only over the cache
      slots filled by its end (default: >= 128 steps, <= 8 phases). Same
      tokens for any value; smaller reads less cache, compiles more.
    """
    cfg = model.cfg
    sampling = Sampling(temperature, top_k, top_p)  # validates
    if temperature > 0 and rng is None:
        raise ValueError("sampling with temperature > 0 needs an explicit rng key (jax.random.key(seed))")
    prompt, valid, p = _as_prompts(model, prompts, lengths)
    length = _check_length(cfg, p, max_new_tokens, cache_len)
    _check_decode_chunk(decode_chunk)
    src, src_segment_ids = _as_src(model, src, src_segment_ids, prompt.shape[0], "generation")
    graphdef, state = nnx.split(model)
    return _generate(
        graphdef, state, prompt, valid, jax.random.key(0) if rng is None else rng, src, src_segment_ids,
        # Values, not compile-time constants: a new temperature or top_p reuses the program.
        jnp.float32(temperature if temperature > 0 else 1.0),
        jnp.float32(top_p) if sampling.top_p is not None and sampling.top_p < 1.0 else None,
        n=max_new_tokens, length=length, greedy=temperature == 0.0, top_k=None if temperature == 0.0 else top_k,
        eos_id=cfg.eos_id if eos_id is None else eos_id, pad_id=cfg.pad_id, plan=_plan(mesh, rules),
        chunk=decode_chunk,
    )


# ---------------------------------------------------------------------------
# Beam search.


def length_penalty(length, alpha: float):
    """GNMT length normalisation ((5 + |Y|) / 6) ** alpha; alpha 0 = raw log-prob."""
    return ((5.0 + length) / 6.0) ** alpha


@functools.partial(
    jax.jit, static_argnames=("graphdef", "n", "length", "beam", "alpha", "eos_id", "pad_id", "plan", "chunk"))
@_with_rules
def _beam_search(graphdef, state, prompt, valid, src, src_seg, *, n, length, beam, alpha, eos_id, pad_id, chunk):
    model = nnx.merge(graphdef, state)
    b = prompt.shape[0]
    rep = lambda x: None if x is None else jnp.repeat(x, beam, axis=0)  # noqa: E731
    logits, cache, layers = _start(model, rep(prompt), rep(valid), length, rep(src), rep(src_seg))
    neg = jnp.float32(-1e9)

    alive_seq = jnp.full((b, beam, n), pad_id, jnp.int32)
    alive_lp = jnp.tile(jnp.where(jnp.arange(beam) == 0, 0.0, neg), (b, 1))  # only beam 0 starts
    fin_seq = jnp.full((b, beam, n), pad_id, jnp.int32)
    fin_score = jnp.full((b, beam), neg)

    def step(carry, i, visible):
        logits, cache, alive_seq, alive_lp, fin_seq, fin_score = carry
        v = model.cfg.vocab_size
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
        all_score = jnp.concatenate([fin_score, new_fin], axis=1)
        all_seq = jnp.concatenate([fin_seq, seqs], axis=1)
        fin_score, idx = jax.lax.top_k(all_score, beam)
        fin_seq = jnp.take_along_axis(all_seq, idx[:, :, None], axis=1)
        # Alive: best K candidates that did not end.
        alive_cand = jnp.where(is_eos, neg, top_lp)
        alive_lp, idx = jax.lax.top_k(alive_cand, beam)
        alive_seq = jnp.take_along_axis(seqs, idx[:, :, None], axis=1)
        alive_parent = jnp.take_along_axis(parent, idx, axis=1)
        last = jnp.take_along_axis(tok, idx, axis=1).reshape(b * beam)
        flat = (jnp.arange(b)[:, None] * beam + alive_parent).reshape(-1)

        def reorder(x):  # follow the surviving beams; only the slots this phase can have filled
            return x[flat] if x.ndim == 1 or visible >= x.shape[1] else x.at[:, :visible].set(x[flat, :visible])

        cache = dataclasses.replace(
            cache, k=jax.tree.map(reorder, cache.k), v=jax.tree.map(reorder, cache.v),
            positions=reorder(cache.positions), valid=reorder(cache.valid), next_pos=reorder(cache.next_pos),
        )
        logits, cache = model.extend(last[:, None], cache, None, layers, visible=visible)
        return (logits[:, 0], cache, alive_seq, alive_lp, fin_seq, fin_score), None

    carry = (logits, cache, alive_seq, alive_lp, fin_seq, fin_score)
    # Step i writes slot p + i: the phases of `generate`, over n steps (see decode_phases).
    for lo, hi, visible in decode_phases(prompt.shape[1], n + 1, length, chunk):
        carry, _ = jax.lax.scan(functools.partial(step, visible=visible), carry, jnp.arange(lo, hi))
    _, _, alive_seq, alive_lp, fin_seq, fin_score = carry
    # Rows where nothing finished fall back to their best unfinished beam.
    alive_score = alive_lp / length_penalty(float(n), alpha)
    use_fin = fin_score[:, 0] > neg / 2
    best_seq = jnp.where(use_fin[:, None], fin_seq[:, 0], alive_seq[:, 0])
    best_score = jnp.where(use_fin, fin_score[:, 0], alive_score[:, 0])
    is_eos = best_seq == eos_id
    lengths = jnp.where(is_eos.any(1), jnp.argmax(is_eos, axis=1) + 1, n).astype(jnp.int32)
    return Generated(tokens=best_seq, lengths=lengths, scores=best_score)


def beam_search(
    model,
    prompts,
    *,
    max_new_tokens: int,
    beam_size: int = 4,
    length_alpha: float = 0.6,
    lengths=None,
    eos_id: int | None = None,
    src=None,
    src_segment_ids=None,
    mesh=None,
    rules=None,
    decode_chunk: int | None = None,
) -> Generated:
    """Beam search (GNMT length penalty); returns the best hypothesis per row.

    Same prompt conventions and `decode_chunk` as `generate`. Beam size 1
    equals greedy decoding.
    """
    cfg = model.cfg
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    _check_decode_chunk(decode_chunk)
    prompt, valid, p = _as_prompts(model, prompts, lengths)
    length = _check_length(cfg, p, max_new_tokens, None)
    src, src_segment_ids = _as_src(model, src, src_segment_ids, prompt.shape[0], "beam search")
    graphdef, state = nnx.split(model)
    return _beam_search(
        graphdef, state, prompt, valid, src, src_segment_ids,
        n=max_new_tokens, length=length, beam=beam_size, alpha=float(length_alpha),
        eos_id=cfg.eos_id if eos_id is None else eos_id, pad_id=cfg.pad_id, plan=_plan(mesh, rules),
        chunk=decode_chunk,
    )


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
    if _is_encdec(model):
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


def sequence_logprob(model, prompts, continuation, *, lengths=None, src=None, src_segment_ids=None,
                     eos_id: int | None = None) -> jax.Array:
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
    src, src_segment_ids = _as_src(model, src, src_segment_ids, prompt.shape[0], "scoring")
    graphdef, state = nnx.split(model)
    return _sequence_logprob(
        graphdef, state, prompt, valid, jnp.asarray(cont, jnp.int32), src, src_segment_ids,
        eos_id=cfg.eos_id if eos_id is None else eos_id,
    )
