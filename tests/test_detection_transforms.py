"""Tests for mokd_jax.detection.transforms: torchvision's resize rule and pixels (parity with
`GeneralizedRCNNTransform.resize` on random images), boxes that follow the pixels through
resize, flip and pad, and static shapes."""

import numpy as np
import pytest

from mokd_jax.detection import transforms
from mokd_jax.detection.transforms import Geometry
from mokd_jax.errors import InputError

# (height, width), (min_size, max_size): upscaling bound by min_size or by max_size,
# downscaling, portrait, and no change.
CASES = [
    ((48, 64), (80, 133)),
    ((97, 31), (40, 70)),
    ((120, 90), (50, 1000)),
    ((37, 113), (64, 96)),
    ((64, 64), (64, 64)),
]
# Rounding to uint8 moves a pixel by up to 0.5; float32 arithmetic in another order (torch
# interpolates in 2-D at once, this module one axis at a time) by a few thousandths more.
PIXEL_TOLERANCE = 0.51


def _random_boxes(rng, height, width, count):
    corners = rng.uniform(0, 1, (count, 2, 2)) * np.float32([width, height])
    return np.concatenate([corners.min(axis=1), corners.max(axis=1)], axis=1).astype(np.float32)


@pytest.mark.parametrize(("shape", "sizes"), CASES)
def test_resize_matches_torchvision(shape, sizes):
    torch = pytest.importorskip("torch")
    from torchvision_shim import import_torchvision

    detection_transform = import_torchvision().models.detection.transform
    reference = detection_transform.GeneralizedRCNNTransform(*sizes, [0.0] * 3, [1.0] * 3).eval()
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    boxes = _random_boxes(rng, *shape, 5)
    expected_image, target = reference.resize(
        torch.from_numpy(image).permute(2, 0, 1).float(), {"boxes": torch.from_numpy(boxes)}
    )
    resized, resized_boxes, scale = transforms.resize(image, boxes, *sizes)
    expected = expected_image.permute(1, 2, 0).numpy()
    assert resized.shape == expected.shape
    assert np.abs(resized - expected).max() <= PIXEL_TOLERANCE
    np.testing.assert_array_equal(resized_boxes, target["boxes"].numpy())
    assert scale == min(sizes[0] / min(shape), sizes[1] / max(shape))


def test_resized_shape_by_hand():
    # COCO's usual 480x640 with 800/1333: the shorter side rules.
    assert transforms.resized_shape(480, 640, 800, 1333) == (800, 1066, 800 / 480)
    # A panorama: the longer side would pass 1333, so it rules instead.
    assert transforms.resized_shape(200, 1000, 800, 1333) == (266, 1333, 1.333)


def _rectangle_image(shape, box):
    image = np.zeros((*shape, 3), np.uint8)
    x1, y1, x2, y2 = box
    image[y1:y2, x1:x2] = 255
    return image


def _bright_box(image):
    """[x1, y1, x2, y2] pixel edges of the pixels brighter than half."""
    rows, columns = np.nonzero(image[..., 0] > 127)
    return np.float32([columns.min(), rows.min(), columns.max() + 1, rows.max() + 1])


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize(("shape", "sizes"), CASES)
def test_boxes_follow_the_pixels(shape, sizes, flip):
    # A bilinear resize makes an output pixel brighter than half exactly when its centre
    # maps inside the drawn rectangle, so the bright pixels' edges lie within half a pixel
    # of the transformed box, whatever the scale, flip and padding.
    height, width = shape
    box = (width // 5, height // 4, width - width // 3, height - 2)
    geometry = Geometry(*sizes, max_boxes=3)
    example = transforms.prepare(
        _rectangle_image(shape, box), np.float32([box]), np.int32([2]), geometry, flip
    )
    np.testing.assert_allclose(_bright_box(example.image), example.boxes[0], atol=0.5 + 1e-4)
    assert example.labels.tolist() == [2, 0, 0]
    assert example.box_mask.tolist() == [True, False, False]


@pytest.mark.parametrize(("shape", "sizes"), CASES)
def test_shapes_are_static_and_padding_is_zero(shape, sizes):
    geometry = Geometry(*sizes, max_boxes=6)
    rng = np.random.default_rng(1)
    image = rng.integers(1, 256, (*shape, 3), dtype=np.uint8)
    example = transforms.prepare(
        image, _random_boxes(rng, *shape, 4), np.int32([0, 1, 2, 3]), geometry, True
    )
    side = geometry.padded_side
    assert example.image.shape == (side, side, 3) and example.image.dtype == np.uint8
    assert example.boxes.shape == (6, 4) and example.boxes.dtype == np.float32
    assert example.labels.shape == (6,) and example.labels.dtype == np.int32
    assert example.box_mask.tolist() == [True] * 4 + [False] * 2
    new_height, new_width, scale = transforms.resized_shape(*shape, *sizes)
    assert example.image_size.tolist() == [new_height, new_width]
    assert example.scale == np.float32(scale)
    assert example.image[:new_height, :new_width].min() > 0
    assert not example.image[new_height:].any() and not example.image[:, new_width:].any()
    assert not example.boxes[4:].any()


def test_flipping_twice_is_the_identity():
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, (23, 41, 3), dtype=np.uint8)
    boxes = _random_boxes(rng, 23, 41, 7)
    flipped_image, flipped_boxes = transforms.flip_horizontally(image, boxes)
    assert not np.array_equal(flipped_image, image)
    again_image, again_boxes = transforms.flip_horizontally(flipped_image, flipped_boxes)
    np.testing.assert_array_equal(again_image, image)
    # width - (width - x) is x up to float32 rounding.
    np.testing.assert_allclose(again_boxes, boxes, rtol=0, atol=1e-5)


def test_flip_by_hand():
    image = np.zeros((4, 10, 3), np.uint8)
    _, boxes = transforms.flip_horizontally(image, np.float32([[1, 0, 3, 2]]))
    assert boxes.tolist() == [[7, 0, 9, 2]]


def test_padded_side_is_max_size_rounded_up_to_32():
    assert Geometry(800, 1333).padded_side == 1344
    assert Geometry(128, 128).image_shape == (128, 128, 3)
    assert Geometry(100, 129).padded_side == 160


def test_more_boxes_than_max_boxes_is_an_error():
    geometry = Geometry(16, 16, max_boxes=2)
    with pytest.raises(InputError, match=r"max_boxes=2 is not allowed: at least 3"):
        transforms.prepare(
            np.zeros((16, 16, 3), np.uint8), np.ones((3, 4)), np.zeros(3), geometry, False
        )


@pytest.mark.parametrize("field", ["min_size", "max_size", "max_boxes"])
def test_geometry_checks_its_fields(field):
    with pytest.raises(InputError, match=f"{field}=0 is not allowed: an integer >= 1"):
        Geometry(**{field: 0})


def test_a_drawn_shorter_side_replaces_min_size_and_keeps_the_padded_shape():
    geometry = Geometry(32, 64, train_min_sizes=(16, 24))
    image = np.zeros((40, 60, 3), np.uint8)
    boxes = np.float32([[10, 20, 30, 40]])
    example = transforms.prepare(image, boxes, np.zeros(1), geometry, False, min_size=24)
    assert tuple(example.image_size) == (24, 36) and example.scale == np.float32(0.6)
    np.testing.assert_allclose(example.boxes[0], [6, 12, 18, 24], rtol=1e-6)
    assert example.image.shape == geometry.image_shape == (64, 64, 3)
    evaluated = transforms.prepare(image, boxes, np.zeros(1), geometry, False)
    assert tuple(evaluated.image_size) == (32, 48)
    assert geometry.training_min_sizes == (16, 24)
    assert Geometry(32, 64).training_min_sizes == (32,)


@pytest.mark.parametrize(
    "sizes, message",
    [((16, 0), r"^train_min_sizes=0 .*>= 1"), ([16], r"^train_min_sizes=\[16\] .*a tuple")],
)
def test_geometry_checks_its_training_sizes(sizes, message):
    with pytest.raises(InputError, match=message):
        Geometry(train_min_sizes=sizes)
