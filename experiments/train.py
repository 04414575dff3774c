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
`finish` saves, evaluates and samples. The rest lives by concern: the config
(run_config.py), the data (tasks.py, input_pipeline.py), the workdir
(workdir.py), signals and processes (processes.py), `--plan` (planning.py),
text generation (decode.py), and what each model family is
(tformer/families.py).

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

import contextlib
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # `python experiments/train.py`: make the repo importable
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # replaced: experiments/tokenizers.py shadows the library

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import ConfigDict, config_flags

from experiments import budget as budget_lib
from experiments import decode, finetune, input_pipeline, planning, processes, profiling, run_config
from experiments.metrics import MetricWriter, QuietLibraries, atomic_write, plot_loss
from experiments.tasks import Task, check_sample_prompts, load_task
from experiments.tasks import evaluate as evaluate_task
from experiments.workdir import WorkdirLock, prepare_workdir, restore_latest
from tformer import families, flops, host, lora, sharding, training
from tformer.checkpoint import Checkpointer, CheckpointError

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
    flags.DEFINE_enum("plan_platform", None, ["tpu", "gpu", "cpu"],
                      "With --plan: lower (not compile) the train step, a prefill and a decode step for this "
                      "platform, here, and print per attention call the kernel chosen and its largest temporary.")
    flags.DEFINE_bool("cpu_xla_flags", True, "Set tformer.host.CPU_XLA_FLAGS (XLA:CPU options that make the CPU "
                      "train step faster; benchmark.py sets the same) unless XLA_FLAGS already sets them.")
    flags.DEFINE_bool("tune_allocator", True,
                      "Keep freed host memory in the process (tformer.host.tune_allocator): a CPU train step "
                      "then page-faults nothing instead of its whole working set. Resident memory stays at its peak.")
    flags.DEFINE_bool("verbose", False, "On an error, print the traceback too (not just the one-line message).")


# ---------------------------------------------------------------------------
# One run: its parts, and small helpers for logging, checkpointing and eval.


@dataclasses.dataclass
class Run:
    """Everything the training loop touches (`state` changes every step)."""

    config: ConfigDict
    workdir: Path
    family: families.Family
    task: Task
    cfg: object  # the family's model config
    graphdef: object
    state: training.TrainState
    train_fn: object
    eval_fn: object
    batch_sh: dict
    ckpt: Checkpointer
    writer: MetricWriter
    last_saved: int | None  # newest checkpoint step known good (None: nothing saved yet)
    flops_per_token: float
    peak_tflops: float | None
    progress0: float | None = None  # schedule progress saved in the restored checkpoint (time-budgeted runs)
    budget: budget_lib.TimeBudget | None = None  # `train.time_budget_s` (see experiments/budget.py)
    mesh: object = None
    state_sh: object = None
    virtual_stages: int = 1  # > 1: `state` stores its stacked layers in the schedule's order

    def model_order_state(self) -> training.TrainState:
        """The state with its layers in model order (the one way out of the schedule's order; V = 1: itself)."""
        return training.in_model_order(self.state, self.mesh, self.virtual_stages, self.state_sh)

    def model(self):
        from flax import nnx

        params = training.in_model_order(self.state.params, self.mesh, self.virtual_stages, self.state_sh.params)
        return nnx.merge(self.graphdef, lora.merged(params))

    def train_batch(self, step: int) -> dict:
        t = self.config.train
        local = input_pipeline.batch_at(self.task.train, step, t.batch_size, t.seed,
                                  process_index=jax.process_index(), process_count=jax.process_count())
        return input_pipeline.global_batch(local, self.batch_sh, t.batch_size)


def _peak_tflops() -> float | None:
    """Dense bf16 peak of this run's devices (all of them), or None where unknown (CPU)."""
    spec = flops.device_spec(jax.devices()[0].device_kind)
    return None if spec is None else spec.peak_tflops * jax.device_count()


def _cpu_step_options(cfg) -> dict[str, str]:
    """`tformer.host.cpu_compiler_options` for the train step (off with --nocpu_xla_flags)."""
    if FLAGS.is_parsed() and not FLAGS.cpu_xla_flags:
        return {}
    return host.cpu_compiler_options(cfg.d_model)


def setup_run(config: ConfigDict, workdir: Path) -> Run:
    """Data, model, optimizer, mesh, jitted steps, and the state: restored from the newest readable checkpoint."""
    mesh, rules = run_config.make_run_mesh(config), sharding.rules_for(config.mesh.preset)
    source = finetune.prepare(config, workdir)  # init_from: the source's tokenizer into the workdir
    family, task = run_config.family_of(config), load_task(config, workdir)
    cfg = source.cfg if source else run_config.model_config(config, task.tokenizer)
    o, t = run_config.optim_config(config), config.train
    check_sample_prompts(config, task, cfg.max_len)
    microbatches = config.mesh.microbatches or None
    seq_len = config.data.seq_len if family.task == "lm" else config.data.tgt_len
    if family.shards_weights:  # the others shard nothing but the batch and `embed`
        for batch_size in {t.batch_size, t.eval_batch_size or t.batch_size}:
            sharding.check_divisibility(cfg, mesh, rules, batch_size, seq_len=seq_len, microbatches=microbatches,
                                        virtual_stages=config.mesh.virtual_stages)
    logging.info("mesh %s (preset %r) over %d process(es), %d devices", dict(mesh.shape), config.mesh.preset,
                 jax.process_count(), mesh.size)
    ckpt = Checkpointer(workdir / "checkpoints", max_to_keep=t.keep_checkpoints)
    params = finetune.initial_params(source, cfg) if source and ckpt.latest_step() is None else None
    v = config.mesh.virtual_stages
    graphdef, tx, state, state_sh = training.create_train_state(family.model_class, cfg, o, t.seed, mesh, rules,
                                                                params=params, lora=finetune.lora_config(t),
                                                                virtual_stages=v)
    batch_sh = training.batch_sharding(mesh, rules, input_pipeline.batch_at(task.train, 0, t.batch_size))
    kw = dict(mesh=mesh, rules=rules, batch_sharding=batch_sh, microbatches=microbatches, virtual_stages=v)
    train_fn = training.make_train_step(graphdef, tx, o, state_sharding=state_sh,
                                        compiler_options=_cpu_step_options(cfg), **kw)
    eval_fn = training.make_eval_step(graphdef, o, params_sharding=state_sh.params, **kw)
    if ckpt.latest_step() is not None:
        finetune.check_resume(workdir, config)
    state, extra = restore_latest(ckpt, state, state_sh, workdir=workdir, family=family.name, cfg=cfg, o=o)
    if extra is not None:  # checkpoints hold model order
        state = training.in_schedule_order(state, mesh, v, state_sh)
    if jax.process_index() == 0:
        atomic_write(workdir / "config.json", json.dumps({
            "config": config.to_dict(), "model": dataclasses.asdict(cfg), "optim": dataclasses.asdict(o),
            "tokenizer": config.data.tokenizer}, indent=2))
    return Run(config, workdir, family, task, cfg, graphdef, state, train_fn, eval_fn, batch_sh, ckpt,
               MetricWriter(workdir, enabled=jax.process_index() == 0), last_saved=ckpt.latest_step(),
               flops_per_token=family.train_flops_per_token(cfg, seq_len), peak_tflops=_peak_tflops(),
               progress0=(extra or {}).get("progress"), mesh=mesh, state_sh=state_sh, virtual_stages=v)


def save_checkpoint(run: Run, step: int, progress: float | None = None) -> None:
    """Save the state (model order); a time-budgeted run also records its schedule's `progress` (read back on
    resume)."""
    extra = {"data_step": step, "model_kind": run.family.name}
    if progress is not None:
        extra["progress"] = progress
    run.ckpt.save(step, run.model_order_state(), extra)
    run.last_saved = step


def start_budget(run: Run, started: float) -> budget_lib.TimeBudget | None:
    """The run's time budget (None when `train.time_budget_s` is 0), its final-eval reserve measured now."""
    t = run.config.train
    if not t.time_budget_s:
        return None
    if jax.process_count() > 1:
        raise ValueError("config.train.time_budget_s: a time budget is single-process only (processes timing "
                         "themselves could stop at different steps); bound a multi-process run by num_steps")
    bs = t.eval_batch_size or t.batch_size
    batch = next(input_pipeline.eval_batches(run.task.valid, bs, jax.process_index(), jax.process_count()))
    batch = input_pipeline.global_batch(batch, run.batch_sh, bs)
    reserve = budget_lib.measure_eval_s(lambda: run.eval_fn(run.state.params, batch), t.eval_batches)
    reserve += t.time_budget_margin_s
    step = int(run.state.step)
    progress0 = run.progress0 if run.progress0 is not None else step / run_config.total_steps(run.config)
    b = budget_lib.TimeBudget(t.time_budget_s, started, reserve, progress0)
    if b.deadline <= b.train_start and not b.exhausted():
        spent = b.train_start - started
        raise ValueError(f"config.train.time_budget_s={t.time_budget_s:g} is spent before training starts "
                         f"(setup took {spent:.1f}s and the final eval needs {reserve:.1f}s); raise it above "
                         f"{spent + reserve:.0f}s, or lower train.eval_batches / train.time_budget_margin_s")
    logging.info("time budget %gs: %.1fs spent on setup, %.1fs reserved for the final eval; training until "
                 "%.1fs (schedule progress from %.3f)", t.time_budget_s, b.train_start - started, reserve,
                 b.deadline - started, b.progress0)
    return b


def evaluate(run: Run) -> dict:
    """The run's eval (`tasks.evaluate`) of its current parameters."""
    return evaluate_task(run.task, run.config, run.eval_fn, run.state.params, run.batch_sh, run.model)


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


def train_steps(run: Run, preempt: processes.Preemption) -> bool:
    """Train from the state's step to `train.num_steps`; False when a signal stopped it (state saved)."""
    t = run.config.train
    start = int(run.state.step)
    window = Window(start, time.time())
    batches = input_pipeline.Prefetcher(run.train_batch, range(start, t.num_steps))
    prof = profiling.StepProfiler.for_run(t.profile_steps, t.num_steps, run.workdir)  # None unless asked
    budget = run.budget
    try:
        for done, batch in enumerate(batches, start + 1):
            if budget and budget.exhausted():
                break
            progress = None if budget is None else budget.progress(done - 1, run_config.total_steps(run.config))
            with (prof and prof.annotate(done)) or contextlib.nullcontext():
                run.state, metrics = run.train_fn(run.state, batch, *(() if budget is None else
                                                                     (np.float32(progress),)))
            if prof:
                prof.after(done, metrics)
            window.metrics.append(metrics)
            out_of_time = budget is not None and budget.after_step(metrics["loss"])
            stop = preempt.requested
            if stop or out_of_time or done % t.log_every == 0 or done % t.checkpoint_every == 0 \
                    or done == t.num_steps:
                window = report(run, window, done)
            if stop:
                save_checkpoint(run, done, progress)
                run.ckpt.wait()
                logging.warning("saved step %d after %s; exiting", done, stop)
                return False
            if out_of_time:
                logging.info("time budget: training stops after step %d (%.1fs in)", done,
                             time.time() - budget.started)
                break
            if done % t.checkpoint_every == 0 and done != t.num_steps:
                save_checkpoint(run, done, progress)
            if done % t.eval_every == 0 and done != t.num_steps:
                ev = evaluate(run)
                run.writer.write(done, "eval", ev)
                logging.info("eval @%d: %s", done, _fmt(ev))
                window = Window(done, time.time())  # train tokens/s counts train steps only
                if budget:
                    budget.restart_step_clock()
    finally:
        batches.close()
        if prof:
            prof.close()
    return True


def finish(run: Run) -> dict:
    """Save the final state first (nothing after it can lose the run), then evaluate, sample and summarise."""
    step = int(run.state.step)
    save_checkpoint(run, step, None if run.budget is None else 1.0)  # a budgeted run's schedule is complete
    run.ckpt.wait()
    result = evaluate(run)
    run.writer.write(step, "eval", result)
    logging.info("final eval @%d: %s", step, _fmt(result))
    # Every process takes part in generating (the parameters may span hosts); process 0 prints.
    t, main = run.config.train, jax.process_index() == 0
    lines = decode.sample_lines(run.model(), run.task.tokenizer, t, run.config.data, run.task.name,
                                run.task.valid_pairs, jax.random.key(t.seed))
    if main:
        print("\n".join(lines))
        plot_loss(run.workdir)
        extra = {} if run.budget is None else {"time_budget": run.budget.summary()}
        atomic_write(run.workdir / "final_metrics.json", json.dumps({"step": step, **result, **extra}, indent=2))
    return result


def train_and_evaluate(config: ConfigDict, workdir: str | os.PathLike, started: float | None = None) -> dict:
    """Train (or resume) per `config` in `workdir`; returns the final eval metrics ({"preempted_at": step}
    when a signal stopped the run). `started`: when the run began, for `train.time_budget_s` (None: now)."""
    started = time.time() if started is None else started
    run_config.validate(config)
    workdir = prepare_workdir(workdir)
    # Process 0 holds the lock for the whole run; the others share its workdir.
    lock = WorkdirLock(workdir) if jax.process_index() == 0 else contextlib.nullcontext()
    with lock:
        run = setup_run(config, workdir)
        run.budget = start_budget(run, started)
        preempt = processes.Preemption()
        try:
            if not train_steps(run, preempt):
                return {"preempted_at": int(run.state.step)}
            return finish(run)
        finally:
            preempt.restore()
            run.writer.close()
            run.ckpt.close()


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
    if FLAGS.plan_platform is not None and not FLAGS.plan:
        raise app.UsageError("--plan_platform only applies to --plan")
    if not FLAGS.plan and FLAGS.workdir is None:
        raise app.UsageError("--workdir is required (except with --plan)")


def main(argv):
    del argv
    logging.get_absl_handler().addFilter(QuietLibraries())
    _check_flags()
    if FLAGS.tune_allocator:
        host.tune_allocator()  # before JAX starts its threads (see tformer/host.py)
    if FLAGS.cpu_xla_flags:
        host.add_cpu_xla_flags()  # before JAX starts its backend; the same as benchmark.py's
    try:
        if FLAGS.plan_devices is not None:
            processes.use_fake_cpu_devices(FLAGS.plan_devices)
        processes.start_processes(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                                  auto=FLAGS.distributed, heartbeat_timeout=FLAGS.heartbeat_timeout)
        if FLAGS.plan and FLAGS.plan_platform:
            planning.print_platform_plan(FLAGS.config, FLAGS.plan_platform)
        elif FLAGS.plan:
            planning.print_plan(FLAGS.config)
        else:
            train_and_evaluate(FLAGS.config, FLAGS.workdir, started=budget_lib.process_start_time())
    except (ValueError, FloatingPointError, CheckpointError, OSError) as e:
        if FLAGS.verbose:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except jax.errors.JaxRuntimeError as e:
        if FLAGS.verbose or jax.process_count() == 1:
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: {processes.lost_peer_message(f'a collective with it failed: {first[:300]}')}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=run_config.parse_flags)
