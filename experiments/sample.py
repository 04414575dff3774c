r"""Generate from the latest checkpoint of a training run.

    python experiments/sample.py --workdir=runs/lm_tiny --prompt="def fib(n):" --temperature=0.8
    python experiments/sample.py --workdir=runs/seq2seq_tiny --input=40213 --input=777
    python experiments/sample.py --workdir=runs/seq2seq_tiny --input_file=numbers.txt --beam_size=4

Everything else (model config, tokenizer) is read from the workdir; only the
parameters are read from the checkpoint (`Checkpointer.restore_params`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    # Replace (not prepend to) the script's folder: experiments/tokenizers.py must not shadow the library.
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import jax
from absl import app, flags, logging
from flax import nnx

from experiments import decode, finetune
from experiments.metrics import QuietLibraries
from experiments.tokenizers import Tokenizer, make_tokenizer
from tformer import families
from tformer.checkpoint import CheckpointError

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
    flags.DEFINE_bool("verbose", False, "On an error, print the traceback too (not just the one-line message).")


def read_run(workdir: Path) -> dict:
    """The run's saved config.json (model config, run config, tokenizer)."""
    if not workdir.is_dir():
        raise ValueError(f"--workdir={workdir} does not exist")
    meta_path = workdir / "config.json"
    if not meta_path.exists():
        raise ValueError(f"{meta_path} not found: is {workdir} a training run's workdir?")
    try:
        meta = json.loads(meta_path.read_text())
        for needed in (meta["model"], meta["config"]["model"]["kind"], meta["config"]["data"]["src_len"]):
            del needed  # each lookup fails with KeyError when the file lacks it
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{meta_path} is not a run config ({type(e).__name__}: {e}); rerun train.py to rewrite it"
                         ) from None
    return meta


def load(workdir: str | Path):
    """(model with the newest checkpoint's weights, tokenizer, saved run config dict)."""
    workdir = Path(workdir)
    meta = read_run(workdir)
    data = meta["config"]["data"]
    if meta["tokenizer"] == "sentencepiece" and not (workdir / "tokenizer.model").is_file():
        raise ValueError(f"{workdir / 'tokenizer.model'} is missing: the run's tokenizer is needed to read its ids")
    tok = make_tokenizer(meta["tokenizer"], workdir, (), data["vocab_size"])
    # A LoRA run's checkpoint holds base weights + adapters: read both, fold the adapters in.
    graphdef = finetune.abstract_run_params(meta)[2]
    _, params = finetune.load_params(workdir)
    return nnx.merge(graphdef, params), tok, meta


def source_lines() -> list[str]:
    lines = list(FLAGS.input)
    if FLAGS.input_file:
        with open(FLAGS.input_file, encoding="utf-8") as f:
            lines += [line.rstrip("\n") for line in f if line.strip()]
    if not lines:
        raise app.UsageError("give --input or --input_file for a seq2seq model")
    return lines


def run(model: nnx.Module, tok: Tokenizer, meta: dict) -> list[str]:
    """The lines to print: translations (seq2seq) or prompt continuations (LM)."""
    if families.get(meta["config"]["model"]["kind"]).task == "seq2seq":  # translation (Transformer or RNN)
        lines, src_len = source_lines(), meta["config"]["data"]["src_len"]
        _, cut = decode.encode_sources(tok, lines, src_len)
        if cut:
            logging.warning("%d input(s) are longer than the model's src_len=%d tokens and were cut", cut, src_len)
        hyps = decode.translate(model, tok, lines, src_len, FLAGS.max_new_tokens, FLAGS.beam_size)
        return [f"{src}\t{hyp}" for src, hyp in zip(lines, hyps)]
    texts = decode.complete(model, tok, FLAGS.prompt or [""], FLAGS.max_new_tokens, jax.random.key(FLAGS.seed),
                            FLAGS.temperature, FLAGS.top_k, FLAGS.top_p)
    return [f"{text}\n{'-' * 40}" for text in texts]


def main(argv):
    del argv
    logging.get_absl_handler().addFilter(QuietLibraries())
    try:
        model, tok, meta = load(FLAGS.workdir)
        for line in run(model, tok, meta):
            print(line)
    except (ValueError, CheckpointError, OSError) as e:
        if FLAGS.verbose:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    define_flags()
    app.run(main)
