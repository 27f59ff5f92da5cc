"""COCO box AP of a detector's output: detections as COCO result dicts, written as JSON, scored
against COCO-format ground truth by the official COCOeval, and an accumulator that gathers an
evaluation pass batch by batch on the host.

The scorer is pycocotools (the reference every published COCO number comes from), or, when
asked, faster-coco-eval (`pip install faster-coco-eval`), a C++ port with the same interface
that gives the same six figures (to 1e-4 in tests/test_detection_coco_eval.py) about ten
times faster on a thousand images; it is optional and not a dependency. Either scorer's
progress prints are swallowed: the six figures are the whole answer.
"""

import contextlib
import functools
import io
import json
import os
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from mokd_jax.checks import check_choice
from mokd_jax.detection.batch import DetectionBatch
from mokd_jax.detection.postprocess import Detections
from mokd_jax.errors import invalid

METRIC_NAMES = ("ap", "ap50", "ap75", "ap_small", "ap_medium", "ap_large")
"""COCOeval's first six summary figures, in its order: AP over IoU 0.50:0.95, at 0.50, at
0.75, and over 0.50:0.95 for small (< 32^2 px), medium and large (> 96^2 px) objects; -1
where the ground truth has no object of that size."""

BACKENDS = ("pycocotools", "faster_coco_eval")


def to_coco_results(
    boxes: np.ndarray,
    scores: np.ndarray,
    labels: np.ndarray,
    valid: np.ndarray,
    image_ids: np.ndarray,
    scales: np.ndarray,
    category_ids: Sequence[int],
) -> list[dict]:
    """The valid rows of B images' detections as COCO result dicts.

    boxes [B, D, 4] ([x1, y1, x2, y2] in pixels of the resized image), scores [B, D], labels
    [B, D] (contiguous class indices), valid [B, D]; image_ids [B] and scales [B] (resized /
    original size) as in `DetectionBatch`; category_ids[label] is the dataset's category id
    of a contiguous class index. Each dict has the original image id, the original category
    id, the box in original pixels as [x, y, width, height], and the score.
    """
    boxes, scores, labels, valid = (np.asarray(array) for array in (boxes, scores, labels, valid))
    image_ids, scales = np.asarray(image_ids), np.asarray(scales, np.float64)
    check_detection_rows(boxes, scores, labels, valid, image_ids, scales)
    images, rows = np.nonzero(valid)
    row_labels, row_scales = labels[images, rows], scales[images]
    check_labels_and_scales(row_labels, row_scales, len(category_ids))
    corners = boxes[images, rows].astype(np.float64) / row_scales[:, None]
    xywh = np.concatenate([corners[:, :2], corners[:, 2:] - corners[:, :2]], axis=1)
    original_categories = np.asarray(category_ids)[row_labels]
    return [
        {"image_id": int(image), "category_id": int(category), "bbox": box, "score": float(score)}
        for image, category, box, score in zip(
            image_ids[images], original_categories, xywh.tolist(), scores[images, rows], strict=True
        )
    ]


def check_detection_rows(boxes, scores, labels, valid, image_ids, scales) -> None:
    """Raises InputError unless boxes is [B, D, 4], scores, labels and valid [B, D], and
    image_ids and scales [B]."""
    if boxes.ndim != 3 or boxes.shape[-1] != 4:
        raise invalid("boxes.shape", boxes.shape, "[images, detections, 4]")
    expected = {
        "scores": (scores, boxes.shape[:2]),
        "labels": (labels, boxes.shape[:2]),
        "valid": (valid, boxes.shape[:2]),
        "image_ids": (image_ids, boxes.shape[:1]),
        "scales": (scales, boxes.shape[:1]),
    }
    for field, (array, shape) in expected.items():
        if array.shape != shape:
            raise invalid(f"{field}.shape", array.shape, f"{shape}, as boxes.shape says")


def check_labels_and_scales(labels: np.ndarray, scales: np.ndarray, num_classes: int) -> None:
    """Raises InputError unless the detections' labels are class indices in [0, num_classes)
    and their images' scales finite and > 0."""
    bad_labels = labels[(labels < 0) | (labels >= num_classes)]
    if bad_labels.size:
        raise invalid("labels", int(bad_labels[0]), f"a class index in [0, {num_classes})")
    bad_scales = scales[~(np.isfinite(scales) & (scales > 0))]
    if bad_scales.size:
        raise invalid(
            "scales", float(bad_scales[0]), "a finite number > 0 for an image with detections"
        )


def write_results(path: str | os.PathLike, results: list[dict]) -> None:
    """Writes `results` to `path` as JSON, through a temporary file renamed into place, so
    that a reader never sees a half-written file."""
    temporary = f"{os.fspath(path)}.tmp"
    with open(temporary, "w") as file:
        json.dump(results, file)
    os.replace(temporary, path)


def evaluate_coco(
    ground_truth: dict, results: list[dict], *, backend: str = "pycocotools"
) -> dict[str, float]:
    """COCO box AP of `results` (COCO result dicts) against `ground_truth` (a COCO instances
    dict: images, annotations, categories): {name: value} for METRIC_NAMES. No results
    score 0.0 everywhere. Neither argument is modified (COCOeval writes into both)."""
    check_choice("backend", backend, BACKENDS)
    check_results_match(ground_truth, results)
    if not results:
        return dict.fromkeys(METRIC_NAMES, 0.0)
    coco_class, new_evaluation = scorer(backend)
    with contextlib.redirect_stdout(io.StringIO()):
        truth = coco_class()
        truth.dataset = {
            **ground_truth,
            "annotations": [dict(annotation) for annotation in ground_truth["annotations"]],
        }
        truth.createIndex()
        detections = truth.loadRes([dict(result) for result in results])
        evaluation = new_evaluation(truth, detections, "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return {
        name: float(value)
        for name, value in zip(METRIC_NAMES, evaluation.stats[: len(METRIC_NAMES)], strict=True)
    }


def check_results_match(ground_truth: dict, results: Iterable[dict]) -> None:
    """Raises InputError unless the ground truth has its three lists and every result names
    one of its images and categories (COCOeval would fail on the first without naming it,
    and silently leave out the second)."""
    for field in ("images", "annotations", "categories"):
        if not isinstance(ground_truth.get(field), list):
            raise invalid(f"ground_truth[{field!r}]", ground_truth.get(field), "a list")
    known = {
        "image_id": {image["id"] for image in ground_truth["images"]},
        "category_id": {category["id"] for category in ground_truth["categories"]},
    }
    for index, result in enumerate(results):
        for field, ids in known.items():
            if result[field] not in ids:
                raise invalid(
                    f"results[{index}][{field!r}]",
                    result[field],
                    f"one of the ground truth's {field}s",
                )


def scorer(backend: str) -> tuple[type, Callable]:
    """(COCO class, COCOeval constructor) of the named backend, imported only when asked for.
    faster-coco-eval's COCOeval reports through `logging`, which a redirected stdout does not
    silence, so it gets a print function that drops its lines."""
    if backend == "faster_coco_eval":
        try:
            from faster_coco_eval import COCO, COCOeval_faster
        except ImportError:
            raise invalid(
                "backend", backend, "pycocotools, as faster-coco-eval is not installed"
            ) from None
        return COCO, functools.partial(COCOeval_faster, print_function=lambda *_: None)
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    return COCO, COCOeval


class CocoAccumulator:
    """One evaluation pass's detections, gathered batch by batch on the host, then scored.

    `category_ids` maps contiguous class indices to the dataset's category ids, as in
    `to_coco_results`; the padding rows of a last batch (`example_mask` False) are left out.
    """

    def __init__(
        self, ground_truth: dict, category_ids: Sequence[int], *, backend: str = "pycocotools"
    ):
        check_choice("backend", backend, BACKENDS)
        self.ground_truth = ground_truth
        self.category_ids = tuple(category_ids)
        self.backend = backend
        self.results: list[dict] = []

    def add(self, detections: Detections, batch: DetectionBatch) -> None:
        """Converts one batch's detections (jax or numpy arrays) and keeps them."""
        detections = Detections(*(np.asarray(array) for array in detections))
        valid = detections.valid & np.asarray(batch.example_mask)[:, None]
        self.results.extend(
            to_coco_results(
                detections.boxes,
                detections.scores,
                detections.labels,
                valid,
                batch.image_ids,
                batch.scales,
                self.category_ids,
            )
        )

    def evaluate(self) -> tuple[dict[str, float], list[dict]]:
        """(metrics as `evaluate_coco` gives them, every result gathered so far)."""
        return evaluate_coco(self.ground_truth, self.results, backend=self.backend), self.results
