"""PyTorch reference models of the KD model zoo, written with torch.nn under the module and
attribute names of the reference code, so that their state-dict keys and parameter counts
are the references' (torchvision, timm, RepDistiller and mdistiller cannot be installed or
imported here):

    repdistiller_resnet         RepDistiller's resnet.py CIFAR ResNets: torchvision's
                                (`torch_references.TorchResNet`) with `cifar=True`
    TorchResNetV2               RepDistiller's resnetv2.py (its CIFAR ResNet50)
    TorchWideResNet             RepDistiller's wrn.py
    TorchVGG                    RepDistiller's vgg.py with BatchNorm
    TorchCifarMobileNetV2       RepDistiller's mobilenetv2.py (mobile_half at width 0.5)
    TorchShuffleV1, TorchShuffleV2   RepDistiller's ShuffleNetv1.py / ShuffleNetv2.py
    TorchMobileNetV1            mdistiller's ImageNet mobilenetv1.py

Forward passes return logits only (the references' feature lists are left out).
"""

import functools

import torch
from torch import nn
from torch.nn import functional
from torch_references import BasicBlock, TorchResNet


def repdistiller_resnet(depth, num_filters, num_classes):
    """RepDistiller's resnet.py `ResNet(depth, num_filters, 'basicblock')`."""
    layers = ((depth - 2) // 6,) * 3
    return TorchResNet(BasicBlock, layers, num_classes, num_filters[1:], num_filters[0], True)


class BottleneckV2(nn.Module):
    """RepDistiller's resnetv2.py Bottleneck: the shortcut is a Sequential `shortcut`."""

    expansion = 4

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, out, 1, stride, bias=False), nn.BatchNorm2d(out)
            )

    def forward(self, x):
        out = functional.relu(self.bn1(self.conv1(x)))
        out = functional.relu(self.bn2(self.conv2(out)))
        return functional.relu(self.bn3(self.conv3(out)) + self.shortcut(x))


class TorchResNetV2(nn.Module):
    """RepDistiller's resnetv2.py ResNet (`ResNet50`: blocks (3, 4, 6, 3), widths 64 ..
    512, stem 64); widths and stem are arguments so that tests can shrink it."""

    def __init__(self, num_blocks, num_classes, widths=(64, 128, 256, 512), stem=64):
        super().__init__()
        self.in_planes = stem
        self.conv1 = nn.Conv2d(3, stem, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        stages = []
        for stage, (blocks, width) in enumerate(zip(num_blocks, widths, strict=True)):
            strides = [1 if stage == 0 else 2] + [1] * (blocks - 1)
            layers = []
            for stride in strides:
                layers.append(BottleneckV2(self.in_planes, width, stride))
                self.in_planes = width * BottleneckV2.expansion
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.linear = nn.Linear(widths[-1] * BottleneckV2.expansion, num_classes)

    def forward(self, x):
        out = functional.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(out.mean((2, 3)))


class WRNBlock(nn.Module):
    """RepDistiller's wrn.py BasicBlock (dropout 0): pre-activation, `convShortcut` where
    the width changes."""

    def __init__(self, in_planes, out_planes, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.equal_in_out = in_planes == out_planes
        self.convShortcut = None
        if not self.equal_in_out:
            self.convShortcut = nn.Conv2d(in_planes, out_planes, 1, stride, bias=False)

    def forward(self, x):
        activated = functional.relu(self.bn1(x))
        out = self.conv2(functional.relu(self.bn2(self.conv1(activated))))
        return out + (x if self.equal_in_out else self.convShortcut(activated))


class NetworkBlock(nn.Module):
    """RepDistiller's wrn.py NetworkBlock: its blocks in a Sequential `layer`."""

    def __init__(self, blocks, in_planes, out_planes, stride):
        super().__init__()
        self.layer = nn.Sequential(
            *[
                WRNBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1)
                for i in range(blocks)
            ]
        )

    def forward(self, x):
        return self.layer(x)


class TorchWideResNet(nn.Module):
    """RepDistiller's wrn.py WideResNet(depth, num_classes, widen_factor), dropout 0."""

    def __init__(self, depth, num_classes, widen_factor):
        super().__init__()
        blocks = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.block1 = NetworkBlock(blocks, widths[0], widths[1], 1)
        self.block2 = NetworkBlock(blocks, widths[1], widths[2], 2)
        self.block3 = NetworkBlock(blocks, widths[2], widths[3], 2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)

    def forward(self, x):
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        return self.fc(functional.relu(self.bn1(out)).mean((2, 3)))


VGG_CFG = {"S": [[64], [128], [256], [512], [512]]}
VGG_CFG["B"] = [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]]


class TorchVGG(nn.Module):
    """RepDistiller's vgg.py VGG with BatchNorm (vgg8_bn: cfg 'S', vgg13_bn: cfg 'B')."""

    def __init__(self, cfg, num_classes):
        super().__init__()
        in_channels = 3
        for index, widths in enumerate(cfg):
            layers = []
            for width in widths:
                layers += [nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width)]
                layers.append(nn.ReLU(inplace=True))
                in_channels = width
            setattr(self, f"block{index}", nn.Sequential(*layers[:-1]))
        self.pool = nn.MaxPool2d(2, 2)
        self.classifier = nn.Linear(512, num_classes)

    def forward(self, x):
        pooled_before = {1, 2, 3, 4} if x.shape[2] == 64 else {1, 2, 3}
        for index in range(5):
            if index in pooled_before:
                x = self.pool(x)
            x = functional.relu(getattr(self, f"block{index}")(x))
        return self.classifier(x.mean((2, 3)))


def conv_bn_relu(inp, oup, kernel, stride=1):
    """RepDistiller's conv_bn / conv_1x1_bn and mdistiller's conv_bn: Sequential conv (.0),
    BN (.1), relu."""
    conv = nn.Conv2d(inp, oup, kernel, stride, kernel // 2, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(oup), nn.ReLU(inplace=True))


class CifarInvertedResidual(nn.Module):
    """RepDistiller's mobilenetv2.py InvertedResidual: expand conv even at expansion 1."""

    def __init__(self, inp, oup, stride, expand_ratio):
        super().__init__()
        hidden = inp * expand_ratio
        self.use_res_connect = stride == 1 and inp == oup
        self.conv = nn.Sequential(
            *conv_bn_relu(inp, hidden, 1),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, oup, 1, bias=False),
            nn.BatchNorm2d(oup),
        )

    def forward(self, x):
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class TorchCifarMobileNetV2(nn.Module):
    """RepDistiller's mobilenetv2.py MobileNetV2(T=6, width_mult); mobile_half: 0.5."""

    SETTING = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2))
    SETTING += ((6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))  # t, c, n, s

    def __init__(self, num_classes, width_mult=0.5):
        super().__init__()
        width = int(32 * width_mult)
        self.conv1 = conv_bn_relu(3, width, 3, 2)
        self.blocks = nn.ModuleList()
        for t, c, n, s in self.SETTING:
            layers = []
            for i in range(n):
                layers.append(
                    CifarInvertedResidual(width, int(c * width_mult), s if i == 0 else 1, t)
                )
                width = int(c * width_mult)
            self.blocks.append(nn.Sequential(*layers))
        last = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = conv_bn_relu(width, last, 1)
        self.classifier = nn.Sequential(nn.Linear(last, num_classes))

    def forward(self, x):
        x = self.conv1(x)
        for block in self.blocks:
            x = block(x)
        return self.classifier(self.conv2(x).mean((2, 3)))


def channel_shuffle(x, groups):
    """RepDistiller's ShuffleBlock."""
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).permute(0, 2, 1, 3, 4).reshape(n, c, h, w)


class ShuffleV1Bottleneck(nn.Module):
    """RepDistiller's ShuffleNetv1.py Bottleneck."""

    def __init__(self, in_planes, out_planes, stride, groups):
        super().__init__()
        self.stride = stride
        mid = int(out_planes / 4)
        self.first_groups = 1 if in_planes == 24 else groups
        self.conv1 = nn.Conv2d(in_planes, mid, 1, groups=self.first_groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, out_planes, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.AvgPool2d(3, 2, 1) if stride == 2 else nn.Identity()

    def forward(self, x):
        out = channel_shuffle(functional.relu(self.bn1(self.conv1(x))), self.first_groups)
        out = self.bn3(self.conv3(functional.relu(self.bn2(self.conv2(out)))))
        res = self.shortcut(x)
        return functional.relu(torch.cat([out, res], 1) if self.stride == 2 else out + res)


class TorchShuffleV1(nn.Module):
    """RepDistiller's ShuffleNetv1.py `ShuffleV1` (out planes 240, 480, 960; blocks 4, 8,
    4; groups 3)."""

    def __init__(self, num_classes, out_planes=(240, 480, 960), num_blocks=(4, 8, 4), groups=3):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        in_planes = 24
        for stage, (planes, blocks) in enumerate(zip(out_planes, num_blocks, strict=True), 1):
            layers = []
            for i in range(blocks):
                cat_planes = in_planes if i == 0 else 0
                layers.append(
                    ShuffleV1Bottleneck(in_planes, planes - cat_planes, 2 if i == 0 else 1, groups)
                )
                in_planes = planes
            setattr(self, f"layer{stage}", nn.Sequential(*layers))
        self.linear = nn.Linear(out_planes[2], num_classes)

    def forward(self, x):
        out = functional.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.linear(out.mean((2, 3)))


def _conv(inp, oup, kernel, stride=1, groups=1):
    return nn.Conv2d(inp, oup, kernel, stride, kernel // 2, groups=groups, bias=False)


class ShuffleV2BasicBlock(nn.Module):
    """RepDistiller's ShuffleNetv2.py BasicBlock (split ratio 0.5)."""

    def __init__(self, channels):
        super().__init__()
        half = channels // 2
        self.conv1, self.bn1 = _conv(half, half, 1), nn.BatchNorm2d(half)
        self.conv2, self.bn2 = _conv(half, half, 3, groups=half), nn.BatchNorm2d(half)
        self.conv3, self.bn3 = _conv(half, half, 1), nn.BatchNorm2d(half)

    def forward(self, x):
        half = x.shape[1] // 2
        x1, x2 = x[:, :half], x[:, half:]
        out = self.bn2(self.conv2(functional.relu(self.bn1(self.conv1(x2)))))
        out = functional.relu(self.bn3(self.conv3(out)))
        return channel_shuffle(torch.cat([x1, out], 1), 2)


class ShuffleV2DownBlock(nn.Module):
    """RepDistiller's ShuffleNetv2.py DownBlock."""

    def __init__(self, inp, oup):
        super().__init__()
        mid = oup // 2
        self.conv1, self.bn1 = _conv(inp, inp, 3, 2, groups=inp), nn.BatchNorm2d(inp)
        self.conv2, self.bn2 = _conv(inp, mid, 1), nn.BatchNorm2d(mid)
        self.conv3, self.bn3 = _conv(inp, mid, 1), nn.BatchNorm2d(mid)
        self.conv4, self.bn4 = _conv(mid, mid, 3, 2, groups=mid), nn.BatchNorm2d(mid)
        self.conv5, self.bn5 = _conv(mid, mid, 1), nn.BatchNorm2d(mid)

    def forward(self, x):
        left = functional.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = self.bn4(self.conv4(functional.relu(self.bn3(self.conv3(x)))))
        right = functional.relu(self.bn5(self.conv5(right)))
        return channel_shuffle(torch.cat([left, right], 1), 2)


class TorchShuffleV2(nn.Module):
    """RepDistiller's ShuffleNetv2.py `ShuffleV2` (net size 1: 116, 232, 464, 1024;
    blocks 3, 7, 3)."""

    def __init__(self, num_classes, out_channels=(116, 232, 464, 1024), num_blocks=(3, 7, 3)):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        in_channels = 24
        for stage, (width, blocks) in enumerate(
            zip(out_channels[:3], num_blocks, strict=True), start=1
        ):
            layers = [ShuffleV2DownBlock(in_channels, width)]
            layers += [ShuffleV2BasicBlock(width) for _ in range(blocks)]
            setattr(self, f"layer{stage}", nn.Sequential(*layers))
            in_channels = width
        self.conv2 = nn.Conv2d(out_channels[2], out_channels[3], 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels[3])
        self.linear = nn.Linear(out_channels[3], num_classes)

    def forward(self, x):
        out = functional.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = functional.relu(self.bn2(self.conv2(out)))
        return self.linear(out.mean((2, 3)))


MOBILENET_V1_BLOCKS = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2)]
MOBILENET_V1_BLOCKS += [(512, 1)] * 5 + [(1024, 2), (1024, 1)]  # (width, stride)


class TorchMobileNetV1(nn.Module):
    """mdistiller's ImageNet mobilenetv1.py: `model` a Sequential of conv_bn and 13 conv_dw
    Sequentials (depthwise conv 0, BN 1, relu, pointwise conv 3, BN 4, relu); its final
    AvgPool2d(7), the global pool at 224 px and parameter-free, is a global mean here so that
    tests can run it at 32 px."""

    def __init__(self, num_classes):
        super().__init__()
        layers, inp = [conv_bn_relu(3, 32, 3, 2)], 32
        for width, stride in MOBILENET_V1_BLOCKS:
            layers.append(
                nn.Sequential(
                    _conv(inp, inp, 3, stride, groups=inp),
                    nn.BatchNorm2d(inp),
                    nn.ReLU(inplace=True),
                    *conv_bn_relu(inp, width, 1),
                )
            )
            inp = width
        self.model = nn.Sequential(*layers)
        self.fc = nn.Linear(1024, num_classes)

    def forward(self, x):
        return self.fc(self.model(x).mean((2, 3)))


# The full-size reference of every RepDistiller CIFAR model (RepDistiller's `model_dict`
# name in the comment where it differs) and of mdistiller's MobileNetV1, by mokd_jax name:
# num_classes -> torch model.
REFERENCES = {
    **{
        arch: functools.partial(repdistiller_resnet, depth, filters)
        for arch, depth, filters in [
            ("resnet20", 20, (16, 16, 32, 64)),
            ("resnet32", 32, (16, 16, 32, 64)),
            ("resnet56", 56, (16, 16, 32, 64)),
            ("resnet110", 110, (16, 16, 32, 64)),
            ("resnet8x4", 8, (32, 64, 128, 256)),
            ("resnet32x4", 32, (32, 64, 128, 256)),
        ]
    },
    "resnet50_cifar": functools.partial(TorchResNetV2, (3, 4, 6, 3)),  # ResNet50
    "wrn_16_2": lambda num_classes: TorchWideResNet(16, num_classes, 2),
    "wrn_40_1": lambda num_classes: TorchWideResNet(40, num_classes, 1),
    "wrn_40_2": lambda num_classes: TorchWideResNet(40, num_classes, 2),
    "vgg8": functools.partial(TorchVGG, VGG_CFG["S"]),
    "vgg13": functools.partial(TorchVGG, VGG_CFG["B"]),
    "mobile_half": TorchCifarMobileNetV2,
    "shufflenet_v1": TorchShuffleV1,  # ShuffleV1
    "shufflenet_v2": TorchShuffleV2,  # ShuffleV2
    "mobilenet_v1": TorchMobileNetV1,
}


def param_count(model):
    """Trainable parameters, as the references' papers count them (buffers excluded)."""
    return sum(parameter.numel() for parameter in model.parameters())
