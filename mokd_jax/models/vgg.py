"""RepDistiller's CIFAR VGGs with BatchNorm (`models/vgg.py`, `vgg8_bn` and `vgg13_bn`).

Five blocks of conv3x3 (with bias) -> BN -> relu layers, cfg 'S' (vgg8: one conv per block,
64, 128, 256, 512, 512 channels) or 'B' (vgg13: two per block); a 2x2 max-pool before
blocks 1, 2 and 3, and before block 4 only at 64 px input (RepDistiller's `h == 64`: at
CIFAR's 32 px, blocks 3 and 4 both run on 4x4 maps); global average pool, fc 512 ->
classes. The taps `stage1` .. `stage5` are the blocks' outputs after relu (RepDistiller's
f0 .. f4). It follows the model contract of `cnn.ConvNet`; images are NHWC.

Convs pad 1 on each side, as torch's padding=1 does. Initialisation is RepDistiller's:
normal(0, sqrt(2 / (k * k * out_channels))) conv weights and zero conv biases, BN 1/0,
fc normal(0, 0.01) with zero bias.

Parameter names map one to one onto torch state-dict keys (`flax path <- torch key`; conv
kernels HWIO for torch's OIHW, the Dense kernel the transpose of torch's weight; BN
`scale`, `bias` params and `mean`, `var` batch_stats for torch's weight, bias,
running_mean, running_var; torch's num_batches_tracked has no counterpart). Layer i
(from 0) of block j sits at index 3i of torch's Sequential (conv, BN, relu per layer):
    block{j}_{i}/conv, block{j}_{i}/bn        <- block{j}.{3i}, block{j}.{3i + 1}
    classifier                                <- classifier
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.typing import Dtype

from mokd_jax.models.base import StagedClassifier
from mokd_jax.models.layers import ConvBN
from mokd_jax.models.pooling import max_pool

# RepDistiller's cfg: the conv widths of each of the five blocks.
CFG_S = ((64,), (128,), (256,), (512,), (512,))
CFG_B = ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512))


def _max_pool(x: jax.Array) -> jax.Array:
    """torch's MaxPool2d(2, 2) (`pooling.max_pool`)."""
    return max_pool(x, (2, 2), strides=(2, 2))


class VGG(StagedClassifier):
    """RepDistiller's VGG with BatchNorm; `cfg` gives each block's conv widths."""

    num_classes: int
    cfg: Sequence[Sequence[int]]
    dtype: Dtype = jnp.float32
    head_name = "classifier"

    def setup(self):
        self.stages = [
            [
                ConvBN(width, 3, use_bias=True, dtype=self.dtype, name=f"block{block}_{layer}")
                for layer, width in enumerate(widths)
            ]
            for block, widths in enumerate(self.cfg)
        ]
        self.classifier = nn.Dense(
            self.num_classes, kernel_init=nn.initializers.normal(0.01), dtype=self.dtype
        )

    @property
    def feature_width(self) -> int:
        """Width of features['pooled'], known without running the model."""
        return self.cfg[-1][-1]

    def encode(self, images: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        pooled_before = {1, 2, 3, 4} if images.shape[1] == 64 else {1, 2, 3}
        x, features = images, {}
        for block, layers in enumerate(self.stages):
            if block in pooled_before:
                x = _max_pool(x)
            for layer in layers:
                x = layer(x, train)
            features[f"stage{block + 1}"] = x
        features["pooled"] = jnp.mean(x, axis=(1, 2))
        return features
