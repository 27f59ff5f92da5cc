"""RandAugment on the host, in TensorFlow: timm's rand-m9-mstd0.5-inc1, DeiT's setting.

All 15 ops of timm's "increasing" list, at magnitude m=9 on its 0..10 scale. Each of the
N=2 layers draws an op uniformly and applies it with probability 0.5, as timm does, at a
magnitude drawn from normal(m, 0.5) clipped to [0, 10] (timm's magnitude noise, drawn per
op as timm's AugmentOp does); the pixels are rounded to integers after each op, as PIL's
are. The geometric ops fill the uncovered area with timm's `img_mean` for DeiT, the
ImageNet mean pixel (124, 116, 104). Where we differ: the geometric ops resample
bilinearly (TensorFlow's projective transform has no bicubic; DeiT's timm asks PIL for
bicubic).

Every random draw is a stateless op seeded by the caller, so an image's augmentation is a
pure function of (image, seed): `mokd_jax.data.tfds_pipeline` folds each example's seed
from (seed, process, epoch, position), which keeps resumed runs bitwise equal.

An op maps float32 pixels [H,W,3] in [0, 255], a random sign (+-1: the direction of the
ops whose argument timm negates at random; the others ignore it) and the level
(magnitude / 10, a float or a scalar tensor) to pixels of the same shape, not yet clipped
or rounded. timm's int() of an op's argument is a floor here (the arguments are >= 0).
"""

import functools
import math
from collections.abc import Callable

import tensorflow as tf

from mokd_jax.checks import check_range

__all__ = ["FILL", "MAGNITUDE", "MAGNITUDE_STD", "MAX_MAGNITUDE", "OPS", "rand_augment"]

MAGNITUDE = 9  # timm's m, DeiT's setting
MAGNITUDE_STD = 0.5  # timm's mstd, DeiT's setting: the noise on each op's magnitude
MAX_MAGNITUDE = 10  # the top of timm's scale; the level of an op is magnitude / 10
_LAYERS = 2
_PROB = 0.5
# timm's fill for DeiT: img_mean = round(255 * IMAGENET_DEFAULT_MEAN), per channel.
FILL = (124.0, 116.0, 104.0)

Op = Callable[[tf.Tensor, tf.Tensor, float], tf.Tensor]


def _blend(degenerate: tf.Tensor, image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """PIL ImageEnhance: factor 0 gives `degenerate`, 1 the image, > 1 extrapolates."""
    return tf.clip_by_value(degenerate + factor * (image - degenerate), 0.0, 255.0)


def _enhance_factor(sign: tf.Tensor, level: float) -> tf.Tensor:
    return 1.0 + sign * level * 0.9


def _transform(image: tf.Tensor, transform: list[float | tf.Tensor]) -> tf.Tensor:
    """Projective transform mapping output (x, y) to input coordinates, as PIL's AFFINE,
    the uncovered area FILL. The op takes one fill value for all channels, so the image is
    shifted by FILL, transformed with fill 0 and shifted back: bilinear weights sum to 1,
    so covered pixels are unchanged by the shift and edge pixels blend with FILL."""
    fill = tf.constant(FILL)
    transform = tf.stack([tf.cast(value, tf.float32) for value in transform + [0.0, 0.0]])
    shifted = tf.raw_ops.ImageProjectiveTransformV3(
        images=(image - fill)[None],
        transforms=transform[None],
        output_shape=tf.shape(image)[:2],
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode="CONSTANT",
    )[0]
    return shifted + fill


def _auto_contrast(image: tf.Tensor, sign: tf.Tensor, level: float) -> tf.Tensor:
    low = tf.reduce_min(image, axis=[0, 1])
    high = tf.reduce_max(image, axis=[0, 1])
    stretch = high > low
    scale = tf.where(stretch, 255.0 / tf.maximum(high - low, 1.0), 1.0)
    return (image - tf.where(stretch, low, 0.0)) * scale


def _equalize_channel(channel: tf.Tensor) -> tf.Tensor:
    """PIL's ImageOps.equalize on one channel: map through the normalised cumulative histogram."""
    pixels = tf.cast(channel, tf.int32)
    histogram = tf.math.bincount(pixels, minlength=256, maxlength=256)
    last = tf.boolean_mask(histogram, histogram > 0)[-1]
    step = (tf.reduce_sum(histogram) - last) // 255
    lookup = (tf.cumsum(histogram) + step // 2) // tf.maximum(step, 1)
    lookup = tf.clip_by_value(tf.concat([[0], lookup[:-1]], 0), 0, 255)
    return tf.where(step > 0, tf.cast(tf.gather(lookup, pixels), tf.float32), channel)


def _equalize(image: tf.Tensor, sign: tf.Tensor, level: float) -> tf.Tensor:
    return tf.stack([_equalize_channel(image[..., c]) for c in range(3)], axis=-1)


def _invert(image: tf.Tensor, sign: tf.Tensor, level: float) -> tf.Tensor:
    return 255.0 - image


def _rotate(image: tf.Tensor, sign: tf.Tensor, level: float) -> tf.Tensor:
    """Rotation by +-30 * level degrees (27 at m=9) about the centre."""
    angle = sign * level * 30.0 * math.pi / 180.0
    cos, sin = tf.cos(angle), tf.sin(angle)
    height, width = tf.unstack(tf.cast(tf.shape(image)[:2], tf.float32) - 1.0)
    x_offset = (width - (cos * width - sin * height)) / 2.0
    y_offset = (height - (sin * width + cos * height)) / 2.0
    return _transform(image, [cos, -sin, x_offset, sin, cos, y_offset])


def _posterize(image: tf.Tensor, sign: tf.Tensor, level: float) -> tf.Tensor:
    """Keeps the top 4 - int(4 * level) bits of each channel (1 at m=9)."""
    quantum = 2.0 ** (8.0 - (4.0 - tf.floor(level * 4.0)))
    return tf.floor(image / quantum) * quantum


def _solarize(image: tf.Tensor, sign: tf.Tensor, level: float) -> tf.Tensor:
    threshold = 256.0 - tf.floor(level * 256.0)
    return tf.where(image < threshold, image, 255.0 - image)


def _solarize_add(image: tf.Tensor, sign: tf.Tensor, level: float) -> tf.Tensor:
    return tf.where(image < 128.0, tf.minimum(image + tf.floor(level * 110.0), 255.0), image)


def _color(image: tf.Tensor, sign: tf.Tensor, level: float) -> tf.Tensor:
    gray = tf.image.grayscale_to_rgb(tf.image.rgb_to_grayscale(image))
    return _blend(gray, image, _enhance_factor(sign, level))


def _contrast(image: tf.Tensor, sign: tf.Tensor, level: float) -> tf.Tensor:
    mean = tf.reduce_mean(tf.image.rgb_to_grayscale(image))
    return _blend(mean, image, _enhance_factor(sign, level))


def _brightness(image: tf.Tensor, sign: tf.Tensor, level: float) -> tf.Tensor:
    return _blend(tf.zeros_like(image), image, _enhance_factor(sign, level))


def _sharpness(image: tf.Tensor, sign: tf.Tensor, level: float) -> tf.Tensor:
    """Blend with PIL's SMOOTH filter of the image; border pixels stay unfiltered, as in PIL."""
    kernel = tf.constant([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13.0
    kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
    smooth = tf.nn.depthwise_conv2d(image[None], kernel, [1, 1, 1, 1], "VALID")[0]
    border = [[1, 1], [1, 1], [0, 0]]
    inside = tf.pad(tf.ones_like(smooth, tf.bool), border)
    degenerate = tf.where(inside, tf.pad(smooth, border), image)
    return _blend(degenerate, image, _enhance_factor(sign, level))


def _shear_x(image: tf.Tensor, sign: tf.Tensor, level: float) -> tf.Tensor:
    return _transform(image, [1.0, sign * level * 0.3, 0.0, 0.0, 1.0, 0.0])


def _shear_y(image: tf.Tensor, sign: tf.Tensor, level: float) -> tf.Tensor:
    return _transform(image, [1.0, 0.0, 0.0, sign * level * 0.3, 1.0, 0.0])


def _translate_x(image: tf.Tensor, sign: tf.Tensor, level: float) -> tf.Tensor:
    pixels = sign * level * 0.45 * tf.cast(tf.shape(image)[1], tf.float32)
    return _transform(image, [1.0, 0.0, pixels, 0.0, 1.0, 0.0])


def _translate_y(image: tf.Tensor, sign: tf.Tensor, level: float) -> tf.Tensor:
    pixels = sign * level * 0.45 * tf.cast(tf.shape(image)[0], tf.float32)
    return _transform(image, [1.0, 0.0, 0.0, 0.0, 1.0, pixels])


# timm's "increasing" list, in its order: `rand_augment` draws an index into this tuple.
OPS: tuple[Op, ...] = (
    _auto_contrast,
    _equalize,
    _invert,
    _rotate,
    _posterize,
    _solarize,
    _solarize_add,
    _color,
    _contrast,
    _brightness,
    _sharpness,
    _shear_x,
    _shear_y,
    _translate_x,
    _translate_y,
)


def noisy_level(seed: tf.Tensor, magnitude: float, magnitude_std: float) -> tf.Tensor:
    """An op's level: normal(magnitude, magnitude_std) clipped to [0, MAX_MAGNITUDE], over
    MAX_MAGNITUDE (timm's AugmentOp with magnitude_std > 0; exactly magnitude at std 0)."""
    noise = magnitude_std * tf.random.stateless_normal([], seed)
    return tf.clip_by_value(magnitude + noise, 0.0, MAX_MAGNITUDE) / MAX_MAGNITUDE


def rand_augment(
    image: tf.Tensor,
    seed: tf.Tensor,
    magnitude: float = MAGNITUDE,
    magnitude_std: float = MAGNITUDE_STD,
) -> tf.Tensor:
    """RandAugment n=2 at `magnitude` (0..10) +- `magnitude_std` noise on a uint8 image
    [H,W,3], with the stateless `seed` [2]; pixels are rounded after each op, as in PIL.
    Returns uint8 [H,W,3]."""
    check_range("magnitude", magnitude, 0, MAX_MAGNITUDE)
    check_range("magnitude_std", magnitude_std, 0, MAX_MAGNITUDE)
    pixels = tf.cast(image, tf.float32)
    for layer_seed in tf.unstack(tf.random.experimental.stateless_split(seed, _LAYERS)):
        op_seed, sign_seed, apply_seed, level_seed = tf.unstack(
            tf.random.experimental.stateless_split(layer_seed, 4)
        )
        level = noisy_level(level_seed, magnitude, magnitude_std)
        op = tf.random.stateless_uniform([], op_seed, minval=0, maxval=len(OPS), dtype=tf.int32)
        sign = tf.where(tf.random.stateless_uniform([], sign_seed) < 0.5, -1.0, 1.0)
        applied = tf.random.stateless_uniform([], apply_seed) < _PROB
        pixels = tf.cond(
            applied,
            functools.partial(_apply_op, op, pixels, sign, level),
            functools.partial(tf.identity, pixels),
        )
    return tf.cast(pixels, tf.uint8)


def _apply_op(op: tf.Tensor, pixels: tf.Tensor, sign: tf.Tensor, level: tf.Tensor) -> tf.Tensor:
    """OPS[op] on the pixels, clipped and rounded. Run under `tf.cond`, so a layer that
    skips its op (half of them) computes none, rather than computing one and discarding it."""
    augmented = tf.switch_case(
        op, [functools.partial(function, pixels, sign, level) for function in OPS]
    )
    return tf.round(tf.clip_by_value(augmented, 0.0, 255.0))
