"""PyTorch reference models for the tests, written with torch.nn under the real libraries'
module names (torchvision and timm cannot be installed beside the pinned CPU torch), so that
their state-dict keys are the real ones; and helpers that give them random weights. The
ResNets live in the package (`mokd_jax.torch_peer_models`, for the benchmark's PyTorch
peer) and are re-exported here.

Imported by the tests that need torch, after `pytest.importorskip("torch")`.
"""

import numpy as np
import torch
from torch import nn

from mokd_jax.torch_peer_models import (  # noqa: F401  (the package's torch ResNets, re-exported)
    TORCH_RESNETS,
    BasicBlock,
    Bottleneck,
    TorchResNet,
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


class Attention(nn.Module):
    """timm.models.vision_transformer.Attention (fused qkv)."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # [B, heads, N, head_dim] each
        x = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(batch, tokens, dim))


class Mlp(nn.Module):
    """timm.layers.Mlp: fc1, exact GELU, fc2."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """timm.models.vision_transformer.Block (no layer scale, no drop-path)."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, 4 * dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    """timm.layers.PatchEmbed: a conv with kernel and stride `patch`, flattened."""

    def __init__(self, dim, patch):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class TorchViT(nn.Module):
    """timm.models.vision_transformer.VisionTransformer with a class token, as DeiT's
    (deit_tiny_patch16_224: dim 192, 3 heads, depth 12; deit_small: dim 384, 6 heads)."""

    def __init__(self, num_classes, dim, num_heads, depth=12, image_size=224, patch=16):
        super().__init__()
        self.patch_embed = PatchEmbed(dim, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + (image_size // patch) ** 2, dim))
        self.blocks = nn.Sequential(*[Block(dim, num_heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])


class ConvNormAct(nn.Module):
    """timm.layers.ConvNormAct: `conv` (bias-free), `bn`, then relu unless not `act`."""

    def __init__(self, inp, oup, kernel, stride=1, groups=1, act=True):
        super().__init__()
        self.conv = nn.Conv2d(inp, oup, kernel, stride, kernel // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(oup)
        self.act = nn.ReLU() if act else nn.Identity()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class SEModule(nn.Module):
    """timm.layers.SEModule: x * sigmoid(fc2(relu(fc1(mean(x))))), 1x1 convs with bias."""

    def __init__(self, channels, reduced):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, reduced, 1)
        self.fc2 = nn.Conv2d(reduced, channels, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean((2, 3), keepdim=True)))))


class RegNetBottleneck(nn.Module):
    """timm.models.regnet.Bottleneck at bottle_ratio 1 with SE, as in RegNetY."""

    def __init__(self, inp, oup, stride, group_size, se_ratio=0.25):
        super().__init__()
        self.conv1 = ConvNormAct(inp, oup, 1)
        self.conv2 = ConvNormAct(oup, oup, 3, stride, groups=oup // group_size)
        self.se = SEModule(oup, int(round(inp * se_ratio)))
        self.conv3 = ConvNormAct(oup, oup, 1, act=False)
        project = stride != 1 or inp != oup
        self.downsample = ConvNormAct(inp, oup, 1, stride, act=False) if project else None
        self.act3 = nn.ReLU()

    def forward(self, x):
        y = self.conv3(self.se(self.conv2(self.conv1(x))))
        return self.act3(y + (x if self.downsample is None else self.downsample(x)))


class ClassifierHead(nn.Module):
    """timm.layers.ClassifierHead: average pool, `fc`."""

    def __init__(self, inp, num_classes):
        super().__init__()
        self.fc = nn.Linear(inp, num_classes)

    def forward(self, x):
        return self.fc(x.mean((2, 3)))


class TorchRegNet(nn.Module):
    """timm.models.regnet.RegNet for RegNetY: `stem`, stages `s1`.. of blocks `b1`..,
    `head`; every stage's first block has stride 2."""

    def __init__(self, num_classes, widths, depths, group_size, stem=32):
        super().__init__()
        self.stem = ConvNormAct(3, stem, 3, 2)
        inp = stem
        for stage, (width, depth) in enumerate(zip(widths, depths, strict=True), start=1):
            blocks = nn.Sequential()
            for block in range(1, depth + 1):
                stride = 2 if block == 1 else 1
                blocks.add_module(f"b{block}", RegNetBottleneck(inp, width, stride, group_size))
                inp = width
            setattr(self, f"s{stage}", blocks)
        self.head = ClassifierHead(inp, num_classes)

    def forward(self, x):
        x = self.stem(x)
        for stage in range(1, 5):
            x = getattr(self, f"s{stage}")(x)
        return self.head(x)


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
