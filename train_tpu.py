#!/usr/bin/env python
"""Train / fine-tune / evaluate FastViT with JAX on all local (or pod) devices.

Thin entry point: flags -> TrainConfig (Apple's recipe for --variant, overridden by the
flags you pass) -> fastvit_jax.training.train_and_evaluate.

Examples:
  python train_tpu.py --variant sa12 --data_dir ~/tensorflow_datasets --workdir runs/sa12
  python train_tpu.py --variant t8 --dataset demo --image_size 64 --global_batch_size 128 \\
      --num_steps 300 --workdir runs/demo
  python train_tpu.py --variant t8 --eval_only --init_from t8_fused.safetensors --data_dir D
  python train_tpu.py --variant s12 --mesh data:-1,fsdp:4 ...   # FSDP over 4 devices

Restarting with the same --workdir resumes from its latest checkpoint (same data order,
same losses). SIGTERM (preemption) saves a checkpoint and exits with status 0.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys


def _bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "y", "on"):
        return True
    if s.lower() in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {s!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train_tpu.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("run")
    g.add_argument("--variant", default="t8",
                   help="FastViT variant: t8 t12 s12 sa12 sa24 sa36 ma36, MobileCLIP towers mci0 ... mci4 (default t8)")
    g.add_argument("--dataset", default="imagenet2012",
                   help="tfds image-classification dataset name, or 'demo' for the embedded 10-class "
                        "offline dataset (default imagenet2012)")
    g.add_argument("--data_dir", default=None, help="tfds data_dir (default $TFDS_DATA_DIR or ~/tensorflow_datasets)")
    g.add_argument("--workdir", default="workdir",
                   help="checkpoints, config.json, metrics.jsonl, tensorboard/, curves.png, export/ (default ./workdir)")
    g.add_argument("--global_batch_size", type=int, default=None, help="images per step over all devices (default 1024)")
    g.add_argument("--num_epochs", type=float, default=None,
                   help="epochs of the cosine schedule (recipe: 300)")
    g.add_argument("--num_steps", type=int, default=None,
                   help="stop after this many steps; without --num_epochs it also sets the schedule length")
    g.add_argument("--image_size", type=int, default=None, help="train/eval resolution (default 256)")
    g.add_argument("--num_classes", type=int, default=None, help="default: the dataset's class count")
    g.add_argument("--crop_pct", type=float, default=None, help="eval centre-crop fraction (default: the variant's)")
    g.add_argument("--dtype", default=None, choices=["auto", "float32", "bfloat16", "float16"],
                   help="compute dtype; auto = bfloat16 on TPU/GPU, float32 on CPU (params stay float32)")
    g.add_argument("--mesh", default=None,
                   help="device mesh, e.g. 'data:-1' (data parallel, default) or 'data:-1,fsdp:4' "
                        "(parameters of large tensors sharded over 4 devices)")
    g.add_argument("--fsdp_min_size", type=int, default=None,
                   help="tensors with fewer elements stay replicated under fsdp (default 262144)")
    g.add_argument("--seed", type=int, default=None, help="seed of init, data order, augmentation (default 0)")
    g.add_argument("--checkpoint_every", type=int, default=None, help="steps between checkpoints (default 1000)")
    g.add_argument("--keep_checkpoints", type=int, default=None, help="checkpoints kept (default 3)")
    g.add_argument("--eval_every", type=int, default=None, help="steps between evaluations; 0 = only at the end")
    g.add_argument("--eval_batch_size", type=int, default=None, help="default: --global_batch_size")
    g.add_argument("--log_every", type=int, default=None, help="steps between metric lines (default 50)")
    g.add_argument("--init_from", default=None,
                   help="fine-tune from a converted/exported .safetensors (new head if num_classes differs); "
                        "with --eval_only also a fused export or a trainer workdir")
    g.add_argument("--eval_only", action="store_true", help="only evaluate --init_from (or --workdir's latest checkpoint)")
    g.add_argument("--no_export", action="store_true", help="skip the fused export of the final EMA weights")
    g.add_argument("--no_plot", action="store_true", help="skip curves.png")
    g.add_argument("--no_progress", action="store_true", help="no tqdm progress bar")

    r = p.add_argument_group("recipe overrides (defaults: Apple's recipe for --variant)")
    r.add_argument("--lr", type=float, default=None, help="peak AdamW lr at batch 1024, scaled by batch/1024 (1e-3)")
    r.add_argument("--weight_decay", type=float, default=None, help="AdamW decoupled decay on kernels and layer scales (0.05)")
    r.add_argument("--warmup_epochs", type=float, default=None, help="linear warm-up epochs (5)")
    r.add_argument("--warmup_steps", type=int, default=None, help="warm-up in steps (overrides --warmup_epochs)")
    r.add_argument("--warmup_lr", type=float, default=None, help="lr at step 0 (1e-6)")
    r.add_argument("--min_lr", type=float, default=None, help="end of the cosine (1e-5)")
    r.add_argument("--cooldown_epochs", type=float, default=None,
                   help="extra epochs at min_lr after the cosine (0; Apple's timm run used 10)")
    r.add_argument("--clip_grad", type=float, default=None, help="global-norm gradient clipping (off)")
    r.add_argument("--label_smoothing", type=float, default=None, help="(0.1)")
    r.add_argument("--mixup", type=float, default=None, help="mixup alpha; 0 disables (0.2 for t8..sa36, 0.8 for ma36)")
    r.add_argument("--cutmix", type=float, default=None, help="cutmix alpha; 0 disables (1.0)")
    r.add_argument("--mixup_switch_prob", type=float, default=None, help="P(cutmix) when both are on (0.5)")
    r.add_argument("--drop_path", type=float, default=None, help="stochastic depth rate (per variant: 0/0/0/0.1/0.1/0.2/0.35)")
    r.add_argument("--ema_decay", type=float, default=None, help="EMA decay of params and batch_stats (0.9995)")
    r.add_argument("--randaugment", default=None, help="timm RandAugment spec, 'none' to disable (rand-m9-mstd0.5-inc1)")
    r.add_argument("--reprob", type=float, default=None, help="random-erasing probability (0.25)")
    r.add_argument("--color_jitter", type=float, default=None, help="colour jitter, used only without RandAugment (0.4)")
    r.add_argument("--rrc_scale", type=float, nargs=2, default=None, metavar=("MIN", "MAX"),
                   help="random-resized-crop area range (0.08 1.0)")
    r.add_argument("--hflip", type=float, default=None, help="horizontal-flip probability (0.5)")
    p.add_argument("--host_malloc", choices=["auto", "tuned", "default"], default=None,
                   help="glibc malloc settings that keep freed host memory (fastvit_jax/host_memory.py); "
                        "auto (default, or $FASTVIT_HOST_MALLOC): tuned when no TPU/GPU plugin is installed")
    return p


_NOT_CONFIG = {"no_export", "no_plot", "no_progress", "eval_only"}


def config_from_args(args: argparse.Namespace):
    from fastvit_jax.training.config import TrainConfig

    kw = {k: v for k, v in vars(args).items() if k not in _NOT_CONFIG and v is not None}
    if isinstance(kw.get("randaugment"), str) and kw["randaugment"].lower() in ("none", "", "off"):
        kw["randaugment"] = ""
    variant = kw.pop("variant")
    if args.num_steps is not None and args.num_epochs is None:
        kw["num_epochs"] = None  # the schedule follows --num_steps
    cfg = TrainConfig.from_recipe(variant, **kw)
    return cfg.replace(
        eval_only=args.eval_only,
        export=not args.no_export,
        plot=not args.no_plot,
        progress=not args.no_progress,
    )


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    # Before JAX starts its threads (see fastvit_jax/host_memory.py): on CPU-only hosts, stop
    # XLA's per-step buffers from being unmapped and page-faulted back in (1.35x per step on 2 cores).
    from fastvit_jax import host_memory

    host_memory.keep_freed_host_memory(args.host_malloc)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("absl", "jax._src.xla_bridge", "orbax", "tensorflow"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    # Multi-host: must run before anything touches the JAX backend.
    from fastvit_jax.training.mesh import maybe_initialize_distributed

    maybe_initialize_distributed()

    from fastvit_jax.data.pipeline import DatasetNotFoundError
    from fastvit_jax.training.config import ConfigMismatchError
    from fastvit_jax.training.trainer import NonFiniteLossError, evaluate_checkpoint, train_and_evaluate

    try:
        config = config_from_args(args)
        config.validate()
        if config.eval_only:
            m = evaluate_checkpoint(config)
            print(json.dumps({k: round(v, 6) for k, v in m.items()}, indent=2))
            return 0
        res = train_and_evaluate(config)
    except DatasetNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (ConfigMismatchError, ValueError, FileNotFoundError) as e:
        if os.environ.get("FASTVIT_DEBUG"):
            raise
        print(f"error: {e}\n(set FASTVIT_DEBUG=1 for the traceback)", file=sys.stderr)
        return 2
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    if res["preempted"]:
        print(f"preempted at step {res['final_step']}; rerun the same command to resume from {res['workdir']}")
        return 0
    ev = res["eval"] or {}
    print(
        f"done: step {res['final_step']}, val top-1 {100 * ev.get('top1', float('nan')):.2f}% "
        f"(EMA {100 * ev.get('ema_top1', float('nan')):.2f}%), top-5 {100 * ev.get('top5', float('nan')):.2f}% "
        f"(EMA {100 * ev.get('ema_top5', float('nan')):.2f}%)\n"
        f"  workdir: {res['workdir']}\n  metrics: {os.path.join(res['workdir'], 'metrics.jsonl')}\n"
        f"  plot:    {res['plot_path']}\n  export:  {res['export_path']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
