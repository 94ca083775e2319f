"""The training loop: ``train_and_evaluate(config, model_fn=...) -> TrainResult``.

Reads in execution order: setup (compile cache, dataset facts, mesh, workdir config, step
plan) -> model and optimizer -> state (resumed, fine-tuned or fresh; created sharded) ->
data -> the train step, compiled before the loop -> the loop (metrics, NaN stop,
checkpoints, SIGTERM, periodic eval) -> final eval, plot, fused export of the EMA weights.

Under ``jax.jit`` with the batch sharded over the mesh, BatchNorm statistics are
computed over the *global* batch (sync-BN); Apple's PyTorch DDP run normalised per GPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import shutil
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh

from fastvit_jax.io import check_writable_dir
from fastvit_jax.model import create_model
from fastvit_jax.training import checkpoint as ckpt_lib
from fastvit_jax.training import mesh as mesh_lib
from fastvit_jax.training import multihost
from fastvit_jax.training.compile_cache import announce_compilation, count_cache_hits, enable_compilation_cache
from fastvit_jax.training.config import CONFIG_FILENAME, TrainConfig, check_workdir_config, write_workdir_config
from fastvit_jax.training.evaluate import run_eval
from fastvit_jax.training.metrics import MetricWriter, plot_curves, read_metrics
from fastvit_jax.training.plan import Plan, make_plan
from fastvit_jax.training.preemption import StopSignals
from fastvit_jax.training.pretrained import export_fused, merge_pretrained
from fastvit_jax.training.programs import StepPrograms, build_model, build_step_programs, train_batch_spec
from fastvit_jax.training.setup import setup_run
from fastvit_jax.training.state import TrainState, create_state, init_variables, run_once_compiler_options
from fastvit_jax.training.steps import config_optimizer, run_args, schedule_of
from fastvit_jax.training.workdir_lock import WorkdirLock
from fastvit_jax.weights.files import read_variables

log = logging.getLogger("fastvit_jax.training")


class NonFiniteLossError(FloatingPointError):
    """The loss (or gradient norm) became NaN/Inf; carries the step number."""

    def __init__(self, step: int, loss: float, last_checkpoint: Optional[int]):
        self.step = step
        self.loss = loss
        self.last_checkpoint = last_checkpoint
        where = f"step {last_checkpoint}" if last_checkpoint is not None else "none saved yet"
        super().__init__(
            f"non-finite loss ({loss}) at step {step}; the run was stopped and the bad state was "
            f"not saved. Last good checkpoint: {where}. Try a lower --lr, --clip_grad, or float32."
        )


@dataclasses.dataclass
class TrainResult:
    """What a call of ``train_and_evaluate`` did and produced."""

    config: TrainConfig  # with num_classes filled in from the dataset
    plan: Plan
    workdir: str
    final_step: int
    resumed_from: Optional[int]  # the checkpoint step this call started from
    losses: Dict[int, float]  # {step: loss} of the steps this call trained (this process)
    preempted: bool
    train_step_from_cache: Optional[bool]  # loaded from the persistent cache; None if not compiled
    eval: Optional[Dict[str, float]]  # final raw and EMA metrics (None when preempted)
    plot_path: Optional[str]
    export_path: Optional[str]
    state: TrainState
    model: nn.Module  # the train-form linen module
    mesh: Mesh


# ------------------------------------------------------------------------------------------ helpers


def _log_plan(plan: Plan, length_changes: Dict[str, Tuple[Any, Any]]) -> None:
    for note in plan.notes:
        log.warning(note)
    if length_changes:
        changed = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in length_changes.items())
        log.info("run length changed (%s): schedule recomputed", changed)
    log.info("plan: %s", plan.describe())


def refuse_fresh_start(config: TrainConfig, checkpoint_directory: str) -> None:
    """Raises CheckpointError when a workdir without a readable checkpoint shows an earlier run
    (config.json, or checkpoints moved aside as unreadable), unless --restart_from_scratch."""
    leftovers = []
    if os.path.exists(os.path.join(config.workdir, CONFIG_FILENAME)):
        leftovers.append(CONFIG_FILENAME)
    aside = sorted(n for n in os.listdir(checkpoint_directory) if ".corrupt-" in n) \
        if os.path.isdir(checkpoint_directory) else []
    if aside:
        leftovers.append(f"checkpoints moved aside as unreadable ({', '.join(aside)})")
    if leftovers and not config.restart_from_scratch:
        raise ckpt_lib.CheckpointError(
            f"--workdir {config.workdir!r} holds an earlier run ({' and '.join(leftovers)}) but no readable "
            f"checkpoint; starting at step 0 there would mix two runs. Pass --restart_from_scratch to start over in "
            f"it, or use a new --workdir")


def _initial_state(config: TrainConfig, model: nn.Module, tx, shardings: Any, abstract_state: TrainState,
                   checkpointer: ckpt_lib.Checkpointer, init_rng: jax.Array) -> Tuple[TrainState, Optional[int]]:
    """(state, resumed_from): the workdir's latest checkpoint, else --init_from merged, else fresh."""
    if checkpointer.latest_step() is None:
        refuse_fresh_start(config, checkpointer.directory)
    if checkpointer.latest_step() is not None:
        if config.init_from:
            log.info("--init_from ignored: resuming from the workdir's checkpoint")
        state, step = checkpointer.restore(ckpt_lib.abstract_with_shardings(abstract_state, shardings))
        log.info("resumed from %s step %d", checkpointer.directory, step)
        return state, step
    if config.init_from:
        fresh = jax.device_get(jax.jit(lambda rng: init_variables(model, config.image_size, rng),
                                       compiler_options=run_once_compiler_options())(init_rng))
        merged, notes = merge_pretrained(fresh, read_variables(config.init_from))
        for note in notes:
            log.warning(note)
        return jax.jit(lambda variables: create_state(variables, tx), out_shardings=shardings,
                       compiler_options=run_once_compiler_options())(merged), None
    fresh_state = jax.jit(lambda rng: create_state(init_variables(model, config.image_size, rng), tx),
                          out_shardings=shardings, compiler_options=run_once_compiler_options())
    return fresh_state(init_rng), None


def _compile_train_step(programs: StepPrograms, state: TrainState, base_key: jax.Array,
                        args: Dict[str, Any]) -> Tuple[Callable, bool]:
    """(step(state, batch) with ``base_key`` and the run ``args`` bound, whether it came from the persistent
    cache). Explicit shardings, state donated (``programs.train_step``)."""
    mesh = programs.mesh
    replicated = mesh_lib.replicated(mesh)
    start = time.perf_counter()
    what = f"the train step (global batch {programs.train_batch['image'].shape[0]}, {mesh.size} device(s))"
    with count_cache_hits() as hits, announce_compilation(what, jax.config.jax_compilation_cache_dir):
        compiled = programs.train_step.lower(state, programs.train_batch, base_key, args).compile()
    from_cache = hits[0] > 0
    log.info("train step %s in %.1fs", "loaded from the compilation cache" if from_cache else "compiled",
             time.perf_counter() - start)
    args = jax.device_put(args, replicated)
    return (lambda state, batch: compiled(state, batch, base_key, args)), from_cache


def _check_batch_spec(dataset, train_batch: Dict[str, jax.ShapeDtypeStruct]) -> None:
    """The per-process tf.data batches have the image/label shapes and dtypes the step was built for."""
    spec = dataset.element_spec
    for k, want in train_batch.items():
        got = (tuple(spec[k].shape[1:]), np.dtype(spec[k].dtype.as_numpy_dtype))
        if got != (tuple(want.shape[1:]), np.dtype(want.dtype)):
            raise AssertionError(f"the input pipeline's {k!r} is {got}, the train step takes {want}")


def train_augment(config: TrainConfig):
    """The data pipeline's augmentation settings for ``config`` (RandAugment on unless its spec is empty)."""
    from fastvit_jax.data.pipeline import TrainAugment

    return TrainAugment(randaugment=config.randaugment or None, random_erase_prob=config.reprob,
                        color_jitter=config.color_jitter, rrc_scale=tuple(config.rrc_scale), hflip=config.hflip)


class TrainLog:
    """Device metrics of recent steps: checked for NaN/Inf, averaged and written every flush."""

    def __init__(self, writer: MetricWriter, plan: Plan, global_batch_size: int, progress_bar=None):
        self.writer, self.plan, self.global_batch_size, self.progress_bar = writer, plan, global_batch_size, progress_bar
        self.pending: List[Tuple[int, Dict[str, jax.Array]]] = []
        self.losses: Dict[int, float] = {}
        self.last_checkpoint: Optional[int] = None
        self._since = time.perf_counter()

    def add(self, step: int, metrics: Dict[str, jax.Array]) -> None:
        self.pending.append((step, metrics))
        if self.progress_bar is not None:
            self.progress_bar.update(1)

    def flush(self, step: int) -> None:
        """Fetches pending metrics; raises NonFiniteLossError on NaN/Inf; writes their means."""
        if not self.pending:
            return
        steps = [s for s, _ in self.pending]
        host = jax.device_get([m for _, m in self.pending])
        self.pending.clear()
        for s, metrics in zip(steps, host):
            if not (math.isfinite(float(metrics["loss"])) and math.isfinite(float(metrics["grad_norm"]))):
                raise NonFiniteLossError(s, float(metrics["loss"]), self.last_checkpoint)
            self.losses[s] = float(metrics["loss"])
        now = time.perf_counter()
        means = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
        means["img_per_s"] = len(steps) * self.global_batch_size / max(now - self._since, 1e-9)
        means["epoch"] = step / self.plan.steps_per_epoch
        self._since = now
        self.writer.write(step, "train", means)
        if self.progress_bar is not None:
            self.progress_bar.set_postfix(loss=f"{means['loss']:.4f}", lr=f"{means['lr']:.2e}",
                                          img_s=f"{means['img_per_s']:.0f}")


def _progress_bar(config: TrainConfig, plan: Plan, start_step: int):
    if not (config.progress and jax.process_index() == 0 and start_step < plan.total_steps):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=plan.total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                desc=f"fastvit_{config.variant}")


def _evaluate(eval_step: Callable, state: TrainState, config: TrainConfig, mesh: Mesh, writer: MetricWriter,
              step: int) -> Dict[str, float]:
    metrics = run_eval(eval_step, {"": state.variables(ema=False), "ema_": state.variables(ema=True)}, config, mesh)
    writer.write(step, "eval", metrics)
    log.info("eval step %d: top1 %.2f%% top5 %.2f%% loss %.4f | EMA top1 %.2f%% top5 %.2f%% loss %.4f", step,
             100 * metrics["top1"], 100 * metrics["top5"], metrics["loss"], 100 * metrics["ema_top1"],
             100 * metrics["ema_top5"], metrics["ema_loss"])
    return metrics


# ------------------------------------------------------------------------------------------ the loop


def _resume_hint(workdir: str) -> Callable[[], str]:
    """' from step N' (the newest finished checkpoint in the workdir) or ' from the start'."""

    def hint() -> str:
        directory = ckpt_lib.checkpoint_dir(workdir)
        steps = [int(n) for n in os.listdir(directory) if n.isdigit()] if os.path.isdir(directory) else []
        return f" from step {max(steps)} ({directory})" if steps else " from the start (no checkpoint yet)"

    return hint


def train_and_evaluate(config: TrainConfig, *,
                       model_fn: Callable[..., nn.Module] = create_model) -> TrainResult:
    """Trains (resuming from ``<workdir>/checkpoints`` if present), evaluates and exports.

    ``model_fn(variant, *, num_classes, drop_path_rate, dtype, remat)`` builds the linen model.
    With several processes, a peer that stops responding for --distributed_timeout seconds
    ends this process with status ``multihost.EXIT_PEER_LOST`` and a message naming it.
    """
    config.validate()
    new_workdir = jax.process_index() == 0 and not (os.path.isdir(config.workdir) and os.listdir(config.workdir))
    try:
        with contextlib.ExitStack() as held, multihost.PeerWatchdog(config.distributed_timeout,
                                                                    _resume_hint(config.workdir)):
            return _train_and_evaluate(config, model_fn, held)
    except BaseException:
        if new_workdir:
            remove_if_nothing_written(config.workdir)
        raise


def remove_if_nothing_written(workdir: str) -> None:
    """Deletes a workdir this run created when the run failed before writing a checkpoint or a metric
    (a dataset or setting error at the first batch must not leave empty checkpoints/ and tensorboard/)."""
    directory = ckpt_lib.checkpoint_dir(workdir)
    if os.path.isdir(directory) and any(n.isdigit() for n in os.listdir(directory)):
        return
    if read_metrics(workdir):
        return
    shutil.rmtree(workdir, ignore_errors=True)


def _train_and_evaluate(config: TrainConfig, model_fn: Callable[..., nn.Module],
                        held: contextlib.ExitStack) -> TrainResult:
    from fastvit_jax.data.pipeline import device_prefetch, make_train_dataset, named_read_errors

    t_start = time.perf_counter()

    # ---- Setup.
    cache_dir = enable_compilation_cache(config.compilation_cache_dir)
    log.info("persistent compilation cache: %s", cache_dir or "off")
    config, info, mesh = setup_run(config)
    is_main = jax.process_index() == 0
    if is_main:
        check_writable_dir(config.workdir, "--workdir")
    held.enter_context(WorkdirLock(config.workdir, enabled=is_main))  # until the run ends, or the process dies
    stop = held.enter_context(StopSignals())  # SIGTERM / Ctrl-C from here to the end: stop at a safe point
    length_changes = check_workdir_config(config.workdir, config)  # config.json is written with the first checkpoint
    plan = make_plan(config, info.num_train)
    _log_plan(plan, length_changes)

    # ---- Model and optimizer.
    model = build_model(config, model_fn)
    optimizer_for = config_optimizer(config)
    args = run_args(plan, config)
    tx = optimizer_for(schedule_of(args))  # its state does not depend on the schedule's values
    # The jitted steps and the state's shardings, as --compile_only builds them (programs.py).
    programs = build_step_programs(config, model, optimizer_for, tx, mesh,
                                   train_batch_spec(config.global_batch_size, config.image_size))

    # ---- State: resumed, fine-tuned from --init_from, or fresh; created sharded.
    abstract_state, shardings = programs.abstract_state, programs.shardings
    init_rng, base_key = jax.random.split(jax.random.PRNGKey(config.seed))
    base_key = jax.device_put(base_key, mesh_lib.replicated(mesh))
    checkpointer = ckpt_lib.Checkpointer(config.workdir, max_to_keep=config.keep_checkpoints)
    state, resumed_from = _initial_state(config, model, tx, shardings, abstract_state, checkpointer, init_rng)
    start_step = int(jax.device_get(state.step))
    log.info("state ready at step %d (%.1fs since start)", start_step, time.perf_counter() - t_start)
    if resumed_from is not None and (change := multihost.topology_change(config.workdir, resumed_from)):
        log.warning(change)

    # ---- Data, from the state's step on (same order as an uninterrupted run).
    dataset = make_train_dataset(
        config.dataset, config.data_dir, global_batch_size=config.global_batch_size, image_size=config.image_size,
        seed=config.seed, start_step=start_step, process_index=jax.process_index(),
        process_count=jax.process_count(), augment=train_augment(config), **config.normalization,
    )

    # ---- Steps: the train step compiled before the loop; every process waits for the others.
    train_step, from_cache = None, None
    _check_batch_spec(dataset, programs.train_batch)
    if start_step < plan.total_steps:
        train_step, from_cache = _compile_train_step(programs, state, base_key, args)
        multihost.barrier("fastvit_train_step_compiled", config.barrier_timeout,
                          "every process to compile or load the train step")
    eval_step = programs.eval_step
    log.info("ready to train (%.1fs since start)", time.perf_counter() - t_start)

    # ---- Loop.
    writer = MetricWriter(config.workdir, enabled=is_main)
    if resumed_from is not None and writer.truncate_after(resumed_from):
        log.info("metrics.jsonl: dropped the records after step %d (they are logged again)", resumed_from)
    elif resumed_from is None and config.restart_from_scratch and writer.truncate_after(0):
        log.info("metrics.jsonl: --restart_from_scratch dropped the earlier run's records")
    progress_bar = _progress_bar(config, plan, start_step)
    train_log = TrainLog(writer, plan, config.global_batch_size, progress_bar)
    train_log.last_checkpoint = resumed_from

    def save(step: int) -> None:
        train_log.flush(step)  # never save a state whose loss was not checked
        if is_main:  # binds the workdir to this config once it holds a checkpoint, not before
            write_workdir_config(config.workdir, config)
            multihost.write_topology(config.workdir)
        if checkpointer.save(step, state):
            train_log.last_checkpoint = step

    def stopped(where: str) -> bool:
        """True (and says so) when a stop signal arrived; ``where`` completes the message."""
        if not stop.is_set():
            return False
        message = f"stopped ({stop.name or 'signal on another process'}) {where}"
        log.warning(message)
        if progress_bar is not None:
            progress_bar.write(message)
        return True

    step, preempted = start_step, False
    batches: Iterator = named_read_errors(device_prefetch(dataset, mesh_lib.batch_sharding(mesh)), config.dataset,
                                          config.data_dir) if train_step else iter(())
    try:
        if train_step is not None and stopped(
                f"before the first step: nothing new to save; rerun to resume{_resume_hint(config.workdir)()}"):
            preempted = True
        while not preempted and step < plan.total_steps:
            batch = next(batches)
            state, metrics = train_step(state, {"image": batch["image"], "label": batch["label"]})
            step += 1
            train_log.add(step, metrics)
            if step % config.log_every == 0:
                train_log.flush(step)
            if step % config.checkpoint_every == 0 or step == plan.total_steps:
                save(step)
            # Several processes: agreeing on the flag is a collective, so only every log_every steps.
            if (jax.process_count() == 1 or step % config.log_every == 0) and stop.is_set():
                save(step)
                checkpointer.wait()
                preempted = stopped(f"at step {step}: checkpoint saved to {checkpointer.directory}")
                break
            if plan.eval_every and step % plan.eval_every == 0 and step < plan.total_steps:
                train_log.flush(step)
                _evaluate(eval_step, state, config, mesh, writer, step)
        train_log.flush(step)
    finally:
        if progress_bar is not None:
            progress_bar.close()
        checkpointer.close()

    result = TrainResult(
        config=config, plan=plan, workdir=os.path.abspath(config.workdir), final_step=step,
        resumed_from=resumed_from, losses=train_log.losses, preempted=preempted,
        train_step_from_cache=from_cache, eval=None, plot_path=None, export_path=None, state=state, model=model,
        mesh=mesh,
    )
    the_rest = "the final checkpoint is saved; rerun the same command to evaluate and export"
    if preempted or stopped(f"after the last step: {the_rest}"):
        result.preempted = True
        writer.close()
        return result

    # ---- End: evaluate raw and EMA, plot, export the fused EMA weights.
    log.info("training done %.1fs since start", time.perf_counter() - t_start)
    result.eval = _evaluate(eval_step, state, config, mesh, writer, step)
    writer.close()
    if stopped(f"during the final evaluation: {the_rest}"):
        result.preempted = True
        return result
    if config.plot and is_main:
        result.plot_path = plot_curves(config.workdir)
    if config.export:
        result.export_path = export_fused(config.workdir, state.variables(ema=True), config, step,
                                          {"ema_top1": f"{result.eval['ema_top1']:.6f}"}, info.class_names)
    log.info("done %.1fs since start", time.perf_counter() - t_start)
    return result
