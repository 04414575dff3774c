r"""The speed run compared at equal wall time: lm_speedrun, lm_tiny and a nanoGPT-style GPT-2 layout.

    python experiments/speedrun.py --seeds=0,1,2 --out=docs/results/speedrun.json

Each recipe is one `experiments/train.py` process under the same time budget
(`train.time_budget_s`, counted from the process's start: Python start-up,
data, compile, training, the final eval and checkpoint), on the same data,
split and validation rows (bytes of the stdlib corpus, seq_len 128, 32 x 32
rows), with no end-of-run samples. The recipes run alternated, seed by seed
(A, B, C, A, B, C, ...), so a slow spell of a shared machine falls on all of
them; the load average is recorded with each run. The JSON holds, per recipe,
each seed's held-out bits per byte, steps and wall time, and their mean and
spread (sample standard deviation, min, max).

Recipes:
  lm_speedrun  experiments/configs/lm_speedrun.py as it is.
  lm_tiny      experiments/configs/lm_tiny.py (today's recipe: AdamW, cosine over its 500 steps, or over the
               time if that ends first) with the budget.
  nanogpt      lm_tiny's model in GPT-2's layout, as nanoGPT trains it: learned positions, LayerNorm, GELU,
               biases, d_ff = 4 d; AdamW with cosine decay (lm_tiny's optimizer settings), the budget.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SPEEDRUN = "experiments/configs/lm_speedrun.py"
TINY = "experiments/configs/lm_tiny.py"
# What every recipe shares: the eval rows (32 batches of 32 rows of 128 bytes) and no samples.
COMMON = ["--config.train.num_samples=0", "--config.train.eval_batch_size=32", "--config.train.eval_batches=32",
          "--config.train.eval_every=100000", "--config.train.checkpoint_every=100000"]
RECIPES = {
    "lm_speedrun": (SPEEDRUN, []),
    "lm_tiny": (TINY, []),
    "nanogpt": (TINY, ["--config.model.positions=learned", "--config.model.norm=layernorm",
                       "--config.model.activation=gelu", "--config.model.use_bias=True", "--config.model.d_ff=512"]),
}


def speedrun_budget() -> float:
    """lm_speedrun's own `train.time_budget_s`: the budget every recipe gets."""
    sys.path.insert(0, str(REPO))
    from experiments.configs import lm_speedrun

    return float(lm_speedrun.get_config().train.time_budget_s)


def run_one(recipe: str, seed: int, budget_s: float, root: Path, extra: list[str]) -> dict:
    """One train.py process; its wall time (from before the interpreter starts) and final metrics."""
    config, overrides = RECIPES[recipe]
    workdir = root / f"{recipe}-seed{seed}"
    cmd = [sys.executable, "experiments/train.py", f"--config={config}", f"--workdir={workdir}",
           f"--config.train.seed={seed}", f"--config.train.time_budget_s={budget_s:g}", *COMMON, *overrides, *extra]
    load = os.getloadavg()[0]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    wall = time.time() - t0
    row = {"seed": seed, "wall_s": round(wall, 2), "load_1m_before": round(load, 2),
           "load_1m_after": round(os.getloadavg()[0], 2)}
    if proc.returncode != 0:  # recorded, not fatal: one overloaded minute should not lose the others' runs
        row["error"] = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1][:500]
    else:
        final = json.loads((workdir / "final_metrics.json").read_text())
        row.update(bits_per_byte=final["bits_per_byte"], loss=final["loss"], steps=final["step"])
    print(json.dumps({"recipe": recipe, **row}), flush=True)
    return row


def summarize(rows: list[dict]) -> dict:
    """Mean and spread over the runs that finished (a failed run is listed with its error, not averaged)."""
    ok = [r for r in rows if "error" not in r]
    if not ok:
        return {"runs": rows, "failed": len(rows)}
    bpb = [r["bits_per_byte"] for r in ok]
    return {"runs": rows, "failed": len(rows) - len(ok), "mean_bits_per_byte": statistics.fmean(bpb),
            "std_bits_per_byte": statistics.stdev(bpb) if len(bpb) > 1 else 0.0,
            "min_bits_per_byte": min(bpb), "max_bits_per_byte": max(bpb),
            "mean_steps": statistics.fmean(r["steps"] for r in ok),
            "max_wall_s": max(r["wall_s"] for r in rows)}


def conditions(argv: list[str], budget_s: float) -> dict:
    """experiments.results' conditions (machine, load, versions, date, command) plus this run's own."""
    import flax
    import optax

    from experiments import results

    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    isa = "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else "unknown"
    command = " ".join(["python", "experiments/speedrun.py", *map(shlex.quote, argv)])
    return results.conditions(command, flax=flax.__version__, optax=optax.__version__, isa=isa,
                              cores=os.cpu_count(), time_budget_s=budget_s,
                              load_1m_at_start=round(os.getloadavg()[0], 2))


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--recipes", default=",".join(RECIPES), help=f"comma-separated, of {sorted(RECIPES)}")
    p.add_argument("--out", default=None, help="results JSON (e.g. docs/results/speedrun.json); none: print only")
    p.add_argument("--overrides", default="", help="space-separated --config.* overrides for lm_speedrun only "
                                                   "(to try a candidate against the others)")
    args = p.parse_args(argv)
    recipes = args.recipes.split(",")
    for r in recipes:
        if r not in RECIPES:
            raise SystemExit(f"error: --recipes: unknown {r!r}; choose from {sorted(RECIPES)}")
    budget = speedrun_budget()
    cond = conditions(argv, budget)
    rows: dict[str, list[dict]] = {r: [] for r in recipes}
    with tempfile.TemporaryDirectory(prefix="speedrun-") as root:
        for seed in (int(s) for s in args.seeds.split(",")):
            for recipe in recipes:  # alternated: each seed runs every recipe before the next seed
                extra = args.overrides.split() if recipe == "lm_speedrun" else []
                rows[recipe].append(run_one(recipe, seed, budget, Path(root), extra))
    cond["load_1m_at_end"] = round(os.getloadavg()[0], 2)
    result = {"conditions": cond, "recipes": {r: summarize(v) for r, v in rows.items()}}
    if all("mean_bits_per_byte" in result["recipes"].get(r, {}) for r in ("lm_speedrun", "lm_tiny")):
        s, t = result["recipes"]["lm_speedrun"], result["recipes"]["lm_tiny"]
        gap = t["mean_bits_per_byte"] - s["mean_bits_per_byte"]
        result["speedrun_vs_lm_tiny"] = {"gap_bits_per_byte": gap,
                                         "larger_spread": max(s["std_bits_per_byte"], t["std_bits_per_byte"]),
                                         "speedrun_better_beyond_spread":
                                             gap > max(s["std_bits_per_byte"], t["std_bits_per_byte"])}
    if args.out:
        from experiments import results

        results.write(args.out, result)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
