"""`Dataset`: what the trainer asks of a dataset, whether held in memory or streamed.

`mokd_jax.data.InMemoryDataset` (digits, npz) and `mokd_jax.data.tfds_pipeline.TFDSDataset`
(imagenet2012, cifar100, cifar10) both satisfy it, and `mokd_jax.data.load` returns one of
them. Batches are numpy: uint8 images [B,H,W,C] and int32 labels [B].
"""

from collections.abc import Iterator
from typing import Protocol, runtime_checkable

import numpy as np

__all__ = ["Dataset"]


@runtime_checkable
class Dataset(Protocol):
    """A labelled image dataset with a training and an evaluation split.

    `isinstance(x, Dataset)` checks that the members exist, not their signatures.
    """

    @property
    def name(self) -> str:
        """The registry name it was loaded by (`mokd_jax.data.NAMES`)."""
        ...

    @property
    def num_classes(self) -> int:
        """Labels are in [0, num_classes)."""
        ...

    @property
    def image_shape(self) -> tuple[int, ...]:
        """(H, W, C) of every image in the batches."""
        ...

    def train_batches(
        self,
        batch_size: int,
        seed: int,
        start_step: int = 0,
        *,
        process_index: int = 0,
        process_count: int = 1,
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Endless shuffled (images, labels) batches: this process's rows of each global
        batch of `batch_size`, remainder dropped.

        The batch at any step is a pure function of (seed, step, process_index,
        process_count), so `start_step=s` resumes exactly where an uninterrupted run would
        be. Arguments are checked on the call, not on the first `next()`.
        """
        ...

    def eval_batches(self, batch_size: int) -> Iterator[tuple[np.ndarray, ...]]:
        """(images, labels, mask) batches covering every evaluation example once; the last
        is padded to `batch_size` with zeros, where `mask` is False."""
        ...
