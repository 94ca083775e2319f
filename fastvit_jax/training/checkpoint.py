"""Orbax CheckpointManager wrapper: async saves, keep-last-N, sharded restore.

A checkpoint that cannot be read (truncated data, missing metadata, another structure) does
not block a run: restore tries the steps newest first, moves each unreadable one aside to
``<step>.corrupt-<utc time>`` (nothing is deleted), logs one line naming it and the error, and
uses the newest readable one. ``CheckpointError`` names every step tried when none is.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable, List, Optional, Tuple

import jax
import orbax.checkpoint as ocp


CHECKPOINTS_DIRNAME = "checkpoints"

log = logging.getLogger("fastvit_jax.training")


class CheckpointError(RuntimeError):
    """No checkpoint of the workdir could be read; the message lists each step and its error."""


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0][:200]}" if text else type(error).__name__


def move_aside(directory: str, step: int) -> str:
    """Renames ``<directory>/<step>`` to ``<step>.corrupt-<utc time>`` (process 0 only); returns the new path."""
    target = os.path.join(directory, f"{step}.corrupt-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
    if jax.process_index() == 0:
        os.replace(os.path.join(directory, str(step)), target)
    return target


def restore_newest_readable(manager: "ocp.CheckpointManager", directory: str,
                            restore: Callable[[int], Any]) -> Tuple[Any, int]:
    """``restore(step)`` on the steps newest first; unreadable steps are moved aside. Returns (tree, step)."""
    tried: List[str] = []
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            return restore(step), int(step)
        except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise many types for damaged files
            moved = move_aside(directory, step)
            log.warning("checkpoint step %d is unreadable (%s); moved aside to %s", step, _first_line(e), moved)
            tried.append(f"step {step}: {_first_line(e)}")
    manager.reload()
    raise CheckpointError(f"no readable checkpoint in {directory}; tried " + "; ".join(tried)
                          + " (the unreadable ones were moved aside as <step>.corrupt-<time>)")


def checkpoint_dir(workdir: str) -> str:
    return os.path.abspath(os.path.join(workdir, CHECKPOINTS_DIRNAME))


class Checkpointer:
    """Saves/restores the TrainState under ``<workdir>/checkpoints/<step>``."""

    def __init__(self, workdir: str, *, max_to_keep: int = 3, async_save: bool = True):
        self.directory = checkpoint_dir(workdir)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            create=True,
            enable_async_checkpointing=async_save,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, *, force: bool = True) -> bool:
        if step in self.manager.all_steps():
            return False
        return self.manager.save(step, args=ocp.args.StandardSave(state), force=force)

    def restore(self, abstract_state: Any) -> Tuple[Any, int]:
        """(state, step) of the newest readable checkpoint (see the module docstring).

        ``abstract_state``: pytree of jax.ShapeDtypeStruct with shardings.
        """
        if self.latest_step() is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        restored = restore_newest_readable(
            self.manager, self.directory,
            lambda step: self.manager.restore(step, args=ocp.args.StandardRestore(abstract_state)))
        self.manager.reload()  # steps moved aside are gone from the manager's view
        return restored

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_with_shardings(shape_tree: Any, shardings: Any) -> Any:
    return jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shape_tree, shardings
    )


EVAL_FIELDS = ("params", "batch_stats", "ema_params", "ema_batch_stats")


def restore_eval_variables(workdir: str, abstract_variables: Any) -> Any:
    """Only ``EVAL_FIELDS`` of the latest TrainState in ``<workdir>/checkpoints`` (orbax partial restore).

    ``abstract_variables``: {field: pytree of jax.ShapeDtypeStruct with shardings} for the
    fields in EVAL_FIELDS. The optimizer state is not read, so no optimizer is needed.
    Raises FileNotFoundError when the workdir has no checkpoint.
    """
    directory = checkpoint_dir(workdir)
    manager = ocp.CheckpointManager(directory)
    try:
        if manager.latest_step() is None:
            raise FileNotFoundError(f"no checkpoint found under {directory}")
        restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_variables)
        restored, _ = restore_newest_readable(manager, directory, lambda step: manager.restore(
            step, args=ocp.args.PyTreeRestore(item=abstract_variables, restore_args=restore_args,
                                              partial_restore=True)))
        return restored
    finally:
        manager.close()
