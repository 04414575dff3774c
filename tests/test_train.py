"""The experiment runner end to end: train, evaluate, checkpoint, resume, preempt, fail clearly."""

import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

pytest.importorskip("ml_collections")
pytest.importorskip("orbax.checkpoint")

from experiments import decode, train  # noqa: E402
from experiments.configs import lm_tiny, seq2seq_tiny  # noqa: E402
from tformer.checkpoint import Checkpointer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def tiny_lm(**train_overrides):
    c = lm_tiny.get_config()
    c.model.update(d_model=32, num_heads=2, num_layers=1, d_ff=64, max_len=64)
    c.data.update(seq_len=32, max_bytes=30_000)
    c.optim.update(warmup_steps=2, total_steps=0)
    c.train.update(batch_size=8, num_steps=6, log_every=2, eval_every=3, eval_batches=2, checkpoint_every=3,
                   num_samples=1, sample_tokens=8)
    c.mesh.update(data=1)
    c.train.update(**train_overrides)
    return c


def tiny_seq2seq(**train_overrides):
    c = seq2seq_tiny.get_config()
    c.model.update(d_model=32, num_heads=2, num_layers=1, num_encoder_layers=1, d_ff=64, max_len=48)
    c.data.update(num_train=200, num_valid=16, src_len=8, tgt_len=40)
    c.optim.update(warmup_steps=2)
    c.train.update(batch_size=8, num_steps=4, log_every=2, eval_every=4, eval_batches=1, checkpoint_every=4,
                   num_samples=1, eval_decode_examples=8)
    c.mesh.update(data=1)
    c.train.update(**train_overrides)
    return c


def read_jsonl(workdir):
    return [json.loads(l) for l in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def test_lm_run_end_to_end(tmp_path, capsys):
    result = train.train_and_evaluate(tiny_lm(), tmp_path)
    assert math.isfinite(result["bits_per_byte"]) and result["bits_per_byte"] > 0
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]), rel=1e-5)
    assert Checkpointer(tmp_path / "checkpoints").all_steps()[-1] == 6
    rows = read_jsonl(tmp_path)
    assert [r["step"] for r in rows if r["split"] == "train"] == [2, 3, 4, 6]
    assert {"loss", "lr", "tokens_per_s", "tflops"} <= set(rows[0])
    assert (tmp_path / "loss_curve.png").stat().st_size > 1000
    assert list((tmp_path / "tb").iterdir()), "TensorBoard events written"
    assert "--- sample ---" in capsys.readouterr().out
    # sample.py's loader restores the run and generates.
    from experiments import sample

    model, tok, _ = sample.load(tmp_path)
    [text] = decode.complete(model, tok, ["def "], 5, jax.random.key(0))
    assert text.startswith("def ")


def test_seq2seq_run_end_to_end(tmp_path, capsys):
    result = train.train_and_evaluate(tiny_seq2seq(), tmp_path)
    assert 0.0 <= result["exact_match"] <= 1.0 and 0.0 <= result["bleu"] <= 100.0
    assert "(reference:" in capsys.readouterr().out
    from experiments import sample

    model, tok, meta = sample.load(tmp_path)
    assert meta["config"]["model"]["kind"] == "seq2seq"
    assert len(decode.translate(model, tok, ["123", "45"], 8, 10)) == 2


def _params(workdir):
    state, _ = Checkpointer(Path(workdir) / "checkpoints").restore()
    return state.params


def test_resume_equals_uninterrupted(tmp_path):
    n = 4
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"

    def cfg(steps):
        c = tiny_lm(num_steps=steps, log_every=1, eval_every=100, checkpoint_every=100)
        c.optim.total_steps = 2 * n  # the same schedule whether or not interrupted
        return c

    train.train_and_evaluate(cfg(2 * n), straight)
    train.train_and_evaluate(cfg(n), resumed)  # stops (and saves) at step n
    train.train_and_evaluate(cfg(2 * n), resumed)  # resumes from step n

    loss = lambda w: {r["step"]: r["loss"] for r in read_jsonl(w) if r["split"] == "train"}  # noqa: E731
    assert sorted(loss(resumed)) == list(range(1, 2 * n + 1))
    assert loss(straight) == loss(resumed)  # same data order and RNG: bit-identical
    for x, y in zip(jax.tree.leaves(_params(straight)), jax.tree.leaves(_params(resumed))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


CLI_ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}


def tiny_lm_cli(workdir, *overrides):
    """`train.py` with the tiny LM config, as a command line."""
    return [sys.executable, str(REPO / "experiments/train.py"), f"--config={REPO}/experiments/configs/lm_tiny.py",
            f"--workdir={workdir}", "--config.model.d_model=32", "--config.model.num_heads=2",
            "--config.model.num_layers=1", "--config.model.d_ff=64", "--config.model.max_len=64",
            "--config.data.seq_len=32", "--config.data.max_bytes=30000", "--config.train.batch_size=8",
            "--config.train.eval_every=100000", "--config.mesh.data=1", *overrides]


def start_until(cmd, marker):
    """Start `cmd` and return it once `marker` appears in its output (or after 240 s)."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=CLI_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    for line in proc.stdout:
        if marker in line or time.time() > deadline:
            break
    return proc


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    proc = start_until(tiny_lm_cli(tmp_path, "--config.train.num_steps=100000", "--config.train.log_every=5",
                                   "--config.train.checkpoint_every=100000"), "step 5/")
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    assert "after SIGTERM" in out
    ckpt = Checkpointer(tmp_path / "checkpoints")
    step = ckpt.latest_step()
    assert step is not None and step >= 5
    state, extra = ckpt.restore()
    assert int(state.step) == step == extra["data_step"]


def test_corrupted_latest_checkpoint_falls_back(tmp_path, caplog):
    train.train_and_evaluate(tiny_lm(num_steps=6, checkpoint_every=3), tmp_path)
    ckpt_dir = tmp_path / "checkpoints"
    assert Checkpointer(ckpt_dir).all_steps() == [3, 6]
    for f in (ckpt_dir / "6").rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(b"\x00garbage")
    with caplog.at_level(logging.WARNING):
        state, _ = Checkpointer(ckpt_dir).restore()
    assert int(state.step) == 3
    assert any("unreadable" in r.message and "6" in r.message for r in caplog.records)


@pytest.mark.parametrize(
    "section,field,value,match",
    [
        ("model", "bogus", 1, r"config.model: unknown field\(s\) \['bogus'\]"),
        ("model", "num_heads", 5, r"ModelConfig.d_model"),
        ("train", "bogus", 1, r"config.train: unknown field\(s\) \['bogus'\]"),
        ("train", "batch_size", 0, r"config.train.batch_size must be >= 1"),
        ("optim", "schedule", "cubic", r"OptimizerConfig.schedule"),
        ("model", "kind", "gan", r"config.model.kind: unknown 'gan'"),
    ],
)
def test_bad_config_errors_name_the_field(tmp_path, section, field, value, match):
    c = tiny_lm()
    with c.unlocked():
        c[section][field] = value
    with pytest.raises(ValueError, match=match):
        train.train_and_evaluate(c, tmp_path)


def test_bad_data_file_error_names_the_file(tmp_path):
    bad = tmp_path / "corpus.txt"
    bad.write_bytes(b"fine line\nanother\n\xff\xfe broken\n")
    c = tiny_lm()
    c.data.corpus = str(bad)
    with pytest.raises(ValueError, match=r"corpus.txt.*line 3"):
        train.train_and_evaluate(c, tmp_path / "run")


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    c = tiny_lm(num_steps=40, log_every=2, checkpoint_every=2, eval_every=1000)
    c.optim.update(learning_rate=1e6, warmup_steps=0, clip_norm=None)
    with pytest.raises(FloatingPointError, match="non-finite loss at step"):
        train.train_and_evaluate(c, tmp_path)
    ckpt = Checkpointer(tmp_path / "checkpoints")
    if ckpt.latest_step() is not None:
        state, _ = ckpt.restore()
        assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))


def test_interrupted_save_is_ignored_and_the_run_resumes(tmp_path):
    """A save cut off by SIGKILL leaves only orbax's temporary directory: restore and resume skip it."""
    train.train_and_evaluate(tiny_lm(num_steps=3, checkpoint_every=3), tmp_path)
    ckpt_dir = tmp_path / "checkpoints"
    # What a process killed mid-save leaves: step 4's files half-written under a temporary name.
    partial = ckpt_dir / "4.orbax-checkpoint-tmp-1234567890"
    partial.mkdir()
    for f in (ckpt_dir / "3").rglob("*"):
        if f.is_file():
            dst = partial / f.relative_to(ckpt_dir / "3")
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(f.read_bytes()[: max(1, f.stat().st_size // 2)])
    assert Checkpointer(ckpt_dir).all_steps() == [3]
    state, extra = Checkpointer(ckpt_dir).restore()
    assert int(state.step) == 3 == extra["data_step"]
    train.train_and_evaluate(tiny_lm(num_steps=6, checkpoint_every=3), tmp_path)  # resumes from 3, not from scratch
    steps = [r["step"] for r in read_jsonl(tmp_path) if r["split"] == "train"]
    assert steps[-2:] == [4, 6] and steps.count(2) == 1


def test_sigkill_during_training_resumes_from_a_complete_checkpoint(tmp_path):
    """SIGKILL while checkpoints are being written every step: the next run restores and finishes."""
    common = ["--config.train.log_every=1", "--config.optim.total_steps=1000"]
    proc = start_until(tiny_lm_cli(tmp_path, *common, "--config.train.num_steps=1000",
                                   "--config.train.checkpoint_every=1", "--config.train.keep_checkpoints=2"), "step 8/")
    proc.kill()  # SIGKILL: no handler runs, an async save may be in flight
    proc.communicate(timeout=60)
    state, _ = Checkpointer(tmp_path / "checkpoints").restore()
    killed_at = int(state.step)
    assert killed_at >= 6
    out = subprocess.run(tiny_lm_cli(tmp_path, *common, f"--config.train.num_steps={killed_at + 2}",
                                     "--config.train.checkpoint_every=100000"),
                         cwd=REPO, env=CLI_ENV, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"resumed from step {killed_at}" in out.stderr
    assert Checkpointer(tmp_path / "checkpoints").latest_step() == killed_at + 2
