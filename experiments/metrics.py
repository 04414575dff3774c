"""Run metrics: console lines, JSON lines, TensorBoard events, and a loss-curve PNG.

Only the main process of a multi-host run writes. Files that a crash could
leave half-written (the PNG, the summary) are written to a temporary name and
renamed; `metrics.jsonl` is appended one whole line at a time, flushed.
"""

from __future__ import annotations

import json
import logging as logging_std
import math
import os
import time
from pathlib import Path
from typing import Any

from absl import logging


def atomic_write(path: str | Path, data: str | bytes) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class MetricWriter:
    """Writes scalars to metrics.jsonl and TensorBoard (tensorboardX) under `workdir`."""

    def __init__(self, workdir: str | Path, enabled: bool = True):
        self.workdir = Path(workdir)
        self.enabled = enabled
        self._tb = None
        if enabled:
            self.workdir.mkdir(parents=True, exist_ok=True)
            self._jsonl = open(self.workdir / "metrics.jsonl", "a")
            try:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(str(self.workdir / "tb"))
            except ImportError:  # TensorBoard is optional; JSON lines are not
                logging.warning("tensorboardX not installed: no TensorBoard events")

    def write(self, step: int, split: str, scalars: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in scalars.items()}
        self._jsonl.write(json.dumps({"step": int(step), "split": split, "time": time.time(), **clean}) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in clean.items():
                if math.isfinite(v):
                    self._tb.add_scalar(f"{split}/{k}", v, int(step))

    def close(self) -> None:
        if not self.enabled:
            return
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(workdir: str | Path) -> list[dict]:
    path = Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a kill: skip it
            continue
    return out


def plot_loss(workdir: str | Path) -> Path | None:
    """loss_curve.png: train loss and eval loss against step (latest value per step wins)."""
    rows = read_metrics(workdir)
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for split, style in (("train", "-"), ("eval", "o-")):
        pts = {r["step"]: r["loss"] for r in rows if r.get("split") == split and "loss" in r}
        if pts:
            steps = sorted(pts)
            ax.plot(steps, [pts[s] for s in steps], style, label=f"{split} loss", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(workdir) / "loss_curve.png"
    tmp = out.with_name(".loss_curve.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out)
    return out


class QuietLibraries(logging_std.Filter):
    """Keep the console for the run's own lines: drop checkpoint libraries' INFO chatter."""

    def filter(self, record):
        return record.levelno >= logging_std.WARNING or "orbax" not in record.pathname
