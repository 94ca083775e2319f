"""timm-style RandAugment, RandomErasing and ColorJitter as stateless TensorFlow ops.

All randomness comes from ``tf.random.stateless_*`` ops seeded by a ``(2,)`` int64 key, so
the result is a pure function of (image, key) - needed for exact resume of the input
pipeline. Images are float32 ``(H, W, 3)``; RandAugment and colour jitter work on the
0..255 range and emulate PIL's uint8 arithmetic (each op ends with floor/round + clip),
random erasing works on the normalized image.

RandAugment follows timm ``auto_augment.py`` (``rand_augment_transform``):
``rand-m{M}-n{N}-mstd{S}-mmax{X}-inc{0|1}-p{P}``; per image ``N`` ops (default 2) are
drawn uniformly *with replacement* from the op set, each is applied with probability
``P`` (default 0.5) at magnitude ``gauss(M, S)`` clipped to ``[0, X]`` (X default 10).
``inc1`` selects timm's ``_RAND_INCREASING_TRANSFORMS``: AutoContrast, Equalize, Invert,
Rotate, PosterizeIncreasing, SolarizeIncreasing, SolarizeAdd, ColorIncreasing,
ContrastIncreasing, BrightnessIncreasing, SharpnessIncreasing, ShearX, ShearY,
TranslateXRel, TranslateYRel. All 15 ops are implemented. Level-to-argument maps are
timm's (rotate 30 deg, shear 0.3, translate 0.45 of the side, enhance factor
``1 +- 0.9 m/10`` for inc ops, posterize ``4 - int(4 m/10)`` bits, solarize threshold
``256 - int(256 m/10)``, solarize-add ``int(110 m/10)``), and the fill colour of
geometric ops is the ImageNet mean in uint8 (124, 116, 104) as in timm's train transform.

Known differences from timm/PIL (documented, deliberate):
  * geometric ops (Rotate/Shear/Translate) resample with BILINEAR interpolation
    (``ImageProjectiveTransformV3`` has no bicubic); timm uses the train interpolation
    (bicubic). Pixel-centre conventions can differ from PIL by half a pixel.
  * the ``w`` (op-weights) config key is not supported (timm's default has no weights).
"""

from __future__ import annotations

import dataclasses
import math

import tensorflow as tf

LEVEL_DENOM = 10.0
FILL_UINT8 = (124.0, 116.0, 104.0)  # timm: round(255 * IMAGENET_DEFAULT_MEAN)
_TRANSLATE_PCT = 0.45

INCREASING_OPS: tuple[str, ...] = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing",
    "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing",
    "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY",
    "TranslateXRel", "TranslateYRel",
)
DEFAULT_OPS: tuple[str, ...] = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd",
    "Color", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel",
    "TranslateYRel",
)


@dataclasses.dataclass(frozen=True)
class RandAugmentConfig:
    """Parsed ``rand-...`` spec (timm semantics)."""

    num_layers: int = 2
    magnitude: float = 9.0
    magnitude_std: float = 0.0
    magnitude_max: float = LEVEL_DENOM
    increasing: bool = False
    prob: float = 0.5

    @property
    def ops(self) -> tuple[str, ...]:
        return INCREASING_OPS if self.increasing else DEFAULT_OPS


def parse_randaugment(spec: str) -> RandAugmentConfig:
    """Parses a timm RandAugment string, e.g. ``'rand-m9-mstd0.5-inc1'``."""
    parts = spec.split("-")
    if parts[0] != "rand":
        raise ValueError(f"RandAugment spec must start with 'rand': {spec!r}")
    kw: dict = {}
    for part in parts[1:]:
        if part.startswith("mstd"):
            kw["magnitude_std"] = float(part[4:])
        elif part.startswith("mmax"):
            kw["magnitude_max"] = float(part[4:])
        elif part.startswith("inc"):
            kw["increasing"] = bool(int(part[3:]))
        elif part.startswith("m"):
            kw["magnitude"] = float(part[1:])
        elif part.startswith("n"):
            kw["num_layers"] = int(part[1:])
        elif part.startswith("p"):
            kw["prob"] = float(part[1:])
        else:
            raise ValueError(f"Unsupported RandAugment key {part!r} in {spec!r}")
    return RandAugmentConfig(**kw)


# ----------------------------------------------------------------------------------------
# helpers (image: float32 (H, W, 3) in 0..255, integral values)
# ----------------------------------------------------------------------------------------
def _to_uint8_range(x: tf.Tensor) -> tf.Tensor:
    """PIL-style truncation: clip to [0, 255] then floor."""
    return tf.floor(tf.clip_by_value(x, 0.0, 255.0))


def _blend(degenerate: tf.Tensor, image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """PIL ``Image.blend(degenerate, image, factor)`` (ImageEnhance semantics)."""
    return _to_uint8_range(degenerate + factor * (image - degenerate))


def _grayscale(image: tf.Tensor) -> tf.Tensor:
    """PIL ``convert('L')``: (H, W, 1), ITU-R 601-2 luma, rounded."""
    w = tf.constant([0.299, 0.587, 0.114], tf.float32)
    return tf.round(tf.reduce_sum(image * w, axis=-1, keepdims=True))


def _random_sign(key: tf.Tensor) -> tf.Tensor:
    """+1 or -1 with equal probability (timm ``_randomly_negate``)."""
    u = tf.random.stateless_uniform([], seed=key)
    return tf.where(u < 0.5, -1.0, 1.0)


def _affine(image: tf.Tensor, transform: tf.Tensor) -> tf.Tensor:
    """Applies an output->input affine map ``[a0,a1,a2,b0,b1,b2]`` (PIL convention),
    bilinear, filling outside pixels with the ImageNet-mean colour."""
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    ones = tf.ones_like(image[..., :1])
    stacked = tf.concat([image, ones], axis=-1)[None]
    t = tf.concat([tf.cast(transform, tf.float32), tf.zeros([2], tf.float32)], 0)[None]
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=stacked, transforms=t, output_shape=tf.stack([h, w]), fill_value=0.0,
        interpolation="BILINEAR", fill_mode="CONSTANT")[0]
    rgb, valid = out[..., :3], out[..., 3:]
    fill = tf.constant(FILL_UINT8, tf.float32)
    return tf.clip_by_value(tf.round(rgb + (1.0 - valid) * fill), 0.0, 255.0)


# ----------------------------------------------------------------------------------------
# ops: (image, level_arg) -> image
# ----------------------------------------------------------------------------------------
def auto_contrast(image: tf.Tensor) -> tf.Tensor:
    """PIL ``ImageOps.autocontrast`` (cutoff 0), per channel."""
    lo = tf.reduce_min(image, axis=[0, 1])
    hi = tf.reduce_max(image, axis=[0, 1])
    scale = 255.0 / tf.maximum(hi - lo, 1.0)
    out = _to_uint8_range((image - lo) * scale)
    return tf.where(hi > lo, out, image)


def _equalize_channel(ch: tf.Tensor) -> tf.Tensor:
    """PIL ``ImageOps.equalize`` on one (H, W) channel."""
    ci = tf.cast(ch, tf.int32)
    hist = tf.math.bincount(tf.reshape(ci, [-1]), minlength=256, maxlength=256)
    nonzero = tf.boolean_mask(hist, hist > 0)
    last = nonzero[-1]
    step = (tf.reduce_sum(hist) - last) // 255
    safe_step = tf.maximum(step, 1)
    lut = (step // 2 + tf.cumsum(hist, exclusive=True)) // safe_step
    lut = tf.clip_by_value(lut, 0, 255)
    out = tf.cast(tf.gather(lut, ci), tf.float32)
    return tf.where(step > 0, out, ch)


def equalize(image: tf.Tensor) -> tf.Tensor:
    return tf.stack([_equalize_channel(image[..., c]) for c in range(3)], axis=-1)


def invert(image: tf.Tensor) -> tf.Tensor:
    return 255.0 - image


def rotate(image: tf.Tensor, degrees: tf.Tensor) -> tf.Tensor:
    """PIL ``rotate`` (counter-clockwise, about the centre, same canvas size)."""
    h = tf.cast(tf.shape(image)[0], tf.float32)
    w = tf.cast(tf.shape(image)[1], tf.float32)
    cx, cy = (w - 1.0) / 2.0, (h - 1.0) / 2.0
    a = -degrees * math.pi / 180.0
    c, s = tf.cos(a), tf.sin(a)
    # x_in = c (x - cx) + s (y - cy) + cx ; y_in = -s (x - cx) + c (y - cy) + cy
    t = tf.stack([c, s, cx - c * cx - s * cy, -s, c, cy + s * cx - c * cy])
    return _affine(image, t)


def shear_x(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    return _affine(image, tf.stack([1.0, factor, 0.0, 0.0, 1.0, 0.0]))


def shear_y(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    return _affine(image, tf.stack([1.0, 0.0, 0.0, factor, 1.0, 0.0]))


def translate_x_rel(image: tf.Tensor, pct: tf.Tensor) -> tf.Tensor:
    pixels = pct * tf.cast(tf.shape(image)[1], tf.float32)
    return _affine(image, tf.stack([1.0, 0.0, pixels, 0.0, 1.0, 0.0]))


def translate_y_rel(image: tf.Tensor, pct: tf.Tensor) -> tf.Tensor:
    pixels = pct * tf.cast(tf.shape(image)[0], tf.float32)
    return _affine(image, tf.stack([1.0, 0.0, 0.0, 0.0, 1.0, pixels]))


def posterize(image: tf.Tensor, bits: tf.Tensor) -> tf.Tensor:
    """Keeps the top ``bits`` bits (timm: bits >= 8 is identity, 0 gives black)."""
    q = tf.pow(2.0, 8.0 - tf.cast(bits, tf.float32))
    out = tf.floor(image / q) * q
    return tf.where(bits >= 8, image, out)


def solarize(image: tf.Tensor, threshold: tf.Tensor) -> tf.Tensor:
    return tf.where(image < threshold, image, 255.0 - image)


def solarize_add(image: tf.Tensor, add: tf.Tensor, threshold: float = 128.0) -> tf.Tensor:
    return tf.where(image < threshold, tf.minimum(image + add, 255.0), image)


def color(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """PIL ``ImageEnhance.Color`` (saturation)."""
    return _blend(tf.broadcast_to(_grayscale(image), tf.shape(image)), image, factor)


def contrast(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """PIL ``ImageEnhance.Contrast``: blend with the (rounded) mean grey level."""
    mean = tf.floor(tf.reduce_mean(_grayscale(image)) + 0.5)
    return _blend(tf.fill(tf.shape(image), mean), image, factor)


def brightness(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    return _blend(tf.zeros_like(image), image, factor)


def sharpness(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """PIL ``ImageEnhance.Sharpness``: blend with the SMOOTH-filtered image (borders kept)."""
    k = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
    k = tf.tile(k[:, :, None, None], [1, 1, 3, 1])
    smooth = tf.nn.depthwise_conv2d(image[None], k, strides=[1, 1, 1, 1], padding="VALID")[0]
    smooth = tf.round(smooth)
    smooth = tf.pad(smooth, [[1, 1], [1, 1], [0, 0]])
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    yy = tf.range(h)[:, None, None]
    xx = tf.range(w)[None, :, None]
    interior = (yy > 0) & (yy < h - 1) & (xx > 0) & (xx < w - 1)
    degenerate = tf.where(interior, smooth, image)
    return _blend(degenerate, image, factor)


# ----------------------------------------------------------------------------------------
# level -> op application (timm level fns)
# ----------------------------------------------------------------------------------------
def _apply_named_op(name: str, image: tf.Tensor, m: tf.Tensor, sign_key: tf.Tensor) -> tf.Tensor:
    """Applies op ``name`` at magnitude ``m`` (0..10) with timm's level->argument map."""
    frac = m / LEVEL_DENOM
    if name == "AutoContrast":
        return auto_contrast(image)
    if name == "Equalize":
        return equalize(image)
    if name == "Invert":
        return invert(image)
    if name == "Rotate":
        return rotate(image, _random_sign(sign_key) * frac * 30.0)
    if name == "ShearX":
        return shear_x(image, _random_sign(sign_key) * frac * 0.3)
    if name == "ShearY":
        return shear_y(image, _random_sign(sign_key) * frac * 0.3)
    if name == "TranslateXRel":
        return translate_x_rel(image, _random_sign(sign_key) * frac * _TRANSLATE_PCT)
    if name == "TranslateYRel":
        return translate_y_rel(image, _random_sign(sign_key) * frac * _TRANSLATE_PCT)
    if name == "Posterize":
        return posterize(image, tf.cast(tf.floor(frac * 4.0), tf.int32))
    if name == "PosterizeIncreasing":
        return posterize(image, 4 - tf.cast(tf.floor(frac * 4.0), tf.int32))
    if name == "Solarize":
        return solarize(image, tf.floor(frac * 256.0))
    if name == "SolarizeIncreasing":
        return solarize(image, 256.0 - tf.floor(frac * 256.0))
    if name == "SolarizeAdd":
        return solarize_add(image, tf.floor(frac * 110.0))
    enhance = {"Color": color, "Contrast": contrast, "Brightness": brightness, "Sharpness": sharpness}
    if name in enhance:
        return enhance[name](image, frac * 1.8 + 0.1)
    base = name.removesuffix("Increasing")
    if base in enhance:
        return enhance[base](image, 1.0 + _random_sign(sign_key) * frac * 0.9)
    raise ValueError(f"Unknown RandAugment op {name!r}")


def rand_augment(image: tf.Tensor, key: tf.Tensor, config: RandAugmentConfig) -> tf.Tensor:
    """timm RandAugment on a float32 (H, W, 3) image with integral values in 0..255.

    ``key``: (2,) int64 stateless seed. Returns the same shape, still integral 0..255.
    """
    ops = config.ops
    keys = tf.random.experimental.stateless_split(key, num=4 * config.num_layers)
    for layer in range(config.num_layers):
        k_op, k_prob, k_mag, k_sign = (keys[4 * layer + i] for i in range(4))
        op_idx = tf.random.stateless_uniform([], seed=k_op, minval=0, maxval=len(ops), dtype=tf.int32)
        m = tf.constant(config.magnitude, tf.float32)
        if config.magnitude_std == float("inf"):
            m = tf.random.stateless_uniform([], seed=k_mag, minval=0.0, maxval=m)
        elif config.magnitude_std > 0:
            m = m + config.magnitude_std * tf.random.stateless_normal([], seed=k_mag)
        m = tf.clip_by_value(m, 0.0, config.magnitude_max)
        apply = tf.random.stateless_uniform([], seed=k_prob) < config.prob

        def _branch(name, img=image, m=m, k_sign=k_sign):
            return lambda: tf.ensure_shape(_apply_named_op(name, img, m, k_sign), img.shape)

        def _augment(img=image, op_idx=op_idx, m=m, k_sign=k_sign):
            return tf.switch_case(op_idx, [_branch(name, img, m, k_sign) for name in ops])

        image = tf.cond(apply, _augment, lambda img=image: img)
    return image


# ----------------------------------------------------------------------------------------
# colour jitter (torchvision ColorJitter(b, c, s), random order) - only used without RA
# ----------------------------------------------------------------------------------------
def color_jitter(image: tf.Tensor, key: tf.Tensor, strength: float) -> tf.Tensor:
    """torchvision ``ColorJitter(strength, strength, strength)`` on float 0..255 (H, W, 3).

    Brightness, contrast and saturation factors ~ U[max(0, 1-s), 1+s], applied in a random
    order (timm passes a float ``color_jitter`` as (b, c, s) with hue 0).
    """
    keys = tf.random.experimental.stateless_split(key, num=4)
    lo, hi = max(0.0, 1.0 - strength), 1.0 + strength
    factors = tf.random.stateless_uniform([3], seed=keys[0], minval=lo, maxval=hi)
    order = tf.argsort(tf.random.stateless_uniform([3], seed=keys[1]))

    def _bright(img, f):
        return tf.clip_by_value(img * f, 0.0, 255.0)

    def _contrast(img, f):
        mean = tf.reduce_mean(_grayscale(img))
        return tf.clip_by_value(mean + f * (img - mean), 0.0, 255.0)

    def _sat(img, f):
        gray = _grayscale(img)
        return tf.clip_by_value(gray + f * (img - gray), 0.0, 255.0)

    fns = [_bright, _contrast, _sat]
    for pos in range(3):
        idx = order[pos]
        image = tf.switch_case(
            idx, [lambda fn=fn, i=i, img=image: fn(img, factors[i]) for i, fn in enumerate(fns)])
    return tf.round(image)


# ----------------------------------------------------------------------------------------
# random erasing (timm RandomErasing, mode='pixel', count 1) on the normalized image
# ----------------------------------------------------------------------------------------
def random_erase(image: tf.Tensor, key: tf.Tensor, probability: float, min_area: float = 0.02,
                 max_area: float = 1.0 / 3.0, min_aspect: float = 0.3,
                 max_aspect: float | None = None, attempts: int = 10) -> tf.Tensor:
    """timm ``RandomErasing(probability, mode='pixel')`` on a normalized (H, W, C) image.

    With prob ``probability`` one rectangle (area U[min_area, max_area] of the image,
    log-uniform aspect in [min_aspect, 1/min_aspect]) is replaced by per-pixel N(0, 1)
    noise; the first of ``attempts`` candidates that fits (h < H and w < W) is used.
    """
    max_aspect = max_aspect or 1.0 / min_aspect
    keys = tf.random.experimental.stateless_split(key, num=6)
    shape = tf.shape(image)
    h_img, w_img = shape[0], shape[1]
    hf, wf = tf.cast(h_img, tf.float32), tf.cast(w_img, tf.float32)
    area = hf * wf
    target = tf.random.stateless_uniform([attempts], seed=keys[0], minval=min_area, maxval=max_area) * area
    log_r = tf.random.stateless_uniform([attempts], seed=keys[1], minval=math.log(min_aspect),
                                        maxval=math.log(max_aspect))
    ratio = tf.exp(log_r)
    h = tf.cast(tf.round(tf.sqrt(target * ratio)), tf.int32)
    w = tf.cast(tf.round(tf.sqrt(target / ratio)), tf.int32)
    ok = (w < w_img) & (h < h_img)
    first = tf.argmax(tf.cast(ok, tf.int32), output_type=tf.int32)
    any_ok = tf.reduce_any(ok)
    eh, ew = h[first], w[first]
    u = tf.random.stateless_uniform([2], seed=keys[2])
    top = tf.cast(tf.floor(u[0] * tf.cast(h_img - eh + 1, tf.float32)), tf.int32)
    left = tf.cast(tf.floor(u[1] * tf.cast(w_img - ew + 1, tf.float32)), tf.int32)
    yy = tf.range(h_img)[:, None, None]
    xx = tf.range(w_img)[None, :, None]
    inside = (yy >= top) & (yy < top + eh) & (xx >= left) & (xx < left + ew)
    do = (tf.random.stateless_uniform([], seed=keys[3]) < probability) & any_ok
    noise = tf.random.stateless_normal(shape, seed=keys[4], dtype=image.dtype)
    return tf.where(inside & do, noise, image)
