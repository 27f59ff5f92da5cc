"""A small parameterised CNN family: the digits teacher and student are two sizes of it."""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

# He initialisation (fan-out), as in ResNets: keeps activations at unit scale through
# relu blocks, so the teacher and the student start equally well conditioned.
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class ConvNet(nn.Module):
    """Stages of [conv3x3 -> BatchNorm -> relu] blocks, global average pool, Dense head.

    Stage i has `blocks[i]` blocks of `widths[i]` channels; its first block uses stride
    `strides[i]`. The default strides (1, 2, 1) halve the resolution once: an 8x8 input
    ends on 4x4 maps, never on 2x2 maps, where XLA's CPU 3x3 convolutions are ~20x slower.

    Call `apply(variables, images, train=False)` for logits, or with
    `return_features=True` for `(logits, features)`: `features['stage{i}']` is each
    stage's output [B,h,w,widths[i]] and `features['pooled']` the pooled penultimate
    features [B, feature_width], what the feature-distillation projector consumes.
    `train=True` normalises with batch statistics and needs `mutable=['batch_stats']`.
    """

    num_classes: int
    widths: Sequence[int]
    blocks: Sequence[int]
    strides: Sequence[int] = (1, 2, 1)

    @property
    def feature_width(self) -> int:
        """Width of features['pooled'], known without running the model."""
        return self.widths[-1]

    @nn.compact
    def __call__(
        self, images: jax.Array, train: bool = False, return_features: bool = False
    ) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
        features = {}
        x = images
        for stage, (width, num_blocks, stride) in enumerate(
            zip(self.widths, self.blocks, self.strides, strict=True), start=1
        ):
            for block in range(num_blocks):
                x = nn.Conv(
                    width,
                    (3, 3),
                    strides=stride if block == 0 else 1,
                    use_bias=False,
                    kernel_init=_conv_init,
                )(x)
                x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
                x = nn.relu(x)
            features[f"stage{stage}"] = x
        features["pooled"] = jnp.mean(x, axis=(1, 2))
        logits = nn.Dense(self.num_classes)(features["pooled"])
        return (logits, features) if return_features else logits
