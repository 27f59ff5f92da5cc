"""PyTorch reference models for the tests, written with torch.nn under the real libraries'
module names (torchvision and timm cannot be installed beside the pinned CPU torch), so that
their state-dict keys are the real ones; and helpers that give them random weights. The
ResNets, ViT and RegNetY live in the package (`mokd_jax.torch_peer_models`, for the
benchmark's PyTorch peer) and are re-exported here.

Imported by the tests that need torch, after `pytest.importorskip("torch")`.
"""

import numpy as np
import torch
from torch import nn

from mokd_jax.torch_peer_models import (  # noqa: F401  (the package's torch models, re-exported)
    TORCH_RESNETS,
    BasicBlock,
    Bottleneck,
    TorchRegNet,
    TorchResNet,
    TorchViT,
    torch_resnet,
)


def conv_norm_act(inp, oup, kernel, stride=1, groups=1, act=nn.ReLU6):
    """torchvision's Conv2dNormActivation: a Sequential conv (.0), BN (.1), activation."""
    conv = nn.Conv2d(inp, oup, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(oup), act(inplace=True))


class InvertedResidual(nn.Module):
    """torchvision.models.mobilenetv2.InvertedResidual."""

    def __init__(self, inp, oup, stride, expand_ratio):
        super().__init__()
        hidden = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers = [conv_norm_act(inp, hidden, 1)] if expand_ratio != 1 else []
        layers += [
            conv_norm_act(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, oup, 1, bias=False),
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class TorchMobileNetV2(nn.Module):
    """torchvision.models.mobilenetv2.MobileNetV2 at width 1.0."""

    SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2))
    SETTING += ((6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))  # t, c, n, s

    def __init__(self, num_classes):
        super().__init__()
        features, width = [conv_norm_act(3, 32, 3, 2)], 32
        for t, c, n, s in self.SETTING:
            for i in range(n):
                features.append(InvertedResidual(width, c, s if i == 0 else 1, t))
                width = c
        features.append(conv_norm_act(width, 1280, 1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x).mean((2, 3)))


def timm_regnet_stages(w0, wa, wm, depth, group_size, q=8):
    """(stage widths, stage depths, group size) from RegNet's design-space parameters, as
    timm's generate_regnet + adjust_widths_groups_comp derive them (bottle ratio 1)."""
    block_widths = np.arange(depth) * wa + w0
    exponents = np.round(np.log(block_widths / w0) / np.log(wm))
    block_widths = (np.round(w0 * wm**exponents / q) * q).astype(int)
    widths, depths = np.unique(block_widths, return_counts=True)
    groups = [min(group_size, int(w)) for w in widths]
    widths = [int(round(w / g) * g) for w, g in zip(widths, groups, strict=True)]
    assert len(set(groups)) == 1
    return tuple(widths), tuple(int(d) for d in depths), groups[0]


def randomized(model, seed=0):
    """`model` in eval mode with random weights AND random BatchNorm statistics (fresh
    ones, mean 0 and var 1, would hide a swapped mean/var or a misplaced epsilon)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if not tensor.is_floating_point():
                continue
            if name.endswith("running_var"):
                tensor.copy_(0.5 + torch.rand(tensor.shape, generator=generator))
            elif name.endswith(("running_mean", "bias")):
                tensor.copy_(0.1 * torch.randn(tensor.shape, generator=generator))
            elif tensor.ndim == 1:  # norm scales
                tensor.copy_(0.5 + torch.rand(tensor.shape, generator=generator))
            else:  # fan-in scaled, so activations neither vanish nor explode with depth
                fan_in = tensor[0].numel()
                tensor.copy_(torch.randn(tensor.shape, generator=generator) / fan_in**0.5)
    return model.eval()


def numpy_state_dict(model):
    return {key: value.numpy() for key, value in model.state_dict().items()}
