"""Structural reparameterization on Flax variables: train form -> fused form.

The math is a handful of pure functions on arrays (HWIO kernels), each unit-tested;
``reparameterize(variables)`` walks a train-form ``{'params', 'batch_stats'}`` tree and
returns the tree that ``create_model(variant, inference_mode=True).init`` makes. Block
types are recognised by their submodule names (the same names as torch_ref/timm), so
the walk needs no variant config; what is not a branch of a fused block (a squeeze-excite
after the large-kernel conv, the MobileCLIP towers' LayerNorm2d) is kept as it is. All fusion
uses running statistics: the fused model equals the train-form model in eval mode. The algebra
of each block: docs/architecture.md#reparameterization.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Tuple

import jax.numpy as jnp
import numpy as np

Array = Any
Tree = Dict[str, Any]
BN_EPS = 1e-5

__all__ = [
    "fuse_conv_bn",
    "identity_kernel",
    "pad_kernel",
    "fuse_mobileone",
    "fuse_large_kernel",
    "fuse_repmixer",
    "fuse_repcpe",
    "reparameterize",
]


# --------------------------------------------------------------------------- array math
def fuse_conv_bn(kernel: Array, bn_params: Mapping[str, Array], bn_stats: Mapping[str, Array],
                 eps: float = BN_EPS) -> Tuple[Array, Array]:
    """Fold eval-mode BatchNorm into a bias-free conv.

    kernel: HWIO (kh, kw, I/g, O); bn_params {'scale', 'bias'} and bn_stats {'mean', 'var'}: (O,).
    Returns (kernel * s, bias - mean * s), s = scale / sqrt(var + eps), s broadcast on O.
    """
    s = bn_params["scale"] / jnp.sqrt(bn_stats["var"] + eps)
    return kernel * s, bn_params["bias"] - bn_stats["mean"] * s


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


def _conv_bn(params: Tree, stats: Tree) -> Tuple[Array, Array]:
    """A ConvNorm subtree {'conv': {'kernel'}, 'bn': {...}} -> fused (kernel, bias)."""
    return fuse_conv_bn(params["conv"]["kernel"], params["bn"], stats["bn"])


def _conv_branches(params: Tree) -> list:
    return sorted((k for k in params if k.startswith("conv_kxk_")), key=lambda k: int(k.rsplit("_", 1)[1]))


def fuse_mobileone(params: Tree, stats: Tree, kernel_size: int, groups: Optional[int] = None) -> Tuple[Array, Array]:
    """A train-form MobileOneBlock subtree -> (kernel, bias) of its ``reparam_conv``.

    K = sum K_kxk + pad(K_scale) + K_identity. ``groups`` is only needed for the identity
    branch, and is inferred from it: C_in / (I/g) of the conv branches, or depthwise when
    there is no conv branch (RepMixer's ``norm``).
    """
    kernel, bias = None, None

    def add(k, b):
        nonlocal kernel, bias
        kernel, bias = (k, b) if kernel is None else (kernel + k, bias + b)

    in_per_group = None
    for name in _conv_branches(params):
        k, b = _conv_bn(params[name], stats[name])
        in_per_group = k.shape[2]
        add(k, b)
    if "conv_scale" in params:
        k, b = _conv_bn(params["conv_scale"], stats["conv_scale"])
        in_per_group = k.shape[2]
        add(pad_kernel(k, kernel_size), b)
    if "identity" in params:
        channels = params["identity"]["scale"].shape[0]
        if groups is None:
            groups = channels // in_per_group if in_per_group else channels
        eye = identity_kernel(channels, groups, kernel_size, params["identity"]["scale"].dtype)
        add(*fuse_conv_bn(eye, params["identity"], stats["identity"]))
    if kernel is None:
        raise ValueError("MobileOneBlock subtree has no branch (expected conv_kxk_*, conv_scale or identity)")
    return kernel, bias


def fuse_large_kernel(params: Tree, stats: Tree) -> Tuple[Array, Array]:
    """ReparamLargeKernelConv: K = K_large + pad(K_small), b = b_large + b_small."""
    kernel, bias = _conv_bn(params["large_conv"], stats["large_conv"])
    if "small_conv" in params:
        ks, bs = _conv_bn(params["small_conv"], stats["small_conv"])
        kernel, bias = kernel + pad_kernel(ks, kernel.shape[0]), bias + bs
    return kernel, bias


def fuse_repmixer(params: Tree, stats: Tree) -> Tuple[Array, Array]:
    """RepMixer: W = I + gamma * (K_mixer - K_norm), b = gamma * (b_mixer - b_norm) (depthwise)."""
    kernel_size = params["mixer"]["conv_kxk_0"]["conv"]["kernel"].shape[0]
    k_m, b_m = fuse_mobileone(params["mixer"], stats["mixer"], kernel_size)
    k_n, b_n = fuse_mobileone(params["norm"], stats["norm"], kernel_size)
    gamma = params["layer_scale"]["gamma"]
    dim = gamma.shape[0]
    eye = identity_kernel(dim, dim, kernel_size, k_m.dtype)
    return eye + gamma * (k_m - k_n), gamma * (b_m - b_n)


def fuse_repcpe(params: Tree) -> Tuple[Array, Array]:
    """RepCPE: W = W_pe + I (depthwise), b = b_pe."""
    kernel = params["pos_enc"]["kernel"]
    dim = kernel.shape[-1]
    return kernel + identity_kernel(dim, dim, kernel.shape[0], kernel.dtype), params["pos_enc"]["bias"]


# --------------------------------------------------------------------------- tree walk
def _block_kind(params: Mapping) -> Optional[str]:
    if "reparam_conv" in params:
        return "fused"
    if "large_conv" in params:
        return "large_kernel"
    if "mixer" in params and "norm" in params and "layer_scale" in params:
        return "repmixer"
    if "pos_enc" in params:
        return "repcpe"
    if "identity" in params or "conv_scale" in params or _conv_branches(params):
        return "mobileone"
    return None


def _reparam_node(params: Tree, stats: Tree) -> Tuple[Tree, Tree]:
    kind = _block_kind(params)
    if kind == "fused":
        return params, stats
    if kind is not None:
        if kind == "mobileone":
            branch = (_conv_branches(params) or ["conv_scale"])[0]
            # Only a bare skip branch has no kernel to read the size from; it is a 1x1 identity.
            ksize = params[branch]["conv"]["kernel"].shape[0] if branch in params else 1
            kernel, bias = fuse_mobileone(params, stats, ksize)
        elif kind == "large_kernel":
            kernel, bias = fuse_large_kernel(params, stats)
        elif kind == "repmixer":
            kernel, bias = fuse_repmixer(params, stats)
        else:
            kernel, bias = fuse_repcpe(params)
        branch_names = set(_conv_branches(params)) | {
            "conv_scale", "identity", "large_conv", "small_conv", "mixer", "norm", "layer_scale", "pos_enc"}
        new_params = {k: v for k, v in params.items() if k not in branch_names}
        new_stats = {k: v for k, v in stats.items() if k not in branch_names}
        new_params["reparam_conv"] = {"kernel": kernel, "bias": bias}
        return new_params, new_stats
    out_p, out_s = {}, {}
    for name, child in params.items():
        if isinstance(child, Mapping):
            p, s = _reparam_node(child, stats.get(name, {}))
            out_p[name] = p
            if s:
                out_s[name] = s
        else:
            out_p[name] = child
    for name, child in stats.items():  # a BatchNorm's own statistics
        if not isinstance(child, Mapping):
            out_s[name] = child
    return out_p, out_s


def reparameterize(variables: Mapping[str, Any]) -> Dict[str, Any]:
    """Fuse a train-form FastViT variables tree into the inference form.

    Args:
      variables: ``{'params': ..., 'batch_stats': ...}`` of ``create_model(v)`` (NHWC, HWIO).
        A tree that is already fused is returned with the same structure.
    Returns:
      ``{'params', 'batch_stats'}`` for ``create_model(v, inference_mode=True)``; the
      remaining BatchNorms (ConvFFN, attention norm) keep their statistics.
    """
    if "params" not in variables:
        raise ValueError(f"expected a variables dict with 'params' (and 'batch_stats'); got keys {sorted(variables)}")
    params, stats = _reparam_node(_to_dict(variables["params"]), _to_dict(variables.get("batch_stats", {})))
    out = dict(variables)
    out["params"] = params
    out["batch_stats"] = stats
    return out


def _to_dict(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {k: _to_dict(v) for k, v in tree.items()}
    return tree
