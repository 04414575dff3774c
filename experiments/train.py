r"""Train a tformer model from a config file.

    python experiments/train.py --config=experiments/configs/lm_tiny.py --workdir=runs/lm_tiny \
        --config.train.num_steps=500 --config.model.num_layers=2

A run resumes from the newest readable checkpoint in its workdir (params,
optimizer state, step, RNG and data position) if the model is the same,
holds a lock on the workdir while it runs, saves on SIGTERM or Ctrl-C before
exiting, and stops with a clear message on a non-finite loss. An error it
raises on purpose prints one `error: ...` line and exits 1 (`--verbose` adds
the traceback).

`main` only reads flags; `train_and_evaluate` is the run: `setup_run` builds
data, model, steps and state, `train_steps` is the loop (its helpers `report`,
`save_checkpoint` and `evaluate` do the logging, checkpointing and eval), and
`finish` saves, evaluates and samples. Text generation lives in decode.py.

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
checkpoints are written by all processes together. A process that stops
sending heartbeats for `--heartbeat_timeout` seconds (killed, host lost) stops
every other process with an error naming it; rerun them all to resume.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import fcntl
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # `python experiments/train.py`: make the repo importable
    # Replace (not prepend to) the script's folder: experiments/tokenizers.py must not shadow the library.
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import jax
from absl import app, flags, logging
from ml_collections import ConfigDict, config_flags

import tformer
from experiments import corpora, decode, finetune, profiling
from experiments import input_pipeline as ip
from experiments.metrics import MetricWriter, QuietLibraries, atomic_write, plot_loss
from experiments.tokenizers import make_tokenizer
from tformer import flops, host, lora, rnn, sharding
from tformer import training as ts
from tformer.checkpoint import Checkpointer, CheckpointError, abstract_like

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
    flags.DEFINE_integer("heartbeat_timeout", 30,
                         "Multi-process: seconds without a heartbeat after which a process counts as lost and "
                         "every other process stops with an error naming it.")
    flags.DEFINE_bool("plan", False,
                      "Dry run: compile the train step for the config's mesh from abstract shapes, print "
                      "per-device memory, FLOPs and collectives, and exit (no data, no training).")
    flags.DEFINE_integer("plan_devices", None,
                         "With --plan: plan on this many fake CPU devices (e.g. 256 for a pod slice).")
    flags.DEFINE_bool("tune_allocator", True,
                      "Keep freed host memory in the process (tformer.host.tune_allocator): a CPU train step "
                      "then page-faults nothing instead of its whole working set. Resident memory stays at its peak.")
    flags.DEFINE_bool("verbose", False, "On an error, print the traceback too (not just the one-line message).")


MODEL_KINDS = {"lm": tformer.DecoderLM, "seq2seq": tformer.EncoderDecoder,
               "rnn_lm": rnn.RNNLM, "rnn_seq2seq": rnn.RNNSeq2Seq}  # the RNNs: the recurrent baseline
TASK_KINDS = {kind: cls.kind for kind, cls in MODEL_KINDS.items()}  # model kind -> data: "lm" | "seq2seq"


def config_class(kind: str):
    """The config dataclass of a model kind: tformer.ModelConfig, or the RNNs' tformer.rnn.RNNConfig."""
    return getattr(MODEL_KINDS[kind], "config_class", tformer.ModelConfig)


# ---------------------------------------------------------------------------
# Config: sections -> dataclasses, range checks.

# Runner fields that must be >= the bound (an int or float); `eval_batch_size` 0 means `batch_size`.
_AT_LEAST = {
    "train": dict(batch_size=1, num_steps=1, seed=0, log_every=1, eval_every=1, eval_batches=1, eval_batch_size=0,
                  checkpoint_every=1, keep_checkpoints=1, num_samples=0, sample_tokens=1, temperature=0.0,
                  top_k=0, beam_size=1, eval_decode_examples=1),
    "data": dict(vocab_size=2, seq_len=1, src_len=1, tgt_len=1, max_bytes=0, num_train=1, num_valid=1),
}
_CHOICES = {("data", "tokenizer"): ("byte", "sentencepiece", "hf")}


def to_dataclass(cls, section: dict, name: str):
    """Build a config dataclass; unknown fields fail naming the field and the valid ones."""
    _check_fields(section, name, {f.name for f in dataclasses.fields(cls)})
    try:
        return cls(**section)
    except (TypeError, ValueError) as e:
        raise ValueError(f"config.{name}: {e}") from None


def _check_fields(section, name: str, valid: set[str]) -> None:
    unknown = sorted(set(section.keys()) - valid)
    if unknown:
        raise ValueError(f"config.{name}: unknown field(s) {unknown}; valid fields are {sorted(valid)}")


def validate(config: ConfigDict) -> None:
    """Every section present with known fields, and every runner field in range: before anything runs."""
    from experiments.configs.base import TOKENIZER_FIELDS, base_config

    ref = base_config()
    for name in ("model", "optim", "data", "train", "mesh"):
        if name not in config:
            raise ValueError(f"config.{name}: section missing; start from experiments/configs/base.py")
    kind = config.model.get("kind")
    if kind not in MODEL_KINDS:
        raise ValueError(f"config.model.kind: unknown {kind!r}; choose one of {sorted(MODEL_KINDS)}")
    for name in ("model", "optim", "data", "train", "mesh"):
        valid = set(ref[name].keys())
        if name == "model" and config_class(kind) is not tformer.ModelConfig:  # an RNN: its own dataclass
            valid = {f.name for f in dataclasses.fields(config_class(kind))} - set(TOKENIZER_FIELDS) | {"kind"}
        _check_fields(config[name], name, valid)
    for section, bounds in _AT_LEAST.items():
        for field, low in bounds.items():
            value = config[section][field]
            if not value >= low:  # `not >=` also rejects NaN
                raise ValueError(f"config.{section}.{field} must be >= {low}, got {value}")
    for (section, field), choices in _CHOICES.items():
        if config[section][field] not in choices:
            raise ValueError(f"config.{section}.{field}: unknown {config[section][field]!r}; choose one of {choices}")
    if not 0.0 <= config.data.validation_fraction < 1.0:
        raise ValueError(f"config.data.validation_fraction must be in [0, 1), got {config.data.validation_fraction}")
    _validate_mesh(config.mesh)
    finetune.validate(config)
    profiling.parse_steps(config.train.profile_steps, config.train.num_steps)


def _validate_mesh(mesh: ConfigDict) -> None:
    axes = sharding.MESH_AXES + sharding.OPTIONAL_AXES
    for axis in axes:
        if mesh[axis] != -1 and mesh[axis] < 1:
            raise ValueError(f"config.mesh.{axis} must be >= 1, or -1 for the remaining devices; got {mesh[axis]}")
    if sum(mesh[a] == -1 for a in axes) > 1:
        shape = {a: mesh[a] for a in axes}
        raise ValueError(f"config.mesh: at most one axis may be -1, got {shape}")
    if mesh.microbatches < 0:
        raise ValueError(f"config.mesh.microbatches must be >= 1, or 0 for 2 x stage; got {mesh.microbatches}")
    if mesh.preset not in sharding.PRESETS:
        raise ValueError(f"config.mesh.preset: unknown {mesh.preset!r}; choose one of {sorted(sharding.PRESETS)}")


def _model_fields(config: ConfigDict) -> dict:
    return {k: v for k, v in config.model.to_dict().items() if k != "kind"}


def model_config(config: ConfigDict, tok) -> tformer.ModelConfig:
    """The ModelConfig of a run: vocab_size 0 follows the tokenizer, whose special ids are used."""
    m = _model_fields(config)
    if not m["vocab_size"]:
        m["vocab_size"] = tok.vocab_size
    elif m["vocab_size"] < tok.vocab_size:
        raise ValueError(f"config.model.vocab_size={m['vocab_size']} is smaller than the tokenizer's "
                         f"{tok.vocab_size}; set it to 0 to follow the tokenizer")
    m.update(pad_id=tok.pad_id, bos_id=tok.bos_id, eos_id=tok.eos_id)
    return to_dataclass(config_class(config.model.kind), m, "model")


def plan_model_config(config: ConfigDict) -> tformer.ModelConfig:
    """The model config without building the data: vocab from the config or the tokenizer's known size."""
    from experiments.tokenizers import ByteTokenizer

    if config.data.tokenizer == "byte" or config.model.vocab_size:
        return model_config(config, ByteTokenizer())
    # A sentencepiece model has exactly the vocab_size it is trained with; ids as the byte tokenizer's.
    with config.unlocked():
        sized = ConfigDict(config.to_dict())
    sized.model.vocab_size = config.data.vocab_size
    return model_config(sized, ByteTokenizer())


def optim_config(config: ConfigDict) -> ts.OptimizerConfig:
    o = config.optim.to_dict()
    if not o["total_steps"]:
        o["total_steps"] = config.train.num_steps
    return to_dataclass(ts.OptimizerConfig, o, "optim")


# ---------------------------------------------------------------------------
# Data.


@dataclasses.dataclass
class Task:
    """Everything data-side a run needs: tokenizer, splits, and how to score them."""

    kind: str
    tokenizer: object
    train: ip.Split
    valid: ip.Split
    valid_pairs: list | None = None  # seq2seq: raw (src, tgt) for exact match / BLEU


def build_task(config: ConfigDict, workdir: Path) -> Task:
    if TASK_KINDS[config.model.kind] == "lm":
        return _lm_task(config.data, workdir)
    return _seq2seq_task(config.data, workdir)


def _lm_task(d: ConfigDict, workdir: Path) -> Task:
    if d.corpus == "stdlib":
        corpus = corpora.stdlib_corpus(d.max_bytes or None)
    else:
        corpus = corpora.read_text_corpus(d.corpus, validation_fraction=d.validation_fraction)
    if not corpus["train"] or not corpus["validation"]:
        raise corpora.DataError(f"{d.corpus}: too little text for both a train and a validation split")
    tok = make_tokenizer(d.tokenizer, workdir, corpus["train"], d.vocab_size)
    sets = ip.make_lm_datasets(tok, corpus, d.seq_len)
    return Task("lm", tok, sets["train"], sets["validation"])


def _seq2seq_task(d: ConfigDict, workdir: Path) -> Task:
    if d.corpus.startswith("numbers:"):
        pairs = corpora.numbers_task(d.corpus.split(":", 1)[1], d.num_train, d.num_valid, seed=0)
    else:
        all_pairs = corpora.read_parallel_corpus(*d.corpus.split(",")[:2])
        if len(all_pairs) < 2:
            raise corpora.DataError(f"{d.corpus}: {len(all_pairs)} sentence pair(s); a run needs at least 2 "
                                    "(one to train on, one to validate on)")
        n_valid = max(1, min(d.num_valid, len(all_pairs) // 10))
        pairs = {"train": all_pairs[:-n_valid], "validation": all_pairs[-n_valid:]}
    texts = [s for s, _ in pairs["train"]] + [t for _, t in pairs["train"]]
    tok = make_tokenizer(d.tokenizer, workdir, texts, d.vocab_size)
    sets = ip.make_seq2seq_datasets(tok, tok, pairs, d.src_len, d.tgt_len)
    if sets["validation"].num_truncated:
        logging.warning("%d validation pairs exceed src_len/tgt_len and were truncated",
                        sets["validation"].num_truncated)
    return Task("seq2seq", tok, sets["train"], sets["validation"], pairs["validation"])


def load_task(config: ConfigDict, workdir: Path) -> Task:
    """build_task; in a multi-process run one process trains a sentencepiece tokenizer, the others load it."""
    if jax.process_count() == 1 or config.data.tokenizer != "sentencepiece":
        return build_task(config, workdir)
    from jax.experimental import multihost_utils

    task = build_task(config, workdir) if jax.process_index() == 0 else None
    multihost_utils.sync_global_devices("tformer:tokenizer")
    return task or build_task(config, workdir)


def _global_batch(local: dict, shardings: dict, global_batch: int) -> dict:
    return {
        k: jax.make_array_from_process_local_data(shardings[k], v, (global_batch,) + v.shape[1:])
        for k, v in local.items()
    }


class Prefetcher:
    """Iterates `make(step)` over `steps`, building the next `depth` batches on a background thread.

    The batch for step s+1 is gathered and placed on the devices while step s
    runs, so the accelerator never waits for the host's numpy work.
    """

    def __init__(self, make, steps: range, depth: int = 2):
        self._make, self._steps = make, iter(steps)
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="prefetch")
        self._queue = collections.deque()
        for _ in range(depth):
            self._submit_next()

    def _submit_next(self) -> None:
        step = next(self._steps, None)
        if step is not None:
            self._queue.append(self._pool.submit(self._make, step))

    def __iter__(self):
        while self._queue:
            batch = self._queue.popleft().result()
            self._submit_next()
            yield batch

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


# ---------------------------------------------------------------------------
# The workdir: one run at a time, resumed only under the same model.


class WorkdirLock:
    """An exclusive lock on `<workdir>/.lock` that records the holder's PID.

    It is an flock, so the kernel drops it when its process dies in any way
    (SIGKILL included): a stale lock file never blocks the next run.
    """

    def __init__(self, workdir: Path):
        self.path = Path(workdir) / ".lock"
        self._fd: int | None = None

    def __enter__(self):
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ValueError(f"--workdir={self.path.parent} is in use by process {holder} (it holds {self.path}); "
                             "wait for that run to end or stop it, or choose another --workdir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc):
        os.close(self._fd)  # closing the descriptor releases the flock
        self._fd = None


def prepare_workdir(workdir) -> Path:
    """Create `workdir` and make sure this process can write there; fail in one line if not."""
    w = Path(workdir)
    try:
        w.mkdir(parents=True, exist_ok=True)
        probe = w / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"--workdir={w}: cannot create or write there ({e.strerror or e})") from None
    return w


_SCHEDULE_FIELDS = ("learning_rate", "warmup_steps", "total_steps", "schedule", "min_lr_ratio")


def _diff(old: dict, new: dict) -> list[str]:
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def check_resume(workdir: Path, kind: str, cfg: tformer.ModelConfig, o: ts.OptimizerConfig) -> None:
    """A workdir with checkpoints resumes only under the model it was trained with.

    Any model difference fails listing the fields (old -> new); optimizer
    differences are allowed, with a warning when the learning-rate schedule
    differs from the one the run started with.
    """
    saved_path = workdir / "config.json"
    if not saved_path.exists():
        return
    saved = json.loads(saved_path.read_text())
    old_model = {"kind": saved["config"]["model"]["kind"], **saved["model"]}
    changed = _diff(old_model, {"kind": kind, **dataclasses.asdict(cfg)})
    if changed:
        raise ValueError(f"--workdir={workdir} holds checkpoints of a different model; changed: {'; '.join(changed)}. "
                         "Resume with the old settings, or start fresh with a new --workdir "
                         f"(or delete {workdir / 'checkpoints'})")
    old_optim = saved.get("optim")
    if old_optim is None:
        return
    new_optim = dataclasses.asdict(o)
    if (old_optim.get("clip_norm") is None) != (o.clip_norm is None):  # the optimizer state's structure changes
        raise ValueError(f"--workdir={workdir}: optim.clip_norm {old_optim.get('clip_norm')!r} -> {o.clip_norm!r} "
                         "changes the optimizer state's structure, so its checkpoints cannot resume; keep "
                         "clip_norm on (or off) as it was, or start fresh with a new --workdir")
    sched = _diff({k: old_optim.get(k) for k in _SCHEDULE_FIELDS}, {k: new_optim[k] for k in _SCHEDULE_FIELDS})
    if sched:
        logging.warning("resuming with a different learning-rate schedule than the run started with: %s",
                        "; ".join(sched))
    other = _diff({k: v for k, v in old_optim.items() if k not in _SCHEDULE_FIELDS},
                  {k: v for k, v in new_optim.items() if k not in _SCHEDULE_FIELDS})
    if other:
        logging.warning("resuming with changed optimizer settings: %s", "; ".join(other))


# ---------------------------------------------------------------------------
# Signals.


class Preemption:
    """SIGTERM (a preemptible VM being reclaimed) or Ctrl-C (SIGINT) -> save and exit at the next step.

    A second Ctrl-C aborts at once (KeyboardInterrupt), without saving.
    """

    def __init__(self):
        self.requested: str | None = None
        self._prev = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        logging.warning("%s received: saving a checkpoint and exiting%s", name,
                        " (Ctrl-C again to abort without saving)" if signum == signal.SIGINT else "")
        self.requested = name
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def restore(self) -> None:
        for s, prev in self._prev.items():
            signal.signal(s, prev)


# ---------------------------------------------------------------------------
# One run: its parts, and small helpers for logging, checkpointing and eval.


@dataclasses.dataclass
class Run:
    """Everything the training loop touches (`state` changes every step)."""

    config: ConfigDict
    workdir: Path
    task: Task
    cfg: tformer.ModelConfig
    graphdef: object
    state: ts.TrainState
    train_fn: object
    eval_fn: object
    batch_sh: dict
    ckpt: Checkpointer
    writer: MetricWriter
    last_saved: int | None  # newest checkpoint step known good (None: nothing saved yet)
    flops_per_token: float
    peak_tflops: float | None

    def model(self):
        from flax import nnx

        return nnx.merge(self.graphdef, lora.merged(self.state.params))

    def train_batch(self, step: int) -> dict:
        t = self.config.train
        local = ip.batch_at(self.task.train, step, t.batch_size, t.seed,
                            process_index=jax.process_index(), process_count=jax.process_count())
        return _global_batch(local, self.batch_sh, t.batch_size)


def _peak_tflops() -> float | None:
    """Dense bf16 peak of this run's devices (all of them), or None where unknown (CPU)."""
    spec = flops.device_spec(jax.devices()[0].device_kind)
    return None if spec is None else spec.peak_tflops * jax.device_count()


def make_run_mesh(config: ConfigDict):
    """The run's mesh; without a -1, a mesh smaller than the host uses its first devices."""
    shape = {k: config.mesh[k] for k in sharding.MESH_AXES + sharding.OPTIONAL_AXES}
    devices = jax.devices()
    if -1 not in shape.values() and math.prod(shape.values()) < len(devices):
        devices = devices[: math.prod(shape.values())]
    return sharding.make_mesh(shape, devices=devices)


def check_sample_prompts(config: ConfigDict, task: Task, cfg: tformer.ModelConfig) -> None:
    """The end-of-run samples must fit the model: checked before training, not after it."""
    if task.kind != "lm":
        return
    try:
        decode.encode_prompts(task.tokenizer, decode.sample_prompts(config.train.sample_prompts,
                                                                    config.train.num_samples), cfg.max_len)
    except ValueError as e:
        raise ValueError(f"config.train.sample_prompts: {e}") from None


def setup_run(config: ConfigDict, workdir: Path) -> Run:
    """Data, model, optimizer, mesh, jitted steps, and the state: restored from the newest readable checkpoint."""
    source = finetune.prepare(config, workdir)  # init_from: the source's tokenizer into the workdir
    task = load_task(config, workdir)
    cfg = source.cfg if source else model_config(config, task.tokenizer)
    o, t = optim_config(config), config.train
    check_sample_prompts(config, task, cfg)
    mesh, rules = make_run_mesh(config), sharding.rules_for(config.mesh.preset)
    microbatches = config.mesh.microbatches or None
    seq_len = config.data.seq_len if task.kind == "lm" else config.data.tgt_len
    if isinstance(cfg, tformer.ModelConfig):  # the RNNs shard nothing but the batch and `embed`
        for batch_size in {t.batch_size, t.eval_batch_size or t.batch_size}:
            sharding.check_divisibility(cfg, mesh, rules, batch_size, seq_len=seq_len, microbatches=microbatches)
    logging.info("mesh %s (preset %r) over %d process(es), %d devices", dict(mesh.shape), config.mesh.preset,
                 jax.process_count(), mesh.size)
    ckpt = Checkpointer(workdir / "checkpoints", max_to_keep=t.keep_checkpoints)
    params = finetune.initial_params(source, cfg) if source and ckpt.latest_step() is None else None
    graphdef, tx, state, state_sh = ts.create_train_state(MODEL_KINDS[config.model.kind], cfg, o, t.seed, mesh, rules,
                                                          params=params, lora=finetune.lora_config(t))
    example = ip.batch_at(task.train, 0, t.batch_size)
    batch_sh = ts.batch_sharding(mesh, rules, example)
    kw = dict(mesh=mesh, rules=rules, batch_sharding=batch_sh, microbatches=microbatches)
    train_fn = ts.make_train_step(graphdef, tx, o, state_sharding=state_sh, **kw)
    eval_fn = ts.make_eval_step(graphdef, o, params_sharding=state_sh.params, **kw)
    if ckpt.latest_step() is not None:
        try:
            check_resume(workdir, config.model.kind, cfg, o)
            finetune.check_resume(workdir, config)
            state, extra = ckpt.restore(target=abstract_like(state, state_sh), move_aside=True)
        except BaseException:
            ckpt.close()
            raise
        logging.info("resumed from step %d (data position %s)", int(state.step), extra.get("data_step"))
    if jax.process_index() == 0:
        atomic_write(workdir / "config.json", json.dumps({
            "config": config.to_dict(), "model": dataclasses.asdict(cfg), "optim": dataclasses.asdict(o),
            "tokenizer": config.data.tokenizer}, indent=2))
    seq = example["tgt_inputs" if "src" in example else "inputs"].shape[1]
    if isinstance(cfg, rnn.RNNConfig):
        flops_per_token = rnn.train_flops_per_token(cfg, seq2seq=task.kind == "seq2seq")
    else:
        flops_per_token = flops.train_flops_per_token(cfg, seq)
    return Run(config, workdir, task, cfg, graphdef, state, train_fn, eval_fn, batch_sh, ckpt,
               MetricWriter(workdir, enabled=jax.process_index() == 0),
               last_saved=ckpt.latest_step(), flops_per_token=flops_per_token,
               peak_tflops=_peak_tflops())


def save_checkpoint(run: Run, step: int) -> None:
    run.ckpt.save(step, run.state, {"data_step": step, "model_kind": run.config.model.kind})
    run.last_saved = step


def evaluate(run: Run) -> dict:
    """Mean loss / accuracy over `train.eval_batches` validation batches, plus perplexity and bits per byte
    (LM) or exact match and BLEU (seq2seq)."""
    t, task = run.config.train, run.task
    bs = t.eval_batch_size or t.batch_size
    sums = None
    batches = ip.eval_batches(task.valid, bs, jax.process_index(), jax.process_count())
    for _, batch in zip(range(t.eval_batches), batches):
        s = run.eval_fn(run.state.params, _global_batch(batch, run.batch_sh, bs))
        sums = s if sums is None else jax.tree.map(lambda a, b: a + b, sums, s)
    sums = jax.tree.map(float, sums)
    w = max(sums["weight_sum"], 1.0)
    out = {"loss": sums["nll_sum"] / w, "accuracy": sums["correct_sum"] / w}
    if task.kind == "lm":
        out["perplexity"] = math.exp(min(out["loss"], 50.0))
        out["bits_per_byte"] = ip.bits_per_byte(sums["nll_sum"], sums["weight_sum"], task.valid)
    else:
        d = run.config.data
        out.update(decode.translation_scores(run.model(), task.tokenizer, task.valid_pairs[: t.eval_decode_examples],
                                             d.src_len, d.tgt_len, t.beam_size))
    return out


def _fmt(d: dict) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in d.items())


@dataclasses.dataclass
class Window:
    """The steps since the last host sync: their metrics stay on the device until `report`."""

    start: int  # steps done before the window
    time: float
    metrics: list = dataclasses.field(default_factory=list)


def report(run: Run, window: Window, done: int) -> Window:
    """The one host sync between logs: check every step of the window is finite, write a train line."""
    fetched = jax.device_get(window.metrics)
    bad = next((i for i, m in enumerate(fetched) if not m["finite"]), None)
    if bad is not None:
        saved = "no checkpoint has been saved yet" if run.last_saved is None else \
            f"the last good checkpoint is step {run.last_saved}"
        first = fetched[bad]
        raise FloatingPointError(f"non-finite loss or gradient at step {window.start + bad + 1} "
                                 f"(loss={first['loss']:.4g}, grad_norm={first['grad_norm']:.4g}): stopping; {saved}. "
                                 "Lower optim.learning_rate or check the data")
    dt = max(time.time() - window.time, 1e-9)
    tps = sum(m["tokens"] for m in fetched) / dt
    last = fetched[-1]
    line = {"loss": last["loss"], "lr": last["lr"], "grad_norm": last["grad_norm"], "tokens_per_s": tps,
            "tflops": tps * run.flops_per_token / 1e12}
    if run.peak_tflops:
        line["mfu"] = line["tflops"] / run.peak_tflops
    run.writer.write(done, "train", line)
    t = run.config.train
    if done % t.log_every == 0 or done == t.num_steps:
        eta = (t.num_steps - done) * dt / max(done - window.start, 1)
        logging.info("step %d/%d loss %.4f lr %.2e %.0f tok/s %.3f TFLOP/s%s ETA %.0fs", done, t.num_steps,
                     last["loss"], last["lr"], tps, line["tflops"],
                     f" MFU {line['mfu']:.1%}" if run.peak_tflops else "", eta)
    return Window(done, time.time())


def train_steps(run: Run, preempt: Preemption) -> bool:
    """Train from the state's step to `train.num_steps`; False when a signal stopped it (state saved)."""
    t = run.config.train
    start = int(run.state.step)
    window = Window(start, time.time())
    batches = Prefetcher(run.train_batch, range(start, t.num_steps))
    prof = profiling.StepProfiler.for_run(t.profile_steps, t.num_steps, run.workdir)
    try:
        for done, batch in enumerate(batches, start + 1):
            with (prof and prof.annotate(done)) or contextlib.nullcontext():
                run.state, metrics = run.train_fn(run.state, batch)
            if prof:
                prof.after(done, metrics)
            window.metrics.append(metrics)
            stop = preempt.requested
            if stop or done % t.log_every == 0 or done % t.checkpoint_every == 0 or done == t.num_steps:
                window = report(run, window, done)
            if stop:
                save_checkpoint(run, done)
                run.ckpt.wait()
                logging.warning("saved step %d after %s; exiting", done, stop)
                return False
            if done % t.checkpoint_every == 0 and done != t.num_steps:
                save_checkpoint(run, done)
            if done % t.eval_every == 0 and done != t.num_steps:
                ev = evaluate(run)
                run.writer.write(done, "eval", ev)
                logging.info("eval @%d: %s", done, _fmt(ev))
                window = Window(done, time.time())  # train tokens/s counts train steps only
    finally:
        batches.close()
        if prof:
            prof.close()
    return True


def finish(run: Run) -> dict:
    """Save the final state first (nothing after it can lose the run), then evaluate, sample and summarise."""
    step = int(run.state.step)
    save_checkpoint(run, step)
    run.ckpt.wait()
    result = evaluate(run)
    run.writer.write(step, "eval", result)
    logging.info("final eval @%d: %s", step, _fmt(result))
    # Every process takes part in generating (the parameters may span hosts); process 0 prints.
    t, main = run.config.train, jax.process_index() == 0
    lines = decode.sample_lines(run.model(), run.task.tokenizer, t, run.config.data, run.task.kind,
                                run.task.valid_pairs, jax.random.key(t.seed))
    if main:
        print("\n".join(lines))
        plot_loss(run.workdir)
        atomic_write(run.workdir / "final_metrics.json", json.dumps({"step": step, **result}, indent=2))
    return result


def train_and_evaluate(config: ConfigDict, workdir: str | os.PathLike) -> dict:
    """Train (or resume) per `config` in `workdir`; returns the final eval metrics ({"preempted_at": step}
    when a signal stopped the run)."""
    validate(config)
    workdir = prepare_workdir(workdir)
    # Process 0 holds the lock for the whole run; the others share its workdir.
    lock = WorkdirLock(workdir) if jax.process_index() == 0 else contextlib.nullcontext()
    with lock:
        run = setup_run(config, workdir)
        preempt = Preemption()
        try:
            if not train_steps(run, preempt):
                return {"preempted_at": int(run.state.step)}
            return finish(run)
        finally:
            preempt.restore()
            run.writer.close()
            run.ckpt.close()


# ---------------------------------------------------------------------------
# Planning (no data, no training).


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


def print_plan(config: ConfigDict):
    """Compile (never run) the run's train step on its mesh, print its table; returns the `tformer.plan.Plan`."""
    from tformer import plan as plan_lib

    validate(config)
    kind, d = config.model.kind, config.data
    if config_class(kind) is not tformer.ModelConfig:
        raise ValueError(f"config.model.kind: --plan plans the Transformer kinds (lm, seq2seq), not {kind!r}")
    cfg, o = plan_model_config(config), optim_config(config)
    mesh, rules = make_run_mesh(config), sharding.rules_for(config.mesh.preset)
    seq, src = (d.seq_len, None) if kind == "lm" else (d.tgt_len, d.src_len)
    lcfg = finetune.lora_config(config.train)
    p = plan_lib.plan_train_step(MODEL_KINDS[kind], cfg, o, mesh, rules, batch=config.train.batch_size,
                                 seq_len=seq, src_len=src, microbatches=config.mesh.microbatches or None, lora=lcfg)
    print(f"plan: {kind} model, preset {config.mesh.preset!r}, "
          f"{jax.device_count()} {jax.devices()[0].platform} devices\n{p.table()}")
    if lcfg is not None:
        print(finetune.lora_savings(MODEL_KINDS[kind], cfg, o, mesh, rules, lcfg, p))
    return p


# ---------------------------------------------------------------------------
# Entry point: flags only.


def _check_flags() -> None:
    if FLAGS.config is None:
        raise app.UsageError("--config is required")
    if FLAGS.plan_devices is not None:
        if not FLAGS.plan:
            raise app.UsageError("--plan_devices only applies to --plan (fake CPU devices cannot train a real run)")
        if FLAGS.distributed or FLAGS.coordinator_address:
            raise app.UsageError("--plan_devices plans on one host's fake devices; drop the multi-host flags")
    if not FLAGS.plan and FLAGS.workdir is None:
        raise app.UsageError("--workdir is required (except with --plan)")


def _start_processes() -> None:
    """Join a multi-process run (if asked); a peer silent for --heartbeat_timeout seconds stops every process."""
    timeouts = dict(heartbeat_timeout_seconds=FLAGS.heartbeat_timeout, shutdown_timeout_seconds=FLAGS.heartbeat_timeout)
    if not sharding.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                                           auto=FLAGS.distributed, **timeouts):
        return
    _say_so_if_the_transport_aborts(_lost_peer_message("the collective transport aborted, below"))
    if jax.process_index() != 0:
        logging.set_verbosity(logging.WARNING)  # process 0 reports progress


_TERMINATE_HANDLERS = []  # ctypes callbacks must outlive their registration


def _say_so_if_the_transport_aborts(message: str) -> None:
    """Print `error: <message>` before a C++ abort on a collectives thread.

    gloo (JAX's CPU collectives) sometimes meets a dead peer on its own thread, throws there, and so ends in
    std::terminate: no Python frame can catch that. This hooks libstdc++'s terminate handler to print the
    runner's one line first, then hands over to the previous handler (gloo's message, then abort). Where
    libstdc++ is not the runtime (macOS) nothing is hooked.
    """
    import ctypes

    try:
        set_terminate = ctypes.CDLL("libstdc++.so.6")._ZSt13set_terminatePFvvE
    except (OSError, AttributeError):
        return
    set_terminate.restype, set_terminate.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
    handler_type = ctypes.CFUNCTYPE(None)
    previous = None

    def on_terminate():
        sys.stderr.write(f"error: {message}\n")
        sys.stderr.flush()
        if previous:
            handler_type(previous)()
        os.abort()

    _TERMINATE_HANDLERS.append(handler_type(on_terminate))
    previous = set_terminate(ctypes.cast(_TERMINATE_HANDLERS[-1], ctypes.c_void_p))


def main(argv):
    del argv
    logging.get_absl_handler().addFilter(QuietLibraries())
    _check_flags()
    if FLAGS.tune_allocator:
        host.tune_allocator()  # before JAX starts its threads (see tformer/host.py)
    try:
        if FLAGS.plan_devices is not None:
            use_fake_cpu_devices(FLAGS.plan_devices)
        _start_processes()
        if FLAGS.plan:
            print_plan(FLAGS.config)
        else:
            train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except (ValueError, FloatingPointError, CheckpointError, OSError) as e:
        if FLAGS.verbose:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except jax.errors.JaxRuntimeError as e:
        if FLAGS.verbose or jax.process_count() == 1:
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: {_lost_peer_message(f'a collective with it failed: {first[:300]}')}", file=sys.stderr)
        sys.exit(1)


def _lost_peer_message(cause: str) -> str:
    """A failed collective in a multi-process run: almost always a peer that died; name who it can be."""
    others = [i for i in range(jax.process_count()) if i != jax.process_index()]
    who = f"process {others[0]}" if len(others) == 1 else f"one of processes {others}"
    return (f"lost contact with {who} ({cause}); once every process is back, "
            f"rerun the same command on each to resume from the last checkpoint")


def _unknown_override(argv: list[str]) -> str | None:
    """The first `--config.<section>.<field>` of `argv` that the config does not have, as an error line."""
    from experiments.configs.base import base_config

    ref = base_config()
    for arg in argv[1:]:
        if not arg.startswith("--config."):
            continue
        path = arg[len("--config."):].split("=", 1)[0].split(".")
        if path[0] not in ref:
            return f"--config.{path[0]}: unknown section; valid sections are {sorted(ref.keys())}"
        if len(path) > 1 and path[1] not in ref[path[0]]:
            return (f"--config.{'.'.join(path)}: unknown field {path[1]!r} of config.{path[0]}; valid fields are "
                    f"{sorted(ref[path[0]].keys())}")
    return None


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with an override of a field the config lacks as one `error:` line."""
    try:
        return FLAGS(argv)
    except (AttributeError, KeyError):  # what ml_collections raises for such an override
        line = _unknown_override(argv)
        if line is None or "--verbose" in argv:
            raise
        print(f"error: {line}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=parse_flags)
