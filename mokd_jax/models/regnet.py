"""timm's RegNetY (`timm/models/regnet.py`), built as `regnety_160`: RegNetY-16GF, the
teacher of DeiT's distillation.

A conv3x3/2 -> BN -> relu stem, four stages of Y blocks, global average pool, fc. A Y block
(timm's `Bottleneck` with bottle_ratio 1): conv1x1 -> BN -> relu, grouped conv3x3 (strided,
`group_width` channels per group) -> BN -> relu, squeeze-excitation (global mean, conv1x1
to round(se_ratio * the block's input width), relu, conv1x1 back, sigmoid gate),
conv1x1 -> BN; plus the input, or a strided conv1x1 -> BN shortcut where the stride or the
width changes; relu after the sum. The first block of every stage halves the resolution.
regnety_160: widths 224, 448, 1232, 3024, depths 2, 4, 11, 1, group width 112, SE ratio
0.25, stem 32 (timm derives these from w0=200, wa=106.23, wm=2.48, depth 18; they are
written out here).

The model contract of `cnn.ConvNet`; images are NHWC; the taps `stage1` .. `stage4` are
the stages' outputs (strides 4, 8, 16, 32). Convs pad k//2 on each side as timm's static
padding does for these kernels and strides.

Initialisation is timm's `_init_weights`: convs normal(0, sqrt(2 / fan_out)) with timm's
fan_out = k * k * out_channels / groups (so grouped convs draw wider than Flax's fan_out
would), conv biases zero, BN 1/0 except the last BN of every block, whose scale starts at
zero (timm's zero_init_last), fc normal(0, 0.01) with zero bias.

Parameter names map one to one onto timm state-dict keys (`flax path <- timm key`; conv
kernels HWIO for torch's OIHW, the SE convs' too, the Dense kernel the transpose of torch's
weight; BN `scale`, `bias` params and `mean`, `var` batch_stats for torch's weight, bias,
running_mean, running_var; torch's num_batches_tracked has no counterpart):
    stem/conv, stem/bn                        <- stem.conv, stem.bn
    s{i}_b{j}/conv{k}/conv, /conv{k}/bn       <- s{i}.b{j}.conv{k}.conv, .conv{k}.bn   (k = 1..3)
    s{i}_b{j}/se/fc1, /se/fc2                 <- s{i}.b{j}.se.fc1, .se.fc2
    s{i}_b{j}/downsample/conv, /downsample/bn <- s{i}.b{j}.downsample.conv, .downsample.bn
    head_fc                                   <- head.fc
with stages i = 1..4 and blocks j counted from 1, as timm does.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.typing import Dtype

from mokd_jax.models.base import StagedClassifier
from mokd_jax.models.layers import ConvBN, conv
from mokd_jax.models.stored import stored_whole


def _timm_conv_init(groups: int) -> nn.initializers.Initializer:
    """normal(0, sqrt(2 / fan_out)) with timm's fan_out = k * k * out / groups."""
    return nn.initializers.variance_scaling(2.0 * groups, "fan_out", "normal")


class SqueezeExcite(nn.Module):
    """timm's SEModule: x * sigmoid(fc2(relu(fc1(mean over H, W of x)))), fc1 and fc2
    1x1 convs with bias."""

    width: int
    reduced: int
    dtype: Dtype = jnp.float32

    def setup(self):
        self.fc1 = conv(self.reduced, 1, use_bias=True, dtype=self.dtype)
        self.fc2 = conv(self.width, 1, use_bias=True, dtype=self.dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.fc2(nn.relu(self.fc1(jnp.mean(x, axis=(1, 2), keepdims=True))))
        return x * nn.sigmoid(scale)


class YBlock(nn.Module):
    """timm's RegNet `Bottleneck` at bottle_ratio 1 with SE (see the module docstring)."""

    in_width: int
    width: int
    stride: int
    group_width: int
    se_ratio: float
    dtype: Dtype = jnp.float32

    def setup(self):
        groups = self.width // self.group_width
        self.conv1 = ConvBN(self.width, 1, dtype=self.dtype)
        self.conv2 = ConvBN(
            self.width,
            3,
            self.stride,
            groups=groups,
            kernel_init=_timm_conv_init(groups),
            dtype=self.dtype,
        )
        self.se = SqueezeExcite(self.width, round(self.in_width * self.se_ratio), self.dtype)
        self.conv3 = ConvBN(
            self.width,
            1,
            activation=None,
            bn_scale_init=nn.initializers.zeros,
            dtype=self.dtype,
        )
        if self.project:
            self.downsample = ConvBN(self.width, 1, self.stride, activation=None, dtype=self.dtype)

    @property
    def project(self) -> bool:
        """Whether the shortcut is a conv (timm's `create_shortcut`), not the identity."""
        return self.stride != 1 or self.in_width != self.width

    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        """The block's output is stored whole (`stored_whole`): on CPU, XLA would otherwise
        recompute the residual stream, and in the backward pass its cotangent, from every
        earlier (later) block of the stage."""
        y = self.se(self.conv2(self.conv1(x, train), train))
        y = self.conv3(y, train)
        return stored_whole(nn.relu(y + (self.downsample(x, train) if self.project else x)))


class RegNet(StagedClassifier):
    """Stem, stages of `YBlock`s (taps `stage{i}`), global average pool (`pooled`), fc.
    The defaults are regnety_160's."""

    num_classes: int
    widths: Sequence[int] = (224, 448, 1232, 3024)
    depths: Sequence[int] = (2, 4, 11, 1)
    group_width: int = 112
    se_ratio: float = 0.25
    stem_width: int = 32
    dtype: Dtype = jnp.float32
    head_name = "head_fc"

    def setup(self):
        self.stem = ConvBN(self.stem_width, 3, 2, dtype=self.dtype)
        in_widths = (self.stem_width, *self.widths[:-1])
        self.stages = [
            [
                YBlock(
                    in_width if block == 0 else width,
                    width,
                    2 if block == 0 else 1,
                    self.group_width,
                    self.se_ratio,
                    self.dtype,
                    name=f"s{stage}_b{block + 1}",
                )
                for block in range(depth)
            ]
            for stage, (in_width, width, depth) in enumerate(
                zip(in_widths, self.widths, self.depths, strict=True), start=1
            )
        ]
        self.head_fc = nn.Dense(
            self.num_classes, kernel_init=nn.initializers.normal(0.01), dtype=self.dtype
        )

    @property
    def feature_width(self) -> int:
        """Width of features['pooled'], known without running the model."""
        return self.widths[-1]

    def encode(self, images: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        x, features = self._run_stages(self.stem(images, train), train)
        features["pooled"] = jnp.mean(x, axis=(1, 2))
        return features
