"""Tests for mokd_jax.detection.dataset on a small shapes set: the protocol, exact resume,
process sharding, evaluation coverage, boxes that follow their images, and input checks."""

import dataclasses
import inspect
import itertools
import json
import os

import numpy as np
import pytest

from mokd_jax.detection import dataset, synthetic
from mokd_jax.detection.batch import DetectionBatch
from mokd_jax.detection.transforms import Geometry
from mokd_jax.errors import InputError

# 20 training images in batches of 8: two steps per epoch (4 images left over each epoch);
# 10 evaluation images: batches of 4, the last with 2 real rows. 128 px images resized to 64.
NUM_TRAIN, NUM_VAL, BATCH = 20, 10, 8
GEOMETRY = Geometry(min_size=64, max_size=64, max_boxes=synthetic.MAX_OBJECTS)
PROPERTIES = ("name", "num_classes", "category_ids", "image_shape")
METHODS = ("ground_truth", "train_batches", "eval_batches")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    directory = synthetic.write(
        str(tmp_path_factory.mktemp("shapes")), num_train=NUM_TRAIN, num_val=NUM_VAL
    )
    return dataset.open_coco_json(directory, GEOMETRY, name="shapes", workers=2)


def _take(iterator, count):
    return list(itertools.islice(iterator, count))


def _assert_batches_equal(left, right):
    assert len(left) == len(right)
    for left_batch, right_batch in zip(left, right, strict=True):
        for left_array, right_array in zip(left_batch, right_batch, strict=True):
            np.testing.assert_array_equal(left_array, right_array)


def test_the_protocol(shapes):
    assert {name for name in vars(dataset.DetectionDataset) if not name.startswith("_")} == {
        *PROPERTIES,
        *METHODS,
    }
    assert isinstance(shapes, dataset.DetectionDataset)
    for method in METHODS:
        expected = inspect.signature(getattr(dataset.DetectionDataset, method))
        assert inspect.signature(getattr(type(shapes), method)) == expected, method
    assert shapes.num_classes == 4 and shapes.category_ids == (1, 3, 7, 12)
    assert shapes.image_shape == (64, 64, 3)


def test_batches_have_static_shapes_and_types(shapes):
    (batch,) = _take(shapes.train_batches(BATCH, 0), 1)
    assert isinstance(batch, DetectionBatch)
    shapes_and_types = {name: (array.shape, array.dtype) for name, array in batch._asdict().items()}
    m = GEOMETRY.max_boxes
    assert shapes_and_types == {
        "images": ((BATCH, 64, 64, 3), np.uint8),
        "boxes": ((BATCH, m, 4), np.float32),
        "labels": ((BATCH, m), np.int32),
        "box_mask": ((BATCH, m), bool),
        "image_ids": ((BATCH,), np.int64),
        "scales": ((BATCH,), np.float32),
        "image_sizes": ((BATCH, 2), np.int32),
        "example_mask": ((BATCH,), bool),
    }
    assert batch.example_mask.all() and (batch.scales == 0.5).all()
    assert (batch.image_sizes == 64).all()


def test_train_is_deterministic_shuffled_and_resumes_exactly(shapes):
    uninterrupted = _take(shapes.train_batches(BATCH, 5), 5)  # 2.5 epochs
    _assert_batches_equal(_take(shapes.train_batches(BATCH, 5), 5), uninterrupted)
    _assert_batches_equal(_take(shapes.train_batches(BATCH, 5, start_step=3), 2), uninterrupted[3:])
    first_epoch = np.concatenate([batch.image_ids for batch in uninterrupted[:2]])
    assert len(set(first_epoch.tolist())) == 2 * BATCH  # no image twice in an epoch
    second_epoch = np.concatenate([batch.image_ids for batch in uninterrupted[2:4]])
    assert first_epoch.tolist() != second_epoch.tolist()
    other_seed = _take(shapes.train_batches(BATCH, 6), 2)
    assert np.concatenate([b.image_ids for b in other_seed]).tolist() != first_epoch.tolist()


def _original_targets(shapes, image_id):
    index = shapes.train.image_ids.tolist().index(image_id)
    return shapes.train.targets(index)


def test_train_boxes_follow_their_images_and_about_half_are_flipped(shapes):
    seed, flipped_rows = 1, 0
    for step, batch in enumerate(_take(shapes.train_batches(BATCH, seed), 4)):
        flips = dataset.flips(seed, step, BATCH)
        for row, image_id in enumerate(batch.image_ids):
            boxes, labels = _original_targets(shapes, int(image_id))
            expected = boxes * 0.5
            if flips[row]:
                expected = np.stack(
                    [64 - expected[:, 2], expected[:, 1], 64 - expected[:, 0], expected[:, 3]], 1
                )
            count = len(boxes)
            np.testing.assert_allclose(batch.boxes[row, :count], expected, atol=1e-5)
            assert batch.labels[row, :count].tolist() == labels.tolist()
            assert batch.box_mask[row].tolist() == [True] * count + [False] * (
                GEOMETRY.max_boxes - count
            )
        flipped_rows += int(flips.sum())
    assert 8 <= flipped_rows <= 24  # of 32


@pytest.mark.parametrize("process_count", [2, 4])
def test_processes_feed_their_rows_of_the_same_global_batches(shapes, process_count):
    global_batches = _take(shapes.train_batches(BATCH, 2, start_step=1), 3)
    parts = [
        _take(
            shapes.train_batches(
                BATCH, 2, start_step=1, process_index=index, process_count=process_count
            ),
            3,
        )
        for index in range(process_count)
    ]
    for step, global_batch in enumerate(global_batches):
        joined = [
            np.concatenate([part[step][field] for part in parts])
            for field in range(len(global_batch))
        ]
        _assert_batches_equal([tuple(joined)], [tuple(global_batch)])


def test_eval_covers_every_image_once_and_pads_the_last_batch(shapes):
    batches = list(shapes.eval_batches(4))
    assert len(batches) == 3
    real_ids = np.concatenate([batch.image_ids[batch.example_mask] for batch in batches])
    assert real_ids.tolist() == shapes.val.image_ids.tolist()
    last = batches[-1]
    assert last.example_mask.tolist() == [True, True, False, False]
    assert last.image_ids[2:].tolist() == [-1, -1] and (last.scales[2:] == 1).all()
    assert not last.images[2:].any() and not last.box_mask[2:].any()
    _assert_batches_equal(list(shapes.eval_batches(4)), batches)
    for batch in batches:  # no flips in evaluation
        for row in np.nonzero(batch.example_mask)[0]:
            index = shapes.val.image_ids.tolist().index(batch.image_ids[row])
            boxes, _ = shapes.val.targets(index)
            np.testing.assert_allclose(batch.boxes[row, : len(boxes)], boxes * 0.5)


def test_ground_truth_is_a_fresh_copy_of_the_val_json(shapes):
    with open(os.path.join(os.path.dirname(shapes.train.paths[0]), "..", "val.json")) as file:
        assert shapes.ground_truth() == json.load(file)
    shapes.ground_truth()["annotations"].clear()
    assert shapes.ground_truth()["annotations"]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"batch_size": NUM_TRAIN + 1}, "batch_size=21 is not allowed: 1 to 20"),
        ({"process_index": 2, "process_count": 2}, "process_index=2 is not allowed: 0 to 1"),
        ({"process_count": 3}, "batch_size=8 is not allowed: a multiple of the process count 3"),
        ({"seed": -1}, "seed=-1 is not allowed"),
        ({"start_step": -1}, "start_step=-1 is not allowed"),
    ],
)
def test_train_arguments_are_checked_on_the_call(shapes, arguments, message):
    arguments = {"batch_size": BATCH, "seed": 0, **arguments}
    with pytest.raises(InputError, match=message):
        shapes.train_batches(arguments.pop("batch_size"), arguments.pop("seed"), **arguments)


def test_too_small_max_boxes_is_an_error_when_opening(shapes):
    directory = os.path.dirname(os.path.dirname(shapes.train.paths[0]))
    most = max(int(shapes.train.target_counts().max()), int(shapes.val.target_counts().max()))
    geometry = Geometry(64, 64, max_boxes=most - 1)
    with pytest.raises(InputError, match=f"max_boxes={most - 1} is not allowed: at least {most}"):
        dataset.open_coco_json(directory, geometry)


def test_an_image_of_another_size_than_its_json_says_is_named(tmp_path):
    directory = synthetic.write(str(tmp_path), num_train=2, num_val=2, image_size=32)
    with open(os.path.join(directory, "val.json")) as file:
        coco = json.load(file)
    coco["images"][1]["width"] = 33
    with open(os.path.join(directory, "val.json"), "w") as file:
        json.dump(coco, file)
    opened = dataset.open_coco_json(directory, Geometry(32, 32, synthetic.MAX_OBJECTS))
    with pytest.raises(InputError, match=r"000002.png size=\(32, 32\) is not allowed: \(32, 33\)"):
        list(opened.eval_batches(2))


def test_load_knows_its_names():
    with pytest.raises(InputError, match="dataset='voc' is not allowed: one of shapes, coco_json"):
        dataset.load("voc")


@pytest.mark.slow
def test_load_draws_the_shapes_set_into_a_temporary_folder():
    shapes = dataset.load("shapes")
    assert shapes.name == "shapes" and shapes.image_shape == (128, 128, 3)
    assert len(shapes.train) == 1000 and len(shapes.val) == 200
    folder = shapes.temporary_folder.name
    assert os.path.isdir(folder)
    del shapes
    assert not os.path.exists(folder)


def test_load_draws_as_many_shapes_images_as_asked():
    shapes = dataset.load("shapes", shapes_images=(3, 2))
    assert len(shapes.train) == 3 and len(shapes.val) == 2


def test_multi_scale_training_draws_each_images_shorter_side(shapes):
    """128 px images, training sides 32 or 48 drawn per row, evaluation at min_size 64."""
    sides = (32, 48)
    geometry = dataclasses.replace(GEOMETRY, train_min_sizes=sides)
    multi_scale = dataclasses.replace(shapes, geometry=geometry)
    seed, drawn = 3, []
    for step, batch in enumerate(_take(multi_scale.train_batches(BATCH, seed), 3)):
        expected = dataset.min_sizes(geometry, seed, step, BATCH)
        assert batch.image_sizes.tolist() == [[side, side] for side in expected]
        np.testing.assert_allclose(batch.scales, expected / 128)
        assert batch.images.shape[1:] == (64, 64, 3)
        drawn += expected.tolist()
    assert set(drawn) == set(sides)
    resumed = _take(multi_scale.train_batches(BATCH, seed, start_step=2), 1)
    _assert_batches_equal(resumed, [batch])
    (evaluated, *_) = multi_scale.eval_batches(4)
    assert evaluated.image_sizes.tolist() == [[64, 64]] * 4
