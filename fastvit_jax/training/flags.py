"""Command-line flags generated from the TrainConfig fields (name, type, default, help).

One flag per field, spelled like the field: ``--global_batch_size``, ``--lr_base`` ...
A flag that is not given (argparse.SUPPRESS: absent) takes the workdir's value when
``<workdir>/config.json`` exists (so ``--num_steps 140`` alone extends a run, and
``--eval_only`` evaluates at the run's variant, classes and image size), else the recipe's
(``get_config``); 'none' sets an optional field to None. Boolean fields marked ``flag=False``
(eval_only, export, plot, progress, restart_from_scratch) are the entry point's own switches
(``--eval_only``, ``--no_export`` ...), never taken from config.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import typing
from typing import Any, Callable, Dict, Tuple

from fastvit_jax.training.config import CONFIG_FILENAME, TrainConfig, field_names, get_config, read_workdir_config

log = logging.getLogger("fastvit_jax.training")

# Never taken from a workdir's config.json: what this invocation does, and the file it starts from.
NOT_INHERITED = ("init_from",)

NONE_WORDS = ("none", "null")


def _optional(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse_or_none(text: str) -> Any:
        return None if text.lower() in NONE_WORDS else parse(text)

    parse_or_none.__name__ = parse.__name__
    return parse_or_none


def _flag_kwargs(field: dataclasses.Field, hint: Any) -> Dict[str, Any]:
    """argparse keyword arguments for one field."""
    args = typing.get_args(hint)
    is_optional = type(None) in args
    base = next(a for a in args if a is not type(None)) if is_optional else hint
    default = field.default
    help_text = field.metadata["help"]
    if "default" not in help_text and "per variant" not in help_text:
        help_text += f" (default: {default})"
    help_text = help_text.replace("%", "%%")  # argparse formats help with %
    kwargs: Dict[str, Any] = {"default": argparse.SUPPRESS, "help": help_text}
    if typing.get_origin(base) is tuple:
        kwargs.update(type=float, nargs=2, metavar=("MIN", "MAX"))
    elif base in (int, float):
        kwargs["type"] = _optional(base) if is_optional else base
    elif "choices" in field.metadata:
        kwargs["choices"] = field.metadata["choices"]
    return kwargs


def flag_field_names() -> set:
    """The TrainConfig fields that are command-line flags of their own."""
    return {f.name for f in dataclasses.fields(TrainConfig) if f.metadata.get("flag", True)}


# --help sections, in order, and the fields each shows (every TrainConfig field is in one).
FLAG_GROUPS: Dict[str, Tuple[str, ...]] = {
    "model": ("variant", "num_classes", "drop_path", "init_from"),
    "data": ("dataset", "data_dir", "image_size", "crop_pct", "eval_batch_size"),
    "optimisation": ("recipe", "global_batch_size", "lr", "lr_base", "lr_base_size", "weight_decay", "adam_b1",
                     "adam_b2", "adam_eps", "clip_grad", "label_smoothing", "ema_decay", "seed"),
    "schedule": ("num_epochs", "num_steps", "cooldown_epochs", "warmup_epochs", "warmup_steps", "warmup_lr",
                 "min_lr"),
    "augmentation": ("mixup", "cutmix", "mixup_switch_prob", "randaugment", "reprob", "color_jitter", "rrc_scale",
                     "hflip"),
    "checkpointing and outputs": ("workdir", "checkpoint_every", "keep_checkpoints", "eval_every", "log_every",
                                  "eval_only", "export", "plot", "progress", "restart_from_scratch"),
    "hardware": ("dtype", "remat", "mesh", "fsdp_min_size", "compilation_cache_dir", "distributed_timeout",
                 "barrier_timeout"),
}


def add_config_flags(parser: argparse.ArgumentParser) -> Dict[str, argparse._ArgumentGroup]:
    """Adds one --flag per TrainConfig field (except the entry point's own switches), in the
    ``FLAG_GROUPS`` sections; returns the sections so the entry point can add its switches."""
    hints = typing.get_type_hints(TrainConfig)
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    groups = {}
    for title, names in FLAG_GROUPS.items():
        groups[title] = parser.add_argument_group(title)
        for name in names:
            if name in flag_field_names():
                groups[title].add_argument(f"--{name}", **_flag_kwargs(fields[name], hints[name]))
    return groups


def weights_file_settings(path: str) -> Dict[str, Any]:
    """variant, image_size and crop_pct recorded in a .safetensors file's header (the trainer's and the
    converters' exports); {} for any other file (those use the recipe's, or the flags')."""
    import json
    import os

    if not (path.endswith(".safetensors") and os.path.isfile(path)):
        return {}
    from fastvit_jax.io import load_metadata

    try:
        meta = load_metadata(path)
        data_config = json.loads(meta.get("pretrained_cfg", "{}"))
        found = {"variant": meta.get("variant"), "image_size": meta.get("image_size"),
                 "crop_pct": data_config.get("crop_pct")}
        found["image_size"] = int(found["image_size"]) if found["image_size"] is not None else None
    except Exception:  # noqa: BLE001 - an unreadable header is reported where the weights are loaded
        return {}
    return {k: v for k, v in found.items() if v is not None}


def config_from_flags(args: argparse.Namespace, **switches: Any) -> TrainConfig:
    """The config for the given flags plus ``switches`` (eval_only ...).

    Fields not given come from ``<workdir>/config.json`` when it exists, else from the recipe
    for --variant; without a config.json, ``--num_steps`` without ``--num_epochs`` makes the
    schedule as long as the run.
    """
    given = {name: value for name, value in vars(args).items() if name in flag_field_names()}
    workdir = given.get("workdir", TrainConfig.workdir)
    saved = read_workdir_config(workdir)
    if saved is not None:
        inherited = {k: v for k, v in saved.items()
                     if k in flag_field_names() and k not in NOT_INHERITED and k not in given}
        if inherited:
            log.info("flags not given are taken from %s/%s", workdir, CONFIG_FILENAME)
        given = {**inherited, **given}
    elif given.get("num_steps") is not None and "num_epochs" not in given:
        given["num_epochs"] = None
    if switches.get("eval_only") and given.get("init_from"):
        given = {**weights_file_settings(given["init_from"]), **given}
    variant = given.pop("variant", TrainConfig.variant)
    if "rrc_scale" in given:
        given["rrc_scale"] = tuple(given["rrc_scale"])
    return get_config(variant, **{k: v for k, v in given.items() if k in field_names()}, **switches)
