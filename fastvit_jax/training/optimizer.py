"""AdamW with Apple's (timm's) schedule and weight-decay set.

Schedule (timm ``CosineLRScheduler``, ``warmup_prefix=False``, evaluated per step here
instead of per epoch): linear warm-up from ``warmup_lr`` to the peak over
``warmup_steps``; afterwards ``min_lr + (peak - min_lr) * (1 + cos(pi * t / T)) / 2`` at the
absolute step ``t`` over the cosine length ``T``; ``min_lr`` after ``T`` (cool-down).

Weight decay: the reference run (timm ``param_groups_weight_decay``) decayed every
parameter with ndim > 1 that is not a bias: conv/linear weights and the (C,1,1) layer
scales. Our layer scales are (C,), so the mask is by leaf name: decay iff the leaf is
named ``kernel`` or ``gamma``; biases and BatchNorm scale/bias do not decay.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax

DECAY_LEAF_NAMES = frozenset({"kernel", "gamma"})


def lr_schedule(
    peak_lr: Any,
    *,
    total_steps: Any,
    warmup_steps: Any,
    warmup_lr: Any,
    min_lr: Any,
) -> Callable[[Any], jnp.ndarray]:
    """timm-style warm-up + cosine (absolute step) schedule; ``total_steps`` = cosine length.

    The arguments may be Python numbers or traced scalars: the train step receives them as
    inputs (``RunArgs``), so a run of another length reuses the compiled step.
    """

    def schedule(step):
        t = jnp.asarray(step, jnp.float32)
        total = jnp.maximum(jnp.asarray(total_steps, jnp.float32), 1.0)
        warm = jnp.maximum(jnp.asarray(warmup_steps, jnp.float32), 0.0)
        cos = min_lr + 0.5 * (peak_lr - min_lr) * (1.0 + jnp.cos(jnp.pi * jnp.minimum(t, total) / total))
        warmup = warmup_lr + t * (peak_lr - warmup_lr) / jnp.maximum(warm, 1.0)
        return jnp.where(t < warm, warmup, cos)

    return schedule


def _leaf_name(path) -> str:
    last = path[-1]
    for attr in ("key", "name", "idx"):
        if hasattr(last, attr):
            return str(getattr(last, attr))
    return str(last)


def weight_decay_mask(params: Any) -> Any:
    """Pytree of bools: True for leaves named 'kernel' or 'gamma'."""
    return jax.tree_util.tree_map_with_path(lambda p, _: _leaf_name(p) in DECAY_LEAF_NAMES, params)


def make_optimizer(
    schedule: Callable,
    *,
    weight_decay: float,
    b1: float,
    b2: float,
    eps: float,
    clip_grad: Optional[float] = None,
) -> optax.GradientTransformation:
    """torch.optim.AdamW semantics (decoupled decay scaled by lr), masked decay; the values are the
    caller's (``TrainConfig`` holds the recipe's)."""
    tx = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=weight_decay_mask)
    if clip_grad:
        tx = optax.chain(optax.clip_by_global_norm(clip_grad), tx)
    return tx
