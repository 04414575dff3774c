r"""The plans the docs quote, compiled and written to one record (docs/results/plans.json).

    python experiments/plans.py --devices=8 --record=docs/results/plans.json     # the <= 8-device plans
    python experiments/plans.py --devices=256 --record=docs/results/plans.json   # the pod-sized one

Each entry is what `python experiments/train.py --config=<file> --plan --plan_devices=N <overrides>` prints
(the same `planning.print_plan`), kept with that command line; `--devices` runs the entries that need at most
that many fake CPU devices, and the record keeps the others it already holds; each entry carries its own
conditions (date, load, versions), the record's top level those of the latest invocation. Nothing runs: every step is
compiled from abstract shapes, so the figures are XLA:CPU's program for that mesh (a TPU or GPU compiler
fuses and schedules differently; parameter and optimizer bytes do not depend on it).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from absl import app, flags

GPT2 = "experiments/configs/lm_gpt2_small.py"
# GPT-2's own vocabulary (padded to 50,304 by the model), its batch of 16 x 1,024 tokens unless said otherwise.
BASE = {"model.vocab_size": 50257}
SCANNED = {"model.scan_layers": True}
LONG = {**SCANNED, "model.max_len": 8192, "data.seq_len": 8192, "train.batch_size": 1}

# name -> (devices, overrides of lm_gpt2_small): the plans docs/parallelism.md and README.md quote.
PLANS: dict[str, tuple[int, dict]] = {
    "dp_8": (8, {"mesh.data": 8}),
    "fsdp_8": (8, {"mesh.preset": "fsdp", "mesh.data": 1, "mesh.fsdp": 8}),
    "tp_4": (4, {"mesh.preset": "tp", "mesh.data": 1, "mesh.tensor": 4}),
    "dp_tp_2x4": (8, {"mesh.preset": "dp_tp", "mesh.data": 2, "mesh.tensor": 4}),
    "dp_tp_4x2": (8, {"mesh.preset": "dp_tp", "mesh.data": 4, "mesh.tensor": 2}),
    "fsdp_tp_2x2x2": (8, {"mesh.preset": "fsdp_tp", "mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}),
    "dp_8_scanned": (8, {**SCANNED, "mesh.data": 8}),
    "pp_4_m8": (4, {**SCANNED, "mesh.data": 1, "mesh.stage": 4, "mesh.microbatches": 8}),
    "dp_pp_2x4_m8": (8, {**SCANNED, "mesh.data": 2, "mesh.stage": 4, "mesh.microbatches": 8}),
    "dp_pp_2x4_m8_v3": (8, {**SCANNED, "mesh.data": 2, "mesh.stage": 4, "mesh.microbatches": 8,
                            "mesh.virtual_stages": 3}),
    "long_sp_1": (1, {**LONG, "mesh.data": 1}),
    "long_sp_8": (8, {**LONG, "mesh.data": 1, "mesh.sequence": 8}),
    "fsdp_256": (256, {"train.batch_size": 256, "mesh.preset": "fsdp", "mesh.data": 32, "mesh.fsdp": 8}),
}

flags.DEFINE_integer("devices", 8, "Fake CPU devices: plan the entries that need at most this many.")
flags.DEFINE_string("record", "docs/results/plans.json", "The JSON record to write (its other entries are kept).")
flags.DEFINE_list("only", [], "Plan only these entries (default: every entry that fits --devices).")


def command(devices: int, overrides: dict) -> str:
    """The `train.py --plan` command line the entry is."""
    flags_ = " ".join(f"--config.{k}={v}" for k, v in {**BASE, **overrides}.items())
    return f"python experiments/train.py --config={GPT2} --plan --plan_devices={devices} {flags_}"


def figures(p) -> dict:
    """A Plan's numbers, raw and in the units the docs quote (MiB, GiB)."""
    mib, gib = 2.0 ** 20, 2.0 ** 30
    summary = p.collective_summary()
    return {
        "mesh": p.mesh_shape, "global_batch": p.global_batch, "seq_len": p.seq_len, "num_params": p.num_params,
        "stages": p.stages, "microbatches": p.microbatches, "virtual_stages": p.virtual_stages,
        "bubble": p.bubble_fraction, "state_bytes": p.state_bytes, "temp_bytes": p.temp_bytes,
        "peak_bytes": p.peak_bytes, "collective_bytes": p.collective_bytes, "collectives": summary,
        "state_mib": p.state_bytes / mib, "state_gib": p.state_bytes / gib, "temp_gib": (p.temp_bytes or 0) / gib,
        "peak_gib": (p.peak_bytes or 0) / gib, "collective_mib": p.collective_bytes / mib,
        "collective_gib": p.collective_bytes / gib,
        "collective_mib_by_kind": {k: s["bytes"] / mib for k, s in summary.items()},
    }


def main(argv: list[str]) -> None:
    del argv
    from experiments import processes

    processes.use_fake_cpu_devices(flags.FLAGS.devices)
    from experiments import planning, results, run_config

    path = Path(flags.FLAGS.record)
    record = json.loads(path.read_text()) if path.exists() else {}
    plans = record.setdefault("plans", {})
    for name, (devices, overrides) in PLANS.items():
        if devices > flags.FLAGS.devices or (flags.FLAGS.only and name not in flags.FLAGS.only):
            continue
        config = run_config.load_config_file(GPT2)
        for key, value in {**BASE, **overrides}.items():
            section, field = key.split(".")
            config[section][field] = value
        print(f"== {name}: {command(devices, overrides)}", flush=True)
        plans[name] = {"command": command(devices, overrides), "devices": devices,
                       **figures(planning.print_plan(config)),
                       "conditions": results.conditions(command=command(devices, overrides))}
        sys.stdout.flush()
    record["conditions"] = results.conditions(
        command=f"python experiments/plans.py --devices=N --record={path} (entries: their own command)")
    results.write(path, record)


if __name__ == "__main__":
    app.run(main)
