"""Tests for mokd_jax.detection.coco_json on small hand-written COCO files: box conversion,
clamping and dropping, the category table, crowd flags, and the errors for bad files."""

import copy
import json

import numpy as np
import pytest
from PIL import Image

from mokd_jax.detection import coco_json
from mokd_jax.errors import InputError

# Category ids out of order and with gaps: labels follow the ascending ids 2, 5, 9.
CATEGORIES = [{"id": 9, "name": "nine"}, {"id": 2, "name": "two"}, {"id": 5, "name": "five"}]
IMAGES = [
    {"id": 30, "file_name": "a.png", "width": 40, "height": 20},
    {"id": 10, "file_name": "sub/b.png", "width": 16, "height": 32},
    {"id": 20, "file_name": "c.png", "width": 8, "height": 8},  # no annotations
]


def _annotation(annotation_id, image_id, category_id, bbox, iscrowd=0):
    return {
        "id": annotation_id,
        "image_id": image_id,
        "category_id": category_id,
        "bbox": bbox,
        "area": 1.0,
        "iscrowd": iscrowd,
    }


ANNOTATIONS = [
    _annotation(1, 10, 5, [1, 2, 3, 4]),
    _annotation(2, 30, 9, [30, 5, 20, 30]),  # past the right and bottom edges: clamped
    _annotation(3, 30, 2, [4, 4, 0, 5]),  # no width: dropped
    _annotation(4, 10, 2, [0, 0, 16, 32], iscrowd=1),
    _annotation(5, 30, 2, [2.5, 1.5, 2, 2]),
    _annotation(6, 10, 9, [20, 3, 5, 5]),  # wholly right of the image: no area once clamped
]
COCO = {"images": IMAGES, "annotations": ANNOTATIONS, "categories": CATEGORIES}


def _write(directory, coco, split="val"):
    for image in coco["images"]:
        path = directory / image["file_name"]
        path.parent.mkdir(exist_ok=True)
        Image.new("RGB", (image["width"], image["height"])).save(path)
    (directory / f"{split}.json").write_text(json.dumps(coco))
    return str(directory)


def _read(directory, coco):
    _write(directory, coco)
    return coco_json.parse(coco_json.load_json(str(directory), "val"), str(directory), "val")


def test_boxes_labels_and_crowd_flags(tmp_path):
    split = _read(tmp_path, COCO)
    assert split.categories == coco_json.Categories((2, 5, 9), ("two", "five", "nine"))
    assert split.paths == tuple(str(tmp_path / image["file_name"]) for image in IMAGES)
    assert split.image_ids.tolist() == [30, 10, 20]
    assert split.image_sizes.tolist() == [[20, 40], [32, 16], [8, 8]]
    # Image 30 keeps annotations 2 and 5, image 10 keeps 1 and 4 (crowd), image 20 none.
    assert split.row_splits.tolist() == [0, 2, 4, 4]
    np.testing.assert_array_equal(
        split.boxes, [[30, 5, 40, 20], [2.5, 1.5, 4.5, 3.5], [1, 2, 4, 6], [0, 0, 16, 32]]
    )
    assert split.labels.tolist() == [2, 0, 1, 0]
    assert split.is_crowd.tolist() == [False, False, False, True]
    assert split.target_counts().tolist() == [2, 1, 0]
    boxes, labels = split.targets(1)
    np.testing.assert_array_equal(boxes, [[1, 2, 4, 6]])
    assert labels.tolist() == [1]
    assert split.targets(2)[0].shape == (0, 4)


def test_a_split_without_annotations(tmp_path):
    split = _read(tmp_path, dict(COCO, annotations=[]))
    assert split.boxes.shape == (0, 4) and split.row_splits.tolist() == [0, 0, 0, 0]
    assert split.target_counts().tolist() == [0, 0, 0]


def _broken(edit):
    coco = copy.deepcopy(COCO)
    edit(coco)
    return coco


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda coco: coco["annotations"][2].pop("bbox"),
            r"val.json: annotations\[2\] keys=\['area', 'category_id', 'id', 'image_id', "
            r"'iscrowd'\] is not allowed: a record with id, image_id, category_id, bbox",
        ),
        (lambda coco: coco.pop("categories"), r"val.json: categories='NoneType'"),
        (
            lambda coco: coco["annotations"][1].update(category_id=4),
            r"annotations\[1\].category_id=4 is not allowed: one of the category ids \[2, 5, 9\]",
        ),
        (
            lambda coco: coco["annotations"][3].update(image_id=11),
            r"annotations\[3\].image_id=11 is not allowed: an id of images",
        ),
        (
            lambda coco: coco["annotations"][0].update(bbox=[1, 2, 3]),
            r"annotations\[0\].bbox=\[1, 2, 3\] is not allowed: \[x, y, width, height\]",
        ),
        (
            lambda coco: coco["annotations"][4].update(bbox=[1, 2, 3, float("nan")]),
            r"annotations\[4\].bbox=\[1, 2, 3, nan\] is not allowed: finite numbers",
        ),
        (
            lambda coco: coco["images"][2].update(id=30),
            r"val.json: images id=30 is not allowed: each image id once",
        ),
        (
            lambda coco: coco["categories"][1].update(id=9),
            r"categories ids=\[9, 9, 5\] is not allowed: distinct integers",
        ),
    ],
)
def test_bad_records_are_named(tmp_path, edit, message):
    with pytest.raises(InputError, match=message):
        _read(tmp_path, _broken(edit))


def test_a_missing_image_file_is_named(tmp_path):
    _write(tmp_path, COCO)
    (tmp_path / "sub" / "b.png").unlink()
    with pytest.raises(
        InputError,
        match=r"val.json: images\[1\].file_name='sub/b.png' is not allowed: a file under .* "
        r"\(1 of 3 images are missing\)",
    ):
        coco_json.parse(coco_json.load_json(str(tmp_path), "val"), str(tmp_path), "val")


def test_a_folder_without_the_json_is_named(tmp_path):
    with pytest.raises(
        InputError, match=r"data_dir='.*' is not allowed: a folder holding train.json, val.json"
    ):
        coco_json.load_json(str(tmp_path), "train")


def test_invalid_json_is_named(tmp_path):
    (tmp_path / "val.json").write_text('{"images": [}')
    with pytest.raises(InputError, match=r"val.json=.line 1. is not allowed: valid JSON"):
        coco_json.load_json(str(tmp_path), "val")
