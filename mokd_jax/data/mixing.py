"""Mixup / CutMix with label smoothing, on the device inside the jitted step (DeiT recipe).

Pure jnp, so it runs where the batch already is; the TFDS pipelines (`tfds_pipeline`) do
the per-example augmentation on the host.
"""

import jax
import jax.numpy as jnp
import numpy as np

_CUTMIX_PROB = 0.5  # timm's switch_prob: CutMix or Mixup per batch when both are enabled


def mixup_cutmix(
    images: jax.Array | np.ndarray,
    labels: jax.Array | np.ndarray,
    key: jax.Array,
    num_classes: int,
    mixup_alpha: float = 0.8,
    cutmix_alpha: float = 1.0,
    smoothing: float = 0.1,
) -> tuple[jax.Array, jax.Array]:
    """timm's batch-mode Mixup/CutMix with label smoothing: (float32 images, soft labels [B, C]).

    Each example is mixed with the one mirrored in the batch (index B-1-i), with one
    lambda per batch drawn from Beta(alpha, alpha); CutMix pastes the partner's box and sets
    lambda to the area actually kept. Images stay in pixel units [0, 255]: `normalize` is
    affine with weights summing to 1, so it may run before or after. Pure jnp and jit-safe;
    `num_classes` and the alphas are Python numbers (static): an alpha of 0 switches that
    mix off, and both 0 give the images unchanged with smoothed one-hot labels.
    """
    images = jnp.asarray(images, jnp.float32)
    targets = jax.nn.one_hot(labels, num_classes) * (1.0 - smoothing) + smoothing / num_classes
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        return images, targets
    mixup_key, cutmix_key, switch_key, box_key = jax.random.split(key, 4)
    mixup_lam = jax.random.beta(mixup_key, mixup_alpha, mixup_alpha) if mixup_alpha > 0 else 1.0
    partners = images[::-1]
    mixed = mixup_lam * images + (1.0 - mixup_lam) * partners
    if cutmix_alpha > 0:
        cutmix_lam = jax.random.beta(cutmix_key, cutmix_alpha, cutmix_alpha)
        inside = _cutmix_box(box_key, images.shape[1], images.shape[2], cutmix_lam)
        pasted = jnp.where(inside[None, :, :, None], partners, images)
        use_cutmix = jax.random.bernoulli(switch_key, _CUTMIX_PROB) if mixup_alpha > 0 else True
        mixed = jnp.where(use_cutmix, pasted, mixed)
        lam = jnp.where(use_cutmix, 1.0 - jnp.mean(inside), mixup_lam)
    else:
        lam = mixup_lam
    return mixed, lam * targets + (1.0 - lam) * targets[::-1]


def _cutmix_box(key: jax.Array, height: int, width: int, lam: jax.Array) -> jax.Array:
    """timm's rand_bbox: a box of sides sqrt(1 - lam) * (H, W) centred uniformly, clipped.

    Returns the bool [H, W] mask of the box; clipping makes its area at most 1 - lam.
    """
    y_key, x_key = jax.random.split(key)
    cut = jnp.sqrt(1.0 - lam)
    centre_y = jax.random.randint(y_key, (), 0, height)
    centre_x = jax.random.randint(x_key, (), 0, width)
    half_h = (height * cut).astype(jnp.int32) // 2
    half_w = (width * cut).astype(jnp.int32) // 2
    rows = jnp.arange(height)[:, None]
    cols = jnp.arange(width)[None, :]
    inside_y = (rows >= centre_y - half_h) & (rows < centre_y + half_h)
    inside_x = (cols >= centre_x - half_w) & (cols < centre_x + half_w)
    return inside_y & inside_x
