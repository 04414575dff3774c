"""A run's time budget (`config.train.time_budget_s`): when training stops, and how far its schedule is.

What counts: the wall clock from the run's start (`started`: the process's
start when run as `python experiments/train.py`, so Python's start-up,
imports, data, model init, compile, training, eval and the final checkpoint
all count; a call of `train_and_evaluate` counts from the call) to the end of
the final eval. Training stops at the step boundary after which one more
step would run past `deadline`: the budget less a reserve for what follows
training (the final checkpoint, the final eval, the samples, the metrics).
The reserve is measured, not guessed: the eval step is compiled and one
validation batch timed before training (`eval_batches` of them are the final
eval), plus `train.time_budget_margin_s` for the rest.

The learning-rate schedule follows time: the step receives `progress`, the
larger of step / total_steps and the share of the training time spent
(`tformer.training.lr_factor`), as an array, so the decay of a `wsd` or
cosine schedule ends when the time does, without recompiling.

On resume: the checkpoint holds the progress reached; the new invocation has
a fresh budget for the rest of the schedule (progress goes on from where it
was to 1 over this invocation's training time). A run whose schedule was
complete (progress 1) trains no further: it only evaluates again.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import jax
from absl import logging


def now() -> float:
    """The budget's clock: wall time (seconds, time.time's scale)."""
    return time.time()


class TimeBudget:
    """Deadline and schedule progress of a time-budgeted run (single process)."""

    def __init__(self, budget_s: float, started: float, reserve_s: float, progress0: float = 0.0,
                 clock: Callable[[], float] | None = None):
        self.budget_s, self.started, self.reserve_s = budget_s, started, reserve_s
        self.clock = clock or (lambda: now())  # looked up at each call: a test replaces `now`
        self.deadline = started + budget_s - reserve_s
        self.progress0 = min(max(progress0, 0.0), 1.0)
        self.train_start = self.clock()
        self.step_s: float | None = None  # a recent step's duration (the first, compiling, step excluded)
        self._last: float | None = None
        self.stopped_early = False

    def progress(self, step: int, total_steps: int) -> float:
        """The schedule's progress for the step about to run: max(step / total, time spent share)."""
        span = max(self.deadline - self.train_start, 1e-9)
        spent = min(max((self.clock() - self.train_start) / span, 0.0), 1.0)
        return min(max(step / total_steps, self.progress0 + (1.0 - self.progress0) * spent), 1.0)

    def after_step(self, block_on: object) -> bool:
        """Wait for the step just dispatched (`block_on`: its metrics) and say whether to stop training:
        True when the schedule is complete or one more step would end past the deadline."""
        jax.block_until_ready(block_on)
        now = self.clock()
        if self._last is not None:  # the first step compiles: it tells nothing about the next
            dt = now - self._last
            self.step_s = dt if self.step_s is None else 0.7 * self.step_s + 0.3 * dt
        self._last = now
        self.stopped_early = now + (self.step_s or 0.0) >= self.deadline
        return self.stopped_early

    def restart_step_clock(self) -> None:
        """After an eval between steps: the next step's duration starts now, not at the last step."""
        self._last = self.clock()

    def exhausted(self) -> bool:
        """Nothing left to train: the schedule's progress was complete when the run (re)started."""
        return self.progress0 >= 1.0

    def summary(self) -> dict:
        return {"time_budget_s": self.budget_s, "reserve_s": round(self.reserve_s, 3),
                "stopped_early": self.stopped_early, "elapsed_s": round(self.clock() - self.started, 3)}


def measure_eval_s(eval_once: Callable[[], object], batches: int) -> float:
    """Seconds `batches` eval batches take: one call compiles (the final eval would), a second is timed."""
    jax.block_until_ready(eval_once())
    t0 = time.time()
    jax.block_until_ready(eval_once())
    per_batch = time.time() - t0
    logging.info("time budget: one eval batch takes %.3fs; reserving for %d", per_batch, batches)
    return per_batch * batches


def process_start_time() -> float:
    """When this process started (time.time() scale), from /proc on Linux; elsewhere, now."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        start_ticks = int(fields[19])  # field 22 of proc(5), `starttime`: clock ticks after boot
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return time.time() - (uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.time()
