"""Tests for mokd_jax.detection.synthetic: determinism, boxes tight around the drawn shapes
(found again in the stored PNGs by their saturation), and files that pycocotools and the
COCO reader take as they are."""

import contextlib
import io
import json
import os

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from mokd_jax.detection import coco_json, synthetic
from mokd_jax.errors import InputError

SMALL = {"num_train": 12, "num_val": 6, "image_size": 64}
# Background channels differ by at most 2 * NOISE = 20 grey levels, shapes' by >= 100.
SATURATION = 60


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return synthetic.write(str(tmp_path_factory.mktemp("shapes")), seed=3, **SMALL)


def _files(directory):
    """{relative path: bytes} of every file written."""
    contents = {}
    for root, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as file:
                contents[os.path.relpath(path, directory)] = file.read()
    return contents


def test_the_same_seed_writes_the_same_files_whatever_the_threads(shapes, tmp_path):
    again = synthetic.write(str(tmp_path / "again"), seed=3, workers=1, **SMALL)
    assert _files(again) == _files(shapes)
    other = synthetic.write(str(tmp_path / "other"), seed=4, **SMALL)
    assert _files(other).keys() == _files(shapes).keys()
    assert _files(other)["train.json"] != _files(shapes)["train.json"]


def _saturated(path):
    pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)
    return pixels.max(axis=2) - pixels.min(axis=2) > SATURATION


@pytest.mark.parametrize("split", ["train", "val"])
def test_boxes_are_tight_around_the_shapes(shapes, split):
    with open(os.path.join(shapes, f"{split}.json")) as file:
        coco = json.load(file)
    file_names = {image["id"]: image["file_name"] for image in coco["images"]}
    covered = {image_id: np.zeros((64, 64), bool) for image_id in file_names}
    for annotation in coco["annotations"]:
        shape = _saturated(os.path.join(shapes, file_names[annotation["image_id"]]))
        x, y, width, height = annotation["bbox"]
        # Shapes are 2 px apart: a window 1 px around the box holds this shape alone.
        top, left = max(y - 1, 0), max(x - 1, 0)
        rows, columns = np.nonzero(shape[top : y + height + 1, left : x + width + 1])
        assert [left + columns.min(), top + rows.min()] == [x, y]
        assert [left + columns.max() + 1, top + rows.max() + 1] == [x + width, y + height]
        assert annotation["area"] == len(rows)
        covered[annotation["image_id"]][y : y + height, x : x + width] = True
    # Every saturated pixel belongs to an annotated shape.
    for image_id, file_name in file_names.items():
        assert not (_saturated(os.path.join(shapes, file_name)) & ~covered[image_id]).any()


def test_contents_cover_every_class_and_a_few_objects_per_image(shapes):
    with open(os.path.join(shapes, "train.json")) as file:
        coco = json.load(file)
    counts = np.bincount([a["image_id"] for a in coco["annotations"]], minlength=13)[1:]
    assert 1 <= counts.min() and counts.max() <= synthetic.MAX_OBJECTS
    assert {a["category_id"] for a in coco["annotations"]} == {1, 3, 7, 12}
    assert {image["id"] for image in coco["images"]} == set(range(1, 13))


def test_pycocotools_evaluates_the_ground_truth_as_a_perfect_detection(shapes):
    with contextlib.redirect_stdout(io.StringIO()):
        ground_truth = COCO(os.path.join(shapes, "val.json"))
        assert ground_truth.getCatIds() == [1, 3, 7, 12]
        detections = ground_truth.loadRes(
            [
                {
                    "image_id": a["image_id"],
                    "category_id": a["category_id"],
                    "bbox": a["bbox"],
                    "score": 1.0,
                }
                for a in ground_truth.dataset["annotations"]
            ]
        )
        evaluation = COCOeval(ground_truth, detections, "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    assert evaluation.stats[0] == pytest.approx(1.0)


def test_the_reader_takes_the_files(shapes):
    split = coco_json.parse(coco_json.load_json(shapes, "val"), shapes, "val")
    assert len(split) == 6 and split.categories.ids == (1, 3, 7, 12)
    assert split.categories.names == ("circle", "square", "triangle", "cross")
    assert split.image_ids.tolist() == list(range(13, 19))


def test_crowd_fraction_marks_objects_as_crowd(tmp_path):
    directory = synthetic.write(str(tmp_path), crowd_fraction=1.0, **SMALL)
    with open(os.path.join(directory, "val.json")) as file:
        assert {a["iscrowd"] for a in json.load(file)["annotations"]} == {1}


def test_a_too_small_image_size_is_an_error(tmp_path):
    with pytest.raises(InputError, match="image_size=16 is not allowed: an integer >= 24"):
        synthetic.write(str(tmp_path), image_size=16)
