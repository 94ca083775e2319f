"""Training input pipeline throughput per CPU core, and the cores needed to feed an accelerator.

Runs ``fastvit_jax.data.pipeline.make_train_dataset`` (decode + random-resized-crop + flip +
RandAugment rand-m9-mstd0.5-inc1 + normalize + random erasing 0.25, i.e. the paper recipe's
``train_augment(get_config(...))``) on the offline demo dataset at 256 px, with tf.data limited to ONE thread
(``threading.private_threadpool_size = 1``, ``max_intra_op_parallelism = 1``) for the per-core
rate, and with all cores for the scaling. Mixup/CutMix run on the accelerator in the trainer
and are not part of this cost.

The demo JPEGs are small (64-112 px a side) while ImageNet's average ~400x350 px, so decode is
cheaper here than in real training; the same ``train_preprocess`` is therefore also timed on a
synthetic 500x375 JPEG (quality 90), which is the number used for the cores-needed estimate.

    python -m benchmarks.input_pipeline --image_size 256
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any, Dict, Optional, Sequence

import numpy as np

from benchmarks import common

# timm benchmark-infer-amp-nchw-pt291-cu128-4090 (b1024, 256 px) / 3 as a training rate
# (an assumption, not a measurement).
REFERENCE_ACCEL = {
    "name": "RTX 4090 (timm AMP inference pt2.9.1 / 3)",
    "inference_img_s": {"t8": 8088, "t12": 5517, "s12": 5006, "sa12": 4879, "sa24": 2669, "sa36": 1836, "ma36": 1509},
    "train_fraction": 1 / 3,
}


def default_data_dir() -> str:
    return os.environ.get("FASTVIT_BENCH_DATA_DIR",
                          os.path.join(os.path.expanduser("~"), ".cache", "fastvit_jax_bench", "tfds"))


def _options(threads: Optional[int]):
    import tensorflow as tf

    opts = tf.data.Options()
    if threads:
        opts.threading.private_threadpool_size = threads
        opts.threading.max_intra_op_parallelism = 1
    return opts


def _time_dataset(ds, batch: int, chunks: int, batches_per_chunk: int, warmup_batches: int = 2) -> Dict[str, Any]:
    it = iter(ds)
    for _ in range(warmup_batches):
        next(it)
    times = []
    for _ in range(chunks):
        t0 = time.perf_counter()
        for _ in range(batches_per_chunk):
            b = next(it)
        _ = b["image"].numpy() if isinstance(b, dict) else b.numpy()
        times.append(time.perf_counter() - t0)
    s = common.summarize(times, items=batch * batches_per_chunk)
    return {"img_s": s["per_s"], "img_s_min": s["per_s_min"], "img_s_max": s["per_s_max"], **s}


def synthetic_jpeg(width: int = 500, height: int = 375, quality: int = 90, seed: int = 0) -> bytes:
    """A photo-like (smooth + textured) JPEG of ImageNet's typical size."""
    import io

    from PIL import Image

    rs = np.random.RandomState(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.stack([128 + 80 * np.sin(xx / (17 + 9 * c) + c) * np.cos(yy / (23 + 5 * c)) for c in range(3)], -1)
    img += rs.normal(0, 18, img.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def run_input_pipeline(image_size: int = 256, batch: int = 32, chunks: int = 5, batches_per_chunk: int = 4,
                       data_dir: Optional[str] = None, thread_counts: Sequence[Optional[int]] = (1, None),
                       train_img_s: Optional[Dict[str, float]] = None,
                       synthetic: bool = True) -> Dict[str, Any]:
    """Per-core preprocessing rate (demo data and a synthetic ImageNet-size JPEG) and cores needed.

    ``train_img_s``: {variant: measured JAX train-step img/s} to size the host for this machine.
    """
    import tensorflow as tf

    from fastvit_jax.data import demo, pipeline
    from fastvit_jax.training.config import get_config
    from fastvit_jax.training.trainer import train_augment

    aug = train_augment(get_config("t8"))  # the recipe's
    data_dir = data_dir or default_data_dir()
    t0 = time.perf_counter()
    demo.prepare_demo(data_dir)
    prep_s = time.perf_counter() - t0
    rows = []
    for threads in thread_counts:
        ds = pipeline.make_train_dataset("fastvit_demo", data_dir, global_batch_size=batch,
                                         image_size=image_size, seed=0, augment=aug)
        ds = ds.with_options(_options(threads))
        r = _time_dataset(ds, batch, chunks, batches_per_chunk)
        ncores = threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
        rows.append({"source": "demo (64-112 px JPEG)", "threads": ncores, "per_core_img_s": r["img_s"] / ncores, **r})
        common.log(f"[input_pipeline] demo, {ncores} thread(s): {r['img_s']:.1f} img/s")
    if synthetic:
        enc = tf.constant(synthetic_jpeg())
        for threads in thread_counts:
            ds = tf.data.Dataset.range(1 << 40).map(
                lambda i: {"image": pipeline.train_preprocess(
                    enc, tf.random.experimental.stateless_fold_in(tf.constant([0, 1], tf.int64), i),
                    image_size=image_size, augment=aug, jpeg=True)},
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).batch(batch).prefetch(tf.data.AUTOTUNE)
            ds = ds.with_options(_options(threads))
            r = _time_dataset(ds, batch, chunks, batches_per_chunk)
            ncores = threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
            rows.append({"source": "synthetic 500x375 JPEG q90", "threads": ncores,
                         "per_core_img_s": r["img_s"] / ncores, **r})
            common.log(f"[input_pipeline] synthetic 500x375, {ncores} thread(s): {r['img_s']:.1f} img/s")
    one = {r["source"]: r["per_core_img_s"] for r in rows if r["threads"] == 1}
    per_core = one.get("synthetic 500x375 JPEG q90") or one.get("demo (64-112 px JPEG)")
    needs = []
    for v, rate in (train_img_s or {}).items():
        needs.append({"target": f"this machine's JAX train step ({v})", "variant": v, "img_s": rate,
                      "cores": rate / per_core if per_core else None})
    for v, inf in REFERENCE_ACCEL["inference_img_s"].items():
        rate = inf * REFERENCE_ACCEL["train_fraction"]
        needs.append({"target": REFERENCE_ACCEL["name"], "variant": v, "img_s": rate,
                      "cores": rate / per_core if per_core else None})
    return {"rows": rows, "cores_needed": needs, "per_core_img_s_used": per_core,
            "settings": {"image_size": image_size, "batch": batch, "augment": "the recipe's (rand-m9-mstd0.5-inc1, "
                         "erase 0.25, hflip 0.5, rrc scale 0.08-1)", "data_dir": data_dir,
                         "demo_prepare_s": prep_s, "tensorflow": tf.__version__},
            "notes": ["cores needed = required img/s / per-core img/s (1-thread tf.data, synthetic ImageNet-size "
                      "JPEG); assumes linear scaling over cores (see the all-cores rows for this machine)",
                      f"reference accelerator: {REFERENCE_ACCEL['name']} — timm's RTX 4090 AMP inference img/s "
                      "(b1024, 256 px) x 1/3 as a training rate (an assumption)"]}


def markdown(result: Dict[str, Any]) -> str:
    rows = [[r["source"], r["threads"], f"{r['img_s']:.1f} ({r['img_s_min']:.1f}–{r['img_s_max']:.1f})",
             f"{r['per_core_img_s']:.1f}"] for r in result["rows"]]
    out = common.markdown_table(["source @%dpx" % result["settings"]["image_size"], "threads", "img/s (min–max)",
                                 "img/s per core"], rows)
    rows2 = [[n["target"], n["variant"], f"{n['img_s']:.0f}", f"{n['cores']:.2f}" if n["cores"] else "–"]
             for n in result["cores_needed"]]
    out += "\n\n" + common.markdown_table(["feeding", "variant", "train img/s", "CPU cores needed"], rows2)
    return out + "\n\n" + "\n".join(f"- {n}" for n in result["notes"])


def main(argv=None):
    common.prepare_process()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image_size", type=int, default=256)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--data_dir", default=None)
    args = p.parse_args(argv)
    print(markdown(run_input_pipeline(args.image_size, args.batch, data_dir=args.data_dir)))


if __name__ == "__main__":
    main()
