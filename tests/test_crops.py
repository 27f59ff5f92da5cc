"""mokd_jax.data.crops against the PyTorch evaluation input path: PIL's JPEG decoding, and
torchvision's `Resize(256)` + `CenterCrop(224)` on a PIL image, written here with PIL.

torchvision on a PIL image: the shorter side becomes 256 and the longer int(256 * long /
short), resized by PIL's `resize((w, h), Image.BILINEAR)` (antialiased when shrinking);
then the crop at offsets int(round((side - 224) / 2.0)). The geometry must match exactly;
the pixels differ by the two bilinear implementations (TensorFlow's float antialiased
kernel against PIL's fixed-point one): measured mean |difference| 0.16 to 0.17 grey levels,
at most 1, on the generated 500x375, 375x500 and 333x502 images below.
"""

import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from mokd_jax.data import crops

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


def test_jpeg_decoding_is_pils():
    """The accurate DCT gives PIL's pixels exactly; TensorFlow's default (fast) DCT does not."""
    buffer = io.BytesIO()
    Image.fromarray(generated_image(120, 160)).save(buffer, format="JPEG", quality=90)
    encoded = buffer.getvalue()
    pil = np.asarray(Image.open(io.BytesIO(encoded)).convert("RGB"))
    np.testing.assert_array_equal(crops.decode_jpeg(tf.constant(encoded)).numpy(), pil)
    assert not np.array_equal(tf.io.decode_jpeg(encoded, channels=3).numpy(), pil)
