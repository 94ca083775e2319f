"""PyTorch key layouts: Apple's ml-fastvit <-> timm / torch_ref, unfused and fused; and the
image towers inside full MobileCLIP checkpoints.

timm's own ``checkpoint_filter_fn`` mis-maps Apple's fused ``*_reparam`` checkpoints
(``lkb_reparam`` is kept, RepCPE's ``network.6.reparam_conv`` lands among the blocks);
``apple_to_timm`` handles both forms.

A CLIP checkpoint holds the image tower under a prefix, next to a text tower:

- open_clip (MobileCLIP / MobileCLIP2 ``open_clip_model.safetensors``): the timm model under
  ``visual.trunk.`` (``module.`` already stripped); when open_clip used the trunk's classifier as
  the projection it is ``visual.trunk.head.fc``, a separate linear projection is
  ``visual.head.proj.weight`` (E, F) [+ ``.bias``];
- Apple's MobileCLIP repository (``mobileclip_s*.pt``): Apple's FastViT layout under
  ``image_encoder.model.``, with the projection ``head.proj`` stored (F, E) (applied as x @ proj).

Either projection becomes the classifier ``head.fc`` (weight (E, F), zero bias when the source
has none), as timm's ``checkpoint_filter_fn`` does: ``forward_head`` then gives the (unnormalised)
image embedding. Every key outside the image tower (text tower, ``logit_scale``) is left out.
"""

from __future__ import annotations

import bisect
import re
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np

from fastvit_variants import VariantConfig

LAYOUTS = ("timm", "apple")
# Detected source layouts of full CLIP checkpoints (their image towers are timm / Apple inside).
CLIP_LAYOUTS = {"open_clip": "visual.", "mobileclip": "image_encoder."}
_OPEN_CLIP_TRUNK = "visual.trunk."
_OPEN_CLIP_PROJ = "visual.head.proj."
_MOBILECLIP_MODEL = "image_encoder.model."

# Apple -> timm substring renames, applied in this order.
_APPLE_TO_TIMM = (
    ("patch_embed.", "stem."),
    ("rbr_conv", "conv_kxk"),
    ("rbr_scale", "conv_scale"),
    ("rbr_skip", "identity"),
    ("conv_exp", "final_conv"),
    ("lkb_origin", "large_conv"),
    ("lkb_reparam", "reparam_conv"),
    (".convffn.", ".mlp."),
    ("se.reduce", "se.fc1"),
    ("se.expand", "se.fc2"),
)
# timm -> Apple: the same renames inverted, except two that are not one-to-one both ways: the
# stem is a prefix, and timm's reparam_conv is Apple's lkb_reparam only in a downsample's large kernel.
_NOT_INVERTIBLE = (("patch_embed.", "stem."), ("lkb_reparam", "reparam_conv"))
_TIMM_TO_APPLE = tuple((new, old) for old, new in reversed(_APPLE_TO_TIMM) if (old, new) not in _NOT_INVERTIBLE)
_LAYER_SCALE = re.compile(r"(layer_scale(?:_[12])?)$")
_NETWORK = re.compile(r"^network\.(\d+)\.(.*)$")


def detect_layout(keys) -> str:
    """'apple' (``patch_embed.`` / ``network.``), 'timm' (``stem.`` / ``stages.``); ValueError otherwise."""
    keys = list(keys)
    apple = any(k.startswith(("patch_embed.", "network.", "conv_exp.")) for k in keys)
    timm = any(k.startswith(("stem.", "stages.", "final_conv.")) for k in keys)
    if apple and timm:
        examples = [k for k in keys if k.startswith(("patch_embed.", "network."))][:2] + \
                   [k for k in keys if k.startswith(("stem.", "stages."))][:2]
        raise ValueError(f"mixed layout: keys of both Apple's and timm's layouts, e.g. {examples}")
    if apple:
        return "apple"
    if timm:
        return "timm"
    raise ValueError(
        "unknown layout: expected FastViT keys starting with 'stem.'/'stages.' (timm, torch_ref) or "
        f"'patch_embed.'/'network.' (Apple ml-fastvit); found e.g. {keys[:3]}")


def apple_key_to_timm(key: str, stage_ends: list) -> str:
    """Rename one Apple key (``stage_ends``: the ``network`` indices of the PatchEmbeds)."""
    for old, new in _APPLE_TO_TIMM:
        key = key.replace(old, new)
    if key.startswith("head.") and not key.startswith("head.fc."):
        key = "head.fc." + key[len("head."):]
    key = _LAYER_SCALE.sub(r"\1.gamma", key)
    m = _NETWORK.match(key)
    if m:
        n, rest = int(m.group(1)), m.group(2)
        stage = bisect.bisect_right(stage_ends, n)
        if rest.startswith("proj."):
            key = f"stages.{stage}.downsample.{rest}"
        elif rest.startswith("pe."):
            key = f"stages.{stage}.pos_emb.pos_enc.{rest[3:]}"
        elif rest.startswith("reparam_conv."):  # fused RepCPE: a network entry that is not a block list
            key = f"stages.{stage}.pos_emb.{rest}"
        else:
            key = f"stages.{stage}.blocks.{rest}"
    return key


def apple_to_timm(state_dict: Mapping[str, object]) -> Dict[str, object]:
    """Apple's ml-fastvit keys (unfused or fused ``*_reparam``) -> timm / torch_ref keys."""
    stage_ends = sorted({int(m.group(1)) for k in state_dict if (m := _NETWORK.match(k)) and m.group(2).startswith("proj.")})
    return {apple_key_to_timm(k, stage_ends): v for k, v in state_dict.items()}


def apple_network_indices(cfg: VariantConfig) -> Tuple[Dict[int, int], Dict[int, int], Dict[int, int]]:
    """Apple's flat ``network`` indices: (downsample, pos_emb, blocks) per stage."""
    down, pe, blocks, idx = {}, {}, {}, 0
    for st in cfg.stage_plans():  # Apple's network list: [downsample], [pos_emb], the blocks, per stage
        if st.downsample:
            down[st.index], idx = idx, idx + 1
        if st.pos_emb:
            pe[st.index], idx = idx, idx + 1
        blocks[st.index], idx = idx, idx + 1
    return down, pe, blocks


_STAGE = re.compile(r"^stages\.(\d+)\.(downsample|pos_emb|blocks)\.(.*)$")


def timm_key_to_apple(key: str, cfg: VariantConfig) -> str:
    """Rename one timm / torch_ref key to Apple's layout."""
    down, pe, blocks = apple_network_indices(cfg)
    m = _STAGE.match(key)
    if m:
        s, part, rest = int(m.group(1)), m.group(2), m.group(3)
        if part == "downsample":
            key = f"network.{down[s]}.{rest}"
        elif part == "pos_emb":
            rest = rest.replace("pos_enc.", "pe.", 1) if rest.startswith("pos_enc.") else rest
            key = f"network.{pe[s]}.{rest}"
        else:
            key = f"network.{blocks[s]}.{rest}"
    if key.startswith("stem."):
        key = "patch_embed." + key[len("stem."):]
    key = re.sub(r"\.gamma$", "", key) if re.search(r"layer_scale(_[12])?\.gamma$", key) else key
    for old, new in _TIMM_TO_APPLE:
        key = key.replace(old, new)
    key = re.sub(r"(network\.\d+\.proj\.0)\.reparam_conv", r"\1.lkb_reparam", key)
    if key.startswith("head.fc."):
        key = "head." + key[len("head.fc."):]
    return key


def timm_to_apple(state_dict: Mapping[str, object], cfg: VariantConfig) -> Dict[str, object]:
    """timm / torch_ref keys -> Apple's ml-fastvit keys (unfused or fused)."""
    return {timm_key_to_apple(k, cfg): v for k, v in state_dict.items()}


# --------------------------------------------------------------------------- CLIP checkpoints
def clip_layout(keys) -> Optional[str]:
    """'open_clip' (``visual.trunk.`` keys), 'mobileclip' (``image_encoder.model.``), or None."""
    keys = list(keys)
    if any(k.startswith(_OPEN_CLIP_TRUNK) for k in keys):
        return "open_clip"
    if any(k.startswith(_MOBILECLIP_MODEL) for k in keys):
        return "mobileclip"
    return None


def _projection_as_head(weight: Any, bias: Optional[Any], key: str) -> Dict[str, Any]:
    """A CLIP projection weight (E, F) [+ bias (E,)] -> ``head.fc.weight`` / ``head.fc.bias`` (zero bias if none)."""
    if len(weight.shape) != 2:
        raise ValueError(f"{key}: a CLIP projection is a matrix, found shape {tuple(weight.shape)}")
    if bias is None:
        bias = np.zeros((weight.shape[0],), np.float32)
    return {"head.fc.weight": weight, "head.fc.bias": bias}


def image_tower(state_dict: Mapping[str, Any], layout: str) -> Tuple[Dict[str, Any], List[str]]:
    """The image tower of a full CLIP checkpoint, as a bare timm- or Apple-layout state_dict.

    Values are passed through (numpy arrays or torch tensors); only the Apple projection is
    transposed (``.T``), so the text tower is never converted.

    Args:
      state_dict: key -> array, ``module.`` prefixes already stripped.
      layout: 'open_clip' or 'mobileclip' (see ``clip_layout``).
    Returns:
      (tower state_dict, the keys left out: text tower, ``logit_scale`` and the like).
    """
    if layout == "open_clip":
        tower = {k[len(_OPEN_CLIP_TRUNK):]: v for k, v in state_dict.items() if k.startswith(_OPEN_CLIP_TRUNK)}
        proj_w, proj_b = _OPEN_CLIP_PROJ + "weight", _OPEN_CLIP_PROJ + "bias"
        if proj_w in state_dict:
            if "head.fc.weight" in tower:
                raise ValueError(f"open_clip checkpoint has both visual.trunk.head.fc.weight and {proj_w}; "
                                 "expected one projection")
            tower.update(_projection_as_head(state_dict[proj_w], state_dict.get(proj_b), proj_w))
        used = {k for k in state_dict if k.startswith(_OPEN_CLIP_TRUNK) or k in (proj_w, proj_b)}
        rest_of_tower = [k for k in state_dict if k.startswith("visual.") and k not in used]
    elif layout == "mobileclip":
        tower = {k[len(_MOBILECLIP_MODEL):]: v for k, v in state_dict.items() if k.startswith(_MOBILECLIP_MODEL)}
        if "head.proj" in tower:
            proj = tower.pop("head.proj")
            tower.update(_projection_as_head(proj.T, None, _MOBILECLIP_MODEL + "head.proj"))
        used = {k for k in state_dict if k.startswith(_MOBILECLIP_MODEL)}
        rest_of_tower = [k for k in state_dict if k.startswith("image_encoder.") and k not in used]
    else:
        raise ValueError(f"unknown CLIP layout {layout!r}; valid: {', '.join(CLIP_LAYOUTS)}")
    if rest_of_tower:
        raise ValueError(f"{layout} checkpoint: image-tower keys outside the FastViT model, e.g. {rest_of_tower[:3]} "
                         f"({len(rest_of_tower)} in all)")
    left_out = [k for k in state_dict if not k.startswith(CLIP_LAYOUTS[layout])]
    return tower, left_out
