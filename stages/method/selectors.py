"""Offline pseudo-label selectors (docs/method.md#the-initial-pseudo-labels): per-class confidence
thresholds.

Three ways to choose the thresholds θ_c with which `label = prediction, or 255 where
confidence < θ_prediction` (`apply_thresholds`):

- `IastSelector`: IAST's instance-adaptive thresholds
  (docs/method.md#iast-instance-adaptive-thresholds), updated group by group in a fixed
  order, the previous threshold always part of the percentile's set;
- `LevelHistogram`: CBST's class-balanced thresholds over the whole set
  (docs/method.md#cbst-class-balanced-thresholds) in bounded memory: per-class counts of the
  stored confidence levels (0..255), the threshold read exactly at rank ⌊p·N_c⌋ from the top;
- `fixed_thresholds`: one confidence threshold for every class.

Inputs are numpy arrays or tensors of one group of images; nothing here reads files.
"""

from __future__ import annotations

import numpy as np
import torch

from stages.data.classes import IGNORE_INDEX
from stages.method.pseudo_labels import class_percentile_thresholds

# docs/method.md#iast-instance-adaptive-thresholds: a threshold that reaches 1 is set back to 0.999.
IAST_CAP = 0.999


def _as_tensor(value: np.ndarray | torch.Tensor) -> torch.Tensor:
    return value if isinstance(value, torch.Tensor) else torch.from_numpy(np.asarray(value))


class IastSelector:
    """IAST instance-adaptive selector (docs/method.md#iast-instance-adaptive-thresholds).

    State: θ ∈ R^C, initialised to θ0, carried across groups. For each group (call `update`
    with the group's confidences and predictions, in a fixed order):
    S_c = {θ_c} ∪ {conf(u): pred(u) = c}; Ψ_c = percentile(S_c, 100·(1 − α·θ_c^γ)) with numpy's
    linear interpolation; θ_c ← β·θ_c + (1 − β)·Ψ_c; θ_c ≥ 1 → 0.999. The group's labels are
    then assigned with the updated θ (its own statistics count before its labels).
    """

    def __init__(self, num_classes: int, alpha: float, beta: float = 0.9, gamma: float = 8.0,
                 theta0: float = 0.9) -> None:
        self.num_classes = num_classes
        self.alpha = alpha
        self.beta = beta
        self.gamma = gamma
        self.thresholds = np.full(num_classes, theta0, dtype=np.float64)

    def update(self, confidence: np.ndarray | torch.Tensor,
               prediction: np.ndarray | torch.Tensor) -> np.ndarray:
        """Update θ with one group: confidence (..., H, W) float, prediction same shape, ints.

        Returns a copy of the updated θ, (C,) float64.
        """
        confidence = _as_tensor(confidence).reshape(-1).float()
        prediction = _as_tensor(prediction).reshape(-1).long()
        theta = torch.from_numpy(self.thresholds)
        # S_c includes θ_c: append one pixel per class holding the previous threshold.
        values = torch.cat([confidence, theta.float().to(confidence.device)])
        classes = torch.cat([prediction, torch.arange(self.num_classes,
                                                      device=prediction.device)])
        q = 100.0 * (1.0 - self.alpha * theta ** self.gamma)
        psi = class_percentile_thresholds(values, classes, self.num_classes,
                                          q.clamp(0.0, 100.0)).double().cpu()
        updated = self.beta * theta + (1.0 - self.beta) * psi
        updated[updated >= 1.0] = IAST_CAP
        self.thresholds = updated.numpy()
        return self.thresholds.copy()


class LevelHistogram:
    """Per-class counts of the stored confidence levels (0..255) for CBST
    (docs/method.md#cbst-class-balanced-thresholds): the whole split's order statistics, exact.

    `counts` (C, 256) int64 can be summed across processes (the result does not depend on the
    order images were added in). Memory is 256·C integers, whatever the number of pixels.
    """

    def __init__(self, num_classes: int, levels: int = 255) -> None:
        self.num_classes = num_classes
        self.levels = levels
        self.counts = np.zeros((num_classes, levels + 1), dtype=np.int64)

    def add(self, levels: np.ndarray | torch.Tensor, prediction: np.ndarray | torch.Tensor) -> None:
        """Count the pixels of levels (..., H, W) uint8 in 0..levels, prediction ints."""
        levels = _as_tensor(levels).reshape(-1).long()
        prediction = _as_tensor(prediction).reshape(-1).long()
        valid = (prediction >= 0) & (prediction < self.num_classes)
        keys = prediction[valid] * (self.levels + 1) + levels[valid]
        counts = torch.bincount(keys, minlength=self.num_classes * (self.levels + 1))
        self.counts += counts.cpu().numpy().reshape(self.num_classes, self.levels + 1)

    def thresholds(self, portion: float, absent_value: float = 0.0) -> np.ndarray:
        """(C,) float64: per class, the confidence at rank ⌊p·N_c⌋ from the top (0-based) of
        its pixels, a stored level / 255. A class with no pixel gets `absent_value`.

        Every pixel at that level is kept, so a class keeps at least its portion (ties at the
        threshold level included)."""
        if not 0.0 < portion <= 1.0:
            raise ValueError(f"portion {portion} is outside (0, 1]")
        result = np.full(self.num_classes, absent_value, dtype=np.float64)
        for c in range(self.num_classes):
            total = int(self.counts[c].sum())
            if total == 0:
                continue
            rank = min(int(np.floor(portion * total)), total - 1)
            from_top = np.cumsum(self.counts[c][::-1])  # pixels at or above each level, top down
            level = self.levels - int(np.searchsorted(from_top, rank, side="right"))
            result[c] = level / self.levels
        return result


def fixed_thresholds(num_classes: int, threshold: float) -> np.ndarray:
    """(C,) float64, every class the same threshold."""
    return np.full(num_classes, threshold, dtype=np.float64)


def apply_thresholds(prediction: np.ndarray, confidence: np.ndarray, thresholds: np.ndarray,
                     ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """label = prediction, or `ignore_index` where confidence < θ_prediction.

    prediction: (H, W) ints in 0..C−1 (or already `ignore_index`); confidence: (H, W) float;
    thresholds: (C,). Returns (H, W) uint8.
    """
    prediction = np.asarray(prediction)
    thresholds = np.asarray(thresholds)
    # A lookup table of every label value's threshold: `ignore_index` (and any other value that
    # is no class) is never kept. Integer levels compare as integers, anything else as float64.
    integral = np.issubdtype(thresholds.dtype, np.integer)
    limits = np.full(max(256, len(thresholds) + 1, ignore_index + 1),
                     np.iinfo(np.int32).max if integral else np.inf,
                     np.int32 if integral else np.float64)
    limits[:len(thresholds)] = thresholds
    limits[ignore_index] = limits[-1]
    keep = np.asarray(confidence) >= limits[prediction]
    return np.where(keep, prediction, ignore_index).astype(np.uint8)
