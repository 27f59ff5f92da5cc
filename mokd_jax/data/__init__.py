"""Datasets, batch iterators, and the one input normalisation.

`load(name, ...)` returns a `Dataset` (the protocol in `mokd_jax.data.protocol`): an
`InMemoryDataset` (the digits or npz files, held in host memory) or a
`tfds_pipeline.TFDSDataset` (imagenet2012, cifar100, cifar10, streamed from TFDS files).
Both offer what the trainer uses: `name`, `num_classes`, `image_shape`, `train_batches(
batch_size, seed, start_step, process_index=, process_count=)` (endless, resumable, this
process's part of each global batch) and `eval_batches(batch_size)` (every example once,
padded, with a mask). Batches are uint8 images and int32 labels; the trainer maps pixels to
each network's inputs with its own statistics (`mokd_jax.normalization`) inside its jitted
step (uint8 batches are 4x smaller to move to the device than float32 ones).
"""

import dataclasses
from collections.abc import Callable, Iterator

import numpy as np

from mokd_jax.checks import check_choice
from mokd_jax.data import embedded, npz
from mokd_jax.data.batching import eval_batches, process_slice, train_batches
from mokd_jax.data.protocol import Dataset
from mokd_jax.errors import invalid

__all__ = [
    "NAMES",
    "TFDS_NAMES",
    "Dataset",
    "InMemoryDataset",
    "eval_batches",
    "load",
    "load_configured",
    "process_slice",
    "train_batches",
]

# Each loader takes data_dir and returns (train_images, train_labels, test_images,
# test_labels); the bundled digits need no directory and ignore it.
_LOADERS: dict[str, Callable[[str], tuple[np.ndarray, ...]]] = {
    "digits": lambda _data_dir: embedded.digits(),
    "npz": npz.load,
}
# Streamed by mokd_jax.data.tfds_pipeline (imported only when asked for: TensorFlow takes
# seconds to import, which the digits runs need not pay).
TFDS_NAMES = ("imagenet2012", "cifar100", "cifar10")
NAMES = (*_LOADERS, *TFDS_NAMES)


@dataclasses.dataclass(frozen=True, eq=False)
class InMemoryDataset:
    """A train/test split held in host memory (a `Dataset`).

    Images are uint8 [N,H,W,C]; labels are int32 [N] in [0, num_classes).
    """

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    num_classes: int
    name: str

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.train_images.shape[1:])

    def train_batches(
        self,
        batch_size: int,
        seed: int,
        start_step: int = 0,
        *,
        process_index: int = 0,
        process_count: int = 1,
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """This process's rows of each global batch of `batch_size` (see `train_batches`).

        Every process draws the same global batches and keeps its own contiguous slice, so
        the global batch at a step is the same for any number of processes.
        """
        rows = process_slice(batch_size, process_index, process_count)
        batches = train_batches(self.train_images, self.train_labels, batch_size, seed, start_step)
        return ((images[rows], labels[rows]) for images, labels in batches)

    def eval_batches(self, batch_size: int) -> Iterator[tuple[np.ndarray, ...]]:
        return eval_batches(self.test_images, self.test_labels, batch_size)


def load(
    dataset: str,
    data_dir: str = "",
    num_classes: int = 0,
    *,
    image_size: int = 0,
    recipe: str = "standard",
) -> Dataset:
    """Loads `dataset` (one of NAMES): an `InMemoryDataset`, or a `TFDSDataset` for TFDS_NAMES.

    Args:
      dataset: registry name.
      data_dir: directory of the files, for datasets that read any ('npz', the TFDS ones;
        '' means TFDS's default folder).
      num_classes: 0 infers max label + 1 over both splits (a class absent from the data
        is then invisible); a positive value is checked against the labels (for TFDS,
        against the dataset's class count).
      image_size: TFDS datasets only: the side of the square crops (0: the dataset's
        standard, 224 for ImageNet and 32 for CIFAR).
      recipe: TFDS datasets only: 'standard' or 'deit' training augmentation.
    """
    if dataset in TFDS_NAMES:
        from mokd_jax.data import tfds_pipeline

        return tfds_pipeline.TFDSDataset.open(dataset, data_dir, num_classes, image_size, recipe)
    check_choice("dataset", dataset, NAMES)  # NAMES less TFDS_NAMES are those of _LOADERS
    train_images, train_labels, test_images, test_labels = _LOADERS[dataset](data_dir)
    return InMemoryDataset(
        train_images=train_images,
        train_labels=train_labels,
        test_images=test_images,
        test_labels=test_labels,
        num_classes=_num_classes(num_classes, train_labels, test_labels),
        name=dataset,
    )


def load_configured(config) -> Dataset:
    """The dataset of a training config (an ml_collections ConfigDict): `load` with its
    data fields. Here rather than in `mokd_jax.train`, so that `mokd-evaluate` reads data
    without importing the trainer, whose TensorBoard writers import TensorFlow (seconds)."""
    return load(
        config.dataset,
        config.data_dir,
        config.num_classes,
        image_size=config.image_size,
        recipe=config.recipe,
    )


def _num_classes(requested: int, train_labels: np.ndarray, test_labels: np.ndarray) -> int:
    if requested < 0:
        raise invalid("num_classes", requested, "0 (infer from the labels) or a positive count")
    max_label = int(max(train_labels.max(), test_labels.max()))
    if requested == 0:
        return max_label + 1
    if max_label >= requested:
        raise invalid(
            "num_classes",
            requested,
            f"labels out of range: the max label is {max_label}, so at least {max_label + 1}",
        )
    return requested
