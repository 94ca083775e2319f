"""TrainState pytree, fresh variables of a model, and a state built from variables."""

from __future__ import annotations

from typing import Any, Dict, Optional

import flax
import flax.linen as nn
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


def init_variables(model: nn.Module, image_size: int, rng: Optional[jax.Array] = None) -> dict:
    """{'params', 'batch_stats'} of ``model`` for (1, image_size, image_size, 3) input."""
    rng = jax.random.PRNGKey(0) if rng is None else rng
    variables = model.init({"params": rng}, jnp.zeros((1, image_size, image_size, 3), jnp.float32), train=False)
    return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}


def run_once_compiler_options() -> Optional[Dict[str, Any]]:
    """XLA options for a program that runs once, initialisation: on CPU, no backend optimisation.

    Drawing a FastViT's ~400 random arrays is one program of ~400 small fusions, and XLA:CPU
    spends most of its compile optimising them: t8's initialisation compiles in ~8 s instead of
    ~13 s and then runs in 0.3 s instead of 0.05 s (some values differ by one float32 ulp).
    Accelerators compile it as usual (None)."""
    return {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None


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
