"""The stored confidence: a level q in 0..255 stands for q / 255
(docs/method.md#the-initial-pseudo-labels). Every selection threshold is computed on and applied
to these levels, by the store's readers and writers alike; predict's confidence PNGs use the same
quantiser."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

LEVELS = 255


def quantize(confidence: np.ndarray | torch.Tensor) -> np.ndarray:
    """Confidences in [0, 1] -> uint8 levels round(255 × p) (predict's confidence PNGs too)."""
    if isinstance(confidence, torch.Tensor):
        confidence = confidence.detach().cpu().numpy()
    values = np.clip(np.asarray(confidence, np.float32), 0, 1)
    return np.rint(values * np.float32(LEVELS)).astype(np.uint8)


def threshold_levels(thresholds: Sequence[float] | np.ndarray) -> np.ndarray:
    """(C,) float thresholds -> (C,) the lowest level whose value reaches each: a level q is
    kept by θ exactly when q / 255 ≥ θ (a threshold that is itself a level keeps that level)."""
    return np.ceil(np.asarray(thresholds, np.float64) * LEVELS - 1e-6).clip(0, LEVELS + 1
                                                                           ).astype(np.int64)
