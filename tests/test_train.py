"""The experiment runner end to end: train, evaluate, checkpoint, resume, preempt, fail clearly."""

import dataclasses
import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import tformer

pytest.importorskip("ml_collections")
pytest.importorskip("orbax.checkpoint")

from conftest import greedy_by_full_forward, lm_eval_by_full_forward

from experiments import decode, train
from experiments.configs import lm_tiny, seq2seq_tiny
from tformer.checkpoint import Checkpointer, CheckpointError

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
    return [json.loads(row) for row in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_lm_run_end_to_end(tmp_path, capsys):
    result = train.train_and_evaluate(tiny_lm(), tmp_path)
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

    model, tok, _ = sample.load(tmp_path)  # parameters only (restore_params): no optimizer is built
    from flax import nnx

    for x, y in zip(jax.tree.leaves(nnx.to_pure_dict(nnx.state(model))), jax.tree.leaves(_params(tmp_path))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # The final metrics are the saved model's, on the configured eval batches (float32 sums in another order:
    # relative 1e-4 covers their rounding, and is far below what one more or one fewer batch would change).
    loss, bits_per_byte = lm_eval_by_full_forward(model, tiny_lm(), tmp_path)
    assert (result["loss"], result["bits_per_byte"]) == pytest.approx((loss, bits_per_byte), rel=1e-4)
    # The cached decode loop continues the prompt exactly as greedy decoding by full forwards does.
    expected = tok.decode(greedy_by_full_forward(model, [tok.bos_id, *tok.encode("def ")], 5, tok.eos_id))
    [text] = decode.complete(model, tok, ["def "], 5, jax.random.key(0))
    assert expected and text == "def " + expected
    with pytest.raises(ValueError, match=r"prompt 'x+' is 65 tokens with BOS, .* max_len is 64; shorten the prompt"):
        decode.complete(model, tok, ["x" * 64], 5, jax.random.key(0))


@pytest.mark.slow
def test_seq2seq_run_end_to_end(tmp_path, capsys):
    config = tiny_seq2seq()
    result = train.train_and_evaluate(config, tmp_path)
    assert "(reference:" in capsys.readouterr().out
    from experiments import sample

    model, tok, meta = sample.load(tmp_path)
    assert meta["config"]["model"]["kind"] == "seq2seq"
    assert translation_scores_of_saved_model(model, tok, config, tmp_path) == pytest.approx(
        (result["exact_match"], result["bleu"]))
    src, _ = decode.encode_sources(tok, ["123"], 8)
    expected = tok.decode(greedy_by_full_forward(model, [tok.bos_id], 10, tok.eos_id, src_bs=src))
    assert decode.translate(model, tok, ["123"], 8, 10) == [expected]


def translation_scores_of_saved_model(model, tok, config, workdir) -> tuple[float, float]:
    """Exact match and BLEU of the saved model on the run's held-out pairs (the first eval_decode_examples)."""
    from experiments.tasks import build_task

    pairs = build_task(config, workdir).valid_pairs[: config.train.eval_decode_examples]
    d = config.data
    scores = decode.translation_scores(model, tok, pairs, d.src_len, d.tgt_len, config.train.beam_size)
    return scores["exact_match"], scores["bleu"]


def _params(workdir):
    state, _ = Checkpointer(Path(workdir) / "checkpoints").restore()
    return state.params


@pytest.mark.slow
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

    def loss(w):
        return {r["step"]: r["loss"] for r in read_jsonl(w) if r["split"] == "train"}
    assert sorted(loss(resumed)) == list(range(1, 2 * n + 1))
    assert loss(straight) == loss(resumed)  # same data order and RNG: bit-identical
    for x, y in zip(jax.tree.leaves(_params(straight)), jax.tree.leaves(_params(resumed))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow
def test_interleaved_pipeline_run_checkpoints_model_order_and_resumes_like_one_device(tmp_path):
    """Stage 2 x virtual 2 stores the 4 layers as [0, 2, 1, 3] on the devices; its checkpoints must hold them in
    model order (the one-device run's parameters) and a resumed run must put them back in schedule order."""
    from conftest import assert_trains_alike

    from experiments import run_config

    def cfg(steps, **mesh):
        c = tiny_lm(num_steps=steps, log_every=1, eval_every=100, checkpoint_every=100)
        c.model.num_layers = 4
        c.optim.update(total_steps=4, learning_rate=1e-2, eps=1e-4)  # eps: see assert_trains_alike's bound
        c.mesh.update(**mesh)
        return c

    pipelined = dict(data=2, stage=2, virtual_stages=2, microbatches=2)
    train.train_and_evaluate(cfg(4), tmp_path / "one")
    train.train_and_evaluate(cfg(2, **pipelined), tmp_path / "pp")  # stops (and saves) at step 2
    train.train_and_evaluate(cfg(4, **pipelined), tmp_path / "pp")  # resumes from step 2

    def curve(w):
        rows = sorted((r["step"], r["loss"], r["grad_norm"]) for r in read_jsonl(w) if r["split"] == "train")
        return [[loss, norm] for _, loss, norm in rows]

    assert len(curve(tmp_path / "pp")) == 4
    assert_trains_alike(curve(tmp_path / "pp"), _params(tmp_path / "pp"), curve(tmp_path / "one"),
                        _params(tmp_path / "one"), run_config.optim_config(cfg(4)), 4, "stage 2 x virtual 2")


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


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_and_exits_cleanly(tmp_path, sig):
    """SIGTERM (preemption) and Ctrl-C (SIGINT) both save the current step and exit 0."""
    proc = start_until(tiny_lm_cli(tmp_path, "--config.train.num_steps=100000", "--config.train.log_every=5",
                                   "--config.train.checkpoint_every=100000"), "step 5/")
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    assert f"after {sig.name}" in out and "Traceback" not in out
    ckpt = Checkpointer(tmp_path / "checkpoints")
    step = ckpt.latest_step()
    assert step is not None and step >= 5
    state, extra = ckpt.restore()
    assert int(state.step) == step == extra["data_step"]


@pytest.mark.slow
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


def test_an_unknown_override_lists_the_fields_of_the_config_file_given():
    """An RNN config's model section holds RNNConfig's fields, and the error lists those, not ModelConfig's."""
    from experiments import run_config

    def line(config_file, override):
        return run_config._unknown_override(["train.py", f"--config={REPO}/experiments/configs/{config_file}",
                                             "--workdir=w", override])

    rnn_fields = ("['attention', 'cell', 'd_model', 'dtype', 'kind', 'max_len', 'num_layers', 'param_dtype', "
                  "'tie_embeddings', 'unroll', 'vocab_size']")
    assert line("lm_tiny_rnn.py", "--config.model.num_heads=4") == (
        f"--config.model.num_heads: unknown field 'num_heads' of config.model; valid fields are {rnn_fields}")
    assert line("seq2seq_tiny_rnn.py", "--config.model.bogus=1") == (
        "--config.model.bogus: unknown field 'bogus' of config.model; valid fields are ['attention', 'cell', "
        "'d_model', 'dtype', 'kind', 'max_len', 'num_layers', 'param_dtype', 'tie_embeddings', 'unroll', 'vocab_size']")
    lm = line("lm_tiny.py", "--config.model.cell=gru")
    assert lm.startswith("--config.model.cell: unknown field 'cell' of config.model; valid fields are ['activation'")
    assert "'num_heads'" in lm and "'cell'" not in lm.split("valid fields are")[1]
    assert line("lm_tiny_rnn.py", "--config.model.cell=gru") is None  # a field it has
    assert line("lm_tiny_rnn.py", "--config.modle.cell=gru") == (
        "--config.modle: unknown section; valid sections are ['data', 'init_from', 'mesh', 'model', 'optim', 'train']")


def test_bad_data_file_error_names_the_file(tmp_path):
    bad = tmp_path / "corpus.txt"
    bad.write_bytes(b"fine line\nanother\n\xff\xfe broken\n")
    c = tiny_lm()
    c.data.corpus = str(bad)
    with pytest.raises(ValueError, match=r"corpus.txt.*line 3"):
        train.train_and_evaluate(c, tmp_path / "run")


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    c = tiny_lm(num_steps=40, log_every=2, checkpoint_every=2, eval_every=1000)
    c.optim.update(learning_rate=1e6, warmup_steps=0, clip_norm=None)
    with pytest.raises(FloatingPointError, match="non-finite loss or gradient at step"):
        train.train_and_evaluate(c, tmp_path)
    ckpt = Checkpointer(tmp_path / "checkpoints")
    if ckpt.latest_step() is not None:
        state, _ = ckpt.restore()
        assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))


@pytest.mark.slow
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


@pytest.mark.slow
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


# ---------------------------------------------------------------------------
# Runs that never lose work, and bad input as one clear line.


def _corrupt(step_dir: Path) -> None:
    for f in step_dir.rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(b"\x00garbage")


@pytest.mark.slow
def test_damaged_newest_checkpoint_is_moved_aside_and_saved_again(tmp_path, caplog):
    c = tiny_lm(num_steps=6, checkpoint_every=3, eval_every=100, num_samples=0)
    train.train_and_evaluate(c, tmp_path)
    ckpt_dir = tmp_path / "checkpoints"
    _corrupt(ckpt_dir / "6")
    with caplog.at_level(logging.WARNING):
        train.train_and_evaluate(c, tmp_path)  # resumes from 3, retrains 4-6
    [aside] = [p.name for p in ckpt_dir.iterdir() if ".damaged-" in p.name]
    assert aside.startswith("6.damaged-")
    assert any("moved damaged checkpoint" in r.getMessage() and aside in r.getMessage() for r in caplog.records)
    state, _ = Checkpointer(ckpt_dir).restore()  # step 6 is readable again: the next run starts there
    assert int(state.step) == 6
    # When no step reads at all, nothing counts as damaged: one error, nothing moved.
    _corrupt(ckpt_dir / "3")
    _corrupt(ckpt_dir / "6")
    with pytest.raises(CheckpointError, match=r"no readable checkpoint in .*checkpoints: tried steps \[6, 3\]"):
        train.train_and_evaluate(c, tmp_path)
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["3", "6", aside]


@pytest.mark.slow
def test_final_checkpoint_is_saved_before_the_final_eval(tmp_path, monkeypatch):
    def failing_eval(*args, **kwargs):
        raise RuntimeError("eval failed")

    monkeypatch.setattr(train, "evaluate", failing_eval)
    with pytest.raises(RuntimeError, match="eval failed"):
        train.train_and_evaluate(tiny_lm(num_steps=4, checkpoint_every=100, eval_every=100), tmp_path)
    assert Checkpointer(tmp_path / "checkpoints").all_steps() == [4]


@pytest.mark.slow
def test_a_workdir_in_use_is_refused_naming_the_pid_and_a_killed_holder_does_not_block(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from experiments.workdir import WorkdirLock\n"
         f"with WorkdirLock({str(tmp_path)!r}):\n    print('locked', flush=True); time.sleep(600)"],
        cwd=REPO, env={**CLI_ENV, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ValueError, match=rf"--workdir={tmp_path} is in use by process {holder.pid} "):
            train.train_and_evaluate(tiny_lm(num_steps=2), tmp_path)
    finally:
        holder.kill()  # SIGKILL: the lock file stays, the lock does not
        holder.wait()
    assert (tmp_path / ".lock").read_text().strip() == str(holder.pid)
    train.train_and_evaluate(tiny_lm(num_steps=2, eval_every=100, num_samples=0), tmp_path)
    assert Checkpointer(tmp_path / "checkpoints").all_steps() == [2]


@pytest.mark.slow
def test_non_finite_loss_names_the_first_bad_step_and_the_last_good_checkpoint(tmp_path):
    c = tiny_lm(num_steps=40, log_every=3, checkpoint_every=1, eval_every=1000)
    c.optim.update(learning_rate=1e6, warmup_steps=0, clip_norm=None)
    with pytest.raises(FloatingPointError) as info:
        train.train_and_evaluate(c, tmp_path)
    msg = str(info.value)
    bad, loss, grad_norm = re.search(r"non-finite loss or gradient at step (\d+) \(loss=(\S+), grad_norm=(\S+)\)",
                                     msg).groups()
    assert not (math.isfinite(float(loss)) and math.isfinite(float(grad_norm)))
    ckpt = Checkpointer(tmp_path / "checkpoints")
    ckpt.wait()
    assert ckpt.latest_step() == int(bad) - 1  # every finite step was saved (checkpoint_every=1)
    assert f"the last good checkpoint is step {int(bad) - 1}" in msg
    state, _ = ckpt.restore()
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))


@pytest.mark.slow
def test_resume_under_a_different_model_fails_listing_the_fields(tmp_path, caplog):
    c = tiny_lm(num_steps=2, eval_every=100, checkpoint_every=100, num_samples=0)
    train.train_and_evaluate(c, tmp_path)
    saved = (tmp_path / "config.json").read_text()
    c.model.update(activation="geglu", d_ff=48)
    with pytest.raises(ValueError, match=r"different model; changed: activation: 'swiglu' -> 'geglu'; "
                                         r"d_ff: 64 -> 48\. .*start fresh with a new --workdir"):
        train.train_and_evaluate(c, tmp_path)
    assert (tmp_path / "config.json").read_text() == saved  # not overwritten
    # Training-only fields may change; a different learning-rate schedule is pointed out.
    c.model.update(activation="swiglu", d_ff=64)
    c.train.num_steps = 4  # optim.total_steps follows it
    with caplog.at_level(logging.WARNING):
        train.train_and_evaluate(c, tmp_path)
    assert any("different learning-rate schedule" in r.getMessage() and "total_steps: 2 -> 4" in r.getMessage()
               for r in caplog.records)
    assert Checkpointer(tmp_path / "checkpoints").all_steps()[-1] == 4


def test_every_model_and_optimizer_field_is_in_every_config_with_the_dataclass_default():
    import tformer
    from experiments.configs import base, lm_gpt2_small, seq2seq_base

    ref = base.base_config()
    for cls, section in ((tformer.ModelConfig, ref.model), (tformer.OptimizerConfig, ref.optim)):
        for f in dataclasses.fields(cls):
            if f.name in base.TOKENIZER_FIELDS or f.name in ("vocab_size", "total_steps"):
                continue
            assert section[f.name] == f.default, f.name
    for module in (lm_tiny, seq2seq_tiny, lm_gpt2_small, seq2seq_base):
        c = module.get_config()
        assert set(c.model.keys()) == set(ref.model.keys()) and set(c.optim.keys()) == set(ref.optim.keys())


def cli(*args, timeout=120):
    return subprocess.run([sys.executable, str(REPO / "experiments/train.py"), *args], cwd=REPO, env=CLI_ENV,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_cli_overrides_any_field_and_errors_are_one_line(tmp_path):
    cfg = f"--config={REPO}/experiments/configs/lm_tiny.py"
    # Fields lm_tiny does not set are overridable; the bad value after them fails before any work.
    out = cli(cfg, f"--workdir={tmp_path / 'w'}", "--config.model.dtype=bfloat16", "--config.model.head_dim=16",
              "--config.optim.grad_accum_steps=2", "--config.train.keep_checkpoints=0")
    assert (out.returncode, out.stderr.strip()) == (1, "error: config.train.keep_checkpoints must be >= 1, got 0")
    assert not (tmp_path / "w").exists()
    out = cli(cfg, f"--workdir={tmp_path / 'w'}", "--config.model.bogus=1")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert re.search(r"^error: --config.model.bogus: unknown field 'bogus' .* valid fields are \[.*'activation'",
                     out.stderr.strip())
    out = cli(cfg, f"--workdir={tmp_path / 'w'}", "--config.train.eval_batches=0", "--verbose")
    assert out.returncode == 1 and "Traceback" in out.stderr and "config.train.eval_batches must be >= 1" in out.stderr


@pytest.mark.slow
def test_a_mesh_axis_the_model_family_cannot_run_on_is_one_error_line_before_any_work(tmp_path):
    """The RNN LM on a pipeline mesh (once an AttributeError deep inside the pipeline)."""
    out = cli(f"--config={REPO}/experiments/configs/lm_tiny_rnn.py", f"--workdir={tmp_path / 'w'}",
              "--config.mesh.stage=2")
    assert (out.returncode, out.stderr.strip()) == (
        1, "error: config.mesh.stage=2: the rnn_lm family (RNNLM) has no pipeline parallelism; set mesh.stage=1 "
           "(it runs on mesh axes data, fsdp, tensor, sequence)")
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize(
    "section,field,value,match",
    [
        ("train", "keep_checkpoints", 0, r"config.train.keep_checkpoints must be >= 1, got 0"),
        ("train", "eval_batches", -1, r"config.train.eval_batches must be >= 1, got -1"),
        ("train", "temperature", float("nan"), r"config.train.temperature must be >= 0.0, got nan"),
        ("train", "beam_size", 0, r"config.train.beam_size must be >= 1"),
        ("train", "time_budget_s", -1.0, r"config.train.time_budget_s must be >= 0.0, got -1.0"),
        ("train", "time_budget_margin_s", float("nan"), r"config.train.time_budget_margin_s must be >= 0.0, got nan"),
        ("data", "seq_len", 0, r"config.data.seq_len must be >= 1"),
        ("data", "tokenizer", "wordpiece", r"config.data.tokenizer: unknown 'wordpiece'"),
        ("data", "validation_fraction", 1.0, r"config.data.validation_fraction must be in \[0, 1\)"),
        ("mesh", "tensor", 0, r"config.mesh.tensor must be >= 1, or -1"),
        ("mesh", "fsdp", -1, r"config.mesh: at most one axis may be -1"),  # with data=-1
        ("mesh", "preset", "zero3", r"config.mesh.preset: unknown 'zero3'"),
    ],
)
def test_runner_fields_are_range_checked_before_anything_runs(tmp_path, section, field, value, match):
    c = tiny_lm()
    c.mesh.data = -1
    c[section][field] = value
    with pytest.raises(ValueError, match=match):
        train.train_and_evaluate(c, tmp_path / "w")
    assert not (tmp_path / "w").exists()


def test_sample_prompts_longer_than_max_len_fail_before_training(tmp_path):
    c = tiny_lm(sample_prompts="x" * 80)
    with pytest.raises(ValueError, match=r"config.train.sample_prompts: prompt 'x+' is 81 tokens .* max_len is 64"):
        train.train_and_evaluate(c, tmp_path)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_unwritable_workdir_and_one_pair_corpus_are_one_line_errors(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match=r"--workdir=.*file/run: cannot create or write there"):
        train.train_and_evaluate(tiny_lm(), tmp_path / "file" / "run")
    (tmp_path / "pairs.tsv").write_text("one\tuno\n")
    c = tiny_seq2seq()
    c.data.corpus = str(tmp_path / "pairs.tsv")
    with pytest.raises(ValueError, match=r"pairs.tsv: 1 sentence pair\(s\); a run needs at least 2"):
        train.train_and_evaluate(c, tmp_path / "run")


@pytest.mark.slow
def test_sample_py_errors_are_one_line(tmp_path):
    def sample(*args):
        return subprocess.run([sys.executable, str(REPO / "experiments/sample.py"), *args], cwd=REPO, env=CLI_ENV,
                              capture_output=True, text=True, timeout=120)

    out = sample(f"--workdir={tmp_path / 'none'}")
    assert (out.returncode, out.stderr.strip()) == (1, f"error: --workdir={tmp_path / 'none'} does not exist")
    out = sample(f"--workdir={tmp_path}")
    assert (out.returncode, out.stderr.strip()) == (
        1, f"error: {tmp_path / 'config.json'} not found: is {tmp_path} a training run's workdir?")
    # A run's config.json, but its tokenizer model deleted / no checkpoint written yet.
    from experiments.configs.base import base_config

    cfg = tformer.ModelConfig(vocab_size=259, d_model=16, num_heads=2, num_layers=1, max_len=16)
    meta = {"config": base_config().to_dict(), "model": dataclasses.asdict(cfg), "tokenizer": "sentencepiece"}
    (tmp_path / "config.json").write_text(json.dumps(meta))
    out = sample(f"--workdir={tmp_path}")
    assert (out.returncode, out.stderr.strip()) == (
        1, f"error: {tmp_path / 'tokenizer.model'} is missing: the run's tokenizer is needed to read its ids")
    (tmp_path / "config.json").write_text(json.dumps(meta | {"tokenizer": "byte"}))
    out = sample(f"--workdir={tmp_path}", "--prompt=x")
    # (orbax may warn about its read-only mode first; the error itself is one line, no traceback)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.strip().splitlines()[-1] == f"error: no checkpoint in {tmp_path / 'checkpoints'}", out.stderr


def test_checkpointer_save_force_replaces_an_existing_step(tmp_path):
    def state(v):
        return tformer.TrainState(step=np.int32(v), params={"w": np.full((3,), v, np.float32)}, opt_state={},
                                  rng=np.zeros(2, np.uint32))

    ckpt = Checkpointer(tmp_path, async_save=False)
    assert ckpt.save(2, state(1))
    assert not ckpt.save(2, state(5))  # kept
    assert ckpt.restore_params({"w": jax.ShapeDtypeStruct((3,), np.float32)})["w"].tolist() == [1, 1, 1]
    assert ckpt.save(2, state(5), force=True)  # replaced
    ckpt.close()
    assert Checkpointer(tmp_path).restore_params({"w": jax.ShapeDtypeStruct((3,), np.float32)})["w"].tolist() == [5] * 3
    with pytest.raises(ValueError, match="max_to_keep must be >= 1"):
        Checkpointer(tmp_path, max_to_keep=0)


# ---------------------------------------------------------------------------
# The time budget (experiments/budget.py).


class FakeClock:
    """A clock that moves `tick` seconds at each reading: the run's timing becomes a count of readings."""

    def __init__(self, tick):
        self.t, self.tick = 0.0, tick

    def __call__(self):
        self.t += self.tick
        return self.t


@pytest.mark.slow
def test_time_budget_stops_early_runs_the_final_eval_and_writes_metrics(tmp_path, monkeypatch):
    from experiments import budget

    monkeypatch.setattr(budget, "now", FakeClock(0.1))  # each step reads it twice: 0.2 "s" a step
    c = tiny_lm(num_steps=1000, log_every=5, eval_every=1000, checkpoint_every=1000, num_samples=0,
                time_budget_s=6.0, time_budget_margin_s=1.0)
    c.optim.update(schedule="wsd", decay_fraction=0.5, min_lr_ratio=0.0, warmup_steps=2)
    result = train.train_and_evaluate(c, tmp_path, started=0.0)
    final = json.loads((tmp_path / "final_metrics.json").read_text())
    # 6 s less 1 s of margin less the measured eval (real seconds, small): about 24 steps of 0.2 s.
    assert 10 < final["step"] < 30
    assert final["time_budget"]["stopped_early"] is True
    assert final["bits_per_byte"] == result["bits_per_byte"] > 0
    assert Checkpointer(tmp_path / "checkpoints").all_steps()[-1] == final["step"]
    lrs = [r["lr"] for r in read_jsonl(tmp_path) if r["split"] == "train"]
    peak = c.optim.learning_rate
    assert lrs[1] == pytest.approx(peak) and lrs[-1] < 0.25 * peak  # stable, then decayed by the time's end
    # Rerun in the same workdir: the schedule is complete, so nothing trains; the same model is evaluated.
    again = train.train_and_evaluate(c, tmp_path, started=0.0)
    assert json.loads((tmp_path / "final_metrics.json").read_text())["step"] == final["step"]
    assert again["bits_per_byte"] == pytest.approx(result["bits_per_byte"], rel=1e-6)


def test_time_budget_progress_goes_on_from_a_resumed_checkpoint():
    from experiments.budget import TimeBudget

    clock = FakeClock(1.0)
    b = TimeBudget(budget_s=23.0, started=0.0, reserve_s=2.0, progress0=0.5, clock=clock)  # train from 1 s to 21 s
    assert b.deadline == 21.0 and not b.exhausted()
    assert b.progress(0, 1000) == pytest.approx(0.5 + 0.5 * 1 / 20)  # reading at 2 s: 1 s of 20 spent
    assert b.progress(999, 1000) == pytest.approx(0.999)  # steps ahead of the time: the step count wins
    assert not b.after_step(np.float32(0.0))  # 4 s
    assert not b.after_step(np.float32(0.0))  # 5 s, a step takes 1 s
    clock.t = 19.5
    assert b.after_step(np.float32(0.0))  # 20.5 s + a 1-ish s step would pass 21 s
    assert TimeBudget(10.0, 0.0, 1.0, progress0=1.0, clock=clock).exhausted()


@pytest.mark.slow
def test_time_budget_spent_before_training_is_a_named_error(tmp_path):
    c = tiny_lm(num_steps=1000, time_budget_s=5.0)
    with pytest.raises(ValueError, match=r"config.train.time_budget_s=5 is spent before training starts \(setup "
                                         r"took \d+\.\ds and the final eval needs \d+\.\ds\); raise it above"):
        train.train_and_evaluate(c, tmp_path / "w", started=time.time() - 60)


def test_speedrun_config_evaluates_on_lm_tiny_rows_within_its_budget_and_the_comparison_recipes_validate():
    from experiments import run_config, speedrun
    from experiments.configs import lm_speedrun

    fast, tiny = lm_speedrun.get_config(), lm_tiny.get_config()
    run_config.validate(fast)

    def held_out(c):  # the validation rows a run's bits per byte is measured on
        return (c.data.corpus, c.data.tokenizer, c.data.max_bytes, c.data.validation_fraction, c.data.seq_len,
                c.train.eval_batches * (c.train.eval_batch_size or c.train.batch_size))

    assert held_out(fast) == held_out(tiny)
    assert 0 < fast.train.time_budget_s < 90  # "in 90 s", Python's start-up included
    for name, (path, overrides) in speedrun.RECIPES.items():  # each recipe's overrides name real fields
        c = {"lm_speedrun": lm_speedrun, "lm_tiny": lm_tiny}[Path(path).stem].get_config()
        for arg in speedrun.COMMON + overrides:
            key, value = arg[len("--config."):].split("=")
            section, field = key.split(".")
            assert field in c[section], (name, arg)
            c[section][field] = type(c[section][field])(value == "True" if value in ("True", "False") else value)
        run_config.validate(c)


def test_resume_under_another_optimizer_is_refused_naming_the_change(tmp_path):
    from experiments.workdir import check_resume

    cfg = tformer.ModelConfig(vocab_size=64, d_model=32, num_heads=2, num_layers=1)
    adamw = tformer.OptimizerConfig()
    (tmp_path / "config.json").write_text(json.dumps({"config": {"model": {"kind": "lm"}},
                                                      "model": dataclasses.asdict(cfg),
                                                      "optim": dataclasses.asdict(adamw)}))
    check_resume(tmp_path, "lm", cfg, dataclasses.replace(adamw, schedule="wsd"))  # a schedule change resumes
    with pytest.raises(ValueError, match=r"optim.name 'adamw' -> 'muon' changes the optimizer state's structure"):
        check_resume(tmp_path, "lm", cfg, dataclasses.replace(adamw, name="muon"))
