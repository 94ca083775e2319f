"""What a run needs before the model: the dataset's facts, the device mesh, the compute dtype."""

from __future__ import annotations

from typing import Any, Optional, Tuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from fastvit_jax.training import mesh as mesh_lib
from fastvit_jax.training import multihost
from fastvit_jax.training.config import TrainConfig

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
GPUS = ("gpu", "cuda", "rocm")
ACCELERATORS = ("tpu", *GPUS)


def _platform(platform: Optional[str]) -> str:
    """``platform``, or the backend JAX runs on."""
    return platform or jax.default_backend()


def resolve_dtype(name: str, platform: Optional[str] = None) -> Any:
    """'auto' -> bfloat16 on TPU/GPU, float32 on CPU; else the named dtype. ``platform``: the
    backend the step is compiled for (default: JAX's; --compile_only: 'tpu')."""
    if name in (None, "", "auto"):
        return jnp.bfloat16 if _platform(platform) in ACCELERATORS else jnp.float32
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def resolve_remat(name: str, platform: Optional[str] = None) -> str:
    """'auto' -> 'elementwise' on GPU (its step is memory-bound: keeping only conv/matmul outputs
    halves the bytes kept for the backward, docs/performance.md); 'none' on TPU, where XLA's TPU
    compiler fuses that work itself (sa12 at 256 px on a v5e chip, compiler estimates: 2,049 img/s
    at 328 per chip without remat, 1,812 at 320 with elementwise, whose 408 does not fit) and on CPU
    (compute-bound: recomputing costs time); else the named policy."""
    if name in (None, "", "auto"):
        return "elementwise" if _platform(platform) in GPUS else "none"
    return name


def setup_run(config: TrainConfig) -> Tuple[TrainConfig, Any, Mesh]:
    """(config with num_classes filled in, tfds dataset info, mesh).

    Raises DatasetNotFoundError for a dataset that is not prepared, ValueError when
    --num_classes disagrees with the dataset or the batch does not split over the devices.
    With several processes, process 0 prepares the dataset ('demo' is built on first use)
    while the others wait (--barrier_timeout).
    """
    from fastvit_jax.data.pipeline import dataset_info, prepare_dataset

    multihost.run_on_process_0("fastvit_dataset_prepared", lambda: prepare_dataset(config.dataset, config.data_dir),
                               timeout_s=config.barrier_timeout, what=f"prepare dataset {config.dataset!r}")
    info = dataset_info(config.dataset, config.data_dir)
    if config.num_classes and config.num_classes != info.num_classes:
        raise ValueError(f"--num_classes {config.num_classes} but dataset {config.dataset!r} has {info.num_classes}")
    config = config.replace(num_classes=int(info.num_classes))
    mesh = mesh_lib.create_mesh(config.mesh)
    divisor = mesh_lib.batch_size_divisor(mesh)
    if config.global_batch_size % divisor or config.global_batch_size % jax.process_count():
        raise ValueError(
            f"--global_batch_size {config.global_batch_size} is not divisible by the {divisor} devices of the "
            f"batch axes of mesh {dict(mesh.shape)} (and {jax.process_count()} processes)"
        )
    return config, info, mesh
