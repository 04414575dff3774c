r"""What each cheaper variant costs: held-out quality, train/encoder step time and memory, decode.

    python experiments/variants.py --what=lm --steps=300 > lm.jsonl           # lm_tiny bits per byte
    python experiments/variants.py --what=seq2seq --steps=600 > s2s.jsonl     # seq2seq_tiny exact match
    python experiments/variants.py --what=window_speed > speed.jsonl           # dense vs banded window, top-k...
    python experiments/variants.py --what=encoder_speed                        # Linformer / Nystrom vs dense
    python experiments/variants.py --what=decode                               # int8 cache / int8 weights

Quality: every trained variant gets the same protocol (config, seed, data
order, `--steps`), dense included; the post-training variants (compress_mlp,
int8 weights, int8 cache) are applied to the one trained dense model. The
int8 cache is scored through the cached path (`extend` over an int8 cache,
every key and value read quantized) next to the same path with an fp32 cache.
Speed: variants are timed interleaved, round by round, in one process, so a
shared machine slows them alike; the ratio is the figure to read.
One JSON line per figure on stdout.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # `python experiments/variants.py`: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

import tformer
from experiments import input_pipeline as ip
from experiments import train as tr
from tformer import kvcache
from tformer.compress import param_bytes, with_config

FLAGS = flags.FLAGS
flags.DEFINE_enum("what", "lm", ["lm", "seq2seq", "window_speed", "encoder_speed", "decode"], "Which table.")
flags.DEFINE_integer("steps", 300, "Training steps for every quality variant (same for all).")
flags.DEFINE_string("only", "", "Comma-separated variant names to run (default: all).")
flags.DEFINE_string("workdir", "/tmp/tformer_variants", "Scratch directory (tokenizer files).")
flags.DEFINE_string("lengths", "256,1024,4096,16384", "window_speed: sequence lengths.")
flags.DEFINE_integer("rounds", 5, "Speed: interleaved timing rounds (median reported).")

# lm_tiny: d_model 128, d_ff 384, so min(d_model, d_ff) = 128 bounds a factorization's rank.
LM_TRAINED = {
    "dense": {},
    "topk8": {"attention_topk": 8}, "topk32": {"attention_topk": 32},
    "threshold0.01": {"attention_threshold": 0.01}, "threshold0.05": {"attention_threshold": 0.05},
    "window32": {"local_window": 32}, "window64": {"local_window": 64},
    "mlp_rank64": {"mlp_rank": 64}, "mlp_rank32": {"mlp_rank": 32},
}
S2S_TRAINED = {
    "dense": {},
    "linformer16": {"attention_lowrank": "linformer", "lowrank_dim": 16},
    "linformer32": {"attention_lowrank": "linformer", "lowrank_dim": 32},
    "nystrom16": {"attention_lowrank": "nystrom", "lowrank_dim": 16},
    "nystrom32": {"attention_lowrank": "nystrom", "lowrank_dim": 32},
    "linformer4": {"attention_lowrank": "linformer", "lowrank_dim": 4},
    "nystrom4": {"attention_lowrank": "nystrom", "lowrank_dim": 4},
}


def emit(**row) -> None:
    print(json.dumps(row), flush=True)


def _selected(names):
    only = [n for n in FLAGS.only.split(",") if n]
    return [n for n in names if not only or n in only]


# ---------------------------------------------------------------------------
# Quality.


def _config(name: str):
    module = {"lm": "lm_tiny", "seq2seq": "seq2seq_tiny"}[name]
    config = __import__(f"experiments.configs.{module}", fromlist=["get_config"]).get_config()
    config.train.num_steps = FLAGS.steps
    return config


def train_variant(config, task, overrides: dict):
    """Train `config`'s model with `overrides` for config.train.num_steps; returns the model."""
    cfg = tr.model_config(config, task).replace(**overrides)
    o, t = tr.optim_config(config), config.train
    model_cls = tr.MODEL_KINDS[config.model.kind]
    graphdef, tx, state, _ = tformer.create_train_state(model_cls, cfg, o, t.seed)
    step_fn = tformer.make_train_step(graphdef, tx, o)
    start = time.time()
    for step in range(t.num_steps):
        state, m = step_fn(state, ip.batch_at(task.train, step, t.batch_size, t.seed))
    loss = float(m["loss"])
    return nnx.merge(graphdef, state.params), loss, time.time() - start


def lm_bits_per_byte(model, task, config, cached: bool = False) -> float:
    """Held-out bits per byte: parallel forward, or `cached` (prefill into the model's own KV cache)."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def sums(state, batch):
        m = nnx.merge(graphdef, state)
        if cached:
            b, t = batch["inputs"].shape
            logits, _ = m.extend(batch["inputs"], m.init_cache(b, t))
        else:
            logits = m(batch["inputs"])
        lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        nll = -jnp.take_along_axis(lp, batch["targets"][..., None], axis=-1)[..., 0]
        w = batch.get("weights", jnp.ones(nll.shape))
        return jnp.sum(nll * w), jnp.sum(w)

    nll, w = 0.0, 0.0
    bs = config.train.batch_size
    for i, batch in enumerate(ip.eval_batches(task.valid, bs)):
        if i >= config.train.eval_batches:
            break
        s = sums(state, batch)
        nll, w = nll + float(s[0]), w + float(s[1])
    return ip.bits_per_byte(nll, w, task.valid)


def run_lm() -> None:
    config = _config("lm")
    task = tr.build_task(config, Path(FLAGS.workdir))
    proto = dict(steps=FLAGS.steps, batch=config.train.batch_size, seq_len=config.data.seq_len,
                 eval_rows=config.train.eval_batches * config.train.batch_size)
    dense = None
    for name in _selected(list(LM_TRAINED)) + (["dense"] if "dense" not in _selected(list(LM_TRAINED)) else []):
        if name == "dense" and dense is not None:
            continue
        model, loss, secs = train_variant(config, task, LM_TRAINED[name])
        emit(what="lm", variant=name, bits_per_byte=lm_bits_per_byte(model, task, config), train_loss=loss,
             train_s=round(secs, 1), params=param_bytes(model), **proto)
        if name == "dense":
            dense = model
    post = {
        "compress_svd64": lambda m: tformer.compress_mlp(m, 64, "svd"),
        "compress_svd32": lambda m: tformer.compress_mlp(m, 32, "svd"),
        "compress_random64": lambda m: tformer.compress_mlp(m, 64, "random"),
        "compress_random32": lambda m: tformer.compress_mlp(m, 32, "random"),
        "int8_weights": lambda m: tformer.quantize_weights(m, "int8"),
    }
    for name in _selected(list(post)):
        small = post[name](dense)
        emit(what="lm", variant=name, post_training=True, bits_per_byte=lm_bits_per_byte(small, task, config),
             params=param_bytes(small), **proto)
    if _selected(["int8_cache"]):
        int8 = with_config(dense, kv_cache_dtype="int8")
        emit(what="lm", variant="fp32_cache_path", post_training=True,
             bits_per_byte=lm_bits_per_byte(dense, task, config, cached=True), **proto)
        emit(what="lm", variant="int8_cache", post_training=True,
             bits_per_byte=lm_bits_per_byte(int8, task, config, cached=True), **proto)


def run_seq2seq() -> None:
    config = _config("seq2seq")
    task = tr.build_task(config, Path(FLAGS.workdir))
    for name in _selected(list(S2S_TRAINED)):
        model, loss, secs = train_variant(config, task, S2S_TRAINED[name])
        ev = tr.translate_eval(model, task, config)
        emit(what="seq2seq", variant=name, exact_match=ev["exact_match"], bleu=ev["bleu"], train_loss=loss,
             train_s=round(secs, 1), steps=FLAGS.steps, src_len=config.data.src_len,
             examples=min(len(task.valid_pairs), config.train.eval_decode_examples))


def run_window_speed():
    raise NotImplementedError


run_encoder_speed = run_decode = run_window_speed


def main(argv):
    del argv
    {"lm": run_lm, "seq2seq": run_seq2seq, "window_speed": run_window_speed, "encoder_speed": run_encoder_speed,
     "decode": run_decode}[FLAGS.what]()


if __name__ == "__main__":
    app.run(main)
