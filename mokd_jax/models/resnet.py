"""ResNets: torchvision's ImageNet ResNets and the CIFAR ResNets / WRNs of the CRD/DKD zoo
(RepDistiller's `resnet.py` basic-block ResNets, its `resnetv2.py` bottleneck ResNet50 and
its `wrn.py` wide ResNets).

Two block implementations, each shared by every depth:
  `ResidualBlock` (post-activation; `BASIC` for resnet18/34 and the CIFAR ResNets,
    `BOTTLENECK` for resnet50/101, stride on the 3x3 conv as in torchvision v1.5),
  `PreActBlock` (the wide ResNets: BN -> relu -> conv, dropout 0).
`ResNet` stacks `ResidualBlock`s behind an ImageNet stem (conv7x7/2, BN, relu, max-pool
3x3/2) or a CIFAR stem (conv3x3, BN, relu); `WideResNet` stacks `PreActBlock`s behind a bare
conv3x3 and ends with BN + relu. All follow the model contract of `cnn.ConvNet` (`encode`,
`classify`, `__call__`, `feature_width`); images are NHWC.

Every convolution pads exactly as the torch model does (k//2 on each side, never 'SAME',
which pads stride-2 convolutions asymmetrically) and the stem max-pool pads with -inf, so
converted torch weights give the torch logits. Initialisation is torch's: kaiming-normal
(fan_out) convs, BN scale 1 / bias 0, torch's default uniform(+-1/sqrt(fan_in)) Dense kernel
and bias (the WRN zeroes its fc bias, as RepDistiller does). `dtype` is the computation
dtype (see `layers`).

Parameter names map one to one onto torch state-dict keys (`flax path <- torch key`; conv
kernels are HWIO for torch's OIHW, Dense kernels the transpose of torch's weight; BN `scale`,
`bias` are params and `mean`, `var` batch_stats for torch's weight, bias, running_mean,
running_var; torch's num_batches_tracked has no counterpart):
  ResNet (torchvision and RepDistiller `models/resnet.py`):
    conv1, bn1                       <- conv1, bn1
    layer{s}_{b}/conv{i}, /bn{i}     <- layer{s}.{b}.conv{i}, .bn{i}    (i = 1..2 or 1..3)
    layer{s}_{b}/downsample_conv     <- layer{s}.{b}.downsample.0
    layer{s}_{b}/downsample_bn       <- layer{s}.{b}.downsample.1
    fc                               <- fc
  CIFAR ResNet50 (RepDistiller `models/resnetv2.py`; `cifar_resnet50`): the same, but its
  shortcut Sequential is `shortcut` and its head `linear`:
    layer{s}_{b}/downsample_conv     <- layer{s}.{b}.shortcut.0   (and _bn <- .shortcut.1)
    fc                               <- linear
  WideResNet (RepDistiller `models/wrn.py`):
    conv1                            <- conv1
    block{s}_{b}/bn{i}, /conv{i}     <- block{s}.layer.{b}.bn{i}, .conv{i}   (i = 1, 2)
    block{s}_{b}/conv_shortcut       <- block{s}.layer.{b}.convShortcut
    bn1, fc                          <- bn1, fc
"""

from collections.abc import Sequence
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.typing import Dtype

from mokd_jax.checks import check_int
from mokd_jax.errors import invalid
from mokd_jax.models.base import StagedClassifier
from mokd_jax.models.layers import batch_norm, conv, torch_default_init, torch_linear
from mokd_jax.models.pooling import max_pool


def stem_max_pool(x: jax.Array) -> jax.Array:
    """torch's MaxPool2d(3, stride=2, padding=1): pads one -inf row/column on each side
    (never a maximum), where 'SAME' would pad only the bottom/right of an even-sized map and
    shift every window; its gradient goes to each window's first maximum, as torch's
    (`pooling.max_pool`)."""
    return max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


def _block_plan(
    stage_sizes: Sequence[int], in_width: int, out_widths: Sequence[int]
) -> list[list[tuple[int, int]]]:
    """(stride, input width) of each block, stage by stage: in both families the first
    block of every stage but the first halves the resolution."""
    plan = []
    for stage, (size, out_width) in enumerate(zip(stage_sizes, out_widths, strict=True)):
        plan.append([(2 if stage else 1, in_width)] + [(1, out_width)] * (size - 1))
        in_width = out_width
    return plan


class BlockSpec(NamedTuple):
    """A post-activation residual block: the conv kernel sizes along its main path, and
    the factor by which the last conv widens the block's width (torchvision's expansion)."""

    kernel_sizes: tuple[int, ...]
    expansion: int


BASIC = BlockSpec((3, 3), 1)
BOTTLENECK = BlockSpec((1, 3, 1), 4)


class ResidualBlock(nn.Module):
    """conv -> BN (-> relu between convs) along the main path, plus the identity or, when
    `project`, a strided conv1x1 -> BN shortcut; relu after the sum. The stride sits on the
    first 3x3 conv (torchvision v1.5 for bottlenecks)."""

    width: int
    stride: int
    project: bool
    block: BlockSpec
    dtype: Dtype = jnp.float32

    def setup(self):
        kernels = self.block.kernel_sizes
        strided = kernels.index(3)
        out_width = self.width * self.block.expansion
        self.convs = [
            conv(
                out_width if i == len(kernels) - 1 else self.width,
                kernel,
                self.stride if i == strided else 1,
                dtype=self.dtype,
                name=f"conv{i + 1}",
            )
            for i, kernel in enumerate(kernels)
        ]
        self.bns = [batch_norm(self.dtype, name=f"bn{i + 1}") for i in range(len(kernels))]
        if self.project:
            self.downsample_conv = conv(out_width, 1, self.stride, dtype=self.dtype)
            self.downsample_bn = batch_norm(self.dtype)

    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        y = x
        for conv_layer, bn in zip(self.convs[:-1], self.bns[:-1], strict=True):
            y = nn.relu(bn(conv_layer(y), use_running_average=not train))
        y = self.bns[-1](self.convs[-1](y), use_running_average=not train)
        if self.project:
            x = self.downsample_bn(self.downsample_conv(x), use_running_average=not train)
        return nn.relu(y + x)


class ResNet(StagedClassifier):
    """Stem, stages of `ResidualBlock`s (taps `stage{i}`: each stage's output), global
    average pool (`pooled`), fc. Defaults are torchvision's ImageNet widths and stem; the
    CIFAR models (`cifar_resnet`) use a conv3x3 stem without max-pool. RepDistiller's
    AvgPool2d(8) is this global pool at its 32x32 input."""

    num_classes: int
    stage_sizes: Sequence[int]
    block: BlockSpec = BASIC
    widths: Sequence[int] = (64, 128, 256, 512)
    stem_width: int = 64
    imagenet_stem: bool = True
    dtype: Dtype = jnp.float32

    def setup(self):
        kernel, stride = (7, 2) if self.imagenet_stem else (3, 1)
        self.conv1 = conv(self.stem_width, kernel, stride, dtype=self.dtype)
        self.bn1 = batch_norm(self.dtype)
        out_widths = [width * self.block.expansion for width in self.widths]
        plan = _block_plan(self.stage_sizes, self.stem_width, out_widths)
        self.stages = [
            [
                ResidualBlock(
                    width,
                    stride,
                    project=stride != 1 or in_width != out_width,
                    block=self.block,
                    dtype=self.dtype,
                    name=f"layer{stage}_{index}",
                )
                for index, (stride, in_width) in enumerate(blocks)
            ]
            for stage, (blocks, width, out_width) in enumerate(
                zip(plan, self.widths, out_widths, strict=True), start=1
            )
        ]
        self.fc = torch_linear(self.num_classes, self.feature_width, self.dtype)

    @property
    def feature_width(self) -> int:
        """Width of features['pooled'], known without running the model."""
        return self.widths[-1] * self.block.expansion

    def encode(self, images: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        x = nn.relu(self.bn1(self.conv1(images), use_running_average=not train))
        if self.imagenet_stem:
            x = stem_max_pool(x)
        x, features = self._run_stages(x, train)
        features["pooled"] = jnp.mean(x, axis=(1, 2))
        return features


def cifar_resnet(
    depth: int, num_filters: Sequence[int], num_classes: int, dtype: Dtype = jnp.float32
) -> ResNet:
    """RepDistiller's `ResNet(depth, num_filters, 'basicblock')`: a conv3x3 stem of
    num_filters[0] channels, then three stages of (depth - 2) / 6 basic blocks of
    num_filters[1:] channels (e.g. resnet20: depth 20, [16, 16, 32, 64])."""
    if depth < 8 or (depth - 2) % 6:
        raise invalid("depth", depth, "6n + 2 with n >= 1 (8, 14, 20, 32, 56, ...)")
    if len(num_filters) != 4:
        raise invalid("num_filters", num_filters, "4 widths: the stem's, then 3 stages'")
    return ResNet(
        num_classes,
        stage_sizes=((depth - 2) // 6,) * 3,
        widths=tuple(num_filters[1:]),
        stem_width=num_filters[0],
        imagenet_stem=False,
        dtype=dtype,
    )


def cifar_resnet50(num_classes: int, dtype: Dtype = jnp.float32) -> ResNet:
    """RepDistiller's CIFAR `ResNet50` (resnetv2.py): torchvision's bottleneck ResNet-50 with
    a conv3x3 stride-1 stem of 64 channels and no max-pool (23.7M parameters at 100
    classes), so that a 32x32 image ends at 4x4. Its state-dict keys differ from
    torchvision's only by name (`shortcut`, `linear`), which the converter's layout maps."""
    return ResNet(
        num_classes, stage_sizes=(3, 4, 6, 3), block=BOTTLENECK, imagenet_stem=False, dtype=dtype
    )


class PreActBlock(nn.Module):
    """The WRN block: BN -> relu -> conv3x3 (strided) -> BN -> relu -> conv3x3, added to
    the input, or, when `project`, to a strided conv1x1 of the activated input."""

    width: int
    stride: int
    project: bool
    dtype: Dtype = jnp.float32

    def setup(self):
        self.bn1 = batch_norm(self.dtype)
        self.conv1 = conv(self.width, 3, self.stride, dtype=self.dtype)
        self.bn2 = batch_norm(self.dtype)
        self.conv2 = conv(self.width, 3, dtype=self.dtype)
        if self.project:
            self.conv_shortcut = conv(self.width, 1, self.stride, dtype=self.dtype)

    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        activated = nn.relu(self.bn1(x, use_running_average=not train))
        y = nn.relu(self.bn2(self.conv1(activated), use_running_average=not train))
        y = self.conv2(y)
        return y + (self.conv_shortcut(activated) if self.project else x)


class WideResNet(StagedClassifier):
    """conv3x3 stem, stages of `PreActBlock`s (taps `stage{i}`: each stage's output, before
    the final BN), BN -> relu -> global average pool (`pooled`), fc. Build the named
    models with `wide_resnet`."""

    num_classes: int
    stage_sizes: Sequence[int]
    widths: Sequence[int]
    stem_width: int = 16
    dtype: Dtype = jnp.float32

    def setup(self):
        self.conv1 = conv(self.stem_width, 3, dtype=self.dtype)
        plan = _block_plan(self.stage_sizes, self.stem_width, self.widths)
        self.stages = [
            [
                PreActBlock(
                    width,
                    stride,
                    project=in_width != width,  # RepDistiller's `not equalInOut`
                    dtype=self.dtype,
                    name=f"block{stage}_{index}",
                )
                for index, (stride, in_width) in enumerate(blocks)
            ]
            for stage, (blocks, width) in enumerate(zip(plan, self.widths, strict=True), start=1)
        ]
        self.bn1 = batch_norm(self.dtype)
        self.fc = nn.Dense(self.num_classes, kernel_init=torch_default_init, dtype=self.dtype)

    @property
    def feature_width(self) -> int:
        """Width of features['pooled'], known without running the model."""
        return self.widths[-1]

    def encode(self, images: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        x, features = self._run_stages(self.conv1(images), train)
        x = nn.relu(self.bn1(x, use_running_average=not train))
        features["pooled"] = jnp.mean(x, axis=(1, 2))
        return features


def wide_resnet(
    depth: int, widen_factor: int, num_classes: int, dtype: Dtype = jnp.float32
) -> WideResNet:
    """RepDistiller's `WideResNet(depth, num_classes, widen_factor)` with dropout 0: three
    stages of (depth - 4) / 6 blocks of 16k, 32k, 64k channels (k = widen_factor)."""
    if depth < 10 or (depth - 4) % 6:
        raise invalid("depth", depth, "6n + 4 with n >= 1 (10, 16, 28, 40, ...)")
    check_int("widen_factor", widen_factor, 1)
    return WideResNet(
        num_classes,
        stage_sizes=((depth - 4) // 6,) * 3,
        widths=tuple(width * widen_factor for width in (16, 32, 64)),
        dtype=dtype,
    )
