"""Tests for fastvit_jax.data: demo tfds builder, fake ImageNet via the real imagenet2012
builder, deterministic/resumable train pipeline, padded eval pipeline, timm-style
RandAugment / RandomErasing ops (checked against PIL where PIL defines them) and
host->device prefetch."""

from __future__ import annotations

import dataclasses
import io
import logging
import os

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps

import tensorflow as tf  # noqa: E402  (after conftest set the env)
import tensorflow_datasets as tfds  # noqa: E402

from fastvit_jax.data import randaugment as ra
from fastvit_jax.data.demo import (CLASS_NAMES, DEFAULT_NUM_TRAIN, DEFAULT_NUM_VAL, demo_builder,
                                   generate_split, prepare_demo)
from fastvit_jax.data.pipeline import (IMAGENET_MEAN, IMAGENET_STD, DatasetNotFoundError,
                                       _process_split, _read_split, dataset_info, device_prefetch,
                                       eval_image_size, get_builder, make_eval_dataset, make_train_dataset,
                                       train_preprocess)
from fastvit_jax.training.config import get_config
from fastvit_jax.training.trainer import train_augment

from fake_imagenet import make_fake_imagenet  # noqa: E402  (tests/ is on sys.path)

tfds.disable_progress_bar()

IMG = 32  # small train/eval resolution keeps the file fast on 2 cores
RECIPE = train_augment(get_config("t8"))  # RandAugment, erasing 0.25, flip, crop area 0.08-1
MINIMAL = dataclasses.replace(RECIPE, randaugment=None, random_erase_prob=0.0, color_jitter=0.0)  # crop + flip


# ----------------------------------------------------------------------------------------
# fixtures
# ----------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> str:
    d = str(tmp_path_factory.mktemp("tfds_demo"))
    prepare_demo(d)
    return d


@pytest.fixture(scope="session")
def fake_imagenet(tmp_path_factory) -> tuple[str, dict]:
    root = tmp_path_factory.mktemp("tfds_imagenet")
    data_dir, manual = str(root / "tfds"), str(root / "manual")
    expected = make_fake_imagenet(data_dir, manual, num_classes_used=3, per_class=4, num_val=6)
    return data_dir, expected


def _take(ds: tf.data.Dataset, n: int) -> list[dict]:
    return [b for _, b in zip(range(n), ds.as_numpy_iterator())]


def _assert_batches_equal(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def _random_image(seed: int, h: int = 40, w: int = 48, lo: int = 0, hi: int = 256) -> np.ndarray:
    """Smooth-ish random uint8 (H, W, 3) image (so filters/equalize do something real)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(lo, hi, size=(h // 8 + 1, w // 8 + 1, 3)).astype(np.float32)
    up = np.kron(base, np.ones((8, 8, 1)))[:h, :w]
    noise = rng.normal(0, 10, size=up.shape)
    return np.clip(np.round(up + noise), lo, hi - 1).astype(np.uint8)


# ----------------------------------------------------------------------------------------
# small pure functions
# ----------------------------------------------------------------------------------------
def test_eval_image_size():
    assert eval_image_size(256, 0.9) == (284, 256)
    assert eval_image_size(256, 0.95) == (269, 256)
    assert eval_image_size(224, 0.875) == (256, 224)
    assert eval_image_size(256, 1.0) == (256, 256)


def test_parse_randaugment():
    cfg = ra.parse_randaugment("rand-m9-mstd0.5-inc1")
    assert (cfg.num_layers, cfg.magnitude, cfg.magnitude_std, cfg.increasing, cfg.prob) == (2, 9.0, 0.5, True, 0.5)
    assert cfg.ops == ra.INCREASING_OPS and len(cfg.ops) == 15
    cfg = ra.parse_randaugment("rand-n3-m5-p1.0")
    assert (cfg.num_layers, cfg.magnitude, cfg.increasing, cfg.prob) == (3, 5.0, False, 1.0)
    with pytest.raises(ValueError):
        ra.parse_randaugment("rand-m9-w0")
    with pytest.raises(ValueError):
        ra.parse_randaugment("augmix-m5")


# ----------------------------------------------------------------------------------------
# demo dataset
# ----------------------------------------------------------------------------------------
def test_preparing_the_demo_prints_one_line(tmp_path, capfd, caplog):
    """No tfds progress bars, 'Downloading and preparing' print or warning about the folder it creates."""
    from tensorflow_datasets.core.utils import tqdm_utils

    tfds.display_progress_bar(True)
    try:
        with caplog.at_level(logging.INFO):
            prepare_demo(str(tmp_path), num_train=20, num_val=10)
        assert tqdm_utils._active  # the caller's setting is restored
    finally:
        tfds.disable_progress_bar()
    out, err = capfd.readouterr()
    assert out == "" and err == "", (out, err)
    ours = [r.getMessage() for r in caplog.records if r.name == "fastvit_jax.data"]
    assert len(ours) == 1 and ours[0].startswith("preparing the demo dataset"), ours
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert not warnings, warnings


def test_demo_builder_prepared(demo_dir):
    builder = demo_builder(demo_dir)
    assert builder.is_prepared()
    assert builder.info.name == "fastvit_demo"
    assert builder.info.features["label"].names == list(CLASS_NAMES)
    assert builder.info.splits["train"].num_examples == DEFAULT_NUM_TRAIN
    assert builder.info.splits["validation"].num_examples == DEFAULT_NUM_VAL
    info = dataset_info("demo", demo_dir)
    assert (info.num_classes, info.train_split, info.eval_split) == (10, "train", "validation")
    assert (info.num_train, info.num_eval) == (DEFAULT_NUM_TRAIN, DEFAULT_NUM_VAL)
    # real JPEGs of varied size; all classes present in the validation split
    raw = list(_read_split(builder, "validation").as_numpy_iterator())
    assert raw[0]["image"][:2] == b"\xff\xd8"
    shapes = {Image.open(io.BytesIO(r["image"])).size for r in raw[:20]}
    assert len(shapes) > 1
    assert set(int(r["label"]) for r in raw) == set(range(10))
    # idempotent
    prepare_demo(demo_dir)


def test_demo_generation_is_deterministic():
    a = [ex for _, ex in generate_split("train", 3)]
    b = [ex for _, ex in generate_split("train", 3)]
    assert [x["image"] for x in a] == [x["image"] for x in b]
    assert [x["label"] for x in a] == [x["label"] for x in b]
    v = [ex for _, ex in generate_split("validation", 3)]
    assert [x["image"] for x in a] != [x["image"] for x in v]


# ----------------------------------------------------------------------------------------
# train pipeline
# ----------------------------------------------------------------------------------------
def test_train_batch_shapes_dtypes_and_normalization(demo_dir):
    ds = make_train_dataset("demo", demo_dir, global_batch_size=16, image_size=IMG, seed=0,
                            process_count=2, process_index=0, augment=MINIMAL)
    (batch,) = _take(ds, 1)
    assert batch["image"].shape == (8, IMG, IMG, 3) and batch["image"].dtype == np.float32
    assert batch["label"].shape == (8,) and batch["label"].dtype == np.int32
    assert ((batch["label"] >= 0) & (batch["label"] < 10)).all()
    lo = (0.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    hi = (1.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    assert (batch["image"] >= lo - 1e-5).all() and (batch["image"] <= hi + 1e-5).all()
    assert batch["image"].std() > 0.3  # not a constant image


def test_train_determinism_and_resume(demo_dir):
    kw = dict(global_batch_size=8, image_size=IMG, seed=3, augment=MINIMAL)
    run = _take(make_train_dataset("demo", demo_dir, **kw), 5)
    _assert_batches_equal(run, _take(make_train_dataset("demo", demo_dir, **kw), 5))
    resumed = _take(make_train_dataset("demo", demo_dir, start_step=3, **kw), 2)
    _assert_batches_equal(run[3:5], resumed)
    other = _take(make_train_dataset("demo", demo_dir, **{**kw, "seed": 4}), 1)
    assert not np.array_equal(other[0]["image"], run[0]["image"])


def test_train_resume_across_epochs_with_full_augment(fake_imagenet):
    """12 train images, batch 4 -> 3 steps per epoch: resuming at step 4 starts inside
    epoch 1 (reshuffled). Full RandAugment + random erasing: still exactly equal."""
    data_dir, _ = fake_imagenet
    kw = dict(global_batch_size=4, image_size=IMG, seed=11, augment=RECIPE)
    run = _take(make_train_dataset("imagenet2012", data_dir, **kw), 6)
    resumed = _take(make_train_dataset("imagenet2012", data_dir, start_step=4, **kw), 2)
    _assert_batches_equal(run[4:6], resumed)
    # every epoch is a permutation of the 12 examples (labels as a multiset)
    labels = np.concatenate([b["label"] for b in run])
    assert sorted(labels[:12]) == sorted(labels[12:24])
    for b in run:
        assert np.isfinite(b["image"]).all()


def test_process_slices_are_disjoint(demo_dir):
    builder = get_builder("demo", demo_dir)
    parts = [list(_read_split(builder, _process_split("train", i, 2)).as_numpy_iterator()) for i in range(2)]
    keys = [{bytes(r["image"]) for r in p} for p in parts]
    assert not keys[0] & keys[1]
    assert len(keys[0]) + len(keys[1]) == DEFAULT_NUM_TRAIN
    kw = dict(global_batch_size=8, image_size=IMG, seed=0, process_count=2, augment=MINIMAL)
    b0 = _take(make_train_dataset("demo", demo_dir, process_index=0, **kw), 1)[0]
    b1 = _take(make_train_dataset("demo", demo_dir, process_index=1, **kw), 1)[0]
    assert b0["image"].shape == b1["image"].shape == (4, IMG, IMG, 3)
    assert not np.array_equal(b0["image"], b1["image"])
    with pytest.raises(ValueError):
        make_train_dataset("demo", demo_dir, process_index=2, **kw)


# ----------------------------------------------------------------------------------------
# eval pipeline
# ----------------------------------------------------------------------------------------
def test_eval_sizes_and_mask_padding(demo_dir):
    builder = get_builder("demo", demo_dir)
    val_labels = np.array([int(r["label"]) for r in _read_split(builder, "validation").as_numpy_iterator()])
    batches = list(make_eval_dataset("demo", demo_dir, batch_size=64, image_size=IMG,
                                     crop_pct=0.875).as_numpy_iterator())
    assert len(batches) == -(-DEFAULT_NUM_VAL // 64)
    for b in batches:
        assert b["image"].shape == (64, IMG, IMG, 3) and b["image"].dtype == np.float32
        assert b["mask"].dtype == np.float32 and b["label"].dtype == np.int32
    mask = np.concatenate([b["mask"] for b in batches])
    labels = np.concatenate([b["label"] for b in batches])
    images = np.concatenate([b["image"] for b in batches])
    assert mask.sum() == DEFAULT_NUM_VAL and (mask[:DEFAULT_NUM_VAL] == 1).all()
    np.testing.assert_array_equal(labels[:DEFAULT_NUM_VAL], val_labels)
    assert (images[DEFAULT_NUM_VAL:] == 0).all()
    # eval is deterministic
    again = list(make_eval_dataset("demo", demo_dir, batch_size=64, image_size=IMG,
                                   crop_pct=0.875).as_numpy_iterator())
    _assert_batches_equal(batches[:1], again[:1])

    # 2 processes: same number of batches each, masks cover each slice exactly
    per_proc = [list(make_eval_dataset("demo", demo_dir, batch_size=64, image_size=IMG, crop_pct=0.875,
                                       process_index=i, process_count=2).as_numpy_iterator())
                for i in range(2)]
    assert len(per_proc[0]) == len(per_proc[1]) == -(-(DEFAULT_NUM_VAL // 2) // 32)
    got = np.concatenate([np.concatenate([b["label"][b["mask"] > 0] for b in p]) for p in per_proc])
    np.testing.assert_array_equal(got, val_labels)


def test_eval_pipeline_resizes_with_the_variants_filter(demo_dir):
    """The trainer's evaluation resizes as the model's data config says: bilinear for the MobileCLIP towers."""
    from fastvit_jax.data.pipeline import eval_preprocess

    assert get_config("mci0").eval_interpolation == "bilinear" and get_config("t8").eval_interpolation == "bicubic"
    raw = _take(_read_split(get_builder("demo", demo_dir), "validation"), 1)[0]

    def first(interpolation):
        batch = next(make_eval_dataset("demo", demo_dir, batch_size=2, image_size=IMG, crop_pct=1.0,
                                       interpolation=interpolation).as_numpy_iterator())
        return batch["image"][0]

    bilinear = eval_preprocess(raw["image"], image_size=IMG, crop_pct=1.0, interpolation="bilinear").numpy()
    np.testing.assert_array_equal(first("bilinear"), bilinear)
    assert not np.array_equal(first("bicubic"), bilinear)


# ----------------------------------------------------------------------------------------
# augmentation ops
# ----------------------------------------------------------------------------------------
def _pil_equal(tf_out: tf.Tensor, pil_img: Image.Image, atol: int = 1) -> None:
    diff = np.abs(tf_out.numpy().astype(np.int32) - np.asarray(pil_img).astype(np.int32))
    assert diff.max() <= atol, diff.max()


@pytest.mark.parametrize("seed", [0, 1])
def test_color_ops_match_pil(seed):
    arr = _random_image(seed, lo=20, hi=220)
    x = tf.constant(arr, tf.float32)
    pil = Image.fromarray(arr)
    _pil_equal(ra.invert(x), ImageOps.invert(pil), 0)
    _pil_equal(ra.posterize(x, tf.constant(2)), ImageOps.posterize(pil, 2), 0)
    _pil_equal(ra.solarize(x, tf.constant(100.0)), ImageOps.solarize(pil, 100), 0)
    lut = [min(255, i + 40) if i < 128 else i for i in range(256)] * 3
    _pil_equal(ra.solarize_add(x, tf.constant(40.0)), pil.point(lut), 0)
    _pil_equal(ra.auto_contrast(x), ImageOps.autocontrast(pil), 1)
    _pil_equal(ra.equalize(x), ImageOps.equalize(pil), 0)
    for factor in (0.3, 1.7):
        f = tf.constant(factor)
        _pil_equal(ra.color(x, f), ImageEnhance.Color(pil).enhance(factor), 1)
        _pil_equal(ra.contrast(x, f), ImageEnhance.Contrast(pil).enhance(factor), 1)
        _pil_equal(ra.brightness(x, f), ImageEnhance.Brightness(pil).enhance(factor), 1)
        _pil_equal(ra.sharpness(x, f), ImageEnhance.Sharpness(pil).enhance(factor), 1)


def test_geometric_ops_conventions():
    arr = _random_image(5, 36, 36)
    x = tf.constant(arr, tf.float32)
    # Rotate is counter-clockwise, like PIL / np.rot90
    np.testing.assert_array_equal(ra.rotate(x, tf.constant(90.0)).numpy(), np.rot90(arr, 1).astype(np.float32))
    # integer translation matches PIL exactly, including the ImageNet-mean fill colour
    pil = Image.fromarray(arr).transform((36, 36), Image.AFFINE, (1, 0, 9, 0, 1, 0),
                                         resample=Image.BILINEAR, fillcolor=(124, 116, 104))
    _pil_equal(ra.translate_x_rel(x, tf.constant(0.25)), pil, 0)
    pil = Image.fromarray(arr).transform((36, 36), Image.AFFINE, (1, 0, 0, 0, 1, -9),
                                         resample=Image.BILINEAR, fillcolor=(124, 116, 104))
    _pil_equal(ra.translate_y_rel(x, tf.constant(-0.25)), pil, 0)
    # shear: same direction as PIL (PIL samples pixel centres: allow a half-pixel blur)
    pil = np.asarray(Image.fromarray(arr).transform((36, 36), Image.AFFINE, (1, 0.3, 0, 0, 1, 0),
                                                    resample=Image.BILINEAR, fillcolor=(124, 116, 104)))
    out = ra.shear_x(x, tf.constant(0.3)).numpy()
    assert np.abs(out - pil).mean() < 0.5 * np.abs(arr.astype(np.float32) - pil).mean()


@pytest.mark.parametrize("name", ra.INCREASING_OPS)
def test_each_randaugment_op_is_valid_and_changes_pixels(name):
    arr = _random_image(7, lo=30, hi=200)  # low contrast so AutoContrast/Equalize act
    x = tf.constant(arr, tf.float32)
    out = ra._apply_named_op(name, x, tf.constant(9.0), tf.constant([1, 2], tf.int64)).numpy()
    assert out.shape == arr.shape and np.isfinite(out).all()
    assert out.min() >= 0 and out.max() <= 255 and (out == np.round(out)).all()
    assert np.abs(out - arr).mean() > 0.5, name


def test_randaugment_and_erasing_change_pixels(demo_dir):
    builder = get_builder("demo", demo_dir)
    raw = _take(_read_split(builder, "train"), 6)
    full, minimal = dataclasses.replace(RECIPE, random_erase_prob=1.0), MINIMAL
    changed = 0
    for i, ex in enumerate(raw):
        key = tf.constant([0, i], tf.int64)
        a = train_preprocess(ex["image"], key, image_size=IMG, augment=full).numpy()
        b = train_preprocess(ex["image"], key, image_size=IMG, augment=minimal).numpy()
        assert a.shape == (IMG, IMG, 3) and np.isfinite(a).all()
        changed += int(not np.array_equal(a, b))
        # same key -> same output (stateless)
        np.testing.assert_array_equal(a, train_preprocess(ex["image"], key, image_size=IMG, augment=full).numpy())
    assert changed == len(raw)


def test_color_jitter_only_without_randaugment(demo_dir):
    ex = _take(_read_split(get_builder("demo", demo_dir), "train"), 1)[0]
    key = tf.constant([5, 6], tf.int64)

    def run(aug):
        return train_preprocess(ex["image"], key, image_size=IMG, augment=aug).numpy()

    base = MINIMAL
    jitter = dataclasses.replace(RECIPE, randaugment=None, random_erase_prob=0.0, color_jitter=0.4)
    assert not np.array_equal(run(base), run(jitter))
    ra_cj = dataclasses.replace(RECIPE, random_erase_prob=0.0, color_jitter=0.4)
    ra_no_cj = dataclasses.replace(RECIPE, random_erase_prob=0.0, color_jitter=0.0)
    np.testing.assert_array_equal(run(ra_cj), run(ra_no_cj))


def test_random_erase_pixel_mode():
    x = tf.zeros([32, 32, 3])
    assert np.array_equal(ra.random_erase(x, tf.constant([1, 1], tf.int64), 0.0).numpy(), x.numpy())
    for s in range(5):
        out = ra.random_erase(x, tf.constant([s, 2], tf.int64), 1.0).numpy()
        ys, xs = np.nonzero(np.abs(out).sum(-1))
        h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
        assert 0.02 * 1024 * 0.5 <= h * w <= 1024 / 3 * 1.5  # one rectangle of timm's area range
        patch = out[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
        assert (patch != 0).all() and abs(patch.std() - 1.0) < 0.35  # per-pixel N(0, 1)


# ----------------------------------------------------------------------------------------
# ImageNet through the real imagenet2012 builder
# ----------------------------------------------------------------------------------------
def test_fake_imagenet_reads_back_with_correct_labels(fake_imagenet):
    data_dir, expected = fake_imagenet
    builder = tfds.builder("imagenet2012", data_dir=data_dir)
    for split in ("train", "validation"):
        got = {ex["file_name"].decode(): int(ex["label"])
               for ex in builder.as_dataset(split=split).as_numpy_iterator()}
        assert got == expected[split]
    info = dataset_info("imagenet2012", data_dir)
    assert (info.num_classes, info.num_train, info.num_eval) == (1000, 12, 6)
    batches = list(make_eval_dataset("imagenet2012", data_dir, batch_size=4, image_size=IMG,
                                     crop_pct=0.9).as_numpy_iterator())
    labels = np.concatenate([b["label"][b["mask"] > 0] for b in batches])
    assert sorted(labels.tolist()) == sorted(expected["validation"].values())


def test_missing_dataset_error_message(tmp_path):
    with pytest.raises(DatasetNotFoundError) as err:
        dataset_info("imagenet2012", str(tmp_path))
    msg = str(err.value)
    assert "downloads/manual" in msg and "--data_dir" in msg
    assert "ILSVRC2012_img_train.tar" in msg and "ILSVRC2012_img_val.tar" in msg
    assert not os.path.exists(tmp_path / "downloads" / "manual" / "ILSVRC2012_img_train.tar")
    with pytest.raises(DatasetNotFoundError):
        make_train_dataset("no_such_dataset_xyz", str(tmp_path), global_batch_size=2, image_size=IMG, seed=0,
                           augment=MINIMAL)


# ----------------------------------------------------------------------------------------
# host -> device
# ----------------------------------------------------------------------------------------
def test_device_prefetch_makes_sharded_global_arrays(demo_dir):
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    devices = jax.devices()
    assert len(devices) == 8
    sharding = NamedSharding(Mesh(np.array(devices), ("data",)), P("data"))
    ds = make_eval_dataset("demo", demo_dir, batch_size=64, image_size=IMG, crop_pct=0.9)
    host = list(ds.as_numpy_iterator())
    out = list(device_prefetch(ds, sharding, size=2))
    assert len(out) == len(host)
    for h, d in zip(host, out):
        for k in h:
            assert isinstance(d[k], jax.Array) and d[k].sharding == sharding
            assert len(d[k].addressable_shards) == 8
            np.testing.assert_array_equal(np.asarray(d[k]), h[k])


def test_pipelines_normalise_with_the_given_mean_and_std(demo_dir):
    """mean 0 / std 1 (MobileCLIP mci0-2) gives pixels in [0, 1]; the default gives ImageNet's normalisation."""
    raw = next(make_eval_dataset("demo", demo_dir, batch_size=8, image_size=IMG, crop_pct=0.9, mean=(0, 0, 0),
                                 std=(1, 1, 1)).as_numpy_iterator())["image"]
    imagenet = next(make_eval_dataset("demo", demo_dir, batch_size=8, image_size=IMG,
                                      crop_pct=0.9).as_numpy_iterator())["image"]
    assert 0.0 <= raw.min() and raw.max() <= 1.0 and raw.max() > 0.5
    np.testing.assert_allclose(imagenet, (raw - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD), atol=1e-5)
    train = next(make_train_dataset("demo", demo_dir, global_batch_size=8, image_size=IMG, seed=0,
                                    augment=MINIMAL, mean=(0, 0, 0), std=(1, 1, 1)).as_numpy_iterator())
    assert 0.0 <= train["image"].min() and train["image"].max() <= 1.0


def _image_folder(root, classes=("cat", "dog", "fox"), train=5, val=2, ext=".jpg"):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", train), ("val", val)):
        for c, name in enumerate(classes):
            os.makedirs(root / split / name, exist_ok=True)
            for i in range(count):
                pixels = np.clip(rng.normal(60 + 60 * c, 30, (40 + 8 * i, 48, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i:03d}{ext}")
    (root / "train" / "notes.txt").write_text("not an image, not a class folder")
    return root


def test_image_folder_dataset(tmp_path):
    """--dataset PATH: classes from the sorted train/ folders, files in sorted order, contiguous
    per-process slices, the same pipelines as tfds (exact resume included), one-line layout errors."""
    from fastvit_jax.data.folder import FolderDatasetError, folder_path, load_image_folder

    root = _image_folder(tmp_path / "pets")
    (root / "val" / "cat" / "002.png").write_bytes((root / "val" / "cat" / "000.jpg").read_bytes())  # a PNG name
    assert folder_path(str(root)) == str(root) and folder_path(f"folder:{root}") == str(root)
    assert folder_path("imagenet2012") is None and folder_path("imagenet2012_subset/1pct") is None
    info = dataset_info(str(root), None)
    assert (info.num_classes, info.class_names, info.num_train, info.num_eval, info.eval_split) == \
        (3, ("cat", "dog", "fox"), 15, 7, "val")
    folder = load_image_folder(str(root))
    assert not folder.jpeg and folder.slice_sizes("train", 4) == [4, 4, 4, 3]
    parts = [[(bytes(e["image"]), int(e["label"])) for e in folder.read("train", i, 4).as_numpy_iterator()]
             for i in range(4)]
    assert [label for part in parts for _, label in part] == [0] * 5 + [1] * 5 + [2] * 5

    full = make_train_dataset(str(root), None, global_batch_size=4, image_size=32, seed=3,
                              augment=MINIMAL)
    batches = list(full.take(6).as_numpy_iterator())
    resumed = list(make_train_dataset(str(root), None, global_batch_size=4, image_size=32, seed=3, start_step=4,
                                      augment=MINIMAL).take(2).as_numpy_iterator())
    for a, b in zip(batches[4:], resumed):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    evals = list(make_eval_dataset(str(root), None, batch_size=4, image_size=32, crop_pct=0.9).as_numpy_iterator())
    assert sum(int(b["mask"].sum()) for b in evals) == 7 and evals[0]["image"].shape == (4, 32, 32, 3)

    with pytest.raises(FolderDatasetError, match=r"needs a train/ and a val/ .*; it has \['train'\]"):
        import shutil
        shutil.rmtree(root / "val")
        load_image_folder(str(root))
    with pytest.raises(FolderDatasetError, match="does not exist"):
        load_image_folder(str(tmp_path / "nowhere"))
