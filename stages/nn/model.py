"""The model families (`MODELS`, `build_model`), DeepLabV2 with a dilated ResNet backbone, and
the optimiser parameter groups of either family.

`model.name` picks the family: `deeplabv2` (below) or `segformer` (a Mix Transformer encoder with
a SegFormer or DAFormer head, stages.nn.segformer). Every model takes normalised images
(B, 3, H, W) and returns logits (B, num_classes, H, W) at input resolution, keeps its config in
`.config` and its class count in `.num_classes`, and names its parameters `backbone.*` (the
encoder, at the backbone's learning rate) or otherwise (the head); everything downstream (the
step, the teacher, the losses, inference, DDP, AMP, the store) uses that interface only.

The model is `backbone` (a ResNet of output stride 8), an optional `Dropout2d` (DUDA's p = 0.5),
and `classifier`, the four-branch ASPP of DeepLabV2 whose branch outputs are summed. Logits are
upsampled bilinearly (align_corners=True) to the input size, so every loss and metric works at
input resolution. The backbone comes in two layouts (`model.style`, docs/method.md):
- `torchvision`: torchvision's ResNet with layer3 dilated by 2 and layer4 by 4, the first block
  of each keeping the previous dilation (`replace_stride_with_dilation`), as IAST uses it;
- `caffe`: the reference DeepLabV2 of DUDA / FDA / AdaptSegNet, ported from Caffe: the stride of
  a downsampling block sits in its first 1×1 conv, every block of layer3 is dilated 2 and every
  block of layer4 dilated 4, and the stem's max-pool rounds up (`ceil_mode=True`), so a
  1024×2048 input gives a 129×257 feature map where torchvision's layout gives 128×256.
Both layouts have the same parameter names and shapes, but compute different functions of them.
Parameter names start with `backbone.` or `classifier.`; `parameter_groups` gives the backbone
its smaller learning rate from that prefix.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet as tv_resnet

from stages.config import DeepLabV2Config, ModelConfig
from stages.nn.segformer import SegFormer

BACKBONE_PREFIX = "backbone."
HEAD_PREFIX = "classifier."


class DilatedBasicBlock(tv_resnet.BasicBlock):
    """torchvision's BasicBlock with dilation allowed on its two 3×3 convs.

    torchvision refuses `dilation > 1` for BasicBlock; the block is built undilated and the
    dilation and padding are then set on both 3×3 convs (padding = dilation keeps the size).
    """

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None, groups: int = 1, base_width: int = 64,
                 dilation: int = 1, norm_layer: Callable[..., nn.Module] | None = None) -> None:
        super().__init__(inplanes, planes, stride, downsample, groups, base_width, 1, norm_layer)
        for conv in (self.conv1, self.conv2):
            conv.dilation = (dilation, dilation)
            conv.padding = (dilation, dilation)


class _NarrowResNet(tv_resnet.ResNet):
    """A torchvision ResNet whose channel counts are scaled by `width_multiplier`.

    The stage widths 64/128/256/512 (and the stem) become round(w · c). With w = 1 the module
    and parameter names and shapes equal torchvision's resnet18, so ImageNet weights load.
    """

    def __init__(self, block: type[nn.Module], layers: list[int], width_multiplier: float,
                 replace_stride_with_dilation: list[bool]) -> None:
        object.__setattr__(self, "_width", width_multiplier)
        object.__setattr__(self, "_first_layer", True)
        super().__init__(block, layers, replace_stride_with_dilation=replace_stride_with_dilation)
        stem = _scaled(64, width_multiplier)
        self.conv1 = nn.Conv2d(3, stem, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")

    def _make_layer(self, block: type[nn.Module], planes: int, blocks: int, stride: int = 1,
                    dilate: bool = False) -> nn.Sequential:
        if self._first_layer:
            self.inplanes = _scaled(64, self._width)
            object.__setattr__(self, "_first_layer", False)
        return super()._make_layer(block, _scaled(planes, self._width), blocks, stride, dilate)


def _scaled(channels: int, width_multiplier: float) -> int:
    return max(1, round(channels * width_multiplier))


class ResNetBackbone(nn.Module):
    """The convolutional part of a torchvision ResNet (no pooling head, no fc).

    forward: (B, 3, H, W) float -> (B, out_channels, h, w) float, output stride 8: h = ⌈H/8⌉ in
    the torchvision layout, ⌈(⌊⌈H/2⌉/2⌋ + 1)/2⌉ in the caffe one (the max-pool rounds up).
    Attribute names (conv1, bn1, layer1 … layer4) are torchvision's, so a torchvision state dict
    maps onto `backbone.<name>` one to one.
    """

    def __init__(self, resnet: tv_resnet.ResNet) -> None:
        super().__init__()
        self.conv1 = resnet.conv1
        self.bn1 = resnet.bn1
        self.relu = resnet.relu
        self.maxpool = resnet.maxpool
        self.layer1 = resnet.layer1
        self.layer2 = resnet.layer2
        self.layer3 = resnet.layer3
        self.layer4 = resnet.layer4
        last_block = resnet.layer4[-1]
        last_norm = last_block.bn3 if hasattr(last_block, "bn3") else last_block.bn2
        self.out_channels = last_norm.num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def _resnet18(width_multiplier: float) -> tv_resnet.ResNet:
    return _NarrowResNet(DilatedBasicBlock, [2, 2, 2, 2], width_multiplier,
                         replace_stride_with_dilation=[False, True, True])


# The reference DeepLabV2: per-layer strides and dilations of layer1..layer4.
CAFFE_STRIDES = (1, 2, 1, 1)
CAFFE_DILATIONS = (1, 1, 2, 4)


def _caffe_resnet(layers: list[int]) -> tv_resnet.ResNet:
    """A Bottleneck ResNet in the reference DeepLabV2 layout, under torchvision's names.

    Built as a plain torchvision ResNet (strides 1, 2, 2, 2 on the 3×3 convs), then re-strided
    in place: a layer's first block takes the layer's stride on its first 1×1 conv and its
    downsample conv; every 3×3 conv of a layer takes the layer's dilation (padding = dilation,
    first blocks included); the max-pool rounds up. Tensor names and shapes are unchanged.
    """
    resnet = tv_resnet.ResNet(tv_resnet.Bottleneck, layers)
    resnet.maxpool.ceil_mode = True
    stages = (resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4)
    for layer, stride, dilation in zip(stages, CAFFE_STRIDES, CAFFE_DILATIONS):
        for index, block in enumerate(layer):
            block.conv1.stride = (stride, stride) if index == 0 else (1, 1)
            block.conv2.stride = (1, 1)
            block.conv2.dilation = (dilation, dilation)
            block.conv2.padding = (dilation, dilation)
        layer[0].downsample[0].stride = (stride, stride)
    return resnet


def _torchvision_resnet(layers: list[int]) -> tv_resnet.ResNet:
    return tv_resnet.ResNet(tv_resnet.Bottleneck, layers,
                            replace_stride_with_dilation=[False, True, True])


BOTTLENECK_LAYERS = {"resnet50": [3, 4, 6, 3], "resnet101": [3, 4, 23, 3]}

# (model.backbone, model.style) -> the ResNet whose conv1 … layer4 become the backbone.
BACKBONES: dict[tuple[str, str], Callable[[DeepLabV2Config], tv_resnet.ResNet]] = {
    ("resnet101", "torchvision"): lambda cfg: _torchvision_resnet(BOTTLENECK_LAYERS["resnet101"]),
    ("resnet101", "caffe"): lambda cfg: _caffe_resnet(BOTTLENECK_LAYERS["resnet101"]),
    ("resnet50", "torchvision"): lambda cfg: _torchvision_resnet(BOTTLENECK_LAYERS["resnet50"]),
    ("resnet50", "caffe"): lambda cfg: _caffe_resnet(BOTTLENECK_LAYERS["resnet50"]),
    ("resnet18", "torchvision"): lambda cfg: _resnet18(cfg.width_multiplier),
}


class ASPP(nn.Module):
    """DeepLabV2's classifier: parallel 3×3 convs with dilation = padding = rate, outputs summed.

    (B, in_channels, h, w) -> (B, num_classes, h, w). Weights N(0, 0.01), biases 0.
    """

    def __init__(self, in_channels: int, num_classes: int, rates: list[int]) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Conv2d(in_channels, num_classes, kernel_size=3, padding=rate, dilation=rate,
                      bias=True)
            for rate in rates)
        for conv in self.branches:
            nn.init.normal_(conv.weight, mean=0.0, std=0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.branches[0](x)
        for branch in self.branches[1:]:
            out = out + branch(x)
        return out


class DeepLabV2(nn.Module):
    """forward(x: (B, 3, H, W) normalised float) -> logits (B, num_classes, H, W) float."""

    def __init__(self, config: DeepLabV2Config, num_classes: int) -> None:
        super().__init__()
        self.config = config
        self.num_classes = num_classes
        self.backbone = ResNetBackbone(BACKBONES[config.backbone, config.style](config))
        # docs/method.md: DUDA's Dropout2d(0.5) on the layer4 features (FDA and IAST have none).
        self.dropout = nn.Dropout2d(config.dropout) if config.dropout > 0 else nn.Identity()
        self.classifier = ASPP(self.backbone.out_channels, num_classes, list(config.aspp_rates))
        if config.freeze_bn_affine:
            freeze_batchnorm_affine(self)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> backbone features (B, C_feat, h, w), h ≈ H/8 (see ResNetBackbone)."""
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.classifier(self.dropout(self.backbone(x)))  # (B, C, h, w), h ≈ H/8
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=True)


def freeze_batchnorm_affine(model: nn.Module) -> None:
    """BN γ/β get requires_grad=False; the modules stay in train mode, so they still normalise
    with batch statistics and update their running statistics (docs/method.md)."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            for parameter in module.parameters(recurse=False):
                parameter.requires_grad_(False)


# model.name -> the family's model class, built from its config section and the class count.
MODELS: dict[str, Callable[[Any, int], nn.Module]] = {
    "deeplabv2": DeepLabV2,
    "segformer": SegFormer,
}


def build_model(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """A randomly initialised model of `cfg`'s family for `num_classes` classes (weights:
    stages.artifacts.weights)."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    return MODELS[cfg.name](cfg, num_classes)


def parameter_groups(model: nn.Module, lr: float, backbone_lr_multiplier: float,
                     weight_decay: float, head_lr_multiplier: float = 1.0,
                     no_decay: Sequence[str] = ()) -> list[dict[str, Any]]:
    """The optimizer's groups: the backbone at lr × backbone_lr_multiplier, the head at
    lr × head_lr_multiplier (SGD: 0.1 and 1; DAFormer's AdamW: 1 and 10).

    docs/method.md#optimisation: every trainable tensor (biases included) gets the weight decay
    except those whose names contain one of `no_decay` (DAFormer's `norm` and `pos_block`),
    which go to a group of their own (`backbone_no_decay`, `head_no_decay`) with none; frozen
    tensors (BN affine when frozen) are left out. Each group carries `base_lr`, the learning
    rate a scheduler multiplies by its factor, and a `name`; empty groups are left out.
    """
    members: dict[tuple[str, bool], list[nn.Parameter]] = {
        (part, decayed): [] for part in ("backbone", "head") for decayed in (True, False)}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        # Accept a DDP / mean-teacher wrapper's "module." prefix.
        bare = name.removeprefix("module.")
        part = "backbone" if bare.startswith(BACKBONE_PREFIX) else "head"
        members[part, not any(key in bare for key in no_decay)].append(parameter)
    rates = {"backbone": lr * backbone_lr_multiplier, "head": lr * head_lr_multiplier}
    groups = []
    for (part, decayed), params in members.items():
        if params:
            groups.append({"name": part if decayed else f"{part}_no_decay", "params": params,
                           "lr": rates[part], "base_lr": rates[part],
                           "weight_decay": weight_decay if decayed else 0.0})
    return groups
