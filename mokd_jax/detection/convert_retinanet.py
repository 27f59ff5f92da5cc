"""torchvision's RetinaNets -> the Flax variables of `mokd_jax.detection.retinanet.RetinaNet`.

`retinanet_resnet50_fpn` (v1) and `retinanet_resnet50_fpn_v2` (v2) state dicts (keys
backbone.body.*, backbone.fpn.*, head.classification_head.*, head.regression_head.*) map
through the generic converter (`mokd_jax.convert.to_flax`, strict both ways: every key used,
every shape checked, a one-line InputError naming the key otherwise) with the key layout
in `mokd_jax.torch_layouts`, whose backbone part is torchvision's ResNet layout. The backbone
norms may be FrozenBatchNorm2d (a model built with pretrained weights) or BatchNorm2d (built
with weights_backbone=None): both store weight, bias, running_mean and running_var.

Two things a state dict does not say, handled here:
  * Keys of the layout before torchvision made every FPN and head conv a
    Conv2dNormActivation (`backbone.fpn.inner_blocks.0.weight`,
    `head.classification_head.conv.2.weight` for the second conv of a relu-interleaved
    Sequential) are read as the current ones (`...inner_blocks.0.0.weight`,
    `...conv.1.0.weight`), as torchvision's own loading does for state dicts saved before
    the change (by their date, its published v1 COCO weights).
  * The epsilon the backbone's norms ran with: torch's default 1e-5, but torchvision runs
    its published v1 COCO weights with 0 (it overwrites FrozenBatchNorm2d's eps when it
    loads them). Our BatchNorms keep 1e-5, so `source_bn_epsilon` is folded into the
    running variance (var + source eps - 1e-5), which gives the source's normalisation
    exactly.

The class count is the logits conv's outputs / 9 anchors; torchvision's COCO models have 91
classes, indexed by COCO category id (0 and the ids COCO leaves unused had no examples to
learn from), not the contiguous indices of a `DetectionBatch`.

A converted RetinaNet is saved with the identity the trainer exports its own RetinaNets
with (`identity`; `detection.phases.detector_identity`): the backbone as the model
(resnet50, which `teacher.model` names), the classes, the input statistics, the task and
the detector's variant and widths, so that a run restores it as its teacher.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from mokd_jax import convert as torch_convert  # this module's `convert` is the RetinaNets'
from mokd_jax import normalization
from mokd_jax.checks import check_choice, check_nonnegative
from mokd_jax.convert import StateDict
from mokd_jax.detection.retinanet import FPN_WIDTH, NUM_ANCHORS, SUBNET_DEPTH, RetinaNet
from mokd_jax.errors import invalid

# torchvision's builders (`mokd_jax.torch_layouts.DETECTION_NAMES`) -> our variant.
VARIANTS = {"retinanet_resnet50_fpn": "v1", "retinanet_resnet50_fpn_v2": "v2"}
BACKBONE = "resnet50"
TORCH_BN_EPSILON = 1e-5  # torch's BatchNorm2d / FrozenBatchNorm2d default, and ours
_LOGITS_BIAS = "head.classification_head.cls_logits.bias"
# Any size gives the variables' shapes; `jax.eval_shape` makes it free.
_IMAGE_SIZE = 64
# The legacy keys that `current_key` renames.
_LEGACY_FPN = re.compile(r"^(backbone\.fpn\.(?:inner|layer)_blocks\.\d+)\.(weight|bias)$")
_LEGACY_HEAD = re.compile(r"^(head\.\w+_head\.conv)\.(\d+)\.(weight|bias)$")


def model(arch: str, num_classes: int) -> RetinaNet:
    """The RetinaNet that holds a state dict of torchvision's `arch` (one of VARIANTS)."""
    check_choice("arch", arch, tuple(VARIANTS))
    return RetinaNet(BACKBONE, num_classes, variant=VARIANTS[arch])


def current_key(key: str) -> str:
    """`key` in torchvision's current RetinaNet layout (see the module docstring): the
    legacy FPN convs gain their Conv2dNormActivation's item 0, the legacy head convs, items
    0, 2, 4, 6 of a conv-relu Sequential, become item 0 of conv.0 .. conv.3. Other keys
    (an odd legacy head index included, which then fails as unused) are returned as is."""
    if match := _LEGACY_FPN.match(key):
        return f"{match[1]}.0.{match[2]}"
    if (match := _LEGACY_HEAD.match(key)) and int(match[2]) % 2 == 0:
        return f"{match[1]}.{int(match[2]) // 2}.0.{match[3]}"
    return key


def current_keys(arch: str, state_dict: StateDict) -> dict:
    """`state_dict` with every key in the current layout (`current_key`); an InputError
    when a legacy key and the current key it stands for are both there."""
    upgraded = {}
    for key, value in state_dict.items():
        current = current_key(key)
        if current in upgraded:
            raise invalid(
                f"state dict key {key!r}",
                np.shape(value),
                f"{arch} reads it as {current!r}, which the state dict also holds",
            )
        upgraded[current] = value
    return upgraded


def num_classes(arch: str, state_dict: StateDict) -> int:
    """The class count of the classification head: its logits' bias / NUM_ANCHORS."""
    if _LOGITS_BIAS not in state_dict:
        raise invalid("arch", arch, f"the state dict has no {_LOGITS_BIAS!r} that {arch} needs")
    shape = np.shape(state_dict[_LOGITS_BIAS])
    if len(shape) != 1 or shape[0] % NUM_ANCHORS or not shape[0]:
        raise invalid(
            f"state dict key {_LOGITS_BIAS!r}",
            shape,
            f"one value for each of {NUM_ANCHORS} anchors x classes",
        )
    return shape[0] // NUM_ANCHORS


def refold_bn_epsilon(variables: dict, source_bn_epsilon: float) -> dict:
    """`variables` whose backbone BatchNorms, run with our epsilon (TORCH_BN_EPSILON),
    normalise as the source's did with `source_bn_epsilon`: the difference moves into the
    running variance, since only their sum var + eps enters the normalisation."""
    shift = source_bn_epsilon - TORCH_BN_EPSILON
    flat = traverse_util.flatten_dict(variables)
    return traverse_util.unflatten_dict(
        {
            path: value + shift if path[0] == "batch_stats" and path[-1] == "var" else value
            for path, value in flat.items()
        }
    )


def abstract_variables(retinanet: RetinaNet) -> dict:
    """The shapes and dtypes of `retinanet`'s variables, traced without computing."""
    images = jax.ShapeDtypeStruct((1, _IMAGE_SIZE, _IMAGE_SIZE, 3), jnp.float32)
    return jax.eval_shape(retinanet.init, jax.random.key(0), images)


def to_flax(
    arch: str,
    state_dict: StateDict,
    abstract: dict,
    source_bn_epsilon: float = TORCH_BN_EPSILON,
) -> dict:
    """The variables shaped as `abstract` (`abstract_variables` of a RetinaNet) holding
    torchvision's `arch` state dict, legacy keys read as current ones; `source_bn_epsilon`:
    the epsilon the source ran its backbone norms with, 0 for torchvision's published v1
    COCO weights. The RetinaNet may have any backbone keyed as torchvision's ResNets (the
    tests use resnet18's)."""
    check_nonnegative("source_bn_epsilon", source_bn_epsilon)
    variables = torch_convert.to_flax(arch, current_keys(arch, state_dict), abstract)
    if source_bn_epsilon != TORCH_BN_EPSILON:
        variables = refold_bn_epsilon(variables, source_bn_epsilon)
    return variables


def identity(arch: str, classes: int, inputs: normalization.Normalization | None = None) -> dict:
    """What a converted `arch` RetinaNet of `classes` classes is saved with (module
    docstring); `inputs` by default its backbone's source statistics, ImageNet's."""
    return {
        **torch_convert.identity(BACKBONE, classes, inputs),
        "task": "detection",
        "variant": VARIANTS[arch],
        "fpn_width": FPN_WIDTH,
        "head_depth": SUBNET_DEPTH,
    }


def convert(
    arch: str,
    state_dict: StateDict,
    inputs: normalization.Normalization | None = None,
    source_bn_epsilon: float = TORCH_BN_EPSILON,
) -> tuple[dict, dict]:
    """(variables, identity) of the RetinaNet holding torchvision's `arch` state dict, as
    `mokd_jax.convert.convert` gives for a classifier (`identity`); `source_bn_epsilon` as
    for `to_flax`."""
    check_choice("arch", arch, tuple(VARIANTS))
    classes = num_classes(arch, state_dict)  # its key is the same in both layouts
    abstract = abstract_variables(model(arch, classes))
    variables = to_flax(arch, state_dict, abstract, source_bn_epsilon)
    return variables, identity(arch, classes, inputs)
