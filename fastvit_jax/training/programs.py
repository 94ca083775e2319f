"""The run's step programs, built in one place for the trainer (on its own devices) and for
``--compile_only`` (on a TPU slice's devices, ``fastvit_jax.training.aot``): the model for the
target platform, the train state's shapes and shardings, and the jitted train and eval steps
with the run's in/out shardings and their abstract inputs.

What the two share is all of it but the devices: a difference here would make --compile_only
report on a program the run never compiles.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from fastvit_jax.training import mesh as mesh_lib
from fastvit_jax.training.config import TrainConfig
from fastvit_jax.training.setup import resolve_dtype, resolve_remat
from fastvit_jax.training.state import TrainState, create_state, init_variables
from fastvit_jax.training.steps import make_eval_step, make_train_step

BatchSpec = Dict[str, Tuple[tuple, Any]]  # {'image': (global shape, dtype), ...}


def build_model(config: TrainConfig, model_fn: Callable[..., nn.Module], platform: Optional[str] = None,
                lowering: Optional[str] = None) -> nn.Module:
    """``model_fn(variant, ...)`` with the run's dtype and remat policy resolved for ``platform``
    (default: the backend JAX runs on). ``lowering`` ('native'/'shift') is passed only when given:
    a model compiled on this host for another platform must not take this host's default."""
    extra = {"lowering": lowering} if lowering else {}
    return model_fn(config.variant, num_classes=config.num_classes, drop_path_rate=config.drop_path,
                    dtype=resolve_dtype(config.dtype, platform), remat=resolve_remat(config.remat, platform), **extra)


def abstract_train_state(model: nn.Module, image_size: int, tx: optax.GradientTransformation) -> TrainState:
    """The train state's shapes and dtypes (nothing is computed)."""
    return jax.eval_shape(lambda rng: create_state(init_variables(model, image_size, rng), tx),
                          jax.random.PRNGKey(0))


def train_batch_spec(global_batch_size: int, image_size: int) -> BatchSpec:
    """The input pipeline's train batch (``fastvit_jax.data.pipeline``): float32 images, int32 labels."""
    return {"image": ((global_batch_size, image_size, image_size, 3), jnp.float32),
            "label": ((global_batch_size,), jnp.int32)}


def eval_batch_spec(batch_size: int, image_size: int) -> BatchSpec:
    """The pipeline's eval batch: the train batch plus a float32 mask (1 = real example)."""
    return {**train_batch_spec(batch_size, image_size), "mask": ((batch_size,), jnp.float32)}


def jit_train_step(step_fn: Callable, shardings: Any, batch_spec: BatchSpec,
                   mesh: Mesh) -> Tuple[Callable, Dict[str, jax.ShapeDtypeStruct]]:
    """(the jitted train step with the run's shardings, the abstract global batch). The state is
    donated; the batch is split over the mesh's batch axes; key and run arguments are replicated."""
    batch_sharding, replicated = mesh_lib.batch_sharding(mesh), mesh_lib.replicated(mesh)
    jitted = jax.jit(step_fn, in_shardings=(shardings, {k: batch_sharding for k in batch_spec}, replicated,
                                            replicated),
                     out_shardings=(shardings, replicated), donate_argnums=(0,))
    return jitted, abstract_batch(batch_spec, mesh)


def abstract_batch(batch_spec: BatchSpec, mesh: Mesh) -> Dict[str, jax.ShapeDtypeStruct]:
    """``batch_spec`` as global arrays split over the mesh's batch axes."""
    sharding = mesh_lib.batch_sharding(mesh)
    return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding) for k, (shape, dtype) in batch_spec.items()}


def with_shardings(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of ``tree`` carrying ``shardings``."""
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), tree, shardings)


@dataclasses.dataclass(frozen=True)
class StepPrograms:
    """The jitted steps of a run on ``mesh`` and what they take."""

    mesh: Mesh
    abstract_state: TrainState  # shapes and dtypes
    shardings: Any  # NamedShardings of the state (replicated, or split over 'fsdp')
    train_step: Callable  # jit(step(state, batch, base_key, run_args)), state donated
    train_batch: Dict[str, jax.ShapeDtypeStruct]  # the abstract global train batch, split over the batch axes
    eval_step: Callable  # jit(step(variables_by_prefix, batch)), replicated sums

    def train_inputs(self, args: Dict[str, Any]) -> tuple:
        """Abstract (state, batch, base_key, run args) of the train step: what the trainer passes."""
        replicated = mesh_lib.replicated(self.mesh)
        key = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=replicated)
        scalars = {k: jax.ShapeDtypeStruct((), jnp.float32, sharding=replicated) for k in args}
        return with_shardings(self.abstract_state, self.shardings), self.train_batch, key, scalars

    def eval_inputs(self, batch_spec: BatchSpec) -> tuple:
        """Abstract (variables by prefix, batch) of the eval step: the state's weights and their EMA,
        as the trainer evaluates them (``trainer._evaluate``)."""
        state = with_shardings(self.abstract_state, self.shardings)
        return {"": state.variables(ema=False), "ema_": state.variables(ema=True)}, abstract_batch(batch_spec,
                                                                                                  self.mesh)


def build_step_programs(config: TrainConfig, model: nn.Module, optimizer_for: Callable, tx: optax.GradientTransformation,
                        mesh: Mesh, batch_spec: BatchSpec) -> StepPrograms:
    """The run's train and eval steps for ``mesh``; ``tx`` is ``optimizer_for(schedule)`` (its state's
    shapes do not depend on the schedule)."""
    abstract_state = abstract_train_state(model, config.image_size, tx)
    shardings = mesh_lib.state_shardings(mesh, abstract_state, fsdp_min_size=config.fsdp_min_size)
    train_step, train_batch = jit_train_step(make_train_step(model, optimizer_for, config), shardings, batch_spec,
                                             mesh)
    eval_step = jax.jit(make_eval_step(model), out_shardings=mesh_lib.replicated(mesh))
    return StepPrograms(mesh, abstract_state, shardings, train_step, train_batch, eval_step)
