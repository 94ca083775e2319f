"""Rematerialisation: what the backward pass recomputes instead of keeping from the forward.

FastViT's training step is memory-bound: BatchNorm's float32 internals, GELU and layer-scale
intermediates dominate the set kept for the backward pass. The policies, applied per block:
the RepMixer and attention blocks, the stem's three MobileOne blocks (the largest activations,
at strides 2 and 4), the stages' downsamples and the final conv; so a policy covers every
BatchNorm and GELU of the network (the positional encodings and the head are left alone):

- ``none``: JAX autodiff's default: every residual the backward needs is saved.
- ``elementwise``: only convolution and matmul outputs are saved (``jax.checkpoint`` with
  ``save_only_these_names(SAVED_NAME)``; ``Conv2d`` and the attention matmuls tag their outputs);
  BatchNorm, GELU and layer scales are recomputed from them in the backward (cheap elementwise
  work, far fewer bytes).
- ``block``: nothing inside a block is saved; each block is recomputed whole from its input
  (the least memory, one more forward of the blocks).

The values are identical; only memory and time change (measured in docs/performance.md).
"""

from __future__ import annotations

from typing import Type

import flax.linen as nn
import jax
from jax.ad_checkpoint import checkpoint_name

REMAT_POLICIES = ("none", "elementwise", "block")
SAVED_NAME = "conv_or_matmul_out"


def saved(x: jax.Array) -> jax.Array:
    """Tags ``x`` (a conv or matmul output) as kept for the backward under ``elementwise``."""
    return checkpoint_name(x, SAVED_NAME)


def check_policy(policy: str) -> str:
    if policy not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {policy!r}; valid: {', '.join(REMAT_POLICIES)}")
    return policy


def rematerialized(block: Type[nn.Module], policy: str) -> Type[nn.Module]:
    """``block`` (a module class called as ``block(x, train)``) under ``policy``."""
    check_policy(policy)
    if policy == "none":
        return block
    if policy == "block":
        return nn.remat(block, static_argnums=(2,))  # (self, x, train): train is a Python bool
    return nn.remat(block, static_argnums=(2,), policy=jax.checkpoint_policies.save_only_these_names(SAVED_NAME))
