"""The per-image crops of the TFDS pipelines: encoded image (+ a stateless seed) -> uint8
[S, S, 3]. CIFAR: pad-4 random crop and flip for training, the image itself for evaluation.
ImageNet: a random resized crop decoded from the JPEG window only, and flip, for training;
resize of the shorter side to 256/224 of the crop and a central crop for evaluation.

JPEGs are decoded with libjpeg's accurate integer DCT (`INTEGER_ACCURATE`, what PIL, hence
torchvision and timm, decode with; TensorFlow's default is the fast, less accurate one).
The evaluation geometry is torchvision's `Resize(256)` + `CenterCrop(224)` to the pixel
(long side truncated, crop offsets rounded half to even as Python's `round`); the resize
itself is TensorFlow's antialiased bilinear, not PIL's: their pixels differ by a fraction of
a grey level on average (measured in tests/test_crops.py, documented in docs/usage.md).
"""

import tensorflow as tf

_ACCURATE_DCT = "INTEGER_ACCURATE"


def to_uint8(image: tf.Tensor) -> tf.Tensor:
    return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)


def resize_square(image: tf.Tensor, size: int) -> tf.Tensor:
    """Bilinear resize to size x size, antialiased when shrinking (as PIL and torchvision)."""
    if tuple(image.shape[:2]) == (size, size):
        return image
    return to_uint8(tf.image.resize(image, [size, size], antialias=True))


def decode_jpeg(encoded: tf.Tensor) -> tf.Tensor:
    """RGB uint8 [H, W, 3], with the accurate DCT (as PIL)."""
    return tf.io.decode_jpeg(encoded, channels=3, dct_method=_ACCURATE_DCT)


def decode_cifar(encoded: tf.Tensor) -> tf.Tensor:
    return tf.ensure_shape(tf.io.decode_png(encoded, channels=3), [32, 32, 3])


def cifar_train(encoded: tf.Tensor, seed: tf.Tensor, image_size: int) -> tf.Tensor:
    """Zero-pad 4, random 32x32 crop, random horizontal flip (the ResNet CIFAR recipe)."""
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    padded = tf.pad(decode_cifar(encoded), [[4, 4], [4, 4], [0, 0]])
    image = tf.image.stateless_random_crop(padded, [32, 32, 3], crop_seed)
    image = tf.image.stateless_random_flip_left_right(image, flip_seed)
    return resize_square(image, image_size)


def cifar_eval(encoded: tf.Tensor, image_size: int) -> tf.Tensor:
    return resize_square(decode_cifar(encoded), image_size)


def imagenet_train(encoded: tf.Tensor, seed: tf.Tensor, image_size: int) -> tf.Tensor:
    """torchvision's RandomResizedCrop (scale (0.08, 1), ratio (3/4, 4/3)) + horizontal flip.

    The crop window is sampled from the JPEG header and only that window is decoded, which
    saves most of the decoding work for small crops. Where 10 tries find no window, the whole
    image is used (torchvision falls back to a centre crop instead).
    """
    box_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.image.extract_jpeg_shape(encoded),
        bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
        seed=box_seed,
        min_object_covered=0.0,
        aspect_ratio_range=(3 / 4, 4 / 3),
        area_range=(0.08, 1.0),
        max_attempts=10,
        use_image_if_no_bounding_boxes=True,
    )
    top, left, _ = tf.unstack(begin)
    height, width, _ = tf.unstack(size)
    window = tf.stack([top, left, height, width])
    image = tf.image.decode_and_crop_jpeg(encoded, window, channels=3, dct_method=_ACCURATE_DCT)
    image = resize_square(image, image_size)
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


def resize_and_center_crop(image: tf.Tensor, image_size: int) -> tf.Tensor:
    """uint8 [H, W, 3] -> the central image_size square of the image resized (bilinear,
    antialiased) by `eval_geometry`, uint8."""
    resized_shape, offsets = eval_geometry(tf.shape(image)[:2], image_size)
    image = tf.image.resize(image, resized_shape, antialias=True)
    top, left = tf.unstack(offsets)
    image = tf.image.crop_to_bounding_box(image, top, left, image_size, image_size)
    return tf.ensure_shape(to_uint8(image), [image_size, image_size, 3])


def imagenet_eval(encoded: tf.Tensor, image_size: int) -> tf.Tensor:
    """Shorter side to image_size * 256/224, then the central image_size square."""
    return resize_and_center_crop(decode_jpeg(encoded), image_size)
