"""The recipe that runs is Apple's: every field of ``get_config(v)`` against a table written from
Apple's training commands, and the pipeline built from it really applies RandAugment.

The table below is written from the sources, not from ``config.py``: ml-fastvit's ``train.py``
argument defaults (a timm 0.6 ``train.py``), its README's per-variant commands, and timm's
pretrained configs for the evaluation crop. A field of ``TrainConfig`` that is neither in the
table nor named as not part of the recipe fails the test, so a new field must be classified.
"""

import dataclasses
import inspect

import numpy as np
import pytest

from fastvit_jax.training.config import RECIPE_EMA_DECAY, RECIPE_WARMUP_EPOCHS, TrainConfig, get_config
from fastvit_variants import ALL_VARIANTS

# ml-fastvit train.py defaults (8 GPUs x 128 images; the per-GPU batch 128 is the README's -b 128).
APPLE_SHARED = {
    "dataset": "imagenet2012",
    "num_classes": None,  # the dataset's 1000
    "image_size": 256,  # --input-size 3 256 256
    "num_epochs": 300.0,  # --epochs 300
    "cooldown_epochs": 10.0,  # --cooldown-epochs 10
    "global_batch_size": 1024,  # -b 128 on 8 GPUs
    "lr": None,  # --lr 1e-3 is for the 1024-image batch ...
    "lr_base": 1e-3,
    "lr_base_size": 1024,  # ... (linear scaling for other batches)
    "weight_decay": 0.05,  # --weight-decay 0.05, AdamW
    "adam_b1": 0.9,  # torch.optim.AdamW's defaults (train.py passes no --opt-betas / --opt-eps)
    "adam_b2": 0.999,
    "adam_eps": 1e-8,
    "warmup_epochs": None,  # None = the recipe's 5 (--warmup-epochs 5), checked below
    "warmup_lr": 1e-6,  # --warmup-lr 1e-6
    "min_lr": 1e-5,  # --min-lr 1e-5
    "clip_grad": None,  # --clip-grad None
    "label_smoothing": 0.1,  # --smoothing 0.1
    "cutmix": 1.0,  # --cutmix 1.0
    "mixup_switch_prob": 0.5,  # --mixup-switch-prob 0.5
    "ema_decay": None,  # the recipe's 0.9995 (--model-ema, on by default; --model-ema-decay 0.9995), checked below
    "randaugment": "rand-m9-mstd0.5-inc1",  # --aa rand-m9-mstd0.5-inc1
    "reprob": 0.25,  # --reprob 0.25 (--remode pixel)
    "color_jitter": 0.4,  # --color-jitter 0.4 (unused while RandAugment is on, as in timm)
    "rrc_scale": (0.08, 1.0),  # --scale 0.08 1.0
    "hflip": 0.5,  # --hflip 0.5
}
# README commands (non-distilled): --drop-path and --mixup per model; --mixup 0.8 is train.py's default.
APPLE_PER_VARIANT = {
    "t8": {"drop_path": 0.0, "mixup": 0.2},
    "t12": {"drop_path": 0.0, "mixup": 0.2},
    "s12": {"drop_path": 0.0, "mixup": 0.2},
    "sa12": {"drop_path": 0.1, "mixup": 0.2},
    "sa24": {"drop_path": 0.1, "mixup": 0.2},
    "sa36": {"drop_path": 0.2, "mixup": 0.2},
    "ma36": {"drop_path": 0.35, "mixup": 0.8},
    # MobileCLIP towers: no ImageNet recipe was published; docs/training.md says they take the base
    # variant of similar size (mci0 like sa12, mci1 like sa24, mci2 like sa36, mci3/mci4 like ma36).
    "mci0": {"drop_path": 0.1, "mixup": 0.2},
    "mci1": {"drop_path": 0.1, "mixup": 0.2},
    "mci2": {"drop_path": 0.2, "mixup": 0.2},
    "mci3": {"drop_path": 0.35, "mixup": 0.8},
    "mci4": {"drop_path": 0.35, "mixup": 0.8},
}
# Evaluation centre crop of the released checkpoints (timm's apple_in1k configs; for the MobileCLIP
# towers, Apple's and open_clip's preprocessing: no crop).
EVAL_CROP = {"t8": 0.9, "t12": 0.9, "s12": 0.9, "sa12": 0.9, "sa24": 0.9, "sa36": 0.9, "ma36": 0.95,
             "mci0": 1.0, "mci1": 1.0, "mci2": 1.0, "mci3": 1.0, "mci4": 1.0}

# Fields that are not part of the training recipe: what to run, where, how often things are
# written, how the work is laid out, the precision and memory policy of the hardware.
NOT_RECIPE = {
    "variant", "recipe", "data_dir", "workdir", "crop_pct", "dtype", "remat", "num_steps", "warmup_steps", "mesh",
    "fsdp_min_size",
    "seed", "checkpoint_every", "keep_checkpoints", "eval_every", "eval_batch_size", "log_every", "init_from",
    "compilation_cache_dir", "distributed_timeout", "barrier_timeout", "eval_only", "export", "plot", "progress",
    "restart_from_scratch",
}


def test_every_field_is_classified():
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    recipe = set(APPLE_SHARED) | {"drop_path", "mixup"}
    assert not recipe & NOT_RECIPE
    assert fields == recipe | NOT_RECIPE, (sorted(fields - recipe - NOT_RECIPE), sorted(recipe | NOT_RECIPE - fields))


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_get_config_is_apples_recipe(variant):
    c = get_config(variant)
    expected = {**APPLE_SHARED, **APPLE_PER_VARIANT[variant]}
    got = {k: getattr(c, k) for k in expected}
    got["rrc_scale"] = tuple(got["rrc_scale"])
    assert got == expected
    assert c.peak_lr == 1e-3 and c.eval_crop_pct == EVAL_CROP[variant]
    assert c.warmup_steps is None and RECIPE_WARMUP_EPOCHS == 5.0 and RECIPE_EMA_DECAY == 0.9995
    assert c.num_steps is None  # the schedule is 300 epochs, then 10 at min_lr


def test_library_functions_take_recipe_values_from_the_caller():
    """The recipe has one home (TrainConfig): the functions that apply it have no recipe-valued defaults."""
    from fastvit_jax.training import mesh, mixup, multihost, optimizer

    for fn, names in [(optimizer.make_optimizer, ("weight_decay", "b1", "b2", "eps")),
                      (optimizer.lr_schedule, ("warmup_steps", "warmup_lr", "min_lr")),
                      (mixup.mixup_cutmix, ("mixup_alpha", "cutmix_alpha", "switch_prob", "label_smoothing")),
                      (mesh.state_shardings, ("fsdp_min_size",)),
                      (multihost.maybe_initialize_distributed, ("distributed_timeout_s",))]:
        parameters = inspect.signature(fn).parameters
        assert all(parameters[n].default is inspect.Parameter.empty for n in names), fn.__name__


@pytest.mark.parametrize("way", [None, "", "none", "off", "None"])
def test_randaugment_off_only_when_asked(way):
    assert get_config("ma36", randaugment=way).randaugment == ""
    assert get_config("ma36").randaugment == "rand-m9-mstd0.5-inc1"


def test_ma36_pipeline_draws_randaugment_ops_not_colour_jitter(monkeypatch):
    """The augmentation the trainer builds from get_config('ma36') runs RandAugment's ops (its
    op switch is reached) and never colour jitter."""
    import tensorflow as tf

    from fastvit_jax.data import pipeline
    from fastvit_jax.data import randaugment as ra
    from fastvit_jax.training.trainer import train_augment

    augment = train_augment(get_config("ma36"))
    assert augment.randaugment == "rand-m9-mstd0.5-inc1" and augment.random_erase_prob == 0.25

    drawn, jitter = [], []
    real_op = ra._apply_named_op

    def spy_op(name, *args, **kwargs):
        drawn.append(name)
        return real_op(name, *args, **kwargs)

    monkeypatch.setattr(ra, "_apply_named_op", spy_op)
    monkeypatch.setattr(ra, "color_jitter", lambda *a, **k: jitter.append(1) or a[0])
    rng = np.random.default_rng(0)
    encoded = tf.io.encode_png(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8))
    plain = dataclasses.replace(augment, randaugment=None, color_jitter=0.0)
    changed = 0
    for i in range(16):  # eager: only the ops drawn for each key run
        key = tf.constant([1, i], tf.int64)
        with_ra = pipeline.train_preprocess(encoded, key, image_size=32, augment=augment, jpeg=False)
        without = pipeline.train_preprocess(encoded, key, image_size=32, augment=plain, jpeg=False)
        changed += int(not np.array_equal(with_ra.numpy(), without.numpy()))
    ops = ra.parse_randaugment(augment.randaugment).ops
    assert set(drawn) <= set(ops) and len(set(drawn)) >= 3, drawn  # two layers, probability 0.5 each
    assert "PosterizeIncreasing" in ops  # inc1: the 'increasing' op set, as timm's
    assert not jitter
    assert changed >= 8  # P(no op drawn) = 0.25; some ops at a low magnitude change nothing


def test_the_short_recipe_changes_only_what_it_names():
    short, apple = get_config("sa12", recipe="short"), get_config("sa12")
    changed = {k for k in dataclasses.asdict(apple) if getattr(short, k) != getattr(apple, k)}
    assert changed == {"recipe", "lr", "mixup", "cutmix", "randaugment", "reprob", "color_jitter", "rrc_scale"}
    assert short.peak_lr == 2e-3 and get_config("sa12", recipe="short", lr=1e-3, mixup=0.1).mixup == 0.1
    with pytest.raises(ValueError, match="unknown recipe 'fast'; valid: apple, short, demo"):
        get_config("t8", recipe="fast")


def test_the_demo_is_a_named_recipe():
    """`make demo` trains ``get_config('t8', recipe='demo')``: "short" on the embedded dataset, plus the
    run's length, sizes and dtype; the demo entry point sets only paths (and sizes the user gives)."""
    demo, short = get_config("t8", recipe="demo"), get_config("t8", recipe="short")
    changed = {k: getattr(demo, k) for k in dataclasses.asdict(short) if getattr(demo, k) != getattr(short, k)}
    assert changed == {"recipe": "demo", "dataset": "demo", "image_size": 48, "global_batch_size": 128,
                       "num_epochs": None, "num_steps": 120, "warmup_steps": 8, "checkpoint_every": 60,
                       "eval_every": 0, "log_every": 10, "eval_batch_size": 256, "crop_pct": 1.0,
                       "dtype": "float32"}
    import argparse

    from fastvit_jax.training.flags import add_config_flags, config_from_flags

    parser = argparse.ArgumentParser(argument_default=argparse.SUPPRESS)
    add_config_flags(parser)
    args = parser.parse_args(["--variant", "t8", "--recipe", "demo", "--num_steps", "7", "--workdir", "/nonexistent"])
    assert config_from_flags(args) == get_config("t8", recipe="demo", num_steps=7, workdir="/nonexistent")
