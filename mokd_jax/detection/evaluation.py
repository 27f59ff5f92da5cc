"""COCO box AP of a detector over a dataset's evaluation split, on one process or several.

`CocoEvaluator` is detection's `mokd_jax.evaluation.make_evaluator`: the evaluation step
(`detection.steps.detect`) is jitted once per network, and each call runs it over the
split and scores the detections with `coco_eval` on the host.

Several processes split each evaluation batch as classification's evaluator does: every
process reads the whole batch and feeds its own rows (`data.process_slice`) into the
global batch, so each device detects on its share of the images. The detections have a
fixed shape (`Detections`: D rows per image and a `valid` mask), so the step returns them
replicated over the mesh and XLA gathers them across devices and processes inside the
compiled program, as it sums classification's counts; no host-side exchange is needed.
Every process then holds the whole batch's detections next to the whole batch's image ids
and scales, and scores the whole split itself: the scorer is deterministic, so the same
detections give every process the same AP without one waiting for another's figures
(which it would otherwise do, idle, while process 0 scored). Only process 0 writes the
results out (`detection.phases.train_and_evaluate`).
"""

import functools
from collections.abc import Mapping
from typing import Any

import jax

from mokd_jax import parallel
from mokd_jax.data.batching import process_slice
from mokd_jax.detection import coco_eval
from mokd_jax.detection.anchors import retinanet_anchors
from mokd_jax.detection.batch import DetectionBatch
from mokd_jax.detection.postprocess import Detections
from mokd_jax.detection.steps import detect

COCO_KEYS = tuple(f"test_{name}" for name in coco_eval.METRIC_NAMES)


class CocoEvaluator:
    """A network's COCO box AP on the evaluation split: `evaluator(variables)` -> {test_ap,
    test_ap50, ...} (`COCO_KEYS`), keeping that pass's COCO results (every process's
    images) in `results`. `batch_size` is global: a multiple of the device count."""

    def __init__(self, model, inputs, dataset, batch_size: int, mesh):
        anchors = retinanet_anchors(dataset.image_shape[:2])
        self.step = jax.jit(
            functools.partial(detect, model=model, inputs=inputs, anchors=anchors),
            out_shardings=parallel.replicated(mesh),
        )
        self.rows = process_slice(batch_size, jax.process_index(), jax.process_count())
        self.sharding = parallel.batch_sharding(mesh)
        self.dataset, self.batch_size = dataset, batch_size
        self.results: list[dict] = []

    def __call__(self, variables: Mapping[str, Any]) -> dict[str, float]:
        accumulator = coco_eval.CocoAccumulator(
            self.dataset.ground_truth(), self.dataset.category_ids
        )
        for batch in self.dataset.eval_batches(self.batch_size):
            accumulator.add(self.detections(variables, batch), batch)
        metrics, self.results = accumulator.evaluate()
        return {f"test_{name}": value for name, value in metrics.items()}

    def detections(self, variables: Mapping[str, Any], batch: DetectionBatch) -> Detections:
        """The whole `batch`'s detections on the host, this process having fed its rows."""
        local = DetectionBatch(*(array[self.rows] for array in batch))
        return jax.device_get(self.step(variables, parallel.global_batch(local, self.sharding)))
