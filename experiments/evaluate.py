r"""Score a training run's checkpoint without training.

    python experiments/evaluate.py --workdir=runs/ft                       # the run's validation split
    python experiments/evaluate.py --workdir=runs/ft --data=held_out.txt   # every line of a file
    python experiments/evaluate.py --workdir=runs/ft --step=500 --data=stdlib

Prints one JSON line (loss, accuracy, perplexity and bits per byte for an LM;
loss, accuracy, exact match and BLEU for seq2seq, plus step and data) and
writes it to `<workdir>/eval/step_<N>_<data>.json`. On the run's own split
with its `train.eval_batches`, mesh and batch size this is the very
computation the runner's eval does, so it reproduces the final eval of a
finished run; `--eval_batches=0` scores the whole split (a given file always is).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

if __package__ in (None, ""):
    # Replace (not prepend to) the script's folder: experiments/tokenizers.py must not shadow the library.
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from absl import app, flags, logging
from flax import nnx
from ml_collections import ConfigDict

from experiments import corpora, finetune, run_config
from experiments import input_pipeline as ip
from experiments.metrics import QuietLibraries, atomic_write
from experiments.tasks import build_task, evaluate
from tformer import lora, sharding
from tformer import training as ts
from tformer.checkpoint import CheckpointError

FLAGS = flags.FLAGS


def define_flags() -> None:
    flags.DEFINE_string("workdir", None, "A training run's workdir.", required=True)
    flags.DEFINE_string("data", None, "A text file / directory (LM), parallel files or a corpus name such as "
                                      "stdlib or numbers:<direction> (default: the run's validation split).")
    flags.DEFINE_integer("step", None, "The checkpoint step (default: the newest).")
    flags.DEFINE_integer("eval_batches", None, "Batches to score (default: the run's train.eval_batches on its "
                                               "own split, all of a given file; 0: all).")
    flags.DEFINE_bool("verbose", False, "On an error, print the traceback too.")


def _task(config: ConfigDict, workdir: Path, data: str | None):
    """The run's task; with `data`, a task whose validation split is that data (a file: all of it)."""
    if data is None:
        return build_task(config, workdir)
    with config.unlocked():
        config.data.corpus = data
    task = build_task(config, workdir)
    if task.name == "lm" and Path(data).exists():
        corpus = corpora.read_text_corpus(data, validation_fraction=config.data.validation_fraction)
        docs = corpus["train"] + corpus["validation"]
        task.valid = ip.make_lm_split(task.tokenizer, docs, config.data.seq_len)
    return task


def evaluate_run(workdir: str | Path, data: str | None = None, step: int | None = None,
                 eval_batches: int | None = None) -> dict:
    """The runner's eval (`tasks.evaluate`) of a checkpoint, on the run's mesh and its validation data."""
    workdir = Path(workdir)
    meta = finetune.read_run(workdir)
    config = ConfigDict(meta["config"])
    task = _task(config, workdir, data)
    t = config.train
    bs = t.eval_batch_size or t.batch_size
    if eval_batches is None and data is not None:
        eval_batches = 0
    if eval_batches is not None:
        with config.unlocked():
            t.eval_batches = eval_batches or ip.num_eval_batches(task.valid, bs)
    model_cls, cfg, graphdef, _ = finetune.abstract_run_params(meta)
    o = ts.OptimizerConfig(**meta["optim"])
    mesh, rules = run_config.make_run_mesh(config), sharding.rules_for(config.mesh.preset)
    lcfg = finetune.lora_config(t) if "lora_rank" in t else None
    tx = ts.make_optimizer(o, ts.abstract_model(model_cls, cfg)[1], lcfg)
    params_sh = ts.state_shardings(model_cls, cfg, tx, mesh, rules, lcfg).params
    _, params = finetune.load_params(workdir, step, shardings=params_sh, merge=False)
    batch_sh = ts.batch_sharding(mesh, rules, next(ip.eval_batches(task.valid, bs)))
    eval_fn = ts.make_eval_step(graphdef, o, mesh=mesh, rules=rules, params_sharding=params_sh,
                                batch_sharding=batch_sh, microbatches=config.mesh.microbatches or None)
    return evaluate(task, config, eval_fn, params, batch_sh, lambda: nnx.merge(graphdef, lora.merged(params)))


def main(argv):
    del argv
    logging.get_absl_handler().addFilter(QuietLibraries())
    try:
        workdir = Path(FLAGS.workdir)
        step = FLAGS.step if FLAGS.step is not None else finetune.latest_step(workdir)
        result = {"step": step, "data": FLAGS.data or "validation",
                  **evaluate_run(workdir, FLAGS.data, step, FLAGS.eval_batches)}
    except (ValueError, CheckpointError, OSError) as e:
        if FLAGS.verbose:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    line = json.dumps(result)
    name = re.sub(r"[^\w.-]+", "_", Path(result["data"]).name or result["data"])
    (workdir / "eval").mkdir(exist_ok=True)
    atomic_write(workdir / "eval" / f"step_{step}_{name}.json", line + "\n")
    print(line)


if __name__ == "__main__":
    define_flags()
    app.run(main)
