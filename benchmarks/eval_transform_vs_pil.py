"""How far ``fastvit_jax.eval_transform`` (TensorFlow ops) is from timm's PIL eval transform.

    python -m benchmarks.eval_transform_vs_pil [--image_size 256] [--crop_pct 0.9]

timm's ``create_transform(is_training=False)`` for FastViT is: PIL bicubic resize of the shorter
side to ``floor(S / crop_pct)``, centre crop S, ToTensor, ImageNet Normalize. It is written
out here with PIL and numpy (no timm or torchvision). The images are photo-like stand-ins made
offline: 1/f-noise textures with smooth gradients and hard-edged shapes, JPEG-encoded (q=90) at
common photo sizes. Prints a Markdown table: the JPEG decoders compared (grey levels), then the
transformed arrays (normalised units; one grey level is 1/255/std, 0.0171 to 0.0175).
"""

from __future__ import annotations

import argparse
import io
import math

import numpy as np
from PIL import Image, ImageDraw

SIZES = ((500, 375), (375, 500), (640, 480), (1024, 768), (800, 600), (333, 500),  # (width, height)
         (160, 120), (96, 96), (64, 48))  # small images, upscaled to 284 px: the bicubic kernels differ most


def photo_like(width: int, height: int, seed: int) -> bytes:
    """A JPEG (q=90) of 1/f noise + a gradient + a few filled shapes."""
    rng = np.random.default_rng(seed)
    image = np.zeros((height, width, 3))
    for octave in range(1, 7):  # amplitude ~ 1/frequency
        cells = 2 ** octave
        field = rng.normal(size=(cells + 1, cells + 1, 3))
        up = np.asarray(Image.fromarray(((field - field.min()) / np.ptp(field) * 255).astype(np.uint8))
                        .resize((width, height), Image.BICUBIC), np.float64)
        image += (up - 127.5) / octave
    image += np.linspace(-40, 40, width)[None, :, None] + rng.uniform(60, 190, 3)
    pil = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    for _ in range(4):
        x0, y0 = rng.integers(0, width - 40), rng.integers(0, height - 40)
        box = (x0, y0, x0 + rng.integers(min(20, width // 4), width // 3),
               y0 + rng.integers(min(20, height // 4), height // 3))
        draw.ellipse(box, fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    out = io.BytesIO()
    pil.save(out, format="JPEG", quality=90)
    return out.getvalue()


def timm_pil_eval(decoded: np.ndarray, image_size: int, crop_pct: float, mean, std) -> np.ndarray:
    """timm's eval transform on a decoded uint8 HWC image, in PIL + numpy: float32 (S, S, 3)."""
    scale = math.floor(image_size / crop_pct)
    h, w = decoded.shape[:2]
    if h <= w:
        new_h, new_w = scale, int(scale * w / h)
    else:
        new_h, new_w = int(scale * h / w), scale
    resized = np.asarray(Image.fromarray(decoded).resize((new_w, new_h), Image.BICUBIC), np.float32)
    top, left = int(round((new_h - image_size) / 2.0)), int(round((new_w - image_size) / 2.0))
    crop = resized[top:top + image_size, left:left + image_size] / 255.0
    return (crop - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image_size", type=int, default=256)
    p.add_argument("--crop_pct", type=float, default=0.9)
    args = p.parse_args(argv)
    from fastvit_jax.quiet import quiet_native_logs

    quiet_native_logs()
    import tensorflow as tf

    import fastvit_jax
    from fastvit_jax.data.pipeline import decode_image

    cfg = fastvit_jax.pretrained_cfg("t8", image_size=args.image_size).replace(crop_pct=args.crop_pct)
    transform = fastvit_jax.eval_transform(cfg)
    print(f"eval transform vs timm's PIL transform: {args.image_size} px, crop_pct {args.crop_pct}, bicubic\n")
    print("| image (w×h) | JPEG decode, max \\|Δ\\| grey levels | max \\|Δ\\| | mean \\|Δ\\| | "
          "values that differ | by > 1 grey level |")
    print("|---|---|---|---|---|---|")
    for i, (width, height) in enumerate(SIZES):
        encoded = photo_like(width, height, seed=i)
        pil_decoded = np.asarray(Image.open(io.BytesIO(encoded)).convert("RGB"))
        ours_decoded = decode_image(tf.constant(encoded), jpeg=True).numpy()
        diff = np.abs(transform(encoded)[0] - timm_pil_eval(pil_decoded, args.image_size, args.crop_pct, cfg.mean,
                                                             cfg.std))
        levels = np.round(diff * np.asarray(cfg.std) * 255)
        print(f"| {width}×{height} | {int(np.abs(ours_decoded.astype(int) - pil_decoded).max())} | {diff.max():.3f} | "
              f"{diff.mean():.4f} | {100 * (levels > 0).mean():.1f}% | {100 * (levels > 1).mean():.2f}% |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
