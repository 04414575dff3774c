"""Pretrained -> fine-tune (full or LoRA) -> evaluate -> export, against transformers itself.

The checkpoints are made here, offline: `transformers` random weights and a
`tokenizers` byte-level BPE trained on a few KB of text, written with
`save_pretrained`, as a downloaded checkpoint would be.
"""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from ml_collections import ConfigDict

import tformer
from experiments import evaluate as evaluate_lib
from experiments import export as export_lib
from experiments import finetune, input_pipeline, run_config, train
from experiments.configs.base import base_config
from experiments.tasks import build_task
from tformer import lora, training

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

REPO = Path(__file__).resolve().parents[1]
VOCAB, STEPS, SEQ = 320, 20, 32


def _text() -> str:
    """~12 KB of English-like prose, fixed (no download, no randomness)."""
    words = ("the model reads a line of text and learns which word comes next in the line while the optimizer "
             "moves each weight a little so that the loss on the next batch is lower than before and the held out "
             "text tells us whether it learned the language or only the batches").split()
    rng = np.random.RandomState(0)
    lines = [" ".join(words[(i + j) % len(words)] for j in rng.randint(0, 6, 12).cumsum()) for i in range(200)]
    return "\n".join(lines) + "\n"


def _bpe(texts) -> "tokenizers.Tokenizer":
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return tok


def make_hf_checkpoint(folder: Path, layout: str, vocab: int = VOCAB, tokenizer_vocab: int | None = None) -> Path:
    """A tiny random `layout` ("gpt2" | "llama") LM and its BPE tokenizer, saved as transformers saves them."""
    torch.manual_seed(0)
    ids = dict(bos_token_id=0, eos_token_id=0, vocab_size=vocab)
    if layout == "gpt2":
        config = transformers.GPT2Config(n_positions=64, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0,
                                         embd_pdrop=0.0, attn_pdrop=0.0, **ids)
        model = transformers.GPT2LMHeadModel(config)
    else:
        config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                          tie_word_embeddings=False, **ids)
        model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tok = _bpe([_text()])
    if tokenizer_vocab is not None:  # a tokenizer from another (bigger) checkpoint
        tok.add_tokens([f"<extra_{i}>" for i in range(tokenizer_vocab - tok.get_vocab_size())])
    tok.save(str(folder / "tokenizer.json"))
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """Checkpoints and text shared by every test here: GPT-2 and Llama layouts, train text, held-out text."""
    root = tmp_path_factory.mktemp("finetune")
    text = _text()
    (root / "train.txt").write_text(text)
    lines = text.splitlines()
    (root / "held_out.txt").write_text("\n".join(lines[::-1][:40]) + "\n")
    return {"root": root, "gpt2": make_hf_checkpoint(root / "gpt2", "gpt2"),
            "llama": make_hf_checkpoint(root / "llama", "llama")}


def ft_config(init_from: Path, corpus: Path, num_steps: int = STEPS, lr: float = 3e-3, **train_fields):
    c = base_config()
    c.init_from = f"hf:{init_from}"
    c.optim.update(learning_rate=lr, warmup_steps=0, total_steps=STEPS, weight_decay=0.0)
    c.data.update(corpus=str(corpus), seq_len=SEQ, validation_fraction=0.1)
    c.train.update(batch_size=8, num_steps=num_steps, log_every=1, eval_every=1000, eval_batches=2,
                   checkpoint_every=1000, num_samples=0)
    c.train.update(train_fields)
    c.mesh.update(data=2, fsdp=2)  # parameters sharded (fsdp) from the start
    return c


def _train_losses(workdir: Path) -> list[float]:
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [x["loss"] for x in lines if x["split"] == "train"]


def _hf_loss(model, batch: dict) -> float:
    """transformers' mean NLL of a packed tformer batch: each document piece run on its own (positions from 0)."""
    nll, count = 0.0, 0.0
    for row in range(batch["inputs"].shape[0]):
        seg = batch["segment_ids"][row]
        for s in np.unique(seg[seg > 0]):
            cols = np.nonzero(seg == s)[0]
            with torch.no_grad():
                logits = model(torch.tensor(batch["inputs"][row, cols][None].astype(np.int64))).logits[0]
            logp = torch.log_softmax(logits.double(), -1).numpy()
            w = batch["weights"][row, cols]
            nll -= float((logp[np.arange(len(cols)), batch["targets"][row, cols]] * w).sum())
            count += float(w.sum())
    return nll / count


def _hf_text_loss(folder: Path, text_path: Path) -> float:
    """Mean next-token NLL of a text file's lines (BOS + line + EOS) under a saved HF model, by transformers alone."""
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    rows = [[0] + tok.encode(line).ids + [0] for line in text_path.read_text().splitlines()]
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    labels = torch.where(mask.bool(), ids, -100)
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits[:, :-1]
    return float(torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels[:, 1:], ignore_index=-100))


@pytest.fixture(scope="module")
def gpt2_run(data) -> Path:
    workdir = data["root"] / "gpt2_run"
    config = ft_config(data["gpt2"], data["root"] / "train.txt", profile_steps="5,8", checkpoint_every=STEPS // 2)
    train.train_and_evaluate(config, workdir)
    return workdir


@pytest.fixture(scope="module")
def lora_run(data) -> Path:
    workdir = data["root"] / "lora_run"
    train.train_and_evaluate(ft_config(data["gpt2"], data["root"] / "train.txt", lr=1e-2, lora_rank=4, lora_alpha=64.0),
                             workdir)
    return workdir


def _first_batch(workdir: Path) -> dict:
    """The runner's batch for step 1, rebuilt from the run's saved config (with its copied tokenizer)."""
    c = ConfigDict(finetune.read_run(workdir)["config"])
    return input_pipeline.batch_at(build_task(c, workdir).train, 0, c.train.batch_size, c.train.seed)


@pytest.mark.parametrize("layout", ["gpt2", "llama"])
def test_init_from_hf_first_loss_matches_transformers_and_training_lowers_it(data, gpt2_run, tmp_path, layout):
    workdir = gpt2_run if layout == "gpt2" else tmp_path / "run"
    if layout == "llama":
        train.train_and_evaluate(ft_config(data["llama"], data["root"] / "train.txt"), workdir)
    losses = _train_losses(workdir)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(data[layout]).eval()
    assert losses[0] == pytest.approx(_hf_loss(hf_model, _first_batch(workdir)), abs=1e-4)
    assert len(losses) == STEPS and losses[-1] < losses[0] - 0.5, losses


def test_init_from_hf_resume_is_bit_exact(data, gpt2_run, tmp_path):
    """The run stopped after its mid-run checkpoint and resumed ends where the uninterrupted run ended, bit for bit."""
    workdir = tmp_path / "resumed"
    shutil.copytree(gpt2_run, workdir, ignore=shutil.ignore_patterns(str(STEPS), "profile", "eval"))
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == [str(STEPS // 2)]
    train.train_and_evaluate(ft_config(data["gpt2"], data["root"] / "train.txt", checkpoint_every=STEPS // 2), workdir)
    _, straight = finetune.load_params(gpt2_run)
    _, resumed = finetune.load_params(workdir)
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_export_loads_in_transformers_with_equal_logits_and_lower_held_out_loss(data, gpt2_run, tmp_path):
    out = export_lib.export(gpt2_run, tmp_path / "hf")
    assert (out / "tokenizer.json").is_file()
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    model = nnx.merge(finetune.abstract_run_params(finetune.read_run(gpt2_run))[2], finetune.load_params(gpt2_run)[1])
    tokens = np.random.RandomState(1).randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        want = hf_model(torch.tensor(tokens)).logits.numpy()
    got = np.asarray(model(tokens))[..., :VOCAB]
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    held_out = data["root"] / "held_out.txt"
    assert _hf_text_loss(out, held_out) < _hf_text_loss(data["gpt2"], held_out) - 0.3


def test_lora_trains_adapters_only_and_exports_a_rank_r_update(data, lora_run, tmp_path):
    cfg, params = finetune.load_params(lora_run, merge=False)
    start = finetune.nnx_params(tformer.hf.load_hf_checkpoint(data["gpt2"]))
    for a, b in zip(jax.tree.leaves(start), jax.tree.leaves(params["base"])):
        np.testing.assert_array_equal(a, np.asarray(b))  # the base weights, bit for bit

    # The optimizer state holds adapter leaves only (Adam's mu and nu: two per adapter leaf).
    c = ft_config(data["gpt2"], data["root"] / "train.txt", lora_rank=4)
    _, tx, state, _ = training.create_train_state(tformer.DecoderLM, cfg, run_config.optim_config(c),
                                                  params=jax.tree.map(np.asarray, start),
                                                  lora=finetune.lora_config(c.train))
    moments = [a for a in jax.tree.leaves(state.opt_state) if a.ndim]  # the rest: step counters
    adapters = jax.tree.leaves(params["lora"])
    assert {a.shape for a in moments} == {a.shape for a in adapters}
    assert sum(a.size for a in moments) == 2 * sum(a.size for a in adapters)

    # Exported weight minus base has rank <= R; the merged model computes what the adapters do.
    out = export_lib.export(lora_run, tmp_path / "hf")
    from safetensors.numpy import load_file

    exported, original = load_file(str(out / "model.safetensors")), load_file(str(data["gpt2"] / "model.safetensors"))
    changed = 0
    for name, w in exported.items():
        diff = w.astype(np.float64) - original[name].astype(np.float64)
        if w.ndim == 2 and np.abs(diff).max() > 0:
            changed += 1
            # GPT-2's c_attn holds q | k | v side by side: one rank-R update each.
            for part in np.split(diff, 3, axis=1) if "c_attn" in name else [diff]:
                assert np.linalg.matrix_rank(part, tol=1e-5 * np.abs(part).max()) <= 4, name
        elif w.ndim != 2 or name.endswith("wte.weight") or name.endswith("wpe.weight"):
            np.testing.assert_array_equal(w, original[name], err_msg=name)
    assert changed == 2 * 4  # c_attn (q|k|v), c_proj, c_fc, mlp.c_proj in each of 2 layers
    held_out = data["root"] / "held_out.txt"
    tuned, base = _hf_text_loss(out, held_out), _hf_text_loss(data["gpt2"], held_out)
    print(f"held-out loss: LoRA {tuned:.4f}, base {base:.4f}")
    assert tuned < base - 0.03  # deterministic: same seeds, same data (0.06 when written)


def test_lora_merged_weights_compute_the_nnx_lora_forward():
    """merged(params) computes x W + scale (x A) B, nnx.LoRA's own forward, for every kind of adapted projection."""
    cfg = tformer.ModelConfig(vocab_size=64, d_model=32, num_heads=4, num_layers=2, max_len=16, vocab_multiple=64)
    rng = np.random.RandomState(0)
    shapes = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: tformer.DecoderLM(cfg, rngs=nnx.Rngs(0)))))
    base = jax.tree.map(lambda a: rng.randn(*a.shape).astype(np.float32), shapes)
    lcfg = lora.LoraConfig(rank=3, alpha=6.0)
    params = jax.jit(lambda b: lora.lora_params(b, lcfg, jax.random.key(1)))(base)
    params["lora"] = jax.tree.map(lambda a: rng.randn(*a.shape).astype(np.float32), params["lora"])  # B != 0
    merged = jax.jit(lora.merged)(params)
    for group, name in (("attn", "wq"), ("attn", "wo"), ("mlp", "w_in"), ("mlp", "w_out")):
        w = np.asarray(base["blocks"]["layers"][group][name][1])
        adapter = jax.tree.map(lambda a: a[1], params["lora"]["blocks"]["layers"][group][name])  # layer 1
        d_in, d_out = adapter["a"].shape[0], adapter["b"].shape[1]
        layer = nnx.LoRA(d_in, 3, d_out, rngs=nnx.Rngs(0))
        layer.lora_a[...], layer.lora_b[...] = adapter["a"], adapter["b"] * lcfg.scale
        x_in = np.random.RandomState(1).randn(5, d_in).astype(np.float32)
        want = x_in @ w.reshape(d_in, d_out) + np.asarray(layer(x_in))
        got = x_in @ np.asarray(merged["blocks"]["layers"][group][name][1]).reshape(d_in, d_out)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4, err_msg=name)


def test_evaluate_reproduces_the_final_eval_of_a_finished_run(gpt2_run):
    final = json.loads((gpt2_run / "final_metrics.json").read_text())
    again = evaluate_lib.evaluate_run(gpt2_run)
    for key in ("loss", "perplexity", "bits_per_byte", "accuracy"):
        assert again[key] == final[key], key
    assert math.isfinite(again["bits_per_byte"])


def test_evaluate_cli_prints_one_json_line_on_a_file(data, gpt2_run):
    out = subprocess.run([sys.executable, str(REPO / "experiments" / "evaluate.py"), f"--workdir={gpt2_run}",
                          f"--data={data['root'] / 'held_out.txt'}"], capture_output=True, text=True,
                         env={"PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin",
                              "XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert {"loss", "perplexity", "bits_per_byte"} <= set(result) and result["step"] == STEPS
    assert list((gpt2_run / "eval").glob("step_20_held_out.txt.json"))


def test_profiled_run_leaves_a_trace(gpt2_run):
    assert list((gpt2_run / "profile").rglob("*.xplane.pb")), list((gpt2_run / "profile").rglob("*"))


@pytest.mark.parametrize("spec,why", [("8,5", "START < END"), ("5,30", "START < END <= train.num_steps + 1"),
                                      ("5", "not two integers")])
def test_bad_profile_steps_is_one_error(data, tmp_path, spec, why):
    with pytest.raises(ValueError, match="config.train.profile_steps") as e:
        train.train_and_evaluate(ft_config(data["gpt2"], data["root"] / "train.txt", profile_steps=spec), tmp_path)
    assert "\n" not in str(e.value)


def _init_error(tmp_path, folder, **model) -> str:
    c = ft_config(folder, tmp_path / "none.txt")
    c.model.update(model)
    with pytest.raises(ValueError) as e:
        train.train_and_evaluate(c, tmp_path / "run")
    assert "\n" not in str(e.value)
    return str(e.value)


def test_bad_init_from_is_one_clear_error_each(data, tmp_path):
    assert "no such folder" in _init_error(tmp_path, tmp_path / "missing")
    empty = tmp_path / "no_weights"
    empty.mkdir()
    (empty / "config.json").write_text((data["gpt2"] / "config.json").read_text())
    assert "no *.safetensors" in _init_error(tmp_path, empty)
    other = tmp_path / "bert"
    other.mkdir()
    for f in data["gpt2"].iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    (other / "config.json").write_text(json.dumps({"model_type": "bert", "vocab_size": VOCAB}))
    assert "model_type='bert' is not supported" in _init_error(tmp_path, other)
    big = make_hf_checkpoint(tmp_path / "big_tok", "gpt2", vocab=VOCAB, tokenizer_vocab=VOCAB + 10)
    assert f"tokenizer.json has {VOCAB + 10} tokens but the model's vocab_size is {VOCAB}" in _init_error(tmp_path, big)
    assert "config.model.d_model=64 conflicts with the checkpoint's d_model=32" in _init_error(
        tmp_path, data["gpt2"], d_model=64)


def test_init_from_workdir_starts_from_that_runs_weights_and_tokenizer(data, gpt2_run, tmp_path):
    c = ft_config(data["gpt2"], data["root"] / "train.txt")
    c.init_from = str(gpt2_run)
    source = finetune.prepare(c, tmp_path)
    assert c.data.tokenizer == "hf" and (tmp_path / "hf_tokenizer" / "tokenizer.json").is_file()
    start = finetune.initial_params(source, source.cfg)
    _, finished = finetune.load_params(gpt2_run)
    for a, b in zip(jax.tree.leaves(start), jax.tree.leaves(finished)):
        np.testing.assert_array_equal(a, np.asarray(b))


def test_export_of_a_model_with_no_hf_counterpart_names_the_field(data, gpt2_run, tmp_path):
    meta = json.loads((gpt2_run / "config.json").read_text())
    meta["model"]["positions"] = "sinusoidal"  # what no GPT-2 / Llama config computes
    (tmp_path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="ModelConfig.positions='sinusoidal' has no Hugging Face"):
        export_lib.export(tmp_path, tmp_path / "out")
    meta["config"]["model"]["kind"] = "seq2seq"
    (tmp_path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="config.model.kind='seq2seq' has no Hugging Face counterpart"):
        export_lib.export(tmp_path, tmp_path / "out")
