"""A run's workdir: one run at a time (a lock), resumed only under the same model, from a readable checkpoint.

Layout: `.lock` (the holder's PID), `config.json` (the run's config and the
model / optimizer dataclasses it resolved to), `checkpoints/` (orbax steps),
`metrics.jsonl`, `tb/`, `loss_curve.png`, `final_metrics.json`, and the
sentencepiece `tokenizer.model` when there is one.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
from pathlib import Path

from absl import logging

from tformer import training
from tformer.checkpoint import Checkpointer, abstract_like


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


def prepare_workdir(workdir: str | os.PathLike) -> Path:
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


_SCHEDULE_FIELDS = ("learning_rate", "warmup_steps", "total_steps", "schedule", "min_lr_ratio", "decay_fraction",
                    "muon_learning_rate")


def _diff(old: dict, new: dict) -> list[str]:
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def check_resume(workdir: Path, family: str, cfg, o: training.OptimizerConfig) -> None:
    """A workdir with checkpoints resumes only under the model it was trained with.

    Any model difference (family included) fails listing the fields (old ->
    new); optimizer differences are allowed, with a warning when the
    learning-rate schedule differs from the one the run started with.
    """
    saved_path = workdir / "config.json"
    if not saved_path.exists():
        return
    saved = json.loads(saved_path.read_text())
    old_model = {"kind": saved["config"]["model"]["kind"], **saved["model"]}  # `kind`: config.model.kind
    changed = _diff(old_model, {"kind": family, **dataclasses.asdict(cfg)})
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
    if old_optim.get("name", "adamw") != o.name:  # Muon's state is not AdamW's
        raise ValueError(f"--workdir={workdir}: optim.name {old_optim.get('name', 'adamw')!r} -> {o.name!r} "
                         "changes the optimizer state's structure, so its checkpoints cannot resume; keep the "
                         "optimizer it started with, or start fresh with a new --workdir")
    sched = _diff({k: old_optim.get(k) for k in _SCHEDULE_FIELDS}, {k: new_optim[k] for k in _SCHEDULE_FIELDS})
    if sched:
        logging.warning("resuming with a different learning-rate schedule than the run started with: %s",
                        "; ".join(sched))
    other = _diff({k: v for k, v in old_optim.items() if k not in _SCHEDULE_FIELDS},
                  {k: v for k, v in new_optim.items() if k not in _SCHEDULE_FIELDS})
    if other:
        logging.warning("resuming with changed optimizer settings: %s", "; ".join(other))


def restore_latest(ckpt: Checkpointer, state, state_shardings, *, workdir: Path, family: str, cfg,
                   o: training.OptimizerConfig):
    """(state, extra) of the newest readable checkpoint, or (state, None) when there is none.

    The workdir must hold the same model (`check_resume`). A damaged newest
    step is moved aside and the one before it restored (`Checkpointer.restore`
    with `move_aside`); on any failure `ckpt` is closed before the error rises.
    """
    if ckpt.latest_step() is None:
        return state, None
    try:
        check_resume(workdir, family, cfg, o)
        state, extra = ckpt.restore(target=abstract_like(state, state_shardings), move_aside=True)
    except BaseException:
        ckpt.close()
        raise
    logging.info("resumed from step %d (data position %s)", int(state.step), extra.get("data_step"))
    return state, extra
