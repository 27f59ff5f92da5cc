"""The per-image crops of the TFDS pipelines: encoded image (+ a stateless seed) -> uint8
[S, S, 3]. CIFAR: pad-4 random crop and flip for training, the image itself for evaluation.
ImageNet: a random resized crop decoded from the JPEG window only, and flip, for training;
resize of the shorter side to 256/224 of the crop and a central crop for evaluation.

The training crop's window is torchvision's `RandomResizedCrop.get_params`, drawn with
stateless ops (`random_resized_crop_window`), and only that window of the JPEG is decoded
(`tf.image.decode_and_crop_jpeg`). TensorFlow's `sample_distorted_bounding_box` is not
used: it draws the aspect ratio and the height uniformly, which gives smaller crops (mean
area 0.37 of a 500x375 image against torchvision's 0.43), mostly landscape ones.

Resizes are antialiased (as PIL's, when shrinking) and bilinear, or bicubic where a recipe
asks for it (DeiT resizes its training crop and its evaluation image bicubically).

JPEGs are decoded with libjpeg's accurate integer DCT (`INTEGER_ACCURATE`, what PIL, hence
torchvision and timm, decode with; TensorFlow's default is the fast, less accurate one).
The evaluation geometry is torchvision's `Resize(256)` + `CenterCrop(224)` to the pixel
(long side truncated, crop offsets rounded half to even as Python's `round`); the resize
itself is TensorFlow's antialiased kernel, not PIL's: their pixels differ by a fraction of
a grey level on average (measured in tests/test_crops.py, documented in docs/usage.md).
"""

import math

import tensorflow as tf

from mokd_jax.checks import check_choice

_ACCURATE_DCT = "INTEGER_ACCURATE"
INTERPOLATIONS = ("bilinear", "bicubic")
# The kernels `tf.image.resize(..., antialias=True)` runs for each interpolation.
_RESIZE_KERNELS = {"bilinear": "triangle", "bicubic": "keyscubic"}
# torchvision's RandomResizedCrop defaults, DeiT's and every ImageNet recipe's.
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
CROP_TRIES = 10


def to_uint8(image: tf.Tensor) -> tf.Tensor:
    return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)


def resize_square(image: tf.Tensor, size: int, method: str = "bilinear") -> tf.Tensor:
    """Resize to size x size by `method` (one of INTERPOLATIONS), antialiased when shrinking
    (as PIL and torchvision)."""
    check_choice("interpolation", method, INTERPOLATIONS)
    if tuple(image.shape[:2]) == (size, size):
        return image
    return to_uint8(tf.image.resize(image, [size, size], method=method, antialias=True))


def decode_jpeg(encoded: tf.Tensor) -> tf.Tensor:
    """RGB uint8 [H, W, 3], with the accurate DCT (as PIL)."""
    return tf.io.decode_jpeg(encoded, channels=3, dct_method=_ACCURATE_DCT)


def decode_cifar(encoded: tf.Tensor) -> tf.Tensor:
    return tf.ensure_shape(tf.io.decode_png(encoded, channels=3), [32, 32, 3])


def cifar_train(
    encoded: tf.Tensor, seed: tf.Tensor, image_size: int, method: str = "bilinear"
) -> tf.Tensor:
    """Zero-pad 4, random 32x32 crop, random horizontal flip (the ResNet CIFAR recipe),
    resized by `method` where image_size is not 32."""
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    padded = tf.pad(decode_cifar(encoded), [[4, 4], [4, 4], [0, 0]])
    image = tf.image.stateless_random_crop(padded, [32, 32, 3], crop_seed)
    image = tf.image.stateless_random_flip_left_right(image, flip_seed)
    return resize_square(image, image_size, method)


def cifar_eval(encoded: tf.Tensor, image_size: int, method: str = "bilinear") -> tf.Tensor:
    return resize_square(decode_cifar(encoded), image_size, method)


def _uniform(shape: list[int], seed: tf.Tensor, low: float, high: float) -> tf.Tensor:
    return tf.random.stateless_uniform(shape, seed, low, high, dtype=tf.float64)


def _centre_crop_fallback(height: tf.Tensor, width: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """torchvision's (crop height, width) when no try fits: the whole image, or its largest
    central part whose aspect ratio is clamped into CROP_RATIO."""
    ratio = width / height
    low, high = CROP_RATIO
    crop_height = tf.where(ratio < low, tf.round(width / low), height)
    crop_height = tf.where(ratio > high, height, crop_height)
    crop_width = tf.where(ratio > high, tf.round(height * high), width)
    return crop_height, crop_width


def random_resized_crop_window(shape: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """torchvision's `RandomResizedCrop.get_params` for an image of `shape` [H, W, ...]:
    [top, left, height, width] int32, a pure function of the stateless `seed` [2].

    CROP_TRIES tries, drawn at once: a target area uniform in CROP_SCALE of the image, an
    aspect ratio (width / height) log-uniform in CROP_RATIO, sides rounded half to even (as
    Python's round); the first try that fits in the image is taken, at offsets uniform over
    every position (torch.randint(0, side - crop + 1)). None fits: `_centre_crop_fallback`.
    Draws in float64, so the offsets' floor(u * positions) has no visible bias.
    """
    area_seed, ratio_seed, offset_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
    height, width = tf.unstack(tf.cast(shape[:2], tf.float64))
    area = height * width * _uniform([CROP_TRIES], area_seed, *CROP_SCALE)
    ratio = tf.exp(_uniform([CROP_TRIES], ratio_seed, *(math.log(r) for r in CROP_RATIO)))
    crop_width = tf.round(tf.sqrt(area * ratio))
    crop_height = tf.round(tf.sqrt(area / ratio))
    fits = (crop_width > 0) & (crop_width <= width) & (crop_height > 0) & (crop_height <= height)
    first = tf.argmax(tf.cast(fits, tf.int32))  # 0 when none fits: then unused
    fallback_height, fallback_width = _centre_crop_fallback(height, width)
    any_fits = tf.reduce_any(fits)
    crop_height = tf.where(any_fits, crop_height[first], fallback_height)
    crop_width = tf.where(any_fits, crop_width[first], fallback_width)
    free = tf.stack([height - crop_height, width - crop_width])
    random_offsets = tf.floor(_uniform([2], offset_seed, 0.0, 1.0) * (free + 1.0))
    offsets = tf.where(any_fits, random_offsets, tf.floor(free / 2.0))
    return tf.cast(tf.concat([offsets, [crop_height, crop_width]], 0), tf.int32)


def imagenet_train(
    encoded: tf.Tensor, seed: tf.Tensor, image_size: int, method: str = "bilinear"
) -> tf.Tensor:
    """torchvision's RandomResizedCrop (scale (0.08, 1), ratio (3/4, 4/3)), resized by
    `method`, then a random horizontal flip.

    The crop window is sampled from the JPEG header and only that window is decoded, which
    saves most of the decoding work for small crops.
    """
    window_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    window = random_resized_crop_window(tf.image.extract_jpeg_shape(encoded), window_seed)
    image = tf.image.decode_and_crop_jpeg(encoded, window, channels=3, dct_method=_ACCURATE_DCT)
    image = resize_square(image, image_size, method)
    return tf.image.stateless_random_flip_left_right(image, flip_seed)


def eval_geometry(shape: tf.Tensor, image_size: int) -> tuple[tf.Tensor, tf.Tensor]:
    """(resized [height, width], crop offsets [top, left]) of an image of `shape` [2], as
    torchvision's `Resize(round(image_size * 256 / 224))` + `CenterCrop(image_size)` compute
    them: the shorter side becomes the resize size, the longer one int(size * long / short)
    (truncated, in double precision as Python divides), and each offset is
    int(round((side - image_size) / 2)), half to even (tf.round rounds as Python's round).
    """
    size = round(image_size * 256 / 224)
    shape = tf.cast(shape, tf.int64)
    short = tf.reduce_min(shape)
    scaled = tf.floor(tf.cast(size * shape, tf.float64) / tf.cast(short, tf.float64))
    resized = tf.where(shape == short, tf.constant(size, tf.int64), tf.cast(scaled, tf.int64))
    offsets = tf.round(tf.cast(resized - image_size, tf.float64) / 2.0)
    return tf.cast(resized, tf.int32), tf.cast(offsets, tf.int32)


def resize_and_center_crop(
    image: tf.Tensor, image_size: int, method: str = "bilinear"
) -> tf.Tensor:
    """uint8 [H, W, 3] -> the central image_size square of the image resized (by `method`,
    antialiased) by `eval_geometry`, uint8.

    Only the square is computed: `ScaleAndTranslate`, the op of `tf.image.resize`'s
    antialiased resizes, with the same kernel and scale and the crop's offsets as a negative
    translation, instead of resizing the whole image and cutting the margins away (of a 4:3
    image, 42% of the resized pixels). The op then places a sample at
    (x + 0.5) / scale + offset / scale rather than (x + offset + 0.5) / scale; float
    rounding of the two moves about 1 pixel in 4000 by one grey level (tests/test_crops.py).
    """
    check_choice("interpolation", method, INTERPOLATIONS)
    shape = tf.shape(image)[:2]
    resized_shape, offsets = eval_geometry(shape, image_size)
    # tf.image.resize's scale: float32 output size over input size.
    scale = tf.cast(resized_shape, tf.float32) / tf.cast(shape, tf.float32)
    window = tf.raw_ops.ScaleAndTranslate(
        images=image[None],
        size=[image_size, image_size],
        scale=scale,
        translation=-tf.cast(offsets, tf.float32),
        kernel_type=_RESIZE_KERNELS[method],
        antialias=True,
    )[0]
    return tf.ensure_shape(to_uint8(window), [image_size, image_size, 3])


def imagenet_eval(encoded: tf.Tensor, image_size: int, method: str = "bilinear") -> tf.Tensor:
    """Shorter side to image_size * 256/224 (by `method`), then the central image_size
    square."""
    return resize_and_center_crop(decode_jpeg(encoded), image_size, method)
