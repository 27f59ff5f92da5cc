"""mokd_jax.data.crops against the PyTorch evaluation input path: PIL's JPEG decoding, and
torchvision's `Resize(256)` + `CenterCrop(224)` on a PIL image, written here with PIL.

torchvision on a PIL image: the shorter side becomes 256 and the longer int(256 * long /
short), resized by PIL's `resize((w, h), Image.BILINEAR)` (antialiased when shrinking);
then the crop at offsets int(round((side - 224) / 2.0)). The geometry must match exactly;
the pixels differ by the two bilinear implementations (TensorFlow's float antialiased
kernel against PIL's fixed-point one): measured mean |difference| 0.16 to 0.17 grey levels,
at most 1, on the generated 500x375, 375x500 and 333x502 images below.

The training crop's window is compared with torchvision's `RandomResizedCrop.get_params`,
written here in numpy, by the distribution of 2000 draws (the random streams differ).
"""

import functools
import io
import math

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from scipy import stats

from mokd_jax.data import crops
from mokd_jax.errors import InputError

MEAN_PIXEL_DIFFERENCE = 0.25  # measured 0.16-0.17 (module docstring)


def generated_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Smooth colour waves plus pixel noise (the noise makes a crop shifted by one pixel,
    or a resize to another size, differ by many grey levels)."""
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    waves = [
        128 + 100 * np.sin(2 * np.pi * (3 * x + 0.3 * c)) * np.cos(4 * np.pi * y) for c in range(3)
    ]
    noise = np.random.default_rng(seed).normal(0, 20, (height, width, 3))
    return np.clip(np.stack(waves, -1) + noise, 0, 255).round().astype(np.uint8)


def torchvision_geometry(height: int, width: int, size: int = 224, resize: int = 256):
    """((resized height, width), (top, left)) by torchvision's formulas."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = resize, int(resize * long / short)
    new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
    return (new_h, new_w), (int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0)))


def torchvision_eval(image: np.ndarray, size: int = 224) -> np.ndarray:
    (height, width), (top, left) = torchvision_geometry(*image.shape[:2], size)
    resized = np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))
    return resized[top : top + size, left : left + size]


@pytest.mark.parametrize("height", [224, 256, 257, 300, 333, 375, 500, 501])
@pytest.mark.parametrize("width", [224, 255, 375, 500, 502, 640])
def test_eval_geometry_is_torchvisions(height, width):
    """Sizes whose long side has a fractional part above one half, and odd margins (e.g.
    502 -> 342.69 -> 342; 343 - 224 = 119 -> offset round(59.5) = 60, half to even)."""
    resized, offsets = crops.eval_geometry(tf.constant([height, width]), 224)
    expected_resized, expected_offsets = torchvision_geometry(height, width)
    assert tuple(resized.numpy()) == expected_resized
    assert tuple(offsets.numpy()) == expected_offsets


@pytest.mark.parametrize("shape", [(375, 500), (500, 375), (333, 502)])
def test_eval_crop_matches_torchvision_within_a_fraction_of_a_grey_level(shape):
    image = generated_image(*shape)
    ours = crops.resize_and_center_crop(tf.constant(image), 224).numpy()
    reference = torchvision_eval(image)
    difference = np.abs(ours.astype(np.int32) - reference)
    print(f"{shape}: mean |diff| {difference.mean():.3f}, max {difference.max()}")
    assert ours.shape == reference.shape == (224, 224, 3)
    assert difference.mean() <= MEAN_PIXEL_DIFFERENCE and difference.max() <= 2


@pytest.mark.parametrize("method", crops.INTERPOLATIONS)
def test_eval_crop_is_the_centre_of_the_whole_resize_within_one_grey_level(method):
    """resize_and_center_crop resizes only the central square; against resizing the whole
    image and cropping it, float rounding of the sample positions moves a few pixels by
    one grey level (measured: 0.03% of them on random pixels)."""
    moved = total = 0
    for index, (height, width) in enumerate([(375, 500), (500, 375), (333, 502), (257, 640)]):
        image = tf.constant(generated_image(height, width, seed=index))
        (resized_height, resized_width), (top, left) = torchvision_geometry(height, width)
        whole = tf.image.resize(image, [resized_height, resized_width], method, antialias=True)
        expected = crops.to_uint8(whole[top : top + 224, left : left + 224]).numpy()
        difference = np.abs(
            crops.resize_and_center_crop(image, 224, method).numpy().astype(int) - expected
        )
        assert difference.max() <= 1
        moved, total = moved + np.count_nonzero(difference), total + difference.size
    assert moved <= total / 1000


def test_jpeg_decoding_is_pils():
    """The accurate DCT gives PIL's pixels exactly; TensorFlow's default (fast) DCT does not."""
    buffer = io.BytesIO()
    Image.fromarray(generated_image(120, 160)).save(buffer, format="JPEG", quality=90)
    encoded = buffer.getvalue()
    pil = np.asarray(Image.open(io.BytesIO(encoded)).convert("RGB"))
    np.testing.assert_array_equal(crops.decode_jpeg(tf.constant(encoded)).numpy(), pil)
    assert not np.array_equal(tf.io.decode_jpeg(encoded, channels=3).numpy(), pil)


def torchvision_eval_bicubic_error(shape) -> np.ndarray:
    """|ours - PIL| of the bicubic evaluation crop (DeiT's `Resize(256, BICUBIC)`)."""
    image = generated_image(*shape)
    ours = crops.resize_and_center_crop(tf.constant(image), 224, "bicubic").numpy()
    (height, width), (top, left) = torchvision_geometry(*shape)
    resized = np.asarray(Image.fromarray(image).resize((width, height), Image.BICUBIC))
    return np.abs(ours.astype(np.int32) - resized[top : top + 224, left : left + 224])


def test_bicubic_eval_crop_matches_pils_bicubic_and_differs_from_bilinear():
    """TensorFlow's antialiased Keys cubic (a = -0.5) against PIL's fixed-point bicubic;
    measured mean |diff| 0.18 grey levels, at most 2, on the 500x375 image."""
    difference = torchvision_eval_bicubic_error((375, 500))
    print(f"bicubic mean |diff| {difference.mean():.3f}, max {difference.max()}")
    assert difference.mean() <= 2 * MEAN_PIXEL_DIFFERENCE and difference.max() <= 3
    image = tf.constant(generated_image(375, 500))
    bilinear = crops.resize_and_center_crop(image, 224).numpy().astype(int)
    bicubic = crops.resize_and_center_crop(image, 224, "bicubic").numpy().astype(int)
    assert np.abs(bicubic - bilinear).mean() > 1


def test_resizes_reject_an_unknown_interpolation():
    with pytest.raises(InputError, match="interpolation='lanczos' is not allowed"):
        crops.resize_square(tf.zeros([8, 8, 3], tf.uint8), 4, "lanczos")


# --- The training crop: torchvision's RandomResizedCrop --------------------------------

SEED = tf.constant([5, 9], tf.int64)


def torchvision_crop_window(height: int, width: int, rng: np.random.Generator) -> tuple:
    """torchvision's RandomResizedCrop.get_params(scale=(0.08, 1), ratio=(3/4, 4/3)) in
    numpy: (top, left, crop height, crop width)."""
    area = height * width
    for _ in range(10):
        target_area = area * rng.uniform(0.08, 1.0)
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        crop_width = int(round(math.sqrt(target_area * ratio)))
        crop_height = int(round(math.sqrt(target_area / ratio)))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            top = int(rng.integers(0, height - crop_height + 1))
            left = int(rng.integers(0, width - crop_width + 1))
            return top, left, crop_height, crop_width
    in_ratio = width / height
    if in_ratio < 3 / 4:
        crop_width, crop_height = width, int(round(width / (3 / 4)))
    elif in_ratio > 4 / 3:
        crop_height, crop_width = height, int(round(height * (4 / 3)))
    else:
        crop_width, crop_height = width, height
    return (height - crop_height) // 2, (width - crop_width) // 2, crop_height, crop_width


@functools.cache
def sampled_windows(height: int, width: int, count: int, seed: int = 3) -> np.ndarray:
    """`count` windows of crops.random_resized_crop_window, one per example seed."""
    shape = tf.constant([height, width, 3])
    seeds = tf.stack(
        [tf.range(count, dtype=tf.int64), tf.fill([count], tf.cast(seed, tf.int64))], 1
    )
    sample = tf.function(
        lambda seeds: tf.map_fn(
            lambda one: crops.random_resized_crop_window(shape, one),
            seeds,
            fn_output_signature=tf.int32,
        )
    )
    return sample(seeds).numpy()


def window_statistics(windows: np.ndarray, height: int, width: int) -> dict[str, np.ndarray]:
    crop_height, crop_width = windows[:, 2], windows[:, 3]
    return {
        "area": crop_height * crop_width / (height * width),
        "portrait": crop_height > crop_width,
        "log_ratio": np.log(crop_width / crop_height),
    }


def test_crop_window_distribution_is_torchvisions():
    """2000 draws on a 500x375 (W x H) image against torchvision's formula: mean area 0.43
    (TensorFlow's sample_distorted_bounding_box gave 0.37), the fraction of portrait crops,
    and the aspect ratio's distribution (log-uniform, less the tries that do not fit),
    by a two-sample Kolmogorov-Smirnov test. The standard error of the mean area is 0.006."""
    count, height, width = 2000, 375, 500
    ours = window_statistics(sampled_windows(height, width, count), height, width)
    rng = np.random.default_rng(0)
    reference = window_statistics(
        np.array([torchvision_crop_window(height, width, rng) for _ in range(count)]),
        height,
        width,
    )
    assert abs(ours["area"].mean() - reference["area"].mean()) < 0.025
    assert abs(ours["area"].mean() - 0.43) < 0.02
    assert abs(ours["portrait"].mean() - reference["portrait"].mean()) < 0.05
    assert 0.35 < ours["portrait"].mean() < 0.5
    assert stats.ks_2samp(ours["log_ratio"], reference["log_ratio"]).pvalue > 0.01
    assert stats.ks_2samp(ours["area"], reference["area"]).pvalue > 0.01


def test_crop_windows_lie_inside_the_image_at_every_offset():
    height, width = 375, 500
    windows = sampled_windows(height, width, 2000)
    top, left, crop_height, crop_width = windows.T
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + crop_height <= height).all() and (left + crop_width <= width).all()
    # Offsets uniform over the free range: their share of it averages 1/2.
    free_top, free_left = height - crop_height, width - crop_width
    assert abs(np.mean(top[free_top > 0] / free_top[free_top > 0]) - 0.5) < 0.03
    assert abs(np.mean(left[free_left > 0] / free_left[free_left > 0]) - 0.5) < 0.03


@pytest.mark.parametrize(("height", "width"), [(10, 1000), (1000, 10)])
def test_crop_window_falls_back_to_torchvisions_centre_crop(height, width):
    """No try fits a 10x1000 image (a crop of 8% of it at a ratio within [3/4, 4/3] is
    taller than 10 pixels), so the window is torchvision's central crop with the ratio
    clamped to 4/3 (3/4 for the transpose): (0, 493, 10, 13)."""
    window = tuple(crops.random_resized_crop_window(tf.constant([height, width, 3]), SEED).numpy())
    assert window == torchvision_crop_window(height, width, np.random.default_rng(0))
    assert window in ((0, 493, 10, 13), (493, 0, 13, 10))


def test_crop_window_is_a_pure_function_of_the_seed():
    shape = tf.constant([375, 500, 3])
    first = crops.random_resized_crop_window(shape, SEED).numpy()
    np.testing.assert_array_equal(crops.random_resized_crop_window(shape, SEED).numpy(), first)
    other = crops.random_resized_crop_window(shape, tf.constant([6, 9], tf.int64)).numpy()
    assert not np.array_equal(first, other)


def test_training_crop_decodes_the_window_of_the_jpeg():
    """imagenet_train's pixels are the window of the decoded image, resized, then
    flipped or not."""
    buffer = io.BytesIO()
    image = generated_image(120, 160)
    Image.fromarray(image).save(buffer, format="JPEG", quality=95)
    encoded = tf.constant(buffer.getvalue())
    window_seed, _ = tf.unstack(tf.random.experimental.stateless_split(SEED, 2))
    top, left, crop_height, crop_width = crops.random_resized_crop_window(
        tf.constant([120, 160, 3]), window_seed
    ).numpy()
    decoded = crops.decode_jpeg(encoded).numpy()[top : top + crop_height, left : left + crop_width]
    expected = crops.resize_square(tf.constant(decoded), 48, "bicubic").numpy()
    ours = crops.imagenet_train(encoded, SEED, 48, "bicubic").numpy()
    assert any(np.array_equal(ours, candidate) for candidate in (expected, expected[:, ::-1]))
