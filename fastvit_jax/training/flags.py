"""Command-line flags generated from the TrainConfig fields (name, type, default, help).

One flag per field, spelled like the field: ``--global_batch_size``, ``--lr_base`` ...
A flag that is not given leaves the recipe's value (argparse.SUPPRESS: absent) (``get_config``); 'none' sets an
optional field to None. Boolean fields marked ``flag=False`` (eval_only, export, plot,
progress) are the entry point's own switches (``--eval_only``, ``--no_export`` ...).
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any, Callable, Dict

from fastvit_jax.training.config import TrainConfig, get_config

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


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """Adds one --flag per TrainConfig field (except the entry point's own switches)."""
    hints = typing.get_type_hints(TrainConfig)
    for field in dataclasses.fields(TrainConfig):
        if field.name in flag_field_names():
            parser.add_argument(f"--{field.name}", **_flag_kwargs(field, hints[field.name]))


def config_from_flags(args: argparse.Namespace, **switches: Any) -> TrainConfig:
    """The recipe for --variant with every given flag applied, plus ``switches`` (eval_only ...).

    ``--num_steps`` without ``--num_epochs`` makes the schedule as long as the run.
    """
    given = {name: value for name, value in vars(args).items() if name in flag_field_names()}
    if given.get("num_steps") is not None and "num_epochs" not in given:
        given["num_epochs"] = None
    variant = given.pop("variant", TrainConfig.variant)
    return get_config(variant, **given, **switches)
