"""The per-image crops of the TFDS pipelines: encoded image (+ a stateless seed) -> uint8
[S, S, 3]. CIFAR: pad-4 random crop and flip for training, the image itself for evaluation.
ImageNet: a random resized crop decoded from the JPEG window only, and flip, for training;
resize of the shorter side to 256/224 of the crop and a central crop for evaluation.
"""

import tensorflow as tf


def to_uint8(image: tf.Tensor) -> tf.Tensor:
    return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)


def resize_square(image: tf.Tensor, size: int) -> tf.Tensor:
    """Bilinear resize to size x size, antialiased when shrinking (as PIL and torchvision)."""
    if tuple(image.shape[:2]) == (size, size):
        return image
    return to_uint8(tf.image.resize(image, [size, size], antialias=True))


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
    image = tf.image.decode_and_crop_jpeg(encoded, window, channels=3)
    image = resize_square(image, image_size)
    return tf.image.stateless_random_flip_left_right(image, flip_seed)


def imagenet_eval(encoded: tf.Tensor, image_size: int) -> tf.Tensor:
    """Shorter side to image_size * 256/224, then the central image_size square."""
    image = tf.io.decode_jpeg(encoded, channels=3)
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    resized_shape = tf.cast(
        tf.round(shape * round(image_size * 256 / 224) / tf.reduce_min(shape)), tf.int32
    )
    image = tf.image.resize(image, resized_shape, antialias=True)
    top, left = tf.unstack((resized_shape - image_size) // 2)
    image = tf.image.crop_to_bounding_box(image, top, left, image_size, image_size)
    return tf.ensure_shape(to_uint8(image), [image_size, image_size, 3])
