"""How mokd_jax's Flax variables spell the keys of the torch state dicts they correspond to
(torchvision, timm, RepDistiller, mdistiller): the key layout of every convertible model,
shared by the converter (`mokd_jax.convert`, torch -> Flax) and its inverse (`to_torch`,
what `mokd-export` writes).

The torch key of a Flax variable is its module path with its family's `Renames` applied
(`layer1_0/downsample_conv` -> `layer1.0.downsample.0`), then its leaf name (`_TORCH_LEAF`);
kernels change axes (`kernel_permutation`), everything else is stored alike.
"""

import re

from mokd_jax.errors import invalid

Path = tuple[str, ...]  # (collection, module, ..., leaf name), as flatten_dict spells it


# How one model family's Flax module paths spell torch keys: (regex, replacement) pairs
# applied in order to the '/'-joined module path, whose '/' then become '.'.
Renames = tuple[tuple[str, str], ...]

# `layer{s}_{b}` is block b of the Sequential `layer{s}` (torchvision's ResNets,
# RepDistiller's ResNets and ShuffleNets).
_LAYER_SEQUENTIALS: Renames = ((r"^layer(\d+)_(\d+)", r"layer\1/\2"),)
# torchvision's ResNet, and RepDistiller's CIFAR ResNets (resnet.py) which name alike: the
# shortcut's conv and BN are the `downsample` Sequential's items 0 and 1.
_TORCHVISION_RESNET: Renames = (
    *_LAYER_SEQUENTIALS,
    (r"/downsample_conv$", "/downsample/0"),
    (r"/downsample_bn$", "/downsample/1"),
)
# RepDistiller's CIFAR ResNet50 (resnetv2.py): the shortcut Sequential is `shortcut`, the
# head `linear`.
_REPDISTILLER_RESNET_V2: Renames = (
    *_LAYER_SEQUENTIALS,
    (r"/downsample_conv$", "/shortcut/0"),
    (r"/downsample_bn$", "/shortcut/1"),
    (r"^fc$", "linear"),
)
# RepDistiller's WRN (wrn.py): block b of stage s is `block{s}.layer.{b}` (a NetworkBlock's
# Sequential), its projection `convShortcut`.
_REPDISTILLER_WRN: Renames = (
    (r"^block(\d+)_(\d+)", r"block\1/layer/\2"),
    (r"/conv_shortcut$", "/convShortcut"),
)
# RepDistiller's VGG (vgg.py): layer i of block j is conv `block{j}.{3i}` and BN
# `block{j}.{3i + 1}` (conv, BN, relu per layer); vgg8 and vgg13 have at most two layers a
# block.
_REPDISTILLER_VGG: Renames = (
    (r"^block(\d+)_0/conv$", r"block\1/0"),
    (r"^block(\d+)_0/bn$", r"block\1/1"),
    (r"^block(\d+)_1/conv$", r"block\1/3"),
    (r"^block(\d+)_1/bn$", r"block\1/4"),
)
# RepDistiller's CIFAR MobileNetV2 (mobilenetv2.py): block b of group s is `blocks.{s}.{b}`,
# its units items of its `conv` Sequential (expand conv 0, BN 1; depthwise 3, 4; project 6,
# 7; relus between); the stem and last conv1x1 are Sequentials conv 0, BN 1; the classifier
# is item 0 of the `classifier` Sequential.
_REPDISTILLER_MOBILENET_V2: Renames = (
    (r"^blocks_(\d+)_(\d+)", r"blocks/\1/\2"),
    (r"/expand/conv$", "/conv/0"),
    (r"/expand/bn$", "/conv/1"),
    (r"/depthwise/conv$", "/conv/3"),
    (r"/depthwise/bn$", "/conv/4"),
    (r"/project/conv$", "/conv/6"),
    (r"/project/bn$", "/conv/7"),
    (r"^(conv\d)/conv$", r"\1/0"),
    (r"^(conv\d)/bn$", r"\1/1"),
    (r"^classifier$", "classifier/0"),
)
# mdistiller's ImageNet MobileNetV1: `model_{i}` is the Sequential's `model.{i}`; the stem
# is a Sequential conv 0, BN 1; a depthwise-separable block is one Sequential (depthwise
# conv 0, BN 1, pointwise conv 3, BN 4; relus between).
_MDISTILLER_MOBILENET_V1: Renames = (
    (r"^model_(\d+)", r"model/\1"),
    (r"/depthwise/conv$", "/0"),
    (r"/depthwise/bn$", "/1"),
    (r"/pointwise/conv$", "/3"),
    (r"/pointwise/bn$", "/4"),
    (r"/conv$", "/0"),
    (r"/bn$", "/1"),
)
# torchvision's MobileNetV2: `features_{i}` is `features.{i}`; a block's units are items of
# its `conv` Sequential (expand 0, depthwise 1, project conv 2 and BN 3), numbered from the
# depthwise in features.1, the only block without an expand conv; a conv-BN unit
# (Conv2dNormActivation) is a Sequential too, conv 0 and BN 1; the classifier is item 1 of
# the `classifier` Sequential (after its dropout).
_TORCHVISION_MOBILENET_V2: Renames = (
    (r"^classifier$", "classifier/1"),
    (r"^features_(\d+)", r"features/\1"),
    (r"^features/1/depthwise/", "features/1/conv/0/"),
    (r"^features/1/project/conv$", "features/1/conv/1"),
    (r"^features/1/project/bn$", "features/1/conv/2"),
    (r"/expand/", "/conv/0/"),
    (r"/depthwise/", "/conv/1/"),
    (r"/project/conv$", "/conv/2"),
    (r"/project/bn$", "/conv/3"),
    (r"/conv$", "/0"),
    (r"/bn$", "/1"),
)
# timm's VisionTransformer: `blocks_{i}` is the Sequential's `blocks.{i}`.
_TIMM_VIT: Renames = ((r"^blocks_(\d+)", r"blocks/\1"),)
# timm's RegNet: block `s{i}_b{j}` is stage `s{i}`'s child `b{j}`; the classifier is
# `head.fc` (timm's ClassifierHead).
_TIMM_REGNET: Renames = (
    (r"^s(\d+)_b(\d+)", r"s\1/b\2"),
    (r"^head_fc$", "head/fc"),
)


def _under(prefix: str, renames: Renames) -> Renames:
    """`renames` for the same model nested at the (already renamed) module path `prefix`:
    the patterns anchored at the start move behind it."""
    return tuple(
        (f"^{prefix}/{pattern[1:]}", f"{prefix}/{replacement}")
        if pattern.startswith("^")
        else (pattern, replacement)
        for pattern, replacement in renames
    )


# torchvision's RetinaNets (`mokd_jax.detection.retinanet`): the backbone `body` is
# `backbone.body`, keyed below as torchvision's ResNet; the FPN is `backbone.fpn`, whose
# lateral and output convs are item 0 of a Conv2dNormActivation each, P6 and P7 in
# `extra_blocks`; each head is `head.{kind}_head`, its conv i and GroupNorm i items 0 and 1
# of `conv.{i}` (v1 has no norms: its convs carry biases).
_TORCHVISION_RETINANET: Renames = (
    (r"^body/", "backbone/body/"),
    *_under("backbone/body", _TORCHVISION_RESNET),
    (r"^fpn/(inner|layer)_blocks_(\d+)$", r"backbone/fpn/\1_blocks/\2/0"),
    (r"^fpn/(p6|p7)$", r"backbone/fpn/extra_blocks/\1"),
    (r"^(\w+_head)/conv_(\d+)$", r"head/\1/conv/\2/0"),
    (r"^(\w+_head)/norm_(\d+)$", r"head/\1/conv/\2/1"),
    (r"^(\w+_head)/", r"head/\1/"),
)

LAYOUTS: dict[str, Renames] = {
    "resnet18": _TORCHVISION_RESNET,
    "resnet34": _TORCHVISION_RESNET,
    "resnet50": _TORCHVISION_RESNET,
    "resnet101": _TORCHVISION_RESNET,
    "mobilenet_v2": _TORCHVISION_MOBILENET_V2,
    "mobilenet_v1": _MDISTILLER_MOBILENET_V1,
    **dict.fromkeys(
        ("resnet20", "resnet32", "resnet56", "resnet110", "resnet8x4", "resnet32x4"),
        _TORCHVISION_RESNET,
    ),
    "resnet50_cifar": _REPDISTILLER_RESNET_V2,
    **dict.fromkeys(("wrn_16_2", "wrn_40_1", "wrn_40_2"), _REPDISTILLER_WRN),
    **dict.fromkeys(("vgg8", "vgg13"), _REPDISTILLER_VGG),
    "mobile_half": _REPDISTILLER_MOBILENET_V2,
    **dict.fromkeys(("shufflenet_v1", "shufflenet_v2"), _LAYER_SEQUENTIALS),
    "deit_tiny": _TIMM_VIT,
    "deit_small": _TIMM_VIT,
    "vit_tiny": _TIMM_VIT,
    "vit_small": _TIMM_VIT,
    "regnety_160": _TIMM_REGNET,
}
NAMES = tuple(LAYOUTS)
# The detectors' layouts (`mokd_jax.detection.convert_retinanet` converts them), kept apart
# from the classifiers', which `mokd_jax.convert` builds by `models.get`.
DETECTION_LAYOUTS: dict[str, Renames] = dict.fromkeys(
    ("retinanet_resnet50_fpn", "retinanet_resnet50_fpn_v2"), _TORCHVISION_RETINANET
)
DETECTION_NAMES = tuple(DETECTION_LAYOUTS)

# (collection, Flax leaf name) -> torch's name for it; other leaves (e.g. a ViT's
# cls_token) are named alike on both sides.
_TORCH_LEAF = {
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}
# Flax kernel axes as a permutation of torch's weight axes, by rank: conv OIHW -> HWIO
# (depthwise convs too: torch's (C, 1, h, w) is Flax's (h, w, 1, C)), Linear (out, in) ->
# Dense (in, out).
_KERNEL_PERMUTATIONS = {4: (2, 3, 1, 0), 2: (1, 0)}


def layout(arch: str) -> Renames:
    """The key layout of `arch`, or an InputError listing the convertible archs."""
    layouts = {**LAYOUTS, **DETECTION_LAYOUTS}
    if arch not in layouts:
        raise invalid("arch", arch, f"one of the convertible models {', '.join(layouts)}")
    return layouts[arch]


def kernel_permutation(path: Path, rank: int) -> tuple[int, ...] | None:
    """The torch -> Flax axis permutation of the variable at `path` (None: same layout)."""
    return _KERNEL_PERMUTATIONS.get(rank) if path[-1] == "kernel" else None


def torch_key(arch: str, path: Path) -> str:
    """The torch state-dict key of the Flax variable at `path`."""
    collection, *modules, leaf = path
    module = "/".join(modules)
    for pattern, replacement in layout(arch):
        module = re.sub(pattern, replacement, module)
    name = _TORCH_LEAF.get((collection, leaf), leaf)
    return ".".join([*module.split("/"), name]) if module else name
