"""ResNets in torchvision's layout for the benchmark's PyTorch peer (`mokd_jax.torch_peer`)
and the tests' torch references: written with torch.nn under torchvision's module names,
so that their state-dict keys are torchvision's and `mokd_jax.convert` reads them.

torchvision itself is not imported: beside the CPU-only torch it cannot be imported without
a test shim.
"""

import torch
from torch import nn


class BasicBlock(nn.Module):
    """torchvision.models.resnet.BasicBlock, also RepDistiller's resnet.py BasicBlock."""

    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """torchvision.models.resnet.Bottleneck (v1.5: the stride on the 3x3 conv)."""

    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class TorchResNet(nn.Module):
    """torchvision.models.resnet.ResNet, with the stem and stage widths as arguments
    (torchvision's are 64 and (64, 128, 256, 512)) so that tests can shrink it. `cifar`:
    RepDistiller's resnet.py ResNet instead (conv3x3 stride-1 stem, no max-pool; its
    AvgPool2d(8) is the global pool at 32 px)."""

    def __init__(
        self, block, layers, num_classes, widths=(64, 128, 256, 512), stem=64, cifar=False
    ):
        super().__init__()
        self.inplanes = stem
        kernel, stride = (3, 1) if cifar else (7, 2)
        self.conv1 = nn.Conv2d(3, stem, kernel, stride, kernel // 2, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity() if cifar else nn.MaxPool2d(3, 2, 1)
        self.stages = len(layers)
        for stage, (blocks, width) in enumerate(zip(layers, widths, strict=True), start=1):
            stride = 1 if stage == 1 else 2
            setattr(self, f"layer{stage}", self._make_layer(block, width, blocks, stride))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[-1] * block.expansion, num_classes)

    def _make_layer(self, block, planes, blocks, stride):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for stage in range(1, self.stages + 1):
            x = getattr(self, f"layer{stage}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


TORCH_RESNETS = {  # torchvision's builders
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
    "resnet101": (Bottleneck, (3, 4, 23, 3)),
}


def torch_resnet(arch, num_classes=10, **kwargs):
    block, layers = TORCH_RESNETS[arch]
    return TorchResNet(block, layers, num_classes, **kwargs)
