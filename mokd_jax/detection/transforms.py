"""Per-image geometry of the detection inputs, on the host in numpy: resize, flip, pad.

One image with its boxes ([x1, y1, x2, y2] in pixels, edges not centres) becomes an
`Example` of static shape: the image resized by torchvision's `GeneralizedRCNNTransform`
rule, optionally flipped, zero-padded to `Geometry.image_shape`, and its boxes padded to
`Geometry.max_boxes` rows with a mask.

Choices:
  - Numpy, not TensorFlow: the embedded shapes set then trains without importing TensorFlow
    (seconds), and the same functions serve the TFDS path after tf.data decodes.
  - The resize is torchvision's to the pixel count: the scale is min(min_size / shorter
    side, max_size / longer side) in double precision and each side becomes
    floor(side * scale), as `torch.nn.functional.interpolate` computes it; the pixels are
    its bilinear interpolation without antialiasing (half-pixel centres, source index
    clamped at 0), rounded to uint8. Boxes are scaled by new / old size on each axis in
    float32, as torchvision's `resize_boxes`, so they follow the pixels exactly; the single
    `scale` reported is the one the sides were computed from.
  - Only the aspect-preserving resize: a fixed size that distorts the aspect ratio would
    need one scale per axis, which `DetectionBatch.scales` cannot hold. min_size ==
    max_size gives a letterboxed square (longer side == the size).
  - The padded shape is square, ceil32(max_size) on each side: every resized side is at
    most max_size, portrait or landscape, so one shape holds both; 32 is torchvision's
    `size_divisible`.
  - Multi-scale training (`Geometry.train_min_sizes`, the 1x COCO recipes' shorter sides
    640 to 800): each training image's shorter side is one of those, the longer side still
    at most max_size, so the padded shape stays the same and steps compile once.
    Evaluation keeps min_size.
  - Randomness stays with the caller: `prepare` takes the flip and the shorter side, so
    this module is deterministic and the datasets draw decisions from their (seed, step)
    streams.
"""

import dataclasses
import math
from typing import NamedTuple

import numpy as np

from mokd_jax.checks import check_int
from mokd_jax.errors import invalid

SIZE_DIVISIBLE = 32


@dataclasses.dataclass(frozen=True)
class Geometry:
    """How images are resized and padded: shorter side to `min_size` unless the longer
    would pass `max_size`; at most `max_boxes` boxes per image (COCO 2017 has at most 93
    annotations on an image, so 100 holds it). `train_min_sizes`: the shorter sides a
    training image is drawn to (multi-scale training; empty: `min_size`)."""

    min_size: int = 800
    max_size: int = 1333
    max_boxes: int = 100
    train_min_sizes: tuple[int, ...] = ()

    def __post_init__(self):
        check_int("min_size", self.min_size, 1)
        check_int("max_size", self.max_size, 1)
        check_int("max_boxes", self.max_boxes, 1)
        if not isinstance(self.train_min_sizes, tuple):
            raise invalid("train_min_sizes", self.train_min_sizes, "a tuple of integers >= 1")
        for size in self.train_min_sizes:
            check_int("train_min_sizes", size, 1)

    @property
    def training_min_sizes(self) -> tuple[int, ...]:
        """The shorter sides a training image is drawn from: `train_min_sizes`, or
        `min_size` alone."""
        return self.train_min_sizes or (self.min_size,)

    @property
    def padded_side(self) -> int:
        return -(-self.max_size // SIZE_DIVISIBLE) * SIZE_DIVISIBLE

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, 3) of every padded image."""
        return (self.padded_side, self.padded_side, 3)


class Example(NamedTuple):
    """One image as a batch row holds it (see `mokd_jax.detection.batch.DetectionBatch`)."""

    image: np.ndarray  # uint8 [S, S, 3]
    boxes: np.ndarray  # float32 [M, 4]
    labels: np.ndarray  # int32 [M]
    box_mask: np.ndarray  # bool [M]
    scale: np.float32
    image_size: np.ndarray  # int32 [2]: (height, width) after the resize


def resized_shape(height: int, width: int, min_size: int, max_size: int) -> tuple[int, int, float]:
    """(new height, new width, scale) by torchvision's rule (module docstring)."""
    scale = min(min_size / min(height, width), max_size / max(height, width))
    return math.floor(height * scale), math.floor(width * scale), scale


def _source_positions(old: int, new: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each of `new` output pixels along an axis: the two input pixels it lies between
    and the weight of the second, as torch's bilinear kernel computes them in float32."""
    ratio = np.float32(old) / np.float32(new)
    centres = (np.arange(new, dtype=np.float32) + np.float32(0.5)) * ratio - np.float32(0.5)
    centres = np.maximum(centres, np.float32(0))
    first = centres.astype(np.int64)
    second = np.minimum(first + 1, old - 1)
    return first, second, (centres - first).astype(np.float32)


def resize_image(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 [H, W, C] -> uint8 [height, width, C], bilinear, one axis at a time."""
    top, bottom, row_weight = _source_positions(image.shape[0], height)
    left, right, column_weight = _source_positions(image.shape[1], width)
    pixels = image.astype(np.float32)
    rows = pixels[top] + (pixels[bottom] - pixels[top]) * row_weight[:, None, None]
    resized = rows[:, left] + (rows[:, right] - rows[:, left]) * column_weight[None, :, None]
    return np.clip(np.rint(resized), 0, 255).astype(np.uint8)


def resize(
    image: np.ndarray, boxes: np.ndarray, min_size: int, max_size: int
) -> tuple[np.ndarray, np.ndarray, float]:
    """(resized image, boxes scaled with it, scale)."""
    height, width = image.shape[:2]
    new_height, new_width, scale = resized_shape(height, width, min_size, max_size)
    ratios = np.float32([new_width, new_height, new_width, new_height]) / np.float32(
        [width, height, width, height]
    )
    return resize_image(image, new_height, new_width), boxes * ratios, scale


def flip_horizontally(image: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mirror left-right: x becomes width - x, so x1 and x2 swap roles."""
    width = np.float32(image.shape[1])
    x1, y1, x2, y2 = np.moveaxis(boxes, -1, 0)
    return image[:, ::-1], np.stack([width - x2, y1, width - x1, y2], axis=-1)


def pad(
    image: np.ndarray, boxes: np.ndarray, labels: np.ndarray, geometry: Geometry
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(image zero-padded at the bottom and right to geometry.image_shape, boxes [M, 4],
    labels [M], box_mask [M]) with M = geometry.max_boxes."""
    count = len(boxes)
    if count > geometry.max_boxes:
        raise invalid(
            "max_boxes", geometry.max_boxes, f"at least {count}: an image has {count} boxes"
        )
    height, width = image.shape[:2]
    padded_image = np.zeros(geometry.image_shape, np.uint8)
    padded_image[:height, :width] = image
    padded_boxes = np.zeros((geometry.max_boxes, 4), np.float32)
    padded_boxes[:count] = boxes
    padded_labels = np.zeros(geometry.max_boxes, np.int32)
    padded_labels[:count] = labels
    return padded_image, padded_boxes, padded_labels, np.arange(geometry.max_boxes) < count


def prepare(
    image: np.ndarray,
    boxes: np.ndarray,
    labels: np.ndarray,
    geometry: Geometry,
    flip: bool,
    min_size: int | None = None,
) -> Example:
    """Resize (shorter side to `min_size`, by default `geometry.min_size`; a training
    image's is drawn from `geometry.training_min_sizes`), flip if `flip` (training), pad:
    image uint8 [H, W, 3] with boxes float32 [K, 4] in its pixels and labels [K] -> an
    `Example`."""
    image, boxes, scale = resize(
        image, boxes.astype(np.float32), min_size or geometry.min_size, geometry.max_size
    )
    if flip:
        image, boxes = flip_horizontally(image, boxes)
    size = np.int32(image.shape[:2])
    padded_image, padded_boxes, padded_labels, box_mask = pad(image, boxes, labels, geometry)
    return Example(padded_image, padded_boxes, padded_labels, box_mask, np.float32(scale), size)
