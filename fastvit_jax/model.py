"""The FastViT network in Flax linen (NHWC), mirroring ``torch_ref/model.py``."""

from __future__ import annotations

import functools
from typing import Any, Callable, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
from flax import linen as nn

from fastvit_jax.layers import (
    AttentionBlock,
    MobileOneBlock,
    PatchEmbed,
    RepConditionalPosEnc,
    RepMixerBlock,
    trunc_normal_02,
)
from fastvit_jax.conv import materialize, needs_materialized_input
from fastvit_jax.fusion import is_fused
from fastvit_jax.policy import ComputePolicy, compute_dtype, compute_policy, current_policy
from fastvit_jax.remat import rematerialized
from fastvit_variants import PretrainedCfg, VariantConfig, drop_path_rates, get_variant
from fastvit_variants import pretrained_cfg as default_pretrained_cfg

__all__ = ["FastVit", "FastVitStage", "ClassifierHead", "create_model", "drop_path_rates"]


class FastVitStage(nn.Module):
    """[PatchEmbed ``downsample``] -> [RepCPE ``pos_emb``] -> ``blocks_0`` ... ``blocks_{depth-1}``.

    ``se_downsample`` / ``lkc_use_act``: squeeze-excite and activation of the downsample's
    large-kernel conv; ``attention_norm``: the attention blocks' norm ('batchnorm' / 'layernorm').
    """

    dim: int
    dim_out: int
    depth: int
    token_mixer: str
    downsample: bool
    pos_emb: bool
    mlp_ratio: float
    kernel_size: int
    drop_path: Tuple[float, ...]
    layer_scale_init_value: float
    drop: float = 0.0
    head_dim: int = 32
    se_downsample: bool = False
    lkc_use_act: bool = False
    attention_norm: str = "batchnorm"
    inference_mode: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        policy = current_policy()  # remat: what the backward recomputes per block and downsample
        repmixer_block, attention_block, patch_embed = (rematerialized(RepMixerBlock, policy.remat),
                                                        rematerialized(AttentionBlock, policy.remat),
                                                        rematerialized(PatchEmbed, policy.remat))
        if self.downsample:
            x = patch_embed(7, 2, self.dim, self.dim_out, use_se=self.se_downsample, lkc_use_act=self.lkc_use_act,
                            inference_mode=self.inference_mode, name="downsample")(x, train)
        if self.pos_emb:
            x = RepConditionalPosEnc(self.dim_out, 7, self.inference_mode, name="pos_emb")(x)
        for i in range(self.depth):
            if needs_materialized_input(policy.lowering):
                x = materialize(x)  # the residual stream: written once, not recomputed by later blocks
            if self.token_mixer == "repmixer":
                block = repmixer_block(self.dim_out, self.kernel_size, self.mlp_ratio, self.drop, self.drop_path[i],
                                      self.layer_scale_init_value, self.inference_mode, name=f"blocks_{i}")
            elif self.token_mixer == "attention":
                block = attention_block(self.dim_out, self.mlp_ratio, self.drop, self.drop_path[i],
                                       self.layer_scale_init_value, self.head_dim, self.attention_norm,
                                       name=f"blocks_{i}")
            else:
                raise ValueError(f"unknown token mixer {self.token_mixer!r}; valid: 'repmixer', 'attention'")
            x = block(x, train)
        return x


class ClassifierHead(nn.Module):
    """Global average pool -> dropout -> Dense ``fc`` (no fc when num_classes == 0)."""

    num_classes: int
    drop_rate: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool, pre_logits: bool = False) -> jax.Array:
        dtype = compute_dtype()
        x = jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(dtype)
        x = nn.Dropout(self.drop_rate, deterministic=not train)(x)
        if pre_logits or self.num_classes == 0:
            return x
        return nn.Dense(self.num_classes, kernel_init=trunc_normal_02, dtype=dtype, name="fc")(x)


def _under_policy(method: Callable) -> Callable:
    """A ``FastVit`` entry point, traced under the model's ``policy`` (``fastvit_jax.policy``)."""

    @functools.wraps(method)
    def wrapped(self, *args, **kwargs):
        with compute_policy(self.policy):
            return method(self, *args, **kwargs)

    return wrapped


class FastVit(nn.Module):
    """FastViT (Vasu et al., ICCV 2023), Apple's architecture with timm's module names; also the
    MobileCLIP image towers (mci0 ... mci4, as timm's ``fastvit_mci*``).

    Input: (B, H, W, 3) NHWC, normalized as ``pretrained_cfg`` says, H and W divisible by
    ``cfg.reduction`` (32; 64 for the five-stage mci3/mci4). Output: (B, num_classes) logits (float32 even with a bfloat16
    compute dtype). ``policy``: compute dtype, conv lowering and remat, read by every layer
    (``fastvit_jax.policy``). ``pretrained_cfg`` (set by ``create_model`` / ``load_model``) describes the expected input.
    """

    cfg: VariantConfig
    num_classes: int = 1000
    drop_rate: float = 0.0
    proj_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    inference_mode: bool = False
    layer_scale_init_value: Optional[float] = None
    policy: ComputePolicy = ComputePolicy()
    pretrained_cfg: Optional[PretrainedCfg] = None

    def setup(self):
        cfg = self.cfg
        common = dict(inference_mode=self.inference_mode)
        ls_init = cfg.layer_scale_init if self.layer_scale_init_value is None else self.layer_scale_init_value
        # The structure is the variant's plan (fastvit_variants: stem_plan, stage_plans, final_conv_plan),
        # as in torch_ref and the TensorFlow forward. Lists assigned in setup are named stem_0..,
        # stages_0.. (torch: stem.0, stages.0).
        # The stem (the largest activations, at strides 2 and 4), the downsamples and the final
        # conv are rematerialized like the blocks: under 'elementwise' the backward keeps only
        # their conv outputs too.
        mobileone = rematerialized(MobileOneBlock, self.policy.remat)
        self.stem = [mobileone(b.in_dim, b.out_dim, b.kernel_size, b.stride, groups=b.groups,
                               use_scale_branch=b.scale_branch, use_se=b.se, **common) for b in cfg.stem_plan()]
        dpr = drop_path_rates(cfg.layers, self.drop_path_rate)
        self.stages = [FastVitStage(
            st.in_dim, st.dim, st.depth, st.token_mixer, downsample=st.downsample, pos_emb=st.pos_emb,
            mlp_ratio=cfg.mlp_ratio, kernel_size=cfg.repmixer_kernel_size, drop_path=tuple(dpr[st.index]),
            layer_scale_init_value=ls_init, drop=self.proj_drop_rate, head_dim=cfg.head_dim,
            se_downsample=st.se_downsample, lkc_use_act=cfg.lkc_use_act, attention_norm=cfg.attention_norm,
            **common) for st in cfg.stage_plans()]
        fc = cfg.final_conv_plan()
        self.final_conv = mobileone(fc.in_dim, fc.out_dim, fc.kernel_size, fc.stride, groups=fc.groups,
                                    use_scale_branch=fc.scale_branch, use_se=fc.se, **common)
        self.head = ClassifierHead(self.num_classes, self.drop_rate)

    @_under_policy
    def forward_stages(self, x: jax.Array, train: bool = False,
                       out_indices: Optional[Sequence[int]] = None) -> List[jax.Array]:
        """Stage outputs, NHWC at strides 4, 8, 16, 32 [, 64] (the last attention stage included).

        ``out_indices`` picks stages (e.g. ``(1, 3)``; negative counts from the end); default all
        of them (four, or five for mci3/mci4). Stages after the last requested one are not computed.
        """
        check_input(x)
        if not self.is_initializing():
            check_variables_form(self.variables.get("params", {}), self.inference_mode)
        n = len(self.cfg.layers)
        wanted = sorted({i % n for i in range(n)} if out_indices is None else {_stage_index(i, n) for i in out_indices})
        x = x.astype(self.policy.dtype)
        for i, block in enumerate(self.stem):
            if i and needs_materialized_input(self.policy.lowering):
                x = materialize(x)  # a GELU output, read by the next conv's taps: computed once
            x = block(x, train)
        feats = []
        for i, stage in enumerate(self.stages[:wanted[-1] + 1]):
            x = stage(x, train)
            if i in wanted:
                feats.append(x)
        return feats

    @_under_policy
    def forward_features(self, x: jax.Array, train: bool = False) -> jax.Array:
        """stem -> stages -> final_conv: (B, H/r, W/r, 2*C_last), r = ``cfg.reduction`` (32 or 64)."""
        return self.final_conv(self.forward_stages(x, train)[-1], train)

    @_under_policy
    def forward_head(self, x: jax.Array, train: bool = False, pre_logits: bool = False) -> jax.Array:
        return self.head(x, train, pre_logits)

    @_under_policy
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        return self.forward_head(self.forward_features(x, train), train).astype(jnp.float32)


def check_input(x: jax.Array) -> None:
    """A (B, H, W, 3) batch, or a ValueError that says what was passed and how to fix it."""
    shape = tuple(x.shape)
    if len(shape) == 3 and shape[-1] == 3:
        raise ValueError(f"FastViT takes a batch (B, H, W, 3); got one image {shape}: add a batch axis (x[None])")
    if len(shape) != 4:
        raise ValueError(f"FastViT takes an NHWC batch (B, H, W, 3); got shape {shape}")
    if shape[-1] != 3 and shape[1] == 3:
        raise ValueError(f"FastViT takes NHWC input (B, H, W, 3); got {shape}, which looks NCHW: "
                         "transpose it with x.transpose(0, 2, 3, 1)")
    if shape[-1] != 3:
        raise ValueError(f"FastViT takes RGB input with 3 channels last (B, H, W, 3); got {shape} "
                         f"({shape[-1]} channels): convert grey or RGBA images to RGB")


def check_variables_form(params: Any, inference_mode: bool) -> None:
    """Fused variables need ``inference_mode=True``, train-form ones ``False``; else a ValueError saying so.

    The form is read from the first stem block (``fastvit_jax.fusion.is_fused``).
    """
    stem = params.get("stem_0") if hasattr(params, "get") else None
    if not stem:
        return
    fused = is_fused(stem)
    if fused and not inference_mode:
        raise ValueError("these variables are the fused (inference) form: build the model with "
                         "create_model(..., inference_mode=True), or pass the train-form variables")
    if not fused and inference_mode:
        raise ValueError("these variables are the train (unfused) form but the model has inference_mode=True: "
                         "fuse them first with fastvit_jax.reparameterize(variables), or build the model with "
                         "inference_mode=False")


def _stage_index(index: int, num_stages: int) -> int:
    if not -num_stages <= index < num_stages:
        raise ValueError(f"out_indices entry {index} is out of range for {num_stages} stages "
                         f"(valid: 0..{num_stages - 1} or -{num_stages}..-1)")
    return index % num_stages


def create_model(variant: str, *, num_classes: Optional[int] = None, inference_mode: bool = False, drop_path_rate: float = 0.0,
                 dtype: Any = jnp.float32, drop_rate: float = 0.0, lowering: Optional[str] = None,
                 layer_scale_init_value: Optional[float] = None,
                 pretrained_cfg: Optional[PretrainedCfg] = None, pretrained: Any = False,
                 remat: str = "none") -> FastVit:
    """Build a FastViT variant ('t8' or 'fastvit_t8'; MobileCLIP towers 'mci0' ... 'mci4').

    ``num_classes`` defaults to the published head's width, as timm: 1000 for the base
    variants, the CLIP embedding width (512 for mci0-2, 768 for mci3/mci4) for the towers.

    ``inference_mode=True`` builds the fused graph (the tree ``reparameterize`` produces).
    ``dtype`` is the compute dtype (params stay float32). ``remat`` ('none', 'elementwise',
    'block'): what the training backward recomputes (``fastvit_jax.remat``). ``lowering`` forces the conv
    lowering ('native' or 'shift'; default: chosen per backend, see ``fastvit_jax.conv``).
    ``pretrained_cfg`` (default: ``fastvit_jax.pretrained_cfg(variant, num_classes=...)``) is
    the data config carried by the model. Raises ValueError naming the valid variants for an
    unknown name. To use weights from a file, see ``fastvit_jax.load_model``.

    ``pretrained`` (timm's habit): a hub name (``"hf-hub:timm/fastvit_t8.apple_in1k"``), a weights
    file, or True for the variant's published ImageNet weights on the Hub (cached or fetched,
    ``fastvit_jax.hub``); the module is then returned bound to those variables (``model(x)``
    runs it; ``model.unbind()`` gives ``(module, variables)``), with the head resized when
    ``num_classes`` differs from the file's.
    """
    if pretrained:
        return _bound_to_pretrained(variant, pretrained, num_classes=num_classes, inference_mode=inference_mode,
                                    dtype=dtype, drop_path_rate=drop_path_rate, drop_rate=drop_rate,
                                    lowering=lowering)
    cfg = get_variant(variant)
    num_classes = cfg.num_classes if num_classes is None else num_classes
    if pretrained_cfg is None:
        pretrained_cfg = default_pretrained_cfg(cfg.name, num_classes=num_classes)
    return FastVit(cfg, num_classes=num_classes, drop_rate=drop_rate, drop_path_rate=drop_path_rate,
                   inference_mode=inference_mode, layer_scale_init_value=layer_scale_init_value,
                   policy=ComputePolicy(dtype, lowering, remat), pretrained_cfg=pretrained_cfg)


def _bound_to_pretrained(variant: str, pretrained: Any, *, num_classes: Optional[int], inference_mode: bool,
                         **model_kwargs: Any) -> FastVit:
    """``create_model(..., pretrained=...)``: the loaded module bound to its variables."""
    from fastvit_jax import hub
    from fastvit_jax.loading import load_model

    name = get_variant(variant).name
    if pretrained is True:
        if name not in hub.DEFAULT_REPOS:
            raise ValueError(f"no default pretrained weights for {name}: pass pretrained='hf-hub:OWNER/REPO' or a "
                             f"file (published defaults: {', '.join(hub.DEFAULT_REPOS)})")
        pretrained = hub.HUB_PREFIX + hub.DEFAULT_REPOS[name]
    model, variables = load_model(pretrained, variant=name, num_classes=num_classes,
                                  inference_mode=True if inference_mode else None, **model_kwargs)
    return model.bind(variables)
