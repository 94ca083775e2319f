"""The evaluation transform of a model's data config, for images from anywhere.

``eval_transform(cfg)`` returns a function taking one image or a list of them (a file path,
encoded bytes, a PIL image, or a uint8 HWC / NHWC array) and returning the float32 NHWC batch
the model expects. The resize / crop / normalisation is ``fastvit_jax.data.pipeline.eval_resize_crop``,
the same TensorFlow ops as the trainer's validation pipeline, so a JPEG gives the same array
here as in ``train_tpu.py --eval_only``.
"""

from __future__ import annotations

import os
import re
from typing import Any, Callable, List, Sequence, Union

import numpy as np

from fastvit_variants import PretrainedCfg

ImageInput = Union[str, os.PathLike, bytes, np.ndarray, Any]  # Any: a PIL.Image.Image

_JPEG_MAGIC = b"\xff\xd8\xff"
# Images are checked from their header before decoding: a few KB of PNG can describe a
# 20000 x 20000 image (400 MP) or a 1 x 5000 strip whose resize to the model's size needs
# gigabytes. Defaults: PIL's decompression-bomb limit, and a generous aspect ratio.
MAX_IMAGE_PIXELS = 89_478_485
MAX_ASPECT_RATIO = 20.0


class ImageReadError(ValueError):
    """An input that is not a readable image; the message names it."""


def _describe(image: Any) -> str:
    if isinstance(image, (str, os.PathLike)):
        return os.fspath(image)
    return f"<{type(image).__name__}>"


def check_image_size(width: int, height: int, max_pixels: int = MAX_IMAGE_PIXELS,
                     max_aspect_ratio: float = MAX_ASPECT_RATIO) -> None:
    """ImageReadError when an image is too large or too elongated to decode and resize safely."""
    if width < 1 or height < 1:
        raise ImageReadError(f"the image header says {width} x {height} pixels")
    if width * height > max_pixels:
        raise ImageReadError(f"the image is {width} x {height} = {width * height / 1e6:.0f} megapixels, more than "
                             f"the {max_pixels / 1e6:.0f} MP allowed (--max_image_pixels)")
    ratio = max(width, height) / min(width, height)
    if ratio > max_aspect_ratio:
        raise ImageReadError(f"the image is {width} x {height}, an aspect ratio of {ratio:.0f}:1, more than the "
                             f"{max_aspect_ratio:g}:1 allowed (--max_aspect_ratio)")


def _header_size(data: "bytes | str") -> tuple:
    """(width, height) from an encoded image's header (bytes, or a path: only the header is read),
    without decoding its pixels."""
    import io

    from PIL import Image, UnidentifiedImageError

    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # only the header is read: our own check follows
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as header:
            return header.size
    except UnidentifiedImageError:
        raise ImageReadError("cannot decode the image: not a JPEG, PNG, GIF, BMP or WebP file") from None
    except Exception as e:  # noqa: BLE001 - PIL raises many types for damaged headers
        raise ImageReadError(f"cannot read the image header: {e}") from None
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def _decoded(image: ImageInput, max_pixels: int = MAX_IMAGE_PIXELS, max_aspect_ratio: float = MAX_ASPECT_RATIO):
    """One input -> uint8 (H, W, 3) tf.Tensor (encoded inputs are size-checked from their header first)."""
    import tensorflow as tf

    from fastvit_jax.data.pipeline import decode_image

    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        if not os.path.isfile(path):
            raise ImageReadError("no such image file")
        check_image_size(*_header_size(path), max_pixels, max_aspect_ratio)  # before the file is read
        with open(path, "rb") as f:
            image = f.read()
    if isinstance(image, bytes):
        check_image_size(*_header_size(image), max_pixels, max_aspect_ratio)
        try:
            return decode_image(tf.constant(image), jpeg=image.startswith(_JPEG_MAGIC))
        except (tf.errors.InvalidArgumentError, tf.errors.UnknownError) as e:
            reason = re.sub(r"\{\{.*?\}\}\s*|\s*\[Op:.*$", "", e.message.strip().splitlines()[0])
            raise ImageReadError(f"cannot decode the image: {reason}") from None
    if hasattr(image, "convert") and hasattr(image, "size"):  # PIL image
        image = np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[-1] != 3 or array.dtype != np.uint8:
        raise ImageReadError(f"expected a uint8 (H, W, 3) RGB image, got dtype {array.dtype} shape {array.shape}")
    check_image_size(array.shape[1], array.shape[0], max_pixels, max_aspect_ratio)  # its resize must fit too
    return tf.constant(array)


def _as_list(images: Any) -> List[ImageInput]:
    if isinstance(images, (list, tuple)):
        return list(images)
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return list(images)
    return [images]


def eval_transform(cfg: Union[PretrainedCfg, Any], *, max_pixels: int = MAX_IMAGE_PIXELS,
                   max_aspect_ratio: float = MAX_ASPECT_RATIO) -> Callable[[Any], np.ndarray]:
    """The evaluation transform of ``cfg`` (a ``PretrainedCfg``, or a model carrying ``pretrained_cfg``).

    The returned function maps one image or a sequence of images (path, bytes, PIL image,
    uint8 HWC array, or a uint8 NHWC batch) to a float32 ``(B, S, S, 3)`` numpy array, S =
    ``cfg.input_size[-1]``: shorter side resized to ``int(S / crop_pct)`` (antialiased,
    ``cfg.interpolation``), centre crop, ``(x / 255 - mean) / std``. Raises ``ImageReadError``
    naming an input that cannot be read, or whose header describes more than ``max_pixels`` pixels or
    an aspect ratio above ``max_aspect_ratio`` (refused before decoding).
    """
    cfg = getattr(cfg, "pretrained_cfg", None) or cfg
    if not isinstance(cfg, PretrainedCfg):
        raise TypeError(f"eval_transform needs a PretrainedCfg or a model with one, got {type(cfg).__name__}")
    from fastvit_jax.data.pipeline import INTERPOLATIONS, eval_resize_crop

    if cfg.interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation {cfg.interpolation!r} is not supported; use one of {INTERPOLATIONS}")

    def transform_one(image: ImageInput) -> np.ndarray:
        try:
            decoded = _decoded(image, max_pixels, max_aspect_ratio)
        except ImageReadError as e:
            raise ImageReadError(f"{_describe(image)}: {e}") from None
        out = eval_resize_crop(decoded, image_size=cfg.image_size, crop_pct=cfg.crop_pct, mean=cfg.mean, std=cfg.std,
                               interpolation=cfg.interpolation)
        return out.numpy()

    def transform(images: Union[ImageInput, Sequence[ImageInput]]) -> np.ndarray:
        return np.stack([transform_one(image) for image in _as_list(images)])

    return transform
