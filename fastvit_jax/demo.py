"""`make demo`: train FastViT-t8 on 8 faked CPU devices, evaluate, export fused, verify.

What it does (about 5 minutes on 2 CPU cores):
  1. fakes 8 CPU devices (XLA_FLAGS, set before JAX is imported) so the run uses the same
     sharded code path as a TPU pod: a 'data' mesh of 8, batch split 8 ways;
  2. prepares the embedded 10-class demo dataset (procedural shapes/textures, tfds);
  3. trains fastvit_t8 at low resolution with the real trainer (AdamW, warm-up + cosine,
     label smoothing, mixup/cutmix, EMA, orbax checkpoints, metrics.jsonl, TensorBoard);
  4. evaluates raw and EMA weights on the validation split;
  5. exports the reparameterized (fused) EMA weights, reloads them into
     ``create_model('t8', inference_mode=True)`` and checks that they predict the same
     classes as the train-form EMA model on the whole validation set.

Usage: python -m fastvit_jax.demo [--workdir demo_out] [--steps 120] [--image_size 48]
"""

import os

from fastvit_jax.launch import fake_cpu_devices  # noqa: E402  (imports neither JAX nor TensorFlow)

os.environ.update(fake_cpu_devices(os.environ, 8))

from fastvit_jax import host_memory  # noqa: E402  (imports neither JAX nor PyTorch)
from fastvit_jax.quiet import quiet_native_logs  # noqa: E402

host_memory.keep_freed_host_memory()  # before JAX starts its threads

import argparse  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m fastvit_jax.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="demo_out", help="output folder (default ./demo_out)")
    p.add_argument("--data_dir", default=None, help="tfds data_dir for the demo dataset (default <workdir>/tfds)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the demo recipe's 120, ~5 epochs)")
    p.add_argument("--batch_size", type=int, default=None,
                   help="global batch (default: the demo recipe's 128, 16 per fake device)")
    p.add_argument("--image_size", type=int, default=None, help="train/eval resolution (default: the demo recipe's 48)")
    p.add_argument("--keep", action="store_true", help="resume an existing demo run instead of starting over")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = _parse(argv)
    quiet_native_logs()
    t0 = time.perf_counter()
    from fastvit_jax.training.logs import configure_logging

    configure_logging()

    import jax
    import jax.numpy as jnp
    import numpy as np

    import fastvit_jax
    from fastvit_jax.data.demo import prepare_demo
    from fastvit_jax.data.pipeline import make_eval_dataset
    from fastvit_jax.training.config import get_config
    from fastvit_jax.training.trainer import train_and_evaluate

    workdir = os.path.abspath(args.workdir)
    run_dir = os.path.join(workdir, "run")
    data_dir = os.path.abspath(args.data_dir or os.path.join(workdir, "tfds"))
    print(f"[demo] {jax.device_count()} {jax.default_backend().upper()} devices: {jax.devices()[:2]} ...")
    if jax.device_count() != 8:
        print("[demo] warning: expected 8 faked devices (JAX was imported before XLA_FLAGS was set?)")
    if os.path.exists(run_dir) and not args.keep:
        print(f"[demo] removing the previous demo run in {run_dir} (use --keep to resume it)")
        shutil.rmtree(run_dir)

    print(f"[demo] preparing the demo dataset in {data_dir} ...")
    prepare_demo(data_dir)
    t_data = time.perf_counter() - t0

    # The run is the named recipe "demo" (``fastvit_jax/training/config.py``): the same as
    # ``train_tpu.py --variant t8 --recipe demo``; only the paths, and the sizes given here, are set.
    sizes = {"image_size": args.image_size, "global_batch_size": args.batch_size}
    overrides = {k: v for k, v in sizes.items() if v is not None}
    if args.steps is not None:
        overrides.update(num_steps=args.steps, warmup_steps=max(1, args.steps // 15),
                         checkpoint_every=max(50, args.steps // 2))
    config = get_config("t8", recipe="demo", data_dir=data_dir, workdir=run_dir, **overrides)
    print(f"[demo] training fastvit_t8 at {config.image_size}px, batch {config.global_batch_size}, "
          f"{config.num_steps} steps "
          f"on mesh {config.mesh} ...")
    res = train_and_evaluate(config)
    ev = res.eval

    # Reload the fused export and compare with the train-form EMA model on the val set.
    print("[demo] reloading the fused export into create_model('t8', inference_mode=True) ...")
    fused = fastvit_jax.load_variables(res.export_path)
    fused_model = fastvit_jax.create_model("t8", num_classes=10, inference_mode=True)
    train_model = res.model
    ema_vars = jax.device_get(res.state.variables(ema=True))

    @jax.jit
    def both(va, vb, x):
        return train_model.apply(va, x, train=False), fused_model.apply(vb, x, train=False)

    agree = n = correct = 0
    max_diff = 0.0
    for batch in make_eval_dataset("demo", data_dir, batch_size=250, image_size=config.image_size,
                                   crop_pct=config.eval_crop_pct).as_numpy_iterator():
        train_logits, fused_logits = (np.asarray(x) for x in both(ema_vars, fused, jnp.asarray(batch["image"])))
        valid = batch["mask"] > 0
        train_pred, fused_pred = train_logits.argmax(-1)[valid], fused_logits.argmax(-1)[valid]
        agree += int((train_pred == fused_pred).sum())
        correct += int((fused_pred == batch["label"][valid]).sum())
        n += int(valid.sum())
        max_diff = max(max_diff, float(np.abs(train_logits[valid] - fused_logits[valid]).max()))
    fused_acc = correct / max(n, 1)
    wall = time.perf_counter() - t0

    ok_acc = ev["ema_top1"] > 0.3
    ok_fused = agree == n
    print("\n" + "=" * 78)
    print("FastViT-t8 demo summary")
    print(f"  devices          : {jax.device_count()} faked CPU devices, mesh {dict(res.mesh.shape)}, "
          f"batch {config.global_batch_size} split 8 ways")
    print(f"  data             : fastvit_demo (10 classes, 3000 train / 500 val), {config.image_size}px "
          f"(prepared in {t_data:.0f}s)")
    print(f"  trained          : {res.final_step} steps "
          f"({res.final_step * config.global_batch_size / 3000:.1f} epochs)")
    print(f"  val top-1 (raw)  : {100 * ev['top1']:.1f}%   top-5 {100 * ev['top5']:.1f}%   loss {ev['loss']:.3f}")
    print(f"  val top-1 (EMA)  : {100 * ev['ema_top1']:.1f}%   top-5 {100 * ev['ema_top5']:.1f}%   "
          f"loss {ev['ema_loss']:.3f}   (chance: 10%)")
    print(f"  fused export     : top-1 {100 * fused_acc:.1f}%, same class as the train-form EMA model on "
          f"{agree}/{n} val images, max |logit diff| {max_diff:.2e}")
    print(f"  wall time        : {wall:.0f}s")
    print("  files:")
    print(f"    checkpoints    : {os.path.join(run_dir, 'checkpoints')}")
    print(f"    config         : {os.path.join(run_dir, 'config.json')}")
    print(f"    metrics        : {os.path.join(run_dir, 'metrics.jsonl')}")
    print(f"    tensorboard    : {os.path.join(run_dir, 'tensorboard')}  (view: tensorboard --logdir <that folder>)")
    print(f"    curves         : {res.plot_path}")
    print(f"    fused export   : {res.export_path}")
    print("=" * 78)
    if not ok_fused:
        print("[demo] FAILED: the fused export disagrees with the train-form model")
        return 1
    if not ok_acc:
        print("[demo] FAILED: accuracy is not clearly above chance")
        return 1
    print(f"[demo] OK: final EMA accuracy {100 * ev['ema_top1']:.1f}% (fused {100 * fused_acc:.1f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
