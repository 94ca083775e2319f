"""Orbax CheckpointManager wrapper: async saves, keep-last-N, sharded restore."""

from __future__ import annotations

import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp


CHECKPOINTS_DIRNAME = "checkpoints"


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

    def restore(self, abstract_state: Any, step: Optional[int] = None) -> Any:
        """``abstract_state``: pytree of jax.ShapeDtypeStruct with shardings."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        return self.manager.restore(step, args=ocp.args.StandardRestore(abstract_state))

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
    step = manager.latest_step()
    if step is None:
        manager.close()
        raise FileNotFoundError(f"no checkpoint found under {directory}")
    restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_variables)
    restored = manager.restore(step, args=ocp.args.PyTreeRestore(
        item=abstract_variables, restore_args=restore_args, partial_restore=True))
    manager.close()
    return restored
