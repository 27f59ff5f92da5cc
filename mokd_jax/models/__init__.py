"""Model registry: `get(name, num_classes, dtype)` returns an unbound Flax Linen module."""

import functools
from collections.abc import Callable

import flax.linen as nn
import jax.numpy as jnp
from flax.typing import Dtype

from mokd_jax.checks import check_choice, check_int
from mokd_jax.models.cnn import ConvNet
from mokd_jax.models.layers import DTYPES, computation_dtype
from mokd_jax.models.mobilenet import CifarMobileNetV2, MobileNetV1, MobileNetV2
from mokd_jax.models.regnet import RegNet
from mokd_jax.models.resnet import (
    BASIC,
    BOTTLENECK,
    ResNet,
    cifar_resnet,
    cifar_resnet50,
    wide_resnet,
)
from mokd_jax.models.shufflenet import ShuffleNetV1, ShuffleNetV2
from mokd_jax.models.vgg import CFG_B, CFG_S, VGG
from mokd_jax.models.vit import VisionTransformer

__all__ = ["CIFAR_NAMES", "DTYPES", "NAMES", "ConvNet", "get"]

# DeiT's ViTs are timm's ViTs (DeiT changed the training, not the architecture): each
# DeiT name is the ViT of the same size with DeiT's stochastic depth (drop-path 0.1,
# active in training only; timm's ViTs default to none).
_VIT_TINY = functools.partial(VisionTransformer, embed_dim=192, num_heads=3)
_VIT_SMALL = functools.partial(VisionTransformer, embed_dim=384, num_heads=6)
_DEIT_DROP_PATH = 0.1

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
    # ImageNet students: mdistiller's MobileNetV1 (its ResNet-50 -> MobileNetV1 pair) and
    # torchvision's MobileNetV2.
    "mobilenet_v1": MobileNetV1,
    "mobilenet_v2": MobileNetV2,
    # The CIFAR teachers and students of the CRD/DKD model zoo (RepDistiller); the names
    # with a suffix are the CIFAR variants of models whose plain name is the ImageNet one.
    "resnet20": functools.partial(cifar_resnet, 20, (16, 16, 32, 64)),
    "resnet32": functools.partial(cifar_resnet, 32, (16, 16, 32, 64)),
    "resnet56": functools.partial(cifar_resnet, 56, (16, 16, 32, 64)),
    "resnet110": functools.partial(cifar_resnet, 110, (16, 16, 32, 64)),
    "resnet8x4": functools.partial(cifar_resnet, 8, (32, 64, 128, 256)),
    "resnet32x4": functools.partial(cifar_resnet, 32, (32, 64, 128, 256)),
    "resnet50_cifar": cifar_resnet50,
    "wrn_16_2": functools.partial(wide_resnet, 16, 2),
    "wrn_40_1": functools.partial(wide_resnet, 40, 1),
    "wrn_40_2": functools.partial(wide_resnet, 40, 2),
    "vgg8": functools.partial(VGG, cfg=CFG_S),
    "vgg13": functools.partial(VGG, cfg=CFG_B),
    "mobile_half": functools.partial(CifarMobileNetV2, width_mult=0.5),
    "shufflenet_v1": ShuffleNetV1,
    "shufflenet_v2": ShuffleNetV2,
    # DeiT's students (224 px unless `image_size` is overridden) and its RegNetY teacher.
    "vit_tiny": _VIT_TINY,
    "deit_tiny": functools.partial(_VIT_TINY, drop_path_rate=_DEIT_DROP_PATH),
    "vit_small": _VIT_SMALL,
    "deit_small": functools.partial(_VIT_SMALL, drop_path_rate=_DEIT_DROP_PATH),
    "regnety_160": RegNet,
}
NAMES = tuple(_MODELS)
# The CIFAR models of RepDistiller / mdistiller: converted from their checkpoints, they
# expect CIFAR-100's input statistics (`mokd_jax.normalization.CIFAR100`).
CIFAR_NAMES = (
    "resnet20",
    "resnet32",
    "resnet56",
    "resnet110",
    "resnet8x4",
    "resnet32x4",
    "resnet50_cifar",
    "wrn_16_2",
    "wrn_40_1",
    "wrn_40_2",
    "vgg8",
    "vgg13",
    "mobile_half",
    "shufflenet_v1",
    "shufflenet_v2",
)


def get(
    name: str, num_classes: int, dtype: Dtype = jnp.float32, image_size: int | None = None
) -> nn.Module:
    """The model `name` (one of NAMES) with a `num_classes`-way head, computing in `dtype`
    (a jnp dtype or 'float32' / 'bfloat16'; parameters stay float32 either way).
    `image_size` sets the input side of the models built for one (the ViTs: 224 by
    default); the others take any size and ignore it."""
    check_choice("model", name, NAMES)
    check_int("num_classes", num_classes, 2)
    model = _MODELS[name](num_classes=num_classes, dtype=computation_dtype(dtype))
    if image_size is not None and hasattr(model, "image_size"):
        # Models whose parameters depend on the input size (a ViT's position embedding).
        model = model.clone(image_size=image_size)
    return model
