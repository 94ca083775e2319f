"""TrainConfig: one flat dataclass holding every knob of a training run.

Defaults come from Apple's recipe for the chosen variant (``variants.recipe_for``);
every field can be overridden (``TrainConfig.from_recipe(variant, **overrides)``).
The config is stored as ``config.json`` in the workdir; a restart with a config that
differs in a field that changes the run (``RESUME_FIELDS``) is refused.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Dict, Optional, Tuple

from fastvit_jax.variants import canonical_name, get_variant, recipe_for

CONFIG_FILENAME = "config.json"

# Fields that must be identical for a workdir to be resumed: changing any of them would
# silently change the model, the data order or the optimisation of the restored run.
RESUME_FIELDS: Tuple[str, ...] = (
    "variant",
    "dataset",
    "num_classes",
    "image_size",
    "global_batch_size",
    "seed",
    "lr",
    "num_epochs",
    "num_steps",
    "warmup_epochs",
    "warmup_steps",
    "cooldown_epochs",
    "warmup_lr",
    "min_lr",
    "weight_decay",
    "label_smoothing",
    "mixup",
    "cutmix",
    "mixup_switch_prob",
    "drop_path",
    "ema_decay",
    "randaugment",
    "reprob",
    "color_jitter",
    "rrc_scale",
    "hflip",
    "clip_grad",
)


class ConfigMismatchError(ValueError):
    """The workdir was created by a run with a different configuration."""


@dataclasses.dataclass
class TrainConfig:
    # What to train, on what.
    variant: str = "t8"
    dataset: str = "imagenet2012"
    data_dir: Optional[str] = None
    workdir: str = "workdir"
    num_classes: Optional[int] = None  # None: from the dataset
    image_size: int = 256
    crop_pct: Optional[float] = None  # eval centre crop; None: the variant's
    dtype: str = "auto"  # 'auto': bfloat16 on TPU/GPU, float32 on CPU
    # Length. num_epochs defines the cosine schedule; num_steps (if set) stops early /
    # defines the schedule when num_epochs is None.
    num_epochs: Optional[float] = 300.0
    num_steps: Optional[int] = None
    global_batch_size: int = 1024
    # Optimiser (AdamW) and schedule; lr is the peak lr at batch `base_batch_size`,
    # scaled linearly by global_batch_size / base_batch_size.
    lr: float = 1e-3
    base_batch_size: int = 1024
    weight_decay: float = 0.05
    warmup_epochs: float = 5.0
    warmup_steps: Optional[int] = None  # overrides warmup_epochs when set
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5
    cooldown_epochs: float = 0.0  # timm adds these at min_lr after the cosine (Apple: 10)
    clip_grad: Optional[float] = None
    # Regularisation.
    label_smoothing: float = 0.1
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_switch_prob: float = 0.5
    drop_path: float = 0.0
    ema_decay: float = 0.9995
    # Data augmentation (TrainAugment).
    randaugment: Optional[str] = "rand-m9-mstd0.5-inc1"
    reprob: float = 0.25
    color_jitter: float = 0.4
    rrc_scale: Tuple[float, float] = (0.08, 1.0)
    hflip: float = 0.5
    # Parallelism.
    mesh: str = "data:-1"
    fsdp_min_size: int = 2**18  # tensors with fewer elements stay replicated
    # Cadence / bookkeeping.
    seed: int = 0
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    eval_every: int = 0  # 0: evaluate only at the end
    eval_batch_size: Optional[int] = None  # None: global_batch_size
    log_every: int = 50
    init_from: Optional[str] = None
    eval_only: bool = False
    export: bool = True
    plot: bool = True
    progress: bool = True

    # ----------------------------------------------------------------------------------
    @classmethod
    def from_recipe(cls, variant: str, **overrides: Any) -> "TrainConfig":
        """Apple's recipe for ``variant`` with ``overrides`` applied (None is applied too:
        ``num_epochs=None`` means the schedule follows ``num_steps``)."""
        name = canonical_name(variant)
        r = recipe_for(name)
        cfg = cls(
            variant=name,
            num_epochs=float(r.epochs),
            lr=r.base_lr,
            base_batch_size=r.base_batch_size,
            weight_decay=r.weight_decay,
            warmup_epochs=float(r.warmup_epochs),
            warmup_lr=r.warmup_lr,
            min_lr=r.min_lr,
            label_smoothing=r.label_smoothing,
            mixup=r.mixup_alpha,
            cutmix=r.cutmix_alpha,
            mixup_switch_prob=r.mixup_switch_prob,
            drop_path=r.drop_path_rate,
            ema_decay=r.ema_decay,
            randaugment=r.randaugment,
            reprob=r.random_erase_prob,
            color_jitter=r.color_jitter,
            rrc_scale=tuple(r.rrc_scale),
            image_size=r.image_size,
        )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(overrides) - known
        if unknown:
            raise ValueError(f"unknown TrainConfig fields: {sorted(unknown)}")
        updates = dict(overrides)
        if "variant" in updates:
            updates["variant"] = canonical_name(updates["variant"])
        if updates.get("rrc_scale") is not None:
            updates["rrc_scale"] = tuple(updates["rrc_scale"])
        return dataclasses.replace(cfg, **updates)

    def replace(self, **kw: Any) -> "TrainConfig":
        return dataclasses.replace(self, **kw)

    @property
    def peak_lr(self) -> float:
        return self.lr * self.global_batch_size / self.base_batch_size

    @property
    def eval_crop_pct(self) -> float:
        return self.crop_pct if self.crop_pct is not None else get_variant(self.variant).crop_pct

    def validate(self) -> None:
        get_variant(self.variant)
        if self.num_epochs is None and self.num_steps is None:
            raise ValueError("set num_epochs or num_steps")
        if self.global_batch_size <= 0:
            raise ValueError(f"global_batch_size must be positive, got {self.global_batch_size}")
        if self.checkpoint_every <= 0:
            raise ValueError("checkpoint_every must be positive")
        if self.eval_only and not self.init_from and not _has_checkpoints(self.workdir):
            raise ValueError("--eval_only needs --init_from PATH (or a workdir with checkpoints)")

    # ----------------------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["rrc_scale"] = list(self.rrc_scale)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        if "rrc_scale" in kw and kw["rrc_scale"] is not None:
            kw["rrc_scale"] = tuple(kw["rrc_scale"])
        return cls(**kw)

    @classmethod
    def from_json(cls, s: str) -> "TrainConfig":
        return cls.from_dict(json.loads(s))


def _has_checkpoints(workdir: Optional[str]) -> bool:
    if not workdir:
        return False
    d = os.path.join(workdir, "checkpoints")
    return os.path.isdir(d) and any(n.isdigit() for n in os.listdir(d))


def config_differences(saved: Dict[str, Any], current: TrainConfig) -> Dict[str, Tuple[Any, Any]]:
    """{field: (saved, current)} over RESUME_FIELDS that differ."""
    cur = current.to_dict()
    diffs = {}
    for k in RESUME_FIELDS:
        a, b = saved.get(k), cur.get(k)
        if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
            a, b = list(a), list(b)
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
            if float(a) == float(b):
                continue
        if a != b:
            diffs[k] = (saved.get(k), cur.get(k))
    return diffs


def check_or_write_workdir_config(workdir: str, config: TrainConfig, *, write: bool = True) -> None:
    """Stores config.json in a new workdir, or refuses a workdir made by another config."""
    path = os.path.join(workdir, CONFIG_FILENAME)
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        diffs = config_differences(saved, config)
        if diffs:
            lines = "\n".join(f"  {k}: workdir has {a!r}, this run has {b!r}" for k, (a, b) in diffs.items())
            raise ConfigMismatchError(
                f"workdir {workdir!r} was created by a different training configuration "
                f"(see {path}):\n{lines}\n"
                "Use a new --workdir, or rerun with the workdir's settings to resume it."
            )
        return
    if write:
        os.makedirs(workdir, exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(config.to_json())
        os.replace(tmp, path)
