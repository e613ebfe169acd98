"""SegFormer-family models: a Mix Transformer encoder with a SegFormer or DAFormer decoder head.

The encoder is segmentation-models-pytorch's `mit_b0 … mit_b5` (NVlabs' Mix Transformer under
NVlabs' parameter names: `patch_embed1.proj`, `block1.0.attn.q`, `norm1`, …), taken from a
maintained library rather than written here; it is imported only when a SegFormer is built, so
the DeepLab path does not need the optional `segformer` extra. Its `forward_features` gives the
four stages at strides 4, 8, 16 and 32 (the encoder's `forward` prepends the input and an empty
placeholder for smp's own decoders, which this model does not use).

The heads are written here under the parameter names of the DAFormer code base (mmseg's
`ConvModule` gives `conv` and `bn`), so that a DAFormer checkpoint's `decode_head.*` loads by
name:
- `DAFormerHead`, the context-aware fusion: each stage embedded to `embedding_dim` channels by a
  linear layer (`embed_layers.<i>.proj`), upsampled to stride 4, concatenated, fused by an ASPP
  of a 1×1 conv and depthwise-separable 3×3 convs at the other dilations (each conv + BN +
  ReLU, `fuse_layer.aspp_modules.<j>`), whose concatenated outputs a 3×3 conv + BN + ReLU
  reduces to `embedding_dim` (`fuse_layer.bottleneck`); then Dropout2d and the 1×1 classifier
  `conv_seg`;
- `SegFormerHead`, the all-MLP head: the same embeddings (`linear_c.<i>.proj`), concatenated from
  the deepest stage to the shallowest, a 1×1 conv + BN + ReLU (`linear_fuse`), Dropout2d, the
  1×1 classifier `linear_pred`.
Logits are upsampled bilinearly (align_corners=False, as mmseg does) to the input size.
Parameter names start with `backbone.` (the encoder) or `decode_head.`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from stages.config import SegFormerConfig
from stages.runtime.errors import DudaError

EXTRA = "segformer"


def mit_encoder(name: str, drop_path_rate: float) -> nn.Module:
    """segmentation-models-pytorch's Mix Transformer `name`, randomly initialised.

    A DudaError naming the `segformer` extra when the library is not installed.
    """
    try:
        from segmentation_models_pytorch.encoders.mix_transformer import (
            mix_transformer_encoders,
        )
    except ImportError as error:
        raise DudaError(
            f"model.name: segformer needs segmentation-models-pytorch, which is not installed "
            f"({error})",
            f"install the optional extra: pip install -e '.[{EXTRA}]' (or pip install "
            f"'duda[{EXTRA}]'), or use model.name: deeplabv2") from None
    entry = mix_transformer_encoders[name]
    params = {**entry["params"], "drop_path_rate": drop_path_rate}
    target = torch.get_default_device()
    if target.type != "meta":
        return entry["encoder"](**params)
    # The encoder reads its stochastic-depth rates with .item(), which a meta tensor cannot
    # give: build it on the CPU, then move it to meta to be filled by assignment.
    with torch.device("cpu"):
        encoder = entry["encoder"](**params)
    return encoder.to("meta")


def embed_dims(name: str) -> list[int]:
    """The channel counts of the four stages of MiT `name` (B0: 32, 64, 160, 256; B1–B5: 64,
    128, 320, 512), without importing the library."""
    return [32, 64, 160, 256] if name == "mit_b0" else [64, 128, 320, 512]


class ConvBNReLU(nn.Module):
    """mmcv's ConvModule with BN and ReLU: a bias-free conv, `bn`, ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, dilation: int = 1,
                 groups: int = 1) -> None:
        super().__init__()
        padding = 0 if kernel_size == 1 else dilation * (kernel_size // 2)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding,
                              dilation=dilation, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class SeparableConvBNReLU(nn.Module):
    """mmcv's DepthwiseSeparableConvModule: a depthwise 3×3 ConvBNReLU at `dilation`, then a
    pointwise 1×1 ConvBNReLU."""

    def __init__(self, in_channels: int, out_channels: int, dilation: int) -> None:
        super().__init__()
        self.depthwise_conv = ConvBNReLU(in_channels, in_channels, 3, dilation, in_channels)
        self.pointwise_conv = ConvBNReLU(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise_conv(self.depthwise_conv(x))


class Embedding(nn.Module):
    """A stage's linear embedding: (B, C, h, w) -> (B, D, h, w) by one `proj` Linear over C."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_channels, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = x.shape
        tokens = self.proj(x.flatten(2).transpose(1, 2))  # (B, h·w, D)
        return tokens.transpose(1, 2).reshape(batch, -1, height, width)


class FusionASPP(nn.Module):
    """DAFormer's fusion: parallel convs (1×1 at dilation 1, depthwise-separable 3×3 at the
    others) whose outputs are concatenated and reduced by a 3×3 `bottleneck`."""

    def __init__(self, in_channels: int, channels: int, dilations: list[int]) -> None:
        super().__init__()
        self.aspp_modules = nn.ModuleList(
            ConvBNReLU(in_channels, channels, 1) if dilation == 1
            else SeparableConvBNReLU(in_channels, channels, dilation)
            for dilation in dilations)
        self.bottleneck = ConvBNReLU(len(dilations) * channels, channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bottleneck(torch.cat([branch(x) for branch in self.aspp_modules], dim=1))


def _classifier(channels: int, num_classes: int) -> nn.Conv2d:
    conv = nn.Conv2d(channels, num_classes, kernel_size=1)
    nn.init.normal_(conv.weight, mean=0.0, std=0.01)
    nn.init.zeros_(conv.bias)
    return conv


def _to_stride4(features: list[torch.Tensor]) -> list[torch.Tensor]:
    size = features[0].shape[-2:]
    return [f if f.shape[-2:] == size
            else F.interpolate(f, size=size, mode="bilinear", align_corners=False)
            for f in features]


class DAFormerHead(nn.Module):
    """Four stages -> logits (B, num_classes, h/4, w/4) by context-aware fusion."""

    def __init__(self, in_channels: list[int], config: SegFormerConfig, num_classes: int) -> None:
        super().__init__()
        dim = config.embedding_dim
        self.embed_layers = nn.ModuleDict(
            {str(i): Embedding(channels, dim) for i, channels in enumerate(in_channels)})
        self.fuse_layer = FusionASPP(dim * len(in_channels), dim, list(config.fusion_dilations))
        self.dropout = nn.Dropout2d(config.dropout) if config.dropout > 0 else nn.Identity()
        self.conv_seg = _classifier(dim, num_classes)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        embedded = [self.embed_layers[str(i)](f) for i, f in enumerate(features)]
        fused = self.fuse_layer(torch.cat(_to_stride4(embedded), dim=1))
        return self.conv_seg(self.dropout(fused))


class SegFormerHead(nn.Module):
    """Four stages -> logits (B, num_classes, h/4, w/4) by SegFormer's all-MLP decoder."""

    def __init__(self, in_channels: list[int], config: SegFormerConfig, num_classes: int) -> None:
        super().__init__()
        dim = config.embedding_dim
        self.linear_c = nn.ModuleDict(
            {str(i): Embedding(channels, dim) for i, channels in enumerate(in_channels)})
        self.linear_fuse = ConvBNReLU(dim * len(in_channels), dim, 1)
        self.dropout = nn.Dropout2d(config.dropout) if config.dropout > 0 else nn.Identity()
        self.linear_pred = _classifier(dim, num_classes)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        embedded = [self.linear_c[str(i)](f) for i, f in enumerate(features)]
        # SegFormer concatenates from the deepest stage to the shallowest.
        fused = self.linear_fuse(torch.cat(_to_stride4(embedded)[::-1], dim=1))
        return self.linear_pred(self.dropout(fused))


HEADS: dict[str, type[nn.Module]] = {"daformer": DAFormerHead, "segformer": SegFormerHead}


class SegFormer(nn.Module):
    """forward(x: (B, 3, H, W) normalised float) -> logits (B, num_classes, H, W) float."""

    def __init__(self, config: SegFormerConfig, num_classes: int) -> None:
        super().__init__()
        self.config = config
        self.num_classes = num_classes
        self.backbone = mit_encoder(config.backbone, config.drop_path_rate)
        self.decode_head = HEADS[config.head](embed_dims(config.backbone), config, num_classes)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) -> the encoder's four stages, (B, C_i, H/2^(i+2), W/2^(i+2))."""
        return self.backbone.forward_features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.decode_head(self.features(x))  # (B, C, H/4, W/4)
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
