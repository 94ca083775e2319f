"""The step plan of a run: steps per epoch, schedule length, warm-up, total steps, peak lr, eval cadence.

Pure Python. Short runs get a warm-up that fits: the recipe's 5 epochs are scaled down to
at most 10% of the schedule, and ``Plan.notes`` says so; a warm-up the user asked for
(``warmup_steps`` / ``warmup_epochs``) is kept as given.
"""

from __future__ import annotations

import dataclasses
from typing import Tuple

from fastvit_jax.training.config import (
    MAX_EMA_HORIZON_FRACTION,
    MAX_WARMUP_FRACTION,
    RECIPE_EMA_DECAY,
    RECIPE_WARMUP_EPOCHS,
    TrainConfig,
)

# A linearly scaled peak lr below this, on a run shorter than SHORT_RUN_STEPS, learns little: noted.
SMALL_PEAK_LR = 1e-4
SHORT_RUN_STEPS = 10_000


@dataclasses.dataclass(frozen=True)
class Plan:
    """Step counts and the peak learning rate derived from a config and the dataset size."""

    steps_per_epoch: int
    schedule_steps: int  # length of the cosine
    warmup_steps: int
    total_steps: int  # the step this run trains to (schedule + cool-down, or --num_steps)
    peak_lr: float
    eval_every: int  # steps between evaluations; 0: only at the end
    ema_decay: float  # the recipe's, or scaled down to fit a short run
    notes: Tuple[str, ...] = ()  # what was changed from the recipe, and why

    def describe(self) -> str:
        return (f"peak lr {self.peak_lr:.3g}, warm-up {self.warmup_steps} steps, "
                f"cosine over {self.schedule_steps} steps, training to step {self.total_steps} "
                f"({self.steps_per_epoch} steps per epoch), evaluating "
                f"{f'every {self.eval_every} steps' if self.eval_every else 'at the end'}, EMA decay {self.ema_decay:.4g}")


def _warmup(config: TrainConfig, steps_per_epoch: int, schedule_steps: int) -> Tuple[int, Tuple[str, ...]]:
    if config.warmup_steps is not None:
        warmup = int(config.warmup_steps)
    elif config.warmup_epochs is not None:
        warmup = int(round(config.warmup_epochs * steps_per_epoch))
    else:
        recipe = int(round(RECIPE_WARMUP_EPOCHS * steps_per_epoch))
        limit = int(MAX_WARMUP_FRACTION * schedule_steps)
        if recipe <= limit:
            return recipe, ()
        return limit, (
            f"warm-up scaled from the recipe's {RECIPE_WARMUP_EPOCHS:g} epochs ({recipe} steps) to {limit} steps: "
            f"the schedule is only {schedule_steps} steps and the warm-up may take at most "
            f"{MAX_WARMUP_FRACTION:.0%} of it (set --warmup_steps or --warmup_epochs to choose)",)
    if warmup >= schedule_steps:
        return warmup, (f"the warm-up you set ({warmup} steps) is not shorter than the {schedule_steps}-step "
                        f"schedule: the learning rate never reaches its peak",)
    return warmup, ()


def _ema_decay(config: TrainConfig, total_steps: int) -> Tuple[float, Tuple[str, ...]]:
    """--ema_decay as given; else the recipe's, or one whose horizon 1/(1-decay) is
    MAX_EMA_HORIZON_FRACTION of a shorter run (with a note)."""
    if config.ema_decay is not None:
        return config.ema_decay, ()
    limit = 1.0 - 1.0 / max(MAX_EMA_HORIZON_FRACTION * total_steps, 1.0)
    if RECIPE_EMA_DECAY <= limit:
        return RECIPE_EMA_DECAY, ()
    return limit, (f"EMA decay scaled from the recipe's {RECIPE_EMA_DECAY:g} (a {1 / (1 - RECIPE_EMA_DECAY):.0f}-step "
                   f"horizon) to {limit:.4g} ({1 / (1 - limit):.0f} steps, {MAX_EMA_HORIZON_FRACTION:.0%} of this "
                   f"{total_steps}-step run), so the EMA weights follow the training (set --ema_decay to choose)",)


def _lr_note(config: TrainConfig, peak_lr: float, total_steps: int) -> Tuple[str, ...]:
    if config.lr is not None or peak_lr >= SMALL_PEAK_LR or total_steps >= SHORT_RUN_STEPS:
        return ()
    return (f"peak lr {peak_lr:.3g} ({config.lr_base:g} x {config.global_batch_size} / {config.lr_base_size}, linear "
            f"scaling) learns little in a {total_steps}-step run: use --recipe short (lr 2e-3 and light augmentation) "
            f"or set --lr",)


def make_plan(config: TrainConfig, num_train: int) -> Plan:
    """Raises ValueError when the training split holds less than one global batch."""
    steps_per_epoch = num_train // config.global_batch_size
    if steps_per_epoch < 1:
        raise ValueError(
            f"the training split has {num_train} examples, fewer than one global batch "
            f"({config.global_batch_size}); lower --global_batch_size"
        )
    if config.num_epochs is not None:
        schedule_steps = int(round(config.num_epochs * steps_per_epoch))
        total_steps = schedule_steps + int(round(config.cooldown_epochs * steps_per_epoch))
        if config.num_steps is not None:
            total_steps = min(total_steps, config.num_steps)
    else:
        schedule_steps = total_steps = int(config.num_steps)
    schedule_steps = max(schedule_steps, 1)
    warmup_steps, notes = _warmup(config, steps_per_epoch, schedule_steps)
    eval_every = config.eval_every
    if eval_every is None:  # like timm, every epoch; several points on a short run's curve too
        eval_every = max(1, min(steps_per_epoch, total_steps // 10))
    ema_decay, ema_notes = _ema_decay(config, total_steps)
    notes = notes + ema_notes + _lr_note(config, config.peak_lr, total_steps)
    return Plan(steps_per_epoch, schedule_steps, warmup_steps, total_steps, config.peak_lr, eval_every, ema_decay,
                notes)
