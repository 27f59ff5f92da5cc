"""The benchmark's PyTorch models (`mokd_jax.torch_peer`) and the tests' torch references:
torchvision's ResNets, and timm's ViT/DeiT and RegNetY, written with torch.nn under those
libraries' module names, so that their state-dict keys are the libraries' and
`mokd_jax.convert` reads them.

torchvision and timm themselves are not imported: the CPU-only torch the project is tested
with cannot import torchvision without a test shim, and timm imports torchvision. The layers
are the libraries' in what they compute as well (timm's fused-qkv attention through
`scaled_dot_product_attention`, exact GELU, LayerNorm eps 1e-6, per-sample drop-path);
`tests/test_convert.py` checks their outputs against our Flax models on the same weights.
"""

import torch
from torch import nn

from mokd_jax.models.vit import drop_path_rates


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


class DropPath(nn.Module):
    """timm.layers.DropPath: in training, each sample's branch is kept with probability
    1 - `rate` and then divided by that probability; the identity in eval mode."""

    def __init__(self, rate):
        super().__init__()
        self.rate = rate

    def forward(self, x):
        if not self.training or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class Block(nn.Module):
    """timm.models.vision_transformer.Block (no layer scale), with its drop-path on both
    residual branches."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, drop_path_rate=0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.drop_path1 = DropPath(drop_path_rate)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path2 = DropPath(drop_path_rate)

    def forward(self, x):
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """timm.layers.PatchEmbed: a conv with kernel and stride `patch`, flattened."""

    def __init__(self, dim, patch):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class TorchViT(nn.Module):
    """timm.models.vision_transformer.VisionTransformer with a class token, as DeiT's
    (deit_tiny_patch16_224: dim 192, 3 heads, depth 12; deit_small: dim 384, 6 heads).
    `drop_path_rate`: the last block's, rising linearly from 0 at the first (timm's)."""

    def __init__(
        self,
        num_classes,
        dim,
        num_heads,
        depth=12,
        image_size=224,
        patch=16,
        mlp_ratio=4.0,
        drop_path_rate=0.0,
    ):
        super().__init__()
        self.patch_embed = PatchEmbed(dim, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + (image_size // patch) ** 2, dim))
        rates = drop_path_rates(drop_path_rate, depth)
        self.blocks = nn.Sequential(*[Block(dim, num_heads, mlp_ratio, rate) for rate in rates])
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

    def __init__(self, num_classes, widths, depths, group_size, stem=32, se_ratio=0.25):
        super().__init__()
        self.stem = ConvNormAct(3, stem, 3, 2)
        inp = stem
        for stage, (width, depth) in enumerate(zip(widths, depths, strict=True), start=1):
            blocks = nn.Sequential()
            for block in range(1, depth + 1):
                stride = 2 if block == 1 else 1
                blocks.add_module(
                    f"b{block}", RegNetBottleneck(inp, width, stride, group_size, se_ratio)
                )
                inp = width
            setattr(self, f"s{stage}", blocks)
        self.head = ClassifierHead(inp, num_classes)

    def forward(self, x):
        x = self.stem(x)
        for stage in range(1, 5):
            x = getattr(self, f"s{stage}")(x)
        return self.head(x)


TORCH_RESNETS = {  # torchvision's builders
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
    "resnet101": (Bottleneck, (3, 4, 23, 3)),
}


def torch_resnet(arch, num_classes=10, **kwargs):
    block, layers = TORCH_RESNETS[arch]
    return TorchResNet(block, layers, num_classes, **kwargs)
