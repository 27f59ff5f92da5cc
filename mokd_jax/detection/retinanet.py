"""RetinaNet-FPN in Flax: torchvision's `retinanet_resnet50_fpn` (v1) and
`retinanet_resnet50_fpn_v2` (v2) on any backbone of the zoo that has four stride-doubling
stages (`BACKBONES`).

    backbone (zoo model, `encode`)  C3, C4, C5 = taps stage2, stage3, stage4 (strides 8-32)
    fpn                             P3-P5: lateral conv1x1 + top-down nearest upsampling,
                                    then a conv3x3 on each sum (256 channels, biases);
                                    P6 = conv3x3/2 of P5 (v1) or of C5 (v2), P7 =
                                    conv3x3/2 of relu(P6): torchvision's LastLevelP6P7
    classification_head             shared over levels: 4 x (conv3x3 256 + relu), then a
    regression_head                 conv3x3 to A*C logits / A*4 box deltas; v2 puts a
                                    GroupNorm(32) between each conv (then bias-free) and
                                    its relu

Outputs follow torchvision's flattening, so that anchors, losses and post-processing can
be checked against its code: per level the anchors run over H, then W, then the A anchors
of a location; levels P3 to P7 are concatenated. Class logits, box deltas and the pyramid
features are float32 whatever the computation dtype (losses and feature distillation run
in float32).

Choices where torchvision leaves room:
  * The backbone's BatchNorms are frozen: they always normalise with their running
    averages and their scale and bias never train (`trainable_mask`), as torchvision's
    FrozenBatchNorm2d does for detection. Detection batches are a few large images per
    device, too few for batch statistics; ImageNet's statistics are the better estimate.
    So `train` changes nothing in this module (no dropout, no batch statistics); it is
    taken so that the trainer calls every network alike.
  * Which backbone stages train is the optimiser's business, not the module's: the
    module computes gradients for everything, and `trainable_mask` gives the boolean
    pytree that the trainer hands to optax (torchvision's `trainable_backbone_layers`,
    default 3: the stem and the first stage stay frozen).
  * Input normalisation is not in the module: the trainer applies the network's
    `mokd_jax.normalization.Normalization` to the uint8 batch, as for classification.
  * Initialisation is torchvision's: FPN convs kaiming-uniform (a=1) with zero bias, head
    convs normal(0, 0.01) with zero bias, the logits' bias -log((1 - p) / p) (p = 0.01) so
    that every anchor starts at a foreground probability of p and the focal loss is not
    swamped by the easy negatives in the first steps.

Parameter names follow torchvision's state-dict keys where they can (`body/...` <-
`backbone.body.*`, the zoo model's own names below; `fpn/inner_blocks_0` <-
`backbone.fpn.inner_blocks.0.0`; `classification_head/norm_0` <-
`head.classification_head.conv.0.1`, ...); `mokd_jax.torch_layouts` spells the mapping.
"""

import math
from collections.abc import Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from flax.typing import Dtype

from mokd_jax import models
from mokd_jax.checks import check_choice, check_int, check_positive, check_range
from mokd_jax.errors import invalid
from mokd_jax.models.layers import computation_dtype, conv

BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101", "mobilenet_v2")
VARIANTS = ("v1", "v2")
LEVELS = (3, 4, 5, 6, 7)  # P3 .. P7: strides 8 .. 128
FPN_WIDTH = 256
# torchvision's anchors: 3 sizes (2^0, 2^(1/3), 2^(2/3) times the level's base) x 3 aspect
# ratios (0.5, 1, 2) at every location.
NUM_ANCHORS = 9
# The backbone taps that feed the FPN: C3, C4, C5.
_BACKBONE_TAPS = ("stage2", "stage3", "stage4")
# The zoo's models are classifiers; only their `encode` runs here, so their head creates
# no parameters and its class count is immaterial (the smallest `models.get` accepts).
_UNUSED_HEAD_CLASSES = 2
# A stage index for what precedes stage 1 (a ResNet's conv1 / bn1).
_STEM = 0
SUBNET_DEPTH = 4
GROUPS = 32  # v2's GroupNorm

# torch's kaiming_uniform_(a=1): uniform(+-sqrt(3 / fan_in)).
_FPN_INIT = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")
_HEAD_INIT = nn.initializers.normal(0.01)


def prior_logit(probability: float) -> float:
    """The logit whose sigmoid is `probability`: -log((1 - p) / p)."""
    return -math.log((1 - probability) / probability)


def pyramid_shapes(height: int, width: int) -> tuple[tuple[int, int], ...]:
    """(H, W) of P3 .. P7 for images of `height` x `width`, without running the model (to
    lay out anchors): every stride-2 layer on the way (convs padding k // 2, the stem's
    max-pool padding 1) maps a side n to ceil(n / 2), so level l has ceil(n / 2^l)."""
    return tuple((-(-height // 2**level), -(-width // 2**level)) for level in LEVELS)


def upsample_nearest(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """torch's F.interpolate(x, size, mode='nearest') for NHWC `x`: output row i reads input
    row floor(i * in / out) (columns alike); exactly a 2x repeat when the size doubles, and
    still torch's choice of rows for the odd sizes of images not padded to a multiple of
    the largest stride. The indices are static, so it jits with static shapes."""
    rows = np.arange(size[0]) * x.shape[1] // size[0]
    cols = np.arange(size[1]) * x.shape[2] // size[1]
    return x[:, rows][:, :, cols]


def _fpn_conv(width: int, kernel: int, stride: int, dtype: Dtype, name: str) -> nn.Conv:
    return conv(width, kernel, stride, use_bias=True, kernel_init=_FPN_INIT, dtype=dtype, name=name)


class FeaturePyramid(nn.Module):
    """torchvision's FeaturePyramidNetwork with LastLevelP6P7: C3 .. C5 -> P3 .. P7.

    `p6_from_backbone`: P6 is computed from C5 (v2) rather than from P5 (v1)."""

    p6_from_backbone: bool = False
    width: int = FPN_WIDTH
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, backbone_features: Sequence[jax.Array]) -> list[jax.Array]:
        laterals = [
            _fpn_conv(self.width, 1, 1, self.dtype, f"inner_blocks_{index}")(feature)
            for index, feature in enumerate(backbone_features)
        ]
        merged = [laterals[-1]]  # top-down: each level adds the upsampled level above
        for lateral in reversed(laterals[:-1]):
            merged.insert(0, lateral + upsample_nearest(merged[0], lateral.shape[1:3]))
        outputs = [
            _fpn_conv(self.width, 3, 1, self.dtype, f"layer_blocks_{index}")(inner)
            for index, inner in enumerate(merged)
        ]
        p6 = _fpn_conv(self.width, 3, 2, self.dtype, "p6")(
            backbone_features[-1] if self.p6_from_backbone else outputs[-1]
        )
        p7 = _fpn_conv(self.width, 3, 2, self.dtype, "p7")(nn.relu(p6))
        return [*outputs, p6, p7]


class Subnet(nn.Module):
    """A RetinaNet head, shared by every level: `depth` x (conv3x3 of `width` channels ->
    [GroupNorm] -> relu), then a conv3x3 to `num_anchors * outputs_per_anchor` channels (named
    `output_name`, bias `output_bias`). Returns [B, sum of H * W * A, outputs_per_anchor]
    in float32, torchvision's order (levels, then H, W, A)."""

    outputs_per_anchor: int
    num_anchors: int
    output_name: str
    output_bias: float
    group_norm: bool
    width: int = FPN_WIDTH
    depth: int = SUBNET_DEPTH
    dtype: Dtype = jnp.float32

    def setup(self):
        self.convs = [
            conv(
                self.width,
                3,
                use_bias=not self.group_norm,  # a bias before a norm is redundant
                kernel_init=_HEAD_INIT,
                dtype=self.dtype,
                name=f"conv_{index}",
            )
            for index in range(self.depth)
        ]
        if self.group_norm:
            # torch's GroupNorm: epsilon 1e-5, and the two-pass variance, which the fast
            # E[x^2] - E[x]^2 would not match at float32.
            self.norms = [
                nn.GroupNorm(
                    GROUPS,
                    epsilon=1e-5,
                    use_fast_variance=False,
                    dtype=self.dtype,
                    name=f"norm_{index}",
                )
                for index in range(self.depth)
            ]
        self.output = conv(
            self.num_anchors * self.outputs_per_anchor,
            3,
            use_bias=True,
            kernel_init=_HEAD_INIT,
            bias_init=nn.initializers.constant(self.output_bias),
            dtype=self.dtype,
            name=self.output_name,
        )

    def _level(self, x: jax.Array) -> jax.Array:
        for index, conv_layer in enumerate(self.convs):
            x = conv_layer(x)
            if self.group_norm:
                x = self.norms[index](x)
            x = nn.relu(x)
        x = self.output(x)  # [B, H, W, A * K]: channel a * K + k, as torch's view(A, K)
        return x.reshape(x.shape[0], -1, self.outputs_per_anchor)

    def __call__(self, levels: Sequence[jax.Array]) -> jax.Array:
        outputs = jnp.concatenate([self._level(level) for level in levels], axis=1)
        return outputs.astype(jnp.float32)


@flax.struct.dataclass
class RetinaNetOutputs:
    """What `RetinaNet` returns; N = sum over levels of H * W * A anchors.

    `level_shapes` is static (not a pytree leaf), so it survives `jax.jit` as Python ints.
    """

    class_logits: jax.Array  # float32 [B, N, num_classes]
    box_regression: jax.Array  # float32 [B, N, 4]: (dx, dy, dw, dh) against each anchor
    features: dict[str, jax.Array]  # 'p3' .. 'p7': float32 [B, H_l, W_l, 256]
    level_shapes: tuple[tuple[int, int], ...] = flax.struct.field(pytree_node=False)


class RetinaNet(nn.Module):
    """RetinaNet-FPN on the zoo model `backbone` (one of BACKBONES); see the module
    docstring. `variant` 'v1' is torchvision's retinanet_resnet50_fpn, 'v2' its _v2 (P6
    from C5, GroupNorm in the heads). `dtype` is the computation dtype.

    `width` (the FPN's and the heads' channels) and `head_depth` (each head's convs before
    its output conv) are torchvision's 256 and 4 by default, which converted teachers need;
    smaller values make a light detector (the CPU-sized embedded default, fast tests): the
    heads run at every location of five levels and cost most of a small detector's step.
    `width` must be a multiple of 32 for v2's GroupNorm(32)."""

    backbone: str
    num_classes: int
    variant: str = "v1"
    num_anchors: int = NUM_ANCHORS
    prior_probability: float = 0.01
    width: int = FPN_WIDTH
    head_depth: int = SUBNET_DEPTH
    dtype: Dtype = jnp.float32

    def setup(self):
        check_choice("backbone", self.backbone, BACKBONES)
        check_choice("variant", self.variant, VARIANTS)
        check_int("num_classes", self.num_classes, 1)
        check_int("num_anchors", self.num_anchors, 1)
        check_positive("prior_probability", self.prior_probability)
        check_range("prior_probability", self.prior_probability, 0, 1, open_high=True)
        check_int("width", self.width, 1)
        check_int("head_depth", self.head_depth, 0)
        if self.variant == "v2" and self.width % GROUPS:
            raise invalid("width", self.width, f"a multiple of {GROUPS} for v2's GroupNorm")
        dtype = computation_dtype(self.dtype)
        v2 = self.variant == "v2"
        self.body = models.get(self.backbone, _UNUSED_HEAD_CLASSES, dtype)
        self.fpn = FeaturePyramid(p6_from_backbone=v2, width=self.width, dtype=dtype)
        head = {"group_norm": v2, "width": self.width, "depth": self.head_depth, "dtype": dtype}
        self.classification_head = Subnet(
            self.num_classes,
            self.num_anchors,
            "cls_logits",
            prior_logit(self.prior_probability),
            **head,
        )
        self.regression_head = Subnet(4, self.num_anchors, "bbox_reg", 0.0, **head)

    def __call__(self, images: jax.Array, train: bool = False) -> RetinaNetOutputs:
        """`images`: normalised float [B, H, W, 3]. `train` changes nothing (frozen
        backbone norms, no dropout; see the module docstring)."""
        del train
        return self.from_backbone_features(self.backbone_features(images))

    def backbone_features(self, images: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """The backbone's C3, C4, C5 ([B, H_l, W_l, C_l], strides 8, 16, 32) for normalised
        `images`: the first half of `__call__`, so that a distillation step can take
        gradients at the backbone's outputs (`mokd_jax.detection.steps`)."""
        taps = self.body.encode(images, train=False)  # frozen BatchNorm: running averages
        return tuple(taps[name] for name in _BACKBONE_TAPS)

    def from_backbone_features(self, backbone_features: Sequence[jax.Array]) -> RetinaNetOutputs:
        """The FPN and the heads on the backbone's (C3, C4, C5): the second half of
        `__call__`."""
        pyramid = self.fpn(list(backbone_features))
        return RetinaNetOutputs(
            class_logits=self.classification_head(pyramid),
            box_regression=self.regression_head(pyramid),
            features={
                f"p{level}": feature.astype(jnp.float32)
                for level, feature in zip(LEVELS, pyramid, strict=True)
            },
            level_shapes=tuple(feature.shape[1:3] for feature in pyramid),
        )


def _stage_of_module(backbone: str) -> dict[str, int]:
    """The backbone's top-level module names -> their stage (1..4), from the zoo model's
    own `stages`; modules in no stage (a ResNet's conv1 / bn1) are the stem."""
    stages = models.get(backbone, _UNUSED_HEAD_CLASSES).bind({}).stages
    return {block.name: index for index, blocks in enumerate(stages, start=1) for block in blocks}


def trainable_mask(model: RetinaNet, params: dict, trainable_layers: int = 3) -> dict:
    """The pytree of `params`'s structure holding True where a parameter trains:
    torchvision's `trainable_backbone_layers` (0..5, default 3): the last
    `trainable_layers` of (stem, stage1, stage2, stage3, stage4) train, so 3 freezes the
    stem and the first stage, whose generic edge and colour filters detection fine-tuning
    barely improves. The FPN and the heads always train; the backbone's BatchNorm scales
    and biases never do (FrozenBatchNorm2d's). A MobileNetV2's first stage holds its stem,
    so 4 and 5 are alike there.

    Give it to optax as labels, e.g. `optax.multi_transform({True: optimizer, False:
    optax.set_to_zero()}, mask)`: `optax.masked` alone would pass frozen gradients through
    unchanged.
    """
    check_int("trainable_layers", trainable_layers, 0)
    check_range("trainable_layers", trainable_layers, 0, 5)
    first_trainable = 5 - trainable_layers  # stem 0, stage1 1, ..., stage4 4
    stage_of = _stage_of_module(model.backbone)
    flat = traverse_util.flatten_dict(params)

    def trains(path: tuple[str, ...]) -> bool:
        if path[0] != "body":
            return True
        is_norm = (*path[:-1], "scale") in flat  # only the backbones' norms have scales
        return not is_norm and stage_of.get(path[1], _STEM) >= first_trainable

    return traverse_util.unflatten_dict({path: trains(path) for path in flat})
