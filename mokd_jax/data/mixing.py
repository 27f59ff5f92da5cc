"""Random erasing, then Mixup / CutMix with label smoothing, on the device inside the
jitted step (DeiT recipe).

Pure jnp, so it runs where the batch already is; the TFDS pipelines (`tfds_pipeline`) do
the per-example augmentation on the host.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

from mokd_jax.normalization import Normalization

_CUTMIX_PROB = 0.5  # timm's switch_prob: CutMix or Mixup per batch when both are enabled
# timm's RandomErasing defaults (DeiT: probability 0.25, mode 'pixel', count 1).
ERASE_AREA = (0.02, 1 / 3)
ERASE_LOG_RATIO = (math.log(0.3), math.log(1 / 0.3))
ERASE_TRIES = 10


def random_erasing(
    images: jax.Array, key: jax.Array, probability: float, statistics: Normalization
) -> jax.Array:
    """timm's RandomErasing(probability, mode='pixel', max_count=1) of each example of
    float pixel images [B, H, W, C] (uint8 units, before normalisation).

    Per example, with `probability`: ERASE_TRIES tries of a box of area uniform in
    ERASE_AREA of the image and aspect ratio log-uniform in [0.3, 1/0.3], sides rounded
    half to even; the first box strictly smaller than the image is placed uniformly and its
    pixels replaced by normal noise; no box fits: unchanged.

    timm erases after normalisation with normal(0, 1) values. Here the batch is still in
    pixel units (each network normalises its own inputs inside the step), so the noise is
    written as the pixels 255 * (mean + std * z) of `statistics`: a network fed those
    statistics sees exactly timm's z, unclipped and unrounded (these are float pixels);
    one fed other statistics sees the same erased pixels, normalised its own way.
    `probability` is a Python number: 0 returns the images unchanged.
    """
    if probability <= 0:
        return images
    batch, height, width, _ = images.shape
    apply_key, area_key, ratio_key, offset_key, noise_key = jax.random.split(key, 5)
    tries = (batch, ERASE_TRIES)
    area = (
        height
        * width
        * jax.random.uniform(area_key, tries, minval=ERASE_AREA[0], maxval=ERASE_AREA[1])
    )
    ratio = jnp.exp(
        jax.random.uniform(ratio_key, tries, minval=ERASE_LOG_RATIO[0], maxval=ERASE_LOG_RATIO[1])
    )
    box_height = jnp.round(jnp.sqrt(area * ratio))
    box_width = jnp.round(jnp.sqrt(area / ratio))
    fits = (box_height < height) & (box_width < width)
    first = jnp.argmax(fits, axis=1)[:, None]
    box_height = jnp.take_along_axis(box_height, first, axis=1)[:, 0]
    box_width = jnp.take_along_axis(box_width, first, axis=1)[:, 0]
    shares = jax.random.uniform(offset_key, (2, batch))
    top = jnp.floor(shares[0] * (height - box_height + 1))
    left = jnp.floor(shares[1] * (width - box_width + 1))
    rows = jnp.arange(height)[None, :, None]
    cols = jnp.arange(width)[None, None, :]
    erased = jax.random.bernoulli(apply_key, probability, (batch,)) & fits.any(axis=1)
    inside = (
        erased[:, None, None]
        & (rows >= top[:, None, None])
        & (rows < (top + box_height)[:, None, None])
        & (cols >= left[:, None, None])
        & (cols < (left + box_width)[:, None, None])
    )
    mean = jnp.asarray(statistics.mean, jnp.float32)
    std = jnp.asarray(statistics.std, jnp.float32)
    noise = 255.0 * (mean + std * jax.random.normal(noise_key, images.shape))
    return jnp.where(inside[..., None], noise, images)


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
