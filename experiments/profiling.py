"""`--config.train.profile_steps=START,END`: a `jax.profiler` trace of train steps START .. END-1.

Steps are numbered as in the step log (the first step is 1). The trace goes to
`<workdir>/profile/` in the TensorBoard profile plugin's layout
(`plugins/profile/<run>/*.xplane.pb`); view it with

    tensorboard --logdir <workdir>/profile      # the "Profile" tab (tensorboard-plugin-profile)
    xprof --logdir <workdir>/profile            # or XProf; Perfetto opens the *.trace.json.gz

Each profiled step is a `StepTraceAnnotation`, so the tools show per-step
times. Off (the default, "") the runner makes no profiler call at all.
"""

from __future__ import annotations

from pathlib import Path

import jax
from absl import logging


def parse_steps(spec: str, num_steps: int) -> tuple[int, int] | None:
    """(START, END) from "START,END", or None for ""; one ValueError naming the field for anything else."""
    if not spec:
        return None
    how = f"give START,END with 1 <= START < END <= train.num_steps + 1 = {num_steps + 1} (steps START .. END-1)"
    try:
        start, end = (int(x) for x in str(spec).split(","))
    except ValueError:
        raise ValueError(f"config.train.profile_steps={spec!r} is not two integers; {how}") from None
    if start < 1 or end <= start or end > num_steps + 1:
        raise ValueError(f"config.train.profile_steps={spec!r}: {how}")
    return start, end


class StepProfiler:
    """Starts a trace before step START and stops it after step END-1 (the step's results ready)."""

    def __init__(self, steps: tuple[int, int], workdir: Path):
        self.start, self.end = steps
        self.dir = Path(workdir) / "profile"
        self.active = self.done = False

    @classmethod
    def for_run(cls, spec: str, num_steps: int, workdir: Path) -> StepProfiler | None:
        steps = parse_steps(spec, num_steps)
        return None if steps is None or jax.process_index() != 0 else cls(steps, workdir)

    def annotate(self, step: int):
        """Call before running `step`: starts the trace at START; returns the step's annotation context."""
        if not self.active and not self.done and self.start <= step < self.end:  # (a resume may land mid-window)
            self.dir.mkdir(parents=True, exist_ok=True)
            jax.profiler.start_trace(str(self.dir))
            self.active = True
            logging.info("step %d: profiling steps %d-%d into %s", step, step, self.end - 1, self.dir)
        if self.active:
            return jax.profiler.StepTraceAnnotation("train", step_num=step)
        return None

    def after(self, step: int, outputs) -> None:
        """Call after `step` ran: at END-1, waits for its results and writes the trace."""
        if self.active and step == self.end - 1:
            jax.block_until_ready(outputs)
            jax.profiler.stop_trace()
            self.active, self.done = False, True
            logging.info("step %d: profiled steps written to %s (tensorboard --logdir %s)", step, self.dir, self.dir)

    def close(self) -> None:
        """Stop a trace the run left open (a signal or an error mid-window)."""
        if self.active:
            jax.profiler.stop_trace()
            self.active = False
