"""Checkpoints with orbax: async periodic saves, keep-last-N, restore onto any mesh.

Orbax writes each step to a temporary directory and renames it when complete,
so a process killed mid-save leaves the previous checkpoints intact. Restore
goes further: if the newest checkpoint cannot be read (a damaged file), it
warns, names it, and falls back to the one before.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from tformer.training import TrainState

log = logging.getLogger(__name__)


def _to_tree(state: TrainState) -> dict:
    # A plain dict checkpoints the same under any orbax version.
    return {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}


def abstract_like(state_or_shapes, shardings=None):
    """ShapeDtypeStruct tree (with target shardings) to restore into."""
    if shardings is None:
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=getattr(a, "sharding", None)), state_or_shapes)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state_or_shapes, shardings)


class Checkpointer:
    """Save / restore `TrainState` plus a small JSON dict (config, data position...)."""

    def __init__(self, directory: str | Path, *, max_to_keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
        self._mngr = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=True
            ),
        )

    def save(self, step: int, state: TrainState, extra: dict[str, Any] | None = None, force: bool = False) -> bool:
        """Start saving (async); returns False if a checkpoint for `step` exists."""
        if step in self._mngr.all_steps():
            return False
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(_to_tree(state)), extra=ocp.args.JsonSave(extra or {})
        )
        return self._mngr.save(step, args=args, force=True)

    def all_steps(self) -> list[int]:
        return sorted(self._mngr.all_steps())

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def restore(self, step: int | None = None, target: TrainState | None = None) -> tuple[TrainState, dict]:
        """Restore `step` (default: newest readable) into `target`'s shapes and shardings."""
        steps = [step] if step is not None else sorted(self._mngr.all_steps(), reverse=True)
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        errors = []
        for s in steps:
            try:
                tree_target = None if target is None else _to_tree(target)
                restored = self._mngr.restore(
                    s,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(tree_target), extra=ocp.args.JsonRestore()
                    ),
                )
                if errors:
                    log.warning("restored checkpoint %d instead (newer ones unreadable)", s)
                return TrainState(**restored["state"]), dict(restored["extra"] or {})
            except Exception as e:  # noqa: BLE001 - any failure means: try an older one
                if step is not None:
                    raise
                log.warning("checkpoint %s/%d is unreadable (%s: %s); falling back to an older one",
                            self.directory, s, type(e).__name__, str(e).splitlines()[0][:200])
                errors.append((s, e))
        raise RuntimeError(f"no readable checkpoint in {self.directory}: tried steps {[s for s, _ in errors]}")

    def wait(self) -> None:
        self._mngr.wait_until_finished()

    def close(self) -> None:
        self._mngr.wait_until_finished()
        self._mngr.close()
