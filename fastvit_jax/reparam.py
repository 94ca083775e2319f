"""Structural reparameterization on Flax variables: train form -> fused form.

``reparameterize(variables)`` walks a train-form ``{'params', 'batch_stats'}`` tree and returns
the tree that ``create_model(variant, inference_mode=True).init`` makes. At every node it asks
the re-parameterisable blocks of ``fastvit_jax.layers`` (``FUSABLE_BLOCKS``) whether the
subtree holds their train-form branches; the block that does fuses it (its ``fuse``, beside its
``__call__``), and the branches are replaced by one ``reparam_conv``. So the walk needs no variant
config; what is not a branch of a fused block (a squeeze-excite after the large-kernel conv, the
MobileCLIP towers' LayerNorm2d) is kept as it is. All fusion uses running statistics: the fused
model equals the train-form model in eval mode. The array algebra is ``fastvit_jax.fusion``; the
derivations: docs/architecture.md#reparameterization.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Tuple

import jax

from fastvit_jax.fusion import FUSED_CONV, fuse_conv_bn, identity_kernel, is_fused, pad_kernel
from fastvit_jax.layers import MobileOneBlock, RepConditionalPosEnc, ReparamLargeKernelConv, RepMixer

Tree = Dict[str, Any]

__all__ = [
    "FUSABLE_BLOCKS",
    "fuse_conv_bn",
    "identity_kernel",
    "pad_kernel",
    "is_fused",
    "reparameterize",
]

# Tried in this order at every node: a RepMixer holds MobileOne blocks, so it is asked first.
FUSABLE_BLOCKS = (ReparamLargeKernelConv, RepMixer, RepConditionalPosEnc, MobileOneBlock)


def _fuse_node(params: Tree, stats: Tree) -> Tuple[Tree, Tree]:
    if FUSED_CONV in params:
        return params, stats
    block = next((b for b in FUSABLE_BLOCKS if b.is_train_form(params)), None)
    if block is not None:
        kernel, bias = block.fuse(params, stats)
        removed = set(block.branches(params))
        new_params = {k: v for k, v in params.items() if k not in removed}
        new_stats = {k: v for k, v in stats.items() if k not in removed}
        new_params[FUSED_CONV] = {"kernel": kernel, "bias": bias}
        return new_params, new_stats
    out_p, out_s = {}, {}
    for name, child in params.items():
        if isinstance(child, Mapping):
            p, s = _fuse_node(child, stats.get(name, {}))
            out_p[name] = p
            if s:
                out_s[name] = s
        else:
            out_p[name] = child
    for name, child in stats.items():  # a BatchNorm's own statistics
        if not isinstance(child, Mapping):
            out_s[name] = child
    return out_p, out_s


# One program for the whole walk (the walk reads only keys and shapes): run op by op, fusing t12
# compiled thousands of tiny programs, 3.7 s on a 2-core Xeon against 0.7 s for this one.
_fuse_tree = jax.jit(_fuse_node)


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
    params, stats = _fuse_tree(_to_dict(variables["params"]), _to_dict(variables.get("batch_stats", {})))
    out = dict(variables)
    out["params"] = params
    out["batch_stats"] = stats
    return out


def _to_dict(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {k: _to_dict(v) for k, v in tree.items()}
    return tree
