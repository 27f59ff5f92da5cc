"""Datasets as uint8 numpy arrays, batch iterators, and the one input normalisation.

`load(name, ...)` returns a `Dataset`; the trainer batches it with `train_batches` /
`eval_batches` and maps pixels to model inputs with `normalize` inside its jitted step
(uint8 batches are 4x smaller to move to the device than float32 ones).
"""

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from mokd_jax.data import embedded, npz
from mokd_jax.data.batching import eval_batches, train_batches
from mokd_jax.errors import invalid

__all__ = ["NAMES", "Dataset", "eval_batches", "load", "normalize", "train_batches"]

# Each loader takes data_dir and returns (train_images, train_labels, test_images,
# test_labels); the bundled digits need no directory and ignore it.
_LOADERS: dict[str, Callable[[str], tuple[np.ndarray, ...]]] = {
    "digits": lambda _data_dir: embedded.digits(),
    "npz": npz.load,
}
NAMES = tuple(_LOADERS)

# Fixed constants rather than per-dataset statistics: teacher and student, and any
# checkpoint, then agree on the input scale whatever data they are run on.
_MEAN = 0.5
_STD = 0.25


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """A train/test split held in host memory.

    Images are uint8 [N,H,W,C]; labels are int32 [N] in [0, num_classes).
    """

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    num_classes: int
    name: str


def load(dataset: str, data_dir: str = "", num_classes: int = 0) -> Dataset:
    """Loads `dataset` (one of NAMES).

    Args:
      dataset: registry name.
      data_dir: directory of the files, for datasets that read any ('npz').
      num_classes: 0 infers max label + 1 over both splits (a class absent from the data
        is then invisible); a positive value is checked against the labels.
    """
    if dataset not in _LOADERS:
        raise invalid("dataset", dataset, f"one of {', '.join(NAMES)}")
    train_images, train_labels, test_images, test_labels = _LOADERS[dataset](data_dir)
    return Dataset(
        train_images=train_images,
        train_labels=train_labels,
        test_images=test_images,
        test_labels=test_labels,
        num_classes=_num_classes(num_classes, train_labels, test_labels),
        name=dataset,
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


def normalize(images: jax.Array | np.ndarray) -> jax.Array:
    """uint8 pixels -> float32 model inputs, (x / 255 - 0.5) / 0.25, about in [-2, 2].

    Pure jnp so it runs inside the jitted step on uint8 batches.
    """
    return (jnp.asarray(images, jnp.float32) / 255.0 - _MEAN) / _STD
