"""Embedded, offline demo dataset (``fastvit_demo``).

``fastvit_demo`` is a real tfds ``GeneratorBasedBuilder``: 10 classes of procedurally
drawn shapes/textures (random colours, positions, sizes, background gradients and noise),
real JPEG-encoded RGB images of varied size (64..112 px per side), ``train`` and
``validation`` splits. Generation is deterministic (each example is drawn from
``np.random.default_rng([SEED, split_id, index])``) and needs no network.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import io
import logging
import os
import shutil

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core.utils import tqdm_utils
from PIL import Image

log = logging.getLogger("fastvit_jax.data")

SEED = 20240229
CLASS_NAMES: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "stripes_horizontal",
    "stripes_vertical",
    "checkerboard",
    "ring",
    "cross",
    "stripes_diagonal",
    "dots",
)
DEFAULT_NUM_TRAIN = 3000
DEFAULT_NUM_VAL = 500
MIN_SIDE, MAX_SIDE = 64, 112
JPEG_QUALITY = 80
_SPLIT_IDS = {"train": 0, "validation": 1}


# ----------------------------------------------------------------------------------------
# Procedural drawing (pure numpy, HWC uint8)
# ----------------------------------------------------------------------------------------
def _random_colour_pair(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Background and foreground RGB colours (float, 0..255) at least ~90 apart (L2)."""
    bg = rng.uniform(0, 255, 3)
    for _ in range(20):
        fg = rng.uniform(0, 255, 3)
        if np.linalg.norm(fg - bg) > 90:
            break
    else:
        fg = 255.0 - bg
    return bg, fg


def _shape_mask(label: int, yy: np.ndarray, xx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Boolean (H, W) mask of the foreground for class ``label`` on pixel grids yy, xx."""
    h, w = yy.shape
    s = min(h, w)
    if label in (0, 1, 2, 6, 7):  # object classes: random centre and size
        r = rng.uniform(0.18, 0.38) * s
        cy = rng.uniform(r, h - r)
        cx = rng.uniform(r, w - r)
        dy, dx = yy - cy, xx - cx
        if label == 0:  # circle
            return dy**2 + dx**2 <= r**2
        if label == 1:  # square (axis-aligned)
            return (np.abs(dy) <= r * 0.85) & (np.abs(dx) <= r * 0.85)
        if label == 2:  # upward triangle
            top, bottom = cy - r, cy + r * 0.8
            frac = (yy - top) / (bottom - top)
            return (frac >= 0) & (frac <= 1) & (np.abs(dx) <= frac * r)
        if label == 6:  # ring
            d2 = dy**2 + dx**2
            return (d2 <= r**2) & (d2 >= (r * rng.uniform(0.45, 0.7)) ** 2)
        # cross (plus sign)
        t = r * rng.uniform(0.22, 0.35)
        return ((np.abs(dy) <= t) & (np.abs(dx) <= r)) | ((np.abs(dx) <= t) & (np.abs(dy) <= r))

    # texture classes: fill a random rectangle covering 45..100% of each side
    rh, rw = int(h * rng.uniform(0.45, 1.0)), int(w * rng.uniform(0.45, 1.0))
    y0, x0 = rng.integers(0, h - rh + 1), rng.integers(0, w - rw + 1)
    region = (yy >= y0) & (yy < y0 + rh) & (xx >= x0) & (xx < x0 + rw)
    period = rng.uniform(7, 16)
    phase = rng.uniform(0, period)
    if label == 3:  # horizontal stripes
        pat = ((yy + phase) % period) < period / 2
    elif label == 4:  # vertical stripes
        pat = ((xx + phase) % period) < period / 2
    elif label == 5:  # checkerboard
        pat = (((yy + phase) // (period / 1.4)) + ((xx + phase) // (period / 1.4))) % 2 == 0
    elif label == 8:  # diagonal stripes, either direction
        sign = 1.0 if rng.random() < 0.5 else -1.0
        pat = ((yy + sign * xx + phase) % period) < period / 2
    else:  # dots on a grid
        rad = period * rng.uniform(0.2, 0.32)
        py = (yy + phase) % period - period / 2
        px = (xx + phase) % period - period / 2
        pat = py**2 + px**2 <= rad**2
    return region & pat


def draw_example(label: int, rng: np.random.Generator) -> np.ndarray:
    """Draws one (H, W, 3) uint8 RGB image of class ``label`` (H, W in [64, 112])."""
    h, w = (int(v) for v in rng.integers(MIN_SIDE, MAX_SIDE + 1, size=2))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    bg, fg = _random_colour_pair(rng)
    # background: colour + linear gradient + gaussian noise
    grad_dir = rng.normal(size=2)
    grad = (yy * grad_dir[0] + xx * grad_dir[1]) / max(h, w) * rng.uniform(0, 40)
    img = np.broadcast_to(bg, (h, w, 3)) + grad[..., None]
    mask = _shape_mask(label, yy, xx, rng)
    fg_img = fg + rng.normal(0, 6, 3)  # slight per-image tint
    img = np.where(mask[..., None], fg_img, img)
    img = img + rng.normal(0, rng.uniform(3, 14), size=img.shape)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def encode_jpeg(image: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    """Encodes an (H, W, 3) uint8 array as baseline JPEG bytes (PIL)."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def example_label(split: str, index: int) -> int:
    """Class of example ``index`` of ``split``: balanced, in a deterministic shuffled order."""
    return int(np.random.default_rng([SEED, _SPLIT_IDS[split], index]).integers(0, 10))


def generate_split(split: str, num: int):
    """Yields (key, {'image': jpeg bytes, 'label': int}) for ``num`` examples of ``split``."""
    for i in range(num):
        rng = np.random.default_rng([SEED, _SPLIT_IDS[split], i])
        label = int(rng.integers(0, len(CLASS_NAMES)))
        yield f"{split}_{i:06d}", {"image": encode_jpeg(draw_example(label, rng)), "label": label}


# ----------------------------------------------------------------------------------------
# tfds builder
# ----------------------------------------------------------------------------------------
@dataclasses.dataclass
class FastvitDemoConfig(tfds.core.BuilderConfig):
    """Builder config: number of train / validation examples."""

    num_train: int = DEFAULT_NUM_TRAIN
    num_val: int = DEFAULT_NUM_VAL


def demo_config(num_train: int = DEFAULT_NUM_TRAIN, num_val: int = DEFAULT_NUM_VAL) -> FastvitDemoConfig:
    """Config for the given sizes; the default sizes map to the registered ``default`` config."""
    if (num_train, num_val) == (DEFAULT_NUM_TRAIN, DEFAULT_NUM_VAL):
        return FastvitDemo.BUILDER_CONFIGS[0]
    return FastvitDemoConfig(name=f"n{num_train}_v{num_val}", num_train=num_train, num_val=num_val,
                             description=f"{num_train} train / {num_val} validation examples")


class FastvitDemo(tfds.core.GeneratorBasedBuilder):
    """FastViT demo: 10 classes of procedurally drawn shapes/textures (JPEG, 64-112 px)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [
        FastvitDemoConfig(name="default", description="3000 train / 500 validation examples")
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description="Procedural shapes/textures, 10 classes, offline and deterministic.",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
                "label": tfds.features.ClassLabel(names=list(CLASS_NAMES)),
            }),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        return {
            "train": self._generate_examples("train", self.builder_config.num_train),
            "validation": self._generate_examples("validation", self.builder_config.num_val),
        }

    def _generate_examples(self, split: str, num: int):
        """Yields (key, example) pairs; see :func:`generate_split`."""
        yield from generate_split(split, num)


def demo_builder(data_dir: str, num_train: int = DEFAULT_NUM_TRAIN,
                 num_val: int = DEFAULT_NUM_VAL) -> FastvitDemo:
    """Returns the (possibly not yet prepared) demo builder rooted at ``data_dir``."""
    return FastvitDemo(data_dir=os.fspath(data_dir), config=demo_config(num_train, num_val))


class DatasetPreparationError(RuntimeError):
    """The demo dataset could not be built (a broken folder from an earlier run is in the way)."""


def _remove_incomplete(parent: str) -> None:
    """Deletes ``incomplete.*`` folders that a crashed preparation left next to the version folder."""
    for name in os.listdir(parent):
        path = os.path.join(parent, name)
        if name.startswith("incomplete.") and os.path.isdir(path):
            log.warning("removing %s, left by an interrupted preparation of fastvit_demo", path)
            shutil.rmtree(path, ignore_errors=True)


class _NotYetPrepared(logging.Filter):
    """Drops tfds's warnings about the demo's own folder and config: 'Variant folder ... has no
    dataset_info.json' (not prepared yet) and 'Using custom data configuration' (a non-default size)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return "has no dataset_info.json" not in message and "Using custom data configuration" not in message


@contextlib.contextmanager
def _tfds_quietly():
    """tfds's preparation without its nested progress bars, its 'Downloading and preparing' print and
    the warning about the folder it is about to create (this module logs one line instead)."""
    quiet = _NotYetPrepared()
    absl_logger = logging.getLogger("absl")
    absl_logger.addFilter(quiet)
    was_active = getattr(tqdm_utils, "_active", True)
    tqdm_utils.display_progress_bar(False)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        tqdm_utils.display_progress_bar(was_active)
        absl_logger.removeFilter(quiet)


def prepare_demo(data_dir: str, num_train: int = DEFAULT_NUM_TRAIN, num_val: int = DEFAULT_NUM_VAL) -> None:
    """Builds ``fastvit_demo`` into ``data_dir`` (no-op when already prepared). Offline.

    The default sizes (3000/500, ~4 MB) prepare in a few seconds on 2 CPU cores. Runs
    sharing a data_dir take turns (a file lock): the first prepares, the others find it
    prepared. Temporary ``incomplete.*`` folders of a crashed earlier preparation are removed;
    a version folder that exists but is not a prepared dataset raises DatasetPreparationError
    naming it (tfds would otherwise reuse it as it is).
    """
    with _tfds_quietly():
        _prepare(data_dir, num_train, num_val)


def _prepare(data_dir: str, num_train: int, num_val: int) -> None:
    builder = demo_builder(data_dir, num_train, num_val)
    if builder.is_prepared():
        return
    version_dir = builder.data_dir
    parent = os.path.dirname(version_dir)
    os.makedirs(parent, exist_ok=True)
    with open(os.path.join(parent, ".prepare.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if demo_builder(data_dir, num_train, num_val).is_prepared():  # another run prepared it meanwhile
            return
        _remove_incomplete(parent)
        if os.path.exists(version_dir):
            raise DatasetPreparationError(_broken_message(version_dir, "exists but is not a prepared dataset"))
        log.info("preparing the demo dataset in %s (%d train / %d validation images)", version_dir, num_train,
                 num_val)
        try:
            builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
        except FileExistsError as e:
            if not demo_builder(data_dir, num_train, num_val).is_prepared():
                raise DatasetPreparationError(_broken_message(version_dir, f"could not be written ({e})")) from None
        if not demo_builder(data_dir, num_train, num_val).is_prepared():
            raise DatasetPreparationError(_broken_message(version_dir, "is not a prepared dataset after preparing it"))


def _broken_message(version_dir: str, what: str) -> str:
    return (f"cannot prepare the demo dataset: {version_dir} {what} (left by an interrupted run, or copied in "
            f"part?); delete that folder and rerun")
