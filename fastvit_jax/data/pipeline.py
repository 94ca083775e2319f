"""tf.data input pipelines (train / eval) for tfds image-classification datasets and image folders.

Batches are dicts of numpy-convertible tensors, NHWC:
  train: ``{'image': float32 (B, H, W, 3) ImageNet-normalized, 'label': int32 (B,)}``
  eval:  the same plus ``'mask': float32 (B,)`` (1 = real example, 0 = padding)
with ``B = global_batch_size // process_count`` (per-process batch).

Train augmentation (timm ``transforms_imagenet_train`` order, FastViT recipe defaults):
  fused random-resized-crop + JPEG decode (``tf.image.stateless_sample_distorted_bounding_box``
  with area (0.08, 1) / ratio (3/4, 4/3), 10 attempts, timm-style centre-crop fallback, then
  ``tf.io.decode_and_crop_jpeg``) -> bicubic (antialiased) resize -> horizontal flip 0.5 ->
  RandAugment ``rand-m9-mstd0.5-inc1`` (see :mod:`fastvit_jax.data.randaugment`) ->
  normalize (ImageNet mean/std) -> RandomErasing p=0.25, 'pixel' mode.
  Colour jitter: as in timm, ``color_jitter`` is IGNORED when RandAugment is enabled; it is
  applied (torchvision ColorJitter(b, c, s)) only when ``randaugment`` is None.
  Note: TF samples the crop's aspect ratio uniformly (timm: log-uniform) - a documented,
  minor difference imposed by using the fused TF op.

Determinism / exact resume: the batch sequence is a pure function of
(seed, process_index, process_count) and the step. Records are read in a fixed order
(no file shuffling), shuffled per epoch with a buffer seeded by (seed, process, epoch),
numbered with a per-process element index, and every augmentation draws from
``tf.random.stateless_*`` ops keyed on (seed, process, element index). Resuming at
``start_step`` starts at epoch ``start_step * B // n_local`` and ``skip``s the remaining
offset *before* decoding, so a resumed run yields exactly the batches the original run
produced at steps start_step, start_step + 1, ...
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import os
import re
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from fastvit_jax.data import randaugment as ra
from fastvit_jax.data.folder import FolderDatasetError, folder_path, load_image_folder  # noqa: F401
from fastvit_variants import IMAGENET_MEAN, IMAGENET_STD


def _hide_accelerators_from_tf() -> None:
    """TF is only used for input processing: never let it claim a GPU/TPU."""
    for kind in ("GPU", "TPU"):
        try:
            tf.config.set_visible_devices([], kind)
        except (RuntimeError, ValueError):  # already initialised / kind unknown
            pass


_hide_accelerators_from_tf()

DEMO_NAMES = ("demo", "fastvit_demo")
DEFAULT_SHUFFLE_BUFFER = 10_000


class DatasetNotFoundError(FileNotFoundError):
    """Raised when a requested tfds dataset is not prepared in ``data_dir``."""


class DatasetReadError(ValueError):
    """A prepared dataset's files could not be read (a damaged or missing shard, an undecodable image)."""


# tf.data errors that mean "the prepared files are damaged or gone", with what each means.
_READ_ERRORS = {
    "DataLossError": "a damaged record (truncated or corrupted file)",
    "NotFoundError": "a missing file",
    "InvalidArgumentError": "an undecodable example",
}


def _tf_first_line(error: BaseException) -> str:
    text = str(getattr(error, "message", "") or error).strip().splitlines()
    return re.sub(r"\s*\[Op:\w+\].*$", "", text[0] if text else type(error).__name__)[:300]


def named_read_errors(batches: Iterable[Any], name: str, data_dir: str | None) -> Iterator[Any]:
    """``batches`` with tf.data's read errors turned into one-line ``DatasetReadError``s naming the
    dataset's folder and how to rebuild it."""
    try:
        yield from batches
    except (tf.errors.DataLossError, tf.errors.NotFoundError, tf.errors.InvalidArgumentError) as e:
        images = folder_path(name)
        if images is not None:
            raise DatasetReadError(f"cannot read an image of the --dataset folder {images}: "
                                   f"{_READ_ERRORS[type(e).__name__]} ({_tf_first_line(e)}); remove or replace "
                                   f"that file") from None
        root = _resolve_data_dir(data_dir)
        folder = root if name in DEMO_NAMES else os.path.join(root, name)
        rebuild = ("delete its fastvit_demo folder and rerun: the demo dataset is prepared again" if name in DEMO_NAMES
                   else f"delete its version folder and prepare it again (tfds build {name} --data_dir {root}, "
                        f"with the manual files in {os.path.join(root, 'downloads', 'manual')})")
        raise DatasetReadError(
            f"cannot read dataset {name!r} in {folder}: {_READ_ERRORS[type(e).__name__]} "
            f"({_tf_first_line(e)}); its prepared files are damaged or incomplete: {rebuild}") from None


def _not_found_message(name: str, data_dir: str | None, reason: str) -> str:
    d = data_dir or "<data_dir>"
    return (
        f"Dataset {name!r} is not available in data_dir={data_dir!r} ({reason}).\n"
        "Nothing is downloaded at run time. To prepare ImageNet-1k (imagenet2012):\n"
        f"  1. put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in {d}/downloads/manual\n"
        f"  2. run `tfds build imagenet2012 --data_dir {d}` (or in python: "
        f"tfds.builder('imagenet2012', data_dir='{d}').download_and_prepare())\n"
        f"  3. pass `--data_dir {d}` to the trainer.\n"
        "Other tfds datasets: prepare them the same way with `tfds build <name> --data_dir ...`. "
        "Use name 'demo' for the embedded offline demo dataset."
    )


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a prepared dataset (sizes are whole-split, all processes)."""

    name: str
    num_classes: int
    train_split: str
    eval_split: str
    num_train: int
    num_eval: int
    class_names: tuple[str, ...] = ()  # label i is class_names[i] (empty when the dataset names none)


@dataclasses.dataclass(frozen=True)
class TrainAugment:
    """Train-time augmentation settings (timm names/semantics); the values are the caller's
    (``training.trainer.train_augment(config)`` makes the recipe's from a ``TrainConfig``).

    ``color_jitter`` only applies when ``randaugment`` is None (timm behaviour).
    """

    randaugment: str | None
    random_erase_prob: float
    color_jitter: float
    rrc_scale: tuple[float, float]
    hflip: float


# ----------------------------------------------------------------------------------------
# builders / dataset info
# ----------------------------------------------------------------------------------------
def _resolve_data_dir(data_dir: str | None) -> str:
    return os.fspath(data_dir) if data_dir else os.environ.get("TFDS_DATA_DIR", tfds.core.constants.DATA_DIR)


def get_builder(name: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
    """Returns a prepared tfds builder; 'demo' is prepared on first use; never downloads.

    Raises DatasetNotFoundError if ``name`` is unknown or not prepared in ``data_dir``.
    """
    data_dir = _resolve_data_dir(data_dir)
    if name in DEMO_NAMES:
        from fastvit_jax.data.demo import demo_builder, prepare_demo

        prepare_demo(data_dir)
        return demo_builder(data_dir)
    try:
        builder = tfds.builder(name, data_dir=data_dir, try_gcs=False)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise DatasetNotFoundError(_not_found_message(name, data_dir, f"unknown tfds name: {e}")) from e
    if not builder.is_prepared():
        raise DatasetNotFoundError(_not_found_message(name, data_dir, "not prepared"))
    return builder


def _eval_split_name(splits: Iterable[str]) -> str:
    splits = list(splits)
    for cand in ("validation", "test"):
        if cand in splits:
            return cand
    raise DatasetNotFoundError(f"No 'validation' or 'test' split among {splits}")


def prepare_dataset(name: str, data_dir: str | None) -> None:
    """Makes ``name`` readable: builds the demo dataset on first use, checks a tfds dataset is prepared
    and an image folder has its layout (DatasetNotFoundError / FolderDatasetError otherwise)."""
    path = folder_path(name)
    if path is not None:
        load_image_folder(path)
    else:
        get_builder(name, data_dir)


def dataset_info(name: str, data_dir: str | None) -> DatasetInfo:
    """Class count and names, split names and sizes of a prepared dataset ('demo' = fastvit_demo) or folder."""
    path = folder_path(name)
    if path is not None:
        folder = load_image_folder(path)
        return DatasetInfo(name=folder.root, num_classes=len(folder.class_names), train_split="train",
                           eval_split=folder.eval_split, num_train=folder.num_examples("train"),
                           num_eval=folder.num_examples(folder.eval_split), class_names=folder.class_names)
    builder = get_builder(name, data_dir)
    info = builder.info
    for feat in ("image", "label"):
        if feat not in info.features:
            raise ValueError(f"{name!r} lacks an {feat!r} feature; need an image-classification dataset")
    eval_split = _eval_split_name(info.splits.keys())
    return DatasetInfo(
        name=builder.name,
        num_classes=int(info.features["label"].num_classes),
        train_split="train",
        eval_split=eval_split,
        num_train=int(info.splits["train"].num_examples),
        num_eval=int(info.splits[eval_split].num_examples),
        class_names=tuple(info.features["label"].names),
    )


def eval_image_size(image_size: int, crop_pct: float) -> tuple[int, int]:
    """timm eval sizes: (resize of the shorter side, centre-crop size) = (floor(S / crop_pct), S)."""
    return int(image_size / crop_pct), int(image_size)


def _read_split(builder: tfds.core.DatasetBuilder, split: str) -> tf.data.Dataset:
    """Encoded examples ``{'image': string, 'label': int64}`` in a fixed (file) order."""
    read_config = tfds.ReadConfig(skip_prefetch=True, try_autocache=False, add_tfds_id=False,
                                  interleave_cycle_length=1)
    ds = builder.as_dataset(split=split, shuffle_files=False, read_config=read_config,
                            decoders={"image": tfds.decode.SkipDecoding()})
    return ds.map(lambda ex: {"image": ex["image"], "label": ex["label"]})


def _is_jpeg(builder: tfds.core.DatasetBuilder) -> bool:
    return getattr(builder.info.features["image"], "encoding_format", None) == "jpeg"


def _split_slices(name: str, data_dir: str | None, which: str, process_index: int,
                  process_count: int) -> tuple[tf.data.Dataset, list[int], bool]:
    """(this process's encoded examples in a fixed order, every process's slice size, all JPEG?) of the
    'train' or 'eval' split of a tfds dataset or an image folder."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    path = folder_path(name)
    if path is not None:
        folder = load_image_folder(path)
        split = "train" if which == "train" else folder.eval_split
        return (folder.read(split, process_index, process_count), folder.slice_sizes(split, process_count),
                folder.jpeg)
    builder = get_builder(name, data_dir)
    split = "train" if which == "train" else _eval_split_name(builder.info.splits.keys())
    slices = tfds.even_splits(split, process_count)
    sizes = [int(builder.info.splits[s].num_examples) for s in slices]
    return _read_split(builder, slices[process_index]), sizes, _is_jpeg(builder)


# ----------------------------------------------------------------------------------------
# per-example ops (image float32 HWC)
# ----------------------------------------------------------------------------------------
def normalize(image: tf.Tensor, mean: tuple = IMAGENET_MEAN, std: tuple = IMAGENET_STD) -> tf.Tensor:
    """(H, W, 3) float 0..255 -> (image / 255 - mean) / std, float32 (ImageNet mean/std by default)."""
    mean = tf.constant(mean, tf.float32) * 255.0
    std = tf.constant(std, tf.float32) * 255.0
    return (image - mean) / std


def _as_uint8_values(image: tf.Tensor) -> tf.Tensor:
    """Round + clip a float image to integral 0..255 values (what PIL would store)."""
    return tf.clip_by_value(tf.round(image), 0.0, 255.0)


INTERPOLATIONS = ("bicubic", "bilinear")


def _resize_bicubic(image: tf.Tensor, size: tf.Tensor | tuple[int, int], method: str = "bicubic") -> tf.Tensor:
    """Antialiased resize (PIL-like; bicubic unless ``method`` says bilinear) to ``size`` = (h, w); 0..255 floats."""
    if method not in INTERPOLATIONS:
        raise ValueError(f"unknown interpolation {method!r}; supported: {', '.join(INTERPOLATIONS)}")
    return _as_uint8_values(tf.image.resize(image, size, method=method, antialias=True))


def decode_image(encoded: tf.Tensor, jpeg: bool) -> tf.Tensor:
    """Encoded bytes -> uint8 (H, W, 3); ``jpeg`` selects the JPEG decoder, else any format TF reads.

    JPEGs use the accurate integer IDCT, which decodes bit-identically to PIL (timm's loader);
    TF's default fast IDCT differs from it by up to ~6 grey levels.
    """
    if jpeg:
        return tf.io.decode_jpeg(encoded, channels=3, dct_method="INTEGER_ACCURATE")
    img = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    return tf.ensure_shape(img, [None, None, 3])


def _image_shape(encoded: tf.Tensor, jpeg: bool) -> tf.Tensor:
    if jpeg:
        return tf.io.extract_jpeg_shape(encoded)[:2]
    return tf.shape(decode_image(encoded, jpeg))[:2]


def random_resized_crop_decode(encoded: tf.Tensor, key: tf.Tensor, image_size: int,
                               scale: tuple[float, float], jpeg: bool = True) -> tf.Tensor:
    """Fused sample-crop + decode + bicubic resize. Returns float32 (S, S, 3) in 0..255.

    Crop sampling: ``stateless_sample_distorted_bounding_box`` (area ``scale``, ratio
    (3/4, 4/3), 10 attempts). If it fails (returns the whole image) we use timm's fallback:
    the largest centred crop whose aspect ratio is clamped into (3/4, 4/3).
    """
    shape = _image_shape(encoded, jpeg)
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.concat([shape, [3]], 0), bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]), seed=key,
        min_object_covered=0.0, aspect_ratio_range=(3.0 / 4.0, 4.0 / 3.0), area_range=scale,
        max_attempts=10, use_image_if_no_bounding_boxes=True)
    h, w = shape[0], shape[1]
    # timm fallback centre crop
    hf, wf = tf.cast(h, tf.float32), tf.cast(w, tf.float32)
    in_ratio = wf / hf
    fw = tf.where(in_ratio > 4.0 / 3.0, tf.round(hf * 4.0 / 3.0), wf)
    fh = tf.where(in_ratio < 3.0 / 4.0, tf.round(wf / (3.0 / 4.0)), hf)
    fh, fw = tf.cast(tf.minimum(fh, hf), tf.int32), tf.cast(tf.minimum(fw, wf), tf.int32)
    failed = (size[0] == h) & (size[1] == w)
    oy = tf.where(failed, (h - fh) // 2, begin[0])
    ox = tf.where(failed, (w - fw) // 2, begin[1])
    ch = tf.where(failed, fh, size[0])
    cw = tf.where(failed, fw, size[1])
    if jpeg:
        crop = tf.io.decode_and_crop_jpeg(encoded, tf.stack([oy, ox, ch, cw]), channels=3)
    else:
        crop = tf.image.crop_to_bounding_box(decode_image(encoded, jpeg), oy, ox, ch, cw)
    crop = tf.cast(crop, tf.float32)
    return tf.ensure_shape(_resize_bicubic(crop, (image_size, image_size)), [image_size, image_size, 3])


def train_preprocess(encoded: tf.Tensor, key: tf.Tensor, *, image_size: int, augment: TrainAugment,
                     jpeg: bool = True, mean: tuple = IMAGENET_MEAN, std: tuple = IMAGENET_STD) -> tf.Tensor:
    """Encoded image bytes + (2,) stateless key -> float32 (S, S, 3) normalized with ``mean``/``std``, augmented."""
    keys = tf.random.experimental.stateless_split(key, num=5)
    image = random_resized_crop_decode(encoded, keys[0], image_size, tuple(augment.rrc_scale), jpeg)
    if augment.hflip > 0:
        flip = tf.random.stateless_uniform([], seed=keys[1]) < augment.hflip
        image = tf.where(flip, image[:, ::-1, :], image)
    if augment.randaugment:
        image = ra.rand_augment(image, keys[2], ra.parse_randaugment(augment.randaugment))
    elif augment.color_jitter and augment.color_jitter > 0:
        image = ra.color_jitter(image, keys[2], float(augment.color_jitter))
    image = normalize(image, mean, std)
    if augment.random_erase_prob > 0:
        image = ra.random_erase(image, keys[3], augment.random_erase_prob)
    return image


def eval_resize_crop(image: tf.Tensor, *, image_size: int, crop_pct: float, mean: tuple = IMAGENET_MEAN,
                     std: tuple = IMAGENET_STD, interpolation: str = "bicubic") -> tf.Tensor:
    """The evaluation transform on a decoded image: uint8 (H, W, 3) -> float32 (S, S, 3), normalized.

    Resize the shorter side to ``int(S / crop_pct)`` (antialiased ``interpolation``, rounded to
    uint8 values as PIL stores them), centre-crop S x S, normalize with ``mean``/``std``. The
    trainer's validation pipeline and ``fastvit_jax.transforms.eval_transform`` both call this.
    """
    resize, crop = eval_image_size(image_size, crop_pct)
    image = tf.cast(image, tf.float32)
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    short = tf.minimum(h, w)
    # torchvision Resize(int): short side -> resize, long side -> int(resize * long / short)
    new_h = tf.where(h == short, resize, tf.cast(resize * h / short, tf.int32))
    new_w = tf.where(w == short, resize, tf.cast(resize * w / short, tf.int32))
    image = _resize_bicubic(image, tf.stack([new_h, new_w]), interpolation)
    top = tf.cast(tf.round(tf.cast(new_h - crop, tf.float32) / 2.0), tf.int32)
    left = tf.cast(tf.round(tf.cast(new_w - crop, tf.float32) / 2.0), tf.int32)
    image = image[top:top + crop, left:left + crop, :]
    return tf.ensure_shape(normalize(image, mean, std), [crop, crop, 3])


def eval_preprocess(encoded: tf.Tensor, *, image_size: int, crop_pct: float, jpeg: bool = True,
                    mean: tuple = IMAGENET_MEAN, std: tuple = IMAGENET_STD,
                    interpolation: str = "bicubic") -> tf.Tensor:
    """Decode, then ``eval_resize_crop``. Returns float32 (S, S, 3)."""
    return eval_resize_crop(decode_image(encoded, jpeg), image_size=image_size, crop_pct=crop_pct, mean=mean, std=std,
                            interpolation=interpolation)


# ----------------------------------------------------------------------------------------
# datasets
# ----------------------------------------------------------------------------------------
def _process_split(split: str, process_index: int, process_count: int) -> Any:
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    return tfds.even_splits(split, process_count)[process_index]


def _deterministic(ds: tf.data.Dataset) -> tf.data.Dataset:
    opts = tf.data.Options()
    opts.deterministic = True
    return ds.with_options(opts)


def _element_key(seed: int, process_index: int, process_count: int, index: tf.Tensor) -> tf.Tensor:
    """(2,) int64 stateless key for element ``index`` of this process's stream."""
    base = tf.constant([seed, process_count], tf.int64)
    base = tf.random.experimental.stateless_fold_in(base, process_index)
    return tf.random.experimental.stateless_fold_in(base, index)


def make_train_dataset(name: str, data_dir: str | None, *, global_batch_size: int, image_size: int,
                       seed: int, start_step: int = 0, process_index: int = 0, process_count: int = 1,
                       augment: TrainAugment,
                       shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER, mean: tuple = IMAGENET_MEAN,
                       std: tuple = IMAGENET_STD) -> tf.data.Dataset:
    """Infinite per-process train batches ``{'image': f32 (B,S,S,3), 'label': i32 (B,)}``.

    Images are normalised with ``mean``/``std`` (the model's ``pretrained_cfg``; ImageNet's by default).

    B = global_batch_size // process_count. Batch k of this dataset is batch
    ``start_step + k`` of the run started at step 0 (exact, see module docstring).
    """
    if global_batch_size % process_count:
        raise ValueError(f"global_batch_size {global_batch_size} not divisible by {process_count}")
    local_batch = global_batch_size // process_count
    raw, sizes, jpeg = _split_slices(name, data_dir, "train", process_index, process_count)
    n_local = sizes[process_index]
    if n_local == 0:
        raise ValueError(f"process {process_index} has no train examples")
    buffer = max(1, min(shuffle_buffer, n_local))
    shuffle_base = tf.constant([seed, 1_000_003 * process_count + process_index], tf.int64)

    def epoch_ds(epoch: tf.Tensor) -> tf.data.Dataset:
        ep_seed = tf.random.experimental.stateless_fold_in(shuffle_base, epoch)[0]
        ds = raw.shuffle(buffer, seed=ep_seed, reshuffle_each_iteration=False).enumerate()
        return ds.map(lambda i, ex: (epoch * n_local + i, ex))

    start_elem = start_step * local_batch
    start_epoch, offset = divmod(start_elem, n_local)
    ds = tf.data.Dataset.range(start_epoch, np.iinfo(np.int64).max).flat_map(epoch_ds)
    ds = ds.skip(offset)  # cheap: records are still encoded bytes here

    def _map(index: tf.Tensor, ex: dict) -> dict:
        key = _element_key(seed, process_index, process_count, index)
        image = train_preprocess(ex["image"], key, image_size=image_size, augment=augment, jpeg=jpeg, mean=mean,
                                 std=std)
        return {"image": image, "label": tf.cast(ex["label"], tf.int32)}

    ds = ds.map(_map, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(local_batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    return _deterministic(ds)


def make_eval_dataset(name: str, data_dir: str | None, *, batch_size: int, image_size: int,
                      crop_pct: float, process_index: int = 0, process_count: int = 1, mean: tuple = IMAGENET_MEAN,
                      std: tuple = IMAGENET_STD, interpolation: str = "bicubic") -> tf.data.Dataset:
    """One pass over this process's slice of the eval split, padded to full batches (``eval_preprocess``
    with ``mean``/``std`` and ``interpolation``, ImageNet's bicubic by default: pass the model's
    ``pretrained_cfg``).

    Yields ``{'image': f32 (B,S,S,3), 'label': i32 (B,), 'mask': f32 (B,)}`` with
    ``B = batch_size // process_count`` (``batch_size`` is global). Every process yields
    the same number of batches (ceil(max slice / B)); padding rows have mask 0, label 0 and
    zero images, so ``sum(metric * mask)`` over all batches is exact over the split.
    """
    if batch_size % process_count:
        raise ValueError(f"batch_size {batch_size} not divisible by {process_count}")
    local_batch = batch_size // process_count
    raw, sizes, jpeg = _split_slices(name, data_dir, "eval", process_index, process_count)
    n_local = sizes[process_index]
    num_batches = -(-max(sizes) // local_batch)
    pad = num_batches * local_batch - n_local
    _, crop = eval_image_size(image_size, crop_pct)

    def _map(ex: dict) -> dict:
        image = eval_preprocess(ex["image"], image_size=image_size, crop_pct=crop_pct, jpeg=jpeg, mean=mean, std=std,
                                interpolation=interpolation)
        return {"image": image, "label": tf.cast(ex["label"], tf.int32), "mask": tf.constant(1.0)}

    ds = raw.map(_map, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if pad:
        filler = {"image": tf.zeros([crop, crop, 3], tf.float32), "label": tf.constant(0, tf.int32),
                  "mask": tf.constant(0.0)}
        ds = ds.concatenate(tf.data.Dataset.from_tensors(filler).repeat(pad))
    ds = ds.batch(local_batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    return _deterministic(ds)


# ----------------------------------------------------------------------------------------
# host -> device
# ----------------------------------------------------------------------------------------
def device_prefetch(iterator: Iterable[Any], sharding: Any, size: int = 2) -> Iterator[Any]:
    """Turns per-process numpy batches into global ``jax.Array``s, ``size`` batches ahead.

    ``iterator``: iterable of pytrees of per-process arrays (a ``tf.data.Dataset`` is
    converted with ``as_numpy_iterator``). ``sharding``: one ``jax.sharding.Sharding`` for
    every leaf (e.g. ``NamedSharding(mesh, P('data'))``) or a pytree of them matching the
    batch. Each leaf goes through ``jax.make_array_from_process_local_data``.
    """
    import jax

    if isinstance(iterator, tf.data.Dataset):
        iterator = iterator.as_numpy_iterator()
    iterator = iter(iterator)

    def _to_global(batch: Any) -> Any:
        if isinstance(sharding, jax.sharding.Sharding):
            return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)
        return jax.tree.map(lambda s, x: jax.make_array_from_process_local_data(s, np.asarray(x)),
                            sharding, batch)

    queue: collections.deque = collections.deque()

    def _enqueue(n: int) -> None:
        for batch in itertools.islice(iterator, n):
            queue.append(_to_global(batch))

    _enqueue(size)
    while queue:
        yield queue.popleft()
        _enqueue(1)
