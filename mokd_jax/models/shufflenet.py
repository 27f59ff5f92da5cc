"""RepDistiller's CIFAR ShuffleNets (`models/ShuffleNetv1.py` and `models/ShuffleNetv2.py`),
the students of the CRD/DKD benchmark's resnet32x4 / wrn_40_2 -> ShuffleNet pairs.

`ShuffleNetV1` (RepDistiller's `ShuffleV1`): a conv1x1 stem of 24 channels -> BN -> relu at
stride 1 (a CIFAR stem: no stride-2 conv, no max-pool), three stages of 4, 8 and 4
`ShuffleUnitV1`s of 240, 480 and 960 channels, 3 groups; global average pool; linear.
`ShuffleNetV2` (RepDistiller's `ShuffleV2`, net size 1): the same stem, three stages of one
`DownUnit` then 3, 7 and 3 `SplitUnit`s of 116, 232 and 464 channels, conv1x1 to 1024 ->
BN -> relu; global average pool; linear. RepDistiller's `F.avg_pool2d(out, 4)` is this
global pool at its 32x32 input. The taps `stage1` .. `stage3` are the stages' outputs
(RepDistiller's f1 .. f3); `pooled` the pooled features. Images are NHWC.

Initialisation is torch's default, as RepDistiller sets none: uniform(+-1/sqrt(fan_in))
conv and linear weights and linear bias, BN 1/0.

Parameter names map one to one onto torch state-dict keys (`flax path <- torch key`; conv
kernels HWIO for torch's OIHW, grouped and depthwise kernels [k, k, in / groups, out],
Dense kernels the transpose of torch's weight; BN `scale`, `bias` params and `mean`, `var`
batch_stats for torch's weight, bias, running_mean, running_var):
    conv1, bn1                          <- conv1, bn1
    layer{s}_{b}/conv{i}, /bn{i}        <- layer{s}.{b}.conv{i}, .bn{i}
    conv2, bn2 (V2 only)                <- conv2, bn2
    linear                              <- linear
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.typing import Dtype

from mokd_jax.models.base import StagedClassifier
from mokd_jax.models.layers import batch_norm, conv, torch_default_init, torch_linear

_STEM_WIDTH = 24


def channel_shuffle(x: jax.Array, groups: int) -> jax.Array:
    """ShuffleNet's channel shuffle on NHWC: channel j of group i moves to j * groups + i,
    as torch's view(N, g, C/g, H, W).permute(0, 2, 1, 3, 4) does on NCHW."""
    *batch_and_space, channels = x.shape
    grouped = x.reshape(*batch_and_space, groups, channels // groups)
    return jnp.swapaxes(grouped, -1, -2).reshape(x.shape)


def _shuffle_conv(features: int, kernel: int, stride: int, groups: int, dtype: Dtype, name: str):
    """A bias-free conv with torch's default init, named as the torch attribute."""
    return conv(
        features,
        kernel,
        stride,
        groups=groups,
        kernel_init=torch_default_init,
        dtype=dtype,
        name=name,
    )


class _ConvBNChain(nn.Module):
    """A block of `conv{i}` / `bn{i}` pairs (built by `_build_units`, in torch's names)
    whose unit i runs as conv{i} -> bn{i}."""

    def _build_units(self, specs: Sequence[tuple[int, int, int, int]]) -> None:
        """One conv + BN per (features, kernel, stride, groups), named conv{i} and bn{i}."""
        self.convs = [
            _shuffle_conv(*spec, self.dtype, name=f"conv{i}") for i, spec in enumerate(specs, 1)
        ]
        self.bns = [batch_norm(self.dtype, name=f"bn{i}") for i in range(1, len(specs) + 1)]

    def _unit(self, i: int, x: jax.Array, train: bool) -> jax.Array:
        """conv{i} -> bn{i} (no activation)."""
        return self.bns[i - 1](self.convs[i - 1](x), use_running_average=not train)


class ShuffleUnitV1(_ConvBNChain):
    """RepDistiller's ShuffleNetV1 `Bottleneck`: grouped conv1x1 -> BN -> relu -> channel
    shuffle -> depthwise conv3x3 (strided) -> BN -> relu -> grouped conv1x1 -> BN; at stride
    2 concatenated with an average-pooled (3x3/2, zero padding counted) input, otherwise
    added to it; relu. The first conv of the first unit (24 input channels) is ungrouped."""

    in_width: int
    width: int  # of the main path; the unit's output adds the input's at stride 2
    stride: int
    groups: int
    dtype: Dtype = jnp.float32

    @property
    def first_groups(self) -> int:
        return 1 if self.in_width == _STEM_WIDTH else self.groups

    def setup(self):
        mid = self.width // 4
        self._build_units(
            [
                (mid, 1, 1, self.first_groups),
                (mid, 3, self.stride, mid),
                (self.width, 1, 1, self.groups),
            ]
        )

    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        y = channel_shuffle(nn.relu(self._unit(1, x, train)), self.first_groups)
        y = self._unit(3, nn.relu(self._unit(2, y, train)), train)
        if self.stride == 1:
            return nn.relu(y + x)
        # torch's AvgPool2d(3, 2, padding=1) divides by 9 at the border too, as Flax's
        # count_include_pad=True does.
        shortcut = nn.avg_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        return nn.relu(jnp.concatenate([y, shortcut], axis=-1))


class SplitUnit(_ConvBNChain):
    """RepDistiller's ShuffleNetV2 `BasicBlock`: the channels split in halves; the second
    goes through conv1x1 -> BN -> relu -> depthwise conv3x3 -> BN -> conv1x1 -> BN -> relu;
    the halves are concatenated (first half first) and shuffled in 2 groups."""

    width: int
    dtype: Dtype = jnp.float32

    def setup(self):
        half = self.width // 2
        self._build_units([(half, 1, 1, 1), (half, 3, 1, half), (half, 1, 1, 1)])

    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        half = self.width // 2
        kept, y = x[..., :half], x[..., half:]
        y = self._unit(2, nn.relu(self._unit(1, y, train)), train)
        y = nn.relu(self._unit(3, y, train))
        return channel_shuffle(jnp.concatenate([kept, y], axis=-1), 2)


class DownUnit(_ConvBNChain):
    """RepDistiller's ShuffleNetV2 `DownBlock`: two strided branches, each half the output
    width, concatenated and shuffled in 2 groups. Left: depthwise conv3x3/2 -> BN -> conv1x1
    -> BN -> relu. Right: conv1x1 -> BN -> relu -> depthwise conv3x3/2 -> BN -> conv1x1 ->
    BN -> relu."""

    in_width: int
    width: int
    dtype: Dtype = jnp.float32

    def setup(self):
        mid = self.width // 2
        self._build_units(
            [
                (self.in_width, 3, 2, self.in_width),
                (mid, 1, 1, 1),
                (mid, 1, 1, 1),
                (mid, 3, 2, mid),
                (mid, 1, 1, 1),
            ]
        )

    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        left = nn.relu(self._unit(2, self._unit(1, x, train), train))
        right = self._unit(4, nn.relu(self._unit(3, x, train)), train)
        right = nn.relu(self._unit(5, right, train))
        return channel_shuffle(jnp.concatenate([left, right], axis=-1), 2)


class _ShuffleNet(StagedClassifier):
    """The stem (conv1x1 -> BN -> relu, `conv1` / `bn1`) and the linear head shared by both
    versions; a subclass builds `stages` and may define `_tail` (applied before pooling)."""

    head_name = "linear"

    def _build_stem_and_head(self) -> None:
        self.conv1 = _shuffle_conv(_STEM_WIDTH, 1, 1, 1, self.dtype, name="conv1")
        self.bn1 = batch_norm(self.dtype, name="bn1")
        self.linear = torch_linear(self.num_classes, self.feature_width, self.dtype)

    def _tail(self, x: jax.Array, train: bool) -> jax.Array:
        return x

    def encode(self, images: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        x = nn.relu(self.bn1(self.conv1(images), use_running_average=not train))
        x, features = self._run_stages(x, train)
        features["pooled"] = jnp.mean(self._tail(x, train), axis=(1, 2))
        return features


class ShuffleNetV1(_ShuffleNet):
    """RepDistiller's `ShuffleV1` (see the module docstring): the first unit of each stage
    halves the resolution and concatenates the pooled input, so its main path makes only
    the missing channels."""

    num_classes: int
    widths: Sequence[int] = (240, 480, 960)
    stage_sizes: Sequence[int] = (4, 8, 4)
    groups: int = 3
    dtype: Dtype = jnp.float32

    def setup(self):
        self._build_stem_and_head()
        stages, in_width = [], _STEM_WIDTH
        for stage, (width, size) in enumerate(zip(self.widths, self.stage_sizes, strict=True)):
            units = [
                ShuffleUnitV1(
                    in_width if block == 0 else width,
                    width - in_width if block == 0 else width,
                    2 if block == 0 else 1,
                    self.groups,
                    self.dtype,
                    name=f"layer{stage + 1}_{block}",
                )
                for block in range(size)
            ]
            stages.append(units)
            in_width = width
        self.stages = stages

    @property
    def feature_width(self) -> int:
        """Width of features['pooled'], known without running the model."""
        return self.widths[-1]


class ShuffleNetV2(_ShuffleNet):
    """RepDistiller's `ShuffleV2` at net size 1 (see the module docstring)."""

    num_classes: int
    widths: Sequence[int] = (116, 232, 464)
    stage_sizes: Sequence[int] = (3, 7, 3)  # SplitUnits after each stage's DownUnit
    last_width: int = 1024
    dtype: Dtype = jnp.float32

    def setup(self):
        self._build_stem_and_head()
        stages, in_width = [], _STEM_WIDTH
        for stage, (width, size) in enumerate(zip(self.widths, self.stage_sizes, strict=True)):
            name = f"layer{stage + 1}_"
            units = [DownUnit(in_width, width, self.dtype, name=f"{name}0")]
            units += [SplitUnit(width, self.dtype, name=f"{name}{b}") for b in range(1, size + 1)]
            stages.append(units)
            in_width = width
        self.stages = stages
        self.conv2 = _shuffle_conv(self.last_width, 1, 1, 1, self.dtype, name="conv2")
        self.bn2 = batch_norm(self.dtype, name="bn2")

    @property
    def feature_width(self) -> int:
        """Width of features['pooled'], known without running the model."""
        return self.last_width

    def _tail(self, x: jax.Array, train: bool) -> jax.Array:
        return nn.relu(self.bn2(self.conv2(x), use_running_average=not train))
