"""The algebra of structural reparameterization, on arrays (HWIO kernels), and the fused form's name.

Each re-parameterisable block of ``fastvit_jax.layers`` fuses its own branches with these
functions (its ``fuse`` beside its ``__call__``); ``fastvit_jax.reparam`` walks a variables tree
and lets each block fuse itself. The derivations: docs/architecture.md#reparameterization.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Tuple, Union

import jax.numpy as jnp
import numpy as np

Array = Any

BN_EPS = 1e-5  # every BatchNorm of FastViT (torch.nn.BatchNorm2d's default), in training and when folded
FUSED_CONV = "reparam_conv"  # the one conv (with bias) a fused block holds, in Flax trees and torch keys


def fuse_conv_bn(kernel: Array, bn_params: Mapping[str, Array], bn_stats: Mapping[str, Array],
                 eps: float = BN_EPS) -> Tuple[Array, Array]:
    """Fold eval-mode BatchNorm into a bias-free conv.

    kernel: HWIO (kh, kw, I/g, O); bn_params {'scale', 'bias'} and bn_stats {'mean', 'var'}: (O,).
    Returns (kernel * s, bias - mean * s), s = scale / sqrt(var + eps), s broadcast on O.
    """
    s = bn_params["scale"] / jnp.sqrt(bn_stats["var"] + eps)
    return kernel * s, bn_params["bias"] - bn_stats["mean"] * s


def fuse_conv_norm(params: Mapping[str, Any], stats: Mapping[str, Any]) -> Tuple[Array, Array]:
    """A ConvNorm subtree {'conv': {'kernel'}, 'bn': {...}} -> its fused (kernel, bias)."""
    return fuse_conv_bn(params["conv"]["kernel"], params["bn"], stats["bn"])


def identity_kernel(channels: int, groups: int, kernel_size: int, dtype=jnp.float32) -> Array:
    """HWIO kernel (k, k, C/groups, C) of the grouped conv that computes the identity."""
    in_per_group = channels // groups
    k = np.zeros((kernel_size, kernel_size, in_per_group, channels), np.float32)
    out = np.arange(channels)
    k[kernel_size // 2, kernel_size // 2, out % in_per_group, out] = 1.0
    return jnp.asarray(k, dtype)


def pad_kernel(kernel: Array, kernel_size: int) -> Array:
    """Zero-pad a centred HWIO kernel (k, k, I, O) to (K, K, I, O); exact for any stride."""
    pad = (kernel_size - kernel.shape[0]) // 2
    return jnp.pad(kernel, ((pad, pad), (pad, pad), (0, 0), (0, 0)))


def is_fused(tree_or_keys: Union[Mapping[str, Any], Iterable[str]]) -> bool:
    """True for the inference form: a ``reparam_conv`` anywhere in a nested Flax tree (params or
    variables) or among a state dict's dotted keys (``stem.0.reparam_conv.weight``)."""
    if isinstance(tree_or_keys, Mapping) and any(isinstance(v, Mapping) for v in tree_or_keys.values()):
        return any(k == FUSED_CONV or (isinstance(v, Mapping) and is_fused(v)) for k, v in tree_or_keys.items())
    return any(FUSED_CONV in str(k).split(".") for k in tree_or_keys)
