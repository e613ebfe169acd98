"""Offline pseudo-label selectors (docs/method.md#the-initial-pseudo-labels): per-class
thresholds.

Every selector chooses the thresholds θ_c with which `label = prediction, or 255 where
score < θ_prediction` (`apply_thresholds`), through one interface, `Selector`, and is built from
its config by `SELECTORS[config.name]`:

- `IastSelector`: IAST's instance-adaptive thresholds
  (docs/method.md#iast-instance-adaptive-thresholds), updated group by group in a fixed
  order, the previous threshold always part of the percentile's set;
- `CbstSelector`: CBST's class-balanced thresholds over the whole set
  (docs/method.md#cbst-class-balanced-thresholds) in bounded memory, from a `LevelHistogram`:
  per-class counts of the stored confidence levels (0..255), the threshold read exactly at rank
  ⌊p·N_c⌋ from the top;
- `FixedSelector`: one confidence threshold for every class.

Inputs are numpy arrays or tensors of one group of images; nothing here reads files.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import torch

from stages.config import CbstSelectorConfig, FixedSelectorConfig, IastSelectorConfig
from stages.data.classes import IGNORE_INDEX
from stages.method.pseudo_labels import class_percentile_thresholds
from stages.store.levels import LEVELS

# docs/method.md#iast-instance-adaptive-thresholds: a threshold that reaches 1 is set back to 0.999.
IAST_CAP = 0.999


def _as_tensor(value: np.ndarray | torch.Tensor) -> torch.Tensor:
    return value if isinstance(value, torch.Tensor) else torch.from_numpy(np.asarray(value))


Total = Callable[[np.ndarray], np.ndarray]  # an array summed over every process


class Selector(ABC):
    """One way of choosing the class thresholds θ (C,) float64, in generate-pseudo's two passes
    (docs/method.md#the-initial-pseudo-labels):

    1. Inference. `score` declares the per-pixel score the first pass keeps for the selection: by
       default the confidence level, which the store keeps anyway; a selector with a score of
       its own returns (B, H, W) uint8 levels from the probabilities. A selector that is not
       `ordered` then `observe`s each batch of this process's images (their scores and
       predictions, in any order) and accumulates what it needs: CBST its level histogram,
       the fixed selector nothing.
    2. Selection. Not `ordered`: `combine` sums what every process accumulated (the result
       must not depend on the order images were seen in), and `thresholds()` is the θ of the
       whole split. `ordered` (IAST): nothing is accumulated during inference; one process
       walks the kept first pass in index order and `observe`s it `group_size` images at a
       time, the θ after each group (`thresholds()`) labelling that group. Under torchrun that
       walk reads the other processes' images from the store, which keeps the confidence
       levels only, so an ordered selector scores by the confidence level.
    """

    title: ClassVar[str]  # as progress reports name it
    ordered: ClassVar[bool] = False
    # Images per observation of an ordered selector's walk; one set of θ otherwise.
    group_size: int = 0

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.ordered and cls.score is not Selector.score:
            raise TypeError(f"{cls.__name__} is ordered: its walk reads the stored confidence "
                            "levels, so it cannot declare a score of its own")

    def score(self, probabilities: torch.Tensor) -> np.ndarray | None:
        """The per-pixel score (B, H, W) uint8 levels the first pass keeps for the selection,
        from the probabilities (B, C, H, W); None: the confidence level."""
        return None

    def observe(self, scores: np.ndarray, prediction: np.ndarray) -> None:
        """Account for some images: scores (..., H, W) uint8 levels, prediction same shape."""

    def combine(self, total: Total) -> None:
        """Replace what this process accumulated by the sum over every process."""

    @abstractmethod
    def thresholds(self) -> np.ndarray:
        """θ (C,) float64: of the whole split, or after the last group an ordered walk
        observed."""


class IastSelector(Selector):
    """IAST instance-adaptive selector (docs/method.md#iast-instance-adaptive-thresholds).

    State: θ ∈ R^C, initialised to θ0, carried across groups. For each group (call `update`
    with the group's confidences and predictions, in a fixed order):
    S_c = {θ_c} ∪ {conf(u): pred(u) = c}; Ψ_c = percentile(S_c, 100·(1 − α·θ_c^γ)) with numpy's
    linear interpolation; θ_c ← β·θ_c + (1 − β)·Ψ_c; θ_c ≥ 1 → 0.999. The group's labels are
    then assigned with the updated θ (its own statistics count before its labels).
    """

    title = "IAST"
    ordered = True

    def __init__(self, num_classes: int, alpha: float, beta: float = 0.9, gamma: float = 8.0,
                 theta0: float = 0.9, group_size: int = 1) -> None:
        self.num_classes = num_classes
        self.alpha = alpha
        self.beta = beta
        self.gamma = gamma
        self.group_size = group_size
        self.theta = np.full(num_classes, theta0, dtype=np.float64)

    @classmethod
    def from_config(cls, config: IastSelectorConfig, num_classes: int) -> IastSelector:
        return cls(num_classes, config.alpha, config.beta, config.gamma, config.theta0,
                   config.group_size)

    def update(self, confidence: np.ndarray | torch.Tensor,
               prediction: np.ndarray | torch.Tensor) -> np.ndarray:
        """Update θ with one group: confidence (..., H, W) float, prediction same shape, ints.

        Returns a copy of the updated θ, (C,) float64.
        """
        confidence = _as_tensor(confidence).reshape(-1).float()
        prediction = _as_tensor(prediction).reshape(-1).long()
        theta = torch.from_numpy(self.theta)
        # S_c includes θ_c: append one pixel per class holding the previous threshold.
        values = torch.cat([confidence, theta.float().to(confidence.device)])
        classes = torch.cat([prediction, torch.arange(self.num_classes,
                                                      device=prediction.device)])
        q = 100.0 * (1.0 - self.alpha * theta ** self.gamma)
        psi = class_percentile_thresholds(values, classes, self.num_classes,
                                          q.clamp(0.0, 100.0)).double().cpu()
        updated = self.beta * theta + (1.0 - self.beta) * psi
        updated[updated >= 1.0] = IAST_CAP
        self.theta = updated.numpy()
        return self.theta.copy()


    def observe(self, scores: np.ndarray, prediction: np.ndarray) -> None:
        # IAST's percentiles are over confidences: the stored levels read back as level / 255.
        self.update(np.asarray(scores).astype(np.float32) / np.float32(LEVELS), prediction)

    def thresholds(self) -> np.ndarray:
        return self.theta.copy()


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


class CbstSelector(Selector):
    """CBST (docs/method.md#cbst-class-balanced-thresholds): each class keeps its `portion`
    most confident pixels of the whole split, read from the per-class level histogram that the
    processes accumulate and sum."""

    title = "CBST"

    def __init__(self, num_classes: int, portion: float) -> None:
        self.portion = portion
        self.histogram = LevelHistogram(num_classes)

    @classmethod
    def from_config(cls, config: CbstSelectorConfig, num_classes: int) -> CbstSelector:
        return cls(num_classes, config.portion)

    def observe(self, scores: np.ndarray, prediction: np.ndarray) -> None:
        self.histogram.add(scores, prediction)

    def combine(self, total: Total) -> None:
        self.histogram.counts = total(self.histogram.counts)

    def thresholds(self) -> np.ndarray:
        return self.histogram.thresholds(self.portion)


class FixedSelector(Selector):
    """One confidence threshold for every class; nothing to observe."""

    title = "fixed"

    def __init__(self, num_classes: int, threshold: float) -> None:
        self.theta = np.full(num_classes, threshold, dtype=np.float64)

    @classmethod
    def from_config(cls, config: FixedSelectorConfig, num_classes: int) -> FixedSelector:
        return cls(num_classes, config.threshold)

    def thresholds(self) -> np.ndarray:
        return self.theta.copy()


# The selector of each `generate_pseudo.selector.name`: builder(config, number of classes). The
# config's union admits no other name, and tests/test_selectors.py checks that every variant
# of it has an entry here.
SELECTORS: dict[str, Callable[[Any, int], Selector]] = {
    "iast": IastSelector.from_config,
    "cbst": CbstSelector.from_config,
    "fixed": FixedSelector.from_config,
}


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
