"""The output-space discriminator of the adversarial warmup and its least-squares losses.

docs/method.md#the-warmup (AdaptSegNet output space, IAST "Origin-Predictor"): the discriminator
reads the softmax of the segmentation output and returns a patch map of domain scores. The losses
are LSGAN mean-squared errors with source = 0 and target = 1.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

SOURCE_LABEL = 0.0
TARGET_LABEL = 1.0


class OutputDiscriminator(nn.Module):
    """conv3×3 s2 (C→64), conv4×4 s2 (64→128, 128→256, 256→512), each + LeakyReLU(0.2), then a
    conv4×4 s2 classifier (512→1); every conv has padding 1 (docs/method.md#the-warmup).

    forward(probabilities (B, C, H, W) float) -> scores (B, 1, H/32, W/32) float (roughly).
    """

    def __init__(self, num_classes: int, width: int = 64, negative_slope: float = 0.2) -> None:
        super().__init__()
        channels = [num_classes, width, width * 2, width * 4, width * 8]
        layers: list[nn.Module] = []
        for i, (c_in, c_out) in enumerate(itertools.pairwise(channels)):
            kernel = 3 if i == 0 else 4
            layers += [nn.Conv2d(c_in, c_out, kernel, stride=2, padding=1),
                       nn.LeakyReLU(negative_slope, inplace=True)]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Conv2d(channels[-1], 1, 4, stride=2, padding=1)

    def forward(self, probabilities: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(probabilities))


def output_size(size: int) -> int:
    """The score map's extent for an input extent `size` (0: too small for the last conv)."""
    size = (size - 1) // 2 + 1  # conv3×3 s2 p1
    for _ in range(4):  # conv4×4 s2 p1: three feature layers and the classifier
        if size + 2 < 4:
            return 0
        size = (size - 2) // 2 + 1
    return size


def _mse_to(scores: torch.Tensor, value: float) -> torch.Tensor:
    scores = scores.float()
    return F.mse_loss(scores, torch.full_like(scores, value))


def discriminator_loss(source_scores: torch.Tensor, target_scores: torch.Tensor) -> torch.Tensor:
    """L_D = ½[MSE(D(p_s), 0) + MSE(D(p_t), 1)] on detached predictions
    (docs/method.md#the-warmup)."""
    return 0.5 * (_mse_to(source_scores, SOURCE_LABEL) + _mse_to(target_scores, TARGET_LABEL))


def adversarial_loss(target_scores: torch.Tensor) -> torch.Tensor:
    """L_adv = MSE(D(p_t), 0): the segmentation network makes target outputs look like source."""
    return _mse_to(target_scores, SOURCE_LABEL)
