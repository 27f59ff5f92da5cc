"""COCO evaluation: AP values known by hand on tiny sets, crowd regions, the contiguous ->
dataset category table, the rescaling to original pixels, the accumulator, the JSON writer,
the input checks, and faster-coco-eval against pycocotools on a random set.

How COCOeval's AP is computed, for the hand cases: per category and IoU threshold, the
detections are ranked by score; after each one, precision = TP / detections so far and
recall = TP / ground-truth objects. Precision is made non-increasing from the right (each
becomes the best precision at that recall or beyond); AP is the mean, over the 101 recall
points 0.00, 0.01, ..., 1.00, of that precision at the first rank reaching the recall point
(0 for a point never reached). Every box here is exact (IoU 1), so AP is the same at every
IoU threshold and AP = AP50 = AP75. (COCOeval divides by TP + FP + 2^-52, so a perfect
score is 1 to within 1e-15, hence `approx`.)
"""

import json

import numpy as np
import pytest

from mokd_jax.detection.batch import DetectionBatch
from mokd_jax.detection.coco_eval import (
    METRIC_NAMES,
    CocoAccumulator,
    evaluate_coco,
    to_coco_results,
    write_results,
)
from mokd_jax.detection.postprocess import Detections
from mokd_jax.errors import InputError

RECALL_POINTS = 101


def ground_truth(objects, categories=(1,), image_ids=(1,)) -> dict:
    """COCO instances dict from (image_id, category_id, [x, y, w, h], iscrowd) tuples."""
    return {
        "images": [{"id": image, "width": 320, "height": 240} for image in image_ids],
        "annotations": [
            {
                "id": number + 1,
                "image_id": image,
                "category_id": category,
                "bbox": list(box),
                "area": box[2] * box[3],
                "iscrowd": crowd,
            }
            for number, (image, category, box, crowd) in enumerate(objects)
        ],
        "categories": [{"id": category, "name": f"c{category}"} for category in categories],
    }


def result(image_id, category_id, box, score) -> dict:
    return {"image_id": image_id, "category_id": category_id, "bbox": list(box), "score": score}


# Four medium objects (40 x 40 px: between 32^2 and 96^2) of one category in one image.
MEDIUM_BOXES = [(10, 10, 40, 40), (60, 10, 40, 40), (110, 10, 40, 40), (160, 10, 40, 40)]
FOUR_OBJECTS = ground_truth([(1, 1, box, 0) for box in MEDIUM_BOXES])
NOWHERE = (250, 150, 40, 40)  # overlaps no object


def test_perfect_detections_score_one_in_every_size_range():
    sizes = [(10, 10, 20, 20), (50, 50, 50, 50), (120, 100, 120, 120)]  # small, medium, large
    objects = [
        (image, category, box, 0) for image in (1, 2) for category in (1, 2) for box in sizes
    ]
    truth = ground_truth(objects, categories=(1, 2), image_ids=(1, 2))
    results = [result(image, category, box, 0.9) for image, category, box, _ in objects]
    assert evaluate_coco(truth, results) == pytest.approx(dict.fromkeys(METRIC_NAMES, 1.0))


@pytest.mark.parametrize(
    "scores, precision",
    [((0.9, 0.8, 0.7, 0.6), 1.0), ((0.8, 0.7, 0.9, 0.6), 2 / 3)],
    ids=["hits ranked first", "a miss ranked first"],
)
def test_half_the_objects_found(scores, precision):
    """Hits on 2 of the 4 objects and 2 detections elsewhere. Ranked hit, hit, miss, miss:
    precision 1, 1, 2/3, 1/2 at recall 1/4, 1/2, 1/2, 1/2; the recall points 0.00 ... 0.50
    (51 of 101) get precision 1, the rest are never reached: AP = 51/101. Ranked miss, hit,
    hit, miss: precision 0, 1/2, 2/3, 1/2 at recall 0, 1/4, 1/2, 1/2, non-increasing from the
    right 2/3, 2/3, 2/3, 1/2; the same 51 points get 2/3: AP = 2/3 x 51/101."""
    boxes = [MEDIUM_BOXES[0], MEDIUM_BOXES[2], NOWHERE, NOWHERE]
    results = [result(1, 1, box, score) for box, score in zip(boxes, scores, strict=True)]
    metrics = evaluate_coco(FOUR_OBJECTS, results)
    expected = precision * 51 / RECALL_POINTS
    for name in ("ap", "ap50", "ap75", "ap_medium"):
        assert metrics[name] == pytest.approx(expected, abs=1e-6), name
    assert metrics["ap_small"] == metrics["ap_large"] == -1.0  # no such objects


def test_crowd_regions_are_neither_hits_nor_misses():
    """Two objects found, and the best-scored detection on a crowd region: ignored, AP 1.
    Without the crowd annotation that detection is a false positive ranked first: precision
    0, 1/2, 2/3 at recall 0, 1/2, 1; non-increasing from the right, 2/3 at every recall
    point: AP 2/3. And the crowd region, which nothing needs to find, costs no recall."""
    crowd = (200, 100, 80, 80)
    objects = [(1, 1, MEDIUM_BOXES[0], 0), (1, 1, MEDIUM_BOXES[1], 0)]
    results = [
        result(1, 1, crowd, 0.95),
        result(1, 1, MEDIUM_BOXES[0], 0.9),
        result(1, 1, MEDIUM_BOXES[1], 0.8),
    ]
    with_crowd = evaluate_coco(ground_truth([*objects, (1, 1, crowd, 1)]), results)
    assert with_crowd["ap"] == with_crowd["ap50"] == pytest.approx(1.0)
    without_crowd = evaluate_coco(ground_truth(objects), results)
    assert without_crowd["ap"] == pytest.approx(2 / 3, abs=1e-6)
    assert evaluate_coco(ground_truth([*objects, (1, 1, crowd, 1)]), results[1:])[
        "ap"
    ] == pytest.approx(1.0)


CATEGORY_IDS = (1, 5, 90)  # contiguous class 0, 1, 2 -> the dataset's category ids


def one_detection_per_class(scale: float):
    """Arrays for one image with three detections, classes 2, 0, 1, and a padding row."""
    boxes = np.zeros((1, 4, 4), np.float32)
    boxes[0, :3] = [[10, 20, 30, 60], [40, 20, 80, 50], [100, 100, 180, 200]]
    return {
        "boxes": boxes * scale,
        "scores": np.float32([[0.9, 0.8, 0.7, 0.0]]),
        "labels": np.int32([[2, 0, 1, 0]]),
        "valid": np.array([[True, True, True, False]]),
        "image_ids": np.int64([7]),
        "scales": np.float32([scale]),
    }


def test_results_carry_original_ids_and_boxes_in_original_pixels():
    results = to_coco_results(**one_detection_per_class(scale=0.5), category_ids=CATEGORY_IDS)
    assert results == [
        result(7, 90, [10, 20, 20, 40], pytest.approx(0.9)),
        result(7, 1, [40, 20, 40, 30], pytest.approx(0.8)),
        result(7, 5, [100, 100, 80, 100], pytest.approx(0.7)),
    ]
    json.dumps(results)  # plain Python numbers


def test_non_contiguous_categories_score_against_their_ground_truth():
    objects = [
        (7, 90, (10, 20, 20, 40), 0),
        (7, 1, (40, 20, 40, 30), 0),
        (7, 5, (100, 100, 80, 100), 0),
    ]
    truth = ground_truth(objects, categories=CATEGORY_IDS, image_ids=(7,))
    arrays = one_detection_per_class(scale=2.0)
    assert evaluate_coco(truth, to_coco_results(**arrays, category_ids=CATEGORY_IDS))[
        "ap"
    ] == pytest.approx(1.0)
    shifted = to_coco_results(**arrays, category_ids=(5, 90, 1))
    assert evaluate_coco(truth, shifted)["ap"] == 0.0


def test_accumulator_gathers_batches_and_leaves_out_padding_examples():
    """Two batches of two images at scale 0.5, each real image's detection on its object; the
    second batch's last row is a padding example whose detection, were it kept, would be a
    false positive ranked first."""
    objects = [(image, 1, MEDIUM_BOXES[image - 1], 0) for image in (1, 2, 3)]
    truth = ground_truth(objects, image_ids=(1, 2, 3))
    accumulator = CocoAccumulator(truth, category_ids=(1,))
    for image_ids, example_mask in (([1, 2], [True, True]), ([3, 1], [True, False])):
        rows = list(zip(image_ids, example_mask, strict=True))
        boxes = np.float32([[MEDIUM_BOXES[image - 1] if real else NOWHERE] for image, real in rows])
        boxes[..., 2:] += boxes[..., :2]  # [x, y, w, h] -> [x1, y1, x2, y2]
        detections = Detections(
            boxes=boxes * 0.5,
            scores=np.float32([[0.5 if real else 0.95] for real in example_mask]),
            labels=np.zeros((2, 1), np.int32),
            valid=np.ones((2, 1), bool),
        )
        batch = DetectionBatch(
            images=None, boxes=None, labels=None, box_mask=None,
            image_ids=np.int64(image_ids), scales=np.float32([0.5, 0.5]),
            image_sizes=None, example_mask=np.array(example_mask),
        )  # fmt: skip
        accumulator.add(detections, batch)
    metrics, results = accumulator.evaluate()
    assert [item["image_id"] for item in results] == [1, 2, 3]
    assert metrics["ap"] == pytest.approx(1.0)


def test_no_results_score_zero():
    assert evaluate_coco(FOUR_OBJECTS, []) == dict.fromkeys(METRIC_NAMES, 0.0)
    assert CocoAccumulator(FOUR_OBJECTS, (1,)).evaluate() == (dict.fromkeys(METRIC_NAMES, 0.0), [])


def test_evaluation_leaves_its_arguments_unchanged():
    """COCOeval marks ground-truth annotations `ignore` and completes result dicts in place."""
    objects = [(1, 1, MEDIUM_BOXES[0], 0), (1, 1, NOWHERE, 1)]
    truth = ground_truth(objects)
    results = [result(1, 1, MEDIUM_BOXES[0], 0.9)]
    evaluate_coco(truth, results)
    assert truth == ground_truth(objects) and results == [result(1, 1, MEDIUM_BOXES[0], 0.9)]


def test_write_results_round_trips_and_leaves_no_temporary_file(tmp_path):
    results = to_coco_results(**one_detection_per_class(scale=0.5), category_ids=CATEGORY_IDS)
    path = tmp_path / "detections.json"
    write_results(path, results)
    assert json.loads(path.read_text()) == results
    assert [entry.name for entry in tmp_path.iterdir()] == ["detections.json"]


def test_bad_input_is_named():
    with pytest.raises(
        InputError, match=r"results\[1\]\['image_id'\]=3 .*ground truth's image_ids"
    ):
        evaluate_coco(FOUR_OBJECTS, [result(1, 1, NOWHERE, 0.5), result(3, 1, NOWHERE, 0.5)])
    with pytest.raises(InputError, match=r"results\[0\]\['category_id'\]=2"):
        evaluate_coco(FOUR_OBJECTS, [result(1, 2, NOWHERE, 0.5)])
    with pytest.raises(InputError, match=r"ground_truth\['categories'\]=None"):
        evaluate_coco({"images": [], "annotations": []}, [])
    with pytest.raises(InputError, match="backend='detectron'"):
        evaluate_coco(FOUR_OBJECTS, [], backend="detectron")
    arrays = one_detection_per_class(scale=0.5)
    with pytest.raises(InputError, match=r"labels=2 .*\[0, 2\)"):
        to_coco_results(**arrays, category_ids=(1, 5))
    with pytest.raises(InputError, match=r"scales=0.0"):
        to_coco_results(**{**arrays, "scales": np.float32([0])}, category_ids=CATEGORY_IDS)
    with pytest.raises(InputError, match=r"valid.shape=\(1, 3\)"):
        to_coco_results(**{**arrays, "valid": arrays["valid"][:, :3]}, category_ids=CATEGORY_IDS)


def random_set(seed: int):
    """Six 320 x 240 images with 8 objects each of three categories, sizes from small to
    large, one a crowd region; detections are most objects' boxes jittered by about 5 %,
    with wrong-category and stray boxes, all with random scores."""
    rng = np.random.default_rng(seed)
    objects, results = [], []
    for image in range(1, 7):
        for number in range(8):
            width, height = np.exp(rng.uniform(np.log(10), np.log(220), 2))
            x, y = rng.uniform(0, 320 - width), rng.uniform(0, 240 - height)
            category = int(rng.choice(CATEGORY_IDS))
            objects.append((image, category, (x, y, width, height), int(number == 0)))
            if rng.random() < 0.8:
                jittered = np.array([x, y, width, height]) * rng.normal(1, 0.05, 4)
                results.append(result(image, category, jittered.tolist(), rng.random()))
            stray = [*rng.uniform(0, 200, 2), *rng.uniform(10, 100, 2)]
            results.append(result(image, int(rng.choice(CATEGORY_IDS)), stray, rng.random()))
    truth = ground_truth(objects, categories=CATEGORY_IDS, image_ids=range(1, 7))
    return truth, results


def test_faster_coco_eval_matches_pycocotools():
    pytest.importorskip("faster_coco_eval")
    truth, results = random_set(seed=0)
    reference = evaluate_coco(truth, results)
    assert all(0 < value < 1 for value in reference.values())  # every figure non-trivial
    faster = evaluate_coco(truth, results, backend="faster_coco_eval")
    assert faster == pytest.approx(reference, abs=1e-4)
