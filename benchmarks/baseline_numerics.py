"""The training step's numerics before the accelerator work, for before/after timings in one process.

Until commit b84e817 (its parent, b84e817^, is "before"):

- every native convolution asked XLA for a float32 result (``preferred_element_type=float32``)
  and cast it back, which XLA:GPU serves by running the whole convolution, forward and
  backward, in float32;
- BatchNorm's training statistics took two passes over the activations (the mean, then the
  mean of squared deviations);
- nothing was rematerialised (``remat='none'``, which ``create_model`` still accepts);
- the depthwise convs with a channel multiplier (the downsampling convs) took autodiff's
  gradient, a grouped conv with two input channels per group
  (``fastvit_jax.conv.conv2d_depthwise_multiplier`` writes it as plain depthwise convs now).

``baseline_numerics()`` swaps the first two and the last back in while a step is traced, so that one process
can trace, compile and time both (``benchmarks/train_grid.py``). The compiled programs keep what
they were traced with. One difference remains: the RepMixer's depthwise convs took float32
inputs then and take the compute dtype now (their float32 result and BatchNorm are as before).
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Tuple

import jax
import jax.numpy as jnp
from jax import lax

import fastvit_jax.conv
import fastvit_jax.layers


def conv2d_native_float32_result(x: jax.Array, kernel: jax.Array, stride: int, padding: int,
                                 groups: int) -> jax.Array:
    """The native conv as it was: a float32 result, cast back to x's dtype."""
    return lax.conv_general_dilated(
        x, kernel, (stride, stride), ((padding, padding), (padding, padding)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups,
        preferred_element_type=jnp.float32).astype(x.dtype)


def batch_moments_two_pass(xf: jax.Array) -> Tuple[jax.Array, jax.Array]:
    """BatchNorm's (mean, biased variance) as they were: the mean, then E[(x - mean)^2]."""
    axes = tuple(range(xf.ndim - 1))
    mean = jnp.mean(xf, axes)
    return mean, jnp.mean(jnp.square(xf - mean), axes)


def depthwise_multiplier_autodiff(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
    """The channel-multiplier conv as it was: one native conv, differentiated by autodiff."""
    return fastvit_jax.conv.conv2d_native(x, kernel, stride, padding, x.shape[-1])


SWAPPED = ((fastvit_jax.conv, "conv2d_native", conv2d_native_float32_result),
           (fastvit_jax.layers, "batch_moments", batch_moments_two_pass),
           (fastvit_jax.conv, "conv2d_depthwise_multiplier", depthwise_multiplier_autodiff))


@contextlib.contextmanager
def baseline_numerics() -> Iterator[None]:
    """Within the block, models trace with the float32-result convs, two-pass statistics and
    autodiff's channel-multiplier conv gradient."""
    saved = [(module, name, getattr(module, name)) for module, name, _ in SWAPPED]
    for module, name, before in SWAPPED:
        setattr(module, name, before)
    try:
        yield
    finally:
        for module, name, today in saved:
            setattr(module, name, today)
