"""Sharded FastViT trainer (jit + NamedSharding over a device mesh).

Modules (flat, small, pure where possible):
  config      TrainConfig (Apple's recipe per variant + overrides), workdir config check
  mesh        create_mesh('data:-1,fsdp:4'), batch/param shardings, maybe_initialize_distributed
  optimizer   timm-style warm-up + cosine schedule, weight-decay mask (kernel, gamma), AdamW
  mixup       timm Mixup/CutMix (batch mode, per-batch switch, corrected lambda)
  losses      soft-target cross-entropy, masked top-1/top-5 sums
  ema         EMA of params and batch_stats
  state       TrainState pytree
  checkpoint  orbax CheckpointManager wrapper (async, keep-N, sharded restore)
  metrics     metrics.jsonl, TensorBoard scalars, curves.png
  trainer     train_and_evaluate(config), evaluate_checkpoint(config)

The trainer modules import JAX, so they are imported on use:
``from fastvit_jax.training.trainer import train_and_evaluate``.
"""

from fastvit_jax.training.config import TrainConfig  # noqa: F401  (pure Python)
