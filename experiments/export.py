r"""Write a training run's checkpoint as a Hugging Face folder that transformers loads.

    python experiments/export.py --workdir=runs/ft --out=exported [--step=N]
    # then: transformers.AutoModelForCausalLM.from_pretrained("exported")

The folder holds config.json and model.safetensors (tformer.hf.save_hf_checkpoint),
plus the run's tokenizer files when it tokenizes with a Hugging Face tokenizer
(a run started with init_from=hf:<dir>). LoRA adapters are merged into the
weights. A model with no Hugging Face counterpart (an encoder-decoder, an RNN,
a config no GPT-2/Llama/Mistral computes) fails naming the field.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

if __package__ in (None, ""):
    # Replace (not prepend to) the script's folder: experiments/tokenizers.py must not shadow the library.
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from absl import app, flags, logging
from flax import nnx

from experiments import finetune
from experiments.metrics import QuietLibraries
from experiments.tokenizers import HF_TOKENIZER_DIR, HF_TOKENIZER_FILES
from tformer import families, hf
from tformer.checkpoint import CheckpointError

FLAGS = flags.FLAGS


def define_flags() -> None:
    flags.DEFINE_string("workdir", None, "A training run's workdir.", required=True)
    flags.DEFINE_string("out", None, "The folder to write (created; files in it are replaced).", required=True)
    flags.DEFINE_integer("step", None, "The checkpoint step (default: the newest).")
    flags.DEFINE_bool("verbose", False, "On an error, print the traceback too.")


def export(workdir: str | Path, out: str | Path, step: int | None = None) -> Path:
    """Write `workdir`'s checkpoint (newest or `step`) as a Hugging Face folder `out`; returns it."""
    workdir, out = Path(workdir), Path(out)
    meta = finetune.read_run(workdir)
    family_name = meta["config"]["model"]["kind"]
    if not families.get(family_name).hf_causal_lm:
        hf_kinds = [name for name, f in families.FAMILIES.items() if f.hf_causal_lm]
        raise ValueError(f"config.model.kind={family_name!r} has no Hugging Face counterpart: export writes the "
                         f"families {hf_kinds} (decoder-only LMs) as GPT-2 / Llama / Mistral")
    _, cfg, graphdef, _ = finetune.abstract_run_params(meta)
    hf.config_to_hf(cfg)  # fails naming the ModelConfig field before any weight is read
    _, params = finetune.load_params(workdir, step)
    hf.save_hf_checkpoint(nnx.merge(graphdef, params), out)
    if meta["tokenizer"] == "hf":
        for name in HF_TOKENIZER_FILES:
            if (workdir / HF_TOKENIZER_DIR / name).is_file():
                shutil.copy2(workdir / HF_TOKENIZER_DIR / name, out / name)
    else:
        logging.warning("the run's %r tokenizer has no Hugging Face file; %s holds the model only", meta["tokenizer"],
                        out)
    return out


def main(argv):
    del argv
    logging.get_absl_handler().addFilter(QuietLibraries())
    try:
        out = export(FLAGS.workdir, FLAGS.out, FLAGS.step)
    except (ValueError, CheckpointError, OSError) as e:
        if FLAGS.verbose:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(f"wrote {out} (transformers.AutoModelForCausalLM.from_pretrained({str(out)!r}))")


if __name__ == "__main__":
    define_flags()
    app.run(main)
