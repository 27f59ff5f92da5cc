"""User datasets stored as DATA_DIR/train.npz and DATA_DIR/test.npz.

Each file holds `image` (uint8 [N,H,W,C], or [N,H,W] for one channel) and `label`
(integers [N]). Everything is checked on load so that a malformed file fails with a
one-line InputError naming the file and array, not deep inside a jitted step.
"""

from pathlib import Path

import numpy as np

from mokd_jax.errors import invalid


def load(data_dir: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Reads and checks both splits.

    Returns:
      (train_images [N,H,W,C] uint8, train_labels [N] int32, test_images, test_labels).
    """
    directory = Path(data_dir)
    if not data_dir or not directory.is_dir():
        raise invalid("data_dir", data_dir, "a directory holding train.npz and test.npz")
    train_images, train_labels = _read_split(directory, "train")
    test_images, test_labels = _read_split(directory, "test")
    if test_images.shape[1:] != train_images.shape[1:]:
        raise invalid(
            "test.npz:image.shape",
            test_images.shape,
            f"(N, {', '.join(map(str, train_images.shape[1:]))}) to match train.npz:image",
        )
    return train_images, train_labels, test_images, test_labels


def _read_split(directory: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    path = directory / f"{split}.npz"
    if not path.is_file():
        raise invalid("data_dir", str(directory), f"a directory holding {path.name}, not found")
    with np.load(path, allow_pickle=False) as arrays:
        for key in ("image", "label"):
            if key not in arrays.files:
                raise invalid(
                    f"{path.name}:{key}",
                    "missing",
                    f"an array named {key!r}; the file holds {sorted(arrays.files)}",
                )
        images = _checked_images(arrays["image"], f"{path.name}:image")
        labels = _checked_labels(arrays["label"], f"{path.name}:label", len(images))
    return images, labels


def _checked_images(images: np.ndarray, field: str) -> np.ndarray:
    if images.dtype != np.uint8:
        raise invalid(f"{field}.dtype", images.dtype.name, "uint8 (pixel values 0..255)")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4:
        raise invalid(f"{field}.shape", images.shape, "rank 3 [N,H,W] or rank 4 [N,H,W,C]")
    if len(images) == 0:
        raise invalid(f"{field}.shape", images.shape, "at least one example")
    return images


def _checked_labels(labels: np.ndarray, field: str, num_images: int) -> np.ndarray:
    if not np.issubdtype(labels.dtype, np.integer):
        raise invalid(f"{field}.dtype", labels.dtype.name, "an integer dtype")
    if labels.ndim != 1:
        raise invalid(f"{field}.shape", labels.shape, "rank 1 [N], one class per image")
    if len(labels) != num_images:
        raise invalid(f"{field}.shape", labels.shape, f"({num_images},), one label per image")
    if labels.min() < 0:
        raise invalid(field, int(labels.min()), "class indices >= 0")
    return labels.astype(np.int32)
