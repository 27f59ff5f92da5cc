"""Datasets bundled with installed packages, so tests and smoke runs need no network."""

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split


def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 real 8x8 handwritten digits, split 1437/360.

    Pixels go from 0..16 to uint8 0..255 so that every dataset shares one normalisation.
    The split is stratified with a fixed seed: every class is in the test set and every
    run (and every resumed run) sees the same examples.

    Returns:
      (train_images [N,8,8,1] uint8, train_labels [N] int32, test_images, test_labels).
    """
    bunch = load_digits()
    images = np.round(bunch.images * (255 / 16)).astype(np.uint8)[..., None]
    labels = bunch.target.astype(np.int32)
    train, test = train_test_split(
        np.arange(len(labels)), test_size=0.2, stratify=labels, random_state=0
    )
    return images[train], labels[train], images[test], labels[test]
