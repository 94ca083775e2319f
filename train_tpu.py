#!/usr/bin/env python
"""Train / fine-tune / evaluate FastViT with JAX on all local (or pod) devices.

Thin entry point: flags -> TrainConfig (get_config: Apple's recipe for --variant, overridden
by the flags you pass) -> fastvit_jax.training.trainer.train_and_evaluate. Every flag is a
TrainConfig field of the same name.

Examples:
  python train_tpu.py --variant sa12 --data_dir ~/tensorflow_datasets --workdir runs/sa12
  python train_tpu.py --variant t8 --dataset demo --recipe short --image_size 64 \\
      --global_batch_size 32 --num_steps 150 --workdir runs/demo   # ~55% top-1, 3 min on 2 CPU cores
  python train_tpu.py --workdir runs/demo --num_steps 300   # extends it: other flags from its config.json
  python train_tpu.py --variant t8 --eval_only --init_from t8_fused.safetensors --data_dir D
  python train_tpu.py --variant s12 --mesh data:-1,fsdp:4 ...   # FSDP over 4 devices

Learning rate: --lr is the absolute peak; without it the peak is --lr_base (1e-3) scaled by
--global_batch_size / --lr_base_size (1024). The startup log prints the peak lr, warm-up and
total steps. Restarting with the same --workdir resumes from its latest checkpoint (same data
order, same losses); a larger --num_steps/--num_epochs extends a finished run. SIGTERM
(preemption) saves a checkpoint and exits with status 0. Several processes (TPU pods, SLURM,
Open MPI, or ``python -m fastvit_jax.launch``): docs/multihost.md; a lost peer ends the others
with status 4 and a message naming it. Compiled steps are kept in the
persistent compilation cache (--compilation_cache_dir), so a restart does not recompile.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from fastvit_jax.training.logs import configure_logging



def build_parser() -> argparse.ArgumentParser:
    from fastvit_jax.training.flags import add_config_flags

    parser = argparse.ArgumentParser(prog="train_tpu.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    groups = add_config_flags(parser)
    outputs = groups["checkpointing and outputs"]
    outputs.add_argument("--eval_only", action="store_true",
                         help="only evaluate --init_from (or the workdir's latest checkpoint)")
    outputs.add_argument("--restart_from_scratch", action="store_true",
                         help="start again from step 0 in a workdir that holds an earlier run (config.json, or "
                              "checkpoints moved aside as unreadable) but no readable checkpoint")
    outputs.add_argument("--no_export", action="store_true", help="skip the fused export of the final EMA weights")
    outputs.add_argument("--no_plot", action="store_true", help="skip curves.png")
    outputs.add_argument("--no_progress", action="store_true", help="no tqdm progress bar")
    groups["hardware"].add_argument(
        "--compile_only", action="store_true",
        help="compile the train and eval steps for --topology (a TPU slice, from this host, no TPU needed) and print "
             "per-chip memory, FLOPs, bytes and the roofline estimates; writes them to --compile_only_out")
    groups["hardware"].add_argument("--topology", default=None,
                                    help="TPU slice for --compile_only: v4, v5e, v5p or v6e and its shape, e.g. "
                                         "v5e:8x8, v5e:2x2, v4:2x2x2")
    groups["hardware"].add_argument("--compile_only_out", default=None,
                                    help="JSON report of --compile_only (default <workdir>/compile_only.json)")
    groups["hardware"].add_argument(
        "--host_malloc", choices=["auto", "tuned", "default"], default=None,
        help="glibc malloc settings that keep freed host memory (fastvit_jax/host_memory.py); auto (default, or "
             "$FASTVIT_HOST_MALLOC): tuned when no TPU/GPU plugin is installed")
    return parser


def config_from_args(args: argparse.Namespace):
    from fastvit_jax.training.flags import config_from_flags

    return config_from_flags(args, eval_only=args.eval_only, export=not args.no_export, plot=not args.no_plot,
                             progress=not args.no_progress, restart_from_scratch=args.restart_from_scratch)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.compile_only:
        return compile_only_main(args)
    # Before JAX starts its threads (see fastvit_jax/host_memory.py): on CPU-only hosts, stop
    # XLA's per-step buffers from being unmapped and page-faulted back in (1.35x per step on 2 cores).
    from fastvit_jax import host_memory

    host_memory.keep_freed_host_memory(args.host_malloc)
    # Fake CPU devices (XLA_FLAGS): a thread pool large enough that their collectives do not run out of threads.
    from fastvit_jax.launch import cpu_pool_for_collectives

    os.environ.update(cpu_pool_for_collectives(os.environ))
    configure_logging()
    from fastvit_jax.quiet import quiet_native_logs

    quiet_native_logs()

    # Multi-host: must run before anything touches the JAX backend.
    from fastvit_jax.training.config import TrainConfig
    from fastvit_jax.training.multihost import EXIT_PEER_LOST, MultihostError, maybe_initialize_distributed

    try:
        maybe_initialize_distributed(
            distributed_timeout_s=getattr(args, "distributed_timeout", TrainConfig.distributed_timeout))
    except MultihostError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_PEER_LOST
    return run(lambda: config_from_args(args))


def compile_only_main(args: argparse.Namespace) -> int:
    """--compile_only: the run's steps compiled for a TPU slice on this host; 0, or 2 with one line."""
    from fastvit_jax.training.aot import CompileOnlyError, compile_only, describe, prepare_deviceless_tpu, write_report

    try:
        if not args.topology:
            raise CompileOnlyError("--compile_only needs --topology, e.g. --topology v5e:8x8")
        prepare_deviceless_tpu()  # before JAX starts
        configure_logging()
        import fastvit_jax

        config = config_from_args(args)
        report = compile_only(config, args.topology, fastvit_jax.create_model)
        path = write_report(report, args.compile_only_out or os.path.join(config.workdir, "compile_only.json"))
    except ValueError as e:  # CompileOnlyError, bad flags
        if os.environ.get("FASTVIT_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(describe(report) + f"\n  report: {path}")
    return 0


def run(make_config, *, model_fn=None) -> int:
    """Builds the config, trains (or evaluates) and reports; returns the exit status.

    0: done or stopped by SIGTERM / one Ctrl-C (checkpoint saved); 130: a second Ctrl-C (one line); 2: a problem the user can fix (bad flag,
    missing dataset or checkpoint, changed config, file system full/unwritable), one line on
    stderr; 3: the loss became NaN/inf; 4: the processes of a multi-process job did not meet
    (a barrier timed out, process 0 failed to prepare the data; a lost peer exits with 4 from
    the trainer's watchdog). ``make_config()`` runs inside the error handling, so a
    bad flag is reported like the rest. ``model_fn`` goes to ``train_and_evaluate`` and
    ``evaluate_checkpoint`` (None: their default, ``fastvit_jax.create_model``).
    """
    from fastvit_jax.data.demo import DatasetPreparationError
    from fastvit_jax.data.pipeline import DatasetNotFoundError
    from fastvit_jax.io import WriteError, describe_os_error, file_system_error
    from fastvit_jax.training.checkpoint import CheckpointError
    from fastvit_jax.training.config import ConfigMismatchError
    from fastvit_jax.training.evaluate import evaluate_checkpoint
    from fastvit_jax.training.multihost import EXIT_PEER_LOST, MultihostError
    from fastvit_jax.training.trainer import NonFiniteLossError, train_and_evaluate
    from fastvit_jax.training.workdir_lock import WorkdirLockedError

    def fail(message: str, status: int = 2) -> int:
        if os.environ.get("FASTVIT_DEBUG"):
            raise
        hint = "" if status == 3 else "\n(set FASTVIT_DEBUG=1 for the traceback)"
        print(f"error: {message}{hint}", file=sys.stderr)
        return status

    config = None
    try:
        config = make_config()
        model_kwargs = {"model_fn": model_fn} if model_fn is not None else {}
        if config.eval_only:
            config.validate()
            m = evaluate_checkpoint(config, **model_kwargs)
            print(json.dumps({k: round(v, 6) for k, v in m.items()}, indent=2))
            return 0
        res = train_and_evaluate(config, **model_kwargs)
    except (DatasetNotFoundError, ConfigMismatchError, CheckpointError, WriteError, DatasetPreparationError,
            WorkdirLockedError, ValueError, FileNotFoundError) as e:
        return fail(str(e))
    except MultihostError as e:
        return fail(str(e), status=EXIT_PEER_LOST)
    except KeyboardInterrupt:  # before the trainer's handler, or a second Ctrl-C
        where = config.workdir if config else "the workdir"
        return fail(f"interrupted: nothing was saved after {where}'s last checkpoint; rerun the same command to "
                    f"resume (one Ctrl-C saves a checkpoint and stops)", status=130)
    except NonFiniteLossError as e:
        return fail(str(e), status=3)
    except Exception as e:  # noqa: BLE001 - file-system failures of any writer (TensorBoard's are TF errors)
        cause = file_system_error(e)
        if cause is None:
            raise
        where = cause.filename or getattr(e, "filename", None) or (config.workdir if config else os.getcwd())
        return fail(describe_os_error(where, cause))
    if res.preempted:
        print(f"stopped at step {res.final_step}; rerun the same command to resume from {res.workdir}")
        return 0
    ev = res.eval or {}
    print(
        f"done: step {res.final_step}, val top-1 {100 * ev.get('top1', float('nan')):.2f}% "
        f"(EMA {100 * ev.get('ema_top1', float('nan')):.2f}%), top-5 {100 * ev.get('top5', float('nan')):.2f}% "
        f"(EMA {100 * ev.get('ema_top5', float('nan')):.2f}%)\n"
        f"  workdir: {res.workdir}\n  metrics: {os.path.join(res.workdir, 'metrics.jsonl')}\n"
        f"  tensorboard --logdir {os.path.join(res.workdir, 'tensorboard')}\n"
        f"  plot:    {res.plot_path}\n  export:  {res.export_path}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
