r"""Train a tformer model from a config file.

    python experiments/train.py --config=experiments/configs/lm_tiny.py --workdir=runs/lm_tiny \
        --config.train.num_steps=500 --config.model.num_layers=2

A run resumes from the newest readable checkpoint in its workdir (params,
optimizer state, step, RNG and data position), saves on SIGTERM before
exiting, and stops with a clear message on a non-finite loss.

Plan a mesh without training (or any data): compile the step from abstract
shapes and print per-device memory, FLOPs and collectives, here for 256 fake
CPU devices:

    python experiments/train.py --config=experiments/configs/lm_gpt2_small.py --plan --plan_devices=256 \
        --config.model.vocab_size=50257 --config.train.batch_size=256 --config.mesh.fsdp=-1 --config.mesh.data=1 \
        --config.mesh.preset=fsdp

Multi-process: `--coordinator_address=host:port --num_processes=N --process_id=i`
on each process (any platform; CPU uses gloo collectives), or `--distributed`
where JAX detects the cluster itself (Cloud TPU slices, SLURM). Each process
reads only its slice of every global batch; process 0 writes logs and metrics;
checkpoints are written by all processes together.
"""

from __future__ import annotations

import dataclasses
import json
import logging as logging_std
import math
import os
import signal
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # `python experiments/train.py`: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from ml_collections import ConfigDict, config_flags

import tformer
from experiments import corpora
from experiments import input_pipeline as ip
from experiments.metrics import MetricWriter, atomic_write, plot_loss
from experiments.tokenizers import make_tokenizer
from tformer import flops, host, sharding
from tformer import train_step as ts
from tformer.checkpoint import Checkpointer, abstract_like

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Command-line flags; defined only when run as a script, so importing this module is side-effect free."""
    config_flags.DEFINE_config_file("config", None, "Experiment config file (experiments/configs/*.py).")
    flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the tokenizer.")
    flags.DEFINE_bool("distributed", False,
                      "Multi-host: call jax.distributed.initialize() and let JAX detect the cluster "
                      "(Cloud TPU slices, SLURM, Open MPI, JAX_COORDINATOR_ADDRESS).")
    flags.DEFINE_string("coordinator_address", None, "Multi-process: host:port of process 0 (any platform).")
    flags.DEFINE_integer("num_processes", None, "Multi-process: how many processes (with --coordinator_address).")
    flags.DEFINE_integer("process_id", None, "Multi-process: this process's rank (with --coordinator_address).")
    flags.DEFINE_bool("plan", False,
                      "Dry run: compile the train step for the config's mesh from abstract shapes, print "
                      "per-device memory, FLOPs and collectives, and exit (no data, no training).")
    flags.DEFINE_integer("plan_devices", None,
                         "With --plan: plan on this many fake CPU devices (e.g. 256 for a pod slice).")
    flags.DEFINE_bool("tune_allocator", True,
                      "Keep freed host memory in the process (tformer.host.tune_allocator): a CPU train step "
                      "then page-faults nothing instead of its whole working set. Resident memory stays at its peak.")

MODEL_KINDS = {"lm": tformer.DecoderLM, "seq2seq": tformer.EncoderDecoder}


def to_dataclass(cls, section: dict, name: str):
    """Build a config dataclass; unknown fields fail naming the field and the valid ones."""
    valid = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(section) - valid)
    if unknown:
        raise ValueError(f"config.{name}: unknown field(s) {unknown}; valid fields are {sorted(valid)}")
    try:
        return cls(**section)
    except (TypeError, ValueError) as e:
        raise ValueError(f"config.{name}: {e}") from None


def _check_section(section: ConfigDict, name: str, valid: set[str]) -> None:
    unknown = sorted(set(section.keys()) - valid)
    if unknown:
        raise ValueError(f"config.{name}: unknown field(s) {unknown}; valid fields are {sorted(valid)}")


@dataclasses.dataclass
class Task:
    """Everything data-side a run needs: tokenizer, splits, and how to score them."""

    kind: str
    tokenizer: object
    train: ip.Split
    valid: ip.Split
    valid_pairs: list | None = None  # seq2seq: raw (src, tgt) for exact match / BLEU


def build_task(config: ConfigDict, workdir: Path) -> Task:
    d, kind = config.data, config.model.kind
    if kind not in MODEL_KINDS:
        raise ValueError(f"config.model.kind: unknown {kind!r}; choose one of {sorted(MODEL_KINDS)}")
    max_bytes = d.max_bytes or None
    if kind == "lm":
        corpus = corpora.stdlib_corpus(max_bytes) if d.corpus == "stdlib" else corpora.read_text_corpus(d.corpus)
        if not corpus["train"] or not corpus["validation"]:
            raise corpora.DataError(f"{d.corpus}: too little text for both a train and a validation split")
        tok = make_tokenizer(d.tokenizer, workdir, corpus["train"], d.vocab_size)
        sets = ip.make_lm_datasets(tok, corpus, d.seq_len)
        return Task(kind, tok, sets["train"], sets["validation"])
    if d.corpus.startswith("numbers:"):
        pairs = corpora.numbers_task(d.corpus.split(":", 1)[1], d.num_train, d.num_valid, seed=0)
    else:
        all_pairs = corpora.read_parallel_corpus(*d.corpus.split(",")[:2])
        n_valid = max(1, min(d.num_valid, len(all_pairs) // 10))
        pairs = {"train": all_pairs[:-n_valid], "validation": all_pairs[-n_valid:]}
    texts = [s for s, _ in pairs["train"]] + [t for _, t in pairs["train"]]
    tok = make_tokenizer(d.tokenizer, workdir, texts, d.vocab_size)
    sets = ip.make_seq2seq_datasets(tok, tok, pairs, d.src_len, d.tgt_len)
    if sets["validation"].num_truncated:
        logging.warning("%d validation pairs exceed src_len/tgt_len and were truncated", sets["validation"].num_truncated)
    return Task(kind, tok, sets["train"], sets["validation"], pairs["validation"])


def model_config(config: ConfigDict, task: Task) -> tformer.ModelConfig:
    m = {k: v for k, v in config.model.to_dict().items() if k != "kind"}
    if not m.get("vocab_size"):
        m["vocab_size"] = task.tokenizer.vocab_size
    elif m["vocab_size"] < task.tokenizer.vocab_size:
        raise ValueError(
            f"config.model.vocab_size={m['vocab_size']} is smaller than the tokenizer's "
            f"{task.tokenizer.vocab_size}; set it to 0 to follow the tokenizer"
        )
    m.update(pad_id=task.tokenizer.pad_id, bos_id=task.tokenizer.bos_id, eos_id=task.tokenizer.eos_id)
    return to_dataclass(tformer.ModelConfig, m, "model")


def optim_config(config: ConfigDict) -> ts.OptimizerConfig:
    o = config.optim.to_dict()
    if not o.get("total_steps"):
        o["total_steps"] = config.train.num_steps
    return to_dataclass(ts.OptimizerConfig, o, "optim")


def validate(config: ConfigDict) -> None:
    from experiments.configs.base import base_config

    ref = base_config()
    for name in ("data", "train", "mesh"):
        if name not in config:
            raise ValueError(f"config.{name}: section missing; start from experiments/configs/base.py")
        _check_section(config[name], name, set(ref[name].keys()))
    t = config.train
    for field in ("batch_size", "num_steps", "log_every", "eval_every", "checkpoint_every"):
        if t[field] < 1:
            raise ValueError(f"config.train.{field} must be >= 1, got {t[field]}")


def plan_model_config(config: ConfigDict) -> tformer.ModelConfig:
    """The model config without building the data: vocab from the config or the tokenizer's known size."""
    from experiments.tokenizers import ByteTokenizer

    m = {k: v for k, v in config.model.to_dict().items() if k != "kind"}
    if not m.get("vocab_size"):
        if config.data.tokenizer == "byte":
            tok = ByteTokenizer()
            m.update(vocab_size=tok.vocab_size, pad_id=tok.pad_id, bos_id=tok.bos_id, eos_id=tok.eos_id)
        else:  # a sentencepiece model has exactly the vocab_size it is trained with
            m["vocab_size"] = config.data.vocab_size
    return to_dataclass(tformer.ModelConfig, m, "model")


def plan(config: ConfigDict):
    """Compile (never run) the run's train step on its mesh; returns a `tformer.plan.Plan`."""
    from tformer import plan as plan_lib

    validate(config)
    kind = config.model.kind
    if kind not in MODEL_KINDS:
        raise ValueError(f"config.model.kind: unknown {kind!r}; choose one of {sorted(MODEL_KINDS)}")
    cfg, o = plan_model_config(config), optim_config(config)
    mesh = make_run_mesh(config)
    rules = sharding.rules_for(config.mesh.preset)
    d = config.data
    seq, src = (d.seq_len, None) if kind == "lm" else (d.tgt_len, d.src_len)
    return plan_lib.plan_train_step(MODEL_KINDS[kind], cfg, o, mesh, rules, batch=config.train.batch_size,
                                    seq_len=seq, src_len=src, microbatches=config.mesh.microbatches or None)


def use_fake_cpu_devices(n: int) -> None:
    """Make the CPU backend expose `n` devices; only possible before JAX starts its backends."""
    if n < 1:
        raise ValueError(f"--plan_devices must be >= 1, got {n}")
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:
        raise ValueError(
            "--plan_devices: JAX's backends are already initialised, so the device count can no longer "
            "change; set XLA_FLAGS=--xla_force_host_platform_device_count=N before starting Python instead"
        ) from None
    jax.config.update("jax_platforms", "cpu")


def make_run_mesh(config: ConfigDict):
    """The run's mesh; without a -1, a mesh smaller than the host uses its first devices."""
    shape = {k: config.mesh[k] for k in sharding.MESH_AXES + sharding.OPTIONAL_AXES}
    devices = jax.devices()
    if -1 not in shape.values() and math.prod(shape.values()) < len(devices):
        devices = devices[: math.prod(shape.values())]
    return sharding.make_mesh(shape, devices=devices)


class Preemption:
    """SIGTERM (a preemptible VM being reclaimed) -> save and exit at the next step."""

    def __init__(self):
        self.requested = False
        self._prev = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        logging.warning("SIGTERM received: saving a checkpoint and exiting")
        self.requested = True

    def restore(self):
        signal.signal(signal.SIGTERM, self._prev)


def _global_batch(local: dict, shardings: dict, global_batch: int) -> dict:
    return {
        k: jax.make_array_from_process_local_data(shardings[k], v, (global_batch,) + v.shape[1:])
        for k, v in local.items()
    }


def evaluate(task: Task, eval_step, params, config, batch_sh, model=None) -> dict:
    t = config.train
    bs = t.eval_batch_size or t.batch_size
    sums = None
    n, p = jax.process_count(), jax.process_index()
    for i, batch in enumerate(ip.eval_batches(task.valid, bs, p, n)):
        if t.eval_batches and i >= t.eval_batches:
            break
        s = eval_step(params, _global_batch(batch, batch_sh, bs))
        sums = s if sums is None else jax.tree.map(jnp.add, sums, s)
    sums = jax.tree.map(float, sums)
    w = max(sums["weight_sum"], 1.0)
    out = {"loss": sums["nll_sum"] / w, "accuracy": sums["correct_sum"] / w}
    if task.kind == "lm":
        out["perplexity"] = math.exp(min(out["loss"], 50.0))
        out["bits_per_byte"] = ip.bits_per_byte(sums["nll_sum"], sums["weight_sum"], task.valid)
    elif model is not None:
        out.update(translate_eval(model, task, config))
    return out


def translate(model, tok, sources: list[str], src_len: int, max_new: int, beam_size: int = 1) -> list[str]:
    """Greedy (beam 1) or beam-search translations of `sources`."""
    src = np.zeros((len(sources), src_len), np.int32)
    for i, s in enumerate(sources):
        ids = (list(tok.encode(s)) + [tok.eos_id])[:src_len]
        src[i, : len(ids)] = ids
    bos = np.full((len(sources), 1), tok.bos_id, np.int32)
    if beam_size > 1:
        out = tformer.beam_search(model, bos, src=src, max_new_tokens=max_new, beam_size=beam_size)
    else:
        out = tformer.generate(model, bos, src=src, max_new_tokens=max_new)
    return [tok.decode(row) for row in np.asarray(out.tokens)]


def translate_eval(model, task: Task, config: ConfigDict) -> dict:
    import sacrebleu

    pairs = task.valid_pairs[: config.train.eval_decode_examples]
    max_new = min(config.data.tgt_len, model.cfg.max_len - 1)
    hyps = []
    for i in range(0, len(pairs), 256):
        chunk = pairs[i : i + 256]
        hyps += translate(model, task.tokenizer, [s for s, _ in chunk], config.data.src_len, max_new, config.train.beam_size)
    refs = [t for _, t in pairs]
    exact = sum(h.strip() == r.strip() for h, r in zip(hyps, refs)) / len(refs)
    bleu = sacrebleu.corpus_bleu(hyps, [refs]).score
    return {"exact_match": exact, "bleu": bleu}


def complete(model, tok, prompts: list[str], max_new: int, rng, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None) -> list[str]:
    """LM continuations of `prompts` (each starts after BOS, as documents do in training)."""
    enc = [[tok.bos_id] + list(tok.encode(p)) for p in prompts]
    width = max(map(len, enc))
    arr = np.zeros((len(enc), width), np.int32)
    for i, e in enumerate(enc):
        arr[i, : len(e)] = e
    n = min(max_new, model.cfg.max_len - width)
    out = tformer.generate(model, arr, lengths=[len(e) for e in enc], max_new_tokens=n, rng=rng,
                           temperature=temperature, top_k=top_k, top_p=top_p)
    return [p + tok.decode(row) for p, row in zip(prompts, np.asarray(out.tokens))]


def lm_samples(model, tok, config: ConfigDict, rng) -> list[str]:
    prompts = [p for p in config.train.sample_prompts.split("|") if p][: config.train.num_samples]
    if not prompts:
        return []
    return complete(model, tok, prompts, config.train.sample_tokens, rng, config.train.temperature,
                    config.train.top_k or None)


def _peak_tflops() -> float | None:
    """Dense bf16 peak of this run's devices (all of them), or None where unknown (CPU)."""
    spec = flops.device_spec(jax.devices()[0].device_kind)
    return None if spec is None else spec.peak_tflops * jax.device_count()


def run(config: ConfigDict, workdir: str | os.PathLike) -> dict:
    """Train (or resume) per `config` in `workdir`; returns the final eval metrics."""
    validate(config)
    workdir = Path(workdir)
    main = jax.process_index() == 0
    workdir.mkdir(parents=True, exist_ok=True)
    if jax.process_count() > 1 and config.data.tokenizer == "sentencepiece":
        # One process trains the tokenizer into the (shared) workdir; the others load it.
        from jax.experimental import multihost_utils

        task = build_task(config, workdir) if main else None
        multihost_utils.sync_global_devices("tformer:tokenizer")
        task = task or build_task(config, workdir)
    else:
        task = build_task(config, workdir)
    cfg, o = model_config(config, task), optim_config(config)
    t = config.train
    model_cls = MODEL_KINDS[config.model.kind]

    mesh = make_run_mesh(config)
    rules = sharding.rules_for(config.mesh.preset)
    microbatches = config.mesh.microbatches or None
    sharding.check_divisibility(cfg, mesh, rules, t.batch_size, microbatches=microbatches,
                                seq_len=config.data.seq_len if config.model.kind == "lm" else config.data.tgt_len)
    if (t.eval_batch_size or t.batch_size) != t.batch_size:
        sharding.check_divisibility(cfg, mesh, rules, t.eval_batch_size, microbatches=microbatches)
    logging.info("mesh %s (preset %r) over %d process(es), %d devices", dict(mesh.shape), config.mesh.preset,
                 jax.process_count(), mesh.size)
    graphdef, tx, state, state_sh = ts.create_train_state(model_cls, cfg, o, t.seed, mesh, rules)
    example = ip.batch_at(task.train, 0, t.batch_size)
    batch_sh = ts.batch_sharding(mesh, rules, example)
    train_fn = ts.make_train_step(graphdef, tx, o, mesh=mesh, rules=rules, state_sharding=state_sh,
                                  batch_sharding=batch_sh, microbatches=microbatches)
    eval_fn = ts.make_eval_step(graphdef, o, mesh=mesh, rules=rules, params_sharding=state_sh.params,
                                batch_sharding=batch_sh, microbatches=microbatches)

    ckpt = Checkpointer(workdir / "checkpoints", max_to_keep=t.keep_checkpoints)
    if ckpt.latest_step() is not None:
        state, extra = ckpt.restore(target=abstract_like(state, state_sh))
        logging.info("resumed from step %d (data position %s)", int(state.step), extra.get("data_step"))
    if main:
        atomic_write(workdir / "config.json", json.dumps(
            {"config": config.to_dict(), "model": dataclasses.asdict(cfg), "tokenizer": config.data.tokenizer}, indent=2))
    writer = MetricWriter(workdir, enabled=main)
    flops_per_token = flops.train_flops_per_token(cfg, example["tgt_inputs" if "src" in example else "inputs"].shape[1])
    peak = _peak_tflops()

    def model_now():
        from flax import nnx
        return nnx.merge(graphdef, state.params)

    def save(step):
        ckpt.save(step, state, {"data_step": step, "model_kind": config.model.kind})

    preempt = Preemption()
    start = int(state.step)
    all_finite = jnp.array(True)
    last_good = ckpt.latest_step()
    pending, t_last, step_last = [], time.time(), start
    result: dict = {}
    try:
        for step in range(start, t.num_steps):
            local = ip.batch_at(task.train, step, t.batch_size, t.seed,
                                process_index=jax.process_index(), process_count=jax.process_count())
            state, m = train_fn(state, _global_batch(local, batch_sh, t.batch_size))
            all_finite = jnp.logical_and(all_finite, m["finite"])  # device-side: no sync
            pending.append(m)
            done = step + 1
            stop = preempt.requested
            if done % t.log_every == 0 or done == t.num_steps or stop or done % t.checkpoint_every == 0:
                fetched = jax.device_get(pending)  # the only host sync between logs
                pending = []
                if not bool(all_finite):
                    bad = next((start + i for i, h in enumerate(fetched) if not h["finite"]), done)
                    raise FloatingPointError(
                        f"non-finite loss at step {bad + 1} (loss={fetched[-1]['loss']}): stopping. The last good "
                        f"checkpoint is step {last_good}; lower optim.learning_rate or check the data"
                    )
                dt = time.time() - t_last
                tokens = sum(h["tokens"] for h in fetched)
                tps = tokens / max(dt, 1e-9)
                last = fetched[-1]
                line = {"loss": last["loss"], "lr": last["lr"], "grad_norm": last["grad_norm"],
                        "tokens_per_s": tps, "tflops": tps * flops_per_token / 1e12}
                if peak:
                    line["mfu"] = line["tflops"] / peak
                writer.write(done, "train", line)
                if done % t.log_every == 0 or done == t.num_steps:
                    eta = (t.num_steps - done) * dt / max(done - step_last, 1)
                    logging.info("step %d/%d loss %.4f lr %.2e %.0f tok/s %.3f TFLOP/s%s ETA %.0fs", done, t.num_steps,
                                 last["loss"], last["lr"], tps, line["tflops"],
                                 f" MFU {line['mfu']:.1%}" if peak else "", eta)
                t_last, step_last = time.time(), done
            if stop:
                save(done)
                ckpt.wait()
                logging.warning("saved step %d after SIGTERM; exiting", done)
                return {"preempted_at": done}
            if done % t.checkpoint_every == 0 and done != t.num_steps:
                save(done)
                last_good = done
            if done % t.eval_every == 0 and done != t.num_steps:
                ev = evaluate(task, eval_fn, state.params, config, batch_sh, model_now() if task.kind == "seq2seq" else None)
                writer.write(done, "eval", ev)
                logging.info("eval @%d: %s", done, _fmt(ev))
        result = evaluate(task, eval_fn, state.params, config, batch_sh, model_now())
        writer.write(int(state.step), "eval", result)
        logging.info("final eval @%d: %s", int(state.step), _fmt(result))
        save(int(state.step))
        ckpt.wait()
        # Every process takes part in generating (the parameters may span hosts); process 0 prints.
        show_samples(model_now(), task, config, echo=main)
        if main:
            plot_loss(workdir)
            atomic_write(workdir / "final_metrics.json", json.dumps({"step": int(state.step), **result}, indent=2))
        return result
    finally:
        preempt.restore()
        writer.close()
        ckpt.close()


def _fmt(d: dict) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in d.items())


def show_samples(model, task: Task, config: ConfigDict, echo: bool = True) -> None:
    if task.kind == "lm":
        for s in lm_samples(model, task.tokenizer, config, jax.random.key(config.train.seed)):
            if echo:
                print(f"--- sample ---\n{s}\n")
    else:
        n = config.train.num_samples
        srcs = [s for s, _ in task.valid_pairs[:n]]
        if not srcs:
            return
        hyps = translate(model, task.tokenizer, srcs, config.data.src_len,
                         min(config.data.tgt_len, model.cfg.max_len - 1), config.train.beam_size)
        for (s, ref), h in zip(task.valid_pairs[:n], hyps):
            if echo:
                print(f"{s}  ->  {h}   (reference: {ref})")


class _QuietLibraries(logging_std.Filter):
    """Keep the console for the run's own lines: drop checkpoint libraries' INFO chatter."""

    def filter(self, record):
        return record.levelno >= logging_std.WARNING or "orbax" not in record.pathname


def main(argv):
    del argv
    logging.get_absl_handler().addFilter(_QuietLibraries())
    if FLAGS.config is None:
        raise app.UsageError("--config is required")
    if FLAGS.plan_devices is not None:
        if not FLAGS.plan:
            raise app.UsageError("--plan_devices only applies to --plan (fake CPU devices cannot train a real run)")
        if FLAGS.distributed or FLAGS.coordinator_address:
            raise app.UsageError("--plan_devices plans on one host's fake devices; drop the multi-host flags")
    if FLAGS.tune_allocator:
        host.tune_allocator()  # before JAX starts its threads (see tformer/host.py)
    try:
        if FLAGS.plan_devices is not None:
            use_fake_cpu_devices(FLAGS.plan_devices)
        if sharding.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                                           auto=FLAGS.distributed) and jax.process_index() != 0:
            logging.set_verbosity(logging.WARNING)  # process 0 reports progress
        if FLAGS.plan:
            p = plan(FLAGS.config)
            print(f"plan: {FLAGS.config.model.kind} model, preset {FLAGS.config.mesh.preset!r}, "
                  f"{jax.device_count()} {jax.devices()[0].platform} devices\n{p.table()}")
            return
        if FLAGS.workdir is None:
            raise app.UsageError("--workdir is required (except with --plan)")
        run(FLAGS.config, FLAGS.workdir)
    except (ValueError, FloatingPointError) as e:
        logging.error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    define_flags()
    app.run(main)
