"""TrainState pytree and its (sharded) initialisation."""

from __future__ import annotations

from typing import Any, Callable, Optional

import flax
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
    step: jnp.ndarray  # int32 scalar: number of optimizer updates applied
    params: Any
    batch_stats: Any
    opt_state: Any
    ema_params: Any
    ema_batch_stats: Any

    def variables(self, ema: bool = False) -> dict:
        if ema:
            return {"params": self.ema_params, "batch_stats": self.ema_batch_stats}
        return {"params": self.params, "batch_stats": self.batch_stats}


def create_state(variables: dict, tx: optax.GradientTransformation) -> TrainState:
    params = variables["params"]
    batch_stats = variables.get("batch_stats", {})
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        opt_state=tx.init(params),
        ema_params=jax.tree.map(jnp.copy, params),
        ema_batch_stats=jax.tree.map(jnp.copy, batch_stats),
    )


def make_init_fn(
    model,
    tx: optax.GradientTransformation,
    image_size: int,
    init_variables: Optional[Callable[[dict], dict]] = None,
) -> Callable[[jax.Array], TrainState]:
    """rng -> TrainState. ``init_variables`` may transform the fresh variables (fine-tuning)."""

    def init(rng):
        variables = model.init({"params": rng}, jnp.zeros((1, image_size, image_size, 3), jnp.float32), train=False)
        variables = flax.core.unfreeze(variables) if isinstance(variables, flax.core.FrozenDict) else dict(variables)
        if init_variables is not None:
            variables = init_variables(variables)
        return create_state(variables, tx)

    return init
