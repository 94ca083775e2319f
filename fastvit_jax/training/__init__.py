"""Sharded FastViT trainer (jit + NamedSharding over a device mesh).

Modules (flat, small, pure where possible):
  config         TrainConfig, get_config(variant, **overrides) (Apple's recipe), workdir config check
  flags          command-line flags generated from the TrainConfig fields
  plan           steps per epoch, schedule length, warm-up (scaled for short runs), peak lr
  setup          dataset facts, device mesh, compute dtype
  mesh           create_mesh('data:-1,fsdp:4'), batch/param shardings
  multihost      jax.distributed start-up, barriers with a timeout, work on process 0, the lost-peer watchdog
  optimizer      timm-style warm-up + cosine schedule, weight-decay mask (kernel, gamma), AdamW
  mixup          timm Mixup/CutMix (batch mode, per-batch switch, corrected lambda)
  losses         soft-target cross-entropy, masked top-1/top-5 sums
  ema            EMA of params and batch_stats
  state          TrainState pytree, fresh variables
  steps          the train step and the eval step
  programs       the jitted train/eval steps, the state's shardings and abstract inputs (trainer, aot)
  aot            --compile_only: the steps compiled for a TPU slice from this host, memory/roofline report
  checkpoint     orbax CheckpointManager wrapper (async, keep-N, sharded restore, eval-only partial restore)
  compile_cache  the persistent compilation cache
  preemption     SIGTERM / Ctrl-C as a flag the trainer polls
  workdir_lock   one trainer per workdir
  pretrained     merge_pretrained (--init_from), export_fused
  evaluate       run_eval, evaluate_checkpoint (--eval_only)
  logs           the entry points' logging set-up
  metrics        metrics.jsonl, TensorBoard scalars, curves.png
  trainer        train_and_evaluate(config, model_fn=...) -> TrainResult

The trainer modules import JAX, so they are imported on use:
``from fastvit_jax.training.trainer import train_and_evaluate``.
"""

from fastvit_jax.training.config import TrainConfig, get_config  # noqa: F401  (pure Python)
