"""Reading a COCO instances JSON (`DIR/train.json`, `DIR/val.json`) into arrays.

A split becomes a `CocoSplit`: one row per image (file path, COCO id, size) and the
images' annotations as one flat table (boxes, labels, crowd flags) cut by `row_splits`,
which holds COCO's 860k training annotations in a few arrays instead of a million dicts.

Choices, as torchvision's detection references make them unless said otherwise:
  - Boxes go from COCO's [x, y, width, height] to [x1, y1, x2, y2] pixels in float32, are
    clamped to the image and dropped where x2 <= x1 or y2 <= y1 (a box of no area teaches
    nothing and breaks IoU). The dropped count is logged.
  - Category ids, not contiguous in COCO (1..90 for 80 classes), map to contiguous labels
    in [0, C) in ascending id order; `Categories.ids` maps them back for the predictions.
  - Crowd annotations (`iscrowd` 1: a region of many objects) stay in the table with their
    flag: they are never training targets, and COCOeval ignores detections on them, which
    it learns from the ground-truth JSON itself.
  - Images without annotations are kept in both splits (torchvision drops them from
    training): an image of background is a valid training example for a dense detector,
    and the TFDS path, which streams, could not drop them without changing its epochs.
  - Everything the readers rely on is checked when the file is read, so a bad file fails at
    once with the record and field named, not at some step of training.
"""

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
from absl import logging

from mokd_jax.errors import invalid

SPLITS = ("train", "val")
# The keys each record must have: what the readers and pycocotools' COCOeval use.
REQUIRED_KEYS = {
    "images": ("id", "file_name", "width", "height"),
    "annotations": ("id", "image_id", "category_id", "bbox", "area", "iscrowd"),
    "categories": ("id", "name"),
}


class Categories(NamedTuple):
    """The classes: label i is COCO category ids[i], named names[i]; ids ascend."""

    ids: tuple[int, ...]
    names: tuple[str, ...]


@dataclasses.dataclass(frozen=True, eq=False)
class CocoSplit:
    """One split's images and annotations (module docstring)."""

    paths: tuple[str, ...]  # image files
    image_ids: np.ndarray  # int64 [N]
    image_sizes: np.ndarray  # int32 [N, 2]: (height, width) as the JSON gives them
    row_splits: np.ndarray  # int64 [N + 1]: image i's annotations are rows splits[i]:splits[i+1]
    boxes: np.ndarray  # float32 [K, 4]: [x1, y1, x2, y2] pixels, inside the image, area > 0
    labels: np.ndarray  # int32 [K]: contiguous, in [0, len(categories.ids))
    is_crowd: np.ndarray  # bool [K]
    categories: Categories

    def __len__(self) -> int:
        return len(self.paths)

    def targets(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(boxes [k, 4], labels [k]) of image `index`, crowd annotations left out."""
        rows = slice(self.row_splits[index], self.row_splits[index + 1])
        keep = ~self.is_crowd[rows]
        return self.boxes[rows][keep], self.labels[rows][keep]

    def target_counts(self) -> np.ndarray:
        """int64 [N]: each image's training targets (annotations less crowd ones)."""
        owners = np.repeat(np.arange(len(self)), np.diff(self.row_splits))
        return np.bincount(owners[~self.is_crowd], minlength=len(self))


def json_path(directory: str, split: str) -> str:
    return os.path.join(directory, f"{split}.json")


def load_json(directory: str, split: str) -> dict[str, Any]:
    """The parsed `DIR/{split}.json`, its sections and records' keys checked."""
    path = json_path(directory, split)
    if not os.path.isfile(path):
        raise invalid(
            "data_dir", directory, f"a folder holding {', '.join(f'{s}.json' for s in SPLITS)}"
        )
    logging.info("reading %s", path)
    with open(path, encoding="utf-8") as file:
        try:
            coco = json.load(file)
        except json.JSONDecodeError as error:
            raise invalid(path, f"line {error.lineno}", f"valid JSON ({error.msg})") from None
    if not isinstance(coco, dict):
        raise invalid(
            path, type(coco).__name__, "a JSON object with images, annotations, categories"
        )
    for section, keys in REQUIRED_KEYS.items():
        records = coco.get(section)
        if not isinstance(records, list):
            raise invalid(f"{path}: {section}", type(records).__name__, "a list of records")
        _check_keys(records, keys, f"{path}: {section}")
    return coco


def _check_keys(records: list, keys: Sequence[str], field: str) -> None:
    for index, record in enumerate(records):
        if not isinstance(record, dict) or not set(keys) <= record.keys():
            present = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise invalid(f"{field}[{index}] keys", present, f"a record with {', '.join(keys)}")


def categories(coco: dict[str, Any], path: str) -> Categories:
    """The split's classes, by ascending category id."""
    ids = [record["id"] for record in coco["categories"]]
    if len(set(ids)) != len(ids) or not all(isinstance(i, int) for i in ids):
        raise invalid(f"{path}: categories ids", ids, "distinct integers")
    records = sorted(coco["categories"], key=lambda record: record["id"])
    return Categories(
        tuple(record["id"] for record in records), tuple(str(record["name"]) for record in records)
    )


def _image_table(coco: dict[str, Any], path: str) -> tuple[np.ndarray, np.ndarray]:
    """(ids int64 [N], sizes int32 [N, 2]) in file order."""
    images = coco["images"]
    ids = np.array([image["id"] for image in images], np.int64)
    sizes = np.array([(image["height"], image["width"]) for image in images], np.int64)
    distinct, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        raise invalid(
            f"{path}: images id", int(distinct[np.argmax(counts > 1)]), "each image id once"
        )
    if len(sizes) and sizes.min() < 1:
        index = int(np.argmin(sizes.min(axis=1)))
        raise invalid(f"{path}: images[{index}] size", images[index], "width and height >= 1")
    return ids, sizes.reshape(-1, 2).astype(np.int32)


def _annotation_positions(
    annotations: list[dict], key: str, table: np.ndarray, path: str, allowed: str
) -> np.ndarray:
    """Where each annotation's `key` (an id) stands in `table` (ascending, distinct); an id
    not in the table raises, naming the annotation."""
    keys = np.array([annotation[key] for annotation in annotations], np.int64)
    positions = np.searchsorted(table, keys).clip(0, max(len(table) - 1, 0))
    found = table[positions] == keys if len(table) else np.zeros(len(keys), bool)
    if not found.all():
        index = int(np.argmin(found))
        raise invalid(f"{path}: annotations[{index}].{key}", int(keys[index]), allowed)
    return positions


def _bbox_array(annotations: list[dict], path: str) -> np.ndarray:
    """float32 [K, 4] of the annotations' [x, y, width, height]."""
    for index, annotation in enumerate(annotations):
        bbox = annotation["bbox"]
        if not (isinstance(bbox, list) and len(bbox) == 4):
            raise invalid(f"{path}: annotations[{index}].bbox", bbox, "[x, y, width, height]")
    boxes = np.array([annotation["bbox"] for annotation in annotations], np.float32).reshape(-1, 4)
    finite = np.isfinite(boxes).all(axis=1)
    if not finite.all():
        index = int(np.argmin(finite))
        raise invalid(
            f"{path}: annotations[{index}].bbox", annotations[index]["bbox"], "finite numbers"
        )
    return boxes


def clip_boxes(boxes: np.ndarray, sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """([x1, y1, x2, y2] clamped into images of `sizes` (height, width), broadcast against
    the boxes; whether each keeps an area: x2 > x1 and y2 > y1)."""
    height, width = np.moveaxis(sizes.astype(np.float32), -1, 0)
    limits = np.stack([width, height, width, height], axis=-1)
    clipped = np.clip(boxes, 0, limits)
    return clipped, (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])


def parse(coco: dict[str, Any], directory: str, split: str) -> CocoSplit:
    """A `CocoSplit` of a JSON from `load_json`: ids resolved, boxes converted and filtered
    (module docstring), every image file checked to exist."""
    path = json_path(directory, split)
    classes = categories(coco, path)
    image_ids, image_sizes = _image_table(coco, path)
    annotations = coco["annotations"]
    by_id = np.argsort(image_ids, kind="stable")
    owners = by_id[
        _annotation_positions(annotations, "image_id", image_ids[by_id], path, "an id of images")
    ]
    category_ids = np.array(classes.ids, np.int64)
    allowed = f"one of the category ids {list(classes.ids)}"
    labels = _annotation_positions(annotations, "category_id", category_ids, path, allowed)
    xywh = _bbox_array(annotations, path)
    corners = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
    boxes, keep = clip_boxes(corners, image_sizes[owners])
    if not keep.all():
        logging.info("%s: dropped %d boxes without area", path, int((~keep).sum()))
    is_crowd = np.array([bool(a["iscrowd"]) for a in annotations], bool)
    grouped = np.argsort(owners[keep], kind="stable")  # by image, file order within
    paths = _image_paths(coco["images"], directory, path)
    return CocoSplit(
        paths=paths,
        image_ids=image_ids,
        image_sizes=image_sizes,
        row_splits=np.concatenate(
            [[0], np.cumsum(np.bincount(owners[keep], minlength=len(paths)))]
        ),
        boxes=boxes[keep][grouped],
        labels=labels[keep][grouped].astype(np.int32),
        is_crowd=is_crowd[keep][grouped],
        categories=classes,
    )


def _image_paths(images: list[dict], directory: str, path: str) -> tuple[str, ...]:
    """The image files, each checked to exist (a missing one is named)."""
    paths = tuple(os.path.join(directory, image["file_name"]) for image in images)
    logging.info("%s: checking %d image files", path, len(paths))
    missing = [index for index, file in enumerate(paths) if not os.path.isfile(file)]
    if missing:
        index = missing[0]
        raise invalid(
            f"{path}: images[{index}].file_name",
            images[index]["file_name"],
            f"a file under {directory} ({len(missing)} of {len(paths)} images are missing)",
        )
    return paths
