r"""What each cheaper variant costs: held-out quality, train/encoder step time and memory, decode.

    python experiments/variants.py --what=lm --steps=150 > lm.jsonl          # lm_tiny bits per byte
    python experiments/variants.py --what=seq2seq --steps=900 \
        --only=dense,linformer16,linformer32,nystrom16,nystrom32 > s2s.jsonl  # seq2seq_tiny exact match
    python experiments/variants.py --what=window_speed --rounds=3            # dense vs banded window, top-k, threshold
    python experiments/variants.py --what=encoder_speed --rounds=3           # Linformer / Nystrom vs dense
    python experiments/variants.py --what=decode --rounds=3                  # int8 cache / int8 weights
    python experiments/variants.py --what=length_sweep --lengths=256,512,1024,2048 --rounds=5 \
        --out=docs/results/variants_vs_length.json         # every variant's step time and memory vs length

Quality: every trained variant gets the same protocol (config, seed, data
order, `--steps`), dense included; the post-training variants (compress_mlp,
int8 weights, int8 cache) are applied to the one trained dense model. The
int8 cache is scored through the cached path (`extend` over an int8 cache,
every key and value read quantized) next to the same path with an fp32 cache.
Speed: variants are timed interleaved, round by round, in one process, so a
shared machine slows them alike; the ratio is the figure to read.
One JSON line per figure on stdout; with --out, also a record of them all and the conditions
(experiments/results.py).
"""

from __future__ import annotations

import json
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
from experiments import decode, input_pipeline, run_config, timing
from experiments.tasks import build_task
from tformer import kvcache
from tformer.compress import param_bytes, with_config
from tformer.plan import compiled_peak_bytes

FLAGS = flags.FLAGS
flags.DEFINE_enum("what", "lm", ["lm", "seq2seq", "window_speed", "encoder_speed", "decode", "length_sweep"],
                  "Which table.")
flags.DEFINE_integer("steps", 300, "Training steps for every quality variant (same for all).")
flags.DEFINE_string("only", "", "Comma-separated variant names to run (default: all).")
flags.DEFINE_string("workdir", "/tmp/tformer_variants", "Scratch directory (tokenizer files).")
flags.DEFINE_string("lengths", "256,1024,4096,16384", "window_speed: sequence lengths.")
flags.DEFINE_integer("rounds", 5, "Speed: interleaved timing rounds (median reported).")
flags.DEFINE_string("out", None, "Also write every row and the conditions to this JSON record.")

# lm_tiny: d_model 128, d_ff 384, so min(d_model, d_ff) = 128 bounds a factorization's rank.
LM_TRAINED = {
    "dense": {},
    "window32": {"local_window": 32}, "window64": {"local_window": 64},
    "topk8": {"attention_topk": 8}, "topk32": {"attention_topk": 32},
    "threshold0.01": {"attention_threshold": 0.01}, "threshold0.05": {"attention_threshold": 0.05},
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


ROWS: list[dict] = []  # every emitted row, for --out


def emit(**row) -> None:
    ROWS.append(row)
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
    cfg = run_config.model_config(config, task.tokenizer).replace(**overrides)
    o, t = run_config.optim_config(config), config.train
    model_cls = run_config.family_of(config).model_class
    graphdef, tx, state, _ = tformer.create_train_state(model_cls, cfg, o, t.seed)
    step_fn = tformer.make_train_step(graphdef, tx, o)
    start = time.time()
    for step in range(t.num_steps):
        state, m = step_fn(state, input_pipeline.batch_at(task.train, step, t.batch_size, t.seed))
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
    for i, batch in enumerate(input_pipeline.eval_batches(task.valid, bs)):
        if i >= config.train.eval_batches:
            break
        s = sums(state, batch)
        nll, w = nll + float(s[0]), w + float(s[1])
    return input_pipeline.bits_per_byte(nll, w, task.valid)


def run_lm() -> None:
    config = _config("lm")
    task = build_task(config, Path(FLAGS.workdir))
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
    task = build_task(config, Path(FLAGS.workdir))
    for name in _selected(list(S2S_TRAINED)):
        model, loss, secs = train_variant(config, task, S2S_TRAINED[name])
        ev = decode.translation_scores(model, task.tokenizer, task.valid_pairs[: config.train.eval_decode_examples],
                                    config.data.src_len, config.data.tgt_len)
        emit(what="seq2seq", variant=name, exact_match=ev["exact_match"], bleu=ev["bleu"], train_loss=loss,
             train_s=round(secs, 1), steps=FLAGS.steps, src_len=config.data.src_len,
             examples=min(len(task.valid_pairs), config.train.eval_decode_examples))


# ---------------------------------------------------------------------------
# Speed and memory.

SPEED_MODEL = dict(vocab_size=256, d_model=128, num_heads=4, num_layers=2, d_ff=512, positions="rope")
RUN_LIMIT_BYTES = 3 << 30  # compile everything (for its peak bytes), run only what fits a shared 24 GB machine


def _interleaved(fns: dict, rounds: int) -> dict:
    """Median seconds per call of each fn, timed round-robin after one warm-up call each."""
    return timing.medians(timing.interleaved(fns, rounds))


def _train_step(cfg, t: int, temp: bool = False):
    """A compiled batch-1 train step at length t, its arguments and its peak bytes (with `temp`: and its
    compiled temporary bytes)."""
    o = tformer.OptimizerConfig(learning_rate=1e-3, warmup_steps=1, total_steps=10)
    graphdef, tx, state, _ = tformer.create_train_state(tformer.DecoderLM, cfg, o, 0)
    step = tformer.make_train_step(graphdef, tx, o, donate=False)
    toks = np.random.default_rng(0).integers(3, 256, (1, t + 1)).astype(np.int32)
    batch = {"inputs": toks[:, :-1], "targets": toks[:, 1:]}
    compiled = step.lower(state, batch).compile()
    if temp:
        return (lambda: compiled(state, batch)), compiled_peak_bytes(compiled), _temp_bytes(compiled)
    return (lambda: compiled(state, batch)), compiled_peak_bytes(compiled)


def _temp_bytes(compiled) -> int | None:
    try:
        return int(compiled.memory_analysis().temp_size_in_bytes)
    except Exception:  # not every backend has a memory analysis
        return None


def run_window_speed() -> None:
    variants = {"dense": {}, "window64": {"local_window": 64}, "window256": {"local_window": 256},
                "topk32": {"attention_topk": 32}, "threshold0.01": {"attention_threshold": 0.01}}
    for t in [int(x) for x in FLAGS.lengths.split(",")]:
        fns, peaks = {}, {}
        for name in _selected(list(variants)):
            cfg = tformer.ModelConfig(max_len=t, **SPEED_MODEL, **variants[name])
            fn, peaks[name] = _train_step(cfg, t)
            if peaks[name] <= RUN_LIMIT_BYTES:
                fns[name] = fn
        secs = _interleaved(fns, FLAGS.rounds if t <= 4096 else max(2, FLAGS.rounds // 2))
        for name in peaks:
            emit(what="train_step", variant=name, seq_len=t, batch=1, peak_bytes=peaks[name],
                 ms=round(secs[name] * 1e3, 1) if name in secs else None,
                 vs_dense=round(secs["dense"] / secs[name], 2) if name in secs and "dense" in secs else None,
                 model=SPEED_MODEL)


def run_encoder_speed() -> None:
    variants = {"dense": {}, "linformer32": {"attention_lowrank": "linformer", "lowrank_dim": 32},
                "nystrom32": {"attention_lowrank": "nystrom", "lowrank_dim": 32}}
    for s in (1024, 4096):
        fns, peaks = {}, {}
        for name in _selected(list(variants)):
            cfg = tformer.ModelConfig(max_len=s, num_encoder_layers=2, **{**SPEED_MODEL, "positions": "sinusoidal"},
                                      **variants[name])
            graphdef, state = nnx.split(tformer.EncoderDecoder(cfg, rngs=nnx.Rngs(0)))
            src = jnp.asarray(np.random.default_rng(0).integers(3, 256, (1, s)), jnp.int32)

            def loss(state, src, graphdef=graphdef):
                return jnp.mean(nnx.merge(graphdef, state).encode(src) ** 2)

            compiled = jax.jit(jax.value_and_grad(loss)).lower(state, src).compile()
            peaks[name] = compiled_peak_bytes(compiled)
            fns[name] = lambda c=compiled, st=state, x=src: c(st, x)
        secs = _interleaved(fns, FLAGS.rounds)
        for name in peaks:
            emit(what="encoder_step", variant=name, src_len=s, batch=1, peak_bytes=peaks[name],
                 ms=round(secs[name] * 1e3, 1),
                 vs_dense=round(secs["dense"] / secs[name], 2) if "dense" in secs else None)


def _encoder_step(variant: dict, s: int):
    """A compiled batch-1 encoder forward + backward at source length s, its peak and temporary bytes."""
    cfg = tformer.ModelConfig(max_len=s, num_encoder_layers=2, **{**SPEED_MODEL, "positions": "sinusoidal"}, **variant)
    graphdef, state = nnx.split(tformer.EncoderDecoder(cfg, rngs=nnx.Rngs(0)))
    src = jnp.asarray(np.random.default_rng(0).integers(3, 256, (1, s)), jnp.int32)

    def loss(state, src):
        return jnp.mean(nnx.merge(graphdef, state).encode(src) ** 2)

    compiled = jax.jit(jax.value_and_grad(loss)).lower(state, src).compile()
    return (lambda: compiled(state, src)), compiled_peak_bytes(compiled), _temp_bytes(compiled)


# The length sweep's variants: causal decoder attention (a train step) and encoder self-attention (Linformer
# and Nystrom are bidirectional only: an encoder's forward + backward), each against its own dense.
SWEEP_DECODER = {"dense": {}, "window64": {"local_window": 64}, "topk32": {"attention_topk": 32}}
SWEEP_ENCODER = {"dense": {}, "linformer32": {"attention_lowrank": "linformer", "lowrank_dim": 32},
                 "nystrom32": {"attention_lowrank": "nystrom", "lowrank_dim": 32}}


def run_length_sweep() -> None:
    """Every variant's step time (median of --rounds, interleaved per length) and compiled memory vs length."""
    for t in [int(x) for x in FLAGS.lengths.split(",")]:
        for where, variants in (("decoder", SWEEP_DECODER), ("encoder", SWEEP_ENCODER)):
            built = {}
            for name in _selected(list(variants)):
                if where == "decoder":
                    built[name] = _train_step(tformer.ModelConfig(max_len=t, **SPEED_MODEL, **variants[name]), t, True)
                else:
                    built[name] = _encoder_step(variants[name], t)
            secs = _interleaved({n: b[0] for n, b in built.items() if b[1] <= RUN_LIMIT_BYTES}, FLAGS.rounds)
            for name, (_, peak, temp) in built.items():
                emit(what=f"{where}_step", variant=name, seq_len=t, batch=1, peak_bytes=peak, temp_bytes=temp,
                     ms=secs[name] * 1e3 if name in secs else None, model=SPEED_MODEL)


def _decode_loop(model, batch: int, prompt_len: int, cache_len: int, steps: int):
    """(fn running `steps` greedy decode steps after a fixed prefilled cache, the cache)."""
    graphdef, state = nnx.split(model)
    prompt = jnp.asarray(np.random.default_rng(0).integers(3, 256, (batch, prompt_len)), jnp.int32)
    prefill = jax.jit(lambda st, p: nnx.merge(graphdef, st).extend(p, nnx.merge(graphdef, st).init_cache(
        batch, cache_len)))
    logits, cache = prefill(state, prompt)
    first = jnp.argmax(logits[:, -1], -1).astype(jnp.int32)

    @jax.jit
    def decode(state, cache, tok):
        m = nnx.merge(graphdef, state)
        layers = m.decode_layers()  # unstacked once, outside the loop, as `generate` does

        def step(carry, _):
            tok, cache = carry
            logits, cache = m.extend(tok[:, None], cache, None, layers)
            return (jnp.argmax(logits[:, 0], -1).astype(jnp.int32), cache), None

        (tok, _), _ = jax.lax.scan(step, (tok, cache), None, length=steps)
        return tok

    return (lambda: decode(state, cache, first)), cache


def run_decode() -> None:
    steps = 128
    # int8 KV cache: batch 8, a 2,048-slot cache filled to 1,920 before the timed 128 steps.
    base = tformer.ModelConfig(vocab_size=256, d_model=256, num_heads=4, num_layers=4, max_len=2048)
    fns, caches = {}, {}
    for name, kv in (("fp32_cache", None), ("int8_cache", "int8")):
        model = tformer.DecoderLM(base.replace(kv_cache_dtype=kv), rngs=nnx.Rngs(0))
        fns[name], caches[name] = _decode_loop(model, 8, 2048 - steps, 2048, steps)
    secs = _interleaved(fns, FLAGS.rounds)
    for name in fns:
        emit(what="decode_cache", variant=name, batch=8, cache_len=2048, cache_bytes=kvcache.nbytes(caches[name]),
             ms_per_token=round(secs[name] / steps * 1e3, 3), vs_fp32=round(secs["fp32_cache"] / secs[name], 2))
    # int8 weights: the cpu_tiny shape, prompt 16, 128 new tokens, batch 1 and 8.
    cfg = tformer.ModelConfig(vocab_size=256, d_model=256, num_heads=4, num_layers=4, max_len=256)
    dense = tformer.DecoderLM(cfg, rngs=nnx.Rngs(0))
    models = {"fp32_weights": dense, "int8_weights": tformer.quantize_weights(dense, "int8")}
    for batch in (1, 8):
        fns = {name: _decode_loop(m, batch, 16, 16 + steps, steps)[0] for name, m in models.items()}
        secs = _interleaved(fns, FLAGS.rounds)
        for name, m in models.items():
            emit(what="decode_weights", variant=name, batch=batch, param_bytes=param_bytes(m),
                 ms_per_token=round(secs[name] / steps * 1e3, 3), vs_fp32=round(secs["fp32_weights"] / secs[name], 2))


def main(argv):
    del argv
    import os

    load_at_start = [round(x, 2) for x in os.getloadavg()]
    {"lm": run_lm, "seq2seq": run_seq2seq, "window_speed": run_window_speed, "encoder_speed": run_encoder_speed,
     "decode": run_decode, "length_sweep": run_length_sweep}[FLAGS.what]()
    if FLAGS.out:
        from experiments import results

        results.write(FLAGS.out, {"conditions": results.conditions(rounds=FLAGS.rounds, load_at_start=load_at_start,
                                                                   timing="median of the rounds, variants "
                                                                   "interleaved per length"),
                                  "what": FLAGS.what, "rows": ROWS})


if __name__ == "__main__":
    app.run(main)
