"""Tests for mokd_jax.data.tfds_pipeline, all offline on `tfds.testing.mock_data`, and for
the device-side half of the DeiT recipe, mokd_jax.data.mixing (RandAugment, the host-side
half, is tested in test_randaugment.py).

tfds's mock yields `num_examples` random examples for any split and ignores split slicing,
so the process-sharding test passes it `_sliced_mock`, a stand-in for the file reader that
resolves the slices with TFDS's own split arithmetic and labels example i with i.
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from scipy import stats
from tensorflow_datasets.testing import mocking

from mokd_jax import normalization
from mokd_jax.data import mixing, tfds_pipeline, tfds_specs
from mokd_jax.errors import InputError

# 10 examples, batches of 4: two steps per epoch, and a last eval batch with 2 of 4 real.
NUM_EXAMPLES = 10
BATCH = 4
SIZES = {"cifar10": 32, "cifar100": 32, "imagenet2012": 64}


def _take(iterator, count):
    return list(itertools.islice(iterator, count))


def _assert_batches_equal(left, right):
    assert len(left) == len(right)
    for left_batch, right_batch in zip(left, right, strict=True):
        for left_array, right_array in zip(left_batch, right_batch, strict=True):
            np.testing.assert_array_equal(left_array, right_array)


@pytest.mark.parametrize(
    ("name", "num_classes", "stored_shape"),
    [
        ("cifar10", 10, (32, 32, 3)),
        ("cifar100", 100, (32, 32, 3)),
        ("imagenet2012", 1000, (None, None, 3)),
    ],
)
def test_shapes_dtypes_and_info(name, num_classes, stored_shape):
    size = SIZES[name]
    with tfds.testing.mock_data(num_examples=NUM_EXAMPLES):
        assert tfds_pipeline.dataset_info(name, "") == (num_classes, stored_shape)
        images, labels = next(tfds_pipeline.train_batches(name, "", BATCH, 0, image_size=size))
        evaluated = list(tfds_pipeline.eval_batches(name, "", BATCH, image_size=size))
    assert images.shape == (BATCH, size, size, 3) and images.dtype == np.uint8
    assert labels.shape == (BATCH,) and labels.dtype == np.int32
    assert 0 <= labels.min() and labels.max() < num_classes
    assert len(evaluated) == 3
    for images, labels, mask in evaluated:
        assert images.shape == (BATCH, size, size, 3) and images.dtype == np.uint8
        assert labels.dtype == np.int32 and mask.dtype == bool
        assert 0 <= labels.min() and labels.max() < num_classes


def test_imagenet_deit_recipe_shapes():
    with tfds.testing.mock_data(num_examples=NUM_EXAMPLES):
        batches = tfds_pipeline.train_batches(
            "imagenet2012", "", BATCH, 0, image_size=64, recipe="deit"
        )
        images, labels = next(batches)
    assert images.shape == (BATCH, 64, 64, 3) and images.dtype == np.uint8
    assert labels.shape == (BATCH,)


@pytest.mark.parametrize(
    ("name", "recipe"),
    [("cifar10", "standard"), pytest.param("imagenet2012", "deit", marks=pytest.mark.slow)],
)
def test_train_is_deterministic_shuffled_and_resumes(name, recipe):
    train = functools.partial(
        tfds_pipeline.train_batches, name, "", BATCH, image_size=SIZES[name], recipe=recipe
    )
    with tfds.testing.mock_data(num_examples=NUM_EXAMPLES):
        fresh = _take(train(7), 6)  # three epochs of two steps
        _assert_batches_equal(_take(train(7), 6), fresh)
        _assert_batches_equal(_take(train(7, start_step=3), 3), fresh[3:])
        other_seed = _take(train(8), 2)
    # Each epoch has its own order and augmentation; another seed gives other batches.
    assert not np.array_equal(fresh[0][0], fresh[2][0])
    assert not np.array_equal(fresh[0][0], other_seed[0][0])


@pytest.mark.parametrize("name", ["cifar100", "imagenet2012"])
def test_eval_covers_every_example_once_with_mask(name):
    size = SIZES[name]
    with tfds.testing.mock_data(num_examples=NUM_EXAMPLES):
        batches = list(tfds_pipeline.eval_batches(name, "", BATCH, image_size=size))
        raw = list(
            tfds.as_numpy(tfds.load(name, split="test" if name == "cifar100" else "validation"))
        )
    masks = np.concatenate([mask for _, _, mask in batches])
    np.testing.assert_array_equal(masks, np.arange(3 * BATCH) < NUM_EXAMPLES)
    labels = np.concatenate([labels for _, labels, _ in batches])[masks]
    np.testing.assert_array_equal(labels, [example["label"] for example in raw])
    images = np.concatenate([images for images, _, _ in batches])
    assert not images[~masks].any()
    if name == "cifar100":  # CIFAR eval images are the stored ones, untouched
        np.testing.assert_array_equal(images[masks], [example["image"] for example in raw])


def _sliced_mock(num_examples):
    """A `FileReaderBuilder._as_dataset` for mock_data that honours split slices.

    The `num_examples` examples of every split are tfds's encoded random ones, but example i
    has label i (ids below num_classes), and a slice keeps the examples TFDS's split
    arithmetic assigns to it.
    """

    def as_dataset(self, split, decoders=None, read_config=None, shuffle_files=False):
        infos = tfds.core.SplitDict(
            [tfds.core.SplitInfo(name="train", shard_lengths=[num_examples], num_bytes=0)]
        )
        (instruction,) = split.to_absolute(infos)
        features = self.info.features
        examples = [
            dict(example, label=index)
            for index, example in enumerate(
                mocking.EncodedRandomFakeGenerator(features, num_examples)
            )
        ][instruction.from_ : instruction.to]
        signature = tf.nest.map_structure(
            lambda info: tf.TensorSpec(info.shape, info.tf_dtype), features.get_serialized_info()
        )
        dataset = tf.data.Dataset.from_generator(lambda: iter(examples), output_signature=signature)
        dataset = dataset.apply(tf.data.experimental.assert_cardinality(len(examples)))
        return dataset.map(functools.partial(features.decode_example, decoders=decoders))

    return as_dataset


def test_processes_read_disjoint_parts_covering_the_split():
    def first_epoch_labels(process_index, process_count):
        steps = 12 // process_count // 3
        batches = tfds_pipeline.train_batches(
            "cifar100",
            "",
            3,
            0,
            image_size=32,
            process_index=process_index,
            process_count=process_count,
        )
        return np.concatenate([labels for _, labels in _take(batches, steps)])

    with tfds.testing.mock_data(num_examples=12, as_dataset_fn=_sliced_mock(12)):
        single = first_epoch_labels(0, 1)
        first, second = first_epoch_labels(0, 2), first_epoch_labels(1, 2)
    assert sorted(single) == list(range(12))  # one epoch is a permutation
    assert len(first) == len(second) == 6
    assert not set(first) & set(second)
    assert sorted(np.concatenate([first, second])) == list(range(12))


def test_repeated_takes_each_example_three_times_and_keeps_the_length():
    examples = tf.data.Dataset.range(10)
    copies = list(tfds_pipeline.repeated(examples, 3, 10).as_numpy_iterator())
    assert copies == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3]
    assert list(tfds_pipeline.repeated(examples, 1, 10).as_numpy_iterator()) == list(range(10))


def test_the_deit_recipe_repeats_each_example_with_its_own_augmentation():
    """timm's RepeatAugSampler (3 repeats, epoch length kept), on 12 examples labelled by
    their index: an epoch is 4 distinct examples 3 times each, the copies augmented apart,
    and the next epoch draws another subset."""
    with tfds.testing.mock_data(num_examples=12, as_dataset_fn=_sliced_mock(12)):
        batches = _take(
            tfds_pipeline.train_batches("cifar100", "", 3, 0, image_size=32, recipe="deit"), 8
        )
    images = np.concatenate([images for images, _ in batches])
    labels = np.concatenate([labels for _, labels in batches])
    first, second = labels[:12], labels[12:]
    for epoch in (first, second):
        values, counts = np.unique(epoch, return_counts=True)
        assert len(values) == 4 and (counts == 3).all()
        np.testing.assert_array_equal(epoch, np.repeat(epoch[::3], 3))
    assert set(first) != set(second)
    for copy in range(4):
        copies = images[3 * copy : 3 * copy + 3]
        assert not np.array_equal(copies[0], copies[1]) and not np.array_equal(copies[1], copies[2])


def test_recipes_interpolations_and_repeats():
    assert tfds_specs.RECIPE_SETTINGS["standard"].interpolation == "bilinear"
    assert tfds_specs.RECIPE_SETTINGS["deit"].interpolation == "bicubic"
    assert [tfds_specs.RECIPE_SETTINGS[name].repeats for name in ("standard", "deit")] == [1, 3]


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        (
            {"name": "mnist"},
            "dataset='mnist' is not allowed: one of imagenet2012, cifar100, cifar10",
        ),
        ({"recipe": "autoaugment"}, "recipe='autoaugment' is not allowed: one of standard, deit"),
        ({"process_index": 2, "process_count": 2}, "process_index=2 is not allowed: 0 to 1"),
        ({"batch_size": 11}, "batch_size=11 is not allowed: 1 to 10"),
        ({"image_size": 0}, "image_size=0 is not allowed"),
        ({"start_step": -1}, "start_step=-1 is not allowed"),
    ],
)
def test_bad_train_arguments(kwargs, expected):
    arguments = {
        "name": "cifar10",
        "data_dir": "",
        "batch_size": BATCH,
        "seed": 0,
        "image_size": 32,
    }
    with tfds.testing.mock_data(num_examples=NUM_EXAMPLES):
        with pytest.raises(InputError, match=expected):
            tfds_pipeline.train_batches(**{**arguments, **kwargs})


def test_missing_imagenet_names_data_dir_and_manual_folder(tmp_path):
    # Outside mock_data on purpose: an empty folder is what TFDS reports as not prepared.
    for read in (
        lambda: tfds_pipeline.train_batches("imagenet2012", str(tmp_path), 8, 0, image_size=64),
        lambda: tfds_pipeline.eval_batches("imagenet2012", str(tmp_path), 8, image_size=64),
    ):
        with pytest.raises(InputError) as error:
            read()
        message = str(error.value)
        assert "\n" not in message
        assert message.startswith(f"data_dir='{tmp_path}' is not allowed")
        assert f"{tmp_path}/downloads/manual/" in message
        assert "ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar" in message
        assert f"tfds build imagenet2012 --data_dir={tmp_path}" in message


def _batch(size=8, num_classes=5):
    images = np.random.default_rng(0).integers(0, 256, (size, 6, 5, 3)).astype(np.uint8)
    return images, np.arange(size) % num_classes


def test_mixup_cutmix_shapes_and_soft_labels_under_jit():
    images, labels = _batch()
    mix = jax.jit(functools.partial(mixing.mixup_cutmix, num_classes=5))
    for seed in range(6):
        mixed, targets = mix(images, labels, jax.random.key(seed))
        assert mixed.shape == images.shape and mixed.dtype == jnp.float32
        assert targets.shape == (8, 5)
        np.testing.assert_allclose(targets.sum(axis=1), 1.0, rtol=1e-6)
        assert float(targets.min()) >= 0.1 / 5 - 1e-7


def test_mixup_cutmix_with_alphas_zero_is_smoothed_one_hot():
    images, labels = _batch()
    mixed, targets = mixing.mixup_cutmix(
        images, labels, jax.random.key(0), 5, mixup_alpha=0.0, cutmix_alpha=0.0
    )
    np.testing.assert_array_equal(mixed, images.astype(np.float32))
    expected = np.full((8, 5), 0.1 / 5)
    expected[np.arange(8), labels] += 0.9
    np.testing.assert_allclose(targets, expected, rtol=1e-6)


def test_mixup_only_blends_with_the_mirrored_example():
    images, labels = _batch()
    mixed, targets = mixing.mixup_cutmix(
        images, labels, jax.random.key(1), 5, cutmix_alpha=0.0, smoothing=0.0
    )
    lam = float(targets[0, labels[0]])  # example 0 and its partner 7 have different labels
    expected = lam * images.astype(np.float32) + (1 - lam) * images[::-1].astype(np.float32)
    np.testing.assert_allclose(mixed, expected, rtol=1e-5, atol=1e-3)


def test_cutmix_only_pastes_a_box_and_weights_labels_by_area():
    images, labels = _batch()
    for seed in range(5):
        mixed, targets = mixing.mixup_cutmix(
            images, labels, jax.random.key(seed), 5, mixup_alpha=0.0, smoothing=0.0
        )
        mixed = np.asarray(mixed)
        kept = (mixed == images).all(axis=-1)
        pasted = (mixed == images[::-1]).all(axis=-1)
        assert (kept | pasted).all()
        # Same box for the whole batch; the kept area is the label weight of the example.
        box = ~kept[0]
        assert (~kept == box).all()
        np.testing.assert_allclose(targets[0, labels[0]], 1 - box.mean(), rtol=1e-6)


# --- Random erasing (timm's RandomErasing, mode 'pixel') ---------------------------------


def timm_erase_box(height: int, width: int, rng: np.random.Generator) -> tuple[int, int] | None:
    """timm's RandomErasing box (height, width) in numpy, or None when no try fits."""
    for _ in range(10):
        area = height * width * rng.uniform(0.02, 1 / 3)
        ratio = np.exp(rng.uniform(np.log(0.3), np.log(1 / 0.3)))
        box_height, box_width = round(np.sqrt(area * ratio)), round(np.sqrt(area / ratio))
        if box_width < width and box_height < height:
            return box_height, box_width
    return None


@functools.cache
def erased_batch(probability: float, count: int = 2000, size: int = 24):
    """(images, erased mask [B, H, W]) of a flat grey batch erased on the device."""
    images = jnp.full((count, size, size, 3), 100.0)
    erase = jax.jit(mixing.random_erasing, static_argnums=(2, 3))
    out = np.asarray(erase(images, jax.random.key(0), probability, normalization.IMAGENET))
    return out, (out != 100.0).any(axis=-1)


def test_random_erasing_boxes_follow_timms_distribution():
    out, erased = erased_batch(1.0)
    rows, cols = erased.any(axis=2), erased.any(axis=1)
    heights, widths = rows.sum(axis=1), cols.sum(axis=1)
    # One rectangle per example: its pixels are exactly the box's rows x columns.
    np.testing.assert_array_equal(erased.sum(axis=(1, 2)), heights * widths)
    rng = np.random.default_rng(0)
    boxes = np.array([timm_erase_box(24, 24, rng) or (0, 0) for _ in range(2000)])
    fitted = boxes[:, 0] > 0
    assert abs((heights > 0).mean() - fitted.mean()) < 0.02
    assert stats.ks_2samp(heights * widths, boxes.prod(axis=1)).pvalue > 0.01
    ours_ratio = heights[heights > 0] / widths[heights > 0]
    assert stats.ks_2samp(ours_ratio, boxes[fitted, 0] / boxes[fitted, 1]).pvalue > 0.01


def test_random_erasing_writes_standard_normal_noise_after_normalisation():
    out, erased = erased_batch(1.0)
    normalised = np.asarray(normalization.apply(normalization.IMAGENET, out))
    noise = normalised[erased]
    assert abs(noise.mean()) < 0.01 and abs(noise.std() - 1.0) < 0.01
    assert abs(stats.kurtosis(noise.ravel())) < 0.05  # normal, not clipped
    assert (out[~erased] == 100.0).all()


def test_random_erasing_applies_with_its_probability():
    _, erased = erased_batch(0.25)
    assert abs(erased.any(axis=(1, 2)).mean() - 0.25) < 0.03
    images = jnp.full((2, 8, 8, 3), 7.0)
    assert mixing.random_erasing(images, jax.random.key(0), 0.0, normalization.IMAGENET) is images
