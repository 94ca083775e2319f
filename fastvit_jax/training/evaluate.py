"""Evaluation: one pass over the validation split, and ``--eval_only`` on a file or a workdir.

A workdir is evaluated from its latest checkpoint with an orbax partial restore of
params, batch_stats and their EMA (the optimizer state is not read). A weight file is
read by ``fastvit_jax.weights.read_variables`` and evaluated in the form it has: train form,
or fused (``inference_mode=True``).
"""

from __future__ import annotations

import itertools
import logging
import math
import os
from typing import Callable, Dict

import flax.linen as nn
import jax
from jax.sharding import Mesh

from fastvit_jax.io import describe_os_error, file_system_error
from fastvit_jax.model import create_model
from fastvit_jax.training import checkpoint as ckpt_lib
from fastvit_jax.training import mesh as mesh_lib
from fastvit_jax.training import multihost
from fastvit_jax.training.compile_cache import enable_compilation_cache
from fastvit_jax.training.config import TrainConfig, check_eval_config
from fastvit_jax.training.metrics import MetricWriter
from fastvit_jax.training.pretrained import tree_matches
from fastvit_jax.training.setup import resolve_dtype, setup_run
from fastvit_jax.training.state import init_variables
from fastvit_jax.training.steps import make_eval_step
from fastvit_jax.weights.files import read_variables

log = logging.getLogger("fastvit_jax.training")

_eval_calls = itertools.count()  # every process evaluates equally often: barrier names agree


def eval_batch_size(config: TrainConfig, mesh: Mesh) -> int:
    """--eval_batch_size (or the train batch) rounded down to a multiple of devices and processes."""
    divisor = math.lcm(mesh_lib.batch_size_divisor(mesh), jax.process_count())
    requested = config.eval_batch_size or config.global_batch_size
    return max(divisor, (requested // divisor) * divisor)


def run_eval(eval_step: Callable, variables_by_prefix: Dict[str, dict], config: TrainConfig,
             mesh: Mesh) -> Dict[str, float]:
    """One pass over the validation split: {prefix + 'loss'/'top1'/'top5'} means and num_examples.

    The eval step is compiled (or loaded from the cache) before the first batch runs, and
    every process waits for the others there, so no collective starts while a peer compiles.
    """
    from fastvit_jax.data.pipeline import device_prefetch, make_eval_dataset, named_read_errors

    dataset = make_eval_dataset(
        config.dataset, config.data_dir, batch_size=eval_batch_size(config, mesh), image_size=config.image_size,
        crop_pct=config.eval_crop_pct, process_index=jax.process_index(), process_count=jax.process_count(),
        interpolation=config.eval_interpolation, **config.normalization,
    )
    batches = ({k: batch[k] for k in ("image", "label", "mask")}
               for batch in named_read_errors(device_prefetch(dataset, mesh_lib.batch_sharding(mesh)),
                                              config.dataset, config.data_dir))
    first = next(batches, None)
    if first is not None and jax.process_count() > 1:
        eval_step.lower(variables_by_prefix, first).compile()
        multihost.barrier(f"fastvit_eval_step_compiled_{next(_eval_calls)}", config.barrier_timeout,
                          "every process to compile or load the eval step")
    pending = [eval_step(variables_by_prefix, batch)
               for batch in itertools.chain([first] if first is not None else [], batches)]
    totals: Dict[str, float] = {}
    for sums in jax.device_get(pending):
        for k, v in sums.items():
            totals[k] = totals.get(k, 0.0) + float(v)
    means = {}
    for prefix in variables_by_prefix:
        count = max(totals.get(f"{prefix}count", 0.0), 1.0)
        for k in ("loss", "top1", "top5"):
            means[f"{prefix}{k}"] = totals.get(f"{prefix}{k}", float("nan")) / count
    means["num_examples"] = totals.get(f"{next(iter(variables_by_prefix))}count", 0.0)
    return means


def _workdir_of(path: str) -> str:
    """A workdir, or its checkpoints/ folder -> the workdir."""
    path = path.rstrip("/")
    if os.path.basename(path) == ckpt_lib.CHECKPOINTS_DIRNAME and not os.path.isdir(
            os.path.join(path, ckpt_lib.CHECKPOINTS_DIRNAME)):
        return os.path.dirname(path)
    return path


def _variables_from_workdir(workdir: str, model: nn.Module, config: TrainConfig, mesh: Mesh) -> Dict[str, dict]:
    check_eval_config(workdir, config)
    shapes = jax.eval_shape(lambda: init_variables(model, config.image_size))
    abstract = {"params": shapes["params"], "batch_stats": shapes["batch_stats"],
                "ema_params": shapes["params"], "ema_batch_stats": shapes["batch_stats"]}
    shardings = mesh_lib.state_shardings(mesh, abstract, fsdp_min_size=config.fsdp_min_size)
    restored = ckpt_lib.restore_eval_variables(workdir, ckpt_lib.abstract_with_shardings(abstract, shardings))
    return {"": {"params": restored["params"], "batch_stats": restored["batch_stats"]},
            "ema_": {"params": restored["ema_params"], "batch_stats": restored["ema_batch_stats"]}}


def _model_for_file(path: str, loaded: dict, config: TrainConfig, model_fn: Callable, dtype) -> nn.Module:
    """The train-form or the fused model, whichever the file's parameters match."""
    head = loaded["params"]["head"]["fc"]["kernel"]
    if head.shape[-1] != config.num_classes:
        raise ValueError(f"{path} has a {head.shape[-1]}-class head but dataset {config.dataset!r} has "
                         f"{config.num_classes} classes")
    for inference_mode in (False, True):
        model = model_fn(config.variant, num_classes=config.num_classes, dtype=dtype, inference_mode=inference_mode)
        if tree_matches(loaded["params"], jax.eval_shape(lambda: init_variables(model, config.image_size))["params"]):
            return model
    raise ValueError(f"{path} matches neither the train-form nor the fused fastvit_{config.variant}")


def evaluate_checkpoint(config: TrainConfig, *, model_fn: Callable[..., nn.Module] = create_model
                        ) -> Dict[str, float]:
    """--eval_only: evaluates --init_from (a weight file or a workdir) or else --workdir.

    ``model_fn(variant, *, num_classes, dtype, inference_mode)`` builds the model.
    Returns {'loss', 'top1', 'top5', 'num_examples'} (and 'ema_*' for a workdir).
    """
    enable_compilation_cache(config.compilation_cache_dir)
    config, _, mesh = setup_run(config)
    dtype = resolve_dtype(config.dtype)
    source = config.init_from or config.workdir
    if os.path.isdir(source):
        model = model_fn(config.variant, num_classes=config.num_classes, dtype=dtype, inference_mode=False)
        variables_by_prefix = _variables_from_workdir(_workdir_of(source), model, config, mesh)
    else:
        loaded = read_variables(source)
        model = _model_for_file(source, loaded, config, model_fn, dtype)
        variables_by_prefix = {"": jax.device_put(loaded, mesh_lib.replicated(mesh))}
    eval_step = jax.jit(make_eval_step(model), out_shardings=mesh_lib.replicated(mesh))
    metrics = run_eval(eval_step, variables_by_prefix, config, mesh)
    log.info("eval-only %s: %s", source, ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    if jax.process_index() == 0 and config.workdir:
        _record(config.workdir, metrics)
    return metrics


def _record(workdir: str, metrics: Dict[str, float]) -> None:
    """Appends the eval-only record to metrics.jsonl; a read-only or full workdir is a warning, not a failure."""
    try:
        writer = MetricWriter(workdir, tensorboard=False)
        writer.write(-1, "eval_only", metrics)
        writer.close()
    except OSError as e:
        cause = file_system_error(e) or e
        log.warning("eval-only results not written to %s (%s): they are printed only", workdir,
                    describe_os_error(workdir, cause))
