"""The FastViT variants, as plain data.

Two families share one architecture table:

- ``VARIANTS``: the seven ImageNet models of Apple's ml-fastvit (t8 ... ma36); numbers follow
  Apple's code, data configs follow timm's ``fastvit_*.apple_in1k``;
- ``MOBILECLIP_VARIANTS``: the MobileCLIP image towers mci0 ... mci4 (timm ``fastvit_mci*``;
  MobileCLIP S0-S2 and MobileCLIP2 S0-S4). They switch on what the base models leave off:
  squeeze-excite in the large-kernel downsamples of stages 3-4 (mci0-2), the activation after
  the large-kernel conv, and for mci3/mci4 a fifth stage (total stride 64), LayerNorm2d as the
  attention blocks' norm and a stem without the 1x1 scale branch.

``ALL_VARIANTS`` is both. This module imports neither JAX nor PyTorch, so both ``fastvit_jax``
and ``torch_ref`` read it (and so does ``convert``). The training recipe is in
``fastvit_jax/training/config.py``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

__all__ = [
    "VARIANTS",
    "MOBILECLIP_VARIANTS",
    "ALL_VARIANTS",
    "VariantConfig",
    "StagePlan",
    "ConvBlockPlan",
    "get_variant",
    "canonical_name",
    "OFFICIAL_PARAM_COUNTS",
    "TIMM_MOBILECLIP_PARAM_COUNTS",
    "MOBILECLIP_GMACS",
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
# OpenAI CLIP's normalisation (MobileCLIP2 S3/S4 towers); MobileCLIP S0-S2 take raw 0..1 pixels.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
UNIT_MEAN = (0.0, 0.0, 0.0)
UNIT_STD = (1.0, 1.0, 1.0)


@dataclasses.dataclass(frozen=True)
class VariantConfig:
    """Architecture of one FastViT variant (4 stages, or 5 for mci3/mci4).

    Attributes:
      name: short name ('t8', ..., 'ma36', 'mci0', ..., 'mci4').
      layers: blocks per stage.
      embed_dims: channels per stage.
      mlp_ratio: ConvFFN hidden expansion.
      token_mixers: 'repmixer' or 'attention' per stage.
      pos_emb: per stage, whether a RepCPE (7x7 conditional positional encoding)
        runs at the start of that stage.
      layer_scale_init: initial value of every layer scale (Apple's code: 1e-6 for
        sa36 / ma36, 1e-5 otherwise; timm uses 1e-5 everywhere).
      crop_pct: evaluation centre-crop fraction of the pretrained config.
      downsamples: per stage, whether a PatchEmbed (stride 2) starts it; a stage whose
        width differs from the previous one's always gets one.
      se_downsamples: per stage, whether that PatchEmbed's large-kernel conv has a
        squeeze-excite (rd ratio 1/4) on its output.
      lkc_use_act: apply GELU after the large-kernel conv (Apple's FastViT computed it and
        dropped it, so the base variants keep it off; the MobileCLIP towers use it).
      attention_norm: norm before attention, 'batchnorm' (BatchNorm2d) or 'layernorm'
        (LayerNorm over channels, eps 1e-5, not foldable into a conv).
      stem_use_scale_branch: whether the stem's 3x3 MobileOne blocks have the 1x1 branch.
      num_classes: classifier width of the published weights (1000 ImageNet classes, or
        the CLIP embedding width of a MobileCLIP tower).
      mean, std: input normalisation of the published weights.
      interpolation: resize filter of their evaluation transform.
    """

    name: str
    layers: Tuple[int, ...]
    embed_dims: Tuple[int, ...]
    mlp_ratio: float
    token_mixers: Tuple[str, ...]
    pos_emb: Tuple[bool, ...]
    layer_scale_init: float
    crop_pct: float
    repmixer_kernel_size: int = 3
    cls_ratio: float = 2.0
    head_dim: int = 32
    downsamples: Tuple[bool, ...] = (False, True, True, True)
    se_downsamples: Tuple[bool, ...] = (False, False, False, False)
    lkc_use_act: bool = False
    attention_norm: str = "batchnorm"
    stem_use_scale_branch: bool = True
    num_classes: int = 1000
    mean: Tuple[float, float, float] = IMAGENET_MEAN
    std: Tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bicubic"

    def __post_init__(self):
        n = len(self.layers)
        per_stage = {"embed_dims": self.embed_dims, "token_mixers": self.token_mixers, "pos_emb": self.pos_emb,
                     "downsamples": self.downsamples, "se_downsamples": self.se_downsamples}
        wrong = {k: len(v) for k, v in per_stage.items() if len(v) != n}
        if wrong:
            raise ValueError(f"variant {self.name!r}: {n} stages in layers={self.layers}, but lengths {wrong}")
        if self.attention_norm not in ATTENTION_NORMS:
            raise ValueError(f"variant {self.name!r}: attention_norm {self.attention_norm!r}; "
                             f"valid: {', '.join(ATTENTION_NORMS)}")

    @property
    def num_blocks(self) -> int:
        return sum(self.layers)

    @property
    def num_stages(self) -> int:
        return len(self.layers)

    @property
    def num_features(self) -> int:
        """Channels after the final conv (input of the classifier)."""
        return int(self.embed_dims[-1] * self.cls_ratio)

    @property
    def reduction(self) -> int:
        """Total stride: the stem's 4 times 2 per downsampling stage (32, or 64 for mci3/mci4)."""
        return self.stage_plans()[-1].stride

    def stage_downsamples(self) -> Tuple[bool, ...]:
        """Per stage, whether it starts with a PatchEmbed (as timm: asked for, or a width change)."""
        prev, out = self.embed_dims[0], []
        for down, dim in zip(self.downsamples, self.embed_dims):
            out.append(bool(down) or prev != dim)
            prev = dim
        return tuple(out)

    def stem_plan(self, in_chans: int = 3) -> Tuple["ConvBlockPlan", ...]:
        """The stem's three MobileOne blocks (``stem_0`` .. ``stem_2``): 3x3/2, depthwise 3x3/2, 1x1."""
        c0, scale = self.embed_dims[0], self.stem_use_scale_branch
        return (ConvBlockPlan(in_chans, c0, 3, 2, 1, scale_branch=scale),
                ConvBlockPlan(c0, c0, 3, 2, c0, scale_branch=scale),
                ConvBlockPlan(c0, c0, 1, 1, 1))

    def stage_plans(self) -> Tuple["StagePlan", ...]:
        """Every stage in order: what it holds, its widths and the stride of its output."""
        plans, prev, stride = [], self.embed_dims[0], 4
        for i, (down, depth, dim) in enumerate(zip(self.stage_downsamples(), self.layers, self.embed_dims)):
            stride *= 2 if down else 1
            plans.append(StagePlan(i, prev, dim, depth, self.token_mixers[i], down, self.se_downsamples[i],
                                   self.pos_emb[i], stride))
            prev = dim
        return tuple(plans)

    def final_conv_plan(self) -> "ConvBlockPlan":
        """``final_conv``: a depthwise 3x3 MobileOne block to ``num_features`` channels, with squeeze-excite."""
        c = self.embed_dims[-1]
        return ConvBlockPlan(c, self.num_features, 3, 1, c, se=True)


@dataclasses.dataclass(frozen=True)
class ConvBlockPlan:
    """A MobileOne block outside the stages (the stem's, the final conv)."""

    in_dim: int
    out_dim: int
    kernel_size: int
    stride: int
    groups: int
    scale_branch: bool = True  # the 1x1 conv-BN branch of a k > 1 block
    se: bool = False


@dataclasses.dataclass(frozen=True)
class StagePlan:
    """One stage of the forward pass: [``downsample``] -> [``pos_emb``] -> ``blocks_0`` ...

    The one description of a variant's structure that the Flax model, the PyTorch twin, the
    TensorFlow (TFLite) forward and Apple's key layout all follow.
    """

    index: int
    in_dim: int  # channels entering the stage
    dim: int  # channels of its blocks
    depth: int
    token_mixer: str  # 'repmixer' or 'attention'
    downsample: bool  # a PatchEmbed first: 7x7 large-kernel conv at stride 2, then a 1x1 MobileOne block
    se_downsample: bool  # squeeze-excite after that large-kernel conv
    pos_emb: bool  # a RepCPE (7x7 depthwise conv + identity) before the blocks
    stride: int  # total stride of the stage's output


ATTENTION_NORMS = ("batchnorm", "layernorm")

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

# The MobileCLIP towers' data config is Apple's and open_clip's preprocessing (resize the shorter
# side bilinearly, centre crop at that size: crop 1.0), not timm's (bicubic, crop 0.95).
_MCI_SMALL = dict(mlp_ratio=3.0, token_mixers=_RM3A, pos_emb=_PE4, layer_scale_init=1e-5, crop_pct=1.0,
                  interpolation="bilinear",
                  se_downsamples=(False, False, True, True), lkc_use_act=True, num_classes=512,
                  mean=UNIT_MEAN, std=UNIT_STD)
_MCI_LARGE = dict(mlp_ratio=4.0, token_mixers=("repmixer",) * 3 + ("attention",) * 2,
                  pos_emb=(False, False, False, True, True), layer_scale_init=1e-5, crop_pct=1.0,
                  interpolation="bilinear",
                  downsamples=(False, True, True, True, True), se_downsamples=(False,) * 5, lkc_use_act=True,
                  attention_norm="layernorm", stem_use_scale_branch=False, num_classes=768,
                  mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD)
_CONFIGS.update({
    "mci0": VariantConfig("mci0", (2, 6, 10, 2), (64, 128, 256, 512), **_MCI_SMALL),
    "mci1": VariantConfig("mci1", (4, 12, 20, 4), (64, 128, 256, 512), **_MCI_SMALL),
    "mci2": VariantConfig("mci2", (4, 12, 24, 4), (80, 160, 320, 640), **_MCI_SMALL),
    "mci3": VariantConfig("mci3", (2, 12, 24, 4, 2), (96, 192, 384, 768, 1536), **_MCI_LARGE),
    "mci4": VariantConfig("mci4", (2, 12, 24, 4, 4), (128, 256, 512, 1024, 2048), **_MCI_LARGE),
})
MOBILECLIP_VARIANTS: Tuple[str, ...] = ("mci0", "mci1", "mci2", "mci3", "mci4")
ALL_VARIANTS: Tuple[str, ...] = VARIANTS + MOBILECLIP_VARIANTS
# MobileCLIP towers with a 1000-class head (train form, fused form). The train counts are
# timm's fastvit_mci* counts; the fused ones are what reparameterization gives (one conv per
# fused block, the same in torch_ref, fastvit_jax and timm's block-by-block fusion).
TIMM_MOBILECLIP_PARAM_COUNTS = {
    "mci0": (11_907_176, 11_857_704),
    "mci1": (22_041_832, 21_961_256),
    "mci2": (36_440_360, 36_328_120),
    "mci3": (125_948_584, 125_787_208),
    "mci4": (322_735_336, 322_520_168),
}
# GMACs at 256x256 (train form, fused form), 1000 classes: multiply-accumulates of every conv
# and matmul (the attention products included), counted the way OFFICIAL_GMACS were.
MOBILECLIP_GMACS = {
    "mci0": (2.393, 2.386),
    "mci1": (4.668, 4.659),
    "mci2": (7.847, 7.835),
    "mci3": (14.822, 14.813),
    "mci4": (27.771, 27.759),
}

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


# Input sides every variant takes: FastViT halves the resolution five times (stem, then four
# downsamplings, 32 in all); multiples of 16 from 32 up keep every feature map at least 1x1
# with the same padding arithmetic as PyTorch, and ONNX / TFLite exports agree with JAX there
# (the demo trains at 48 px).
IMAGE_SIZE_MULTIPLE = 16
MIN_IMAGE_SIZE = 32


def check_image_size(size: int, flag: str = "--image_size") -> int:
    """``size`` if every variant accepts it, else a ValueError naming ``flag`` and the nearest valid size."""
    if size >= MIN_IMAGE_SIZE and size % IMAGE_SIZE_MULTIPLE == 0:
        return size
    nearest = max(MIN_IMAGE_SIZE, round(size / IMAGE_SIZE_MULTIPLE) * IMAGE_SIZE_MULTIPLE)
    raise ValueError(f"{flag} must be a multiple of {IMAGE_SIZE_MULTIPLE} and at least {MIN_IMAGE_SIZE}, got {size} "
                     f"(nearest valid: {flag} {nearest})")


def canonical_name(variant: str) -> str:
    """'fastvit_sa12' / 'SA12' / 'sa12' -> 'sa12'. Raises ValueError for unknown names."""
    if not isinstance(variant, str):
        raise ValueError(f"variant must be a string, got {variant!r}; valid: {', '.join(ALL_VARIANTS)}")
    name = variant.strip().lower()
    if name.startswith("fastvit_"):
        name = name[len("fastvit_"):]
    if name not in _CONFIGS:
        raise ValueError(
            f"unknown FastViT variant {variant!r}; valid: {', '.join(ALL_VARIANTS)} "
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
    label_names: Tuple[str, ...] = ()  # class i's name (timm's key); empty: ImageNet-1k's for 1000 classes, else none

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


def pretrained_cfg(variant: str, *, num_classes: Optional[int] = None,
                   image_size: Optional[int] = None) -> PretrainedCfg:
    """The data config of ``variant``'s published weights, as timm's ``pretrained_cfg``.

    Base variants: 1000 ImageNet classes, 256 px, crop 0.9 (0.95 for ma36), bicubic, ImageNet
    mean/std. MobileCLIP towers: the CLIP embedding as classifier (512 for mci0-2, 768 for
    mci3/mci4), 256 px, bilinear with no crop (Apple's and open_clip's preprocessing); mean 0 /
    std 1 (mci0-2) or OpenAI CLIP's (mci3/mci4).
    ``num_classes`` (default: the published head's) and ``image_size`` (square) override.
    """
    cfg = get_variant(variant)
    size = 256 if image_size is None else int(image_size)
    classes = cfg.num_classes if num_classes is None else int(num_classes)
    return PretrainedCfg(variant=cfg.name, num_classes=classes, input_size=(3, size, size),
                         crop_pct=cfg.crop_pct, interpolation=cfg.interpolation, mean=cfg.mean, std=cfg.std, num_features=cfg.num_features,
                         first_conv=_first_conv(cfg))


def _first_conv(cfg: VariantConfig) -> Tuple[str, ...]:
    """The convs that read the image (timm's ``first_conv``): no 1x1 branch in mci3/mci4's stem."""
    if cfg.stem_use_scale_branch:
        return ("stem.0.conv_kxk.0.conv", "stem.0.conv_scale.conv")
    return ("stem.0.conv_kxk.0.conv",)


def drop_path_rates(depths: Sequence[int], rate: float) -> List[List[float]]:
    """Per-block linear schedule: block j of N gets rate * j / (N - 1), split per stage."""
    total = sum(depths)
    flat = [rate * j / (total - 1) if total > 1 else 0.0 for j in range(total)]
    out, start = [], 0
    for d in depths:
        out.append(flat[start:start + d])
        start += d
    return out
