"""The two jitted computations: one training step and one eval batch (pure functions)."""

from __future__ import annotations

from typing import Any, Callable, Dict

import flax.linen as nn
import jax
import numpy as np
import optax

from fastvit_jax.training.config import TrainConfig
from fastvit_jax.training.ema import ema_update
from fastvit_jax.training.losses import eval_sums, soft_cross_entropy, topk_correct
from fastvit_jax.training.mixup import mixup_cutmix
from fastvit_jax.training.optimizer import lr_schedule, make_optimizer
from fastvit_jax.training.plan import Plan
from fastvit_jax.training.state import TrainState


# What the train step takes as inputs rather than constants: everything that depends on the
# run's length (so extending or shortening a run reuses the compiled program).
RUN_ARG_NAMES = ("peak_lr", "schedule_steps", "warmup_steps", "warmup_lr", "min_lr", "ema_decay")


def run_args(plan: Plan, config: TrainConfig) -> Dict[str, np.ndarray]:
    """The train step's run arguments (float32 scalars) of ``plan``."""
    values = {"peak_lr": plan.peak_lr, "schedule_steps": plan.schedule_steps, "warmup_steps": plan.warmup_steps,
              "warmup_lr": config.warmup_lr, "min_lr": config.min_lr, "ema_decay": plan.ema_decay}
    return {k: np.float32(values[k]) for k in RUN_ARG_NAMES}


def schedule_of(args: Dict[str, Any]) -> Callable:
    """The learning-rate schedule the run arguments describe (traced or concrete)."""
    return lr_schedule(args["peak_lr"], total_steps=args["schedule_steps"], warmup_steps=args["warmup_steps"],
                       warmup_lr=args["warmup_lr"], min_lr=args["min_lr"])


def config_optimizer(config: TrainConfig) -> Callable[[Callable], optax.GradientTransformation]:
    """schedule -> the run's AdamW (weight decay, betas, epsilon, clipping from ``config``)."""
    return lambda schedule: make_optimizer(schedule, weight_decay=config.weight_decay, b1=config.adam_b1,
                                           b2=config.adam_b2, eps=config.adam_eps, clip_grad=config.clip_grad)


def make_train_step(model: nn.Module, optimizer_for: Callable[[Callable], optax.GradientTransformation],
                    config: TrainConfig) -> Callable:
    """(state, {'image': (B,H,W,3), 'label': (B,)}, key, run args) -> (new state, scalar metrics).

    ``optimizer_for(schedule)`` builds the optimizer for a learning-rate schedule; the step
    builds it from the run arguments (``run_args``: schedule and EMA decay), which it takes as
    inputs, so the compiled program does not depend on the run's length.

    Mixup/cutmix and drop path draw from ``key`` folded with the step, so a resumed run
    draws the same numbers as an uninterrupted one.
    """

    def train_step(state: TrainState, batch: Dict[str, jax.Array], base_key: jax.Array,
                   args: Dict[str, jax.Array]):
        schedule = schedule_of(args)
        tx = optimizer_for(schedule)
        ema_decay = args["ema_decay"]
        k_mix, k_drop = jax.random.split(jax.random.fold_in(base_key, state.step))
        images, targets, _ = mixup_cutmix(
            k_mix, batch["image"], batch["label"], num_classes=config.num_classes, mixup_alpha=config.mixup,
            cutmix_alpha=config.cutmix, switch_prob=config.mixup_switch_prob,
            label_smoothing=config.label_smoothing,
        )

        def loss_fn(params):
            logits, updates = model.apply(
                {"params": params, "batch_stats": state.batch_stats}, images, train=True,
                rngs={"dropout": k_drop}, mutable=["batch_stats"],
            )
            return soft_cross_entropy(logits, targets), (logits, updates)

        (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        param_updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, param_updates)
        batch_stats = updates.get("batch_stats", state.batch_stats)
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            batch_stats=batch_stats,
            opt_state=opt_state,
            ema_params=ema_update(state.ema_params, params, ema_decay),
            ema_batch_stats=ema_update(state.ema_batch_stats, batch_stats, ema_decay),
        )
        metrics = {
            "loss": loss,
            "lr": schedule(state.step),
            "grad_norm": optax.global_norm(grads),
            "top1": topk_correct(logits, batch["label"], 1).mean(),
        }
        return new_state, metrics

    return train_step


def make_eval_step(model: nn.Module) -> Callable:
    """({prefix: variables}, {'image', 'label', 'mask'}) -> {prefix + 'loss'/'top1'/'top5'/'count': sums}."""

    def eval_step(variables_by_prefix: Dict[str, dict], batch: Dict[str, jax.Array]) -> Dict[str, jax.Array]:
        sums = {}
        for prefix, variables in variables_by_prefix.items():
            logits = model.apply(variables, batch["image"], train=False)
            sums.update({f"{prefix}{k}": v for k, v in eval_sums(logits, batch["label"], batch["mask"]).items()})
        return sums

    return eval_step
