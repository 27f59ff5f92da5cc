"""COCO 2017 from TFDS (`coco/2017`) as a `DetectionDataset`: the same `DetectionBatch`es
as a COCO-format folder, and the ground truth rebuilt from the validation split.

Preparation: nothing here downloads. TFDS's builder fetches the archives itself where the
internet is reachable (`tfds build coco/2017 --data_dir=DIR`); elsewhere put the five
archives of cocodataset.org, train2017.zip, val2017.zip, test2017.zip,
annotations_trainval2017.zip and image_info_test2017.zip, in TFDS's manual download
folder DIR/downloads/manual/ and run the same command: TFDS takes an archive from there
when its name matches, and checks its checksum. It writes DIR/coco/2017/<version>
(about 25 GB; an hour or more). An unprepared `data_dir` raises a one-line `InputError`
that says this.

TFDS stores each image's objects as `bbox` (normalised [ymin, xmin, ymax, xmax]), `label`
(contiguous 0..79, in ascending COCO category id: `coco_categories.CATEGORIES`) and
`is_crowd`. Boxes become [x1, y1, x2, y2] pixels, clamped to the image; a box without area
after that is dropped, as the JSON reader drops it (`coco_json`): real COCO has none, but
mock or corrupt records may. Crowd objects are not training targets.

Differences from the JSON path (`mokd_jax.detection.dataset`), which TFDS's format forces:
  - Training streams like `mokd_jax.data.tfds_pipeline`: each process reads its own even
    slice of the split (`tfds.split_for_jax_process`), shuffled by file order and a
    SHUFFLE_BUFFER, seeded per (seed, process, epoch); a resumed run skips the records of
    its epoch before decoding them (read, not decoded: up to one epoch of I/O). A process's
    rows thus depend on the process count, as in classification. A record's flip and
    shorter side (multi-scale training) are drawn from its position in the epoch.
  - The ground truth is rebuilt from the validation records (`ground_truth`): boxes in
    pixels from the normalised ones (float32, so within 1e-4 px of the JSON's), TFDS's
    `area` (the segmentation's, as COCOeval's area ranges use), and annotation ids
    numbered 1..K, since pycocotools indexes annotations by id and needs them unique.
"""

import dataclasses
import functools
import itertools
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from mokd_jax.checks import check_int
from mokd_jax.data import crops, tfds_pipeline
from mokd_jax.data.batching import process_slice
from mokd_jax.detection.batch import DetectionBatch
from mokd_jax.detection.coco_categories import CATEGORIES, CATEGORY_IDS
from mokd_jax.detection.coco_json import clip_boxes
from mokd_jax.detection.dataset import DEFAULT_WORKERS, BatchRow, blank_row, in_order, stack
from mokd_jax.detection.transforms import Geometry, prepare
from mokd_jax.errors import invalid

NAME = "coco/2017"
TRAIN_SPLIT = "train"
EVAL_SPLIT = "validation"
# Encoded COCO images average ~160 kB: 1,000 of them hold ~160 MB of host memory.
SHUFFLE_BUFFER = 1_000
# Folded into a record's key for its shorter side; its flip takes the key as it is.
_MIN_SIZE_STREAM = 1
PREPARE = (
    "put train2017.zip, val2017.zip, test2017.zip, annotations_trainval2017.zip and "
    "image_info_test2017.zip (cocodataset.org) in {data_dir}/downloads/manual/ and run "
    "`tfds build coco/2017 --data_dir={data_dir}`"
)


def pixel_boxes(normalised: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """TFDS's [ymin, xmin, ymax, xmax] in [0, 1] -> ([x1, y1, x2, y2] pixels clamped into
    the image, whether each keeps an area)."""
    ymin, xmin, ymax, xmax = np.moveaxis(normalised.astype(np.float32), -1, 0)
    height, width = np.float32(height), np.float32(width)
    boxes = np.stack([xmin * width, ymin * height, xmax * width, ymax * height], axis=-1)
    return clip_boxes(boxes, np.array([height, width]))


def _objects(example: dict[str, Any]) -> dict[str, tf.Tensor]:
    """A TFDS record, its image still encoded, as the host side reads it."""
    objects = example["objects"]
    return {
        "image_id": example["image/id"],
        "bbox": objects["bbox"],
        "label": tf.cast(objects["label"], tf.int32),
        "is_crowd": objects["is_crowd"],
    }


def _decoded(example: dict[str, Any]) -> dict[str, tf.Tensor]:
    return dict(_objects(example), image=crops.decode_jpeg(example["image"]))


def _row(
    example: dict[str, np.ndarray], geometry: Geometry, flip: bool, min_size: int | None = None
) -> BatchRow:
    """A decoded record -> its batch row: crowd objects and boxes without area left out."""
    image = example["image"]
    boxes, keep = pixel_boxes(example["bbox"], *image.shape[:2])
    keep &= ~example["is_crowd"]
    prepared = prepare(image, boxes[keep], example["label"][keep], geometry, flip, min_size)
    return BatchRow(prepared, int(example["image_id"]), True)


@dataclasses.dataclass(frozen=True, eq=False)
class TFDSCocoDataset:
    """TFDS's coco/2017 (module docstring) as a `DetectionDataset`."""

    data_dir: str
    geometry: Geometry
    workers: int = DEFAULT_WORKERS
    name: str = NAME

    @classmethod
    def open(
        cls, data_dir: str, geometry: Geometry, *, workers: int = DEFAULT_WORKERS
    ) -> "TFDSCocoDataset":
        """Checks the arguments, and that `data_dir` holds the prepared dataset."""
        check_int("workers", workers, 1)
        dataset = cls(data_dir, geometry, workers)
        dataset._read(EVAL_SPLIT, None)
        return dataset

    @property
    def num_classes(self) -> int:
        return len(CATEGORIES)

    @property
    def category_ids(self) -> tuple[int, ...]:
        return CATEGORY_IDS

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.geometry.image_shape

    def _read(self, split: tfds.typing.SplitArg, file_seed: int | None) -> tf.data.Dataset:
        builder = tfds.builder(NAME, data_dir=self.data_dir or None)
        return tfds_pipeline.read_encoded(builder, self.data_dir, split, file_seed, PREPARE)

    def ground_truth(self) -> dict[str, Any]:
        """The validation split in COCO's format, rebuilt from its records (module
        docstring); one pass over them, reading the JPEG headers only."""
        logging.info("%s: reading the ground truth of the %s split", NAME, EVAL_SPLIT)

        def header(example: dict[str, Any]) -> dict[str, tf.Tensor]:
            shape = tf.image.extract_jpeg_shape(example["image"])[:2]
            return dict(_objects(example), shape=shape, area=example["objects"]["area"])

        images, annotations = [], []
        for example in self._read(EVAL_SPLIT, None).map(header).as_numpy_iterator():
            height, width = (int(side) for side in example["shape"])
            image_id = int(example["image_id"])
            images.append({"id": image_id, "width": width, "height": height})
            boxes, keep = pixel_boxes(example["bbox"], height, width)
            for (x1, y1, x2, y2), label, crowd, area in zip(
                boxes[keep].tolist(),
                example["label"][keep],
                example["is_crowd"][keep],
                example["area"][keep],
                strict=True,
            ):
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": image_id,
                        "category_id": CATEGORY_IDS[label],
                        "bbox": [x1, y1, x2 - x1, y2 - y1],
                        "area": float(area),
                        "iscrowd": int(crowd),
                    }
                )
        categories = [{"id": category_id, "name": name} for category_id, name in CATEGORIES]
        return {"images": images, "annotations": annotations, "categories": categories}

    def train_batches(
        self,
        batch_size: int,
        seed: int,
        start_step: int = 0,
        *,
        process_index: int = 0,
        process_count: int = 1,
    ) -> Iterator[DetectionBatch]:
        check_int("seed", seed, 0)
        check_int("start_step", start_step, 0)
        check_int("process_count", process_count, 1)
        if not 0 <= process_index < process_count:
            raise invalid("process_index", process_index, f"0 to {process_count - 1}")
        rows = process_slice(batch_size, process_index, process_count)
        per_process = rows.stop - rows.start
        split = tfds.split_for_jax_process(
            TRAIN_SPLIT,
            process_index=process_index,
            process_count=process_count,
            drop_remainder=True,
        )
        # TFDS records every split's (and slice's) size as the dataset's cardinality.
        num_examples = int(self._read(split, None).cardinality())
        if not 0 < per_process <= num_examples:
            raise invalid(
                "batch_size",
                batch_size,
                f"1 to {num_examples} per process, the training examples of each",
            )
        steps_per_epoch = num_examples // per_process
        sides = tf.constant(self.geometry.training_min_sizes, tf.int32)

        def epoch(index: int, first_step: int) -> Iterator[dict[str, np.ndarray]]:
            seeds = tfds_pipeline.epoch_seeds(seed, process_index, index)
            examples = self._read(split, seeds.files)
            examples = examples.shuffle(
                SHUFFLE_BUFFER, seed=seeds.shuffle, reshuffle_each_iteration=False
            )
            # Enumerated before the skip: a flip depends on the position in the epoch only.
            examples = examples.enumerate().skip(first_step * per_process)

            def decode(position: tf.Tensor, example: dict[str, Any]) -> dict[str, tf.Tensor]:
                key = tf.random.experimental.stateless_fold_in(
                    tf.constant(seeds.augment, tf.int64), position
                )
                side = tf.random.stateless_uniform(
                    [],
                    tf.random.experimental.stateless_fold_in(key, _MIN_SIZE_STREAM),
                    maxval=len(sides),
                    dtype=tf.int32,
                )
                return dict(
                    _decoded(example),
                    flip=tf.random.stateless_uniform([], key) < 0.5,
                    min_size=tf.gather(sides, side),
                )

            decoded = examples.map(decode, num_parallel_calls=tf.data.AUTOTUNE)
            return tfds_pipeline.deterministic(
                decoded.prefetch(tf.data.AUTOTUNE)
            ).as_numpy_iterator()

        def jobs() -> Iterator[list[Callable[[], BatchRow]]]:
            index, first_step = divmod(start_step, steps_per_epoch)
            while True:
                examples = epoch(index, first_step)
                for _ in range(first_step, steps_per_epoch):
                    yield [
                        functools.partial(
                            _row,
                            example,
                            self.geometry,
                            bool(example["flip"]),
                            int(example["min_size"]),
                        )
                        for example in itertools.islice(examples, per_process)
                    ]
                index, first_step = index + 1, 0

        return map(stack, in_order(jobs(), self.workers))

    def eval_batches(self, batch_size: int) -> Iterator[DetectionBatch]:
        check_int("batch_size", batch_size, 1)
        decoded = self._read(EVAL_SPLIT, None).map(_decoded, num_parallel_calls=tf.data.AUTOTUNE)
        blank = blank_row(self.geometry)

        def jobs() -> Iterator[list[Callable[[], BatchRow]]]:
            examples = tfds_pipeline.deterministic(decoded.prefetch(tf.data.AUTOTUNE))
            records = examples.as_numpy_iterator()
            while group := list(itertools.islice(records, batch_size)):
                real = [functools.partial(_row, example, self.geometry, False) for example in group]
                yield real + [lambda: blank] * (batch_size - len(real))

        return map(stack, in_order(jobs(), self.workers))
