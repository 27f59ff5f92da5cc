"""Numpy batch iterators with fixed shapes, so that each jitted step compiles once."""

from collections.abc import Iterator

import numpy as np

from mokd_jax.checks import check_int
from mokd_jax.errors import invalid


def train_batches(
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    seed: int,
    start_step: int = 0,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Endless (images, labels) batches, reshuffled every epoch, remainder dropped.

    Each epoch's order depends only on (seed, epoch), so the batch at any step is a pure
    function of that step: a run resumed with `start_step=s` sees exactly the batches an
    uninterrupted run sees from step s on, which keeps resumed training bitwise equal.
    Arguments are checked here, not on the first `next()`.
    """
    num_examples = len(images)
    if not 0 < batch_size <= num_examples:
        raise invalid(
            "batch_size", batch_size, f"1 to {num_examples}, the number of training examples"
        )
    check_int("seed", seed, 0)
    check_int("start_step", start_step, 0)
    return _train_batches(images, labels, batch_size, seed, start_step)


def _train_batches(
    images: np.ndarray, labels: np.ndarray, batch_size: int, seed: int, start_step: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    steps_per_epoch = len(images) // batch_size
    epoch, first = divmod(start_step, steps_per_epoch)
    while True:
        order = np.random.default_rng([seed, epoch]).permutation(len(images))
        for step in range(first, steps_per_epoch):
            batch = order[step * batch_size : (step + 1) * batch_size]
            yield images[batch], labels[batch]
        epoch, first = epoch + 1, 0


def eval_batches(
    images: np.ndarray, labels: np.ndarray, batch_size: int
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(images, labels, mask) batches covering every example once, in order.

    The last batch is padded with zeros to `batch_size` so the jitted eval step keeps one
    shape; `mask` is False on the padding, which metrics must leave out.
    """
    check_int("batch_size", batch_size, 1)
    return _eval_batches(images, labels, batch_size)


def _eval_batches(
    images: np.ndarray, labels: np.ndarray, batch_size: int
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    for start in range(0, len(images), batch_size):
        batch_images = images[start : start + batch_size]
        batch_labels = labels[start : start + batch_size]
        padding = batch_size - len(batch_images)
        mask = np.arange(batch_size) < len(batch_images)
        yield _pad(batch_images, padding), _pad(batch_labels, padding), mask


def _pad(array: np.ndarray, padding: int) -> np.ndarray:
    return np.pad(array, [(0, padding)] + [(0, 0)] * (array.ndim - 1))


def process_slice(batch_size: int, process_index: int, process_count: int) -> slice:
    """The rows of a global batch that process `process_index` of `process_count` feeds."""
    if batch_size % process_count:
        raise invalid("batch_size", batch_size, f"a multiple of the process count {process_count}")
    per_process = batch_size // process_count
    return slice(process_index * per_process, (process_index + 1) * per_process)
