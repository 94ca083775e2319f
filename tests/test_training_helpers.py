"""A tiny linen stand-in with FastViT's leaf-name conventions (for fast trainer tests).

Leaves: conv ``kernel``/``bias``, BatchNorm ``scale``/``bias`` (+ ``mean``/``var`` in
batch_stats), a (C,) layer scale ``gamma``, classifier at ``params['head']['fc']``.
"""

import contextlib
from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp


class _Head(nn.Module):
    num_classes: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(x)


class TinyNet(nn.Module):
    num_classes: int = 10
    drop_path_rate: float = 0.0
    dtype: Any = jnp.float32
    inference_mode: bool = False
    width: int = 16
    nan_after: int = 0  # > 0: logits become NaN from this training step on (NaN tests)

    @nn.compact
    def __call__(self, x, train: bool = False):
        if self.nan_after:
            count = self.variable("batch_stats", "count", lambda: jnp.zeros((), jnp.float32))
            if train and not self.is_initializing():
                count.value = count.value + 1
            poison = jnp.where(count.value >= self.nan_after, jnp.nan, 0.0)
        else:
            poison = 0.0
        x = x.astype(self.dtype)
        x = nn.Conv(self.width, (3, 3), strides=(2, 2), use_bias=False, dtype=self.dtype, name="stem")(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=self.dtype, name="bn")(x)
        x = nn.gelu(x, approximate=False)
        y = nn.Conv(self.width, (3, 3), dtype=self.dtype, name="mix")(x)
        gamma = self.param("gamma", nn.initializers.constant(0.1), (self.width,))
        y = nn.Dropout(self.drop_path_rate)(y, deterministic=not train or self.drop_path_rate == 0)
        x = x + gamma * y
        x = x.mean(axis=(1, 2))
        return _Head(self.num_classes, dtype=self.dtype, name="head")(x).astype(jnp.float32) + poison


TINY_WIDTHS = {"t12": 24}  # another variant is another model (shape-mismatch tests); 16 otherwise


def create_tiny_model(variant="t8", *, num_classes=1000, inference_mode=False, drop_path_rate=0.0,
                      dtype=jnp.float32, remat="none"):
    return TinyNet(num_classes=num_classes, drop_path_rate=drop_path_rate, dtype=dtype,
                   inference_mode=inference_mode, width=TINY_WIDTHS.get(variant, 16))


@contextlib.contextmanager
def after_each_step(fn: Callable[[int], None]):
    """Calls ``fn(step)`` after each train step of ``train_and_evaluate``, where the step's metrics
    are written and before its checkpoint (to crash, signal or pause a run at a given step).

    Patches ``TrainLog.flush``, which the trainer calls after every step when ``log_every=1`` (the
    tests' setting); a step flushed twice (before an evaluation) calls ``fn`` once."""
    from fastvit_jax.training import trainer

    flush, seen = trainer.TrainLog.flush, set()

    def flush_then_call(self, step):
        flush(self, step)
        if step not in seen:
            seen.add(step)
            fn(step)

    trainer.TrainLog.flush = flush_then_call
    try:
        yield
    finally:
        trainer.TrainLog.flush = flush
