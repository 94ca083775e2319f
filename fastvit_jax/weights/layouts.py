"""PyTorch key layouts: Apple's ml-fastvit <-> timm / torch_ref, unfused and fused.

timm's own ``checkpoint_filter_fn`` mis-maps Apple's fused ``*_reparam`` checkpoints
(``lkb_reparam`` is kept, RepCPE's ``network.6.reparam_conv`` lands among the blocks);
``apple_to_timm`` handles both forms.
"""

from __future__ import annotations

import bisect
import re
from typing import Dict, Mapping, Tuple

from fastvit_jax.variants import VariantConfig

LAYOUTS = ("timm", "apple")

# Apple -> timm substring renames, applied in this order.
_APPLE_TO_TIMM = (
    ("patch_embed.", "stem."),
    ("rbr_conv", "conv_kxk"),
    ("rbr_scale", "conv_scale"),
    ("rbr_skip", "identity"),
    ("conv_exp", "final_conv"),
    ("lkb_origin", "large_conv"),
    ("lkb_reparam", "reparam_conv"),
    ("convffn", "mlp"),
    ("se.reduce", "se.fc1"),
    ("se.expand", "se.fc2"),
)
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
    for s in range(len(cfg.layers)):
        if s > 0:
            down[s], idx = idx, idx + 1
        if cfg.pos_emb[s]:
            pe[s], idx = idx, idx + 1
        blocks[s], idx = idx, idx + 1
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
    for old, new in (("conv_kxk", "rbr_conv"), ("conv_scale", "rbr_scale"), ("identity", "rbr_skip"),
                     ("final_conv", "conv_exp"), ("large_conv", "lkb_origin"), (".mlp.", ".convffn."),
                     ("se.fc1", "se.reduce"), ("se.fc2", "se.expand")):
        key = key.replace(old, new)
    key = re.sub(r"(network\.\d+\.proj\.0)\.reparam_conv", r"\1.lkb_reparam", key)
    if key.startswith("head.fc."):
        key = "head." + key[len("head.fc."):]
    return key


def timm_to_apple(state_dict: Mapping[str, object], cfg: VariantConfig) -> Dict[str, object]:
    """timm / torch_ref keys -> Apple's ml-fastvit keys (unfused or fused)."""
    return {timm_key_to_apple(k, cfg): v for k, v in state_dict.items()}
