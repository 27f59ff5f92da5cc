"""Streaming tf.data input pipelines for the TFDS benchmarks (imagenet2012, cifar100, cifar10).

ImageNet does not fit in host memory, so unlike `mokd_jax.data.InMemoryDataset` these
pipelines read the TFDS files as they go and yield numpy batches: uint8 images [B,H,W,3]
(the jitted step normalises them for each network, `mokd_jax.normalization`) and int32
labels [B]. The datasets' and recipes' tables are `mokd_jax.data.tfds_specs`; the 'deit'
recipe's host side: bicubic resizes, RandAugment (`mokd_jax.data.randaugment`) and
repeated augmentation (`repeated`).

Nothing here downloads. A dataset must already be prepared under `data_dir`:
  - cifar10 / cifar100: `tfds build cifar10 --data_dir=DIR` where the internet is reachable
    (it fetches the archive), then copy DIR/cifar10 to the training machine.
  - imagenet2012: TFDS cannot download it. Put `ILSVRC2012_img_train.tar` and
    `ILSVRC2012_img_val.tar` (from image-net.org, after registering) in TFDS's manual
    download folder `DIR/downloads/manual/`, then run
    `tfds build imagenet2012 --data_dir=DIR` (hours; it writes DIR/imagenet2012/5.1.0).
An unprepared `data_dir` raises a one-line `InputError` that says this.

Determinism and resume (`train_batches`): epoch e of host p is a pure function of
(seed, p, e). Its TFDS file order and its `shuffle` buffer are seeded with values drawn from
(seed, p, e), and each example's augmentation uses stateless random ops seeded with
(seed, p, e) folded with the example's position in the epoch (repeated copies of an
example have positions of their own). Resuming at step s = e * n + k
(n steps per epoch) rebuilds epoch e and skips its first k * batch_size examples before they
are decoded, so the batches are bitwise those of an uninterrupted run. The cost: the skipped
records are still read and shuffled (no JPEG decoding or augmentation), up to one epoch of
I/O (ImageNet: ~140 GB / process_count at worst). Rebuilding the pipeline each epoch also
costs a pause per epoch: the shuffle buffer refills (ImageNet: 10k records) and the map
function is traced again (about a second with RandAugment).

Multi-host: each process reads only `tfds.split_for_jax_process(split, process_index,
process_count, drop_remainder=True)`, an even, disjoint slice of the split, which TFDS turns
into per-file skip/take instructions, so a host opens only the records of its slice. Every
host gets the same number of examples, hence the same number of steps per epoch.
"""

import dataclasses
import functools
from collections.abc import Callable, Iterator
from typing import NamedTuple

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from mokd_jax.checks import check_choice, check_int
from mokd_jax.data import tfds_specs
from mokd_jax.data.batching import process_slice
from mokd_jax.data.tfds_specs import NAMES, RECIPES
from mokd_jax.errors import invalid

__all__ = [
    "NAMES",
    "RECIPES",
    "TFDSDataset",
    "dataset_info",
    "eval_batches",
    "train_batches",
]

# --- Reading ---------------------------------------------------------------------------


def _builder(name: str, data_dir: str) -> tfds.core.DatasetBuilder:
    """The TFDS builder; an empty data_dir means TFDS's default (~/tensorflow_datasets)."""
    return tfds.builder(name, data_dir=data_dir or None)


def read_encoded(
    builder: tfds.core.DatasetBuilder,
    data_dir: str,
    split: tfds.typing.SplitArg,
    file_seed: int | None,
    prepare: str,
) -> tf.data.Dataset:
    """Raw examples with the image left encoded, so that skipped ones are never decoded.

    `file_seed` None reads the files unshuffled; otherwise it seeds their shuffle. `prepare`
    says how to prepare the dataset (with a {data_dir} field), for the error raised when
    `data_dir` lacks it.
    """
    try:
        return builder.as_dataset(
            split=split,
            shuffle_files=file_seed is not None,
            decoders={"image": tfds.decode.SkipDecoding()},
            # Each pipeline is read once (train rebuilds one per epoch), so TFDS's in-memory
            # autocache of small datasets (CIFAR) would only copy them.
            read_config=tfds.ReadConfig(shuffle_seed=file_seed, try_autocache=False),
        )
    except AssertionError as error:
        # TFDS reports a data_dir without the prepared dataset only by this assertion
        # ("Dataset imagenet2012: could not find data in DIR. Please make sure to call
        # dataset_builder.download_and_prepare() ..."), never naming the manual download.
        if "could not find data" not in str(error):
            raise
        how = prepare.format(data_dir=data_dir or "DIR")
        raise invalid(
            "data_dir", data_dir, f"a folder holding the prepared {builder.name}: {how}"
        ) from None


def dataset_info(name: str, data_dir: str = "") -> tuple[int, tuple[int | None, ...]]:
    """(num_classes, image_shape) of the stored examples, e.g. (1000, (None, None, 3)).

    A None dimension varies per image (ImageNet); the pipelines then resize to `image_size`.
    Read from the builder's feature spec, which TFDS has from code even before the data is
    prepared and under `tfds.testing.mock_data`; never from `info.splits`, which mock data and
    unprepared folders leave empty.
    """
    tfds_specs.spec(name)
    features = _builder(name, data_dir).info.features
    return features["label"].num_classes, tuple(features["image"].shape)


class EpochSeeds(NamedTuple):
    files: int  # TFDS file order
    shuffle: int  # tf.data shuffle buffer
    augment: tuple[int, int]  # stateless seed, folded with each example's position


def epoch_seeds(seed: int, process_index: int, epoch: int) -> EpochSeeds:
    """Independent seeds for one host's epoch, a pure function of its arguments."""
    files, shuffle, augment_0, augment_1 = (
        np.random.SeedSequence([seed, process_index, epoch]).generate_state(4).tolist()
    )
    return EpochSeeds(files, shuffle, (augment_0, augment_1))


def deterministic(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """Pins tf.data's element order (parallel map and interleave) whatever the defaults."""
    options = tf.data.Options()
    options.deterministic = True
    return dataset.with_options(options)


def repeated(examples: tf.data.Dataset, repeats: int, length: int) -> tf.data.Dataset:
    """The first ceil(length / repeats) examples, each `repeats` times in a row, cut to
    `length`: repeated augmentation with the epoch's length kept.

    timm's RepeatAugSampler does the same over all processes: its copies of an image land
    on consecutive ranks, so in the same global batch, as here they land in one host's
    batch (mostly; a copy may spill into the next one).
    """
    if repeats == 1:
        return examples
    distinct = examples.take(-(-length // repeats))
    copies = distinct.flat_map(
        lambda example: tf.data.Dataset.from_tensors(example).repeat(repeats)
    )
    return copies.take(length)


def _train_epoch(
    read: Callable[[int], tf.data.Dataset],
    preprocess: Callable[[tf.Tensor, tf.Tensor], tf.Tensor],
    shuffle_buffer: int,
    batch_size: int,
    seeds: EpochSeeds,
    first_step: int,
    repeats: int,
) -> tf.data.Dataset:
    """One epoch's batches from `first_step` on (see the module docstring)."""
    examples = read(seeds.files)
    length = int(examples.cardinality())
    examples = examples.shuffle(shuffle_buffer, seed=seeds.shuffle, reshuffle_each_iteration=False)
    examples = repeated(examples, repeats, length)
    # Enumerated before the skip: an example's augmentation seed is its position in the
    # epoch, wherever the iterator started (so repeated copies are augmented differently).
    examples = examples.enumerate().skip(first_step * batch_size)

    def prepare(position: tf.Tensor, example: dict) -> tuple[tf.Tensor, tf.Tensor]:
        seed = tf.random.experimental.stateless_fold_in(
            tf.constant(seeds.augment, tf.int64), position
        )
        return preprocess(example["image"], seed), tf.cast(example["label"], tf.int32)

    batches = examples.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
    batches = batches.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    return deterministic(batches)


def _endless(
    epoch_batches: Callable[[int, int], tf.data.Dataset], steps_per_epoch: int, start_step: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    epoch, first_step = divmod(start_step, steps_per_epoch)
    while True:
        yield from epoch_batches(epoch, first_step).as_numpy_iterator()
        epoch, first_step = epoch + 1, 0


def train_batches(
    name: str,
    data_dir: str,
    batch_size: int,
    seed: int,
    start_step: int = 0,
    *,
    image_size: int,
    recipe: str = "standard",
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Endless augmented (images uint8 [B,S,S,3], labels int32 [B]) batches of this host.

    Shuffled per epoch, remainder dropped; the batch at any step is a pure function of
    (seed, process_index, step), so `start_step=s` resumes exactly (module docstring).
    `batch_size` is per host. `recipe`: 'standard' (crop + flip) or 'deit' (bicubic crop,
    flip, RandAugment, 3 repeats: `tfds_specs.RECIPE_SETTINGS`; the trainer applies
    `mokd_jax.data.mixing.augment_batch` in its step).
    Arguments, and that the data is prepared, are checked here, not on the first `next()`.
    """
    spec = tfds_specs.spec(name)
    check_choice("recipe", recipe, RECIPES)
    check_int("image_size", image_size, 1)
    check_int("seed", seed, 0)
    check_int("start_step", start_step, 0)
    check_int("process_count", process_count, 1)
    if not 0 <= process_index < process_count:
        raise invalid("process_index", process_index, f"0 to {process_count - 1}")
    split = tfds.split_for_jax_process(
        spec.train_split,
        process_index=process_index,
        process_count=process_count,
        drop_remainder=True,
    )
    read = functools.partial(
        read_encoded, _builder(name, data_dir), data_dir, split, prepare=spec.prepare
    )
    # TFDS records every split's (and slice's) size as the dataset's cardinality.
    num_examples = int(read(None).cardinality())
    if not 0 < batch_size <= num_examples:
        raise invalid(
            "batch_size",
            batch_size,
            f"1 to {num_examples}, the number of training examples of this process",
        )
    steps = tfds_specs.RECIPE_SETTINGS[recipe]

    def preprocess(encoded: tf.Tensor, example_seed: tf.Tensor) -> tf.Tensor:
        crop_seed, augment_seed = tf.unstack(
            tf.random.experimental.stateless_split(example_seed, 2)
        )
        image = spec.train_crop(encoded, crop_seed, image_size, steps.interpolation)
        return steps.augment(image, augment_seed)

    def epoch_batches(epoch: int, first_step: int) -> tf.data.Dataset:
        seeds = epoch_seeds(seed, process_index, epoch)
        return _train_epoch(
            read, preprocess, spec.shuffle_buffer, batch_size, seeds, first_step, steps.repeats
        )

    return _endless(epoch_batches, num_examples // batch_size, start_step)


def eval_batches(
    name: str,
    data_dir: str,
    batch_size: int,
    *,
    image_size: int,
    split: str | None = None,
    recipe: str = "standard",
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(images, labels, mask) batches covering every example of `split` once, resized with
    the `recipe`'s interpolation.

    `split` defaults to the dataset's evaluation split (ImageNet 'validation', CIFAR
    'test'). As in `mokd_jax.data.eval_batches`, the last batch is padded with zero images
    to `batch_size` so the jitted eval step keeps one shape, and `mask` is False there. Every
    process reads the whole split.
    """
    spec = tfds_specs.spec(name)
    check_int("batch_size", batch_size, 1)
    check_int("image_size", image_size, 1)
    check_choice("recipe", recipe, RECIPES)
    interpolation = tfds_specs.RECIPE_SETTINGS[recipe].interpolation
    builder = _builder(name, data_dir)
    examples = read_encoded(builder, data_dir, split or spec.eval_split, None, spec.prepare)
    padding = -int(examples.cardinality()) % batch_size

    def prepare(example: dict) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        image = spec.eval_crop(example["image"], image_size, interpolation)
        return image, tf.cast(example["label"], tf.int32), tf.constant(True)

    blank = (tf.zeros([image_size, image_size, 3], tf.uint8), tf.constant(0), tf.constant(False))
    examples = examples.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
    examples = examples.concatenate(tf.data.Dataset.from_tensors(blank).repeat(padding))
    batches = examples.batch(batch_size).prefetch(tf.data.AUTOTUNE)
    return deterministic(batches).as_numpy_iterator()


@dataclasses.dataclass(frozen=True)
class TFDSDataset:
    """A TFDS dataset behind the trainer's dataset interface (`mokd_jax.data.Dataset`).

    `batch_size` is global there: each of `process_count` processes streams its own shard
    of the split (`train_batches` above) in batches of batch_size / process_count.
    """

    name: str
    data_dir: str
    num_classes: int
    image_size: int
    recipe: str

    @classmethod
    def open(
        cls, name: str, data_dir: str, num_classes: int, image_size: int, recipe: str
    ) -> "TFDSDataset":
        """Checks the arguments against the dataset (class count, size, recipe)."""
        classes, _ = dataset_info(name, data_dir)
        if num_classes not in (0, classes):
            raise invalid("num_classes", num_classes, f"0 or {classes}, the classes of {name}")
        check_choice("recipe", recipe, RECIPES)
        image_size = image_size or tfds_specs.spec(name).image_size
        check_int("image_size", image_size, 1)
        return cls(name, data_dir, classes, image_size, recipe)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.image_size, self.image_size, 3)

    def train_batches(
        self,
        batch_size: int,
        seed: int,
        start_step: int = 0,
        *,
        process_index: int = 0,
        process_count: int = 1,
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        rows = process_slice(batch_size, process_index, process_count)
        return train_batches(
            self.name,
            self.data_dir,
            rows.stop - rows.start,
            seed,
            start_step,
            image_size=self.image_size,
            recipe=self.recipe,
            process_index=process_index,
            process_count=process_count,
        )

    def eval_batches(self, batch_size: int) -> Iterator[tuple[np.ndarray, ...]]:
        return eval_batches(
            self.name, self.data_dir, batch_size, image_size=self.image_size, recipe=self.recipe
        )
