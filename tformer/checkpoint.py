"""Checkpoints with orbax: async periodic saves, keep-last-N, restore onto any mesh.

Orbax writes each step to a temporary directory and renames it when complete,
so a process killed mid-save leaves the previous checkpoints intact. Restore
goes further: if the newest checkpoint cannot be read (a damaged file), it
warns, names it, and falls back to the one before; with `move_aside=True` the
damaged newer steps are renamed to `<step>.damaged-<time>` so that the run
saves those steps again instead of skipping them as existing.

A step counts as damaged only when an older step restores into the same
target: if every step fails (a model whose shapes changed, say), nothing is
moved and `CheckpointError` says so.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import jax

from tformer.training import TrainState

log = logging.getLogger(__name__)


def _ocp():
    """orbax.checkpoint, imported on first use: `import tformer` (and this module) needs only the core's
    dependencies (jax, flax, optax, numpy); orbax comes with the `experiments` extra."""
    try:
        import orbax.checkpoint as ocp
    except ImportError as e:
        raise ImportError(f"tformer.checkpoint needs orbax-checkpoint ({e}); install it with "
                          "`pip install orbax-checkpoint` or `pip install -e \".[experiments]\"`") from e
    return ocp


class CheckpointError(RuntimeError):
    """No checkpoint could be read (the message names the directory and the steps tried)."""


def _to_tree(state: TrainState) -> dict:
    # A plain dict checkpoints the same under any orbax version.
    return {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}


def _abstract(leaf, sharding=None):
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding or getattr(leaf, "sharding", None))


def abstract_like(state_or_shapes: Any, shardings: Any = None) -> Any:
    """ShapeDtypeStruct tree (with target shardings) to restore into."""
    if shardings is None:
        return jax.tree.map(_abstract, state_or_shapes)
    return jax.tree.map(_abstract, state_or_shapes, shardings)


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200] if text else ''}"


class Checkpointer:
    """Save / restore `TrainState` plus a small JSON dict (config, data position...)."""

    def __init__(self, directory: str | Path, *, max_to_keep: int = 3, async_save: bool = True):
        if max_to_keep < 1:
            raise ValueError(f"Checkpointer: max_to_keep must be >= 1 (keep at least the newest), got {max_to_keep}")
        self.directory = Path(directory).absolute()
        ocp = _ocp()
        self._mngr = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=True
            ),
        )

    def save(self, step: int, state: TrainState, extra: dict[str, Any] | None = None, force: bool = False) -> bool:
        """Start saving (async). A checkpoint for `step` that exists is kept (returns False) unless `force`,
        which replaces it."""
        if step in self._mngr.all_steps():
            if not force:
                return False
            self._mngr.wait_until_finished()
            self._mngr.delete(step)
        ocp = _ocp()
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(_to_tree(state)), extra=ocp.args.JsonSave(extra or {})
        )
        return self._mngr.save(step, args=args, force=True)

    def all_steps(self) -> list[int]:
        return sorted(self._mngr.all_steps())

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def restore(self, step: int | None = None, target: TrainState | None = None,
                move_aside: bool = False) -> tuple[TrainState, dict]:
        """Restore `step` (default: the newest readable) into `target`'s shapes and shardings.

        With `move_aside`, newer steps that failed while an older one restored are renamed
        `<step>.damaged-<time>` (by process 0) so that they are saved again.
        """
        tree_target = None if target is None else _to_tree(target)
        ocp = _ocp()
        args = ocp.args.Composite(state=ocp.args.StandardRestore(tree_target), extra=ocp.args.JsonRestore())
        restored, _ = self._restore_newest(step, lambda _: args, move_aside)
        return TrainState(**restored["state"]), dict(restored["extra"] or {})

    def restore_params(self, params_target: Any, step: int | None = None):
        """Only the parameters of `step` (default: the newest readable), into `params_target`'s shapes and
        shardings: what serving needs, without building an optimizer (its state is never read)."""
        target = {"params": params_target}
        ocp = _ocp()
        args = ocp.args.Composite(state=ocp.args.PyTreeRestore(
            target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True))
        self._mngr.wait_until_finished()
        # A manager that saved `state` with StandardSave refuses other restore args for it: read with a fresh one.
        reader = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(read_only=True))
        try:
            restored, _ = self._restore_newest(step, lambda _: args, mngr=reader)
        finally:
            reader.close()
        return restored["state"]["params"]

    def _restore_newest(self, step: int | None, args_for, move_aside: bool = False, mngr=None):
        """(restored, step) of the newest step that restores with `args_for(step)`."""
        mngr = mngr or self._mngr
        steps = [step] if step is not None else sorted(mngr.all_steps(), reverse=True)
        if not steps:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        failed = []
        for s in steps:
            try:
                restored = mngr.restore(s, args=args_for(s))
            except Exception as e:
                log.warning("checkpoint %s/%d is unreadable (%s)%s", self.directory, s, _first_line(e),
                            "" if step is not None else "; trying an older one")
                failed.append((s, e))
                continue
            if failed:
                log.warning("restored checkpoint %d instead (newer ones unreadable)", s)
                if move_aside:
                    self._move_aside([f for f, _ in failed])
            return restored, s
        first = failed[0][1]
        raise CheckpointError(f"no readable checkpoint in {self.directory}: tried steps {[s for s, _ in failed]} "
                              f"(newest: {_first_line(first)})")

    def _move_aside(self, steps: list[int]) -> None:
        """Rename damaged steps out of the manager's view (process 0; every process then re-reads the list)."""
        stamp = time.strftime("%Y%m%dT%H%M%S")
        if jax.process_index() == 0:
            for s in steps:
                src = self.directory / str(s)
                dst = self.directory / f"{s}.damaged-{stamp}"
                src.rename(dst)
                log.warning("moved damaged checkpoint %s aside to %s; step %d will be saved again", src, dst.name, s)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("tformer:checkpoint_move_aside")
        self._mngr.reload()

    def wait(self) -> None:
        self._mngr.wait_until_finished()

    def close(self) -> None:
        self._mngr.wait_until_finished()
        self._mngr.close()
