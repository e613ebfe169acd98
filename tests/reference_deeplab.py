"""A test oracle: the reference DeepLabV2 of the FDA / AdaptSegNet / DUDA code, on torch alone.

Written from the published description of that network (docs/method.md) and deliberately
independent of `stages.nn`: nothing is imported from the project, so a mistake in the project's
layout cannot hide in a shared helper. Tensor names are those of FDA's and AdaptSegNet's
`model/deeplab.py`: `conv1`, `bn1`, `layer1` … `layer4` (Bottleneck blocks with `conv1/bn1`,
`conv2/bn2`, `conv3/bn3` and, in each layer's first block, `downsample.0/1`) and the classifier
`layer5.conv2d_list.{0..3}`. Its state dict is therefore a file in that lineage's format.

Layout: stem conv7×7 s2 → BN → ReLU → max-pool 3×3 s2 pad 1 rounding up; per-layer strides
1, 2, 1, 1 carried by the first block's 1×1 `conv1` (and its downsample); every 3×3 conv of
layer3 dilated 2 and of layer4 dilated 4, padding = dilation. `forward` returns the classifier's
logits at feature resolution (B, num_classes, h, w); the caller upsamples.
"""

from __future__ import annotations

import torch
from torch import nn

STRIDES = (1, 2, 1, 1)
DILATIONS = (1, 1, 2, 4)
WIDTHS = (64, 128, 256, 512)
EXPANSION = 4


class Block(nn.Module):
    """1×1 (carries the stride) → 3×3 dilated → 1×1 expand, plus the shortcut."""

    def __init__(self, in_channels: int, width: int, stride: int, dilation: int,
                 project_shortcut: bool) -> None:
        super().__init__()
        out_channels = width * EXPANSION
        self.conv1 = nn.Conv2d(in_channels, width, 1, stride=stride, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=1, padding=dilation, dilation=dilation,
                               bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.downsample = (nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride,
                                                   bias=False),
                                         nn.BatchNorm2d(out_channels))
                           if project_shortcut else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return torch.relu(y + shortcut)


class Classifier(nn.Module):
    """`layer5`: parallel 3×3 convs (dilation = padding = rate) with bias.

    `branches_used` = 4 sums all four (FDA, DUDA, IAST); 2 reproduces AdaptSegNet's single-level
    `model/deeplab.py`, whose loop returns after adding the second branch.
    """

    def __init__(self, in_channels: int, num_classes: int, rates: tuple[int, ...],
                 branches_used: int) -> None:
        super().__init__()
        self.conv2d_list = nn.ModuleList(
            nn.Conv2d(in_channels, num_classes, 3, padding=rate, dilation=rate, bias=True)
            for rate in rates)
        self.branches_used = branches_used

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2d_list[0](x)
        for conv in self.conv2d_list[1:self.branches_used]:
            out = out + conv(x)
        return out


class ReferenceDeepLab(nn.Module):
    """forward(x: (B, 3, H, W) float) -> logits (B, num_classes, h, w) float, not upsampled."""

    def __init__(self, blocks: tuple[int, int, int, int] = (3, 4, 23, 3), num_classes: int = 19,
                 rates: tuple[int, ...] = (6, 12, 18, 24), branches_used: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True)
        in_channels = 64
        for index, (count, width, stride, dilation) in enumerate(
                zip(blocks, WIDTHS, STRIDES, DILATIONS), start=1):
            layer = []
            for position in range(count):
                first = position == 0
                layer.append(Block(in_channels, width, stride if first else 1, dilation,
                                   project_shortcut=first))
                in_channels = width * EXPANSION
            setattr(self, f"layer{index}", nn.Sequential(*layer))
        self.layer5 = Classifier(in_channels, num_classes, rates, branches_used)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer5(self.features(x))


def randomize_(model: nn.Module, seed: int) -> nn.Module:
    """Give every tensor a random value at a scale that keeps activations moderate through the
    network (logits of order 1-10): He-scaled convs, BN scales in [0.4, 0.8] so the residual
    sum does not grow block after block, small BN shifts and running means, running variances
    around 1, and N(0, 0.01) classifier weights as DeepLabV2 initialises them. Returns `model`,
    changed in place."""
    generator = torch.Generator().manual_seed(seed)

    def uniform(tensor: torch.Tensor, low: float, high: float) -> None:
        tensor.copy_(torch.rand(tensor.shape, generator=generator) * (high - low) + low)

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                fan_in = module.weight[0].numel()
                std = 0.01 if module.bias is not None else (2.0 / fan_in) ** 0.5
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * std)
                if module.bias is not None:
                    uniform(module.bias, -0.1, 0.1)
            elif isinstance(module, nn.BatchNorm2d):
                uniform(module.weight, 0.4, 0.8)
                uniform(module.bias, -0.1, 0.1)
                uniform(module.running_mean, -0.1, 0.1)
                uniform(module.running_var, 0.5, 1.5)
    return model
