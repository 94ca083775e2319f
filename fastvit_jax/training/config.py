"""TrainConfig and ``get_config``: Apple's FastViT recipe, written once.

The recipe lives in the field defaults of ``TrainConfig`` (what every variant shares)
and in ``VARIANT_RECIPE`` (the two values that differ per variant). ``get_config(variant,
**overrides)`` applies both and returns the full config; the command line, ``config.json``
and the README use the same field names. Each field carries its rules in its metadata
(``option``): its help text, so ``train_tpu.py --help`` is generated from here
(``fastvit_jax/training/flags.py``), whether it must be positive, and what a restart may do with it.

A workdir remembers its config (``config.json``). A restart may change only the fields marked
``run_length`` (to extend or shorten a run) and ``bookkeeping`` (where and how often things are
written); ``RUN_LENGTH_FIELDS`` and ``BOOKKEEPING_FIELDS`` list them. Every other field, including any field added later (absent
from an older config.json, it counts as its default), must match, or the restart is refused with
the differing fields named.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Dict, Optional, Tuple

from fastvit_jax.io import write_text_atomically
from fastvit_variants import ALL_VARIANTS, canonical_name, check_image_size, get_variant, pretrained_cfg

CONFIG_FILENAME = "config.json"

# Apple's README commands: drop path and mixup are the two recipe values set per variant.
VARIANT_RECIPE: Dict[str, Dict[str, float]] = {
    "t8": {"drop_path": 0.0, "mixup": 0.2},
    "t12": {"drop_path": 0.0, "mixup": 0.2},
    "s12": {"drop_path": 0.0, "mixup": 0.2},
    "sa12": {"drop_path": 0.1, "mixup": 0.2},
    "sa24": {"drop_path": 0.1, "mixup": 0.2},
    "sa36": {"drop_path": 0.2, "mixup": 0.2},
    "ma36": {"drop_path": 0.35, "mixup": 0.8},
    # MobileCLIP towers: no ImageNet recipe was published; matched to the base models of similar size
    # (mci0 ~ sa12, mci1 ~ sa24, mci2 ~ sa36, mci3 / mci4 like ma36).
    "mci0": {"drop_path": 0.1, "mixup": 0.2},
    "mci1": {"drop_path": 0.1, "mixup": 0.2},
    "mci2": {"drop_path": 0.2, "mixup": 0.2},
    "mci3": {"drop_path": 0.35, "mixup": 0.8},
    "mci4": {"drop_path": 0.35, "mixup": 0.8},
}

# Named recipes, applied over the variant's values and under the caller's overrides.
# "apple": Apple's ImageNet-1k recipe (the field defaults). "short": runs of a few hundred steps
# on a small dataset (the demo, a quick fine-tune): an absolute peak lr that learns at any batch
# size, no mixup/cutmix/RandAugment/erasing/colour jitter, a milder random-resized crop. Both
# recipes scale the warm-up and the EMA horizon down to fit a short run (``training/plan.py``).
# "demo": `make demo`'s run (``fastvit_jax/demo.py``): "short" on the embedded 10-class dataset, 120
# steps of 128 images at 48 px (data-parallel over every device, the default mesh), float32, evaluated at the
# end on the whole centre (crop_pct 1.0) of the validation images.
_SHORT = {"lr": 2e-3, "mixup": 0.0, "cutmix": 0.0, "randaugment": "", "reprob": 0.0, "color_jitter": 0.0,
          "rrc_scale": (0.35, 1.0)}
RECIPES: Dict[str, Dict[str, Any]] = {
    "apple": {},
    "short": _SHORT,
    "demo": {**_SHORT, "dataset": "demo", "image_size": 48, "global_batch_size": 128, "num_epochs": None,
             "num_steps": 120, "warmup_steps": 8, "checkpoint_every": 60, "eval_every": 0, "log_every": 10,
             "eval_batch_size": 256, "crop_pct": 1.0, "dtype": "float32"},
}

# The recipe's warm-up (used when neither warmup_epochs nor warmup_steps is given) and
# the largest share of a short schedule it may take before it is scaled down.
RECIPE_WARMUP_EPOCHS = 5.0
MAX_WARMUP_FRACTION = 0.1
# The recipe's EMA decay (used when ema_decay is not given), whose horizon 1 / (1 - decay) steps
# may be at most this share of the run: 0.9995 (2000 steps) is kept for runs of 20k steps and
# more, and scaled down below that.
RECIPE_EMA_DECAY = 0.9995
MAX_EMA_HORIZON_FRACTION = 0.1

RESTART_RULES = ("must_match", "run_length", "bookkeeping")


class ConfigMismatchError(ValueError):
    """The workdir was created by a run whose model, data or optimisation differs."""


def _per_variant(field_name: str) -> str:
    return ", ".join(f"{v} {VARIANT_RECIPE[v][field_name]}" for v in ALL_VARIANTS)


def option(default: Any, help: str, *, restart: str = "must_match", positive: bool = False,  # noqa: A002
           **extra: Any) -> Any:
    """A dataclass field whose help text and rules travel with it (to ``--help``, ``validate`` and the
    restart check). ``restart``: what a restart in the same workdir may do with it: ``must_match``
    (model, data, optimisation: the default, so a field added later is protected), ``run_length``
    (may change to extend or shorten the run) or ``bookkeeping`` (where and how often things are
    written, how the work is laid out). ``positive``: ``validate`` refuses a value <= 0 (None is allowed
    where the field is optional)."""
    if restart not in RESTART_RULES:
        raise ValueError(f"restart={restart!r}; valid: {', '.join(RESTART_RULES)}")
    return dataclasses.field(default=default, metadata={"help": help, "restart": restart, "positive": positive,
                                                        **extra})


@dataclasses.dataclass
class TrainConfig:
    """Every knob of a training run; the defaults are Apple's recipe (see ``get_config``)."""

    # What to train, on what.
    variant: str = option("t8", f"FastViT variant: {' '.join(ALL_VARIANTS)} (mci*: MobileCLIP image towers)")
    recipe: str = option("apple", "named recipe under the flags you give: apple (Apple's ImageNet recipe), short "
                                  "(runs of a few hundred steps on a small dataset: lr 2e-3, no mixup/cutmix/"
                                  "RandAugment/erasing) or demo (make demo's run: short on the embedded dataset, "
                                  "120 steps at 48 px)", choices=tuple(RECIPES))
    dataset: str = option("imagenet2012", "tfds image-classification dataset; 'demo' for the embedded 10-class "
                                          "offline dataset; or a folder of images (a path, or folder:PATH) with "
                                          "train/ and val/ subfolders of one folder per class")
    data_dir: Optional[str] = option(None, "tfds data_dir (default $TFDS_DATA_DIR or ~/tensorflow_datasets)", restart="bookkeeping")
    workdir: str = option("workdir", "checkpoints, config.json, metrics.jsonl, tensorboard/, curves.png, export/", restart="bookkeeping")
    num_classes: Optional[int] = option(None, "classifier size (default: the dataset's class count)")
    image_size: int = option(256, "train/eval resolution")
    crop_pct: Optional[float] = option(None, "eval centre-crop fraction (default: the variant's, 0.9 or 0.95)")
    dtype: str = option("auto", "compute dtype; auto = bfloat16 on TPU/GPU, float32 on CPU (params stay float32)",
                        choices=("auto", "float32", "bfloat16", "float16"))
    remat: str = option("auto", "what the backward recomputes instead of keeping, per block: none; elementwise "
                                "(keep only conv/matmul outputs; recompute BatchNorm, GELU, layer scales); block "
                                "(recompute whole blocks); auto = elementwise on TPU/GPU, none on CPU",
                        choices=("auto", "none", "elementwise", "block"), restart="bookkeeping")
    # Length.
    num_epochs: Optional[float] = option(300.0, "epochs of the cosine schedule; 'none' to let --num_steps set it", restart="run_length", positive=True)
    num_steps: Optional[int] = option(None, "stop after this many steps; without --num_epochs it also sets "
                                            "the schedule length", restart="run_length", positive=True)
    cooldown_epochs: float = option(10.0, "extra epochs at min_lr after the cosine (Apple's recipe: 10; "
                                          "ignored when --num_epochs is none)", restart="run_length")
    global_batch_size: int = option(1024, "images per step over all devices", positive=True)
    # Optimiser (AdamW) and schedule.
    lr: Optional[float] = option(None, "absolute peak learning rate (default: lr_base * global_batch_size / "
                                       "lr_base_size)")
    lr_base: float = option(1e-3, "peak learning rate at lr_base_size images per step, used when --lr is not "
                                  "given")
    lr_base_size: int = option(1024, "the batch size lr_base refers to (linear scaling)", positive=True)
    weight_decay: float = option(0.05, "AdamW decoupled decay on kernels and layer scales")
    adam_b1: float = option(0.9, "AdamW beta1 (torch.optim.AdamW's default, which Apple's run used)")
    adam_b2: float = option(0.999, "AdamW beta2 (torch.optim.AdamW's default)")
    adam_eps: float = option(1e-8, "AdamW epsilon (torch.optim.AdamW's default)")
    warmup_epochs: Optional[float] = option(
        None, f"linear warm-up in epochs (default: the recipe's {RECIPE_WARMUP_EPOCHS:g}, scaled down to at most "
              f"{MAX_WARMUP_FRACTION:.0%} of a shorter schedule)")
    warmup_steps: Optional[int] = option(None, "linear warm-up in steps (takes precedence over --warmup_epochs)")
    warmup_lr: float = option(1e-6, "learning rate at step 0")
    min_lr: float = option(1e-5, "learning rate at the end of the cosine")
    clip_grad: Optional[float] = option(None, "global-norm gradient clipping (default off)")
    # Regularisation.
    label_smoothing: float = option(0.1, "label smoothing of the targets")
    mixup: float = option(0.2, f"mixup alpha, 0 disables (per variant: {_per_variant('mixup')})")
    cutmix: float = option(1.0, "cutmix alpha, 0 disables")
    mixup_switch_prob: float = option(0.5, "probability of cutmix when both mixup and cutmix are on")
    drop_path: float = option(0.0, f"stochastic depth rate (per variant: {_per_variant('drop_path')})")
    ema_decay: Optional[float] = option(
        None, f"EMA decay of params and BatchNorm statistics (default: the recipe's {RECIPE_EMA_DECAY:g}, its horizon "
              f"1/(1-decay) scaled down to at most {MAX_EMA_HORIZON_FRACTION:.0%} of a shorter run)")
    # Data augmentation.
    randaugment: str = option("rand-m9-mstd0.5-inc1", "timm RandAugment spec; '' or 'none' disables")
    reprob: float = option(0.25, "random-erasing probability")
    color_jitter: float = option(0.4, "colour jitter, used only without RandAugment")
    rrc_scale: Tuple[float, float] = option((0.08, 1.0), "random-resized-crop area range (MIN MAX)")
    hflip: float = option(0.5, "horizontal-flip probability")
    # Parallelism.
    mesh: str = option("data:-1", "device mesh: 'data:-1' (data parallel) or 'data:-1,fsdp:4' (large "
                                  "parameters sharded over 4 devices)", restart="bookkeeping")
    fsdp_min_size: int = option(2**18, "tensors with fewer elements stay replicated under fsdp", restart="bookkeeping")
    # Cadence and bookkeeping.
    seed: int = option(0, "seed of init, data order and augmentation")
    checkpoint_every: int = option(1000, "steps between checkpoints (and one at the end)", restart="bookkeeping", positive=True)
    keep_checkpoints: int = option(3, "checkpoints kept", restart="bookkeeping", positive=True)
    eval_every: Optional[int] = option(None, "steps between evaluations (default: every epoch, or every tenth of "
                                             "a run shorter than 10 epochs); 0 = only at the end", restart="bookkeeping")
    eval_batch_size: Optional[int] = option(None, "eval batch over all devices (default: --global_batch_size)", restart="bookkeeping")
    log_every: int = option(50, "steps between metric records", restart="bookkeeping", positive=True)
    init_from: Optional[str] = option(None, "fine-tune from a .safetensors file (new head if num_classes "
                                            "differs); with --eval_only also a fused export or a workdir", restart="bookkeeping")
    compilation_cache_dir: Optional[str] = option(
        None, "JAX persistent compilation cache, so restarts and --eval_only reuse the compiled step "
              "(default $JAX_COMPILATION_CACHE_DIR or ~/.cache/fastvit_jax/jax; 'none' disables)", restart="bookkeeping")
    distributed_timeout: float = option(
        300.0, "several processes: seconds without a heartbeat after which a peer counts as lost (the others then "
               "exit with status 4, naming it), and the longest wait to join the job or to shut down (JAX's own "
               "heartbeat timeout is set to four times this)", restart="bookkeeping", positive=True)
    barrier_timeout: float = option(
        1800.0, "several processes: seconds a process waits for the others at a barrier (dataset prepared by "
                "process 0, train / eval step compiled)", restart="bookkeeping", positive=True)
    eval_only: bool = option(False, "only evaluate --init_from (or the workdir's latest checkpoint)", flag=False, restart="bookkeeping")
    export: bool = option(True, "write the fused export of the final EMA weights", flag=False, restart="bookkeeping")
    plot: bool = option(True, "write curves.png", flag=False, restart="bookkeeping")
    progress: bool = option(True, "show a tqdm progress bar", flag=False, restart="bookkeeping")
    restart_from_scratch: bool = option(
        False, "start again from step 0 in a workdir that has config.json or checkpoints moved aside as "
               "unreadable but no readable checkpoint (refused without it; its metrics.jsonl is cleared)", flag=False, restart="bookkeeping")

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    @property
    def peak_lr(self) -> float:
        """--lr when given, else lr_base scaled linearly by global_batch_size / lr_base_size."""
        if self.lr is not None:
            return self.lr
        return self.lr_base * self.global_batch_size / self.lr_base_size

    @property
    def eval_crop_pct(self) -> float:
        return self.crop_pct if self.crop_pct is not None else get_variant(self.variant).crop_pct

    @property
    def normalization(self) -> Dict[str, Tuple[float, float, float]]:
        """{'mean', 'std'} of the variant's ``pretrained_cfg`` (ImageNet's; 0/1 or CLIP's for the MobileCLIP towers)."""
        cfg = pretrained_cfg(self.variant)
        return {"mean": tuple(cfg.mean), "std": tuple(cfg.std)}

    @property
    def eval_interpolation(self) -> str:
        """The resize filter of the variant's evaluation transform (bicubic; bilinear for the MobileCLIP towers)."""
        return pretrained_cfg(self.variant).interpolation

    def validate(self) -> None:
        """Raises ValueError naming the field and what would be valid."""
        get_variant(self.variant)
        if self.num_epochs is None and self.num_steps is None:
            raise ValueError("set --num_epochs or --num_steps")
        for name in POSITIVE_FIELDS:
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"--{name} must be positive, got {getattr(self, name)}")
        check_image_size(self.image_size)
        if self.remat != "auto":
            from fastvit_jax.remat import check_policy

            check_policy(self.remat)
        if self.data_dir and os.path.exists(self.data_dir) and not os.path.isdir(self.data_dir):
            raise ValueError(f"--data_dir {self.data_dir!r} is a file, not a directory (the folder that holds the "
                             f"prepared tfds datasets)")
        if self.init_from and not os.path.exists(self.init_from):
            raise ValueError(f"--init_from {self.init_from!r} does not exist")
        if self.eval_only and not self.init_from and not _has_checkpoints(self.workdir):
            raise ValueError("--eval_only needs --init_from PATH (or a --workdir with checkpoints)")

    def to_dict(self) -> Dict[str, Any]:
        fields = dataclasses.asdict(self)
        fields["rrc_scale"] = list(self.rrc_scale)
        return fields

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, fields: Dict[str, Any]) -> "TrainConfig":
        known = field_names()
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig fields: {unknown}")
        fields = dict(fields)
        if fields.get("rrc_scale") is not None:
            fields["rrc_scale"] = tuple(fields["rrc_scale"])
        return cls(**fields)

    @classmethod
    def from_json(cls, text: str) -> "TrainConfig":
        return cls.from_dict(json.loads(text))


def field_names() -> set:
    return {f.name for f in dataclasses.fields(TrainConfig)}


def get_config(variant: str = "t8", **overrides: Any) -> TrainConfig:
    """The recipe for ``variant`` (Apple's, or ``recipe="short"`` / ``"demo"``) with ``overrides`` applied.

    ``overrides`` are TrainConfig fields; None is applied too (``num_epochs=None`` lets
    ``num_steps`` set the schedule length). Raises ValueError for an unknown variant or field.
    """
    name = canonical_name(variant)
    recipe = overrides.get("recipe", TrainConfig.recipe)
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; valid: {', '.join(RECIPES)}")
    fields = {"variant": name, **VARIANT_RECIPE[name], **RECIPES[recipe], **overrides}
    if "randaugment" in fields and (fields["randaugment"] is None
                                    or str(fields["randaugment"]).lower() in ("", "none", "off")):
        fields["randaugment"] = ""  # off, whichever way it was said; absent keeps the recipe's spec
    return TrainConfig.from_dict(fields)


def _has_checkpoints(workdir: Optional[str]) -> bool:
    if not workdir:
        return False
    directory = os.path.join(workdir, "checkpoints")
    return os.path.isdir(directory) and any(n.isdigit() for n in os.listdir(directory))


def _same(saved: Any, current: Any) -> bool:
    if isinstance(saved, (list, tuple)) and isinstance(current, (list, tuple)):
        return list(saved) == list(current)
    numbers = (int, float)
    if isinstance(saved, numbers) and isinstance(current, numbers) and not isinstance(saved, bool):
        return float(saved) == float(current)
    return saved == current


def config_differences(saved: Dict[str, Any], current: TrainConfig) -> Dict[str, Tuple[Any, Any]]:
    """{field: (saved, current)} for every field whose values differ.

    A field missing from ``saved`` (a config.json written before the field existed) counts as its
    default, the value that run used without naming it."""
    now = current.to_dict()
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    saved = {k: saved.get(k, defaults[k]) for k in now}
    return {k: (saved[k], now[k]) for k in now if not _same(saved[k], now[k])}


def read_workdir_config(workdir: str) -> Optional[Dict[str, Any]]:
    """The workdir's config.json as a dict, or None for a new workdir."""
    from fastvit_jax.io import read_json_file

    path = os.path.join(workdir, CONFIG_FILENAME)
    if not os.path.exists(path):
        return None
    return read_json_file(path, "it is the run's settings, rewritten at every checkpoint: restore it from a copy, or "
                                "delete it and rerun with the run's own flags (they are then not checked)")


# What the checkpoints of a workdir depend on: --eval_only on a workdir must agree on these.
def _fields_where(key: str, value: Any) -> Tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(TrainConfig) if f.metadata[key] == value)


# From the fields' metadata (``option(restart=..., positive=...)``): what a restart may change ...
RUN_LENGTH_FIELDS: Tuple[str, ...] = _fields_where("restart", "run_length")
BOOKKEEPING_FIELDS: Tuple[str, ...] = _fields_where("restart", "bookkeeping")
# ... and what must be positive.
POSITIVE_FIELDS: Tuple[str, ...] = _fields_where("positive", True)
MODEL_DEFINING_FIELDS: Tuple[str, ...] = ("variant", "num_classes", "image_size")


def check_eval_config(workdir: str, config: TrainConfig) -> None:
    """Refuses (one line) to evaluate a workdir's checkpoints as another variant, class count or size."""
    saved = read_workdir_config(workdir)
    if saved is None:
        return
    for name in MODEL_DEFINING_FIELDS:
        if saved.get(name) is not None and not _same(saved[name], getattr(config, name)):
            raise ConfigMismatchError(
                f"workdir {workdir!r} was trained with --{name} {saved[name]} (its {CONFIG_FILENAME}), this run "
                f"has --{name} {getattr(config, name)}; rerun with --{name} {saved[name]}")


def write_workdir_config(workdir: str, config: TrainConfig) -> None:
    os.makedirs(workdir, exist_ok=True)
    write_text_atomically(os.path.join(workdir, CONFIG_FILENAME), config.to_json())


def check_workdir_config(workdir: str, config: TrainConfig) -> Dict[str, Tuple[Any, Any]]:
    """Refuses a workdir made by another model, data or optimisation; returns run-length changes.

    Returns {field: (saved, current)} over RUN_LENGTH_FIELDS (empty for a new workdir).
    Raises ConfigMismatchError listing every other field that differs.
    """
    saved = read_workdir_config(workdir)
    if saved is None:
        return {}
    diffs = config_differences(saved, config)
    refused = {k: v for k, v in diffs.items() if k not in RUN_LENGTH_FIELDS + BOOKKEEPING_FIELDS}
    if refused:
        lines = "\n".join(f"  {k}: workdir has {a!r}, this run has {b!r}" for k, (a, b) in refused.items())
        raise ConfigMismatchError(
            f"workdir {workdir!r} was created by a different training configuration "
            f"(see {os.path.join(workdir, CONFIG_FILENAME)}):\n{lines}\n"
            f"Use a new --workdir, or rerun with the workdir's settings to resume it "
            f"(only {', '.join(RUN_LENGTH_FIELDS)} may change, to extend or shorten the run)."
        )
    return {k: v for k, v in diffs.items() if k in RUN_LENGTH_FIELDS}
