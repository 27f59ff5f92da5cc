"""What differs between the TFDS datasets (splits, shuffle buffer, crops, how to prepare
the files) and between the training recipes on the host (augmentation, interpolation,
repeats): the tables `mokd_jax.data.tfds_pipeline` reads.
"""

import dataclasses
from collections.abc import Callable

import tensorflow as tf

from mokd_jax.checks import check_choice
from mokd_jax.data import crops, randaugment

# A crop/resize turns (encoded image, stateless seed [2], image_size, interpolation) into
# uint8 [S,S,3].
TrainCrop = Callable[[tf.Tensor, tf.Tensor, int, str], tf.Tensor]
EvalCrop = Callable[[tf.Tensor, int, str], tf.Tensor]


@dataclasses.dataclass(frozen=True)
class Spec:
    """What differs between datasets: splits, shuffle buffer, crops, how to prepare it."""

    train_split: str
    eval_split: str
    # Examples held by tf.data's shuffle; the file order is shuffled too, so the mix reaches
    # beyond the buffer. ImageNet: 10k encoded JPEGs are ~1 GB of host memory. CIFAR: the
    # whole train split (~130 MB of PNGs), a full shuffle.
    shuffle_buffer: int
    train_crop: TrainCrop
    eval_crop: EvalCrop
    prepare: str
    image_size: int  # the standard crop side, used when a config leaves image_size at 0


def cifar_spec(name: str) -> Spec:
    return Spec(
        train_split="train",
        eval_split="test",
        shuffle_buffer=50_000,
        train_crop=crops.cifar_train,
        eval_crop=crops.cifar_eval,
        prepare=(
            f"run `tfds build {name} --data_dir={{data_dir}}` on a machine that reaches the "
            f"internet (then copy {{data_dir}}/{name} here if that is another one)"
        ),
        image_size=32,
    )


DATASETS: dict[str, Spec] = {
    "imagenet2012": Spec(
        train_split="train",
        eval_split="validation",
        shuffle_buffer=10_000,
        train_crop=crops.imagenet_train,
        eval_crop=crops.imagenet_eval,
        prepare=(
            "put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar (image-net.org) in "
            "{data_dir}/downloads/manual/ and run `tfds build imagenet2012 --data_dir={data_dir}`"
        ),
        image_size=224,
    ),
    "cifar100": cifar_spec("cifar100"),
    "cifar10": cifar_spec("cifar10"),
}
NAMES = tuple(DATASETS)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """The host side of a training recipe (the device side: `mokd_jax.data.mixing`)."""

    # Pixel augmentation after the crop, on uint8 [S,S,3] with a stateless seed.
    augment: Callable[[tf.Tensor, tf.Tensor], tf.Tensor]
    # The resize of the training crop and of the evaluation image (`crops.INTERPOLATIONS`).
    interpolation: str
    # Repeated augmentation: each example of an epoch appears `repeats` times, with its own
    # augmentation each time, and the epoch keeps its length (timm's RepeatAugSampler).
    repeats: int


# 'deit' is DeiT's main.py: RandAugment rand-m9-mstd0.5-inc1 (`mokd_jax.data.randaugment`),
# bicubic resizes and 3 repeats; Mixup/CutMix, label smoothing and random erasing, the rest
# of its recipe, run on the device: see `mokd_jax.data.mixing.augment_batch`.
RECIPE_SETTINGS: dict[str, Recipe] = {
    "standard": Recipe(lambda image, seed: image, "bilinear", 1),
    "deit": Recipe(randaugment.rand_augment, "bicubic", 3),
}
RECIPES = tuple(RECIPE_SETTINGS)


def spec(name: str) -> Spec:
    check_choice("dataset", name, NAMES)
    return DATASETS[name]
