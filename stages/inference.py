"""Whole-image inference shared by evaluate, generate-pseudo and update-offline.

The model sees the image at the configured inference size, either whole or as overlapping
sliding windows whose logits are averaged where they overlap; optional horizontal-flip
test-time augmentation averages the softmax of the plain and the flipped (and flipped back)
passes (ALGORITHM.md F.3–F.4). The result is resized bilinearly (align_corners=True, as the
model's own upsampling) to the requested output size, e.g. the ground truth's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from stages.devices import autocast


@dataclass(frozen=True)
class SlidingWindow:
    """Windows of `size` [H, W] whose neighbours overlap by `overlap` (a fraction of the size)."""

    size: tuple[int, int]
    overlap: float = 1 / 3

    def describe(self) -> dict[str, object]:
        return {"window": list(self.size), "overlap": self.overlap}


def window_starts(length: int, window: int, overlap: float) -> list[int]:
    """Start offsets covering [0, length) with windows of `window`; the last ends at `length`."""
    if window >= length:
        return [0]
    stride = max(1, int(window * (1.0 - overlap)))
    starts = list(range(0, length - window + 1, stride))
    if starts[-1] != length - window:
        starts.append(length - window)
    return starts


def _sliding_logits(model: nn.Module, images: torch.Tensor, window: SlidingWindow) -> torch.Tensor:
    """(B, 3, H, W) -> (B, C, H, W): logits averaged over every window covering each pixel."""
    height, width = images.shape[-2:]
    window_h, window_w = min(window.size[0], height), min(window.size[1], width)
    total: torch.Tensor | None = None
    count = torch.zeros(1, 1, height, width, device=images.device)
    for y in window_starts(height, window_h, window.overlap):
        for x in window_starts(width, window_w, window.overlap):
            logits = model(images[:, :, y:y + window_h, x:x + window_w]).float()
            if total is None:
                total = torch.zeros(images.shape[0], logits.shape[1], height, width,
                                    device=images.device)
            total[:, :, y:y + window_h, x:x + window_w] += logits
            count[:, :, y:y + window_h, x:x + window_w] += 1
    assert total is not None
    return total / count


def _logits(model: nn.Module, images: torch.Tensor, out_size: tuple[int, int],
            sliding_window: SlidingWindow | None) -> torch.Tensor:
    if sliding_window is None:
        logits = model(images).float()
    else:
        logits = _sliding_logits(model, images, sliding_window)
    if tuple(logits.shape[-2:]) != tuple(out_size):
        logits = F.interpolate(logits, size=tuple(out_size), mode="bilinear", align_corners=True)
    return logits


@torch.no_grad()
def predict_scores(model: nn.Module, images: torch.Tensor, out_size: tuple[int, int],
                   flip: bool = False, sliding_window: SlidingWindow | None = None,
                   precision: str = "fp32") -> tuple[torch.Tensor, bool]:
    """Class scores whose argmax is the prediction, without a softmax where none is needed.

    images: (B, 3, H, W) normalised float on the model's device.
    Returns ((B, C, *out_size) float32, is_probability): logits without flip; with flip the
    mean of the two softmaxes.
    """
    with autocast(images.device, precision):
        logits = _logits(model, images, out_size, sliding_window)
        if not flip:
            return logits, False
        flipped = _logits(model, images.flip(-1), out_size, sliding_window).flip(-1)
    return (logits.softmax(1) + flipped.softmax(1)) / 2, True


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, out_size: tuple[int, int],
            flip: bool = False, sliding_window: SlidingWindow | None = None,
            precision: str = "fp32") -> torch.Tensor:
    """Softmax probabilities (B, C, *out_size) float32, averaged over the flip if asked.

    images: (B, 3, H, W) normalised float on the model's device; the model is used as is
    (call `model.eval()` first for deterministic inference).
    """
    scores, is_probability = predict_scores(model, images, out_size, flip, sliding_window,
                                            precision)
    return scores if is_probability else scores.softmax(1)


@torch.no_grad()
def predict_classes(model: nn.Module, images: torch.Tensor, out_size: tuple[int, int],
                    flip: bool = False, sliding_window: SlidingWindow | None = None,
                    precision: str = "fp32") -> torch.Tensor:
    """The predicted class map (B, *out_size) int64: argmax of `predict`'s probabilities."""
    scores, _ = predict_scores(model, images, out_size, flip, sliding_window, precision)
    return scores.argmax(1)
