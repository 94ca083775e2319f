"""Non-trivial variables for tests (the Flax twin of ``torch_ref/testing.py``).

Random-init FastViT is nearly a constant function (layer scales 1e-5, BN stats (0, 1)).
``make_nontrivial`` draws layer scales in [0.2, 0.6], random BN affines and head, then sets
every BN's running statistics to the exact average of its batch statistics over a few
train-mode passes, as torch_ref does with ``momentum=None``.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import traverse_util

from fastvit_jax.layers import BatchNorm


def _randomize_params(params: Mapping, key: jax.Array, head_std: float) -> dict:
    flat = traverse_util.flatten_dict(params)
    out = {}
    for i, (path, value) in enumerate(sorted(flat.items())):
        k = jax.random.fold_in(key, i)
        if path[-1] == "gamma":
            value = jax.random.uniform(k, value.shape, value.dtype, 0.2, 0.6)
        elif path[-1] == "scale":
            value = jax.random.uniform(k, value.shape, value.dtype, 0.5, 1.5)
        elif path[-1] == "bias" and len(path) >= 2 and path[-2] in ("bn", "identity", "norm"):
            value = 0.1 * jax.random.normal(k, value.shape, value.dtype)
        elif path[:2] == ("head", "fc"):
            std = head_std if path[-1] == "kernel" else 0.1
            value = std * jax.random.normal(k, value.shape, value.dtype)
        out[path] = value
    return traverse_util.unflatten_dict(out)


def make_nontrivial(model: Any, variables: Mapping, key: jax.Array, image_size: int | tuple = 128, batch: int = 4,
                    passes: int = 2, head_std: float = 0.2) -> dict:
    """Return a copy of ``variables`` with input-dependent logits (see module docstring)."""
    params = _randomize_params(variables["params"], jax.random.fold_in(key, 0), head_std)
    stats = variables.get("batch_stats", {})
    if not stats:
        return {"params": params}
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    momentum = BatchNorm.momentum
    train_apply = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))
    total = None
    for p in range(passes):
        x = jax.random.normal(jax.random.fold_in(key, 100 + p), (batch, h, w, 3))
        _, upd = train_apply({"params": params, "batch_stats": stats}, x)
        batch_stats = jax.tree.map(lambda new, old: (new - (1 - momentum) * old) / momentum, upd["batch_stats"], stats)
        total = batch_stats if total is None else jax.tree.map(jnp.add, total, batch_stats)
    return {"params": params, "batch_stats": jax.tree.map(lambda t: t / passes, total)}


def relative_error(a, b) -> float:
    """max |a - b| / max |b|, computed in float64 on the host."""
    import numpy as np

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))
