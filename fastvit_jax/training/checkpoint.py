"""Orbax CheckpointManager wrapper: async saves, keep-last-N, sharded restore.

A checkpoint that cannot be read (truncated data, missing or damaged metadata) does not
block a run: restore tries the steps newest first, moves each unreadable one aside to
``<step>.corrupt-<utc time>`` (nothing is deleted), logs one line naming it and the error, and
uses the newest readable one. ``CheckpointError`` names every step tried when none is.

A checkpoint that is readable but holds another model (a mistyped ``--variant``, another
class count) is never moved: its stored shapes are compared with the model's before any
array is read, and ``CheckpointMismatchError`` names the first differing tensor, both
shapes and the step; the files stay as they are.

A save that fails on the file system (disk full, quota, permission, read-only) raises
``CheckpointWriteError``: one line naming the step, the directory, the cause and, for a full
disk, the space the checkpoint needs; the partial ``<step>.orbax-checkpoint-tmp*`` folder is
removed and the previous checkpoints are untouched, so the same command resumes once the
cause is fixed. Orbax's background threads log these errors with tracebacks before the main
thread re-raises them; ``OrbaxThreadErrors`` is the logging filter that drops those records.

Replicated arrays are written replica-parallel (each replica writes a slice) only on TPU, as
orbax itself does on GPU: on a CPU host the arrays are in host memory already, and the slicing
costs one compiled program per distinct array shape on a process's first save (t8 over 8 CPU
devices: 14.7 s of a 23.6 s first save; 1,291 arrays of distinct shapes: 72 s against 0.4 s).
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
import time
import traceback
from typing import Any, Callable, Dict, List, Optional, Tuple

import jax
import orbax.checkpoint as ocp

from fastvit_jax.io import WriteError, describe_os_error, file_system_error

CHECKPOINTS_DIRNAME = "checkpoints"

log = logging.getLogger("fastvit_jax.training")


class CheckpointError(RuntimeError):
    """No checkpoint of the workdir could be read; the message lists each step and its error."""


class CheckpointMismatchError(CheckpointError):
    """A readable checkpoint holds another model than the one being restored; nothing was moved."""


class CheckpointWriteError(WriteError):
    """A checkpoint could not be written; the message names the step, directory, cause and space needed."""


def remove_partial_saves(directory: str) -> List[str]:
    """Deletes ``<directory>/*.orbax-checkpoint-tmp*`` (unfinished saves; process 0 only); returns them."""
    partial = sorted(glob.glob(os.path.join(glob.escape(directory), "*.orbax-checkpoint-tmp*")))
    if jax.process_index() == 0:
        for path in partial:
            shutil.rmtree(path, ignore_errors=True)
    return partial


def tree_nbytes(tree: Any) -> int:
    """Bytes of all array leaves of ``tree`` (global shapes): about what a checkpoint of it takes."""
    return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "dtype"))


class OrbaxThreadErrors(logging.Filter):
    """Drops ERROR records raised inside orbax (its threads log them, asyncio reports their
    futures at exit) that the main thread re-raises anyway.

    Install on the ``absl`` and ``asyncio`` loggers when ``CheckpointWriteError`` is reported to
    the user as one line (``train_tpu.py`` does, unless FASTVIT_DEBUG is set)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        if _ORBAX_SOURCE in record.pathname:
            return False
        trace = traceback.extract_tb(record.exc_info[2]) if record.exc_info and record.exc_info[2] else []
        return not any(_ORBAX_SOURCE in frame.filename for frame in trace)


_ORBAX_SOURCE = f"{os.sep}orbax{os.sep}"


def drop_abandoned_read_callbacks(previous: Callable[[Any], None]) -> Callable[[Any], None]:
    """A ``sys.unraisablehook`` that ignores "Event loop is closed" from asyncio's call_soon_threadsafe.

    After a failed restore, orbax closes its event loop while tensorstore still completes the
    abandoned reads; their callbacks then raise into the void (one traceback per array). Every
    other unraisable exception goes to ``previous``.
    """
    def hook(unraisable: Any) -> None:
        error = unraisable.exc_value
        if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
            return
        previous(unraisable)

    return hook


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0][:200]}" if text else type(error).__name__


def move_aside(directory: str, step: int) -> str:
    """Renames ``<directory>/<step>`` to ``<step>.corrupt-<utc time>`` (process 0 only); returns the new path."""
    target = os.path.join(directory, f"{step}.corrupt-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
    if jax.process_index() == 0:
        os.replace(os.path.join(directory, str(step)), target)
    return target


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _shapes_by_path(tree: Any) -> Dict[str, Tuple[int, ...]]:
    """{'head/fc/kernel': shape} of a tree of arrays, ShapeDtypeStructs or orbax ArrayMetadata."""
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
    return {"/".join(_key_name(k) for k in path): tuple(leaf.shape) for path, leaf in leaves
            if hasattr(leaf, "shape")}


def _field(tree: Any, name: str) -> Any:
    return tree.get(name) if isinstance(tree, dict) else getattr(tree, name, None)


MODEL_FIELDS = ("params", "batch_stats")  # what a different model changes (the rest follows from them)


def model_mismatch(stored: Any, abstract: Any) -> Optional[str]:
    """How the model tensors of a checkpoint's stored tree differ from ``abstract``'s, or None.

    Compares the shapes under ``MODEL_FIELDS`` (params / batch_stats) by path; returns e.g.
    "params/head/fc/kernel is (192, 10) in the checkpoint, (256, 10) in this model (and 40 more)".
    """
    differences: List[str] = []
    for name in MODEL_FIELDS:
        want, have = _field(abstract, name), _field(stored, name)
        if want is None:
            continue
        if have is None:
            differences.append(f"{name} is missing from the checkpoint")
            continue
        want_shapes, have_shapes = _shapes_by_path(want), _shapes_by_path(have)
        for path in sorted(set(want_shapes) | set(have_shapes)):
            a, b = have_shapes.get(path), want_shapes.get(path)
            if a == b:
                continue
            where = f"{name}/{path}"
            if a is None:
                differences.append(f"{where} is in this model, not in the checkpoint")
            elif b is None:
                differences.append(f"{where} is in the checkpoint, not in this model")
            else:
                differences.append(f"{where} is {a} in the checkpoint, {b} in this model")
    if not differences:
        return None
    more = f" (and {len(differences) - 1} more)" if len(differences) > 1 else ""
    return differences[0] + more


def stored_tree(directory: str, step: int) -> Any:
    """The tree of ArrayMetadata (shapes, dtypes) saved with ``<directory>/<step>``; raises if unreadable."""
    from etils import epath

    return ocp.PyTreeCheckpointHandler().metadata(epath.Path(directory) / str(step) / "default").tree


# Phrases of orbax / tensorstore errors that mean "the target asks for other shapes", not damage.
_MISMATCH_PHRASES = ("requested shape", "does not match", "mismatch", "incompatible shape", "not compatible")


def _is_mismatch(error: BaseException) -> bool:
    text = str(error).lower()
    return isinstance(error, (ValueError, KeyError, TypeError)) and any(p in text for p in _MISMATCH_PHRASES)


def restore_newest_readable(manager: "ocp.CheckpointManager", directory: str, abstract: Any,
                            restore: Callable[[int], Any]) -> Tuple[Any, int]:
    """``restore(step)`` on the steps newest first. Returns (tree, step).

    Unreadable steps are moved aside and the next older one is tried; a readable step that
    holds another model than ``abstract`` raises ``CheckpointMismatchError`` and nothing moves.
    """
    tried: List[str] = []
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            stored = stored_tree(directory, step)
        except Exception as e:  # noqa: BLE001 - missing/damaged metadata: the step is unreadable
            error: Optional[BaseException] = e
        else:
            mismatch = model_mismatch(stored, abstract)
            if mismatch:
                raise CheckpointMismatchError(
                    f"checkpoint step {step} in {directory} holds another model: {mismatch}. Nothing was moved or "
                    f"changed; rerun with the settings it was trained with (see its config.json: --variant, "
                    f"--num_classes), or use a new --workdir")
            try:
                return restore(step), int(step)
            except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise many types for damaged files
                if _is_mismatch(e):
                    raise CheckpointMismatchError(
                        f"checkpoint step {step} in {directory} does not fit this run's state ({_first_line(e)}); "
                        f"nothing was moved or changed; rerun with the settings it was trained with, or use a "
                        f"new --workdir") from e
                error = e
        moved = move_aside(directory, step)
        log.warning("checkpoint step %d is unreadable (%s); moved aside to %s", step, _first_line(error), moved)
        tried.append(f"step {step}: {_first_line(error)}")
    manager.reload()
    raise CheckpointError(f"no readable checkpoint in {directory}; tried " + "; ".join(tried)
                          + " (the unreadable ones were moved aside as <step>.corrupt-<time>)")


def save_replica_parallel(backend: str) -> bool:
    """Whether replicas write slices of replicated arrays in parallel: on TPU only (module docstring)."""
    return backend == "tpu"


def configure_array_saving(backend: str) -> None:
    """Registers orbax's jax.Array handler for ``backend`` (process-wide, as orbax's own default is)."""
    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=save_replica_parallel(backend)), override=True)


def checkpoint_dir(workdir: str) -> str:
    return os.path.abspath(os.path.join(workdir, CHECKPOINTS_DIRNAME))


class Checkpointer:
    """Saves/restores the TrainState under ``<workdir>/checkpoints/<step>``."""

    def __init__(self, workdir: str, *, max_to_keep: int = 3, async_save: bool = True):
        self.directory = checkpoint_dir(workdir)
        configure_array_saving(jax.default_backend())
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            create=True,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,  # unfinished saves of a killed run
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self._in_flight: Optional[Tuple[int, int]] = None  # (step, bytes) of the save being written
        self._write_failed = False  # a CheckpointWriteError was raised: later errors repeat it

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, *, force: bool = True) -> bool:
        """Starts writing ``state`` as ``step`` (async); a failed earlier save raises here or in ``wait``."""
        if step in self.manager.all_steps():
            return False
        previous, self._in_flight = self._in_flight, (step, tree_nbytes(state))
        try:
            return self.manager.save(step, args=ocp.args.StandardSave(state), force=force)
        except Exception as e:  # noqa: BLE001 - re-raised as is unless it is a file-system failure
            failure = self._write_error(e, previous or self._in_flight)
            if failure is e:
                raise
            raise failure from e

    def _write_error(self, error: Exception, in_flight: Tuple[int, int]) -> Exception:
        """``CheckpointWriteError`` for a file-system failure (after removing the partial save), else ``error``."""
        cause = file_system_error(error)
        if cause is None:
            return error
        self._in_flight, self._write_failed = None, True
        step, nbytes = in_flight
        problem = describe_os_error(self.directory, cause, nbytes)  # the free space before the cleanup
        remove_partial_saves(self.directory)
        self.manager.reload()
        intact = [s for s in self.manager.all_steps() if s != step]
        kept = f"checkpoint step {max(intact)} is intact" if intact else "no earlier checkpoint exists"
        return CheckpointWriteError(
            f"checkpoint step {step} not saved: {problem}; "
            f"the partial save was removed and {kept}; once that is fixed, rerun the same command to resume")

    def restore(self, abstract_state: Any) -> Tuple[Any, int]:
        """(state, step) of the newest readable checkpoint (see the module docstring).

        ``abstract_state``: pytree of jax.ShapeDtypeStruct with shardings.
        """
        if self.latest_step() is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        restored = restore_newest_readable(
            self.manager, self.directory, abstract_state,
            lambda step: self.manager.restore(step, args=ocp.args.StandardRestore(abstract_state)))
        self.manager.reload()  # steps moved aside are gone from the manager's view
        return restored

    def wait(self) -> None:
        """Blocks until the save in flight is written; ``CheckpointWriteError`` if it could not be."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - re-raised as is unless it is a file-system failure
            if self._in_flight is None:
                if self._write_failed and file_system_error(e) is not None:
                    return  # the failure of a save already reported
                raise
            failure = self._write_error(e, self._in_flight)
            if failure is e:
                raise
            raise failure from e
        self._in_flight = None

    def close(self) -> None:
        try:
            self.wait()
        finally:
            try:
                self.manager.close()
            except Exception as e:  # noqa: BLE001
                if not (self._write_failed and file_system_error(e) is not None):
                    raise
            if self._write_failed:  # the failed save's other threads may have written after the first error
                remove_partial_saves(self.directory)


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
        restored, _ = restore_newest_readable(manager, directory, abstract_variables, lambda step: manager.restore(
            step, args=ocp.args.PyTreeRestore(item=abstract_variables, restore_args=restore_args,
                                              partial_restore=True)))
        return restored
    finally:
        manager.close()
