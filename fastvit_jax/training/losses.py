"""Losses and classification metrics (pure functions)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def soft_cross_entropy(logits: jnp.ndarray, targets: jnp.ndarray) -> jnp.ndarray:
    """Mean over the batch of -sum(targets * log_softmax(logits)), computed in float32."""
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets).mean()


def topk_correct(logits: jnp.ndarray, labels: jnp.ndarray, k: int) -> jnp.ndarray:
    """(B,) float32: 1 where the label is among the top-k logits."""
    _, idx = jax.lax.top_k(logits.astype(jnp.float32), k)
    return (idx == labels[:, None]).any(axis=-1).astype(jnp.float32)


def eval_sums(logits: jnp.ndarray, labels: jnp.ndarray, mask: jnp.ndarray) -> dict:
    """Masked sums of loss, top-1, top-5 and the count (padding has mask 0)."""
    logits = logits.astype(jnp.float32)
    num_classes = logits.shape[-1]
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    k5 = min(5, num_classes)
    return {
        "loss": (loss * mask).sum(),
        "top1": (topk_correct(logits, labels, 1) * mask).sum(),
        "top5": (topk_correct(logits, labels, k5) * mask).sum(),
        "count": mask.sum(),
    }
