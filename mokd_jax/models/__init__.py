"""Model registry: `get(name, num_classes)` returns an unbound Flax Linen module."""

import functools
from collections.abc import Callable

import flax.linen as nn

from mokd_jax.errors import invalid
from mokd_jax.models.cnn import ConvNet
from mokd_jax.models.resnet import BASIC, BOTTLENECK, ResNet, cifar_resnet, wide_resnet

__all__ = ["NAMES", "ConvNet", "get"]

# cnn_large (~205k params) teaches cnn_small (~19k, about 10x fewer): fewer channels
# and one block per stage instead of two.
_MODELS: dict[str, Callable[..., nn.Module]] = {
    "cnn_large": functools.partial(ConvNet, widths=(32, 64, 96), blocks=(2, 2, 2)),
    "cnn_small": functools.partial(ConvNet, widths=(16, 32, 48), blocks=(1, 1, 1)),
    # torchvision's ImageNet ResNets.
    "resnet18": functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block=BASIC),
    "resnet34": functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block=BASIC),
    "resnet50": functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block=BOTTLENECK),
    "resnet101": functools.partial(ResNet, stage_sizes=(3, 4, 23, 3), block=BOTTLENECK),
    # The CIFAR teachers and students of the CRD/DKD model zoo (RepDistiller).
    "resnet20": functools.partial(cifar_resnet, 20, (16, 16, 32, 64)),
    "resnet56": functools.partial(cifar_resnet, 56, (16, 16, 32, 64)),
    "resnet8x4": functools.partial(cifar_resnet, 8, (32, 64, 128, 256)),
    "resnet32x4": functools.partial(cifar_resnet, 32, (32, 64, 128, 256)),
    "wrn_16_2": functools.partial(wide_resnet, 16, 2),
    "wrn_40_2": functools.partial(wide_resnet, 40, 2),
}
NAMES = tuple(_MODELS)


def get(name: str, num_classes: int) -> nn.Module:
    """The model `name` (one of NAMES) with a `num_classes`-way head."""
    if name not in _MODELS:
        raise invalid("model", name, f"one of {', '.join(NAMES)}")
    if num_classes < 2:
        raise invalid("num_classes", num_classes, "an integer >= 2")
    return _MODELS[name](num_classes=num_classes)
