"""MobileNets: the ImageNet MobileNetV1 of the KD literature, torchvision's MobileNetV2 and
RepDistiller's CIFAR MobileNetV2 (`mobile_half`).

`MobileNetV1` is mdistiller's `models/imagenet/mobilenetv1.py`, the student of its ImageNet
ResNet-50 -> MobileNetV1 pair: a conv3x3/2 -> BN -> relu stem of 32 channels, 13
depthwise-separable blocks (depthwise conv3x3 -> BN -> relu -> pointwise conv1x1 -> BN ->
relu), global average pool, fc 1024 -> classes; no conv biases. It keeps torch's default
init (mdistiller sets none): uniform(+-1/sqrt(fan_in)) conv and fc weights and fc bias.

`MobileNetV2` is torchvision's `mobilenet_v2` at width 1.0: a conv3x3/2 stem of 32
channels, 17 inverted residuals (expand conv1x1 -> depthwise conv3x3 -> project conv1x1,
each with BN, relu6 after the first two; identity shortcut where stride 1 and the width
stays), conv1x1 to 1280, global average pool, dropout 0.2, fc; torchvision's init:
kaiming-normal (fan_out) convs, BN 1/0, fc normal(0, 0.01) with zero bias.

`CifarMobileNetV2` is RepDistiller's `models/mobilenetv2.py` (`mobile_half`: expansion 6,
width 0.5), the MobileNetV2 student of the CRD/DKD CIFAR-100 benchmark. It differs from
torchvision's where CIFAR needs it and where RepDistiller chose otherwise: relu, not relu6;
the second setting row at stride 1 (32 px input ends at 2x2); an expand conv in every block,
also at expansion 1; widths int(c * 0.5) but the last conv1x1 stays at 1280; no dropout;
RepDistiller's init (conv normal(0, sqrt(2 / (k * k * out))), BN 1/0, fc normal(0, 0.01)
with zero bias). Its taps `stage1` .. `stage4` are RepDistiller's f1 .. f4 (after blocks[1],
[2], [4] and [6]: 16, 8, 4 and 2 px at 32 px input), before the conv1x1 to 1280.

All follow the model contract of `cnn.ConvNet`; images are NHWC. The taps `stage1` ..
`stage4` are the outputs at strides 4, 8, 16 and 32 (mdistiller's four MobileNetV1
features, after their relu; for MobileNetV2 the same strides, the last one after the
conv1x1 to 1280). Every conv pads k//2 on each side as torch does (`layers.conv`).

Parameter names map one to one onto torch state-dict keys (`flax path <- torch key`; conv
kernels HWIO for torch's OIHW, depthwise kernels [3, 3, 1, C] for torch's [C, 1, 3, 3],
Dense kernels the transpose of torch's weight; BN `scale`, `bias` params and `mean`, `var`
batch_stats for torch's weight, bias, running_mean, running_var; torch's
num_batches_tracked has no counterpart):
  MobileNetV1 (mdistiller):
    model_0/conv, model_0/bn                  <- model.0.0, model.0.1
    model_{i}/depthwise/conv, /depthwise/bn   <- model.{i}.0, model.{i}.1    (i = 1..13)
    model_{i}/pointwise/conv, /pointwise/bn   <- model.{i}.3, model.{i}.4
    fc                                        <- fc
  MobileNetV2 (torchvision):
    features_0/conv, features_0/bn            <- features.0.0, features.0.1
    features_{i}, i = 2..17 (expansion 6):
      /expand/conv, /expand/bn                <- features.{i}.conv.0.0, .conv.0.1
      /depthwise/conv, /depthwise/bn          <- features.{i}.conv.1.0, .conv.1.1
      /project/conv, /project/bn              <- features.{i}.conv.2, .conv.3
    features_1 (expansion 1, no expand conv):
      /depthwise/conv, /depthwise/bn          <- features.1.conv.0.0, .conv.0.1
      /project/conv, /project/bn              <- features.1.conv.1, .conv.2
    features_18/conv, features_18/bn          <- features.18.0, features.18.1
    classifier                                <- classifier.1
  CifarMobileNetV2 (RepDistiller):
    conv1/conv, conv1/bn                      <- conv1.0, conv1.1
    blocks_{s}_{b}/expand/conv, /expand/bn    <- blocks.{s}.{b}.conv.0, .conv.1
    blocks_{s}_{b}/depthwise/conv, /.../bn    <- blocks.{s}.{b}.conv.3, .conv.4
    blocks_{s}_{b}/project/conv, /.../bn      <- blocks.{s}.{b}.conv.6, .conv.7
    conv2/conv, conv2/bn                      <- conv2.0, conv2.1
    classifier                                <- classifier.0
"""

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.typing import Dtype

from mokd_jax.models.base import StagedClassifier
from mokd_jax.models.layers import ConvBN, torch_default_init, torch_linear

# (output width, stride) of MobileNetV1's 13 depthwise-separable blocks.
_V1_BLOCKS = (
    (64, 1),
    (128, 2),
    (128, 1),
    (256, 2),
    (256, 1),
    (512, 2),
    *((512, 1),) * 5,
    (1024, 2),
    (1024, 1),
)
# (expansion t, width c, blocks n, first stride s): torchvision's inverted_residual_setting.
_V2_SETTING = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
# RepDistiller's interverted_residual_setting at T = 6: torchvision's but for the second
# row's stride, 1 on CIFAR.
_CIFAR_V2_SETTING = tuple(
    (t, c, n, 1 if row == 1 else s) for row, (t, c, n, s) in enumerate(_V2_SETTING)
)


def _split_at(layers: list, ends: tuple[int, ...]) -> list[list]:
    """`layers` cut into consecutive stages ending (exclusive) at each of `ends`."""
    starts = (0, *ends[:-1])
    return [layers[start:end] for start, end in zip(starts, ends, strict=True)]


class DepthwiseSeparable(nn.Module):
    """Depthwise conv3x3 (strided) -> BN -> relu, then pointwise conv1x1 -> BN -> relu."""

    in_width: int
    width: int
    stride: int
    dtype: Dtype = jnp.float32

    def setup(self):
        self.depthwise = ConvBN(
            self.in_width,
            3,
            self.stride,
            groups=self.in_width,
            kernel_init=torch_default_init,
            dtype=self.dtype,
        )
        self.pointwise = ConvBN(self.width, 1, kernel_init=torch_default_init, dtype=self.dtype)

    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        return self.pointwise(self.depthwise(x, train), train)


class MobileNetV1(StagedClassifier):
    """mdistiller's ImageNet MobileNetV1 (see the module docstring). Its AvgPool2d(7) is
    the global average pool at 224 px, which `pooled` takes at any size."""

    num_classes: int
    dtype: Dtype = jnp.float32

    def setup(self):
        layers = [
            ConvBN(32, 3, 2, kernel_init=torch_default_init, dtype=self.dtype, name="model_0")
        ]
        in_width = 32
        for index, (width, stride) in enumerate(_V1_BLOCKS, start=1):
            layers.append(
                DepthwiseSeparable(in_width, width, stride, self.dtype, name=f"model_{index}")
            )
            in_width = width
        # mdistiller's taps: after model[3], model[5], model[11] and model[13].
        self.stages = _split_at(layers, (4, 6, 12, 14))
        self.fc = torch_linear(self.num_classes, self.feature_width, self.dtype)

    @property
    def feature_width(self) -> int:
        """Width of features['pooled'], known without running the model."""
        return _V1_BLOCKS[-1][0]

    def encode(self, images: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        x, features = self._run_stages(images, train)
        features["pooled"] = jnp.mean(x, axis=(1, 2))
        return features


class InvertedResidual(nn.Module):
    """[expand conv1x1 -> BN -> `activation`] -> depthwise conv3x3 (strided) -> BN ->
    `activation` -> project conv1x1 -> BN, plus the input where stride 1 and the width stays
    (torchvision's `use_res_connect`). The expand conv is left out at expansion 1 unless
    `always_expand` (torchvision leaves it out, RepDistiller keeps it)."""

    in_width: int
    width: int
    stride: int
    expansion: int
    dtype: Dtype = jnp.float32
    activation: Callable[[jax.Array], jax.Array] = nn.relu6
    always_expand: bool = False

    @property
    def expands(self) -> bool:
        return self.always_expand or self.expansion != 1

    def setup(self):
        hidden = self.in_width * self.expansion
        if self.expands:
            self.expand = ConvBN(hidden, 1, activation=self.activation, dtype=self.dtype)
        self.depthwise = ConvBN(
            hidden, 3, self.stride, groups=hidden, activation=self.activation, dtype=self.dtype
        )
        self.project = ConvBN(self.width, 1, activation=None, dtype=self.dtype)

    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        y = self.expand(x, train) if self.expands else x
        y = self.project(self.depthwise(y, train), train)
        return x + y if self.stride == 1 and self.in_width == self.width else y


class MobileNetV2(StagedClassifier):
    """torchvision's MobileNetV2, width 1.0 (see the module docstring).

    Dropout sits at the end of `encode`, on `pooled`: the contract's `classify(pooled)`
    has no train flag and the trainer splits the network at `pooled`, so in train mode
    `pooled` is the dropped-out representation that torchvision's Linear sees, and
    `train=True` needs `rngs={'dropout': key}` (`dropout_rate=0` lifts that need)."""

    num_classes: int
    dropout_rate: float = 0.2
    dtype: Dtype = jnp.float32
    head_name = "classifier"

    def setup(self):
        layers = [ConvBN(32, 3, 2, activation=nn.relu6, dtype=self.dtype, name="features_0")]
        in_width = 32
        for expansion, width, blocks, first_stride in _V2_SETTING:
            for block in range(blocks):
                layers.append(
                    InvertedResidual(
                        in_width,
                        width,
                        first_stride if block == 0 else 1,
                        expansion,
                        self.dtype,
                        name=f"features_{len(layers)}",
                    )
                )
                in_width = width
        layers.append(
            ConvBN(
                self.feature_width,
                1,
                activation=nn.relu6,
                dtype=self.dtype,
                name=f"features_{len(layers)}",
            )
        )
        # Strides 4, 8, 16, 32 end after features[3], [6], [13] and [18].
        self.stages = _split_at(layers, (4, 7, 14, 19))
        self.dropout = nn.Dropout(self.dropout_rate)
        self.classifier = nn.Dense(
            self.num_classes,
            kernel_init=nn.initializers.normal(0.01),
            dtype=self.dtype,
        )

    @property
    def feature_width(self) -> int:
        """Width of features['pooled'], known without running the model."""
        return 1280

    def encode(self, images: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        x, features = self._run_stages(images, train)
        features["pooled"] = self.dropout(jnp.mean(x, axis=(1, 2)), deterministic=not train)
        return features


class CifarMobileNetV2(StagedClassifier):
    """RepDistiller's CIFAR MobileNetV2 (see the module docstring); `mobile_half` is width
    0.5. Its AvgPool2d(2) is the global average pool at 32 px input."""

    num_classes: int
    width_mult: float = 0.5
    dtype: Dtype = jnp.float32
    head_name = "classifier"

    def setup(self):
        in_width = int(32 * self.width_mult)
        self.conv1 = ConvBN(in_width, 3, 2, dtype=self.dtype)
        groups = []
        for index, (expansion, width, blocks, first_stride) in enumerate(_CIFAR_V2_SETTING):
            width = int(width * self.width_mult)
            group = []
            for block in range(blocks):
                group.append(
                    InvertedResidual(
                        in_width,
                        width,
                        first_stride if block == 0 else 1,
                        expansion,
                        self.dtype,
                        activation=nn.relu,
                        always_expand=True,
                        name=f"blocks_{index}_{block}",
                    )
                )
                in_width = width
            groups.append(group)
        # RepDistiller's taps f1 .. f4: after blocks[1], [2], [4] and [6].
        self.stages = [
            groups[0] + groups[1],
            groups[2],
            groups[3] + groups[4],
            groups[5] + groups[6],
        ]
        self.conv2 = ConvBN(self.feature_width, 1, dtype=self.dtype)
        self.classifier = nn.Dense(
            self.num_classes, kernel_init=nn.initializers.normal(0.01), dtype=self.dtype
        )

    @property
    def feature_width(self) -> int:
        """Width of features['pooled']: 1280, widened only above width 1 (RepDistiller)."""
        return max(1280, int(1280 * self.width_mult))

    def encode(self, images: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        x, features = self._run_stages(self.conv1(images, train), train)
        features["pooled"] = jnp.mean(self.conv2(x, train), axis=(1, 2))
        return features
