"""The seven FastViT variants, as plain data.

This module is the single source of truth for the architecture table. It imports
neither JAX nor PyTorch, so both ``fastvit_jax`` and ``torch_ref`` read it (and so
does ``convert``). Numbers follow Apple's ml-fastvit code; the data configs of the
released ImageNet weights (``pretrained_cfg``) follow timm's ``fastvit_*.apple_in1k``.
The training recipe is in ``fastvit_jax/training/config.py``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

__all__ = [
    "VARIANTS",
    "VariantConfig",
    "get_variant",
    "canonical_name",
    "OFFICIAL_PARAM_COUNTS",
    "OFFICIAL_GMACS",
    "PAPER_NUMBERS",
    "drop_path_rates",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PretrainedCfg",
    "pretrained_cfg",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class VariantConfig:
    """Architecture of one FastViT variant.

    Attributes:
      name: short name ('t8', ..., 'ma36').
      layers: blocks per stage (4 stages).
      embed_dims: channels per stage.
      mlp_ratio: ConvFFN hidden expansion.
      token_mixers: 'repmixer' or 'attention' per stage.
      pos_emb: per stage, whether a RepCPE (7x7 conditional positional encoding)
        runs at the start of that stage.
      layer_scale_init: initial value of every layer scale (Apple's code: 1e-6 for
        sa36 / ma36, 1e-5 otherwise; timm uses 1e-5 everywhere).
      crop_pct: evaluation centre-crop fraction of the pretrained config.
    """

    name: str
    layers: Tuple[int, int, int, int]
    embed_dims: Tuple[int, int, int, int]
    mlp_ratio: float
    token_mixers: Tuple[str, str, str, str]
    pos_emb: Tuple[bool, bool, bool, bool]
    layer_scale_init: float
    crop_pct: float
    repmixer_kernel_size: int = 3
    cls_ratio: float = 2.0
    head_dim: int = 32

    @property
    def num_blocks(self) -> int:
        return sum(self.layers)

    @property
    def num_features(self) -> int:
        """Channels after the final conv (input of the classifier)."""
        return int(self.embed_dims[-1] * self.cls_ratio)


_RM4 = ("repmixer",) * 4
_RM3A = ("repmixer", "repmixer", "repmixer", "attention")
_NO_PE = (False, False, False, False)
_PE4 = (False, False, False, True)

_CONFIGS = {
    "t8": VariantConfig("t8", (2, 2, 4, 2), (48, 96, 192, 384), 3.0, _RM4, _NO_PE, 1e-5, 0.9),
    "t12": VariantConfig("t12", (2, 2, 6, 2), (64, 128, 256, 512), 3.0, _RM4, _NO_PE, 1e-5, 0.9),
    "s12": VariantConfig("s12", (2, 2, 6, 2), (64, 128, 256, 512), 4.0, _RM4, _NO_PE, 1e-5, 0.9),
    "sa12": VariantConfig("sa12", (2, 2, 6, 2), (64, 128, 256, 512), 4.0, _RM3A, _PE4, 1e-5, 0.9),
    "sa24": VariantConfig("sa24", (4, 4, 12, 4), (64, 128, 256, 512), 4.0, _RM3A, _PE4, 1e-5, 0.9),
    # crop_pct as timm's apple_in1k configs (0.95 only for ma36); Apple's ml-fastvit config says 0.95 for sa36 too.
    "sa36": VariantConfig("sa36", (6, 6, 18, 6), (64, 128, 256, 512), 4.0, _RM3A, _PE4, 1e-6, 0.9),
    "ma36": VariantConfig("ma36", (6, 6, 18, 6), (76, 152, 304, 608), 4.0, _RM3A, _PE4, 1e-6, 0.95),
}

VARIANTS: Tuple[str, ...] = tuple(_CONFIGS)

# Exact counts of Apple's code (train form, fused form).
OFFICIAL_PARAM_COUNTS = {
    "t8": (4_026_232, 3_996_040),
    "t12": (7_553_704, 7_508_840),
    "s12": (9_473_576, 9_428_712),
    "sa12": (11_580_968, 11_545_320),
    "sa24": (21_554_216, 21_501_288),
    "sa36": (31_527_464, 31_457_256),
    "ma36": (44_068_004, 43_984_632),
}
# GMACs at 256x256 (train form, fused form), from Apple's code.
OFFICIAL_GMACS = {
    "t8": (0.690, 0.685),
    "t12": (1.398, 1.391),
    "s12": (1.800, 1.794),
    "sa12": (1.944, 1.937),
    "sa24": (3.770, 3.762),
    "sa36": (5.596, 5.587),
    "ma36": (7.826, 7.815),
}
# The paper's table (params in M, GFLOPs = GMACs, ImageNet top-1 at 256).
PAPER_NUMBERS = {
    "t8": (3.6, 0.7, 75.6),
    "t12": (6.8, 1.4, 79.1),
    "s12": (8.8, 1.8, 79.8),
    "sa12": (10.9, 1.9, 80.6),
    "sa24": (20.6, 3.8, 82.6),
    "sa36": (30.4, 5.6, 83.6),
    "ma36": (42.7, 7.9, 83.9),
}


def canonical_name(variant: str) -> str:
    """'fastvit_sa12' / 'SA12' / 'sa12' -> 'sa12'. Raises ValueError for unknown names."""
    if not isinstance(variant, str):
        raise ValueError(f"variant must be a string, got {variant!r}; valid: {', '.join(VARIANTS)}")
    name = variant.strip().lower()
    if name.startswith("fastvit_"):
        name = name[len("fastvit_"):]
    if name not in _CONFIGS:
        raise ValueError(
            f"unknown FastViT variant {variant!r}; valid: {', '.join(VARIANTS)} "
            f"(optionally prefixed 'fastvit_')"
        )
    return name


def get_variant(variant: str) -> VariantConfig:
    """The architecture config of ``variant`` ('t8' or 'fastvit_t8')."""
    return _CONFIGS[canonical_name(variant)]


@dataclasses.dataclass(frozen=True)
class PretrainedCfg:
    """How a model's weights expect their input (timm's ``pretrained_cfg`` / ``resolve_data_config``).

    ``input_size`` is (C, H, W) as in timm; JAX models take NHWC (B, H, W, C). Evaluation
    resizes the shorter side to ``int(H / crop_pct)`` with ``interpolation``, centre-crops
    H x W, scales to 0..1 and normalises with ``mean``/``std`` (see ``fastvit_jax.transforms``).
    """

    variant: str
    num_classes: int = 1000
    input_size: Tuple[int, int, int] = (3, 256, 256)
    crop_pct: float = 0.9
    crop_mode: str = "center"
    interpolation: str = "bicubic"
    mean: Tuple[float, float, float] = IMAGENET_MEAN
    std: Tuple[float, float, float] = IMAGENET_STD
    num_features: int = 768
    first_conv: Tuple[str, ...] = ("stem.0.conv_kxk.0.conv", "stem.0.conv_scale.conv")
    classifier: str = "head.fc"

    @property
    def image_size(self) -> int:
        """Side of the (square) evaluation crop."""
        return int(self.input_size[-1])

    def replace(self, **changes: Any) -> "PretrainedCfg":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> Dict[str, Any]:
        return {f.name: (list(v) if isinstance(v, tuple) else v)
                for f in dataclasses.fields(self) for v in [getattr(self, f.name)]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "PretrainedCfg":
        """Inverse of ``to_dict``; unknown keys are named in the error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown pretrained_cfg entries {unknown}; known: {sorted(names)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def pretrained_cfg(variant: str, *, num_classes: int = 1000, image_size: Optional[int] = None) -> PretrainedCfg:
    """The data config of ``variant``'s ImageNet weights: 256 px, crop 0.9 (0.95 for ma36),
    bicubic, ImageNet mean/std. ``image_size`` changes the input size (square)."""
    cfg = get_variant(variant)
    size = 256 if image_size is None else int(image_size)
    return PretrainedCfg(variant=cfg.name, num_classes=int(num_classes), input_size=(3, size, size),
                         crop_pct=cfg.crop_pct, num_features=cfg.num_features)


def drop_path_rates(depths: Sequence[int], rate: float) -> List[List[float]]:
    """Per-block linear schedule: block j of N gets rate * j / (N - 1), split per stage."""
    total = sum(depths)
    flat = [rate * j / (total - 1) if total > 1 else 0.0 for j in range(total)]
    out, start = [], 0
    for d in depths:
        out.append(flat[start:start + d])
        start += d
    return out
