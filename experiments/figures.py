r"""The docs' pictures beyond the study's: each has a function that measures (or derives) its data into a
record under docs/results/ and a function that draws the record, so a plot can be redone without measuring.

    python experiments/figures.py --measure=curves,variants,schedule,placement   # records + PNGs
    python experiments/figures.py                                                # PNGs from the records only

  curves     train and validation curves of lm_tiny and seq2seq_tiny (train.py's metrics.jsonl of one run
             each) -> docs/results/{lm_tiny,seq2seq_tiny}.json, docs/figures/training_curves.png
  variants   the cheaper attention variants' train-step time and compiled temporary memory vs sequence
             length -> docs/results/variants_vs_length.json, docs/figures/variants_vs_length.png
  schedule   GPipe and interleaved pipeline schedules, tick by tick, from tformer.pipeline's own schedule
             -> docs/results/pipeline_schedule.json, docs/figures/pipeline_schedule.png
  placement  which shard of which weight lives on which device for data x tensor and fsdp x tensor meshes,
             from tformer.sharding's rules on a tiny model (8 fake CPU devices, in a subprocess)
             -> docs/results/weight_placement.json, docs/figures/weight_placement.png
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # `python experiments/figures.py`: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from absl import app, flags

from experiments import plotstyle
from experiments import results as records

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ["curves", "variants", "schedule", "placement"]
FLAGS = flags.FLAGS


def define_flags() -> None:
    flags.DEFINE_list("measure", [], f"Figures whose records to measure first (of {FIGURES}); the others are "
                      "drawn from their records under --results.")
    flags.DEFINE_list("only", FIGURES, "Figures to draw.")
    flags.DEFINE_string("results", str(ROOT / "docs" / "results"), "Folder of the records.")
    flags.DEFINE_string("out", str(ROOT / "docs" / "figures"), "Folder of the PNGs.")
    flags.DEFINE_string("runs", str(ROOT / "runs"), "curves: the training runs' workdirs (kept for inspection).")


# ---------------------------------------------------------------------------
# Train and validation curves of the tiny configs.

CURVE_RUNS = {  # name: overrides (more frequent logs and evals than the config's, for a curve)
    "lm_tiny": ["--config.train.log_every=10", "--config.train.eval_every=50"],
    "seq2seq_tiny": ["--config.train.log_every=20", "--config.train.eval_every=150"],
}


def train_command(name: str, workdir: str) -> list[str]:
    return ["python", "experiments/train.py", f"--config=experiments/configs/{name}.py", f"--workdir={workdir}",
            *CURVE_RUNS[name]]


def curve_record(name: str, workdir: str | os.PathLike, command: str, wall_s: float | None = None) -> dict:
    """The record of one training run, from its workdir's metrics.jsonl and final_metrics.json."""
    from experiments.metrics import read_metrics

    rows = read_metrics(workdir)
    final = json.loads((Path(workdir) / "final_metrics.json").read_text())
    train = {r["step"]: r for r in rows if r.get("split") == "train"}  # a resumed run's later line wins
    evals = {r["step"]: r for r in rows if r.get("split") == "eval"}
    evals[final["step"]] = {"step": final["step"], **final}
    keep = ("loss", "bits_per_byte", "accuracy", "exact_match", "bleu")
    return {"conditions": records.conditions(command=command, run_wall_s=wall_s),
            "config": f"experiments/configs/{name}.py", "loss_unit": "nats per token",
            "train": [{"step": s, "loss": train[s]["loss"], "tokens_per_s": train[s].get("tokens_per_s")}
                      for s in sorted(train)],
            "eval": [{k: v for k, v in evals[s].items() if k == "step" or k in keep} for s in sorted(evals)],
            "final": final, "train_seconds": rows[-1]["time"] - rows[0]["time"] if rows else None}


def measure_curves(results: Path, runs: Path) -> None:
    """Train each tiny config once (a fresh workdir) and record its curves."""
    for name in CURVE_RUNS:
        workdir = runs / name
        if workdir.exists():
            raise ValueError(f"curves: {workdir} exists; remove it (a resumed run would not be a fresh curve)")
        cmd = train_command(name, str(workdir))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
        start = time.time()
        subprocess.run([sys.executable, *cmd[1:]], cwd=ROOT, env=env, check=True)
        shown = train_command(name, f"runs/{name}")
        records.write(results / f"{name}.json", curve_record(name, workdir, " ".join(shown), time.time() - start))


def plot_curves(lm: dict, s2s: dict, path: Path) -> None:
    """Train loss and validation loss (bits per byte: byte tokenizer) of both runs; validation quality."""
    import math

    fig, axes = plotstyle.figure(2, height=5.0)
    for ax, rec, what in ((axes[0], lm, "lm_tiny: byte-level LM on the Python stdlib"),
                          (axes[1], s2s, "seq2seq_tiny: numbers, digits to English words")):
        # One scored token per byte (byte tokenizer; a document's EOS counts as its byte): bits = nats / ln 2.
        bits = 1 / math.log(2)
        ax.plot([r["step"] for r in rec["train"]], [r["loss"] * bits for r in rec["train"]], "-", alpha=0.8,
                label="training batch (the logged step's)")
        ax.plot([r["step"] for r in rec["eval"]], [r["loss"] * bits for r in rec["eval"]], "o-",
                label="validation set")
        f = rec["final"]
        result = (f"validation {f['bits_per_byte']:.3f} bits per byte" if "bits_per_byte" in f else
                  f"validation exact match {f['exact_match']:.1%}, BLEU {f['bleu']:.1f}")
        ax.set(xlabel="training step", ylabel="loss (bits per byte)",
               title=f"{what}\n{f['step']:,} steps, {result}")
        if s2s is rec:
            plotstyle.log_axis(ax, "y")
        ax.legend()
    plotstyle.title(fig, "Training curves of the tiny configs (one run each)", lm["conditions"])
    plotstyle.save(fig, path)


# ---------------------------------------------------------------------------
# The cheaper variants' speed and memory vs sequence length (experiments/variants.py measures).

VARIANT_LENGTHS = "256,512,1024,2048"
VARIANT_WORDS = {("decoder", "dense"): "dense causal", ("decoder", "window64"): "banded, local_window=64",
                 ("decoder", "topk32"): "top-k, attention_topk=32", ("encoder", "dense"): "dense",
                 ("encoder", "linformer32"): "Linformer, lowrank_dim=32",
                 ("encoder", "nystrom32"): "Nystrom, 32 landmarks"}


def measure_variants(results: Path) -> None:
    out = results / "variants_vs_length.json"
    cmd = ["python", "experiments/variants.py", "--what=length_sweep", f"--lengths={VARIANT_LENGTHS}", "--rounds=5",
           f"--out={out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    subprocess.run([sys.executable, *cmd[1:]], cwd=ROOT, env=env, check=True)


def plot_variants(rec: dict, path: Path) -> None:
    """Time and compiled temporary memory vs length: decoder train steps (top), encoder steps (bottom)."""
    fig, axes = plotstyle.figure(2, 2, height=4.2)
    for (ax_t, ax_m), where in zip(axes, ("decoder", "encoder")):
        rows = [r for r in rec["rows"] if r["what"] == f"{where}_step"]
        lengths = sorted({r["seq_len"] for r in rows})
        for i, name in enumerate(dict.fromkeys(r["variant"] for r in rows)):
            mine = sorted((r for r in rows if r["variant"] == name), key=lambda r: r["seq_len"])
            kw = dict(marker="osD^v"[i % 5], color=f"C{i}", label=VARIANT_WORDS.get((where, name), name))
            timed = [r for r in mine if r["ms"] is not None]
            ax_t.plot([r["seq_len"] for r in timed], [r["ms"] for r in timed], **kw)
            ax_m.plot([r["seq_len"] for r in mine], [r["temp_bytes"] / 2**20 for r in mine], **kw)
        step = ("decoder train step (batch 1, AdamW)" if where == "decoder"
                else "encoder forward + backward (batch 1)")
        ax_t.set(xlabel="sequence length (tokens)", ylabel="time per step (ms, median)", title=step)
        ax_m.set(xlabel="sequence length (tokens)", ylabel="compiled temporary memory (MiB)",
                 title=f"{step}: XLA temporaries")
        for ax in (ax_t, ax_m):
            plotstyle.log_axis(ax, "x", lengths)
            plotstyle.log_axis(ax, "y")
            ax.legend()
    m = rec["rows"][0]["model"]
    plotstyle.title(fig, f"Cheaper attention variants vs sequence length (d_model {m['d_model']}, "
                    f"{m['num_layers']} layers, {m['num_heads']} heads)", rec["conditions"])
    plotstyle.save(fig, path)


# ---------------------------------------------------------------------------
# Pipeline schedules, from tformer.pipeline's own tick -> (stage, microbatch) mapping.

SCHEDULES = [{"stages": 4, "microbatches": 8, "virtual_stages": 1}, {"stages": 4, "microbatches": 8,
                                                                      "virtual_stages": 2}]


def schedule_record() -> dict:
    """Each schedule's table (tformer.pipeline.schedule_table) and bubble: derived, not timed."""
    from tformer import pipeline

    out = []
    for s in SCHEDULES:
        table = pipeline.schedule_table(s["stages"], s["microbatches"], s["virtual_stages"])
        out.append({**s, "name": pipeline.schedule_name(s["virtual_stages"]), "ticks": len(table),
                    "bubble": pipeline.bubble_fraction(s["stages"], s["microbatches"], s["virtual_stages"]),
                    "table": [[list(c) if c else None for c in row] for row in table]})
    return {"conditions": records.conditions(command="python experiments/figures.py --measure=schedule",
                                             note="derived from tformer.pipeline.schedule_table: nothing timed"),
            "schedules": out}


def plot_schedule(rec: dict, path: Path) -> None:
    """Stages x ticks; each busy cell shows its microbatch, coloured by microbatch, hatched by repeat."""
    from matplotlib.patches import Rectangle

    scheds = rec["schedules"]
    fig, axes = plotstyle.figure(1, len(scheds), width=12, height=2.6, squeeze=False)
    for ax, s in zip(axes[:, 0], scheds):
        stages = s["stages"]
        for t, row in enumerate(s["table"]):
            for st, cell in enumerate(row):
                if cell is None:
                    ax.add_patch(Rectangle((t, st), 1, 1, facecolor="white", edgecolor="0.8", hatch="//"))
                    continue
                mb, group = cell
                repeat = group // stages
                ax.add_patch(Rectangle((t, st), 1, 1, facecolor=f"C{mb % 10}", alpha=0.35 + 0.45 * (repeat > 0),
                                       edgecolor="white"))
                ax.text(t + 0.5, st + 0.5, f"{mb}" if s["virtual_stages"] == 1 else f"{mb}\ng{group}",
                        ha="center", va="center", fontsize=7.5 if s["virtual_stages"] > 1 else 9)
        ax.set(xlim=(0, s["ticks"]), ylim=(stages, 0), xlabel="tick (one layer group's work on one microbatch)",
               ylabel="stage (device)",
               title=f"{s['name']}: {stages} stages, {s['microbatches']} microbatches, {s['ticks']} ticks, "
                     f"idle (hatched) {s['bubble']:.0%} of each stage's ticks"
                     + ("; 'g': the layer group it runs" if s["virtual_stages"] > 1 else
                        "; the number: the microbatch"))
        ax.set_yticks([i + 0.5 for i in range(stages)], [str(i) for i in range(stages)])
        ax.set_xticks([t + 0.5 for t in range(0, s["ticks"], 2)], [str(t) for t in range(0, s["ticks"], 2)])
        ax.grid(False)
    plotstyle.title(fig, "Pipeline schedules, drawn from tformer.pipeline.schedule_table (the ticks the step runs)")
    plotstyle.save(fig, path)


# ---------------------------------------------------------------------------
# Weight placement: which shard of which weight each device holds (tformer.sharding's rules, real shardings).

PLACEMENT_MESHES = [("tp", {"data": 2, "tensor": 2}), ("fsdp_tp", {"fsdp": 2, "tensor": 2}), ("fsdp", {"fsdp": 4})]
PLACEMENT_DEVICES = 4


def _matrix_dims(axes: tuple) -> list[list[int]]:
    """Dimension groups drawn as a matrix's rows and columns: a head axis keeps its head_dim with it."""
    groups: list[list[int]] = []
    for i, a in enumerate(axes):
        if a == "head_dim" and groups:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def _spec_list(spec, ndim: int) -> list:
    """A PartitionSpec as JSON: per dimension None, a mesh axis or a list of them."""
    entries = list(spec) + [None] * (ndim - len(spec))
    return [e if e is None or isinstance(e, str) else list(e) for e in entries]


def placement_worker(out: str) -> None:
    """On PLACEMENT_DEVICES fake CPU devices: every weight's per-device index ranges under each mesh."""
    import jax
    import numpy as np
    from flax import nnx

    import tformer
    from tformer import sharding

    cfg = tformer.ModelConfig(vocab_size=32, vocab_multiple=1, d_model=16, num_heads=4, num_layers=1, d_ff=32,
                              max_len=16, norm="rmsnorm", positions="rope", use_bias=False)
    state = nnx.state(nnx.eval_shape(lambda: tformer.DecoderLM(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    meshes = []
    for preset, shape in PLACEMENT_MESHES:
        mesh = sharding.make_mesh(shape, devices=jax.devices()[:PLACEMENT_DEVICES])
        shardings = sharding.state_shardings(state, mesh, sharding.rules_for(preset))
        weights = []
        leaves = jax.tree_util.tree_leaves_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
        for (path, var), sh in zip(leaves, jax.tree.leaves(shardings)):
            axes = sharding.param_axes(var)
            keep = [i for i, a in enumerate(axes) if a != "layers"]  # one layer drawn: every layer is alike
            index = sh.devices_indices_map(var.shape)
            weights.append({"name": ".".join(str(getattr(k, "key", k)) for k in path), "shape": list(var.shape),
                            "axes": list(axes), "spec": _spec_list(sh.spec, len(var.shape)), "drawn_dims": keep,
                            "held": {str(d.id): [[s.start or 0, var.shape[i] if s.stop is None else s.stop]
                                                 for i, s in enumerate(index[d])] for d in mesh.devices.flat}})
        coords = {str(d.id): {a: int(i) for a, i in zip(mesh.axis_names, idx) if mesh.shape[a] > 1}
                  for idx, d in np.ndenumerate(mesh.devices)}
        meshes.append({"preset": preset, "mesh": shape, "devices": coords, "weights": weights})
    Path(out).write_text(json.dumps({"model": {k: getattr(cfg, k) for k in ("vocab_size", "d_model", "num_heads",
                                                                           "num_layers", "d_ff")},
                                     "meshes": meshes}))


def measure_placement(results: Path) -> None:
    import tempfile

    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={PLACEMENT_DEVICES}",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "placement.json"
        subprocess.run([sys.executable, str(Path(__file__).resolve()), f"--placement_worker={out}"], env=env,
                       check=True)
        rec = json.loads(out.read_text())
    rec["conditions"] = records.conditions(
        command="python experiments/figures.py --measure=placement",
        note=f"derived from tformer.sharding's rules and jax's NamedSharding on {PLACEMENT_DEVICES} fake CPU devices")
    records.write(results / "weight_placement.json", rec)


def _held_box(w: dict, device: str) -> tuple[float, float, float, float]:
    """(col0, col1, row0, row1) in [0, 1]: the part of the weight drawn as a matrix that `device` holds."""
    axes = [w["axes"][i] for i in w["drawn_dims"]]
    shape = [w["shape"][i] for i in w["drawn_dims"]]
    held = [w["held"][device][i] for i in w["drawn_dims"]]
    spans = []
    for group in _matrix_dims(tuple(axes)):
        size = 1
        for i in group:
            size *= shape[i]
        lead = group[0]  # inner dims of a group (head_dim) are never split: the held span is contiguous
        inner = size // shape[lead]
        spans.append((held[lead][0] * inner / size, held[lead][1] * inner / size))
    rows, cols = spans if len(spans) == 2 else ((0.0, 1.0), spans[0])
    return cols[0], cols[1], rows[0], rows[1]


def _split_words(w: dict) -> str:
    """'embed over fsdp, heads over tensor', or 'replicated': the weight's split, in words."""
    pairs = [f"{w['axes'][i]} over {e if isinstance(e, str) else ' x '.join(e)}"
             for i, e in enumerate(w["spec"]) if e is not None]
    return "\n".join(pairs) or "replicated"


def _weight_label(w: dict) -> str:
    """'attn.wq' over '[embed 16] x [heads 4 . head_dim 4]': the matrix drawn, rows x columns."""
    axes = [w["axes"][i] for i in w["drawn_dims"]]
    shape = [w["shape"][i] for i in w["drawn_dims"]]
    groups = [" . ".join(f"{axes[i]} {shape[i]}" for i in g) for g in _matrix_dims(tuple(axes))]
    return f"{w['name'].removeprefix('blocks.layers.')}\n" + " x ".join(f"[{g}]" for g in groups)


def plot_placement(rec: dict, path: Path) -> None:
    """One panel per mesh: weights (rows) x devices (columns); each box is the whole weight (not to scale),
    the filled part the shard that device holds."""
    from matplotlib.patches import Rectangle

    meshes = rec["meshes"]
    n_w = len(meshes[0]["weights"])
    fig, axes = plotstyle.figure(len(meshes), width=6.4 * len(meshes), height=0.7 * n_w + 1.6)
    for p, (ax, m) in enumerate(zip(axes, meshes)):
        devices = list(m["devices"])
        for r, w in enumerate(m["weights"]):
            for c, d in enumerate(devices):
                height = 1.0 if len(w["drawn_dims"]) > 1 else 0.3  # a vector: a thin bar
                x0, y0 = c * 1.25, r * 1.3 + (1 - height) / 2
                ax.add_patch(Rectangle((x0, y0), 1, height, facecolor="white", edgecolor="0.5"))
                c0, c1, r0, r1 = _held_box(w, d)
                ax.add_patch(Rectangle((x0 + c0, y0 + r0 * height), c1 - c0, (r1 - r0) * height, facecolor=f"C{c}",
                                       alpha=0.75))
            ax.text(len(devices) * 1.25, r * 1.3 + 0.5, _split_words(w), va="center", fontsize=8)
        for c, d in enumerate(devices):
            where = "\n".join(f"{a} {i}" for a, i in m["devices"][d].items())
            ax.text(c * 1.25 + 0.5, -0.2, f"device {d}\n{where}", ha="center", va="bottom", fontsize=8)
        if p == 0:
            ax.set_yticks([r * 1.3 + 0.5 for r in range(n_w)], [_weight_label(w) for w in m["weights"]])
        else:
            ax.set_yticks([])
        ax.set_xticks([])
        ax.grid(False)
        ax.set(xlim=(-0.1, len(devices) * 1.25 + 1.7), ylim=(n_w * 1.3, -1.3))
        for spine in ax.spines.values():
            spine.set_visible(False)
        shape = " x ".join(f"{a} {n}" for a, n in m["mesh"].items())
        ax.set_title(f"preset {m['preset']} on a {shape} mesh", fontsize=11)
    mdl = rec["model"]
    plotstyle.title(fig, f"Which shard of each weight every device holds (filled; box = whole weight, not to scale); "
                         f"text: how it is split\ntiny DecoderLM (d_model {mdl['d_model']}, "
                         f"{mdl['num_heads']} heads, d_ff {mdl['d_ff']}, vocab {mdl['vocab_size']}), one layer "
                         "shown (all alike), from tformer.sharding's rules")
    plotstyle.save(fig, path)


# ---------------------------------------------------------------------------


def _load(results: Path, name: str) -> dict:
    f = results / name
    if not f.exists():
        raise ValueError(f"no record {f}; measure it first: --measure=<its figure>")
    return json.loads(f.read_text())


def draw(which: list[str], results: Path, out: Path) -> list[Path]:
    """Render the chosen figures from their records; returns the PNG paths."""
    made = []
    if "curves" in which:
        made.append(out / "training_curves.png")
        plot_curves(_load(results, "lm_tiny.json"), _load(results, "seq2seq_tiny.json"), made[-1])
    for name, record, plot, png in (("variants", "variants_vs_length.json", plot_variants, "variants_vs_length.png"),
                                    ("schedule", "pipeline_schedule.json", plot_schedule, "pipeline_schedule.png"),
                                    ("placement", "weight_placement.json", plot_placement, "weight_placement.png")):
        if name in which:
            made.append(out / png)
            plot(_load(results, record), made[-1])
    return made


def main(argv):
    del argv
    if FLAGS.placement_worker:
        placement_worker(FLAGS.placement_worker)
        return
    unknown = sorted(set(FLAGS.measure + FLAGS.only) - set(FIGURES))
    if unknown:
        raise app.UsageError(f"unknown figure(s) {unknown}; choose from {FIGURES}")
    results, out = Path(FLAGS.results), Path(FLAGS.out)
    measure = {"curves": lambda: measure_curves(results, Path(FLAGS.runs)),
               "variants": lambda: measure_variants(results), "placement": lambda: measure_placement(results),
               "schedule": lambda: records.write(results / "pipeline_schedule.json", schedule_record())}
    for name in FLAGS.measure:
        measure[name]()
    for p in draw(FLAGS.only, results, out):
        print(f"{p}: {plotstyle.png_size(p)[0]} x {plotstyle.png_size(p)[1]} px")


if __name__ == "__main__":
    define_flags()
    flags.DEFINE_string("placement_worker", None, "Internal: write the placement record to this path.")
    app.run(main)
