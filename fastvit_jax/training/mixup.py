"""Mixup / CutMix, timm ``Mixup(mode='batch')`` semantics, jit-friendly.

One lambda per batch. With both alphas > 0, CutMix is chosen with probability
``switch_prob`` (timm default 0.5). The partner of sample i is sample B-1-i (timm mixes
with ``x.flip(0)``). CutMix pastes a box of side ``sqrt(1 - lam)`` centred uniformly at
random, clipped to the image; lambda is then corrected to the pasted area
(``correct_lam``). Targets are label-smoothed one-hots mixed with the same lambda, so they
always sum to one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def smooth_one_hot(labels: jnp.ndarray, num_classes: int, smoothing: float) -> jnp.ndarray:
    """timm: off = smoothing / C, on = 1 - smoothing + off."""
    off = smoothing / num_classes
    on = 1.0 - smoothing + off
    return jax.nn.one_hot(labels, num_classes) * (on - off) + off


def cutmix_box(rng: jax.Array, lam: jnp.ndarray, height: int, width: int):
    """timm ``rand_bbox``: returns (y0, y1, x0, x1) int32, box of the mixed-in image."""
    ratio = jnp.sqrt(1.0 - lam)
    cut_h = (height * ratio).astype(jnp.int32)
    cut_w = (width * ratio).astype(jnp.int32)
    ky, kx = jax.random.split(rng)
    cy = jax.random.randint(ky, (), 0, height)
    cx = jax.random.randint(kx, (), 0, width)
    y0 = jnp.clip(cy - cut_h // 2, 0, height)
    y1 = jnp.clip(cy + cut_h // 2, 0, height)
    x0 = jnp.clip(cx - cut_w // 2, 0, width)
    x1 = jnp.clip(cx + cut_w // 2, 0, width)
    return y0, y1, x0, x1


def mixup_cutmix(
    rng: jax.Array,
    images: jnp.ndarray,
    labels: jnp.ndarray,
    *,
    num_classes: int,
    mixup_alpha: float,
    cutmix_alpha: float,
    switch_prob: float,
    label_smoothing: float,
):
    """images (B,H,W,C), int labels (B,) -> mixed images, soft targets (B, num_classes), lam.

    timm's Mixup (batch mode); the values are the caller's (``TrainConfig`` holds the recipe's)."""
    targets = smooth_one_hot(labels, num_classes, label_smoothing)
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        return images, targets, jnp.ones((), jnp.float32)
    k_switch, k_mix, k_cut, k_box = jax.random.split(rng, 4)
    if mixup_alpha > 0 and cutmix_alpha > 0:
        use_cutmix = jax.random.uniform(k_switch) < switch_prob
    else:
        use_cutmix = jnp.asarray(cutmix_alpha > 0)
    lam_mix = jax.random.beta(k_mix, mixup_alpha, mixup_alpha) if mixup_alpha > 0 else jnp.ones(())
    lam_cut = jax.random.beta(k_cut, cutmix_alpha, cutmix_alpha) if cutmix_alpha > 0 else jnp.ones(())
    lam_mix = lam_mix.astype(jnp.float32)
    lam_cut = lam_cut.astype(jnp.float32)

    _, h, w, _ = images.shape
    partner = images[::-1]
    # CutMix: paste the partner's box, correct lambda to the pasted area.
    y0, y1, x0, x1 = cutmix_box(k_box, lam_cut, h, w)
    ys = jnp.arange(h)[:, None]
    xs = jnp.arange(w)[None, :]
    box = (ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1)  # (H, W)
    lam_cut = 1.0 - box.sum().astype(jnp.float32) / (h * w)
    cut_images = jnp.where(box[None, :, :, None], partner, images)
    mix_images = lam_mix.astype(images.dtype) * images + (1.0 - lam_mix).astype(images.dtype) * partner

    lam = jnp.where(use_cutmix, lam_cut, lam_mix)
    mixed = jnp.where(use_cutmix, cut_images, mix_images)
    targets = lam * targets + (1.0 - lam) * targets[::-1]
    return mixed, targets, lam
