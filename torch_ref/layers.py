"""FastViT building blocks in PyTorch (NCHW), with timm's module and parameter names.

Each re-parameterizable block carries both forms: the train form (parallel conv-BN
branches) and, after ``reparameterize()`` or when built with ``inference_mode=True``,
a single ``reparam_conv`` with bias. The fusion math lives in ``fuse_conv_bn`` and
``identity_kernel``; the Flax twin is ``fastvit_jax/layers.py`` (each block's ``fuse``) with
``fastvit_jax/fusion.py``.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor


# --------------------------------------------------------------------------- fusion math
def fuse_conv_bn(kernel: Tensor, bn: nn.BatchNorm2d) -> Tuple[Tensor, Tensor]:
    """Fold eval-mode BatchNorm into a bias-free conv.

    Args:
      kernel: conv weight (O, I/g, kh, kw).
      bn: the BatchNorm2d over the O output channels.
    Returns:
      (kernel * s, beta - mean * s) with s = gamma / sqrt(var + eps).
    """
    std = (bn.running_var + bn.eps).sqrt()
    s = bn.weight / std
    return kernel * s.reshape(-1, 1, 1, 1), bn.bias - bn.running_mean * s


def identity_kernel(channels: int, groups: int, kernel_size: int, like: Tensor) -> Tensor:
    """The k x k grouped conv kernel (C, C/groups, k, k) that computes the identity."""
    in_per_group = channels // groups
    kernel = torch.zeros(channels, in_per_group, kernel_size, kernel_size, dtype=like.dtype, device=like.device)
    idx = torch.arange(channels)
    kernel[idx, idx % in_per_group, kernel_size // 2, kernel_size // 2] = 1.0
    return kernel


def pad_kernel_to(kernel: Tensor, kernel_size: int) -> Tensor:
    """Zero-pad a centred (O, I, k, k) kernel to (O, I, K, K)."""
    pad = (kernel_size - kernel.shape[-1]) // 2
    return F.pad(kernel, [pad, pad, pad, pad])


def same_padding(kernel_size: int, stride: int = 1) -> int:
    """timm's symmetric padding: ((stride - 1) + (k - 1)) // 2 (3x3/s2 -> 1, 7x7/s2 -> 3, 1x1/s2 -> 0)."""
    return ((stride - 1) + (kernel_size - 1)) // 2


def conv2d(in_chs: int, out_chs: int, kernel_size: int, stride: int = 1, groups: int = 1, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(in_chs, out_chs, kernel_size, stride, same_padding(kernel_size, stride), groups=groups, bias=bias)


@torch.no_grad()
def fused_conv(kernel: Tensor, bias: Tensor, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    """The ``reparam_conv`` holding a fused (O, I/g, k, k) kernel and (O,) bias."""
    out_chs, in_per_group, k, _ = kernel.shape
    conv = conv2d(in_per_group * groups, out_chs, k, stride, groups, bias=True)
    conv.weight.copy_(kernel)
    conv.bias.copy_(bias)
    return conv


# --------------------------------------------------------------------------- small modules
class ConvNorm(nn.Module):
    """conv (no bias) -> BatchNorm2d; timm's ``ConvNormAct(apply_act=False)`` (keys .conv, .bn)."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int, stride: int = 1, groups: int = 1):
        super().__init__()
        self.conv = conv2d(in_chs, out_chs, kernel_size, stride, groups)
        self.bn = nn.BatchNorm2d(out_chs)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.conv(x))

    def fuse(self) -> Tuple[Tensor, Tensor]:
        return fuse_conv_bn(self.conv.weight, self.bn)


class LayerScale2d(nn.Module):
    """x * gamma with gamma of shape (C, 1, 1) (timm key ``.gamma``)."""

    def __init__(self, dim: int, init_value: float):
        super().__init__()
        self.gamma = nn.Parameter(init_value * torch.ones(dim, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class SqueezeExcite(nn.Module):
    """Global mean -> 1x1 fc1 (C -> C/16, bias) -> ReLU -> 1x1 fc2 -> sigmoid gate."""

    def __init__(self, channels: int, rd_ratio: float = 0.0625):
        super().__init__()
        rd = int(channels * rd_ratio)
        self.fc1 = nn.Conv2d(channels, rd, 1, bias=True)
        self.fc2 = nn.Conv2d(rd, channels, 1, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        s = x.mean((2, 3), keepdim=True)
        s = self.fc2(F.relu(self.fc1(s)))
        return x * torch.sigmoid(s)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW tensor (timm's ``LayerNorm2d``; keys weight, bias)."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__(channels, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


def norm_2d(kind: str, channels: int) -> nn.Module:
    """The attention blocks' norm: 'batchnorm' (BatchNorm2d) or 'layernorm' (LayerNorm2d, eps 1e-5)."""
    if kind == "batchnorm":
        return nn.BatchNorm2d(channels)
    if kind == "layernorm":
        return LayerNorm2d(channels, eps=1e-5)
    raise ValueError(f"unknown attention norm {kind!r}; valid: 'batchnorm', 'layernorm'")


class DropPath(nn.Module):
    """Stochastic depth per sample (identity in eval mode or at rate 0)."""

    def __init__(self, rate: float = 0.0):
        super().__init__()
        self.rate = rate

    def forward(self, x: Tensor) -> Tensor:
        if self.rate == 0.0 or not self.training:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


def _gelu() -> nn.Module:
    return nn.GELU()  # exact (erf) GELU, as in Apple's code


# --------------------------------------------------------------------------- MobileOne
class MobileOneBlock(nn.Module):
    """MobileOne block: sum of k x k conv-BN branches, a 1x1 conv-BN scale branch and a
    BN skip branch, then SE and activation. Fuses to ``reparam_conv``."""

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        kernel_size: int,
        stride: int = 1,
        groups: int = 1,
        inference_mode: bool = False,
        use_se: bool = False,
        use_act: bool = True,
        use_scale_branch: bool = True,
        num_conv_branches: int = 1,
    ):
        super().__init__()
        self.in_chs, self.out_chs = in_chs, out_chs
        self.kernel_size, self.stride, self.groups = kernel_size, stride, groups
        self.se = SqueezeExcite(out_chs) if use_se else nn.Identity()
        if inference_mode:
            self.reparam_conv = conv2d(in_chs, out_chs, kernel_size, stride, groups, bias=True)
        else:
            self.reparam_conv = None
            self.identity = nn.BatchNorm2d(in_chs) if out_chs == in_chs and stride == 1 else None
            self.conv_kxk = (
                nn.ModuleList(ConvNorm(in_chs, out_chs, kernel_size, stride, groups) for _ in range(num_conv_branches))
                if num_conv_branches > 0
                else None
            )
            self.conv_scale = (
                ConvNorm(in_chs, out_chs, 1, stride, groups) if kernel_size > 1 and use_scale_branch else None
            )
        self.act = _gelu() if use_act else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        if self.reparam_conv is not None:
            return self.act(self.se(self.reparam_conv(x)))
        out = 0
        if self.identity is not None:
            out = self.identity(x)
        if self.conv_scale is not None:
            out = out + self.conv_scale(x)
        if self.conv_kxk is not None:
            for branch in self.conv_kxk:
                out = out + branch(x)
        return self.act(self.se(out))

    def fused_kernel_bias(self) -> Tuple[Tensor, Tensor]:
        """The (kernel, bias) of the single conv equal to the sum of the branches (eval mode)."""
        if self.reparam_conv is not None:
            return self.reparam_conv.weight, self.reparam_conv.bias
        k = self.kernel_size
        like = next(self.parameters())
        kernel = torch.zeros(self.out_chs, self.in_chs // self.groups, k, k, dtype=like.dtype)
        bias = torch.zeros(self.out_chs, dtype=like.dtype)
        if self.conv_kxk is not None:
            for branch in self.conv_kxk:
                kb, bb = branch.fuse()
                kernel, bias = kernel + kb, bias + bb
        if self.conv_scale is not None:
            ks, bs = self.conv_scale.fuse()
            kernel, bias = kernel + pad_kernel_to(ks, k), bias + bs
        if self.identity is not None:
            ki, bi = fuse_conv_bn(identity_kernel(self.in_chs, self.groups, k, like), self.identity)
            kernel, bias = kernel + ki, bias + bi
        return kernel, bias

    @torch.no_grad()
    def reparameterize(self) -> None:
        if self.reparam_conv is not None:
            return
        kernel, bias = self.fused_kernel_bias()
        self.reparam_conv = fused_conv(kernel, bias, self.stride, self.groups)
        for name in ("conv_kxk", "conv_scale", "identity"):
            if hasattr(self, name):
                delattr(self, name)


class ReparamLargeKernelConv(nn.Module):
    """Grouped 7x7 conv-BN + grouped 3x3 conv-BN, summed, then optional SE and activation.

    Apple's FastViT computed the activation and discarded it, so the base variants build it
    with ``use_act=False``; the MobileCLIP towers apply it (``use_act=True``) and give the
    stage 3-4 downsamples a squeeze-excite (rd ratio 1/4) before it. Fuses to ``reparam_conv``
    (SE and activation stay after it).
    """

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        kernel_size: int,
        stride: int,
        groups: int,
        small_kernel: Optional[int] = 3,
        use_se: bool = False,
        use_act: bool = False,
        inference_mode: bool = False,
    ):
        super().__init__()
        self.in_chs, self.out_chs = in_chs, out_chs
        self.kernel_size, self.stride, self.groups = kernel_size, stride, groups
        if inference_mode:
            self.reparam_conv = conv2d(in_chs, out_chs, kernel_size, stride, groups, bias=True)
        else:
            self.reparam_conv = None
            self.large_conv = ConvNorm(in_chs, out_chs, kernel_size, stride, groups)
            self.small_conv = ConvNorm(in_chs, out_chs, small_kernel, stride, groups) if small_kernel else None
        self.se = SqueezeExcite(out_chs, rd_ratio=0.25) if use_se else nn.Identity()
        self.act = _gelu() if use_act else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        if self.reparam_conv is not None:
            out = self.reparam_conv(x)
        else:
            out = self.large_conv(x)
            if self.small_conv is not None:
                out = out + self.small_conv(x)
        return self.act(self.se(out))

    @torch.no_grad()
    def reparameterize(self) -> None:
        if self.reparam_conv is not None:
            return
        kernel, bias = self.large_conv.fuse()
        if self.small_conv is not None:
            ks, bs = self.small_conv.fuse()
            kernel, bias = kernel + pad_kernel_to(ks, self.kernel_size), bias + bs
        self.reparam_conv = fused_conv(kernel, bias, self.stride, self.groups)
        del self.large_conv
        if hasattr(self, "small_conv"):
            del self.small_conv


class PatchEmbed(nn.Module):
    """Downsampling: ReparamLargeKernelConv(7x7, stride 2, C -> C') then a 1x1 MobileOneBlock.

    ``use_se`` / ``lkc_use_act``: the large-kernel conv's squeeze-excite and activation.
    """

    def __init__(self, patch_size: int, stride: int, in_chs: int, embed_dim: int, use_se: bool = False,
                 lkc_use_act: bool = False, inference_mode: bool = False):
        super().__init__()
        self.proj = nn.Sequential(
            ReparamLargeKernelConv(in_chs, embed_dim, patch_size, stride, groups=in_chs, small_kernel=3,
                                   use_se=use_se, use_act=lkc_use_act, inference_mode=inference_mode),
            MobileOneBlock(embed_dim, embed_dim, 1, 1, inference_mode=inference_mode),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


# --------------------------------------------------------------------------- token mixers
class RepMixer(nn.Module):
    """y = x + ls * (mixer(x) - norm(x)) with depthwise MobileOne blocks; fuses to one dw conv."""

    def __init__(self, dim: int, kernel_size: int = 3, layer_scale_init_value: float = 1e-5,
                 inference_mode: bool = False):
        super().__init__()
        self.dim, self.kernel_size = dim, kernel_size
        if inference_mode:
            self.reparam_conv = conv2d(dim, dim, kernel_size, 1, groups=dim, bias=True)
        else:
            self.reparam_conv = None
            self.norm = MobileOneBlock(dim, dim, kernel_size, groups=dim, use_act=False, use_scale_branch=False,
                                       num_conv_branches=0)
            self.mixer = MobileOneBlock(dim, dim, kernel_size, groups=dim, use_act=False)
            self.layer_scale = LayerScale2d(dim, layer_scale_init_value)

    def forward(self, x: Tensor) -> Tensor:
        if self.reparam_conv is not None:
            return self.reparam_conv(x)
        return x + self.layer_scale(self.mixer(x) - self.norm(x))

    @torch.no_grad()
    def reparameterize(self) -> None:
        if self.reparam_conv is not None:
            return
        k_m, b_m = self.mixer.fused_kernel_bias()
        k_n, b_n = self.norm.fused_kernel_bias()
        gamma = self.layer_scale.gamma
        eye = identity_kernel(self.dim, self.dim, self.kernel_size, k_m)
        kernel = eye + gamma.unsqueeze(-1) * (k_m - k_n)
        bias = gamma.reshape(-1) * (b_m - b_n)
        self.reparam_conv = fused_conv(kernel, bias, 1, self.dim)
        del self.norm, self.mixer, self.layer_scale


class Attention(nn.Module):
    """Multi-head self-attention over the H*W tokens; head_dim 32, qkv without bias."""

    def __init__(self, dim: int, head_dim: int = 32):
        super().__init__()
        if dim % head_dim:
            raise ValueError(f"attention dim {dim} is not divisible by head_dim {head_dim}")
        self.head_dim = head_dim
        self.num_heads = dim // head_dim
        self.scale = head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        n = h * w
        x = x.flatten(2).transpose(-2, -1)  # (B, N, C)
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, heads, N, head_dim)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        x = attn.softmax(dim=-1) @ v
        x = self.proj(x.transpose(1, 2).reshape(b, n, c))
        return x.transpose(-2, -1).reshape(b, c, h, w)


# --------------------------------------------------------------------------- FFN, CPE, blocks
class ConvMlp(nn.Module):
    """ConvFFN: dw 7x7 conv-BN -> 1x1 fc1 -> GELU -> 1x1 fc2 (not fused by reparameterization)."""

    def __init__(self, in_chs: int, hidden_chs: int, drop: float = 0.0):
        super().__init__()
        self.conv = ConvNorm(in_chs, in_chs, 7, groups=in_chs)
        self.fc1 = nn.Conv2d(in_chs, hidden_chs, 1)
        self.act = _gelu()
        self.fc2 = nn.Conv2d(hidden_chs, in_chs, 1)
        self.drop = nn.Dropout(drop)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x)
        x = self.drop(self.act(self.fc1(x)))
        return self.drop(self.fc2(x))


class RepConditionalPosEnc(nn.Module):
    """RepCPE: y = dwconv7x7(x) + x (conv with bias); fuses to one dw conv."""

    def __init__(self, dim: int, kernel_size: int = 7, inference_mode: bool = False):
        super().__init__()
        self.dim, self.kernel_size = dim, kernel_size
        if inference_mode:
            self.reparam_conv = conv2d(dim, dim, kernel_size, 1, groups=dim, bias=True)
        else:
            self.reparam_conv = None
            self.pos_enc = conv2d(dim, dim, kernel_size, 1, groups=dim, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        if self.reparam_conv is not None:
            return self.reparam_conv(x)
        return self.pos_enc(x) + x

    @torch.no_grad()
    def reparameterize(self) -> None:
        if self.reparam_conv is not None:
            return
        kernel = self.pos_enc.weight + identity_kernel(self.dim, self.dim, self.kernel_size, self.pos_enc.weight)
        bias = self.pos_enc.bias.clone()
        self.reparam_conv = fused_conv(kernel, bias, 1, self.dim)
        del self.pos_enc


class RepMixerBlock(nn.Module):
    """x = RepMixer(x); x = x + DropPath(ls * ConvMlp(x))."""

    def __init__(self, dim: int, kernel_size: int = 3, mlp_ratio: float = 4.0, drop: float = 0.0,
                 drop_path: float = 0.0, layer_scale_init_value: float = 1e-5, inference_mode: bool = False):
        super().__init__()
        self.token_mixer = RepMixer(dim, kernel_size, layer_scale_init_value, inference_mode)
        self.mlp = ConvMlp(dim, int(dim * mlp_ratio), drop)
        self.layer_scale = LayerScale2d(dim, layer_scale_init_value)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        x = self.token_mixer(x)
        return x + self.drop_path(self.layer_scale(self.mlp(x)))


class AttentionBlock(nn.Module):
    """x = x + DropPath(ls1 * Attention(norm(x))); x = x + DropPath(ls2 * ConvMlp(x)).

    ``norm``: 'batchnorm' (base variants, mci0-2) or 'layernorm' (mci3/mci4); neither is fused.
    """

    def __init__(self, dim: int, mlp_ratio: float = 4.0, drop: float = 0.0, drop_path: float = 0.0,
                 layer_scale_init_value: float = 1e-5, head_dim: int = 32, norm: str = "batchnorm"):
        super().__init__()
        self.norm = norm_2d(norm, dim)
        self.token_mixer = Attention(dim, head_dim)
        self.layer_scale_1 = LayerScale2d(dim, layer_scale_init_value)
        self.drop_path1 = DropPath(drop_path)
        self.mlp = ConvMlp(dim, int(dim * mlp_ratio), drop)
        self.layer_scale_2 = LayerScale2d(dim, layer_scale_init_value)
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path1(self.layer_scale_1(self.token_mixer(self.norm(x))))
        return x + self.drop_path2(self.layer_scale_2(self.mlp(x)))
