"""Tests for mokd_jax.detection.tfds_coco, offline on `tfds.testing.mock_data`.

The records are tests/coco_records.py's hand-made ones (tiny JPEGs, known boxes, a crowd
object, a box without area), served through the real feature encoding and decoding.
"""

import contextlib
import dataclasses
import io
import itertools

import numpy as np
import pytest
import tensorflow_datasets as tfds
from coco_records import NUM_EXAMPLES, OBJECTS, mock_reader
from pycocotools.coco import COCO

from mokd_jax.detection import dataset, tfds_coco, transforms
from mokd_jax.detection.transforms import Geometry
from mokd_jax.errors import InputError

BATCH = 2
GEOMETRY = Geometry(min_size=32, max_size=48, max_boxes=3)


@pytest.fixture
def coco():
    with tfds.testing.mock_data(as_dataset_fn=mock_reader):
        yield dataset.load("coco/2017", geometry=GEOMETRY, workers=2)


def _take(iterator, count):
    return list(itertools.islice(iterator, count))


def _expected_targets(index, flip):
    """(boxes, labels) of record `index` after the resize to GEOMETRY, by hand."""
    height, width = 24 + 4 * index, 40
    scale = min(32 / min(height, width), 48 / max(height, width))
    new_height, new_width = int(height * scale), int(width * scale)
    boxes, labels = [], []
    for (ymin, xmin, ymax, xmax), label, crowd in OBJECTS[: 1 + index % len(OBJECTS)]:
        if not crowd and ymax > ymin:
            boxes.append([xmin * new_width, ymin * new_height, xmax * new_width, ymax * new_height])
            labels.append(label)
    boxes = np.array(boxes, np.float32).reshape(-1, 4)
    if flip:
        boxes = np.stack(
            [new_width - boxes[:, 2], boxes[:, 1], new_width - boxes[:, 0], boxes[:, 3]], 1
        )
    return boxes, labels, (new_height, new_width)


def test_eval_batches_cover_every_record_with_its_targets(coco):
    batches = list(coco.eval_batches(4))
    assert [batch.example_mask.tolist() for batch in batches] == [
        [True] * 4,
        [True] * 2 + [False] * 2,
    ]
    assert np.concatenate([b.image_ids[b.example_mask] for b in batches]).tolist() == list(
        range(1000, 1006)
    )
    assert batches[0].images.shape == (4, 64, 64, 3)  # 48 rounded up to 32s
    for batch in batches:
        for row in np.nonzero(batch.example_mask)[0]:
            boxes, labels, size = _expected_targets(int(batch.image_ids[row]) - 1000, False)
            np.testing.assert_allclose(batch.boxes[row, : len(boxes)], boxes, atol=1e-4)
            assert batch.labels[row, : len(boxes)].tolist() == labels
            assert batch.box_mask[row].sum() == len(boxes)
            assert tuple(batch.image_sizes[row]) == size


def test_train_batches_follow_their_records_and_resume_exactly(coco):
    uninterrupted = _take(coco.train_batches(BATCH, 4), 5)  # 3 steps per epoch
    resumed = _take(coco.train_batches(BATCH, 4, start_step=2), 3)
    for left, right in zip(uninterrupted[2:], resumed, strict=True):
        for left_array, right_array in zip(left, right, strict=True):
            np.testing.assert_array_equal(left_array, right_array)
    first_epoch = np.concatenate([batch.image_ids for batch in uninterrupted[:3]])
    assert sorted(first_epoch.tolist()) == list(range(1000, 1006))
    flipped = 0
    for batch in uninterrupted:
        for row, image_id in enumerate(batch.image_ids):
            unflipped, labels, _ = _expected_targets(int(image_id) - 1000, False)
            boxes = batch.boxes[row, : len(labels)]
            is_flipped = not np.allclose(boxes, unflipped, atol=1e-4)
            expected, _, _ = _expected_targets(int(image_id) - 1000, is_flipped)
            np.testing.assert_allclose(boxes, expected, atol=1e-4)
            flipped += is_flipped
    assert 0 < flipped < 10


def test_multi_scale_training_draws_a_shorter_side_per_record_and_resumes_exactly(coco):
    sides = (16, 24)
    geometry = dataclasses.replace(GEOMETRY, train_min_sizes=sides)
    multi_scale = dataclasses.replace(coco, geometry=geometry)
    batches = _take(multi_scale.train_batches(BATCH, 4), 5)
    drawn = []
    for batch in batches:
        for image_id, size in zip(batch.image_ids, batch.image_sizes.tolist(), strict=True):
            height, width = 24 + 4 * (int(image_id) - 1000), 40
            by_side = {
                side: list(transforms.resized_shape(height, width, side, 48)[:2]) for side in sides
            }
            drawn += [side for side, shape in by_side.items() if shape == size]
    assert len(drawn) == 5 * BATCH and set(drawn) == set(sides)
    resumed = _take(multi_scale.train_batches(BATCH, 4, start_step=3), 2)
    for left, right in zip(batches[3:], resumed, strict=True):
        for left_array, right_array in zip(left, right, strict=True):
            np.testing.assert_array_equal(left_array, right_array)


def test_processes_read_disjoint_slices(coco):
    ids = [
        {
            int(i)
            for b in _take(coco.train_batches(BATCH, 0, process_index=p, process_count=2), 3)
            for i in b.image_ids
        }
        for p in range(2)
    ]
    assert not ids[0] & ids[1] and ids[0] | ids[1] == set(range(1000, 1006))


def test_ground_truth_is_coco_format_with_original_category_ids(coco):
    truth = coco.ground_truth()
    assert [image["id"] for image in truth["images"]] == list(range(1000, 1006))
    assert truth["images"][2] == {"id": 1002, "width": 40, "height": 32}
    assert len(truth["categories"]) == 80 and truth["categories"][79] == {
        "id": 90,
        "name": "toothbrush",
    }
    annotations = [a for a in truth["annotations"] if a["image_id"] == 1003]
    # Record 3 holds all four objects; the one without height is dropped, the crowd kept.
    assert [(a["category_id"], a["iscrowd"]) for a in annotations] == [(1, 0), (90, 0), (13, 1)]
    np.testing.assert_allclose(annotations[0]["bbox"], [8, 3.6, 16, 14.4], atol=1e-4)
    assert len({a["id"] for a in truth["annotations"]}) == len(truth["annotations"])
    with contextlib.redirect_stdout(io.StringIO()):
        index = COCO()
        index.dataset = truth
        index.createIndex()
    assert index.getCatIds()[:3] == [1, 2, 3] and len(index.getImgIds()) == NUM_EXAMPLES


@pytest.mark.slow  # imports torch beside TensorFlow: 8 s on 2 busy cores
def test_categories_are_torchvisions():
    pytest.importorskip("torch")
    from torchvision_shim import import_torchvision

    names = import_torchvision().models._meta._COCO_CATEGORIES
    expected = [
        (index, name) for index, name in enumerate(names) if name not in ("__background__", "N/A")
    ]
    assert list(tfds_coco.CATEGORIES) == expected


def test_pixel_boxes_clamp_and_flag_boxes_without_area():
    boxes, keep = tfds_coco.pixel_boxes(
        np.float32([[0.5, -0.1, 1.2, 0.5], [0.6, 0.2, 0.4, 0.3]]), 10, 20
    )
    np.testing.assert_allclose(boxes[0], [0, 5, 10, 10])
    assert keep.tolist() == [True, False]


def test_an_unprepared_data_dir_says_how_to_prepare_it(tmp_path):
    with pytest.raises(
        InputError,
        match=r"data_dir='.*' is not allowed: a folder holding the prepared coco: put train2017",
    ):
        tfds_coco.TFDSCocoDataset.open(str(tmp_path), GEOMETRY)
