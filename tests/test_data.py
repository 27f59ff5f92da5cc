"""Tests for mokd_jax.data: the Dataset protocol, loaders, input checks, batch iterators,
normalisation."""

import inspect
import itertools
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mokd_jax import data
from mokd_jax.errors import InputError


@pytest.fixture(scope="module")
def digits():
    return data.load("digits")


PROTOCOL_PROPERTIES = ("name", "num_classes", "image_shape")
PROTOCOL_METHODS = ("train_batches", "eval_batches")


def _tfds_dataset():
    """A TFDSDataset as `data.load` opens it, on mock data (imports TensorFlow)."""
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=4):
        return data.load("cifar10")


def test_the_protocol_lists_what_the_trainer_uses():
    members = {name for name in vars(data.Dataset) if not name.startswith("_")}
    assert members == {*PROTOCOL_PROPERTIES, *PROTOCOL_METHODS}


@pytest.mark.parametrize("load", [lambda: data.load("digits"), _tfds_dataset])
def test_both_datasets_satisfy_the_protocol(load):
    dataset = load()
    assert isinstance(dataset, data.Dataset)
    assert isinstance(dataset.name, str) and isinstance(dataset.num_classes, int)
    assert len(dataset.image_shape) == 3
    assert all(isinstance(side, int) for side in dataset.image_shape)
    # isinstance checks only that the members exist: the signatures must match too.
    for method in PROTOCOL_METHODS:
        expected = inspect.signature(getattr(data.Dataset, method))
        assert inspect.signature(getattr(type(dataset), method)) == expected, method
    for name in PROTOCOL_PROPERTIES:
        assert not callable(getattr(dataset, name)), name


def test_an_object_without_eval_batches_is_not_a_dataset(digits):
    class TrainOnly:
        name, num_classes, image_shape = digits.name, digits.num_classes, digits.image_shape
        train_batches = digits.train_batches

    assert not isinstance(TrainOnly(), data.Dataset)


def test_load_is_annotated_with_the_protocol():
    assert inspect.signature(data.load).return_annotation is data.Dataset
    assert isinstance(data.load("digits"), data.InMemoryDataset)


def test_digits_shapes_dtypes_and_counts(digits):
    assert digits.train_images.shape == (1437, 8, 8, 1)
    assert digits.test_images.shape == (360, 8, 8, 1)
    assert digits.train_images.dtype == digits.test_images.dtype == np.uint8
    assert digits.train_labels.shape == (1437,)
    assert digits.train_labels.dtype == digits.test_labels.dtype == np.int32
    assert digits.num_classes == 10
    assert digits.name == "digits"
    assert digits.train_images.max() == 255
    assert digits.train_images.min() == 0


def test_digits_split_is_stratified_and_fixed(digits):
    test_counts = np.bincount(digits.test_labels, minlength=10)
    train_counts = np.bincount(digits.train_labels, minlength=10)
    assert test_counts.min() >= 35  # ~180 per class * 0.2
    np.testing.assert_allclose(test_counts / (test_counts + train_counts), 0.2, atol=0.01)
    again = data.load("digits")
    np.testing.assert_array_equal(again.train_images, digits.train_images)
    np.testing.assert_array_equal(again.train_labels, digits.train_labels)
    np.testing.assert_array_equal(again.test_labels, digits.test_labels)


def test_num_classes_larger_than_labels_is_kept():
    assert data.load("digits", num_classes=12).num_classes == 12


@pytest.mark.parametrize(
    ("num_classes", "expected"),
    [(5, ["num_classes=5", "labels out of range", "max label is 9"]), (-1, ["num_classes=-1"])],
)
def test_bad_num_classes(num_classes, expected):
    with pytest.raises(InputError) as error:
        data.load("digits", num_classes=num_classes)
    for text in expected:
        assert text in str(error.value)


def test_unknown_dataset():
    with pytest.raises(InputError, match=r"dataset='mnist' is not allowed: one of digits, npz"):
        data.load("mnist")


def _arrays(num_train=12, num_test=5, shape=(6, 7, 3), num_classes=4):
    rng = np.random.default_rng(0)
    return {
        "train": {
            "image": rng.integers(0, 256, (num_train, *shape), dtype=np.uint8),
            "label": np.arange(num_train, dtype=np.int64) % num_classes,
        },
        "test": {
            "image": rng.integers(0, 256, (num_test, *shape), dtype=np.uint8),
            "label": np.arange(num_test, dtype=np.uint8) % num_classes,
        },
    }


def _write(directory, arrays):
    for split, contents in arrays.items():
        np.savez(directory / f"{split}.npz", **contents)
    return str(directory)


def test_npz_roundtrip(tmp_path):
    arrays = _arrays()
    dataset = data.load("npz", _write(tmp_path, arrays))
    assert dataset.num_classes == 4
    assert dataset.name == "npz"
    for split in ("train", "test"):
        np.testing.assert_array_equal(getattr(dataset, f"{split}_images"), arrays[split]["image"])
        labels = getattr(dataset, f"{split}_labels")
        assert labels.dtype == np.int32
        np.testing.assert_array_equal(labels, arrays[split]["label"])


def test_npz_adds_a_channel_to_rank_3_images(tmp_path):
    dataset = data.load("npz", _write(tmp_path, _arrays(shape=(8, 8))))
    assert dataset.train_images.shape == (12, 8, 8, 1)
    assert dataset.test_images.shape == (5, 8, 8, 1)


def test_npz_missing_data_dir(tmp_path):
    for data_dir in ("", str(tmp_path / "absent")):
        with pytest.raises(InputError, match=f"data_dir={data_dir!r}"):
            data.load("npz", data_dir)


def test_npz_missing_file(tmp_path):
    arrays = _arrays()
    del arrays["test"]
    with pytest.raises(InputError) as error:
        data.load("npz", _write(tmp_path, arrays))
    assert f"data_dir={str(tmp_path)!r}" in str(error.value)
    assert "test.npz" in str(error.value)


def _set(split, key, value):
    def mutate(arrays):
        arrays[split][key] = value

    return mutate


def _rename_label(arrays):
    arrays["test"]["labels"] = arrays["test"].pop("label")


# (how to break the generated files, texts the one-line error must contain)
_NPZ_ERRORS = {
    "missing key": (_rename_label, ["test.npz:label='missing'", "['image', 'labels']"]),
    "image dtype": (
        _set("train", "image", np.zeros((12, 6, 7, 3), np.float32)),
        ["train.npz:image.dtype='float32'", "uint8"],
    ),
    "label dtype": (
        _set("test", "label", np.zeros(5, np.float64)),
        ["test.npz:label.dtype='float64'", "integer"],
    ),
    "image rank": (
        _set("train", "image", np.zeros((12, 6), np.uint8)),
        ["train.npz:image.shape=(12, 6)", "rank 3"],
    ),
    "label rank": (
        _set("train", "label", np.zeros((12, 1), np.int32)),
        ["train.npz:label.shape=(12, 1)", "rank 1"],
    ),
    "length mismatch": (
        _set("test", "label", np.zeros(4, np.int32)),
        ["test.npz:label.shape=(4,)", "(5,)"],
    ),
    "shape mismatch": (
        _set("test", "image", np.zeros((5, 6, 7, 1), np.uint8)),
        ["test.npz:image.shape=(5, 6, 7, 1)", "(N, 6, 7, 3) to match train.npz:image"],
    ),
    "negative label": (
        _set("train", "label", np.array([0, 1, -3] * 4)),
        ["train.npz:label=-3", ">= 0"],
    ),
    "empty split": (
        _set("test", "image", np.zeros((0, 6, 7, 3), np.uint8)),
        ["test.npz:image.shape=(0, 6, 7, 3)", "at least one example"],
    ),
}


@pytest.mark.parametrize("case", _NPZ_ERRORS)
def test_npz_errors(tmp_path, case):
    mutate, expected = _NPZ_ERRORS[case]
    arrays = _arrays()
    mutate(arrays)
    with pytest.raises(InputError) as error:
        data.load("npz", _write(tmp_path, arrays))
    message = str(error.value)
    assert "\n" not in message
    for text in expected:
        assert text in message


def test_npz_labels_out_of_range(tmp_path):
    with pytest.raises(InputError) as error:
        data.load("npz", _write(tmp_path, _arrays()), num_classes=3)
    message = str(error.value)
    assert "num_classes=3" in message
    assert "labels out of range" in message
    assert "max label is 3" in message


def _toy(num_examples=10):
    images = np.arange(num_examples, dtype=np.uint8)[:, None, None, None] * np.ones(
        (1, 2, 2, 1), np.uint8
    )
    return images, np.arange(num_examples, dtype=np.int32)


def test_train_batches_shapes_and_epochs():
    images, labels = _toy()
    batches = list(itertools.islice(data.train_batches(images, labels, 3, seed=1), 6))
    for batch_images, batch_labels in batches:
        assert batch_images.shape == (3, 2, 2, 1)
        assert batch_labels.shape == (3,)
        np.testing.assert_array_equal(batch_images[:, 0, 0, 0], batch_labels)
    # 3 batches per epoch (remainder dropped), each epoch without repeats and reshuffled.
    epochs = [np.concatenate([b[1] for b in batches[i : i + 3]]) for i in (0, 3)]
    for epoch in epochs:
        assert len(set(epoch.tolist())) == 9
    assert not np.array_equal(epochs[0], epochs[1])


@pytest.mark.parametrize("start_step", [0, 1, 3, 7])
def test_train_batches_resume_matches_an_uninterrupted_run(start_step):
    images, labels = _toy()
    fresh = list(itertools.islice(data.train_batches(images, labels, 3, seed=5), 12))
    resumed = data.train_batches(images, labels, 3, seed=5, start_step=start_step)
    for expected, got in zip(fresh[start_step:], resumed, strict=False):
        np.testing.assert_array_equal(expected[0], got[0])
        np.testing.assert_array_equal(expected[1], got[1])


def test_train_batches_depend_on_seed():
    images, labels = _toy()
    first = next(data.train_batches(images, labels, 5, seed=0))[1]
    other = next(data.train_batches(images, labels, 5, seed=1))[1]
    assert not np.array_equal(first, other)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"batch_size": 11}, "batch_size=11"),
        ({"batch_size": 0}, "batch_size=0"),
        ({"seed": -1}, "seed=-1"),
        ({"start_step": -2}, "start_step=-2"),
    ],
)
def test_train_batches_errors_are_raised_on_call(kwargs, field):
    images, labels = _toy()
    arguments = {"batch_size": 2, "seed": 0} | kwargs
    with pytest.raises(InputError, match=field):
        data.train_batches(images, labels, **arguments)


def test_eval_batches_cover_every_example_once():
    images, labels = _toy()
    batches = list(data.eval_batches(images, labels, 4))
    assert len(batches) == 3
    for batch_images, batch_labels, mask in batches:
        assert batch_images.shape == (4, 2, 2, 1)
        assert batch_labels.shape == mask.shape == (4,)
        assert mask.dtype == bool
    np.testing.assert_array_equal(batches[-1][2], [True, True, False, False])
    kept = np.concatenate([batch_labels[mask] for _, batch_labels, mask in batches])
    np.testing.assert_array_equal(kept, labels)
    kept_images = np.concatenate([batch_images[mask] for batch_images, _, mask in batches])
    np.testing.assert_array_equal(kept_images, images)


def test_eval_batches_bad_batch_size():
    images, labels = _toy()
    with pytest.raises(InputError, match="batch_size=0"):
        data.eval_batches(images, labels, 0)


@pytest.mark.slow
def test_export_npz_script_roundtrips_digits(tmp_path):
    """scripts/export_npz.py writes files that the npz loader reads back identically."""
    repo = Path(__file__).resolve().parents[1]
    subprocess.run(
        [sys.executable, "scripts/export_npz.py", "--dataset=digits", f"--out={tmp_path}"],
        cwd=repo,
        check=True,
        capture_output=True,
    )
    original, exported = data.load("digits"), data.load("npz", str(tmp_path))
    for field in ("train_images", "train_labels", "test_images", "test_labels", "num_classes"):
        np.testing.assert_array_equal(getattr(exported, field), getattr(original, field))
