"""FastViT building blocks in Flax linen (NHWC), one-to-one with ``torch_ref/layers.py``.

Same block names, fields and submodule names as the PyTorch twin (timm's layout), with
Flax leaf names: conv / dense weights ``kernel`` (HWIO / (in, out)), ``bias``; BatchNorm
``scale``/``bias`` in ``params`` and ``mean``/``var`` in ``batch_stats``; layer scales
``gamma`` of shape (C,). A torch key ``stages.0.blocks.1.mlp.fc1.weight`` is the Flax path
``stages_0/blocks_1/mlp/fc1/kernel``.

Every module takes ``train: bool``: BatchNorm uses batch statistics and updates its running
averages when ``train`` is true (PyTorch semantics), DropPath needs the ``'dropout'`` rng.
Re-parameterizable blocks have an ``inference_mode`` field that builds the fused graph
(a single ``reparam_conv`` with bias) and fuse their own variables: ``is_train_form(params)``
recognises their branches, ``branches(params)`` names what fusion removes and
``fuse(params, stats)`` returns the fused (kernel, bias), the mirror of ``torch_ref``'s
``reparameterize()``. ``fastvit_jax.reparam.reparameterize`` walks a tree and lets them.

The compute dtype and the conv lowering are not fields: every layer reads the model's
``ComputePolicy`` at trace time (``fastvit_jax.policy``). A ``dtype`` field, where a layer has
one, is an explicit override of the policy's (None: follow the policy).
"""

from __future__ import annotations

from typing import Any, List, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
from flax import linen as nn

from fastvit_jax.conv import conv2d, resolve_lowering
from fastvit_jax.fusion import BN_EPS, FUSED_CONV, fuse_conv_bn, fuse_conv_norm, identity_kernel, pad_kernel
from fastvit_jax.policy import compute_dtype, current_policy
from fastvit_jax.remat import saved

Dtype = Any
Tree = Mapping[str, Any]

# PyTorch's default conv / linear init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
torch_default_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
trunc_normal_02 = nn.initializers.truncated_normal(stddev=0.02)


def same_padding(kernel_size: int, stride: int = 1) -> int:
    """timm's symmetric padding ((stride - 1) + (k - 1)) // 2, as in torch_ref."""
    return ((stride - 1) + (kernel_size - 1)) // 2


def gelu(x: jax.Array) -> jax.Array:
    """Exact (erf) GELU like torch.nn.GELU (jax.nn.gelu defaults to the tanh approximation).

    Written with ``lax.erf``: ``jax.nn.gelu(approximate=False)`` goes through ``erfc``, which
    XLA:CPU expands expensively (8.3 ms vs 1.6 ms on 8x64x64x144; same values to ~1.5e-6).
    """
    return 0.5 * x * (1.0 + jax.lax.erf(x * 0.7071067811865476))


class Conv2d(nn.Module):
    """torch.nn.Conv2d on NHWC: symmetric padding, PyTorch grouping, HWIO kernel."""

    features: int
    kernel_size: int
    stride: int = 1
    groups: int = 1
    use_bias: bool = False
    padding: Optional[int] = None  # default: same_padding(kernel_size, stride)
    kernel_init: Any = torch_default_init
    bias_init: Optional[Any] = None  # default: PyTorch's U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    dtype: Optional[Dtype] = None  # default: the compute policy's
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        in_chs = x.shape[-1]
        if in_chs % self.groups or self.features % self.groups:
            raise ValueError(f"Conv2d: channels in={in_chs}, out={self.features} not divisible by groups={self.groups}")
        k = self.kernel_size
        kernel = self.param("kernel", self.kernel_init, (k, k, in_chs // self.groups, self.features), self.param_dtype)
        pad = same_padding(k, self.stride) if self.padding is None else self.padding
        dtype = compute_dtype(self.dtype)
        y = saved(conv2d(x.astype(dtype), kernel.astype(dtype), stride=self.stride, padding=pad,
                         groups=self.groups, lowering=current_policy().lowering))
        if self.use_bias:
            fan_in = k * k * in_chs // self.groups
            bound = 1.0 / fan_in ** 0.5
            init = self.bias_init or (lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound))
            y = y + self.param("bias", init, (self.features,), self.param_dtype).astype(dtype)
        return y


def batch_moments(xf: jax.Array) -> Tuple[jax.Array, jax.Array]:
    """(mean, biased variance) per channel of a float32 (..., C) array, in one pass.

    E[x^2] - E[x]^2 in float32, as flax's ``use_fast_variance``: the two reductions fuse into
    one read of the activations, in the forward and the backward. ``xf * xf``, not
    ``jnp.square(xf)``: the backward of square keeps ``2 * xf``, a second float32 copy of the
    activations; a product keeps ``xf`` itself, which it keeps anyway (same values and
    gradients, bit for bit).
    """
    axes = tuple(range(xf.ndim - 1))
    mean = jnp.mean(xf, axes)
    return mean, jnp.maximum(jnp.mean(xf * xf, axes) - jnp.square(mean), 0.0)


class BatchNorm(nn.Module):
    """torch.nn.BatchNorm2d on NHWC (eps 1e-5, momentum 0.1).

    Train: normalizes with the biased batch variance and updates the running variance with
    the unbiased one, like PyTorch. Statistics are computed in float32 whatever the output
    ``dtype`` (default: the compute policy's), in one pass (mean and mean of squares).
    Under ``jax.jit`` with a batch sharded over devices the statistics are global (sync BN).
    """

    epsilon: float = BN_EPS
    momentum: float = 0.1  # PyTorch convention: new = (1 - momentum) * old + momentum * batch
    dtype: Optional[Dtype] = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        xf = x.astype(jnp.float32)
        if train:
            mean, var = batch_moments(xf)
            if not self.is_initializing():
                n = x.size // c
                unbiased = var * (n / max(n - 1, 1))
                ra_mean.value = (1 - self.momentum) * ra_mean.value + self.momentum * mean
                ra_var.value = (1 - self.momentum) * ra_var.value + self.momentum * unbiased
        else:
            mean, var = ra_mean.value, ra_var.value
        mul = scale.astype(jnp.float32) * jax.lax.rsqrt(var + self.epsilon)
        y = xf * mul + (bias.astype(jnp.float32) - mean * mul)
        return y.astype(compute_dtype(self.dtype))


class ConvNorm(nn.Module):
    """conv (no bias) -> BatchNorm (submodules ``conv``, ``bn``).

    The conv runs in ``dtype``; the BatchNorm output is ``norm_dtype`` (each default: the
    compute policy's dtype).
    """

    features: int
    kernel_size: int
    stride: int = 1
    groups: int = 1
    kernel_init: Any = torch_default_init
    dtype: Optional[Dtype] = None
    norm_dtype: Optional[Dtype] = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = Conv2d(self.features, self.kernel_size, self.stride, self.groups, kernel_init=self.kernel_init,
                   dtype=self.dtype, name="conv")(x)
        return BatchNorm(dtype=self.norm_dtype or self.dtype, name="bn")(x, train)


class LayerScale2d(nn.Module):
    """x * gamma, gamma of shape (C,) (torch_ref stores (C, 1, 1))."""

    init_value: float
    dtype: Optional[Dtype] = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        gamma = self.param("gamma", nn.initializers.constant(self.init_value), (x.shape[-1],), jnp.float32)
        return x * gamma.astype(compute_dtype(self.dtype))


class SqueezeExcite(nn.Module):
    """Global mean -> 1x1 fc1 (C -> C/16) -> ReLU -> 1x1 fc2 -> sigmoid gate."""

    rd_ratio: float = 0.0625

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        s = jnp.mean(x.astype(jnp.float32), axis=(1, 2), keepdims=True).astype(compute_dtype())
        s = nn.relu(Conv2d(int(c * self.rd_ratio), 1, use_bias=True, name="fc1")(s))
        s = Conv2d(c, 1, use_bias=True, name="fc2")(s)
        return x * jax.nn.sigmoid(s)


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels (the last axis of NHWC), timm's ``LayerNorm2d``: ``scale``, ``bias`` (C,).

    Statistics in float32 whatever the compute dtype, like ``BatchNorm``.
    """

    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias
        return y.astype(compute_dtype())


class DropPath(nn.Module):
    """Stochastic depth per sample; uses the 'dropout' rng, identity when not training."""

    rate: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        if not train or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
        return jnp.where(mask, x / keep, jnp.zeros_like(x))


class MobileOneBlock(nn.Module):
    """MobileOne block: k x k conv-BN branches + 1x1 conv-BN scale branch + BN skip, then SE
    and activation. ``inference_mode``: a single ``reparam_conv`` with bias."""

    in_chs: int
    out_chs: int
    kernel_size: int
    stride: int = 1
    groups: int = 1
    inference_mode: bool = False
    use_se: bool = False
    use_act: bool = True
    use_scale_branch: bool = True
    num_conv_branches: int = 1
    dtype: Optional[Dtype] = None  # of the convs (default: the compute policy's)
    norm_dtype: Optional[Dtype] = None  # of the BatchNorm outputs and their sum (default: dtype)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        conv_args = dict(stride=self.stride, groups=self.groups, dtype=self.dtype)
        if self.inference_mode:
            out = Conv2d(self.out_chs, self.kernel_size, use_bias=True, name=FUSED_CONV, **conv_args)(x)
        else:
            out = 0.0
            norm_dtype = self.norm_dtype or self.dtype
            if self.out_chs == self.in_chs and self.stride == 1:
                out = BatchNorm(dtype=norm_dtype, name="identity")(x, train)
            if self.kernel_size > 1 and self.use_scale_branch:
                out = out + ConvNorm(self.out_chs, 1, name="conv_scale", norm_dtype=norm_dtype, **conv_args)(x, train)
            for i in range(self.num_conv_branches):
                out = out + ConvNorm(self.out_chs, self.kernel_size, name=f"conv_kxk_{i}", norm_dtype=norm_dtype,
                                     **conv_args)(x, train)
        if self.use_se:
            out = SqueezeExcite(name="se")(out)
        return gelu(out) if self.use_act else out

    @staticmethod
    def is_train_form(params: Tree) -> bool:
        return "identity" in params or "conv_scale" in params or bool(_kxk_branches(params))

    @staticmethod
    def branches(params: Tree) -> List[str]:
        return _kxk_branches(params) + [k for k in ("conv_scale", "identity") if k in params]

    @staticmethod
    def fuse(params: Tree, stats: Tree, kernel_size: Optional[int] = None,
             groups: Optional[int] = None) -> Tuple[jax.Array, jax.Array]:
        """Train-form variables -> (kernel, bias) of ``reparam_conv``: K = sum K_kxk + pad(K_scale) + K_id.

        ``kernel_size`` defaults to the conv branches' (a bare skip branch is a 1x1 identity);
        ``groups`` is only needed for the identity branch and is inferred from the conv
        branches (C_in / (I/g)), or depthwise when there is none (RepMixer's ``norm``).
        """
        if kernel_size is None:
            first = (_kxk_branches(params) or ["conv_scale"])[0]
            kernel_size = params[first]["conv"]["kernel"].shape[0] if first in params else 1
        kernel, bias, in_per_group = None, None, None

        def add(k, b):
            nonlocal kernel, bias
            kernel, bias = (k, b) if kernel is None else (kernel + k, bias + b)

        for name in _kxk_branches(params):
            k, b = fuse_conv_norm(params[name], stats[name])
            in_per_group = k.shape[2]
            add(k, b)
        if "conv_scale" in params:
            k, b = fuse_conv_norm(params["conv_scale"], stats["conv_scale"])
            in_per_group = k.shape[2]
            add(pad_kernel(k, kernel_size), b)
        if "identity" in params:
            channels = params["identity"]["scale"].shape[0]
            if groups is None:
                groups = channels // in_per_group if in_per_group else channels
            eye = identity_kernel(channels, groups, kernel_size, params["identity"]["scale"].dtype)
            add(*fuse_conv_bn(eye, params["identity"], stats["identity"]))
        if kernel is None:
            raise ValueError("MobileOneBlock variables have no branch (expected conv_kxk_*, conv_scale or identity); "
                             f"got {sorted(params)}")
        return kernel, bias


def _kxk_branches(params: Tree) -> List[str]:
    """A MobileOneBlock's conv_kxk_{i} branch names, in index order."""
    return sorted((k for k in params if k.startswith("conv_kxk_")), key=lambda k: int(k.rsplit("_", 1)[1]))


class ReparamLargeKernelConv(nn.Module):
    """Grouped 7x7 conv-BN + grouped 3x3 conv-BN, summed, then optional SE and activation.

    Apple's FastViT computed the activation and discarded it, so the base variants build it
    with ``use_act=False``; the MobileCLIP towers apply it and give the stage 3-4 downsamples
    a squeeze-excite (rd ratio 1/4, submodule ``se``) before it. ``inference_mode``: one
    ``reparam_conv`` with bias; SE and activation stay after it.
    """

    in_chs: int
    out_chs: int
    kernel_size: int
    stride: int
    groups: int
    small_kernel: Optional[int] = 3
    use_se: bool = False
    use_act: bool = False
    inference_mode: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        conv_args = dict(stride=self.stride, groups=self.groups)
        if self.inference_mode:
            out = Conv2d(self.out_chs, self.kernel_size, use_bias=True, name=FUSED_CONV, **conv_args)(x)
        else:
            out = ConvNorm(self.out_chs, self.kernel_size, name="large_conv", **conv_args)(x, train)
            if self.small_kernel:
                out = out + ConvNorm(self.out_chs, self.small_kernel, name="small_conv", **conv_args)(x, train)
        if self.use_se:
            out = SqueezeExcite(rd_ratio=0.25, name="se")(out)
        return gelu(out) if self.use_act else out

    @staticmethod
    def is_train_form(params: Tree) -> bool:
        return "large_conv" in params

    @staticmethod
    def branches(params: Tree) -> List[str]:
        return [k for k in ("large_conv", "small_conv") if k in params]

    @staticmethod
    def fuse(params: Tree, stats: Tree) -> Tuple[jax.Array, jax.Array]:
        """K = K_large + pad(K_small), b = b_large + b_small (squeeze-excite and activation stay)."""
        kernel, bias = fuse_conv_norm(params["large_conv"], stats["large_conv"])
        if "small_conv" in params:
            ks, bs = fuse_conv_norm(params["small_conv"], stats["small_conv"])
            kernel, bias = kernel + pad_kernel(ks, kernel.shape[0]), bias + bs
        return kernel, bias


class PatchEmbed(nn.Module):
    """Downsampling: ReparamLargeKernelConv (``proj_0``) then a 1x1 MobileOneBlock (``proj_1``).

    ``use_se`` / ``lkc_use_act``: the large-kernel conv's squeeze-excite and activation.
    """

    patch_size: int
    stride: int
    in_chs: int
    embed_dim: int
    use_se: bool = False
    lkc_use_act: bool = False
    inference_mode: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = ReparamLargeKernelConv(self.in_chs, self.embed_dim, self.patch_size, self.stride, groups=self.in_chs,
                                   use_se=self.use_se, use_act=self.lkc_use_act, inference_mode=self.inference_mode,
                                   name="proj_0")(x, train)
        return MobileOneBlock(self.embed_dim, self.embed_dim, 1, 1, inference_mode=self.inference_mode,
                              name="proj_1")(x, train)


class RepMixer(nn.Module):
    """y = x + ls * (mixer(x) - norm(x)) with depthwise MobileOne blocks; fused: one dw conv."""

    dim: int
    kernel_size: int = 3
    layer_scale_init_value: float = 1e-5
    inference_mode: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        if self.inference_mode:
            return Conv2d(self.dim, self.kernel_size, groups=self.dim, use_bias=True, name=FUSED_CONV)(x)
        # mixer(x) - norm(x) cancels most of both terms (their identity BatchNorms of the same
        # x): the BatchNorm outputs and the difference are float32 so that a bfloat16 run does not
        # lose it; the depthwise convs themselves run in the compute dtype.
        # (The 'shift' lowering reads its taps in float32 anyway: there the float32 input is kept.)
        policy = current_policy()
        conv_dtype = jnp.float32 if resolve_lowering(policy.lowering) == "shift" else policy.dtype
        common = dict(groups=self.dim, use_act=False, dtype=conv_dtype, norm_dtype=jnp.float32)
        norm = MobileOneBlock(self.dim, self.dim, self.kernel_size, use_scale_branch=False, num_conv_branches=0,
                              name="norm", **common)(x, train)
        mixer = MobileOneBlock(self.dim, self.dim, self.kernel_size, name="mixer", **common)(x, train)
        delta = LayerScale2d(self.layer_scale_init_value, jnp.float32, name="layer_scale")(mixer - norm)
        return x.astype(jnp.float32) + delta  # the residual stream stays float32

    @staticmethod
    def is_train_form(params: Tree) -> bool:
        return "mixer" in params and "norm" in params and "layer_scale" in params

    @staticmethod
    def branches(params: Tree) -> List[str]:
        return ["mixer", "norm", "layer_scale"]

    @staticmethod
    def fuse(params: Tree, stats: Tree) -> Tuple[jax.Array, jax.Array]:
        """W = I + gamma * (K_mixer - K_norm), b = gamma * (b_mixer - b_norm) (depthwise)."""
        kernel_size = params["mixer"]["conv_kxk_0"]["conv"]["kernel"].shape[0]
        k_m, b_m = MobileOneBlock.fuse(params["mixer"], stats["mixer"], kernel_size)
        k_n, b_n = MobileOneBlock.fuse(params["norm"], stats["norm"], kernel_size)
        gamma = params["layer_scale"]["gamma"]
        dim = gamma.shape[0]
        eye = identity_kernel(dim, dim, kernel_size, k_m.dtype)
        return eye + gamma * (k_m - k_n), gamma * (b_m - b_n)


class Attention(nn.Module):
    """Multi-head self-attention over H*W tokens; head_dim 32; qkv without bias; softmax in float32."""

    dim: int
    head_dim: int = 32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = compute_dtype()
        if self.dim % self.head_dim:
            raise ValueError(f"attention dim {self.dim} is not divisible by head_dim {self.head_dim}")
        b, h, w, c = x.shape
        heads = self.dim // self.head_dim
        tokens = x.reshape(b, h * w, c)
        qkv = saved(nn.Dense(3 * self.dim, use_bias=False, kernel_init=trunc_normal_02, dtype=dtype,
                             name="qkv")(tokens))
        qkv = qkv.reshape(b, h * w, 3, heads, self.head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (B, N, heads, head_dim)
        logits = saved(jnp.einsum("bqhd,bkhd->bhqk", q * self.head_dim ** -0.5, k)).astype(jnp.float32)
        attn = jax.nn.softmax(logits, axis=-1).astype(dtype)
        out = saved(jnp.einsum("bhqk,bkhd->bqhd", attn, v)).reshape(b, h * w, c)
        out = saved(nn.Dense(self.dim, kernel_init=trunc_normal_02, dtype=dtype, name="proj")(out))
        return out.reshape(b, h, w, c)


class ConvMlp(nn.Module):
    """ConvFFN: dw 7x7 conv-BN -> 1x1 fc1 -> GELU -> 1x1 fc2 (not fused by reparameterization)."""

    in_chs: int
    hidden_chs: int
    drop: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        conv_args = dict(kernel_init=trunc_normal_02)
        x = ConvNorm(self.in_chs, 7, groups=self.in_chs, name="conv", **conv_args)(x, train)
        x = Conv2d(self.hidden_chs, 1, use_bias=True, bias_init=nn.initializers.zeros, name="fc1", **conv_args)(x)
        x = nn.Dropout(self.drop, deterministic=not train)(gelu(x))
        x = Conv2d(self.in_chs, 1, use_bias=True, bias_init=nn.initializers.zeros, name="fc2", **conv_args)(x)
        return nn.Dropout(self.drop, deterministic=not train)(x)


class RepConditionalPosEnc(nn.Module):
    """RepCPE: y = dwconv7x7(x) + x (conv with bias); fused: one dw conv."""

    dim: int
    kernel_size: int = 7
    inference_mode: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        name = FUSED_CONV if self.inference_mode else "pos_enc"
        y = Conv2d(self.dim, self.kernel_size, groups=self.dim, use_bias=True, name=name)(x)
        return y if self.inference_mode else y + x

    @staticmethod
    def is_train_form(params: Tree) -> bool:
        return "pos_enc" in params

    @staticmethod
    def branches(params: Tree) -> List[str]:
        return ["pos_enc"]

    @staticmethod
    def fuse(params: Tree, stats: Tree) -> Tuple[jax.Array, jax.Array]:
        """W = W_pe + I (depthwise), b = b_pe."""
        kernel = params["pos_enc"]["kernel"]
        dim = kernel.shape[-1]
        return kernel + identity_kernel(dim, dim, kernel.shape[0], kernel.dtype), params["pos_enc"]["bias"]


class RepMixerBlock(nn.Module):
    """x = RepMixer(x); x = x + DropPath(ls * ConvMlp(x))."""

    dim: int
    kernel_size: int = 3
    mlp_ratio: float = 4.0
    drop: float = 0.0
    drop_path: float = 0.0
    layer_scale_init_value: float = 1e-5
    inference_mode: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = RepMixer(self.dim, self.kernel_size, self.layer_scale_init_value, self.inference_mode,
                     name="token_mixer")(x, train)
        y = ConvMlp(self.dim, int(self.dim * self.mlp_ratio), self.drop, name="mlp")(x, train)
        y = LayerScale2d(self.layer_scale_init_value, name="layer_scale")(y)
        return x + DropPath(self.drop_path, name="drop_path")(y, train)


class AttentionBlock(nn.Module):
    """x = x + DropPath(ls1 * Attention(norm(x))); x = x + DropPath(ls2 * ConvMlp(x)).

    ``norm``: 'batchnorm' (base variants, mci0-2) or 'layernorm' (LayerNorm2d, mci3/mci4); neither is fused.
    """

    dim: int
    mlp_ratio: float = 4.0
    drop: float = 0.0
    drop_path: float = 0.0
    layer_scale_init_value: float = 1e-5
    head_dim: int = 32
    norm: str = "batchnorm"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        if self.norm == "batchnorm":
            y = BatchNorm(name="norm")(x, train)
        elif self.norm == "layernorm":
            y = LayerNorm2d(name="norm")(x)
        else:
            raise ValueError(f"unknown attention norm {self.norm!r}; valid: 'batchnorm', 'layernorm'")
        y = Attention(self.dim, self.head_dim, name="token_mixer")(y)
        y = LayerScale2d(self.layer_scale_init_value, name="layer_scale_1")(y)
        x = x + DropPath(self.drop_path, name="drop_path1")(y, train)
        y = ConvMlp(self.dim, int(self.dim * self.mlp_ratio), self.drop, name="mlp")(x, train)
        y = LayerScale2d(self.layer_scale_init_value, name="layer_scale_2")(y)
        return x + DropPath(self.drop_path, name="drop_path2")(y, train)
