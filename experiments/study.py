r"""The parallelism story, measured: Transformer vs RNN, and data vs model parallelism.

    python experiments/study.py --out=docs/figures --record=docs/results/study.json   # <= 15 min, 2-core CPU
    python experiments/study.py --out=docs/figures --record=docs/results/study.json --replot  # plots only
    python experiments/study.py --out=study_out --smoke     # the same, tiny (CI): <= 2 min

Writes to --out one PNG per part, and to --record (default --out/study.json)
every figure with the conditions it was measured under; beside it the same
name with .md (the tables and the headline ratios). --replot re-renders the
PNGs and the .md from the record without measuring:

  a. `train_step_vs_length.png`: one train step vs sequence length T, LSTM vs
     Transformer of the same parameter count and tokens per step (batch =
     tokens / T), and the sequential steps on each one's critical path;
  b. `decode_vs_position.png`: the cost of one new token vs its position:
     Transformer with the KV cache, Transformer re-running the full forward,
     LSTM (one step of its carry);
  c. `equal_time.png`: quality after the same training time on this machine:
     the numbers task (exact match) and the stdlib LM (bits per byte); the
     two models' steps are interleaved, each clocking only its own steps;
  d. `parallelism_plan.png`: per-device memory and collective bytes vs device
     count for each sharding preset and for pipeline (`pp`: GPipe over a
     `stage` axis; `pp_int`: the interleaved schedule) and sequence (`sp`:
     ring attention over a `sequence` axis; `sp_zigzag`: its balanced causal
     layout) parallelism, from plan mode (compiled, never run) on fake CPU devices in
     a subprocess, for GPT-2 small and a ~1B config; splits that do not
     divide are skipped and listed.

Timings interleave the calls of the models compared, so a shared machine
slows both alike, and report the fastest of the repeats (the call least
disturbed by other processes; medians are in study.json): compare ratios,
not absolute times.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # `python experiments/study.py`: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from absl import app, flags

FLAGS = flags.FLAGS
PARTS = "abcd"
PRESETS = ("dp", "fsdp", "tp", "fsdp_tp")  # sharding rule tables (tformer.sharding)
# Part d's pipeline (`stage` axis) and sequence (`sequence` axis) meshes, with `dp` rules: GPipe and the
# interleaved schedule (`pp_int`: the fewest virtual stages above 1 that divide the layers), the ring in the
# consecutive layout and in the balanced (zigzag) one.
SPLITS = ("pp", "pp_int", "sp", "sp_zigzag")
# Part d's strategies: fsdp_tp is left out to keep the plans within minutes (its state per device is fsdp's).
STRATEGIES = ("dp", "fsdp", "tp") + SPLITS


def define_flags() -> None:
    flags.DEFINE_string("out", None, "Directory for the PNGs (and study.json / study.md unless --record).")
    flags.DEFINE_string("record", None, "The JSON record of every figure (default: --out/study.json); its "
                        "report goes beside it (.md).")
    flags.DEFINE_bool("replot", False, "Re-render the PNGs and the report from --record without measuring.")
    flags.DEFINE_bool("add_forward", False, "Measure only part a's forward of one sequence into --record (its "
                      "train-step rows kept), then replot.")
    flags.DEFINE_bool("smoke", False, "Tiny settings (CI): every part runs, in about a minute.")
    flags.DEFINE_string("parts", PARTS, "Which parts to run, e.g. 'ab'; the other parts' figures already in "
                        "--record are kept.")
    flags.DEFINE_float("train_seconds", None, "Part c: training time per model and task (default: numbers 120 s, "
                       "LM 40 s; smoke 1 s).")
    flags.DEFINE_string("plan_worker", None, "Internal: run the plans of this folder's request.json (part d).")


# ---------------------------------------------------------------------------
# Settings: the full run and the smoke run.


@dataclasses.dataclass(frozen=True)
class Settings:
    lengths: tuple[int, ...] = (32, 64, 128, 256, 512, 1024, 2048)
    tokens_per_step: int = 4096
    d_model: int = 128  # the Transformer's; the LSTM's width is solved for the same parameter count
    num_layers: int = 2
    step_repeats: int = 3
    positions: tuple[int, ...] = (1, 64, 128, 256, 512, 768, 1024)
    decode_repeats: int = 10
    train_seconds: float = 120.0  # part c, per model: the numbers task (and the LM unless lm_train_seconds)
    lm_train_seconds: float | None = None
    # The numbers task's equal-time run: smaller batches and a higher rate than seq2seq_tiny's full run, so
    # that a few hundred steps separate the models (None: the config's).
    numbers_batch_size: int | None = 32
    numbers_learning_rate: float | None = 3e-3
    lm_max_bytes: int = 2_000_000
    numbers_train: int = 20_000
    eval_decode_examples: int = 500
    plan_devices: tuple[int, ...] = (1, 16, 256)
    plan_models: tuple[str, ...] = ("gpt2_small", "1b")


# The README's run: the LM's bits per byte separate the models within a minute, the numbers task needs longer.
FULL = Settings(lm_train_seconds=40.0)
SMOKE = Settings(lengths=(16, 32), tokens_per_step=64, d_model=16, num_layers=1, step_repeats=1, positions=(1, 16),
                 decode_repeats=2, train_seconds=1.0, lm_max_bytes=30_000, numbers_train=200, eval_decode_examples=4,
                 plan_devices=(2,), plan_models=("tiny",))


def _interleaved(fns: dict, repeats: int, block: int = 1) -> dict[str, float]:
    """Seconds per call of each zero-argument function, timed interleaved (`experiments.timing`)."""
    from experiments import timing

    return timing.best_and_median(timing.interleaved(fns, repeats, block))


# ---------------------------------------------------------------------------
# a. Train step vs sequence length, at matched parameter count and tokens per step.


def matched_models(s: Settings, max_len: int, vocab: int = 256):
    """(Transformer ModelConfig, RNNConfig, their parameter counts): LSTM width solved for equal size."""
    import jax
    from flax import nnx

    import tformer
    from tformer import rnn

    tf = tformer.ModelConfig(vocab_size=vocab, vocab_multiple=1, d_model=s.d_model, num_heads=4,
                             num_layers=s.num_layers, max_len=max_len, positions="rope", norm="rmsnorm",
                             activation="gelu", use_bias=False)
    abstract = nnx.state(nnx.eval_shape(lambda: tformer.DecoderLM(tf, rngs=nnx.Rngs(0))))
    n_tf = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract))
    d = min(range(8, 8 * s.d_model),
            key=lambda w: abs(rnn.param_count(rnn.RNNConfig(vocab_size=vocab, d_model=w, num_layers=s.num_layers))
                              - n_tf))
    lstm = rnn.RNNConfig(vocab_size=vocab, d_model=d, num_layers=s.num_layers, cell="lstm", max_len=max_len)
    return tf, lstm, n_tf, rnn.param_count(lstm)


def _lm_step(model_cls, cfg, batch: int, length: int):
    """A zero-argument function running one jitted train step on a fixed random batch."""
    import jax
    import numpy as np

    import tformer

    o = tformer.OptimizerConfig(learning_rate=1e-3, warmup_steps=1, total_steps=1000)
    graphdef, tx, state, _ = tformer.create_train_state(model_cls, cfg, o, seed=0)
    step = tformer.make_train_step(graphdef, tx, o, donate=False)
    tokens = np.random.default_rng(0).integers(3, cfg.vocab_size, (batch, length + 1)).astype(np.int32)
    b = jax.device_put({"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
                        "weights": np.ones((batch, length), np.float32)})
    return lambda: step(state, b)[1]["loss"]


def _forward_one(model_cls, cfg, length: int):
    """A zero-argument function running one jitted forward of one sequence of `length` tokens: its time is
    the chain of dependent steps (no batch to spread over the cores), the measured critical path."""
    import jax
    import numpy as np
    from flax import nnx

    graphdef, params = nnx.split(model_cls(cfg, rngs=nnx.Rngs(0)))
    tokens = jax.device_put(np.random.default_rng(0).integers(3, cfg.vocab_size, (1, length)).astype(np.int32))
    forward = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))
    return lambda: forward(params, tokens)


def part_a(s: Settings) -> dict:
    import tformer
    from tformer import rnn

    tf, lstm, n_tf, n_lstm = matched_models(s, max(s.lengths))
    rows = []
    for length in s.lengths:
        batch = max(s.tokens_per_step // length, 1)
        t = _interleaved({"transformer": _lm_step(tformer.DecoderLM, tf, batch, length),
                          "lstm": _lm_step(rnn.RNNLM, lstm, batch, length)}, s.step_repeats)
        rows.append({"T": length, "batch": batch, **{f"{k}_ms": 1e3 * v for k, v in t.items()},
                     # Dependent steps a forward pass must take one after another: the LSTM's layer l
                     # at time t waits for (l, t - 1) and (l - 1, t); a Transformer layer sees all T at once.
                     "lstm_critical_path": length + s.num_layers - 1, "transformer_critical_path": s.num_layers})
        print(f"[a] T={length:5d} batch={batch:4d}  transformer {rows[-1]['transformer_ms']:8.1f} ms  "
              f"lstm {rows[-1]['lstm_ms']:8.1f} ms", flush=True)
    return {"transformer": dataclasses.asdict(tf) | {"params": n_tf},
            "lstm": dataclasses.asdict(lstm) | {"params": n_lstm},
            "tokens_per_step": s.tokens_per_step, "rows": rows, "forward_one": part_a_forward(s)}


def part_a_forward(s: Settings) -> dict:
    """Part a's second half: one forward of one sequence (batch 1) vs T, the two models interleaved. With no
    batch to spread over the cores, its time is the chain of dependent steps: the critical path, measured."""
    import tformer
    from experiments import results as records
    from tformer import rnn

    tf, lstm, _, _ = matched_models(s, max(s.lengths))
    rows = []
    for length in s.lengths:
        t = _interleaved({"transformer": _forward_one(tformer.DecoderLM, tf, length),
                          "lstm": _forward_one(rnn.RNNLM, lstm, length)}, s.step_repeats)
        rows.append({"T": length, **{f"{k}_ms": 1e3 * v for k, v in t.items()}})
        print(f"[a] forward of one sequence, T={length:5d}: transformer {rows[-1]['transformer_ms']:.2f} ms, "
              f"lstm {rows[-1]['lstm_ms']:.2f} ms", flush=True)
    return {"rows": rows, "conditions": records.conditions()}


def add_forward(record: Path, out: Path, s: Settings) -> dict:
    """Measure part a's forward of one sequence into an existing record (its train-step rows kept), replot."""
    results = json.loads(record.read_text())
    results["a"]["forward_one"] = part_a_forward(s)
    write_report(results, out, record)
    return results


# ---------------------------------------------------------------------------
# b. Decode cost per token vs position.


def part_b(s: Settings) -> dict:
    import functools

    import jax
    from flax import nnx

    import tformer
    from tformer import rnn

    top = max(s.positions)
    tf_cfg, lstm_cfg, _, _ = matched_models(s, top + 1)
    tf_gd, tf_params = nnx.split(tformer.DecoderLM(tf_cfg, rngs=nnx.Rngs(0)))
    rnn_gd, rnn_params = nnx.split(rnn.RNNLM(lstm_cfg, rngs=nnx.Rngs(0)))
    tokens = jax.random.randint(jax.random.key(0), (1, top + 1), 3, tf_cfg.vocab_size)

    @functools.partial(jax.jit, static_argnames=("visible",))
    def cached(params, tok, cache, visible):  # one token against the cache, reading the `visible` filled slots
        return nnx.merge(tf_gd, params).extend(tok, cache, visible=visible)[0]

    @jax.jit
    def prefill(params, toks, cache):
        return nnx.merge(tf_gd, params).extend(toks, cache)[1]

    @jax.jit
    def uncached(params, toks):  # no cache: the whole prefix again, keep the last position's logits
        return nnx.merge(tf_gd, params)(toks)[:, -1]

    @jax.jit
    def rnn_step(params, tok, state):
        return nnx.merge(rnn_gd, params).step(tok, state)[0]

    rnn_state = nnx.merge(rnn_gd, rnn_params).init_state(1)
    rows = []
    for p in s.positions:  # p tokens already seen; time the step that reads token p and predicts p + 1
        cache = prefill(tf_params, tokens[:, :p], nnx.merge(tf_gd, tf_params).init_cache(1, top + 1))
        tok = tokens[:, p : p + 1]
        t = _interleaved({
            "cached": functools.partial(cached, tf_params, tok, cache, visible=p + 1),
            "uncached": functools.partial(uncached, tf_params, tokens[:, : p + 1]),
            "rnn": functools.partial(rnn_step, rnn_params, tok[:, 0], rnn_state),
        }, s.decode_repeats, block=3)
        rows.append({"position": p, **{f"{k}_ms": 1e3 * v for k, v in t.items()}})
        print(f"[b] position {p:5d}  cached {rows[-1]['cached_ms']:.3f} ms  no cache {rows[-1]['uncached_ms']:.3f} ms"
              f"  lstm {rows[-1]['rnn_ms']:.3f} ms", flush=True)
    return {"rows": rows, "batch": 1}


# ---------------------------------------------------------------------------
# c. Quality at equal training time.


class _Trainer:
    """One model of part c: its task, state and jitted steps; `step()` trains one batch and clocks it."""

    def __init__(self, config, workdir: Path):
        import jax

        import tformer
        from experiments import input_pipeline, run_config
        from experiments.tasks import build_task

        self.config, self.input_pipeline = config, input_pipeline
        self.task = build_task(config, workdir)
        cfg = run_config.model_config(config, self.task.tokenizer)
        # A constant rate after warm-up: time, not a step count, ends the run, so there is no horizon to decay to.
        self.o = dataclasses.replace(run_config.optim_config(config), schedule="constant")
        model_cls = run_config.family_of(config).model_class
        self.graphdef, tx, self.state, _ = tformer.create_train_state(model_cls, cfg, self.o, seed=0)
        self.step_fn = tformer.make_train_step(self.graphdef, tx, self.o)
        self.bs = config.train.batch_size
        self.steps, self.elapsed, self.curve = 0, 0.0, []
        first = input_pipeline.batch_at(self.task.train, 0, self.bs)
        self.state, m = self.step_fn(self.state, first)  # compiles: not clocked
        jax.block_until_ready(m["loss"])
        self.steps = 1

    def step(self) -> None:
        t = time.perf_counter()
        self.state, m = self.step_fn(self.state, self.input_pipeline.batch_at(self.task.train, self.steps, self.bs))
        loss = float(m["loss"])  # waits for the step
        self.elapsed += time.perf_counter() - t
        self.steps += 1
        self.curve.append((self.elapsed, loss))

    def result(self) -> dict:
        import jax
        from flax import nnx

        import tformer

        out = {"steps": self.steps, "seconds": self.elapsed, "curve": self.curve[:: max(len(self.curve) // 200, 1)]}
        if self.task.name == "lm":
            eval_fn, sums = tformer.make_eval_step(self.graphdef, self.o), None
            for i, b in enumerate(self.input_pipeline.eval_batches(self.task.valid, self.bs)):
                if i >= self.config.train.eval_batches:
                    break
                r = eval_fn(self.state.params, b)
                sums = r if sums is None else jax.tree.map(lambda a, c: a + c, sums, r)
            out["bits_per_byte"] = self.input_pipeline.bits_per_byte(float(sums["nll_sum"]), float(sums["weight_sum"]),
                                                         self.task.valid)
        else:
            from experiments import decode

            c = self.config
            pairs = self.task.valid_pairs[: c.train.eval_decode_examples]
            model = nnx.merge(self.graphdef, self.state.params)
            out.update(decode.translation_scores(model, self.task.tokenizer, pairs, c.data.src_len, c.data.tgt_len,
                                                 c.train.beam_size))
        return out


def train_equal_time(trainers: dict, seconds: float) -> dict:
    """Train each `_Trainer` for `seconds` of its own step time, interleaved (the one behind steps next), so
    a shared machine's load falls on every model alike; compilation is not counted. Then evaluate each."""
    while True:
        behind = min(trainers.values(), key=lambda t: t.elapsed)
        if behind.elapsed >= seconds:
            break
        behind.step()
    return {name: t.result() for name, t in trainers.items()}


_SMOKE_MODEL = dict(d_model=32, num_layers=1, num_encoder_layers=1, d_ff=64, num_heads=2)


def part_c(s: Settings, seconds: float | None = None) -> dict:
    """Equal-time runs; `seconds` (per model) replaces both tasks' times of `s`."""
    from experiments.configs import lm_tiny, lm_tiny_rnn, seq2seq_tiny, seq2seq_tiny_rnn

    def configure(c, lm: bool):
        c.mesh.update(data=1)
        if lm:
            c.data.update(max_bytes=s.lm_max_bytes)
        else:
            c.data.update(num_train=s.numbers_train)
            c.train.update(eval_decode_examples=s.eval_decode_examples)
            if s.numbers_batch_size:
                c.train.update(batch_size=s.numbers_batch_size)
            if s.numbers_learning_rate:
                c.optim.update(learning_rate=s.numbers_learning_rate)
        if s is SMOKE:  # shrink every size the model has (an LM keeps num_encoder_layers=0)
            c.train.update(batch_size=8, eval_batches=1)
            c.model.update(**{k: v for k, v in _SMOKE_MODEL.items() if c.model.get(k)})
        return c

    out = {"seconds_lm": seconds or s.lm_train_seconds or s.train_seconds,
           "seconds_numbers": seconds or s.train_seconds}
    with tempfile.TemporaryDirectory() as tmp:
        for task, pair in (("lm", (lm_tiny, lm_tiny_rnn)), ("numbers", (seq2seq_tiny, seq2seq_tiny_rnn))):
            names = ("transformer", "rnn")
            configs = {name: configure(mod.get_config(), task == "lm") for name, mod in zip(names, pair)}
            trainers = {name: _Trainer(c, Path(tmp) / task / name) for name, c in configs.items()}
            for name, r in train_equal_time(trainers, out[f"seconds_{task}"]).items():
                out[f"{task}_{name}"] = r
                score = r.get("bits_per_byte", r.get("exact_match"))
                print(f"[c] {task} {name}: {r['steps']} steps in {r['seconds']:.0f} s -> {score:.4f}", flush=True)
    return out


# ---------------------------------------------------------------------------
# d. Data vs model parallelism from plan mode (its own process: the fake device count is fixed at start-up).


def _plan_model(name: str):
    import tformer

    if name == "gpt2_small":
        return tformer.gpt2_small(dtype="bfloat16", scan_layers=True), 1024
    if name == "1b":  # 18 x 12 x 2048^2 + embeddings: about 1.0B parameters
        return tformer.gpt2_small(d_model=2048, num_heads=16, num_layers=18, dtype="bfloat16", scan_layers=True), 1024
    return tformer.ModelConfig(vocab_size=256, d_model=32, num_heads=4, num_layers=2, max_len=64), 64


def mesh_shape(preset: str, n: int, heads: int) -> dict[str, int]:
    tensor = math.gcd(n, heads, 8)  # Megatron within a (fake) host: at most 8-way, dividing the heads
    return {"dp": {"data": n}, "fsdp": {"fsdp": n}, "tp": {"data": n // tensor, "tensor": tensor},
            "fsdp_tp": {"fsdp": n // tensor, "tensor": tensor}}[preset]


def split_shape(split: str, n: int, layers: int) -> dict[str, int]:
    """Part d's pipeline (`pp`) and sequence (`sp`) meshes on n devices, data parallel over the rest.

    `pp`: the most stages (at most 8, a host's worth) that divide both the layers and n, so GPT-2 small's
    12 layers get 4 stages, not 8, and the 1B's 18 layers 2; `sp`: min(n, 8) sequence parts.
    Raises ValueError when no split exists (one device, or no common divisor).
    """
    if split == "pp":
        parts = max(d for d in range(1, 9) if layers % d == 0 and n % d == 0)
        axis = "stage"
    else:
        parts, axis = min(n, 8), "sequence"
    if parts == 1:
        raise ValueError(f"{split} on {n} device(s) of a {layers}-layer model: no {axis} split above 1")
    return {axis: parts, "data": n // parts}


def _plan_row(name, cfg, seq, n, strategy, batch, o) -> dict:
    """Plan one (model, device count, strategy); a ValueError names what does not divide."""
    import jax

    import tformer
    from tformer import plan as plan_lib
    from tformer import sharding

    split = strategy in SPLITS
    shape = split_shape(strategy[:2], n, cfg.num_layers) if split else mesh_shape(strategy, n, cfg.num_heads)
    shape = {"data": 1, "fsdp": 1, "tensor": 1, **shape}
    stages = shape.get("stage", 1)
    # Microbatches: 2 x stages (GPipe's bubble (S-1)/(M+S-1) = 1/3 at most), fewer when each data shard's
    # batch is smaller than that.
    micro = min(2 * stages, batch // shape["data"]) if stages > 1 else None
    v = virtual_stages(cfg.num_layers, stages) if strategy == "pp_int" else 1
    if strategy == "sp_zigzag":
        cfg = cfg.replace(sequence_layout="zigzag")
    mesh = sharding.make_mesh(shape, devices=jax.devices()[:n])
    p = plan_lib.plan_train_step(tformer.DecoderLM, cfg, o, mesh, "dp" if split else strategy, batch=batch,
                                 seq_len=seq, microbatches=micro, virtual_stages=v)
    return {"model": name, "params": p.num_params, "devices": n, "preset": strategy, "mesh": shape,
            "microbatches": micro, "virtual_stages": v, "bubble": p.bubble_fraction if stages > 1 else None,
            "sequence_layout": cfg.sequence_layout, "batch": batch, "seq_len": seq, "state_bytes": p.state_bytes,
            "peak_bytes": p.peak_bytes, "collective_bytes": p.collective_bytes,
            "collectives": p.collective_summary()}


def virtual_stages(layers: int, stages: int) -> int:
    """`pp_int`'s V: the fewest virtual stages above 1 whose S x V groups divide the layers (GPT-2 small's 12
    layers on 4 stages: 3). Raises ValueError when none does (the plan is then skipped and listed)."""
    for v in range(2, layers // stages + 1):
        if layers % (stages * v) == 0:
            return v
    raise ValueError(f"{layers} layers on {stages} stages leave no interleaved schedule (V > 1 groups per stage)")


def plan_worker(folder: str) -> None:
    """Plan every (model, device count, strategy) of `folder`/request.json; write `folder`/plans.json.

    On one device every strategy is the same program: it is compiled once and its row repeated.
    """
    import tformer

    request = json.loads((Path(folder) / "request.json").read_text())
    rows, skipped = [], []
    o = tformer.OptimizerConfig()
    for name in request["models"]:
        cfg, seq = _plan_model(name)
        batch = max(request["devices"])  # a fixed global batch, split ever finer: strong scaling
        for n in request["devices"]:
            single = None
            for strategy in STRATEGIES:
                try:
                    if n == 1 and single is not None:
                        rows.append(single | {"preset": strategy})
                        continue
                    rows.append(_plan_row(name, cfg, seq, n, strategy, batch, o))
                    stages = rows[-1]["mesh"].get("stage", 1)
                    if strategy in ("pp", "pp_int") and stages < min(n, 8):  # the host-sized pipeline does not divide
                        skipped.append({"model": name, "devices": n, "preset": strategy, "reason": (
                            f"{min(n, 8)} stages do not divide its {cfg.num_layers} layers; planned with {stages}")})
                    single = rows[-1] if n == 1 else None
                except ValueError as e:  # a split that does not divide: record it, plan the rest
                    skipped.append({"model": name, "devices": n, "preset": strategy, "reason": str(e)})
                    print(f"[d] {name} {n:4d} devices {strategy:8s} skipped: {e}", flush=True)
                    continue
                x = rows[-1]
                print(f"[d] {name} {n:4d} devices {strategy:8s} state {x['state_bytes'] / 2**20:10.1f} MiB  peak "
                      f"{(x['peak_bytes'] or 0) / 2**20:10.1f} MiB  collectives {x['collective_bytes'] / 2**20:9.1f} "
                      "MiB", flush=True)
    (Path(folder) / "plans.json").write_text(json.dumps({"rows": rows, "skipped": skipped}))


def part_d(s: Settings) -> dict:
    """Plans in a subprocess whose CPU backend has max(s.plan_devices) fake devices."""
    n = max(s.plan_devices)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={n}",
           "PYTHONPATH": os.pathsep.join(p for p in (str(Path(__file__).resolve().parents[1]),
                                                     os.environ.get("PYTHONPATH")) if p)}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "request.json").write_text(json.dumps({"devices": s.plan_devices, "models": s.plan_models}))
        cmd = [sys.executable, str(Path(__file__).resolve()), f"--plan_worker={tmp}"]
        log = Path(tmp) / "stderr.txt"
        with open(log, "w") as err, subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=err,
                                                     text=True) as proc:
            for line in proc.stdout:  # as each plan finishes (a notebook shows a subprocess's output this way only)
                print(line, end="", flush=True)
        if proc.returncode:
            raise RuntimeError(f"plan subprocess failed:\n{log.read_text()[-3000:]}")
        return json.loads((Path(tmp) / "plans.json").read_text())


# ---------------------------------------------------------------------------
# Plots and the markdown report.


def _names(rows, key: str) -> list[str]:
    return list(dict.fromkeys(x[key] for x in rows))


def _plot_a(r: dict, path: Path, conditions=None) -> None:
    from experiments import plotstyle

    rows = r["rows"]
    ts = [x["T"] for x in rows]
    fig, (ax1, ax2) = plotstyle.figure(2)
    ax1.plot(ts, [x["transformer_ms"] for x in rows], "o-",
             label=f"Transformer ({r['transformer']['params']:,} parameters)")
    ax1.plot(ts, [x["lstm_ms"] for x in rows], "s-", label=f"LSTM ({r['lstm']['params']:,} parameters)")
    ax1.set(xlabel="sequence length T (tokens)", ylabel="time per train step (ms, fastest repeat)",
            title=f"one train step, {r['tokens_per_step']:,} tokens per step (batch = tokens / T)")
    fwd = r.get("forward_one")
    if fwd:  # measured: one forward at batch 1, its time the chain of dependent steps
        fts = [x["T"] for x in fwd["rows"]]
        ax2.plot(fts, [x["transformer_ms"] for x in fwd["rows"]], "o-", label="Transformer")
        ax2.plot(fts, [x["lstm_ms"] for x in fwd["rows"]], "s-", label="LSTM")
        c = fwd.get("conditions") or {}
        when = f"\n(measured {str(c.get('date', ''))[:10]}" + (f", load average {c['load'][0]:g})"
                                                             if isinstance(c.get("load"), list) else ")")
        ax2.set(ylabel="time per forward pass (ms, batch 1, fastest repeat)",
                title="one forward pass of one sequence (its dependent steps)" + (when if c else ""))
    else:  # an older record: the measured ratio (the critical-path counts stay in the record, not drawn)
        ax2.plot(ts, [x["lstm_ms"] / x["transformer_ms"] for x in rows], "D-", color="C2")
        ax2.axhline(1.0, color="gray", lw=0.8)
        ax2.set(ylabel="LSTM time / Transformer time", title="LSTM train step relative to the Transformer's")
    ax2.set(xlabel="sequence length T (tokens)")
    for ax in (ax1, ax2):
        plotstyle.log_axis(ax, "x", ts)
        if ax is ax1 or fwd:
            plotstyle.log_axis(ax, "y")
            ax.legend()
    plotstyle.title(fig, "Train step and forward pass vs sequence length: LSTM vs Transformer of the same size",
                    conditions)
    plotstyle.save(fig, path)


def _plot_b(r: dict, path: Path, conditions=None) -> None:
    from experiments import plotstyle

    rows = r["rows"]
    pos = [x["position"] for x in rows]
    fig, ax = plotstyle.figure(1, width=9, height=5)
    ax.plot(pos, [x["uncached_ms"] for x in rows], "^-", label="Transformer, no cache (re-runs the whole prefix)")
    ax.plot(pos, [x["cached_ms"] for x in rows], "o-", label="Transformer with the KV cache")
    ax.plot(pos, [x["rnn_ms"] for x in rows], "s-", label="LSTM (one step of its carried state)")
    plotstyle.log_axis(ax, "y")
    ax.set(xlabel="position of the new token (tokens already seen)", ylabel="time per new token (ms, batch 1)")
    ax.set_xticks(pos, [plotstyle.plain(p) for p in pos])
    ax.legend()
    plotstyle.title(fig, "Decode: the cost of one new token vs its position", conditions)
    plotstyle.save(fig, path)


def _plot_c(r: dict, path: Path, conditions=None) -> None:
    from experiments import plotstyle

    fig, axes = plotstyle.figure(2, height=5.4)
    for ax, task in zip(axes, ("lm", "numbers")):
        for name, who in (("transformer", "Transformer"), ("rnn", "LSTM" if task == "lm" else "LSTM + attention")):
            x = r[f"{task}_{name}"]
            score = (f"{x['bits_per_byte']:.3f} bits per byte on validation" if task == "lm"
                     else f"exact match {x['exact_match']:.1%} on validation")
            # Byte tokenizer: one scored token per byte (a document's EOS counts as its byte), so
            # bits per byte = nats per token / ln 2.
            ax.plot([c[0] for c in x["curve"]], [c[1] / math.log(2) for c in x["curve"]],
                    label=f"{who}: {x['steps']:,} steps, {score}")
        if task == "numbers":  # from ~8 down to ~0.001 bits: only a log axis shows the end
            plotstyle.log_axis(ax, "y")
        what = "stdlib LM (next byte)" if task == "lm" else "numbers task (digits to English words)"
        ax.set(xlabel="training time (s, compilation excluded)", ylabel="train loss (bits per byte)",
               title=f"{what}, {r[f'seconds_{task}']:.0f} s each")
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16))
    plotstyle.title(fig, "Quality after the same training time: Transformer vs LSTM", conditions)
    plotstyle.save(fig, path)


_LOOK = {"dp": ("o", "-"), "fsdp": ("s", "-"), "tp": ("^", "-"), "fsdp_tp": ("v", "-"), "pp": ("D", "--"),
         "pp_int": ("d", "--"), "sp": ("x", ":"), "sp_zigzag": ("+", ":")}
_WORDS = {"dp": "data parallel (dp)", "fsdp": "fully sharded (fsdp)", "tp": "tensor parallel (tp)",
          "fsdp_tp": "fsdp + tensor", "pp": "pipeline, GPipe (pp)", "pp_int": "pipeline, interleaved (pp_int)",
          "sp": "sequence, ring attention (sp)", "sp_zigzag": "sequence, balanced zigzag ring (sp_zigzag)"}


def _plot_d(r: dict, path: Path, conditions=None) -> None:
    from experiments import plotstyle

    rows = r["rows"]
    models = _names(rows, "model")
    fig, axes = plotstyle.figure(2, len(models), height=4.4, squeeze=False)
    for (ax1, ax2), m in zip(axes, models):
        mine = [x for x in rows if x["model"] == m]
        devs = sorted({x["devices"] for x in mine})
        presets = _names(mine, "preset")
        for i, preset in enumerate(presets):
            pr = sorted((x for x in mine if x["preset"] == preset), key=lambda x: x["devices"])
            # Strategies that coincide (dp and sp keep the same state) would hide each other: a small
            # horizontal offset per strategy, and each its own marker and line style.
            shift = 1.1 ** (i - (len(presets) - 1) / 2)
            marker, line = _LOOK.get(preset, ("P", "-."))
            kw = dict(color=f"C{i}", marker=marker, linestyle=line, markersize=6, label=_WORDS.get(preset, preset))
            ax1.plot([x["devices"] * shift for x in pr], [x["state_bytes"] / 2**30 for x in pr], **kw)
            multi = [x for x in pr if x["devices"] > 1]  # one device sends nothing
            ax2.plot([x["devices"] * shift for x in multi], [x["collective_bytes"] / 2**30 for x in multi], **kw)
        first = mine[0]
        title = f"{m}: {first['params'] / 1e6:,.0f}M parameters, global batch {first['batch']} x {first['seq_len']}"
        ax1.set(xlabel="devices", ylabel="parameters + Adam state per device (GiB)", title=title)
        ax2.set(xlabel="devices", ylabel="collective results per device per step (GiB)",
                title="collective traffic of one compiled train step")
        for ax in (ax1, ax2):
            plotstyle.log_axis(ax, "x", devs)
            plotstyle.log_axis(ax, "y")
            ax.legend(fontsize=8)
    plotstyle.title(fig, "Data vs model parallelism, from plan mode (compiled, not run; fake CPU devices)",
                    conditions, verb="compiled")
    plotstyle.save(fig, path)


def _at(rows, key, value):
    """The row whose `key` is the largest not above `value` (the headline point)."""
    return max((x for x in rows if x[key] <= value), key=lambda x: x[key])


def headlines(results: dict) -> list[str]:
    """The claims, in words, from the measured figures."""
    out = []
    if "a" in results:
        for length in sorted({_at(results["a"]["rows"], "T", 1024)["T"], results["a"]["rows"][-1]["T"]}):
            x = _at(results["a"]["rows"], "T", length)
            out.append(f"At T = {x['T']:,} one train step of the LSTM takes {x['lstm_ms'] / x['transformer_ms']:.2f}x "
                       f"the Transformer's ({x['lstm_ms']:.1f} vs {x['transformer_ms']:.1f} ms, same parameters and "
                       f"tokens per step); its forward has {x['lstm_critical_path']:,} dependent steps, the "
                       f"Transformer's {x['transformer_critical_path']}.")
    if "b" in results:
        rows = results["b"]["rows"]
        rnn = [x["rnn_ms"] for x in rows]
        speedups = ", ".join(f"{x['uncached_ms'] / x['cached_ms']:.1f}x at {x['position']:,}" for x in rows[1:])
        out.append(f"Decoding one token with the KV cache instead of re-running the forward over the prefix: "
                   f"{speedups} (a single timing per position: read the trend, not one jump); the LSTM's step "
                   f"costs {min(rnn):.2f} to {max(rnn):.2f} ms at every position measured, the cached "
                   f"Transformer's {rows[0]['cached_ms']:.2f} ms at position {rows[0]['position']} and "
                   f"{rows[-1]['cached_ms']:.2f} ms at {rows[-1]['position']:,}.")
    if "c" in results:
        c = results["c"]
        out.append(f"After {c['seconds_lm']:.0f} s of training each, stdlib LM bits per byte: Transformer "
                   f"{c['lm_transformer']['bits_per_byte']:.3f} vs LSTM {c['lm_rnn']['bits_per_byte']:.3f} "
                   f"({c['lm_transformer']['steps']} vs {c['lm_rnn']['steps']} steps); after "
                   f"{c['seconds_numbers']:.0f} s each, numbers task exact match "
                   f"Transformer {c['numbers_transformer']['exact_match']:.1%} vs LSTM + attention "
                   f"{c['numbers_rnn']['exact_match']:.1%}, BLEU {c['numbers_transformer']['bleu']:.1f} vs "
                   f"{c['numbers_rnn']['bleu']:.1f} ({c['numbers_transformer']['steps']} vs "
                   f"{c['numbers_rnn']['steps']} steps).")
    if "d" in results:
        rows = results["d"]["rows"]
        for m in dict.fromkeys(x["model"] for x in rows):
            n = max(x["devices"] for x in rows if x["model"] == m)
            by = {x["preset"]: x for x in rows if x["model"] == m and x["devices"] == n}
            line = (f"{m} on {n} devices: params + optimizer state per device {by['dp']['state_bytes'] / 2**20:,.0f} "
                    f"MiB replicated (dp) vs {by['fsdp']['state_bytes'] / 2**20:,.1f} MiB sharded (fsdp)")
            if "pp" in by:
                line += (f", {by['pp']['state_bytes'] / 2**20:,.0f} MiB over {by['pp']['mesh']['stage']} pipeline "
                         "stages (pp)")
            if by.get("pp", {}).get("bubble") is not None and by.get("pp_int", {}).get("bubble") is not None:
                line += (f"; pipeline bubble {by['pp']['bubble']:.1%} (GPipe, M {by['pp']['microbatches']}) vs "
                         f"{by['pp_int']['bubble']:.1%} interleaved (V {by['pp_int']['virtual_stages']})")
            line += "; collectives per step " + ", ".join(
                f"{k} {by[k]['collective_bytes'] / 2**20:,.0f} MiB" for k in STRATEGIES if k in by) + "."
            out.append(line)
    return out


def _conditions_text(c) -> str:
    if not isinstance(c, dict):
        return str(c)
    keys = ("machine", "load", "jax", "date", "command")
    return "; ".join(f"{k} {c[k]}" for k in keys if k in c)


def _virtual(row: dict) -> str:
    return f" (V {row['virtual_stages']})" if row.get("virtual_stages", 1) > 1 else ""


def markdown(results: dict) -> str:
    lines = ["# Transformer vs RNN, data vs model parallelism: measured", "",
             "Generated by experiments/study.py from study.json (edit neither by hand).", "",
             f"Conditions: {_conditions_text(results['conditions'])}", ""]
    lines += [f"Part {p} measured: {_conditions_text(results[p]['conditions'])}" for p in PARTS
              if p in results and "conditions" in results[p]] + [""]
    lines += [f"* {h}" for h in headlines(results)] + [""]
    if "a" in results:
        lines += ["## a. Train step vs sequence length", "",
                  "| T | batch | Transformer ms | LSTM ms | LSTM / Transformer |", "|---|---|---|---|---|"]
        lines += [f"| {x['T']} | {x['batch']} | {x['transformer_ms']:.1f} | {x['lstm_ms']:.1f} | "
                  f"{x['lstm_ms'] / x['transformer_ms']:.2f} |" for x in results["a"]["rows"]] + [""]
        fwd = results["a"].get("forward_one")
        if fwd:
            lines += ["One forward pass of one sequence (batch 1): the critical path, measured"
                      + (f" ({_conditions_text(fwd['conditions'])})" if "conditions" in fwd else ""), "",
                      "| T | Transformer ms | LSTM ms | LSTM / Transformer |", "|---|---|---|---|"]
            lines += [f"| {x['T']} | {x['transformer_ms']:.2f} | {x['lstm_ms']:.2f} | "
                      f"{x['lstm_ms'] / x['transformer_ms']:.2f} |" for x in fwd["rows"]] + [""]
    if "b" in results:
        lines += ["## b. Decode cost per token (ms, batch 1)", "", "| position | KV cache | no cache | LSTM |",
                  "|---|---|---|---|"]
        lines += [f"| {x['position']} | {x['cached_ms']:.3f} | {x['uncached_ms']:.3f} | {x['rnn_ms']:.3f} |"
                  for x in results["b"]["rows"]] + [""]
    if "c" in results:
        c = results["c"]
        lines += [f"## c. Equal training time (LM {c['seconds_lm']:.0f} s, numbers {c['seconds_numbers']:.0f} s each)",
                  "",
                  "| task | model | steps | result |", "|---|---|---|---|"]
        for key, metric in (("lm", "bits_per_byte"), ("numbers", "exact_match")):
            for name in ("transformer", "rnn"):
                x = c[f"{key}_{name}"]
                extra = f", BLEU {x['bleu']:.2f}" if "bleu" in x else ""
                lines.append(f"| {key} | {name} | {x['steps']} | {metric} {x[metric]:.4f}{extra} |")
        lines.append("")
    if "d" in results:
        lines += ["## d. Plan mode: per device", "", ("One device: every strategy is the same program (planned once). "
                                                      "pp and sp use the dp rules on a mesh with a `stage` / "
                                                      "`sequence` axis; pp_int runs the interleaved schedule with V "
                                                      "virtual stages, sp_zigzag the balanced causal ring."), "",
                  "| model | devices | strategy | mesh | microbatches | bubble | state MiB | peak MiB "
                  "| collective MiB |",
                  "|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {x['model']} | {x['devices']} | {x['preset']} | "
                  f"{' x '.join(f'{k}={v}' for k, v in x['mesh'].items() if v > 1) or '1'} | "
                  f"{x.get('microbatches') or '-'}{_virtual(x)} | "
                  f"{'-' if x.get('bubble') is None else format(x['bubble'], '.1%')} | "
                  f"{x['state_bytes'] / 2**20:,.1f} | "
                  f"{(x['peak_bytes'] or 0) / 2**20:,.1f} | {x['collective_bytes'] / 2**20:,.1f} |"
                  for x in results["d"]["rows"]] + [""]
        skipped = results["d"].get("skipped", [])
        if skipped:
            lines += ["Skipped or reduced (does not divide):", ""]
            lines += [f"* {x['model']}, {x['devices']} devices, {x['preset']}: {x['reason']}" for x in skipped] + [""]
    return "\n".join(lines)


PLOTS = {"a": ("train_step_vs_length.png", _plot_a), "b": ("decode_vs_position.png", _plot_b),
         "c": ("equal_time.png", _plot_c), "d": ("parallelism_plan.png", _plot_d)}


def write_report(results: dict, out: Path, record: Path | None = None, plots: bool = True) -> None:
    """The PNGs into `out`; the record (default `out`/study.json) and its report (.md) beside it."""
    from experiments import results as records

    out, record = Path(out), Path(record or Path(out) / "study.json")
    derive(results)
    if plots:
        out.mkdir(parents=True, exist_ok=True)
        for part, (name, plot) in PLOTS.items():
            if part in results:
                plot(results[part], out / name, results[part].get("conditions", results.get("conditions")))
    records.write(record, results)
    record.with_suffix(".md").write_text(markdown(results))


def derive(results: dict) -> dict:
    """Add the ratios and unit conversions the docs quote to the measured rows, in place, so a quoted
    figure can be tagged to its record (`experiments/results.py`): computed from the measured fields only."""
    a = results.get("a", {})
    for x in a.get("rows", []) + a.get("forward_one", {}).get("rows", []):
        x["lstm_over_transformer"] = x["lstm_ms"] / x["transformer_ms"]
    for x in results.get("b", {}).get("rows", []):
        x["cache_speedup"] = x["uncached_ms"] / x["cached_ms"]
        x["rnn_over_cached"] = x["rnn_ms"] / x["cached_ms"]
    for x in results.get("d", {}).get("rows", []):
        for key in ("state", "peak", "collective"):
            if x.get(f"{key}_bytes") is not None:
                x[f"{key}_mib"], x[f"{key}_gib"] = x[f"{key}_bytes"] / 2**20, x[f"{key}_bytes"] / 2**30
    return results


def replot(out: str | os.PathLike, record: str | os.PathLike | None = None) -> dict:
    """Re-render the PNGs and the report from a saved record, measuring nothing."""
    record = Path(record or Path(out) / "study.json")
    if not record.exists():
        raise ValueError(f"--replot: no record at {record}; measure first (drop --replot) or pass --record")
    results = json.loads(record.read_text())
    write_report(results, Path(out), record)
    return results


def run(out: str | os.PathLike, smoke: bool = False, parts: str = PARTS, train_seconds: float | None = None,
        settings: Settings | None = None, record: str | os.PathLike | None = None) -> dict:
    """Run the chosen parts, writing the report after each; returns every figure.

    `settings` replaces the full (or, with `smoke`, the tiny) settings, e.g. a shorter study in a notebook.
    `record`: the JSON of every figure (default `out`/study.json); each part keeps its own "conditions".
    """
    from experiments import results as records

    bad = sorted(set(parts) - set(PARTS))
    if bad:
        raise ValueError(f"--parts: unknown part(s) {bad}; choose from {PARTS!r}")
    s = settings or (SMOKE if smoke else FULL)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    record = Path(record or out / "study.json")
    results: dict = json.loads(record.read_text()) if parts != PARTS and record.exists() else {}
    conditions = records.conditions(settings="smoke" if smoke else "custom" if settings else "full")
    for part in PARTS:  # parts kept from an earlier run keep that run's conditions
        if part in results and "conditions" not in results[part] and "conditions" in results:
            results[part]["conditions"] = results["conditions"]
    results["conditions"] = conditions
    runners = {"a": lambda: part_a(s), "b": lambda: part_b(s), "d": lambda: part_d(s),
               "c": lambda: part_c(s, train_seconds)}
    for part in PARTS:
        if part in parts:
            t = time.time()
            results[part] = runners[part]()
            results[part]["wall_s"] = time.time() - t
            results[part]["conditions"] = conditions | {"load": records.conditions()["load"]}  # load when done
            results["wall_s"] = time.time() - started
            write_report(results, out, record)
    for line in headlines(results):
        print(line)
    print(f"study: {time.time() - started:.0f} s; wrote {record}, {record.with_suffix('.md').name} and the plots "
          f"in {out}")
    return results


def main(argv):
    del argv
    if FLAGS.plan_worker:
        plan_worker(FLAGS.plan_worker)
        return
    if FLAGS.out is None:
        raise app.UsageError("--out is required")
    try:
        if FLAGS.replot:
            replot(FLAGS.out, FLAGS.record)
            return
        if FLAGS.add_forward:
            add_forward(Path(FLAGS.record or Path(FLAGS.out) / "study.json"), Path(FLAGS.out), SMOKE if FLAGS.smoke
                        else FULL)
            return
        run(FLAGS.out, FLAGS.smoke, FLAGS.parts, FLAGS.train_seconds, record=FLAGS.record)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    define_flags()
    app.run(main)
