"""RetinaNet's anchors on pyramid levels P3-P7, in the order of torchvision's
`AnchorGenerator` (level by level; within a level, locations row-major; at each location
the 9 anchors ratio-major: heights/widths 0.5, 1, 2, each at the level's 3 sizes).

Anchors depend only on the padded image size, a static shape, so they are numpy constants
computed at trace time: a jitted step embeds them and compiles once per image size.

Two choices reproduce torchvision exactly, so that its pretrained heads convert unchanged:
the in-between sizes are truncated to integers (a level of base size 32 has sizes 32, 40,
50, not 32, 40.3, 50.8), and the anchor spacing of a level is the integer division of the
image size by the level's feature-map size. For a padded size divisible by 128 that is
the level's stride; otherwise the feature map has ceil(size / stride) cells and the
spacing can come out smaller (a 100-pixel side: 13 cells on P3, 7 pixels apart).
"""

import numpy as np

from mokd_jax.checks import check_int

STRIDES = (8, 16, 32, 64, 128)
"""Downsampling factor of P3, P4, P5, P6, P7."""

BASE_SIZES = (32, 64, 128, 256, 512)
"""Anchor side of each level at scale 1 and aspect ratio 1, in pixels."""

SCALE_STEPS = 3
"""Sizes per level: base * 2^(k / 3) for k = 0, 1, 2 (one octave in thirds)."""

ASPECT_RATIOS = (0.5, 1.0, 2.0)
"""Anchor height / width."""

ANCHORS_PER_LOCATION = SCALE_STEPS * len(ASPECT_RATIOS)


def level_sizes(base_size: int) -> tuple[int, ...]:
    """The anchor sizes of a level: base * 2^(k / 3), truncated to integers as torchvision."""
    return tuple(int(base_size * 2 ** (step / SCALE_STEPS)) for step in range(SCALE_STEPS))


def cell_anchors(sizes: tuple[int, ...]) -> np.ndarray:
    """Anchors [ratios x sizes, 4] centred on (0, 0), ratio-major, corners rounded to whole
    pixels; float32 throughout so that roundings match torchvision's."""
    sizes = np.asarray(sizes, np.float32)
    height_factors = np.sqrt(np.asarray(ASPECT_RATIOS, np.float32))
    widths = ((1 / height_factors)[:, None] * sizes[None, :]).reshape(-1)
    heights = (height_factors[:, None] * sizes[None, :]).reshape(-1)
    return np.round(np.stack([-widths, -heights, widths, heights], axis=1) / 2)


def feature_map_sizes(image_size: tuple[int, int]) -> tuple[tuple[int, int], ...]:
    """(height, width) of P3-P7 for a padded image (height, width): ceil(side / stride), as
    the stride-2 convolutions (kernel 3, padding 1; ResNet's 7x7 stem and max-pool
    likewise) round up at every halving."""
    for axis, side in enumerate(image_size):
        check_int(f"image_size[{axis}]", side, 1)
    return tuple((-(-image_size[0] // s), -(-image_size[1] // s)) for s in STRIDES)


def grid_anchors(
    cell: np.ndarray, grid_size: tuple[int, int], spacing: tuple[int, int]
) -> np.ndarray:
    """`cell` [A, 4] shifted to every location of a grid (rows, columns) `spacing` (y, x)
    pixels apart: [rows * columns * A, 4], locations row-major."""
    shifts_y = np.arange(grid_size[0], dtype=np.float32) * spacing[0]
    shifts_x = np.arange(grid_size[1], dtype=np.float32) * spacing[1]
    shift_y, shift_x = np.meshgrid(shifts_y, shifts_x, indexing="ij")
    shifts = np.stack([shift_x, shift_y, shift_x, shift_y], axis=-1).reshape(-1, 1, 4)
    return (shifts + cell[None]).reshape(-1, 4)


def retinanet_anchors(image_size: tuple[int, int]) -> np.ndarray:
    """All anchors [N, 4] (float32, [x1, y1, x2, y2]) of a padded image (height, width), in
    the order of the head's outputs; N = 9 * sum of the levels' feature-map areas."""
    levels = []
    for base_size, grid_size in zip(BASE_SIZES, feature_map_sizes(image_size), strict=True):
        spacing = (image_size[0] // grid_size[0], image_size[1] // grid_size[1])
        levels.append(grid_anchors(cell_anchors(level_sizes(base_size)), grid_size, spacing))
    return np.concatenate(levels).astype(np.float32)
