"""The taps: which features of a network the projectors compare (`projector.taps`).

A network's `encode` returns named features (`mokd_jax.models`): the stage outputs
`stage1` .. `stageN` ([B, H, W, C]) of a CNN, the final-norm token sequence `tokens`
([B, 1 + patches, D], the class token first) of a ViT, and for every network `pooled`
([B, d], what the classifier reads: a CNN's globally average-pooled last features, a ViT's
class token). A tap is one [B, width] vector per example, taken from those:

- `pooled`: the classifier's input;
- `penultimate` (CNNs): the second-to-last stage's output after global average pooling;
- `patch_mean` (ViTs): the mean of the final-norm patch tokens (the class token left out).

`projector.taps` names a set of them, the same for teacher and student:

- `multi_scale` (the default): one projector per scale, two taps per network, `pooled`
  first. CNNs: (`pooled`, `penultimate`), the last two stages' scales: the last stage's
  is `pooled` itself (or a BatchNorm / 1x1-conv head on it, for the pre-activation WRNs,
  MobileNetV2 and the ShuffleNets), so a third `stage{N}` tap would repeat it. ViTs:
  (`pooled` = class token, `patch_mean`): the global summary the head reads and the
  average of the local tokens, the two token kinds of the last layer. Earlier stages are
  left out: after global pooling they carry little beyond low-level colour and texture
  statistics, and their feature losses pull the encoder's first layers, which the task
  loss shapes best.
- `pooled`: the classifier's input alone (one projector).

Teacher and student taps are paired by position, so a CNN teacher and a ViT student
(RegNetY -> DeiT) pair `pooled` with the class token and `penultimate` with `patch_mean`.
The first tap is always `pooled`: the representation where the classifier branches off,
at which a representation method (GradDrop) combines the objectives' gradients.
"""

from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

TAP_SETS = ("multi_scale", "pooled")


def is_transformer(features: Mapping[str, jax.Array]) -> bool:
    """A ViT's features carry its token sequence; a CNN's its stage maps."""
    return "tokens" in features


def tap_names(features: Mapping[str, jax.Array], tap_set: str) -> tuple[str, ...]:
    """The taps of `tap_set` (one of TAP_SETS) for a network with these `features`."""
    if tap_set == "pooled":
        return ("pooled",)
    return ("pooled", "patch_mean") if is_transformer(features) else ("pooled", "penultimate")


def tap(features: Mapping[str, jax.Array], name: str) -> jax.Array:
    """The tap `name` of a network's features, [B, width] in float32 (the projectors and
    the losses run in float32 whatever the models' compute dtype; pooling in float32 too)."""
    if name == "pooled":
        return features["pooled"].astype(jnp.float32)
    if name == "patch_mean":
        return features["tokens"][:, 1:].astype(jnp.float32).mean(axis=1)
    stages = sum(key.startswith("stage") for key in features)
    return features[f"stage{stages - 1}"].astype(jnp.float32).mean(axis=(1, 2))


def select(features: Mapping[str, jax.Array], tap_set: str) -> tuple[jax.Array, ...]:
    """The taps of `tap_set` from a network's features, in order (`pooled` first)."""
    return tuple(tap(features, name) for name in tap_names(features, tap_set))


def example_taps(
    model: nn.Module, image_shape: Sequence[int], tap_set: str
) -> tuple[jax.Array, ...]:
    """Zero taps [1, width] of `model` for images of `image_shape`, to initialise the
    projectors with: the widths come from tracing the model (`jax.eval_shape`), so nothing
    is computed and no family needs to declare its stage widths."""

    def taps_of(key):
        features, _ = model.init_with_output(
            key, jnp.zeros((1, *image_shape), jnp.float32), method="encode"
        )
        return select(features, tap_set)

    shapes = jax.eval_shape(taps_of, jax.random.key(0))
    return tuple(jnp.zeros(shape.shape, jnp.float32) for shape in shapes)
