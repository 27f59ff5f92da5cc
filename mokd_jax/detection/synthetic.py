"""A small detection set of coloured shapes on textured backgrounds, generated on the spot
in COCO's format, so detection trains and evaluates with no download.

`write(directory)` draws PNG images (`train/000001.png`, ...) and writes `train.json` and
`val.json` beside them, which `mokd_jax.detection.coco_json` reads like any COCO set.

Choices:
  - Four classes (circle, square, triangle, cross) with the non-contiguous ids 1, 3, 7, 12,
    so the id <-> label mapping is exercised as on COCO; colours are drawn independently of
    the class, so only the shape tells the class.
  - Backgrounds are grey (a coarse random texture plus pixel noise, channels within 20 grey
    levels of each other) and shapes strongly coloured (channels at least 100 apart): a
    detector must find shapes among clutter, and a test can still find every shape's
    pixels by their saturation.
  - Shapes do not overlap (each sits in its own square, kept 2 px from the others), so a
    box is the tight box of all its shape's pixels: it is computed from the drawn mask.
  - A few objects (`crowd_fraction`) are marked `iscrowd`, as COCO's crowd regions: not
    trained on, ignored by COCOeval.
  - Image k of a split is a pure function of (seed, split, k), so the set is the same
    whatever the number of threads drawing it. PNG, not JPEG: lossless, so boxes stay
    exactly tight on the stored pixels.
"""

import concurrent.futures
import functools
import json
import os
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image

from mokd_jax.checks import check_int, check_range

CATEGORIES = (
    {"id": 1, "name": "circle", "supercategory": "shape"},
    {"id": 3, "name": "square", "supercategory": "shape"},
    {"id": 7, "name": "triangle", "supercategory": "shape"},
    {"id": 12, "name": "cross", "supercategory": "shape"},
)
SPLIT_NAMES = ("train", "val")
MIN_SIDE = 12  # the smallest shape's square, in pixels
MARGIN = 2  # pixels kept free between two shapes' squares
MAX_OBJECTS = 4
PLACEMENT_TRIES = 20
NOISE = 10  # background channels differ by at most 2 * NOISE


def _centred(side: int) -> tuple[np.ndarray, np.ndarray]:
    """(y, x) of pixel centres in a side x side square, relative to its centre."""
    coordinates = np.arange(side) + 0.5 - side / 2
    return coordinates[:, None], coordinates[None, :]


def circle(side: int) -> np.ndarray:
    y, x = _centred(side)
    return x**2 + y**2 <= (side / 2) ** 2


def square(side: int) -> np.ndarray:
    return np.ones((side, side), bool)


def triangle(side: int) -> np.ndarray:
    """Apex at the top centre, base along the bottom row."""
    y, x = _centred(side)
    return np.abs(x) <= (y + side / 2) / 2


def cross(side: int) -> np.ndarray:
    """A plus sign with arms a third of the side wide."""
    y, x = _centred(side)
    return (np.abs(x) <= side / 6) | (np.abs(y) <= side / 6)


# Indexed like CATEGORIES.
SHAPES: tuple[Callable[[int], np.ndarray], ...] = (circle, square, triangle, cross)


def background(rng: np.random.Generator, size: int) -> np.ndarray:
    """uint8 [size, size, 3]: a grey texture of 8x8 cells, each channel of each pixel moved
    by up to NOISE grey levels."""
    cells = rng.integers(60, 190, (8, 8), dtype=np.int16)
    cell_side = -(-size // 8)
    texture = np.repeat(np.repeat(cells, cell_side, 0), cell_side, 1)[:size, :size]
    noise = rng.integers(-NOISE, NOISE + 1, (size, size, 3), dtype=np.int16)
    return (texture[..., None] + noise).clip(0, 255).astype(np.uint8)


def colour(rng: np.random.Generator) -> np.ndarray:
    """A saturated RGB colour: one channel high, one low, the third anywhere."""
    high, low, middle = rng.integers(170, 256), rng.integers(0, 70), rng.integers(0, 256)
    return np.array([high, low, middle])[rng.permutation(3)].astype(np.uint8)


def _free_square(
    rng: np.random.Generator, size: int, side: int, taken: list[tuple[int, int, int]]
) -> tuple[int, int] | None:
    """A top-left (y, x) for a side x side square clear of `taken` (y, x, side) ones by
    MARGIN, or None after PLACEMENT_TRIES tries."""
    for _ in range(PLACEMENT_TRIES):
        y, x = rng.integers(0, size - side + 1, 2)
        if all(
            y + side + MARGIN <= other_y
            or other_y + other_side + MARGIN <= y
            or x + side + MARGIN <= other_x
            or other_x + other_side + MARGIN <= x
            for other_y, other_x, other_side in taken
        ):
            return int(y), int(x)
    return None


def tight_box(mask: np.ndarray, top: int, left: int) -> list[int]:
    """COCO's [x, y, width, height] of the pixels of `mask` placed at (top, left)."""
    rows, columns = np.nonzero(mask)
    x, y = left + int(columns.min()), top + int(rows.min())
    return [x, y, left + int(columns.max()) + 1 - x, top + int(rows.max()) + 1 - y]


def draw(
    rng: np.random.Generator, size: int, crowd_fraction: float
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """(image uint8 [size, size, 3], its objects as partial COCO annotations: category_id,
    bbox, area, iscrowd)."""
    image = background(rng, size)
    taken: list[tuple[int, int, int]] = []
    objects = []
    for _ in range(rng.integers(1, MAX_OBJECTS + 1)):
        category = int(rng.integers(len(CATEGORIES)))
        side = int(rng.integers(MIN_SIDE, max(MIN_SIDE, size * 3 // 8) + 1))
        corner = _free_square(rng, size, side, taken)
        if corner is None:
            continue
        y, x = corner
        taken.append((y, x, side))
        mask = SHAPES[category](side)
        image[y : y + side, x : x + side][mask] = colour(rng)
        objects.append(
            {
                "category_id": CATEGORIES[category]["id"],
                "bbox": tight_box(mask, y, x),
                "area": int(mask.sum()),
                "iscrowd": int(rng.random() < crowd_fraction),
            }
        )
    return image, objects


def _write_image(
    directory: str, file_name: str, seed_key: list[int], size: int, crowd_fraction: float
) -> list[dict[str, Any]]:
    """Draws the image of `seed_key`, saves it as DIR/file_name; returns its objects."""
    image, objects = draw(np.random.default_rng(seed_key), size, crowd_fraction)
    Image.fromarray(image).save(os.path.join(directory, file_name), compress_level=1)
    return objects


def write_split(
    directory: str,
    split: str,
    count: int,
    first_image_id: int,
    *,
    seed: int,
    image_size: int,
    crowd_fraction: float,
    workers: int,
) -> dict[str, Any]:
    """Draws `count` images into DIR/split/ and returns the split's COCO dict (image ids
    from `first_image_id` on; annotation ids from 1 within the split)."""
    os.makedirs(os.path.join(directory, split), exist_ok=True)
    file_names = [f"{split}/{index:06d}.png" for index in range(1, count + 1)]
    seed_keys = [[seed, SPLIT_NAMES.index(split), index] for index in range(count)]
    write_one = functools.partial(
        _write_image, directory, size=image_size, crowd_fraction=crowd_fraction
    )
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        drawn = list(pool.map(write_one, file_names, seed_keys))
    images, annotations = [], []
    for index, (file_name, objects) in enumerate(zip(file_names, drawn, strict=True)):
        image_id = first_image_id + index
        images.append(
            {"id": image_id, "file_name": file_name, "width": image_size, "height": image_size}
        )
        for annotation in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, **annotation})
    return {"images": images, "annotations": annotations, "categories": list(CATEGORIES)}


def write(
    directory: str,
    *,
    seed: int = 0,
    num_train: int = 1000,
    num_val: int = 200,
    image_size: int = 128,
    crowd_fraction: float = 0.02,
    workers: int = 4,
) -> str:
    """Writes the shapes set into `directory` (created if needed; files of an earlier call
    are overwritten) and returns it. Deterministic in its arguments (bar `workers`)."""
    check_int("seed", seed, 0)
    check_int("num_train", num_train, 1)
    check_int("num_val", num_val, 1)
    check_int("image_size", image_size, 2 * MIN_SIDE)
    check_range("crowd_fraction", crowd_fraction, 0, 1)
    check_int("workers", workers, 1)
    counts = {"train": num_train, "val": num_val}
    first_ids = {"train": 1, "val": num_train + 1}
    for split in SPLIT_NAMES:
        coco = write_split(
            directory,
            split,
            counts[split],
            first_ids[split],
            seed=seed,
            image_size=image_size,
            crowd_fraction=crowd_fraction,
            workers=workers,
        )
        with open(os.path.join(directory, f"{split}.json"), "w", encoding="utf-8") as file:
            json.dump(coco, file)
    return directory
