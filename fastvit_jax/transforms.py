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

from fastvit_jax.variants import PretrainedCfg

ImageInput = Union[str, os.PathLike, bytes, np.ndarray, Any]  # Any: a PIL.Image.Image

_JPEG_MAGIC = b"\xff\xd8\xff"


class ImageReadError(ValueError):
    """An input that is not a readable image; the message names it."""


def _describe(image: Any) -> str:
    if isinstance(image, (str, os.PathLike)):
        return os.fspath(image)
    return f"<{type(image).__name__}>"


def _decoded(image: ImageInput):
    """One input -> uint8 (H, W, 3) tf.Tensor."""
    import tensorflow as tf

    from fastvit_jax.data.pipeline import decode_image

    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        if not os.path.isfile(path):
            raise ImageReadError("no such image file")
        with open(path, "rb") as f:
            image = f.read()
    if isinstance(image, bytes):
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
    return tf.constant(array)


def _as_list(images: Any) -> List[ImageInput]:
    if isinstance(images, (list, tuple)):
        return list(images)
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return list(images)
    return [images]


def eval_transform(cfg: Union[PretrainedCfg, Any]) -> Callable[[Any], np.ndarray]:
    """The evaluation transform of ``cfg`` (a ``PretrainedCfg``, or a model carrying ``pretrained_cfg``).

    The returned function maps one image or a sequence of images (path, bytes, PIL image,
    uint8 HWC array, or a uint8 NHWC batch) to a float32 ``(B, S, S, 3)`` numpy array, S =
    ``cfg.input_size[-1]``: shorter side resized to ``int(S / crop_pct)`` (antialiased,
    ``cfg.interpolation``), centre crop, ``(x / 255 - mean) / std``. Raises ``ImageReadError``
    naming an input that cannot be read.
    """
    cfg = getattr(cfg, "pretrained_cfg", None) or cfg
    if not isinstance(cfg, PretrainedCfg):
        raise TypeError(f"eval_transform needs a PretrainedCfg or a model with one, got {type(cfg).__name__}")
    from fastvit_jax.data.pipeline import INTERPOLATIONS, eval_resize_crop

    if cfg.interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation {cfg.interpolation!r} is not supported; use one of {INTERPOLATIONS}")

    def transform_one(image: ImageInput) -> np.ndarray:
        try:
            decoded = _decoded(image)
        except ImageReadError as e:
            raise ImageReadError(f"{_describe(image)}: {e}") from None
        out = eval_resize_crop(decoded, image_size=cfg.image_size, crop_pct=cfg.crop_pct, mean=cfg.mean, std=cfg.std,
                               interpolation=cfg.interpolation)
        return out.numpy()

    def transform(images: Union[ImageInput, Sequence[ImageInput]]) -> np.ndarray:
        return np.stack([transform_one(image) for image in _as_list(images)])

    return transform
