"""Exponential moving average of params and batch_stats (timm ModelEma semantics)."""

from __future__ import annotations

from typing import Any

import jax


def ema_update(ema: Any, new: Any, decay: float) -> Any:
    """ema <- decay * ema + (1 - decay) * new, leaf by leaf (dtype of ``ema`` kept)."""
    return jax.tree.map(lambda e, n: (decay * e + (1.0 - decay) * n.astype(e.dtype)).astype(e.dtype), ema, new)
