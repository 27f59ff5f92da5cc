"""A small parameterised CNN family: the digits teacher and student are two sizes of it."""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.typing import Dtype

from mokd_jax.models import convolution
from mokd_jax.models.base import StagedClassifier
from mokd_jax.models.layers import conv_init


class ConvBlock(nn.Module):
    """conv3x3 (no bias) -> BatchNorm -> relu."""

    width: int
    stride: int = 1
    dtype: Dtype = jnp.float32

    def setup(self):
        # He initialisation (fan-out), as in ResNets: keeps activations at unit scale
        # through relu blocks, so the teacher and the student start equally well
        # conditioned.
        self.conv = nn.Conv(
            self.width,
            (3, 3),
            strides=self.stride,
            use_bias=False,
            kernel_init=conv_init,
            dtype=self.dtype,
            conv_general_dilated=convolution.conv_general_dilated,
        )
        self.bn = nn.BatchNorm(momentum=0.9, dtype=self.dtype)

    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        return nn.relu(self.bn(self.conv(x), use_running_average=not train))


class ConvNet(StagedClassifier):
    """Stages of [conv3x3 -> BatchNorm -> relu] blocks, global average pool, Dense head.

    Stage i has `blocks[i]` blocks of `widths[i]` channels; its first block uses stride
    `strides[i]`. The default strides (1, 2, 1) halve the resolution once: an 8x8 input
    ends on 4x4 maps, never on 2x2 maps, where XLA's CPU 3x3 convolutions are ~20x slower.

    The model contract every network here follows (written in `setup` style so that
    several methods share the submodules):
      `encode(images, train)` -> named feature taps: `stage{i}` (each stage's output) and
        `pooled` (the globally pooled penultimate features [B, feature_width], what the
        classifier and the feature-distillation projector consume);
      `classify(pooled)` -> float32 logits;
      `__call__(images, train=False, return_features=False)` -> logits, or
        `(logits, features)`. `train=True` normalises with batch statistics and needs
        `mutable=['batch_stats']`;
      `feature_width` (an int, no shape pass), and `dtype`, the computation dtype
        (`layers.computation_dtype`): activations and matmuls/convs in it, parameters and
        BatchNorm statistics float32; the taps are in `dtype`.
    """

    num_classes: int
    widths: Sequence[int]
    blocks: Sequence[int]
    strides: Sequence[int] = (1, 2, 1)
    dtype: Dtype = jnp.float32
    # `head`, not the base class's `fc`: Flax seeds each module by its name, so a rename
    # would change the initial weights and with them the digits results in docs/benchmarks.md.
    head_name = "head"

    def setup(self):
        self.stages = [
            [
                ConvBlock(width, stride if block == 0 else 1, dtype=self.dtype)
                for block in range(num_blocks)
            ]
            for width, num_blocks, stride in zip(
                self.widths, self.blocks, self.strides, strict=True
            )
        ]
        self.head = nn.Dense(self.num_classes, dtype=self.dtype)

    @property
    def feature_width(self) -> int:
        """Width of features['pooled'], known without running the model."""
        return self.widths[-1]

    def encode(self, images: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        x, features = self._run_stages(images, train)
        features["pooled"] = jnp.mean(x, axis=(1, 2))
        return features
