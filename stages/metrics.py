"""Segmentation metrics: the dataset-level confusion matrix, IoU per class, mIoU per protocol.

ALGORITHM.md F.1: intersections and unions are summed over the whole split (not averaged per
image); pixels whose ground truth is 255 are ignored; IoU_c = I_c / (U_c + 1e-10); a protocol's
mIoU is the plain mean of IoU over its classes (F.2: 16 and 13 are subsets of the 19-class
vector, so predictions of the left-out classes still count as misses).

A class absent from both the predictions and the ground truth gets IoU 0 and still counts in
the mean, as in the reference formula; `present()` says which classes occur in the ground truth
so reports can flag them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from stages.classes import IGNORE_INDEX

EPSILON = 1e-10


class ConfusionMatrix:
    """Accumulates `matrix[gt, pred]` pixel counts (int64) on the device of the first update."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, prediction: torch.Tensor, target: torch.Tensor) -> None:
        """prediction, target: integer tensors of one shape, e.g. (B, H, W); target 255 = ignore.

        Target values outside 0..C-1 other than the ignore index are ignored too (the
        reference's histogram over bins 0..C-1 drops them)."""
        if prediction.shape != target.shape:
            raise ValueError(f"prediction {tuple(prediction.shape)} and target "
                             f"{tuple(target.shape)} differ in shape")
        if self.matrix.device != target.device:
            self.matrix = self.matrix.to(target.device)
        target = target.reshape(-1).long()
        prediction = prediction.reshape(-1).long().to(target.device)
        keep = (target >= 0) & (target < self.num_classes) & (target != self.ignore_index)
        keep &= (prediction >= 0) & (prediction < self.num_classes)
        n = self.num_classes
        counts = torch.bincount(target[keep] * n + prediction[keep], minlength=n * n)
        self.matrix += counts.view(n, n)

    def merge(self, other: ConfusionMatrix) -> None:
        self.matrix += other.matrix.to(self.matrix.device)

    def intersection_union(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(I, U) per class, float64 on the CPU."""
        matrix = self.matrix.double().cpu()
        intersection = matrix.diagonal()
        union = matrix.sum(0) + matrix.sum(1) - intersection
        return intersection, union

    def iou(self) -> torch.Tensor:
        """(C,) float64: I_c / (U_c + 1e-10)."""
        intersection, union = self.intersection_union()
        return intersection / (union + EPSILON)

    def present(self) -> torch.Tensor:
        """(C,) bool: classes with at least one ground-truth pixel."""
        return self.matrix.sum(1).cpu() > 0

    def miou(self, protocol: Sequence[int] | None = None) -> float:
        """The mean IoU over the class ids in `protocol` (all classes if None)."""
        iou = self.iou()
        indices = list(range(self.num_classes)) if protocol is None else list(protocol)
        return float(iou[indices].mean()) if indices else 0.0

    def miou_by_protocol(self, protocols: Mapping[int, Sequence[int]]) -> dict[str, float]:
        """{"19": mIoU-19, "16": …} for every protocol of a class table, in its order."""
        return {str(name): self.miou(classes) for name, classes in protocols.items()}

    def pixel_accuracy(self) -> float:
        total = int(self.matrix.sum())
        return float(self.matrix.diagonal().sum()) / total if total else 0.0
