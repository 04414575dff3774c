r"""Generate from the latest checkpoint of a training run.

    python experiments/sample.py --workdir=runs/lm_tiny --prompt="def fib(n):" --temperature=0.8
    python experiments/sample.py --workdir=runs/seq2seq_tiny --input=40213 --input=777
    python experiments/sample.py --workdir=runs/seq2seq_tiny --input_file=numbers.txt --beam_size=4

Everything else (model config, tokenizer) is read from the workdir.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
from absl import app, flags
from flax import nnx

import tformer
from experiments.tokenizers import make_tokenizer
from tformer import train_step as ts
from tformer.checkpoint import Checkpointer, abstract_like

FLAGS = flags.FLAGS


def define_flags() -> None:
    flags.DEFINE_string("workdir", None, "A training run's workdir.", required=True)
    flags.DEFINE_multi_string("prompt", [], "LM prompt(s).")
    flags.DEFINE_multi_string("input", [], "seq2seq source line(s) to translate.")
    flags.DEFINE_string("input_file", None, "seq2seq: a file of source lines.")
    flags.DEFINE_integer("max_new_tokens", 200, "Tokens to generate.")
    flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
    flags.DEFINE_integer("top_k", None, "Sample from the k most likely tokens.")
    flags.DEFINE_float("top_p", None, "Nucleus sampling mass.")
    flags.DEFINE_integer("beam_size", 1, "seq2seq: beam size (1 = greedy).")
    flags.DEFINE_integer("seed", 0, "PRNG seed for sampling.")


def load(workdir: str | Path):
    """(model with the newest checkpoint's weights, tokenizer, saved run config dict)."""
    workdir = Path(workdir)
    meta_path = workdir / "config.json"
    if not meta_path.exists():
        raise FileNotFoundError(f"{meta_path} not found: is {workdir} a training run's workdir?")
    meta = json.loads(meta_path.read_text())
    from experiments.train import MODEL_KINDS

    model_cls = MODEL_KINDS[meta["config"]["model"]["kind"]]
    cfg = getattr(model_cls, "config_class", tformer.ModelConfig)(**meta["model"])
    data = meta["config"]["data"]
    tok = make_tokenizer(meta["tokenizer"], workdir, (), data["vocab_size"])
    optim = {k: v for k, v in meta["config"]["optim"].items()}
    optim["total_steps"] = optim.get("total_steps") or meta["config"]["train"]["num_steps"]
    o = ts.OptimizerConfig(**optim)
    graphdef, abstract = ts.abstract_model(model_cls, cfg)
    tx = ts.make_optimizer(o, abstract)
    target = ts.abstract_train_state(abstract, tx)
    ckpt = Checkpointer(workdir / "checkpoints")
    try:
        state, _ = ckpt.restore(target=abstract_like(target, jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), target)))
    finally:
        ckpt.close()
    return nnx.merge(graphdef, state.params), tok, meta


def main(argv):
    del argv
    model, tok, meta = load(FLAGS.workdir)
    if meta["config"]["model"]["kind"] in ("seq2seq", "rnn_seq2seq"):
        from experiments.train import translate

        lines = list(FLAGS.input)
        if FLAGS.input_file:
            lines += [l.rstrip("\n") for l in open(FLAGS.input_file, encoding="utf-8") if l.strip()]
        if not lines:
            raise app.UsageError("give --input or --input_file for a seq2seq model")
        d = meta["config"]["data"]
        for src, hyp in zip(lines, translate(model, tok, lines, d["src_len"], min(FLAGS.max_new_tokens, model.cfg.max_len - 1), FLAGS.beam_size)):
            print(f"{src}\t{hyp}")
        return
    from experiments.train import complete

    texts = complete(model, tok, FLAGS.prompt or [""], FLAGS.max_new_tokens, jax.random.key(FLAGS.seed),
                     FLAGS.temperature, FLAGS.top_k, FLAGS.top_p)
    for text in texts:
        print(text)
        print("-" * 40)


if __name__ == "__main__":
    define_flags()
    app.run(main)
