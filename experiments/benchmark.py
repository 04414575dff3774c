r"""Speed benchmark: training step and KV-cached generation, with the knobs that matter.

    python experiments/benchmark.py --model=cpu_tiny --what=train,decode
    python experiments/benchmark.py --model=gpt2_small --what=train --attention=cudnn --scan_layers=false
    python experiments/benchmark.py --model=cpu_tiny --override=num_layers=2 --override=remat=full

Prints one JSON line per figure on stdout (`what` = train | decode | compare)
and a readable table on stderr, so `... > figures.jsonl` keeps the data clean.
The same command runs on CPU, GPU and TPU: MFU and the decode roofline use a
table of known devices (tformer.flops.DEVICE_SPECS); elsewhere pass
`--peak_tflops` / `--hbm_gbps`, or only the absolute figures are reported.

`--peer=hf` / `--peer=nanogpt:<checkout>` alternates tformer's train step with a
PyTorch peer's on the same model (experiments/peers: Hugging Face GPT-2 eager, or
the model.py of a nanoGPT checkout; `pip install -e .[peers]`), blocks of steps
in turn for `--rounds` rounds, and prints both medians, the ratio and GFLOP/s
against this CPU's fp32 peak; `--out=docs/results/peer_<name>.json` records the pair.

`--peer_script` runs a peer (e.g. a Hugging Face GPT-2 script with `train`
and `decode` functions taking the same shape from SHAPE/BATCH/STEPS) in a
child process of the same run, so the ratio is measured under the same load.

This module needs only jax, flax, optax, numpy and absl.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
import typing
from pathlib import Path

if __package__ in (None, ""):  # `python experiments/benchmark.py`: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.extend
import numpy as np
from flax import nnx

import tformer
from experiments import results, timing
from tformer import batch as batch_lib
from tformer import flops, host, training
from tformer.attention import Masking, resolve_impl
from tformer.generate import decode_phases
from tformer.layers import DTYPE
from tformer.lora import LoraConfig
from tformer.plan import compiled_peak_bytes

# ---------------------------------------------------------------------------
# Workloads.


@dataclasses.dataclass(frozen=True)
class Preset:
    """A model shape and the workload it is benchmarked with."""

    model: dict
    batch: int
    seq_len: int
    decode_batches: tuple[int, ...]
    prompt_len: int
    new_tokens: int


PRESETS: dict[str, Preset] = {
    # The reference GPU workload: GPT-2 small, bf16 compute, fp32 master weights.
    "gpt2_small": Preset(
        model=dict(vocab_size=50257, d_model=768, num_heads=12, num_layers=12, max_len=1024,
                   bos_id=50256, eos_id=50256, pad_id=50256, dtype="bfloat16", param_dtype="float32"),
        batch=16, seq_len=1024, decode_batches=(1, 64), prompt_len=16, new_tokens=512,
    ),
    # The reference CPU workload (2-core CI machines), fp32.
    "cpu_tiny": Preset(
        model=dict(vocab_size=256, d_model=256, num_heads=4, num_layers=4, max_len=256),
        batch=8, seq_len=256, decode_batches=(1, 8), prompt_len=16, new_tokens=128,
    ),
}

# Config fields that change speed but not the function computed (plus the
# precisions); each has its own flag and is recorded in every JSON line.
KNOBS = ("attention", "scan_layers", "remat", "dtype", "param_dtype", "logits_dtype", "vocab_multiple")

# XLA flags that help on GPU. Command buffers (CUDA graphs) are on by default
# and worth ~2.5x at decode batch 1, so they are deliberately left alone.
GPU_XLA_FLAGS = ("--xla_gpu_enable_latency_hiding_scheduler=true",)


@dataclasses.dataclass
class Options:
    """Everything one benchmark run needs (the CLI flags, as data)."""

    model: str = "cpu_tiny"
    overrides: tuple[str, ...] = ()  # "field=value" for ModelConfig
    what: tuple[str, ...] = ("train",)
    batch: int | None = None  # None: the preset's
    seq_len: int | None = None
    steps: int = 10
    warmup: int = 2
    donate: bool = True
    skip_nonfinite: bool = False  # its select over every parameter is not free
    packed: bool = False  # rows of packed documents (segment ids, positions), as experiments/train.py feeds
    lora_rank: int = 0  # > 0: train LoRA adapters of this rank only (tformer.lora), the base weights frozen
    decode_batches: tuple[int, ...] | None = None
    prompt_len: int | None = None
    new_tokens: int | None = None
    cache_len: int | None = None  # None: prompt_len + new_tokens
    decode_chunk: int | None = None  # decode steps per phase (tformer.generate); None: its default
    decode_param_dtype: str | None = None  # None: the compute dtype (serving weights)
    decode_repeats: int = 3
    # Plant EOS so every row ends after this many new tokens (None: never stop): times the early stop.
    decode_eos_after: int | None = None
    peak_tflops: float | None = None
    hbm_gbps: float | None = None
    seed: int = 0
    xla_flags: str = ""  # recorded; applied by main() before the backend starts
    cpu_options: bool = True  # tformer.host.cpu_compiler_options for the train step (--cpu_xla_flags)
    # glibc keeps freed memory (tformer.host): recorded; applied by main() before the backend starts.
    tune_allocator: bool = False
    peer_tune_allocator: bool = False  # the same setting in the peer's child process


# ---------------------------------------------------------------------------
# Config from a preset + "key=value" overrides.


def _parse_value(name: str, raw: str, annotation: str):
    text = raw.strip()
    optional = "None" in annotation
    if optional and text.lower() == "none":
        return None
    base = annotation.replace("| None", "").replace("None |", "").strip()
    try:
        if base == "bool":
            if text.lower() in ("true", "1", "yes"):
                return True
            if text.lower() in ("false", "0", "no"):
                return False
            raise ValueError
        if base == "int":
            return int(text)
        if base == "float":
            return float(text)
    except ValueError:
        raise ValueError(f"--override {name}={raw}: expected a value of type {annotation}") from None
    return text


def parse_overrides(overrides: typing.Iterable[str]) -> dict:
    """["d_model=64", "scan_layers=true"] -> typed ModelConfig fields; unknown fields fail."""
    fields = {f.name: str(f.type) for f in dataclasses.fields(tformer.ModelConfig)}
    out = {}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--override expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        key = key.strip()
        if key not in fields:
            raise ValueError(f"--override: unknown ModelConfig field {key!r}; valid fields are {sorted(fields)}")
        out[key] = _parse_value(key, raw, fields[key])
    return out


def model_config(opts: Options) -> tformer.ModelConfig:
    if opts.model not in PRESETS:
        raise ValueError(f"--model={opts.model!r} is unknown; choose one of {sorted(PRESETS)}")
    kw = dict(PRESETS[opts.model].model)
    kw.update(parse_overrides(opts.overrides))
    seq = opts.seq_len or PRESETS[opts.model].seq_len
    kw["max_len"] = max(kw.get("max_len", 0), seq)
    return tformer.ModelConfig(**kw)


# ---------------------------------------------------------------------------
# Device facts.


def device_facts(opts: Options) -> dict:
    dev = jax.devices()[0]
    spec = flops.device_spec(dev.device_kind) if dev.platform != "cpu" else None
    peak = opts.peak_tflops if opts.peak_tflops else (spec.peak_tflops if spec else None)
    bw = opts.hbm_gbps * 1e9 if opts.hbm_gbps else (spec.hbm_bytes_per_s if spec else None)
    return dict(platform=dev.platform, device_kind=dev.device_kind, device_name=spec.name if spec else None,
                peak_tflops=peak, hbm_bytes_per_s=bw, jax_version=jax.__version__, host_cpus=os.cpu_count(),
                allocator_tuned=opts.tune_allocator)


def peak_memory_bytes(compiled) -> tuple[int | None, str]:
    """Peak device memory: the allocator's high-water mark where the device reports it, else XLA's plan."""
    stats = None
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # some backends do not implement it
        pass
    if stats and "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"]), "memory_stats"
    total = compiled_peak_bytes(compiled)
    return (None, "unavailable") if total is None else (total, "memory_analysis")


def _knobs(cfg: tformer.ModelConfig, opts: Options) -> dict:
    k = {name: getattr(cfg, name) for name in KNOBS}
    k.update(donate=opts.donate, skip_nonfinite=opts.skip_nonfinite, packed=opts.packed, xla_flags=opts.xla_flags)
    return k


def _round(x, sig=4):
    """`sig` significant figures: figures span 1e-4 ms rooflines to 1e3 ms CPU steps."""
    return None if x is None else float(f"{float(x):.{sig}g}")


# ---------------------------------------------------------------------------
# Training step.


def lm_batch(cfg: tformer.ModelConfig, batch: int, seq_len: int, seed: int, packed: bool = False) -> dict:
    """Random tokens; `packed` adds what a packed corpus row carries (documents of mean length `seq_len`):
    segment ids and positions restarting per document, so the step builds its mask from them."""
    rng = np.random.default_rng(seed)
    out = batch_lib.lm_batch(rng.integers(0, cfg.vocab_size, (batch, seq_len + 1)))
    if packed:
        starts_bt = rng.random((batch, seq_len)) < 1 / seq_len
        starts_bt[:, 0] = True
        cols_t = np.arange(seq_len)
        positions_bt = cols_t - np.maximum.accumulate(np.where(starts_bt, cols_t, 0), axis=1)
        out["segment_ids"] = jax.device_put(np.cumsum(starts_bt, axis=1).astype(np.int32))
        out["positions"] = jax.device_put(positions_bt.astype(np.int32))
    return out


def _minor_faults() -> int:
    """Host page faults of this process so far (0 where the OS does not say): see tformer.host."""
    try:
        import resource
    except ImportError:
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


@dataclasses.dataclass
class TrainRun:
    """A compiled train step with its state and batch: `block(n)` times n more steps (state carried on)."""

    cfg: tformer.ModelConfig
    batch_size: int
    seq_len: int
    compiled: typing.Any
    state: typing.Any
    batch: dict
    lower_s: float
    compile_s: float
    metrics: typing.Any = None
    compiler_options: dict = dataclasses.field(default_factory=dict)

    def block(self, steps: int, warmup: int = 0) -> tuple[list[float], list[int]]:
        """(seconds per timed step, host page faults per timed step), after `warmup` untimed steps."""
        for _ in range(warmup):
            self.state, self.metrics = self.compiled(self.state, self.batch)
        jax.block_until_ready(self.state)
        times, faults = [], []
        for _ in range(steps):
            f0 = _minor_faults()
            s0 = time.perf_counter()
            self.state, self.metrics = self.compiled(self.state, self.batch)
            jax.block_until_ready(self.state)
            times.append(time.perf_counter() - s0)
            faults.append(_minor_faults() - f0)
        return times, faults


def train_run(opts: Options) -> TrainRun:
    """Build, lower and compile the train step (AdamW, loss, grads) of the benchmark's model and batch."""
    cfg = model_config(opts)
    preset = PRESETS[opts.model]
    b, t = opts.batch or preset.batch, opts.seq_len or preset.seq_len
    o = training.OptimizerConfig(skip_nonfinite=opts.skip_nonfinite, warmup_steps=10, total_steps=10_000)
    lcfg = LoraConfig(opts.lora_rank) if opts.lora_rank else None
    graphdef, tx, state, _ = training.create_train_state(tformer.DecoderLM, cfg, o, seed=opts.seed, lora=lcfg)
    options = host.cpu_compiler_options(cfg.d_model) if opts.cpu_options else {}
    step = training.make_train_step(graphdef, tx, o, donate=opts.donate, compiler_options=options)
    batch = lm_batch(cfg, b, t, opts.seed, opts.packed)
    t0 = time.perf_counter()
    lowered = step.lower(state, batch)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    return TrainRun(cfg, b, t, compiled, state, batch, lower_s=t1 - t0, compile_s=t2 - t1, compiler_options=options)


def bench_train(opts: Options, dev: dict) -> dict:
    """Median wall time of one jitted train step (AdamW, loss, grads), compile timed apart."""
    run_ = train_run(opts)
    cfg, b, t, compiled, batch = run_.cfg, run_.batch_size, run_.seq_len, run_.compiled, run_.batch
    times, faults = run_.block(opts.steps, warmup=opts.warmup)
    step_s = statistics.median(times)
    tokens_per_s = b * t / step_s
    fpt = flops.train_flops_per_token(cfg, t)
    mem, mem_src = peak_memory_bytes(compiled)
    # What `attention="auto"|"flash"|"cudnn"|"blocked"` resolves to here for this call (causal T x T, no dropout;
    # packed rows carry one segment-id array for queries and keys).
    seg = batch.get("segment_ids")
    probe = Masking(q_pos=None, k_pos=None, q_seg=seg, k_seg=seg, plain_causal=seg is None)
    impl = resolve_impl(cfg, DTYPE[cfg.dtype], probe, training_dropout=False, seq_lens=(t, t))
    if impl == "cudnn" and "cudnn" not in compiled.as_text():
        impl = "xla (cudnn fell back)"
    return dict(
        what="train", system="tformer", model=opts.model, batch=b, seq_len=t,
        step_ms=_round(step_s * 1e3), step_ms_min=_round(min(times) * 1e3), steps=len(times),
        tokens_per_s=round(tokens_per_s),
        tflops=_round(flops.model_tflops(fpt, tokens_per_s)),
        mfu=_round(flops.mfu(fpt, tokens_per_s, dev["peak_tflops"])) if dev["peak_tflops"] else None,
        compile_s=_round(run_.compile_s), lower_s=_round(run_.lower_s), peak_memory_bytes=mem,
        memory_source=mem_src, host_page_faults_per_step=statistics.median(faults),
        flops_per_token=fpt, params=flops.param_count(cfg), loss=_round(run_.metrics["loss"]),
        attention_resolved=impl, lora_rank=opts.lora_rank, compiler_options=run_.compiler_options,
        **_knobs(cfg, opts), **dev,
    )


# ---------------------------------------------------------------------------
# Generation.


def plant_eos(model, position: int, seed: int) -> int:
    """Make every row emit EOS from the logits at `position` (learned positions, tied embeddings).

    That position's embedding gets a large component along a random unit
    direction u, and EOS's embedding row becomes u: after the final norm the
    hidden state there points along u, so EOS has the top logit in every row. Returns the EOS id.
    """
    cfg = model.cfg
    if cfg.positions != "learned" or not cfg.tie_embeddings:
        raise ValueError("--decode_eos_after needs positions=learned and tie_embeddings=true")
    u = np.random.default_rng(seed).standard_normal(cfg.d_model)
    u = (u - u.mean()) / np.linalg.norm(u - u.mean())
    emb = model.embed
    emb.pos_table[...] = emb.pos_table[...].at[position].add(100.0 * u.astype(np.float32))
    emb.table[...] = emb.table[...].at[cfg.eos_id].set(u.astype(np.float32))
    return cfg.eos_id


def bench_decode(opts: Options, dev: dict) -> list[dict]:
    """Greedy generation: prefill time, then per-step latency of the lax.scan decode loop.

    Decode time = (generate N tokens) - (generate 1 token, i.e. prefill + first
    sample), both end to end and steady-state, so per-call host work cancels.
    """
    preset = PRESETS[opts.model]
    cfg = model_config(opts)
    cfg = cfg.replace(param_dtype=opts.decode_param_dtype or cfg.dtype)
    p = opts.prompt_len or preset.prompt_len
    n = opts.new_tokens or preset.new_tokens
    if n < 2:
        raise ValueError(f"--new_tokens must be >= 2 to time decode steps apart from prefill, got {n}")
    cache_len = opts.cache_len or p + n
    if cache_len > cfg.max_len:
        cfg = cfg.replace(max_len=cache_len)
    model = tformer.DecoderLM(cfg, rngs=nnx.Rngs(opts.seed))
    eos_id = -1 if opts.decode_eos_after is None else plant_eos(model, p - 1 + opts.decode_eos_after - 1, opts.seed)
    param_bytes, kv_bytes = (np.dtype(DTYPE[name]).itemsize for name in (cfg.param_dtype, cfg.dtype))
    records = []
    for b in opts.decode_batches or preset.decode_batches:
        prompts = np.random.default_rng(opts.seed).integers(3, cfg.vocab_size, (b, p)).astype(np.int32)

        def run(k, prompts=prompts):
            decode = tformer.Decode(k, eos_id=eos_id, cache_len=cache_len, chunk=opts.decode_chunk)
            return tformer.generate(model, prompts, decode).tokens

        first_full = timing.seconds(lambda: run(n))  # compile + run
        first_pre = timing.seconds(lambda: run(1))
        # Best of the repeats, the two alternated so a slow spell of the machine falls on both: latency noise
        # (other processes) only ever adds time.
        pairs = [(timing.seconds(lambda: run(n)), timing.seconds(lambda: run(1))) for _ in range(opts.decode_repeats)]
        full, pre = (min(column) for column in zip(*pairs))
        phases = decode_phases(p, n, cache_len, opts.decode_chunk)
        slots = round(sum((hi - lo) * vis for lo, hi, vis in phases) / (n - 1)) if phases else cache_len
        nbytes = flops.decode_bytes_per_step(cfg, b, slots, param_bytes, kv_bytes)
        roof = flops.roofline_ms(nbytes, dev["hbm_bytes_per_s"]) if dev["hbm_bytes_per_s"] else None
        rec = dict(
            what="decode", system="tformer", model=opts.model, batch=b, prompt_len=p, new_tokens=n,
            cache_len=cache_len, decode_chunk=opts.decode_chunk, decode_phases=len(phases), kv_slots_read=slots,
            ms_per_token=None, tokens_per_s=None, tflops=None, mfu=None,
            prefill_ms=_round(pre * 1e3), e2e_ms_per_step=_round(full / n * 1e3), e2e_ms=_round(full * 1e3),
            eos_after=opts.decode_eos_after, compile_s=_round(first_full - full + first_pre - pre),
            bytes_per_step=nbytes,
            roofline_ms=_round(roof), roofline_ratio=None, params=flops.param_count(cfg), **_knobs(cfg, opts),
            **dev,
        )
        records.append(_with_step_figures(rec, cfg, dev, full, pre, roof))
    return records


def _with_step_figures(rec: dict, cfg, dev: dict, full: float, pre: float, roof: float | None) -> dict:
    """`rec` plus the per-step decode figures, from N-token and 1-token generate times (or why there are none)."""
    b, p, n = rec["batch"], rec["prompt_len"], rec["new_tokens"]
    if rec["eos_after"] is not None:
        rec["error"] = "rows stop early: per-step figures do not apply, see e2e_ms"
    elif full > pre:
        step_s = (full - pre) / (n - 1)
        tokens_per_s, fpt = b / step_s, flops.decode_flops_per_token(cfg, p + n / 2)
        rec.update(
            ms_per_token=_round(step_s * 1e3), tokens_per_s=round(tokens_per_s),
            tflops=_round(flops.model_tflops(fpt, tokens_per_s)),
            mfu=_round(flops.mfu(fpt, tokens_per_s, dev["peak_tflops"])) if dev["peak_tflops"] else None,
            roofline_ratio=_round(step_s * 1e3 / roof) if roof else None,
        )
    else:
        rec["error"] = "decode time is below the timer's noise; raise --new_tokens"
    return rec


# ---------------------------------------------------------------------------
# Peer (run in a child process, same shape, same machine, same run).

_PEER_RUNNER = r"""
import json, os, runpy, sys
if os.environ.get("TFORMER_PEER_TUNE_ALLOCATOR") == "1":
    from tformer import host
    host.tune_allocator()
g = runpy.run_path(sys.argv[1], run_name="tformer_peer")
for job in json.loads(sys.argv[2]):
    try:
        g[job["fn"]](*job["args"], **job["kw"])
    except Exception as e:  # report and keep going
        print(json.dumps(dict(what=job["fn"], error=repr(e)[:300], job=job)), flush=True)
"""

PEER_MODES = ("train", "train_compiled", "decode", "decode_static")


def run_peer(script: str, modes: typing.Sequence[str], opts: Options) -> list[dict]:
    """Run `script`'s train(compile_model, B=, steps=) / decode(static, B=, prompt=, new=) in a child process."""
    if not Path(script).is_file():
        raise ValueError(f"--peer_script={script!r} does not exist; pass the path of a peer benchmark script")
    bad = sorted(set(modes) - set(PEER_MODES))
    if bad:
        raise ValueError(f"--peer_modes: unknown {bad}; choose from {PEER_MODES}")
    cfg, preset = model_config(opts), PRESETS[opts.model]
    b, t = opts.batch or preset.batch, opts.seq_len or preset.seq_len
    p, n = opts.prompt_len or preset.prompt_len, opts.new_tokens or preset.new_tokens
    # The peer takes its sequence length (and positions table) from SHAPE, so train
    # runs at the train length and decode in a second child sized for prompt + new.
    groups: dict[int, list] = {}
    for m in modes:
        if m.startswith("train"):
            job = dict(fn="train", args=[m == "train_compiled"], kw=dict(B=b, steps=opts.steps))
            groups.setdefault(t, []).append(job)
        else:
            for db in opts.decode_batches or preset.decode_batches:
                groups.setdefault(max(t, p + n), []).append(
                    dict(fn="decode", args=[m == "decode_static"], kw=dict(B=db, prompt=p, new=n)))
    out = []
    for seq, jobs in groups.items():
        out += _peer_child(script, jobs, f"{cfg.padded_vocab},{seq},{cfg.d_model},{cfg.num_layers},{cfg.num_heads}",
                           b, opts.steps, opts.peer_tune_allocator)
    return out


def _peer_child(script: str, jobs: list, shape: str, batch: int, steps: int, tune_allocator: bool) -> list[dict]:
    env = dict(os.environ, SHAPE=shape, BATCH=str(batch), STEPS=str(steps),
               TFORMER_PEER_TUNE_ALLOCATOR="1" if tune_allocator else "0",
               PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                        os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-c", _PEER_RUNNER, script, json.dumps(jobs)], env=env,
                          capture_output=True, text=True)
    out = []
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            rec = json.loads(line)
            rec.setdefault("system", rec.pop("peer", Path(script).stem))
            rec["allocator_tuned"] = tune_allocator
            if rec.get("what") == "train_step":
                rec["what"] = "train"
            out.append(rec)
    if proc.returncode != 0 or not out:
        out.append(dict(what="peer", system=Path(script).stem, error=f"exit {proc.returncode}: {proc.stderr[-500:]}"))
    return out


def compare(records: list[dict]) -> list[dict]:
    """tformer vs peer train step: speedup = peer ms / tformer ms, per round and the median over rounds.

    Rounds alternate tformer and the peer, so on a shared, noisy machine each
    ratio compares runs made under (nearly) the same load.
    """
    def train(r):
        return r.get("what") == "train" and "step_ms" in r

    ours = {r.get("round", 0): r for r in records if r.get("system") == "tformer" and train(r)}
    out, by_peer = [], {}
    for p in records:
        if p.get("system") == "tformer" or not train(p) or p.get("round", 0) not in ours:
            continue
        o = ours[p.get("round", 0)]
        rec = dict(what="compare", system="tformer", peer=p["system"], peer_compiled=p.get("compiled"),
                   round=p.get("round", 0), tformer_step_ms=o["step_ms"], peer_step_ms=p["step_ms"],
                   speedup=_round(p["step_ms"] / o["step_ms"]),
                   allocator_tuned=o.get("allocator_tuned"), peer_allocator_tuned=p.get("allocator_tuned"))
        out.append(rec)
        by_peer.setdefault((p["system"], p.get("compiled")), []).append(rec)
    for (name, compiled), recs in by_peer.items():
        if len(recs) > 1:
            out.append(dict(what="compare", system="tformer", peer=name, peer_compiled=compiled, round="median",
                            tformer_step_ms=statistics.median(r["tformer_step_ms"] for r in recs),
                            peer_step_ms=statistics.median(r["peer_step_ms"] for r in recs),
                            speedup=_round(statistics.median(r["speedup"] for r in recs)),
                            allocator_tuned=recs[0]["allocator_tuned"],
                            peer_allocator_tuned=recs[0]["peer_allocator_tuned"]))
    return out


# ---------------------------------------------------------------------------
# PyTorch peers in a persistent child process (experiments/peers), alternated with tformer step by block.


def cpu_peak() -> dict | None:
    """This machine's nominal fp32 peak (tformer.flops.cpu_fp32_peak over the CPUs this process may use)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    peak = flops.cpu_fp32_peak(text)
    if peak and hasattr(os, "sched_getaffinity") and len(os.sched_getaffinity(0)) < peak["cores"]:
        peak = flops.cpu_fp32_peak(text, cores=len(os.sched_getaffinity(0)))
    return peak


def _stats(ms: list[float]) -> dict:
    return dict(median=_round(statistics.median(ms)), min=_round(min(ms)), max=_round(max(ms)), n=len(ms))


def _alternate(run_: TrainRun, child, steps: int, warmup: int, rounds: int):
    """Blocks of `steps` tformer and peer steps in turn: (tformer ms, peer ms, per-round ratios, CPU ms per step
    of each side per block, 1-minute load before and after each round)."""
    load = [os.getloadavg()[0]]
    ours, theirs, ratios, cpu = [], [], [], {"tformer": [], "peer": []}

    def tformer_block(warm: int) -> list[float]:
        c0 = time.process_time()
        with child.stopped():
            ms = [x * 1e3 for x in run_.block(steps, warm)[0]]
        cpu["tformer"].append((time.process_time() - c0) * 1e3 / steps)
        return ms

    def peer_block(warm: int) -> list[float]:
        got = child.block(steps, warm)
        cpu["peer"].append(got["cpu_ms"])
        return got["times_ms"]

    for r in range(rounds):
        warm = warmup if r == 0 else 0
        if r % 2 == 0:
            a, b = tformer_block(warm), peer_block(warm)
        else:
            b, a = peer_block(warm), tformer_block(warm)
        ours += a
        theirs += b
        ratios.append(statistics.median(b) / statistics.median(a))
        load.append(os.getloadavg()[0])
    return ours, theirs, ratios, cpu, load


def bench_pair(opts: Options, dev: dict, peer: str, rounds: int) -> dict:
    """tformer's train step against a PyTorch peer's on the same shape, alternated in blocks of `opts.steps`.

    Round r runs a block of tformer steps and a block of peer steps (tformer first in even rounds, the peer
    first in odd ones, so a drift in load falls on both). `speedup` = peer median / tformer median over all
    timed steps; `speedup_rounds` the same per round; `speedup_cpu` the ratio of the processes' CPU time per
    step (medians over blocks), which other processes on a shared machine distort less than wall time.
    GFLOP/s use the model FLOPs of the shape with its real (unpadded) vocabulary, the same count for both.
    """
    from experiments import peers

    name, arg = peers.parse_peer(peer)
    run_ = train_run(opts)
    shape = peers.shape_for(name, run_.cfg, run_.batch_size, run_.seq_len, opts.seed)
    child = peers.PeerProcess(name, arg, shape, opts.peer_tune_allocator)
    try:
        ours, theirs, ratios, cpu, load = _alternate(run_, child, opts.steps, opts.warmup, rounds)
    finally:
        child.close()
    step_flops = flops.train_flops_per_token(run_.cfg.replace(vocab_multiple=1), run_.seq_len) * \
        run_.batch_size * run_.seq_len
    peak = cpu_peak() if dev["platform"] == "cpu" else None
    t_med, p_med = statistics.median(ours), statistics.median(theirs)
    rec = dict(what="pair", system="tformer", peer=name, model=opts.model, batch=run_.batch_size,
               seq_len=run_.seq_len, rounds=rounds, steps_per_round=opts.steps, warmup=opts.warmup,
               tformer_step_ms=_stats(ours), peer_step_ms=_stats(theirs), speedup=_round(p_med / t_med),
               speedup_rounds=[_round(x) for x in ratios], flops_per_step=step_flops,
               tformer_cpu_ms=_round(statistics.median(cpu["tformer"])),
               peer_cpu_ms=_round(statistics.median(cpu["peer"])),
               speedup_cpu=_round(statistics.median(cpu["peer"]) / statistics.median(cpu["tformer"])),
               tformer_gflops=_round(step_flops / t_med / 1e6), peer_gflops=_round(step_flops / p_med / 1e6),
               cpu_peak_gflops=peak and peak["gflops"], cpu_peak_how=peak and peak["how"],
               tformer_fraction_of_peak=_round(step_flops / t_med / 1e6 / peak["gflops"]) if peak else None,
               load_1min=[round(x, 2) for x in load], tformer_loss=_round(run_.metrics["loss"]),
               compile_s=_round(run_.compile_s), peer_info=child.info, peer_shape=dataclasses.asdict(shape),
               compiler_options=run_.compiler_options, **_knobs(run_.cfg, opts), **dev)
    return rec


def pair_conditions(rec: dict) -> dict:
    """What a pair was measured under (experiments.results.conditions): machine, instruction set, load during
    the run, versions, date, and the command (a nanoGPT checkout's path left out: it is the user's)."""
    peak = cpu_peak() or {}
    argv = [("--peer=nanogpt:<nanoGPT checkout>" if a.startswith("--peer=nanogpt:") else a) for a in sys.argv[1:]]
    info = rec.get("peer_info", {})
    return results.conditions(
        command="python experiments/benchmark.py " + " ".join(argv), cores=peak.get("cores", os.cpu_count()),
        avx2=peak.get("avx2"), avx512=peak.get("avx512"), cpu_peak_gflops=peak.get("gflops"),
        cpu_peak_how=peak.get("how"), load_during_run=rec.get("load_1min"),
        load_during_run_note="1-minute load average before the first round and after each (the run itself "
                             "keeps about 2 threads busy)",
        torch=info.get("torch"), transformers=info.get("transformers"), torch_threads=info.get("threads"))


def write_result(path: str, rec: dict) -> None:
    """Write the pair and its conditions to `path` (a docs/results record, experiments.results.write)."""
    results.write(path, dict(conditions=pair_conditions(rec), pair={k: v for k, v in rec.items() if k != "what"}))


def pair_summary(rec: dict) -> str:
    """The pair in words: both medians and minima, the ratio, GFLOP/s against the CPU's peak."""
    ours, theirs = rec["tformer_step_ms"], rec["peer_step_ms"]
    peak = (f"; this CPU's fp32 peak {rec['cpu_peak_gflops']} GFLOP/s ({rec['cpu_peak_how']}): tformer at "
            f"{rec['tformer_fraction_of_peak']:.0%}" if rec.get("cpu_peak_gflops") else "")
    return (f"tformer {ours['median']} ms median ({ours['min']} min) vs {rec['peer']} {theirs['median']} ms "
            f"({theirs['min']} min) per step, {rec['rounds']} x {rec['steps_per_round']} steps alternated: "
            f"speedup {rec['speedup']}x (per round {rec['speedup_rounds']}); model GFLOP/s {rec['tformer_gflops']} "
            f"vs {rec['peer_gflops']}{peak}; CPU time per step {rec['tformer_cpu_ms']} vs {rec['peer_cpu_ms']} ms "
            f"({rec['speedup_cpu']}x); load (1 min) {rec['load_1min']}")


# ---------------------------------------------------------------------------
# Driver.


def run(opts: Options, peer_script: str | None = None, peer_modes: typing.Sequence[str] = ("train",),
        emit=None, rounds: int = 1, peer: str | None = None) -> list[dict]:
    """Run the requested benchmarks; `emit(record)` is called as each figure is ready.

    With a peer script, the train figures of tformer and of the peer alternate for
    `rounds` rounds (each figure tagged with its `round`). With `peer` ("hf" or
    "nanogpt:<checkout>", experiments/peers) the train figure is one `pair` record
    of blocks of steps alternated with that peer's for `rounds` rounds.
    """
    if rounds < 1:
        raise ValueError(f"--rounds must be >= 1, got {rounds}")
    bad = sorted(set(opts.what) - {"train", "decode"})
    if bad:
        raise ValueError(f"--what: unknown {bad}; choose train and/or decode")
    emit = emit or (lambda r: None)
    dev = device_facts(opts)
    records = []

    def add(rs):
        for r in rs:
            records.append(r)
            emit(r)

    train_modes = [m for m in peer_modes if m.startswith("train")]
    other_modes = [m for m in peer_modes if not m.startswith("train")]
    for r in range(rounds if peer_script else 1):
        def tag(rs, r=r):
            return [dict(x, round=r) for x in rs] if rounds > 1 else rs

        if "train" in opts.what and peer:
            add([bench_pair(opts, dev, peer, rounds)])
        elif "train" in opts.what:
            add(tag([bench_train(opts, dev)]))
        if peer_script and train_modes:
            add(tag(run_peer(peer_script, train_modes, opts)))
    if "decode" in opts.what:
        add(bench_decode(opts, dev))
    if peer_script and other_modes:
        add(run_peer(peer_script, other_modes, opts))
    if peer_script:
        add(compare(records))
    return records


def table(records: list[dict]) -> str:
    """A readable summary, one row per figure."""
    cols = ("system", "what", "round", "batch", "step_ms", "ms_per_token", "e2e_ms_per_step", "tokens_per_s",
            "tflops", "mfu", "compile_s", "roofline_ms", "speedup", "attention_resolved", "scan_layers", "remat")
    # Peers report end-to-end generate time per step as `ms_per_step`.
    records_ = [dict(r, e2e_ms_per_step=r.get("e2e_ms_per_step", r.get("ms_per_step"))) for r in records]
    rows = [[("" if r.get(c) is None else str(r.get(c, ""))) for c in cols] for r in records_]
    for r, row in zip(records, rows):
        if "error" in r:
            row[-1] = "error: " + str(r["error"])[:80]
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
    def fmt(row):
        return "  ".join(v.ljust(w) for v, w in zip(row, widths))
    return "\n".join([fmt(cols), fmt(["-" * w for w in widths]), *map(fmt, rows)])


# ---------------------------------------------------------------------------
# Command line (flags defined only when run as a script).


def define_flags(fv=None) -> None:
    from absl import flags

    fv = fv if fv is not None else flags.FLAGS
    d = dict(flag_values=fv)
    flags.DEFINE_enum("model", "cpu_tiny", sorted(PRESETS), "Workload preset.", **d)
    flags.DEFINE_multi_string("override", [], "ModelConfig field=value (repeatable).", **d)
    flags.DEFINE_list("what", ["train"], "Benchmarks: train, decode.", **d)
    flags.DEFINE_integer("batch", None, "Train batch (default: the preset's).", **d)
    flags.DEFINE_integer("seq_len", None, "Train sequence length (default: the preset's).", **d)
    flags.DEFINE_integer("steps", 10, "Timed train steps (median reported).", **d)
    flags.DEFINE_integer("warmup", 2, "Untimed train steps after compilation.", **d)
    flags.DEFINE_enum("attention", None, list(tformer.config.ATTENTION_IMPLS), "Attention implementation.", **d)
    flags.DEFINE_bool("scan_layers", None, "lax.scan over layers (true) or unrolled (false).", **d)
    flags.DEFINE_enum("remat", None, ["none", "full", "dots", "dots_no_batch"], "Rematerialisation policy.", **d)
    flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"], "Compute dtype.", **d)
    flags.DEFINE_enum("logits_dtype", None, ["float32", "bfloat16", "float16"], "Logits dtype.", **d)
    flags.DEFINE_integer("vocab_multiple", None, "Pad the vocabulary to a multiple of this.", **d)
    flags.DEFINE_bool("donate", True, "Donate the train state to the step (update in place).", **d)
    flags.DEFINE_bool("skip_nonfinite", False, "Guard the update against non-finite loss (costs a select).", **d)
    flags.DEFINE_integer("lora_rank", 0, "Train LoRA adapters of this rank only (0: every parameter).", **d)
    flags.DEFINE_bool("packed", False, "Train on packed rows (segment ids, positions), as experiments/train.py does.",
                      **d)
    flags.DEFINE_list("decode_batches", None, "Decode batch sizes (default: the preset's).", **d)
    flags.DEFINE_integer("prompt_len", None, "Decode prompt length.", **d)
    flags.DEFINE_integer("new_tokens", None, "Decode new tokens.", **d)
    flags.DEFINE_integer("cache_len", None, "KV cache slots (default: prompt_len + new_tokens).", **d)
    flags.DEFINE_integer("decode_chunk", None, "Decode steps per phase; a phase reads only the cache slots "
                         "filled by its end (default: tformer.generate's).", **d)
    flags.DEFINE_enum("decode_param_dtype", None, ["float32", "bfloat16", "float16"],
                      "Decode weights dtype (default: the compute dtype).", **d)
    flags.DEFINE_integer("decode_repeats", 3, "Timed generate calls per figure (median).", **d)
    flags.DEFINE_integer("decode_eos_after", None, "Plant EOS so every decode row ends after this many new "
                         "tokens (times the early stop; needs learned positions, tied embeddings).", **d)
    flags.DEFINE_float("peak_tflops", None, "Device peak TFLOP/s for MFU (default: known-device table).", **d)
    flags.DEFINE_float("hbm_gbps", None, "Memory bandwidth GB/s for the roofline (default: table).", **d)
    flags.DEFINE_integer("seed", 0, "Seed for weights and data.", **d)
    flags.DEFINE_string("xla_flags", "", "Extra XLA_FLAGS, set before the backend starts.", **d)
    flags.DEFINE_bool("tune_allocator", True, "Keep freed host memory in the process (tformer.host): a CPU "
                      "step then faults no pages. Also applied to the peer unless --peer_tune_allocator=false.", **d)
    flags.DEFINE_bool("peer_tune_allocator", None, "The allocator setting for the peer (default: the same).", **d)
    flags.DEFINE_bool("cpu_xla_flags", True, f"Add {' '.join(host.CPU_XLA_FLAGS)} (as experiments/train.py does; "
                      "ignored off CPU) unless XLA_FLAGS sets them.", **d)
    flags.DEFINE_bool("gpu_xla_flags", True, f"Add {' '.join(GPU_XLA_FLAGS)} (ignored off GPU).", **d)
    flags.DEFINE_string("peer", None, "PyTorch peer whose train step alternates with tformer's in this run: "
                        "hf (Hugging Face GPT-2, eager) or nanogpt:<path of a nanoGPT checkout>; needs .[peers].", **d)
    flags.DEFINE_string("out", None, "With --peer: write the pair and its conditions to this JSON record "
                        "(e.g. docs/results/peer_nanogpt.json).", **d)
    flags.DEFINE_string("peer_script", None, "Peer benchmark script to run in the same run (optional).", **d)
    flags.DEFINE_list("peer_modes", ["train"], f"Peer figures: {', '.join(PEER_MODES)}.", **d)
    flags.DEFINE_integer("rounds", 1, "With --peer or --peer_script: alternate tformer and peer train figures "
                         "N times.", **d)
    flags.DEFINE_string("json_out", None, "Also append the JSON lines to this file.", **d)


def options_from_flags(fv) -> Options:
    overrides = []
    for name in KNOBS:
        v = getattr(fv, name, None)
        if v is not None:
            overrides.append(f"{name}={v}")
    overrides += list(fv.override)
    cpu = [f for f in host.CPU_XLA_FLAGS if f.split("=")[0] not in os.environ.get("XLA_FLAGS", "")]
    xla = " ".join(([*GPU_XLA_FLAGS] if fv.gpu_xla_flags else []) + (cpu if fv.cpu_xla_flags else [])
                   + ([fv.xla_flags] if fv.xla_flags else []))
    return Options(
        model=fv.model, overrides=tuple(overrides), what=tuple(fv.what), batch=fv.batch, seq_len=fv.seq_len,
        steps=fv.steps, warmup=fv.warmup, donate=fv.donate, skip_nonfinite=fv.skip_nonfinite, packed=fv.packed,
        lora_rank=fv.lora_rank,
        decode_batches=tuple(int(x) for x in fv.decode_batches) if fv.decode_batches else None,
        prompt_len=fv.prompt_len, new_tokens=fv.new_tokens, cache_len=fv.cache_len, decode_chunk=fv.decode_chunk,
        decode_param_dtype=fv.decode_param_dtype, decode_repeats=fv.decode_repeats,
        decode_eos_after=fv.decode_eos_after,
        peak_tflops=fv.peak_tflops, hbm_gbps=fv.hbm_gbps, seed=fv.seed, xla_flags=xla,
        tune_allocator=fv.tune_allocator, cpu_options=fv.cpu_xla_flags,
        peer_tune_allocator=fv.tune_allocator if fv.peer_tune_allocator is None else fv.peer_tune_allocator,
    )


def _backend_started() -> bool:
    """Whether jax has created a backend (after which XLA_FLAGS are ignored).

    `jax.extend.backend.get_backend` is the public entry every device query goes
    through, and it caches the backends it creates: a non-empty cache means
    started. (Asking `jax.devices()` would start the backend itself.)
    """
    return jax.extend.backend.get_backend.cache_info().currsize > 0


def apply_xla_flags(extra: str) -> None:
    """Append to XLA_FLAGS; only effective before the first device query, so refuse afterwards."""
    if not extra:
        return
    if _backend_started():
        raise RuntimeError(
            "--xla_flags must be applied before jax starts its backend; run the benchmark in a fresh process")
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {extra}".strip()


def main(argv) -> None:
    from absl import flags

    del argv
    fv = flags.FLAGS
    opts = options_from_flags(fv)
    apply_xla_flags(opts.xla_flags)
    if opts.tune_allocator and not host.tune_allocator():
        opts = dataclasses.replace(opts, tune_allocator=False)  # not glibc: record what really ran
    sink = open(fv.json_out, "a") if fv.json_out else None

    def emit(rec):
        line = json.dumps(rec, default=str)
        print(line, flush=True)
        if sink:
            sink.write(line + "\n")
            sink.flush()

    if fv.peer and fv.peer_script:
        raise ValueError("--peer and --peer_script are two ways to run a peer: pass one of them")
    if fv.out and not fv.peer:
        raise ValueError("--out records a peer pair: pass --peer=hf or --peer=nanogpt:<checkout> with it")
    records = run(opts, peer_script=fv.peer_script, peer_modes=fv.peer_modes, emit=emit, rounds=fv.rounds,
                  peer=fv.peer)
    print(table(records), file=sys.stderr, flush=True)
    for rec in records:
        if rec.get("what") == "pair":
            print(pair_summary(rec), file=sys.stderr, flush=True)
            if fv.out:
                write_result(fv.out, rec)
    if sink:
        sink.close()


if __name__ == "__main__":
    from absl import app

    define_flags()
    app.run(main)
