"""The FastViT network in PyTorch (NCHW), timm layout: stem, stages, final_conv, head."""

from __future__ import annotations

import copy
from typing import List, Sequence

import torch
from torch import nn

from fastvit_variants import (  # pure Python, no JAX
    ALL_VARIANTS,
    MOBILECLIP_VARIANTS,
    VARIANTS,
    VariantConfig,
    drop_path_rates,
    get_variant,
)
from torch_ref.layers import (
    AttentionBlock,
    MobileOneBlock,
    PatchEmbed,
    RepConditionalPosEnc,
    RepMixerBlock,
)

Tensor = torch.Tensor

__all__ = ["FastVit", "FastVitStage", "ClassifierHead", "create_model", "reparameterize_model", "drop_path_rates", "VARIANTS",
           "MOBILECLIP_VARIANTS", "ALL_VARIANTS"]


class FastVitStage(nn.Module):
    """[PatchEmbed downsample] -> [RepCPE] -> blocks.

    ``se_downsample`` / ``lkc_use_act``: squeeze-excite and activation of the downsample's
    large-kernel conv; ``attention_norm``: the attention blocks' norm ('batchnorm' / 'layernorm').
    """

    def __init__(self, dim: int, dim_out: int, depth: int, token_mixer: str, downsample: bool, pos_emb: bool,
                 mlp_ratio: float, kernel_size: int, drop_path: Sequence[float], layer_scale_init_value: float,
                 drop: float = 0.0, head_dim: int = 32, se_downsample: bool = False, lkc_use_act: bool = False,
                 attention_norm: str = "batchnorm", inference_mode: bool = False):
        super().__init__()
        self.downsample = (
            PatchEmbed(7, 2, dim, dim_out, use_se=se_downsample, lkc_use_act=lkc_use_act,
                       inference_mode=inference_mode) if downsample else nn.Identity()
        )
        self.pos_emb = RepConditionalPosEnc(dim_out, 7, inference_mode=inference_mode) if pos_emb else nn.Identity()
        if token_mixer == "repmixer":
            blocks = [
                RepMixerBlock(dim_out, kernel_size, mlp_ratio, drop, drop_path[i], layer_scale_init_value,
                              inference_mode)
                for i in range(depth)
            ]
        elif token_mixer == "attention":
            blocks = [
                AttentionBlock(dim_out, mlp_ratio, drop, drop_path[i], layer_scale_init_value, head_dim,
                               attention_norm)
                for i in range(depth)
            ]
        else:
            raise ValueError(f"unknown token mixer {token_mixer!r}; valid: 'repmixer', 'attention'")
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(self.pos_emb(self.downsample(x)))


class ClassifierHead(nn.Module):
    """Global average pool -> dropout -> Linear (key ``head.fc``); Identity fc when num_classes == 0."""

    def __init__(self, in_features: int, num_classes: int, drop_rate: float = 0.0):
        super().__init__()
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(in_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.drop(x.mean((2, 3)))
        return x if pre_logits else self.fc(x)


class FastVit(nn.Module):
    """FastViT (Vasu et al., ICCV 2023), faithful to Apple's ml-fastvit with timm's names;
    also the MobileCLIP image towers (mci0 ... mci4, as timm's ``fastvit_mci*``).

    Input: (B, 3, H, W) normalized as the variant's weights expect, H and W divisible by
    ``cfg.reduction`` (32; 64 for mci3/mci4). Output: (B, num_classes).
    """

    def __init__(self, cfg: VariantConfig, num_classes: int = 1000, in_chans: int = 3, drop_rate: float = 0.0,
                 proj_drop_rate: float = 0.0, drop_path_rate: float = 0.0, inference_mode: bool = False,
                 layer_scale_init_value: float | None = None):
        super().__init__()
        self.cfg = cfg
        self.num_classes = num_classes
        self.inference_mode = inference_mode
        ls_init = cfg.layer_scale_init if layer_scale_init_value is None else layer_scale_init_value
        # The structure is the variant's plan (fastvit_variants), as in fastvit_jax and the TF forward.
        self.stem = nn.Sequential(*[
            MobileOneBlock(b.in_dim, b.out_dim, b.kernel_size, b.stride, groups=b.groups, inference_mode=inference_mode,
                           use_se=b.se, use_scale_branch=b.scale_branch)
            for b in cfg.stem_plan(in_chans)])
        dpr = drop_path_rates(cfg.layers, drop_path_rate)
        self.stages = nn.Sequential(*[FastVitStage(
            st.in_dim, st.dim, st.depth, st.token_mixer, downsample=st.downsample, pos_emb=st.pos_emb,
            mlp_ratio=cfg.mlp_ratio, kernel_size=cfg.repmixer_kernel_size, drop_path=dpr[st.index],
            layer_scale_init_value=ls_init, drop=proj_drop_rate, head_dim=cfg.head_dim,
            se_downsample=st.se_downsample, lkc_use_act=cfg.lkc_use_act, attention_norm=cfg.attention_norm,
            inference_mode=inference_mode) for st in cfg.stage_plans()])
        self.num_features = cfg.num_features
        fc = cfg.final_conv_plan()
        self.final_conv = MobileOneBlock(fc.in_dim, fc.out_dim, fc.kernel_size, fc.stride, groups=fc.groups,
                                         inference_mode=inference_mode, use_se=fc.se, use_scale_branch=fc.scale_branch)
        self.head = ClassifierHead(self.num_features, num_classes, drop_rate)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward_stages(self, x: Tensor) -> List[Tensor]:
        """The stage outputs (NCHW, strides 4, 8, 16, 32 [, 64]), the last attention stage included."""
        x = self.stem(x)
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats

    def forward_features(self, x: Tensor) -> Tensor:
        """stem -> stages -> final_conv: (B, 2*C_last, H/r, W/r), r = ``cfg.reduction``."""
        return self.final_conv(self.stages(self.stem(x)))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def create_model(variant: str, num_classes: int | None = None, inference_mode: bool = False,
                 drop_path_rate: float = 0.0, **kwargs) -> FastVit:
    """Build a FastViT variant ('t8' or 'fastvit_t8', 'mci0' or 'fastvit_mci0').

    ``inference_mode=True`` builds the fused graph. ``num_classes`` defaults to the published
    head's width, as timm: 1000 for the base variants, the CLIP embedding (512 / 768) for the
    MobileCLIP towers. Raises ValueError naming the valid variants for an unknown name.
    """
    cfg = get_variant(variant)
    num_classes = cfg.num_classes if num_classes is None else num_classes
    return FastVit(cfg, num_classes=num_classes, inference_mode=inference_mode,
                   drop_path_rate=drop_path_rate, **kwargs)


def reparameterize_model(model: nn.Module) -> nn.Module:
    """A fused deep copy of ``model`` (the input is left unchanged), in eval mode.

    Every module with a ``reparameterize`` method fuses itself (conv-BN folding, see ``torch_ref.layers``).
    """
    fused = copy.deepcopy(model)
    for module in list(fused.modules()):
        if hasattr(module, "reparameterize"):
            module.reparameterize()
    if isinstance(fused, FastVit):
        fused.inference_mode = True
    return fused.eval()
