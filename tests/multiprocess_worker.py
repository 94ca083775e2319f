"""One process of a multi-process trainer test (started by ``python -m fastvit_jax.launch``).

Trains the tiny stand-in model (tests/test_training_helpers.py) with ``train_and_evaluate``
on the embedded demo dataset, like ``train_tpu.py`` would, and writes this process's
``{step: loss}`` to ``<workdir>/losses_p<process>.json``. Options:

  --pause_after_step N   sleep after step N (the test kills processes there)
  --feed_global_batches  one process builds the global batches the 2-process run reads
                         (process slices 0 and 1 of 2, concatenated), for an exact comparison
"""

import argparse
import json
import logging
import os
import sys
import time

from fastvit_jax.training import multihost


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--num_steps", type=int, default=6)
    parser.add_argument("--checkpoint_every", type=int, default=3)
    parser.add_argument("--distributed_timeout", type=float, default=300.0)
    parser.add_argument("--pause_after_step", type=int, default=0)
    parser.add_argument("--feed_global_batches", action="store_true")
    return parser.parse_args(argv)


def feed_global_batches(slices: int) -> None:
    """Makes the trainer's train dataset the concatenation of the ``slices`` process slices of a
    ``slices``-process run: one process then trains on the same global batches."""
    import tensorflow as tf

    from fastvit_jax.data import pipeline

    per_process = pipeline.make_train_dataset

    def global_batches(*args, process_index, process_count, **kwargs):
        del process_index, process_count  # this one process reads every slice
        parts = [per_process(*args, process_index=i, process_count=slices, **kwargs) for i in range(slices)]
        return tf.data.Dataset.zip(tuple(parts)).map(lambda *xs: {k: tf.concat([x[k] for x in xs], 0) for k in xs[0]})

    pipeline.make_train_dataset = global_batches


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("absl", "jax._src.xla_bridge", "jax._src.compilation_cache", "orbax", "tensorflow"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    multihost.maybe_initialize_distributed(distributed_timeout_s=args.distributed_timeout)
    import jax

    from fastvit_jax.training.config import get_config
    from fastvit_jax.training.trainer import train_and_evaluate

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from test_training_helpers import after_each_step, create_tiny_model

    if args.feed_global_batches:
        feed_global_batches(2)
    config = get_config(
        "t8", dataset="demo", data_dir=args.data_dir, workdir=args.workdir, global_batch_size=16, image_size=32,
        num_epochs=None, num_steps=args.num_steps, warmup_steps=2, lr=2e-3, mixup=0.2, cutmix=1.0, randaugment="",
        reprob=0.0, color_jitter=0.0, rrc_scale=(0.5, 1.0), checkpoint_every=args.checkpoint_every, log_every=1,
        eval_every=0, eval_batch_size=64, ema_decay=0.9, progress=False, distributed_timeout=args.distributed_timeout)

    def pause(step):
        if step == args.pause_after_step:
            print(f"paused after step {step}", flush=True)
            time.sleep(3600)

    try:
        with after_each_step(pause):
            result = train_and_evaluate(config, model_fn=create_tiny_model)
    except multihost.MultihostError as e:
        print(f"error: {e}", file=sys.stderr)
        return multihost.EXIT_PEER_LOST
    path = os.path.join(args.workdir, f"losses_p{jax.process_index()}.json")
    with open(path, "w") as f:
        json.dump({"losses": result.losses, "eval": result.eval, "resumed_from": result.resumed_from,
                   "final_step": result.final_step, "process_count": jax.process_count(),
                   "device_count": jax.device_count()}, f)
    print(f"done: step {result.final_step}, resumed from {result.resumed_from}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
