"""Detection datasets: the `DetectionDataset` protocol, and `CocoJsonDataset`, which reads a
folder in COCO's format (`mokd_jax.detection.coco_json`): a real one, or the embedded
shapes set (`mokd_jax.detection.synthetic`) generated on the spot.

`load(name, data_dir)` opens one of NAMES: 'shapes', 'coco_json' (a folder holding
train.json and val.json) or 'coco/2017' (TFDS, `mokd_jax.detection.tfds_coco`).

Batches are `DetectionBatch`es of static shape (uint8 images padded to
`Geometry.image_shape`, boxes padded to `Geometry.max_boxes`), built on the host in numpy
(`mokd_jax.detection.transforms`).

Determinism and resume mirror the classification datasets (`mokd_jax.data.protocol`):
the global batch at step s is a pure function of (seed, s): its images come from
`mokd_jax.data.batching.train_batches` (an epoch's order depends on (seed, epoch) only),
their flips and their shorter sides (multi-scale training, `Geometry.train_min_sizes`)
from streams keyed by (seed, s). A resumed run (`start_step=s`) therefore
sees the batches of an uninterrupted one, and each of `process_count` processes decodes
only its own rows of every global batch, so the global batch does not depend on the
number of processes.

Decoding (PIL; libjpeg's accurate DCT, as torchvision's references load COCO) and the
transforms run on a thread pool, `workers` images at a time, a batch or two ahead of the
consumer; both release the GIL for most of their work. Results are gathered in order, so
threads change the speed only.
"""

import collections
import concurrent.futures
import copy
import dataclasses
import functools
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple, Protocol, TypeVar, runtime_checkable

import numpy as np
from absl import logging
from PIL import Image

from mokd_jax.checks import check_choice, check_int
from mokd_jax.data.batching import process_slice, train_batches
from mokd_jax.detection import coco_json, synthetic
from mokd_jax.detection.batch import DetectionBatch
from mokd_jax.detection.transforms import Example, Geometry, pad, prepare
from mokd_jax.errors import invalid

NAMES = ("shapes", "coco_json", "coco/2017")
DEFAULT_GEOMETRIES = {
    "shapes": Geometry(min_size=128, max_size=128, max_boxes=synthetic.MAX_OBJECTS),
    "coco_json": Geometry(),
    "coco/2017": Geometry(),
}
DEFAULT_WORKERS = min(8, os.cpu_count() or 1)
PREFETCH_BATCHES = 2
# Keys the flips' and the shorter sides' random streams apart from the epochs' orders.
_FLIP_STREAM = 1
_MIN_SIZE_STREAM = 2


@runtime_checkable
class DetectionDataset(Protocol):
    """A detection dataset with a training and an evaluation split.

    `isinstance(x, DetectionDataset)` checks that the members exist, not their signatures.
    """

    @property
    def name(self) -> str:
        """The name it was loaded by (NAMES)."""
        ...

    @property
    def num_classes(self) -> int:
        """Labels are in [0, num_classes)."""
        ...

    @property
    def category_ids(self) -> tuple[int, ...]:
        """The dataset's category id of each label (label i is category_ids[i])."""
        ...

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, 3) of every padded image in the batches."""
        ...

    def ground_truth(self) -> dict[str, Any]:
        """The evaluation split in COCO's format (images, annotations, categories), for
        pycocotools' COCOeval; a fresh copy each call, as COCOeval writes into it."""
        ...

    def train_batches(
        self,
        batch_size: int,
        seed: int,
        start_step: int = 0,
        *,
        process_index: int = 0,
        process_count: int = 1,
    ) -> Iterator[DetectionBatch]:
        """Endless shuffled, randomly flipped batches: this process's rows of each global
        batch of `batch_size`. The batch at any step is a pure function of (seed, step,
        process_index, process_count), so `start_step=s` resumes exactly. Arguments are
        checked on the call, not on the first `next()`."""
        ...

    def eval_batches(self, batch_size: int) -> Iterator[DetectionBatch]:
        """Batches covering every evaluation image once, in order; the last is padded to
        `batch_size` with blank rows, where `example_mask` is False."""
        ...


class BatchRow(NamedTuple):
    """One row of a batch before stacking: an image's `Example`, its id, and whether it is
    real (False for the padding of a last evaluation batch)."""

    example: Example
    image_id: int
    real: bool


def blank_row(geometry: Geometry) -> BatchRow:
    """A padding row: a black image without boxes, scale 1 (so that dividing by it is
    harmless), size 0 x 0 and image id -1."""
    nothing = pad(np.zeros((0, 0, 3), np.uint8), np.zeros((0, 4)), np.zeros(0), geometry)
    return BatchRow(Example(*nothing, np.float32(1), np.zeros(2, np.int32)), -1, False)


def stack(rows: Sequence[BatchRow]) -> DetectionBatch:
    examples = [row.example for row in rows]
    return DetectionBatch(
        images=np.stack([example.image for example in examples]),
        boxes=np.stack([example.boxes for example in examples]),
        labels=np.stack([example.labels for example in examples]),
        box_mask=np.stack([example.box_mask for example in examples]),
        image_ids=np.array([row.image_id for row in rows], np.int64),
        scales=np.array([example.scale for example in examples], np.float32),
        image_sizes=np.stack([example.image_size for example in examples]),
        example_mask=np.array([row.real for row in rows], bool),
    )


Result = TypeVar("Result")


def in_order(
    jobs: Iterator[Sequence[Callable[[], Result]]], workers: int
) -> Iterator[list[Result]]:
    """Runs each group of `jobs` on `workers` threads, PREFETCH_BATCHES groups ahead of the
    consumer, and yields each group's results in order."""
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        pending: collections.deque = collections.deque()
        for group in jobs:
            pending.append([pool.submit(job) for job in group])
            if len(pending) > PREFETCH_BATCHES:
                yield [future.result() for future in pending.popleft()]
        while pending:
            yield [future.result() for future in pending.popleft()]


def read_image(path: str, size: Sequence[int]) -> np.ndarray:
    """uint8 [H, W, 3] of an image file, checked against its (height, width) in the JSON."""
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"))
    expected = tuple(int(side) for side in size)
    if pixels.shape[:2] != expected:
        raise invalid(
            f"{path} size", pixels.shape[:2], f"{expected}, the (height, width) its JSON gives"
        )
    return pixels


def flips(seed: int, step: int, batch_size: int) -> np.ndarray:
    """bool [batch_size]: which rows of the global batch at `step` are flipped."""
    return np.random.default_rng([seed, step, _FLIP_STREAM]).random(batch_size) < 0.5


def min_sizes(geometry: Geometry, seed: int, step: int, batch_size: int) -> np.ndarray:
    """int [batch_size]: each row's shorter side in the global batch at `step`, drawn
    uniformly from `geometry.training_min_sizes`."""
    rng = np.random.default_rng([seed, step, _MIN_SIZE_STREAM])
    return rng.choice(np.array(geometry.training_min_sizes), batch_size)


@dataclasses.dataclass(frozen=True, eq=False)
class CocoJsonDataset:
    """A COCO-format folder (`coco_json`) as a `DetectionDataset`.

    `temporary_folder` keeps a generated set's temporary folder alive as long as the dataset.
    """

    name: str
    train: coco_json.CocoSplit
    val: coco_json.CocoSplit
    val_json: dict[str, Any]
    geometry: Geometry
    workers: int = DEFAULT_WORKERS
    temporary_folder: Any = None

    @property
    def num_classes(self) -> int:
        return len(self.train.categories.ids)

    @property
    def category_ids(self) -> tuple[int, ...]:
        return self.train.categories.ids

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.geometry.image_shape

    def ground_truth(self) -> dict[str, Any]:
        return copy.deepcopy(self.val_json)

    def _row(
        self, split: coco_json.CocoSplit, index: int, flip: bool, min_size: int | None = None
    ) -> BatchRow:
        image = read_image(split.paths[index], split.image_sizes[index])
        boxes, labels = split.targets(index)
        example = prepare(image, boxes, labels, self.geometry, flip, min_size)
        return BatchRow(example, int(split.image_ids[index]), True)

    def train_batches(
        self,
        batch_size: int,
        seed: int,
        start_step: int = 0,
        *,
        process_index: int = 0,
        process_count: int = 1,
    ) -> Iterator[DetectionBatch]:
        check_int("process_count", process_count, 1)
        if not 0 <= process_index < process_count:
            raise invalid("process_index", process_index, f"0 to {process_count - 1}")
        rows = process_slice(batch_size, process_index, process_count)
        positions = np.arange(len(self.train))
        # The classification sampler, on image positions (it checks the arguments).
        orders = train_batches(positions, positions, batch_size, seed, start_step)

        def jobs() -> Iterator[list[Callable[[], BatchRow]]]:
            for step, (indices, _) in enumerate(orders, start_step):
                flipped = flips(seed, step, batch_size)
                sides = min_sizes(self.geometry, seed, step, batch_size)
                yield [
                    functools.partial(self._row, self.train, int(index), bool(flip), int(side))
                    for index, flip, side in zip(
                        indices[rows], flipped[rows], sides[rows], strict=True
                    )
                ]

        return map(stack, in_order(jobs(), self.workers))

    def eval_batches(self, batch_size: int) -> Iterator[DetectionBatch]:
        check_int("batch_size", batch_size, 1)
        blank = blank_row(self.geometry)

        def jobs() -> Iterator[list[Callable[[], BatchRow]]]:
            for start in range(0, len(self.val), batch_size):
                indices = range(start, min(start + batch_size, len(self.val)))
                real = [functools.partial(self._row, self.val, index, False) for index in indices]
                yield real + [lambda: blank] * (batch_size - len(real))

        return map(stack, in_order(jobs(), self.workers))


def open_coco_json(
    directory: str,
    geometry: Geometry,
    *,
    name: str = "coco_json",
    workers: int = DEFAULT_WORKERS,
    temporary_folder: Any = None,
) -> CocoJsonDataset:
    """Reads DIR/train.json and DIR/val.json (their categories must agree), checking that
    `geometry.max_boxes` holds every image's boxes."""
    check_int("workers", workers, 1)
    train = coco_json.parse(coco_json.load_json(directory, "train"), directory, "train")
    val_json = coco_json.load_json(directory, "val")
    val = coco_json.parse(val_json, directory, "val")
    if val.categories != train.categories:
        raise invalid(
            f"{coco_json.json_path(directory, 'val')}: categories",
            list(val.categories.ids),
            f"those of train.json, {list(train.categories.ids)}",
        )
    most = max(int(split.target_counts().max(initial=0)) for split in (train, val))
    if most > geometry.max_boxes:
        raise invalid(
            "max_boxes", geometry.max_boxes, f"at least {most}: an image has {most} boxes"
        )
    logging.info("%s: %d training and %d evaluation images", directory, len(train), len(val))
    return CocoJsonDataset(name, train, val, val_json, geometry, workers, temporary_folder)


def open_shapes(
    geometry: Geometry,
    directory: str = "",
    *,
    seed: int = 0,
    workers: int = DEFAULT_WORKERS,
    images: tuple[int, int] | tuple[()] = (),
) -> CocoJsonDataset:
    """Generates the shapes set (`synthetic.write`) into `directory` (a temporary folder
    removed with the dataset when '') and opens it; `images`: its (training, evaluation)
    image counts, empty for `synthetic.write`'s."""
    folder = None if directory else tempfile.TemporaryDirectory(prefix="mokd_shapes_")
    directory = directory or folder.name
    logging.info("drawing the shapes set into %s", directory)
    counts = dict(zip(("num_train", "num_val"), images, strict=True)) if images else {}
    synthetic.write(directory, seed=seed, workers=workers, **counts)
    return open_coco_json(
        directory, geometry, name="shapes", workers=workers, temporary_folder=folder
    )


def load(
    name: str,
    data_dir: str = "",
    geometry: Geometry | None = None,
    *,
    workers: int = DEFAULT_WORKERS,
    shapes_images: tuple[int, int] | tuple[()] = (),
) -> DetectionDataset:
    """Opens dataset `name` (one of NAMES) from `data_dir`, with `geometry` (None: the
    dataset's DEFAULT_GEOMETRIES entry). 'shapes' is generated into data_dir, or into a
    temporary folder when it is '', with `shapes_images` (training, evaluation) images
    (empty: the set's own counts); 'coco/2017' reads TFDS's files ('': TFDS's default)."""
    check_choice("dataset", name, NAMES)
    geometry = geometry or DEFAULT_GEOMETRIES[name]
    if name == "shapes":
        return open_shapes(geometry, data_dir, workers=workers, images=shapes_images)
    if name == "coco_json":
        return open_coco_json(data_dir, geometry, workers=workers)
    from mokd_jax.detection import tfds_coco  # imports TensorFlow: only when asked for

    return tfds_coco.TFDSCocoDataset.open(data_dir, geometry, workers=workers)
