"""How a model computes, set once: compute dtype, conv lowering, rematerialisation.

None of the three changes what the network computes, only how (precision, the XLA program,
memory). ``create_model(dtype=, lowering=, remat=)`` puts them in one ``ComputePolicy`` on the
``FastVit`` module; its entry points (``__call__``, ``forward_features``, ``forward_stages``,
``forward_head``) trace their layers under it, and every layer reads ``current_policy()`` at
trace time instead of carrying ``dtype`` / ``lowering`` fields of its own (the way
``flax.linen.logical_axis_rules`` hands sharding rules to layers).

The policy is a field of the model, so a jitted ``model.apply`` is retraced when it changes.
Layers used on their own, outside a ``FastVit``, compute with ``ComputePolicy()`` (float32,
the backend's lowering, no remat) unless traced inside ``with compute_policy(...)``; a
function jitted that way must be retraced (a new ``jax.jit``) when the policy changes.
A layer that deliberately computes part of its work in another precision (RepMixer's
float32 BatchNorm outputs) says so with an explicit ``dtype`` override on that sublayer.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import Any, Iterator, Optional

import jax.numpy as jnp

from fastvit_jax.conv import resolve_lowering
from fastvit_jax.remat import check_policy


@dataclasses.dataclass(frozen=True)
class ComputePolicy:
    """``dtype``: activations and convs (params stay float32); ``lowering``: 'native' / 'shift'
    convolutions (None: per backend, ``fastvit_jax.conv``); ``remat``: 'none' / 'elementwise' /
    'block' (``fastvit_jax.remat``)."""

    dtype: Any = jnp.float32
    lowering: Optional[str] = None
    remat: str = "none"

    def __post_init__(self):
        if self.lowering is not None:
            resolve_lowering(self.lowering)  # ValueError naming the valid lowerings
        check_policy(self.remat)


_CURRENT: contextvars.ContextVar[ComputePolicy] = contextvars.ContextVar("fastvit_compute_policy",
                                                                         default=ComputePolicy())


@contextlib.contextmanager
def compute_policy(policy: ComputePolicy) -> Iterator[ComputePolicy]:
    """Layers traced inside this block compute under ``policy``."""
    token = _CURRENT.set(policy)
    try:
        yield policy
    finally:
        _CURRENT.reset(token)


def current_policy() -> ComputePolicy:
    """The policy of the model being traced, or the default ``ComputePolicy()``."""
    return _CURRENT.get()


def compute_dtype(override: Optional[Any] = None) -> Any:
    """``override`` when a layer sets one, else the current policy's dtype."""
    return current_policy().dtype if override is None else override
