"""The recurrent baseline: causal, carried-state decoding == full forward, and the runner end to end."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import tformer
from tformer import rnn


def lm(cell="lstm", **kw):
    return rnn.RNNLM(rnn.RNNConfig(vocab_size=40, d_model=16, num_layers=2, cell=cell, **kw), rngs=nnx.Rngs(0))


def seq2seq(attention="luong", cell="lstm"):
    cfg = rnn.RNNConfig(vocab_size=40, d_model=16, num_layers=2, cell=cell, attention=attention)
    return rnn.RNNSeq2Seq(cfg, rngs=nnx.Rngs(0))


TOKENS = jax.random.randint(jax.random.key(1), (3, 12), 3, 40)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_lm_is_causal(cell):
    model = lm(cell)
    changed = TOKENS.at[:, 7].set((TOKENS[:, 7] + 5) % 40)
    a, b = model(TOKENS), model(changed)
    np.testing.assert_array_equal(a[:, :7], b[:, :7])
    assert float(jnp.abs(a[:, 7:] - b[:, 7:]).max()) > 1e-4  # and the change does reach later positions


@pytest.mark.parametrize("cell", ["lstm", "gru", "optimized_lstm"])
def test_lm_stepwise_equals_full_forward(cell):
    model = lm(cell)
    full = model(TOKENS)
    logits, state = model.extend(TOKENS[:, :5], model.init_state(3))  # prefill, then one token a step
    steps = [logits]
    for t in range(5, TOKENS.shape[1]):
        out, state = model.step(TOKENS[:, t], state)
        steps.append(out[:, None])
    np.testing.assert_allclose(full, jnp.concatenate(steps, axis=1), atol=1e-5)


def test_lm_extend_with_lengths_carries_each_rows_last_real_token():
    model = lm()
    lengths = jnp.array([12, 6, 9])
    padded = jnp.where(jnp.arange(12) < lengths[:, None], TOKENS, 0)
    _, state = model.extend(padded, model.init_state(3), lengths)
    for i, n in enumerate(lengths.tolist()):
        _, alone = model.extend(TOKENS[i : i + 1, :n], model.init_state(1))
        for x, y in zip(jax.tree.leaves(state), jax.tree.leaves(alone)):
            np.testing.assert_allclose(x[i], y[0], atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("attention", ["none", "luong"])
def test_seq2seq_stepwise_equals_teacher_forced(attention):
    model = seq2seq(attention)
    src = jnp.array([[5, 6, 7, 2, 0, 0], [8, 9, 2, 0, 0, 0]])
    tgt = jnp.array([[1, 5, 6, 7, 8, 9], [1, 3, 4, 5, 6, 2]])
    full = model(src, tgt)
    state = model.init_state(src)
    steps = []
    for t in range(tgt.shape[1]):
        out, state = model.step(tgt[:, t], state)
        steps.append(out[:, None])
    np.testing.assert_allclose(full, jnp.concatenate(steps, axis=1), atol=1e-5)
    # Source padding is invisible: the same source with more padding gives the same logits.
    np.testing.assert_allclose(full, model(jnp.pad(src, ((0, 0), (0, 3))), tgt), atol=1e-5)


def test_beam_one_equals_greedy_and_beams_score_at_least_greedy():
    model = seq2seq()
    src = jnp.array([[5, 6, 7, 2], [8, 9, 2, 0]])
    bos = np.ones((2, 1), np.int32)
    seven = tformer.Decode(7, eos_id=-1)
    greedy = rnn.generate(model, bos, seven, src=src)
    beam1 = rnn.beam_search(model, bos, seven, src=src, beam_size=1, length_alpha=0.0)
    np.testing.assert_array_equal(greedy.tokens, beam1.tokens)
    beam4 = rnn.beam_search(model, bos, seven, src=src, beam_size=4, length_alpha=0.0)
    assert np.all(np.asarray(beam4.scores) >= np.asarray(beam1.scores) - 1e-5)


def test_generate_right_padded_prompts_equal_one_by_one():
    model = lm()
    five = tformer.Decode(5, eos_id=-1)
    out = rnn.generate(model, np.asarray(TOKENS[:2, :6]), five, lengths=[6, 3])
    short = rnn.generate(model, np.asarray(TOKENS[1:2, :3]), five)
    np.testing.assert_array_equal(out.tokens[1], short.tokens[0])


def test_bad_config_names_the_field():
    with pytest.raises(ValueError, match=r"RNNConfig.cell: unknown 'rnn'"):
        rnn.RNNConfig(cell="rnn")
    with pytest.raises(ValueError, match=r"RNNConfig.attention: unknown 'bahdanau'"):
        rnn.RNNConfig(attention="bahdanau")


# ---------------------------------------------------------------------------
# Through the runner: same data, metrics, checkpoints, resume and sampling.

pytest.importorskip("ml_collections")
pytest.importorskip("orbax.checkpoint")

from conftest import greedy_by_full_forward, lm_eval_by_full_forward  # noqa: E402

from experiments import decode, sample, train  # noqa: E402
from experiments.configs import lm_tiny_rnn, seq2seq_tiny_rnn  # noqa: E402
from experiments.tasks import build_task  # noqa: E402
from tformer.checkpoint import Checkpointer  # noqa: E402


def tiny_rnn_lm(**overrides):
    c = lm_tiny_rnn.get_config()
    c.model.update(d_model=16, num_layers=1, max_len=64)
    c.data.update(seq_len=16, max_bytes=20_000)
    c.optim.update(warmup_steps=2)
    c.train.update(batch_size=4, num_steps=4, log_every=1, eval_every=100, eval_batches=1, checkpoint_every=100,
                   num_samples=1, sample_tokens=4)
    c.mesh.update(data=1)
    c.train.update(**overrides)
    return c


def _losses(workdir):
    rows = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


@pytest.mark.slow
def test_rnn_lm_resume_equals_uninterrupted(tmp_path, capsys):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"

    def cfg(steps):
        c = tiny_rnn_lm(num_steps=steps)
        c.optim.total_steps = 4
        return c

    result = train.train_and_evaluate(cfg(4), straight)
    assert "--- sample ---" in capsys.readouterr().out
    train.train_and_evaluate(cfg(2), resumed)  # stops (and saves) at step 2
    train.train_and_evaluate(cfg(4), resumed)  # resumes from step 2
    assert sorted(_losses(resumed)) == [1, 2, 3, 4] and _losses(straight) == _losses(resumed)
    a, _ = Checkpointer(straight / "checkpoints").restore()
    b, _ = Checkpointer(resumed / "checkpoints").restore()
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    model, tok, _ = sample.load(straight)
    assert isinstance(model, rnn.RNNLM)
    # The final metrics are the saved model's (rounding as in test_train's LM run).
    assert (result["loss"], result["bits_per_byte"]) == pytest.approx(
        lm_eval_by_full_forward(model, cfg(4), straight), rel=1e-4)
    # Decoding with the carried state continues the prompt exactly as greedy decoding by full forwards does.
    expected = tok.decode(greedy_by_full_forward(model, [tok.bos_id, *tok.encode("def ")], 5, tok.eos_id))
    [text] = decode.complete(model, tok, ["def "], 5, jax.random.key(0))
    assert expected and text == "def " + expected


@pytest.mark.slow
def test_rnn_seq2seq_runs_through_the_runner_with_beam_search(tmp_path, capsys):
    c = seq2seq_tiny_rnn.get_config()
    c.model.update(d_model=16, num_layers=1, max_len=48)
    c.data.update(num_train=64, num_valid=8, src_len=8, tgt_len=40)
    c.optim.update(warmup_steps=2)
    c.train.update(batch_size=8, num_steps=2, log_every=1, eval_every=100, eval_batches=1, checkpoint_every=100,
                   num_samples=1, eval_decode_examples=4, beam_size=2)
    c.mesh.update(data=1)
    result = train.train_and_evaluate(c, tmp_path)
    assert "(reference:" in capsys.readouterr().out
    model, tok, meta = sample.load(tmp_path)
    assert isinstance(model, rnn.RNNSeq2Seq) and meta["config"]["model"]["kind"] == "rnn_seq2seq"
    pairs = build_task(c, tmp_path).valid_pairs[: c.train.eval_decode_examples]
    scores = decode.translation_scores(model, tok, pairs, 8, 40, beam_size=2)  # the run's final eval, redone
    assert (scores["exact_match"], scores["bleu"]) == pytest.approx((result["exact_match"], result["bleu"]))
    src, _ = decode.encode_sources(tok, ["123"], 8)
    expected = tok.decode(greedy_by_full_forward(model, [tok.bos_id], 10, tok.eos_id, src_bs=src))
    assert decode.translate(model, tok, ["123"], 8, 10) == [expected]
