"""The two jitted computations: one training step and one eval batch (pure functions)."""

from __future__ import annotations

from typing import Callable, Dict

import flax.linen as nn
import jax
import optax

from fastvit_jax.training.config import TrainConfig
from fastvit_jax.training.ema import ema_update
from fastvit_jax.training.losses import eval_sums, soft_cross_entropy, topk_correct
from fastvit_jax.training.mixup import mixup_cutmix
from fastvit_jax.training.state import TrainState


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, schedule: Callable,
                    config: TrainConfig, ema_decay: float) -> Callable:
    """(state, {'image': (B,H,W,3), 'label': (B,)}, key) -> (new state, scalar metrics).

    ``ema_decay``: the run's (``Plan.ema_decay``: the recipe's, or scaled down for a short run).

    Mixup/cutmix and drop path draw from ``key`` folded with the step, so a resumed run
    draws the same numbers as an uninterrupted one.
    """

    def train_step(state: TrainState, batch: Dict[str, jax.Array], base_key: jax.Array):
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
