"""Generation is exact: cached greedy == naive re-run of the prefix, EOS/pad rules,
sampling stays in its support, beam search is at least as good as greedy and
scores what it returns, and each call shape compiles once."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import V, make_cfg
from flax import nnx

import tformer.rnn as rnn
from tformer import Decode, DecoderLM, EncoderDecoder, Sampling, beam_search, generate, sample_logits, sequence_logprob

gen_module = importlib.import_module("tformer.generate")  # `tformer.generate` is also the function

N = 6  # new tokens
PROMPTS = np.array([[11, 12, 13, 14, 15], [21, 22, 999, 999, 999], [31, 32, 33, 34, 999]])  # 999: padding
LENGTHS = [5, 2, 4]
SRC = np.array([[5, 6, 7, 8, 9, 10], [11, 12, 0, 0, 0, 0], [13, 14, 15, 16, 0, 0]])


@pytest.fixture(scope="module")
def lm():
    return DecoderLM(make_cfg(positions="rope", num_kv_heads=2, num_layers=2), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def encdec():
    return EncoderDecoder(make_cfg(num_encoder_layers=1, positions="sinusoidal"), rngs=nnx.Rngs(1))


def naive_greedy(model, prompts, lengths, n, src=None):
    """Greedy decoding with no cache: the whole prefix re-run for every new token.

    Each row lives in a fixed buffer from position 0; tokens after the prefix
    are causally invisible, so one compiled forward serves every step.
    """
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda *a: nnx.merge(graphdef, state)(*a))
    b = len(lengths)
    buf = np.zeros((b, max(lengths) + n), np.int32)
    for i, length in enumerate(lengths):
        buf[i, :length] = prompts[i, :length]
    out = np.zeros((b, n), np.int32)
    for step in range(n):
        args = (jnp.asarray(buf),) if src is None else (jnp.asarray(src), jnp.asarray(buf))
        logits = np.asarray(forward(*args))
        for i, length in enumerate(lengths):
            out[i, step] = np.argmax(logits[i, length + step - 1, :V])
            buf[i, length + step] = out[i, step]
    return out


def stop_at(tokens, eos, pad):
    """Reference EOS rule: everything after a row's first EOS is pad; length counts the EOS."""
    tokens = tokens.copy()
    lengths = np.full(len(tokens), tokens.shape[1])
    for i, row in enumerate(tokens):
        hits = np.flatnonzero(row == eos)
        if hits.size:
            tokens[i, hits[0] + 1 :] = pad
            lengths[i] = hits[0] + 1
    return tokens, lengths


@pytest.fixture(scope="module")
def lm_naive(lm):
    return naive_greedy(lm, PROMPTS, LENGTHS, N)


@pytest.fixture(scope="module")
def encdec_naive(encdec):
    return naive_greedy(encdec, np.full((3, 1), encdec.cfg.bos_id), [1, 1, 1], N, src=SRC)


def test_greedy_matches_naive_decoder(lm, lm_naive):
    assert len(set(lm_naive[0].tolist())) > 1, "a degenerate model would make this test weak"
    # An EOS that row 0 emits mid-way, so both the stop and the pass-through paths run.
    eos = int(lm_naive[0, 2])
    out = generate(lm, PROMPTS, Decode(N, eos_id=eos), lengths=LENGTHS)
    want, want_len = stop_at(lm_naive, eos, lm.cfg.pad_id)
    assert want_len[0] <= 3 and (want_len == N).any()
    np.testing.assert_array_equal(np.asarray(out.tokens), want)
    np.testing.assert_array_equal(np.asarray(out.lengths), want_len)


def test_greedy_matches_naive_encdec(encdec, encdec_naive):
    bos = np.full((3, 1), encdec.cfg.bos_id)
    out = generate(encdec, bos, Decode(N, eos_id=-1), src=SRC)
    np.testing.assert_array_equal(np.asarray(out.tokens), encdec_naive)
    np.testing.assert_array_equal(np.asarray(out.lengths), [N] * 3)


def test_decode_phases_cover_every_step_and_see_every_filled_slot():
    for prompt_len, n, length, chunk in [(16, 512, 528, None), (16, 512, 1024, None), (5, 6, 11, 2), (3, 1, 4, None),
                                         (4, 9000, 9004, None), (2, 10, 12, 3), (2, 10, 12, 100)]:
        phases = gen_module.decode_phases(prompt_len, n, length, chunk)
        assert [lo for lo, _, _ in phases] == [0, *(hi for _, hi, _ in phases)][: len(phases)]  # contiguous
        assert (phases[-1][1] if phases else 0) == n - 1  # every step after the first token
        for lo, hi, visible in phases:
            # Step s writes slot prompt_len + s and must see it; nothing past the cache.
            assert prompt_len + hi <= visible <= length and visible == min(length, prompt_len + hi)
            if chunk is None:
                assert hi - lo >= min(gen_module.MIN_CHUNK, n - 1 - lo)
        assert len(phases) <= (gen_module.MAX_PHASES if chunk is None else -(-(n - 1) // chunk))


@pytest.mark.parametrize("chunk", [1, 2, 5])
def test_phased_decode_is_exact(chunk, lm, lm_naive, encdec, encdec_naive):
    # Phases only narrow which cache slots attention reads: same tokens as the naive re-run, any chunk,
    # an oversized cache, EOS mid-way, sampling (same key per step).
    eos = int(lm_naive[0, 2])
    want, want_len = stop_at(lm_naive, eos, lm.cfg.pad_id)
    for cache_len in (None, 20):
        out = generate(lm, PROMPTS, Decode(N, eos_id=eos, cache_len=cache_len, chunk=chunk), lengths=LENGTHS)
        np.testing.assert_array_equal(np.asarray(out.tokens), want)
        np.testing.assert_array_equal(np.asarray(out.lengths), want_len)
    bos = np.full((3, 1), encdec.cfg.bos_id)
    out = generate(encdec, bos, Decode(N, eos_id=-1, chunk=chunk), src=SRC)
    np.testing.assert_array_equal(np.asarray(out.tokens), encdec_naive)
    kw = dict(lengths=LENGTHS, rng=jax.random.key(3))
    hot = Sampling(temperature=1.0)
    phased = generate(lm, PROMPTS, Decode(N, eos_id=-1, chunk=chunk), hot, **kw)
    np.testing.assert_array_equal(np.asarray(phased.tokens),
                                  np.asarray(generate(lm, PROMPTS, Decode(N, eos_id=-1), hot, **kw).tokens))
    # Beam search reorders the cache per step: in phases, only the slots filled so far.
    kw = dict(lengths=LENGTHS, beam_size=3)
    want = beam_search(lm, PROMPTS, Decode(N, eos_id=eos), **kw)
    got = beam_search(lm, PROMPTS, Decode(N, eos_id=eos, chunk=chunk), **kw)
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
    np.testing.assert_allclose(np.asarray(got.scores), np.asarray(want.scores), rtol=1e-6)


def test_generate_compiles_once_per_call_shape(lm):
    before = gen_module._generate._cache_size()
    eos = -1
    a = generate(lm, PROMPTS, Decode(N, eos_id=eos), lengths=LENGTHS)
    after_first = gen_module._generate._cache_size()
    # Other token values, other lengths, another model of the same config: no retrace.
    other = DecoderLM(lm.cfg, rngs=nnx.Rngs(42))
    b = generate(other, PROMPTS[::-1] % V, Decode(N, eos_id=eos), lengths=LENGTHS[::-1])
    generate(lm, PROMPTS, Decode(N, eos_id=eos), lengths=[1, 1, 1])
    assert gen_module._generate._cache_size() == after_first <= before + 1
    assert not np.array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    # A new shape does compile.
    generate(lm, PROMPTS[:2], Decode(N, eos_id=eos), lengths=LENGTHS[:2])
    assert gen_module._generate._cache_size() == after_first + 1
    # Temperature and top_p are values: sweeping them reuses one program.
    kw = dict(lengths=LENGTHS, rng=jax.random.key(0))
    hot = generate(lm, PROMPTS, Decode(N, eos_id=eos), Sampling(temperature=0.5, top_p=0.9), **kw)
    size = gen_module._generate._cache_size()
    hotter = generate(lm, PROMPTS, Decode(N, eos_id=eos), Sampling(temperature=50.0, top_p=0.95), **kw)
    assert gen_module._generate._cache_size() == size
    assert not np.array_equal(np.asarray(hot.tokens), np.asarray(hotter.tokens))


# ---------------------------------------------------------------------------
# Sampling.

LOGITS = jnp.asarray(np.random.default_rng(0).normal(size=(1, 10)) * 1.5, jnp.float32)
DRAWS = 4000


def draws(sampling, key=0):
    sample = jax.jit(lambda logits, rng: sample_logits(logits, rng, sampling))
    return np.asarray(sample(jnp.broadcast_to(LOGITS, (DRAWS, 10)), jax.random.key(key)))


def test_top_k_never_leaves_the_top_k():
    got = draws(Sampling(temperature=1.0, top_k=3))
    top3 = set(np.argsort(-np.asarray(LOGITS[0]))[:3].tolist())
    assert set(got.tolist()) == top3  # inside, and every member reachable


def test_top_p_never_leaves_the_nucleus():
    probs = np.asarray(jax.nn.softmax(LOGITS[0]))
    order = np.argsort(-probs)
    mass = np.cumsum(probs[order])
    size = int(np.searchsorted(mass, 0.7) + 1)  # smallest prefix with mass >= 0.7
    nucleus = set(order[:size].tolist())
    assert 1 < size < 10
    got = draws(Sampling(temperature=1.0, top_p=0.7))
    assert set(got.tolist()) == nucleus


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sampling_distribution_matches_softmax(temperature):
    probs = np.asarray(jax.nn.softmax(LOGITS[0] / temperature))
    counts = np.bincount(draws(Sampling(temperature=temperature), key=3), minlength=10)
    expected = probs * DRAWS
    chi2 = float(np.sum((counts - expected) ** 2 / expected))
    assert chi2 < 35.0, (chi2, counts, expected)  # 9 dof: p < 1e-4 for a correct sampler
    # A sampler ignoring the temperature would fail against the other temperature.
    wrong = np.asarray(jax.nn.softmax(LOGITS[0] / (3.0 - temperature))) * DRAWS
    assert float(np.sum((counts - wrong) ** 2 / wrong)) > 35.0


def test_sampling_is_reproducible_and_never_picks_padded_ids(lm):
    cfg = lm.cfg
    assert cfg.vocab_size % 128 and cfg.padded_vocab > cfg.vocab_size
    prompts = np.tile(PROMPTS, (32, 1))  # 96 rows x 6 tokens
    lengths = LENGTHS * 32
    # A temperature so high that -1e9 / T no longer hides the padded ids.
    kw = dict(decode=Decode(N, eos_id=-1), sampling=Sampling(temperature=1e9), lengths=lengths)
    a = np.asarray(generate(lm, prompts, rng=jax.random.key(1), **kw).tokens)
    a2 = np.asarray(generate(lm, prompts, rng=jax.random.key(1), **kw).tokens)
    b = np.asarray(generate(lm, prompts, rng=jax.random.key(2), **kw).tokens)
    np.testing.assert_array_equal(a, a2)
    assert (a != b).mean() > 0.5
    assert a.max() < cfg.vocab_size and b.max() < cfg.vocab_size and a.min() >= 0
    assert len(np.unique(a)) > cfg.vocab_size // 2, "near-uniform over the real vocabulary"


# ---------------------------------------------------------------------------
# Beam search.


def test_beam_size_one_is_greedy(lm, lm_naive):
    out = beam_search(lm, PROMPTS, Decode(N, eos_id=-1), lengths=LENGTHS, beam_size=1, length_alpha=0.0)
    np.testing.assert_array_equal(np.asarray(out.tokens), lm_naive)


@pytest.mark.parametrize("kind", ["decoder", "encdec"])
def test_beam_beats_greedy_and_scores_its_output(kind, lm, encdec, lm_naive, encdec_naive):
    if kind == "decoder":
        model, prompts, kw, greedy = lm, PROMPTS, dict(lengths=LENGTHS), lm_naive
    else:
        model, prompts, kw, greedy = encdec, np.full((3, 1), encdec.cfg.bos_id), dict(src=SRC), encdec_naive
    # A frequent greedy token as EOS, so hypotheses finish at different lengths.
    eos = int(np.bincount(greedy.ravel()).argmax())
    out = beam_search(model, prompts, Decode(N, eos_id=eos), beam_size=4, length_alpha=0.0, **kw)
    greedy_tokens, _ = stop_at(greedy, eos, model.cfg.pad_id)
    greedy_lp = np.asarray(sequence_logprob(model, prompts, greedy_tokens, eos_id=eos, **kw))
    beam_lp = np.asarray(sequence_logprob(model, prompts, np.asarray(out.tokens), eos_id=eos, **kw))
    np.testing.assert_allclose(np.asarray(out.scores), beam_lp, atol=1e-4, rtol=1e-5)
    assert (np.asarray(out.scores) >= greedy_lp - 1e-4).all(), (out.scores, greedy_lp)
    tokens, lengths = stop_at(np.asarray(out.tokens), eos, model.cfg.pad_id)
    np.testing.assert_array_equal(np.asarray(out.tokens), tokens)
    np.testing.assert_array_equal(np.asarray(out.lengths), lengths)


@pytest.mark.parametrize("family", ["transformer", "rnn"])
def test_greedy_and_beam_loops_stop_at_the_step_every_row_has_finished(family, lm):
    # One loop serves both families. Without EOS they run every step; with an EOS first emitted as greedy's
    # k-th token `generate` ends after k model steps; beam search (K=1, no length penalty) with greedy's first
    # token as EOS has finished a hypothesis no alive beam can beat after one step, and ends there.
    if family == "rnn":
        model, gen, beam = rnn.RNNLM(rnn.RNNConfig(vocab_size=V, d_model=16), rngs=nnx.Rngs(0)), rnn.generate, \
            rnn.beam_search
    else:
        model, gen, beam = lm, generate, beam_search
    prompt = PROMPTS[:1] % V
    full = gen(model, prompt, Decode(N, eos_id=-1))
    assert int(full.steps) == N - 1
    assert int(beam(model, prompt, Decode(N, eos_id=-1), beam_size=1, length_alpha=0.0).steps) == N
    tokens = np.asarray(full.tokens[0]).tolist()
    k = next(i for i in range(2, N - 1) if tokens[i] not in tokens[:i])  # the EOS's first appearance
    out = gen(model, prompt, Decode(N, eos_id=tokens[k]))
    assert int(out.steps) == k and np.asarray(out.lengths).tolist() == [k + 1]
    one = beam(model, prompt, Decode(N, eos_id=tokens[0]), beam_size=1, length_alpha=0.0)
    assert int(one.steps) == 1 and np.asarray(one.tokens).tolist() == [[tokens[0]] + [model.cfg.pad_id] * (N - 1)]


def test_beam_search_compiles_once_per_call_shape(lm):
    kw = dict(decode=Decode(N, eos_id=-1), beam_size=1, length_alpha=0.0)
    beam_search(lm, PROMPTS, lengths=LENGTHS, **kw)
    size = gen_module._beam_search._cache_size()
    beam_search(lm, PROMPTS[::-1] % V, lengths=[1, 2, 3], **kw)
    assert gen_module._beam_search._cache_size() == size


# ---------------------------------------------------------------------------
# Errors.


def test_generation_errors(lm, encdec):
    p = PROMPTS % V
    with pytest.raises(ValueError, match=r"prompt length 5 \+ max_new_tokens 20 = 25 exceeds the model's max_len=24"):
        generate(lm, p, Decode(20))
    with pytest.raises(ValueError, match=r"= 9 exceeds cache_len=8"):
        generate(lm, p, Decode(4, cache_len=8))
    bad = p.copy()
    bad[1, 1] = V + 5
    with pytest.raises(ValueError, match=rf"prompt token id {V + 5} at \[1, 1\] is outside the vocabulary \[0, {V}\)"):
        generate(lm, bad, Decode(2))
    bad[1, 1] = -3
    with pytest.raises(ValueError, match=r"prompt token id -3 at \[1, 1\]"):
        beam_search(lm, bad, Decode(2))
    with pytest.raises(ValueError, match=r"temperature > 0 needs an explicit rng"):
        generate(lm, p, Decode(2), Sampling(temperature=0.7))
    with pytest.raises(ValueError, match=r"Sampling.temperature must be a finite number >= 0, got -1"):
        generate(lm, p, Decode(2), Sampling(temperature=-1.0))
    with pytest.raises(ValueError, match=r"Sampling.top_k must be an integer >= 1 or None, got 0"):
        generate(lm, p, Decode(2), Sampling(temperature=1.0, top_k=0), rng=jax.random.key(0))
    for top_p in (0.0, 1.5):
        with pytest.raises(ValueError, match=rf"Sampling.top_p must be in \(0, 1\] or None, got {top_p}"):
            generate(lm, p, Decode(2), Sampling(temperature=1.0, top_p=top_p), rng=jax.random.key(0))
    with pytest.raises(ValueError, match=r"lengths must be \[batch\] with 1 <= length <= 5, got \[5, 0, 4\]"):
        generate(lm, p, Decode(2), lengths=[5, 0, 4])
    with pytest.raises(ValueError, match=r"Decode.max_new_tokens must be an integer >= 1, got 0"):
        generate(lm, p, Decode(0))
    with pytest.raises(ValueError, match=r"Decode.chunk must be an integer >= 1 \(decode steps per phase\) .* got 0"):
        generate(lm, p, Decode(2, chunk=0))
    with pytest.raises(ValueError, match=r"Decode.chunk must be an integer >= 1 \(decode steps per phase\) .* got -1"):
        beam_search(lm, p, Decode(2, chunk=-1))
    with pytest.raises(ValueError, match=r"beam_size must be an integer >= 1, got 0"):
        beam_search(lm, p, Decode(2), beam_size=0)
    bos = np.ones((3, 1), int)
    with pytest.raises(ValueError, match=r"EncoderDecoder generation needs src="):
        generate(encdec, bos, Decode(2))
    with pytest.raises(ValueError, match=r"EncoderDecoder beam search needs src="):
        beam_search(encdec, bos, Decode(2))
    with pytest.raises(ValueError, match=r"src must be \[batch=3, src_len\] to match the prompts, got shape \(2, 6\)"):
        generate(encdec, bos, Decode(2), src=SRC[:2])


def test_library_inputs_are_checked_when_concrete(lm):
    """Bad values that JAX would otherwise accept silently (NaN, floats truncated, ids out of range)."""
    p = PROMPTS % V
    with pytest.raises(ValueError, match=r"Sampling.temperature must be a finite number >= 0, got nan"):
        generate(lm, p, Decode(2), Sampling(temperature=float("nan")), rng=jax.random.key(0))
    with pytest.raises(ValueError, match=r"Sampling.top_k must be an integer >= 1 or None, got 2.5"):
        Sampling(temperature=1.0, top_k=2.5)
    with pytest.raises(ValueError, match=r"Decode.max_new_tokens must be an integer >= 1, got 2.5"):
        Decode(2.5)
    with pytest.raises(ValueError, match=r"lengths must be integers \(tokens per prompt\), got \[2.7, 5.0, 4.0\]"):
        generate(lm, p, Decode(2), lengths=[2.7, 5.0, 4.0])
    with pytest.raises(ValueError, match=r"length_alpha must be a finite number \(0 = raw log-prob\), got nan"):
        beam_search(lm, p, Decode(2), length_alpha=float("nan"))
    for bad in (-1, V):
        cont = np.full((3, 2), 5)
        cont[2, 1] = bad
        with pytest.raises(ValueError, match=rf"continuation token id {bad} at \[2, 1\] is outside the vocabulary"):
            sequence_logprob(lm, p, cont)
    with pytest.raises(ValueError, match=r"decode must be a tformer.Decode\(max_new_tokens=...\), got 4"):
        generate(lm, p, 4)
