"""A tiny ImageNet through the REAL ``imagenet2012`` tfds builder (offline): small
ImageNet-format tars in a manual dir, prepared by tfds as a user's real archives would be."""

from __future__ import annotations

import io
import os
import tarfile

import numpy as np
import tensorflow_datasets as tfds

from fastvit_jax.data.demo import encode_jpeg


def _add_bytes(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def _tiny_image(rng: np.random.Generator) -> np.ndarray:
    h, w = (int(v) for v in rng.integers(40, 72, size=2))
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def make_fake_imagenet(data_dir: str, manual_dir: str, num_classes_used: int = 3, per_class: int = 4,
                       num_val: int = 6, seed: int = 0) -> dict[str, dict[str, int]]:
    """Writes tiny ``ILSVRC2012_img_{train,val}.tar`` into ``manual_dir`` and prepares them
    with the real ``imagenet2012`` builder into ``data_dir``.

    Train: ``num_classes_used`` WNIDs spread over the 1000 classes, ``per_class`` random
    JPEGs each (outer tar of per-WNID tars, as in the real archive). Validation:
    ``ILSVRC2012_val_%08d.JPEG`` for 1..num_val; the builder labels them by zipping the
    sorted file names with its bundled ``validation_labels.txt``, so their labels are the
    first ``num_val`` entries of that file.

    Returns ``{'train': {file_name: label}, 'validation': {file_name: label}}``, the
    labels the builder is expected to assign.
    """
    from tensorflow_datasets.datasets.imagenet2012 import imagenet_common

    os.makedirs(manual_dir, exist_ok=True)
    builder = tfds.builder("imagenet2012", data_dir=os.fspath(data_dir))
    names = builder.info.features["label"].names  # WNIDs, index = label
    rng = np.random.default_rng(seed)
    chosen = np.linspace(0, len(names) - 1, num_classes_used).round().astype(int)
    expected: dict[str, dict[str, int]] = {"train": {}, "validation": {}}

    with tarfile.open(os.path.join(manual_dir, "ILSVRC2012_img_train.tar"), "w") as outer:
        for label in chosen:
            wnid = names[label]
            inner_buf = io.BytesIO()
            with tarfile.open(fileobj=inner_buf, mode="w") as inner:
                for j in range(per_class):
                    fname = f"{wnid}_{j}.JPEG"
                    _add_bytes(inner, fname, encode_jpeg(_tiny_image(rng)))
                    expected["train"][fname] = int(label)
            _add_bytes(outer, f"{wnid}.tar", inner_buf.getvalue())

    labels_path = tfds.core.tfds_path(imagenet_common._VALIDATION_LABELS_FNAME)
    val_wnids = labels_path.read_text().strip().splitlines()
    with tarfile.open(os.path.join(manual_dir, "ILSVRC2012_img_val.tar"), "w") as val:
        for i in range(1, num_val + 1):
            fname = f"ILSVRC2012_val_{i:08d}.JPEG"
            _add_bytes(val, fname, encode_jpeg(_tiny_image(rng)))
            expected["validation"][fname] = names.index(val_wnids[i - 1])

    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir),
                                                     try_download_gcs=False)
    )
    return expected
