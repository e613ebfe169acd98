"""Segmentation metrics: the dataset-level confusion matrix, IoU per class, mIoU per protocol, and
the diagnostics of pseudo labels against ground truth (precision, recall, coverage per class).

docs/method.md#evaluation: intersections and unions are summed over the whole split (not averaged
per image); pixels whose ground truth is 255 are ignored; IoU_c = I_c / (U_c + 1e-10); a protocol's
mIoU is the plain mean of IoU over its classes (docs/method.md#evaluation: 16 and 13 are subsets of
the 19-class vector, so predictions of the left-out classes still count as misses).

A class absent from both the predictions and the ground truth gets IoU 0 and still counts in
the mean, as in the reference formula; `present()` says which classes occur in the ground truth
so reports can flag them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from stages.data.classes import IGNORE_INDEX
from stages.data.io import read_label
from stages.runtime.progress import Reporter

if TYPE_CHECKING:
    from stages.data.index import DatasetIndex
    from stages.runtime.distributed import Ranks
    from stages.store.pseudo_store import PseudoLabelStore

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


def statistics_from_counts(kept: Sequence[int] | np.ndarray, pixels: int) -> dict[str, Any]:
    """The per-class statistics dict from kept-pixel counts per class and the pixel total."""
    kept = [int(value) for value in kept]
    labelled = sum(kept)
    return {
        "pixels": int(pixels),
        "labelled_pixels": labelled,
        "labelled_fraction": labelled / pixels if pixels else 0.0,
        "kept_pixels": kept,
        "coverage": [value / pixels if pixels else 0.0 for value in kept],
    }


def label_statistics(store: PseudoLabelStore) -> dict[str, Any]:
    """Per-class pixel counts of a store's labels, one image at a time (bounded memory).

    Returns {"pixels": total pixels, "labelled_pixels": n, "kept_pixels": [C counts],
    "labelled_fraction": n / pixels, "coverage": [C fractions of all pixels]}.
    """
    counts = np.zeros(store.num_classes + 1, np.int64)
    for i in range(len(store)):
        labels = store.read_labels(i).reshape(-1)
        counts += np.bincount(np.minimum(labels, store.num_classes),
                              minlength=store.num_classes + 1)
    return statistics_from_counts(counts[:-1], len(store) * store.height * store.width)


# ------------------------------------------------ pseudo labels against ground truth (diagnostics)

DIAGNOSTICS_NOTE = ("computed against the target-train ground truth for inspection only; the "
                    "ground truth is never used for training")


def confusion_counts(labels: np.ndarray, truth: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, C + 1) int64 counts of ground truth × pseudo label; the last column: ignored.

    labels: (H, W) pseudo labels (255 = ignore), or a stack (B, H, W); truth: ground truth of the
    same shape, or for one (H, W) image of any size (resized by nearest neighbour to the labels'),
    pixels with ground truth 255 are left out.
    """
    if truth.shape != labels.shape:
        truth = np.asarray(Image.fromarray(truth).resize((labels.shape[1], labels.shape[0]),
                                                         Image.Resampling.NEAREST))
    # One key per pixel; a ground truth outside the classes lands past the (C, C + 1) block.
    keys = (truth.astype(np.intp) * (num_classes + 1)
            + np.minimum(labels, num_classes).astype(np.intp))
    counts = np.bincount(keys.ravel(), minlength=num_classes * (num_classes + 1))
    return counts[:num_classes * (num_classes + 1)].reshape(num_classes, num_classes + 1)


def diagnostics(confusion: np.ndarray, class_names: Sequence[str], images: int,
                ) -> dict[str, Any]:
    """Per-class precision, recall and coverage of pseudo labels against ground truth.

    confusion: (C, C + 1) from `confusion_counts`, summed over images.
    precision_c: of the pixels labelled c (where ground truth exists), the share that are c;
    recall_c: of the ground-truth-c pixels, the share labelled c; coverage_c: of the
    ground-truth-c pixels, the share that received any label. None where undefined.
    """
    num_classes = len(class_names)
    labelled = confusion[:, :num_classes]
    correct = np.diag(labelled)
    per_class = {}
    for c, name in enumerate(class_names):
        labelled_as_c = int(labelled[:, c].sum())
        truth_c = int(confusion[c].sum())
        per_class[name] = {
            "precision": float(correct[c] / labelled_as_c) if labelled_as_c else None,
            "recall": float(correct[c] / truth_c) if truth_c else None,
            "coverage": float(1.0 - confusion[c, num_classes] / truth_c) if truth_c else None,
        }
    total_labelled = int(labelled.sum())
    total = int(confusion.sum())
    return {
        "note": DIAGNOSTICS_NOTE,
        "images": images,
        "accuracy": float(correct.sum() / total_labelled) if total_labelled else None,
        "coverage": float(total_labelled / total) if total else None,
        "per_class": per_class,
    }


def truth_paths(ids: Sequence[str], index: DatasetIndex) -> list[Path | None]:
    """The target-train ground-truth file of each image id (None where the index has none)."""
    samples = {sample.id: sample for sample in index.samples("target", "train")}
    return [getattr(samples.get(sample_id), "label", None) for sample_id in ids]


def quality(store: PseudoLabelStore, index: DatasetIndex, reporter: Reporter | None = None,
            ) -> dict[str, Any] | None:
    """`diagnostics` of the store against the ground truth of the index's target-train
    images that have one (matched by id); None if none has."""
    confusion = np.zeros((store.num_classes, store.num_classes + 1), np.int64)
    images = 0
    reporter = reporter or Reporter()
    with reporter.task("pseudo labels: quality", total=len(store)) as task:
        for i, truth in enumerate(truth_paths(store.ids, index)):
            if truth is not None:
                confusion += confusion_counts(store.read_labels(i), read_label(truth),
                                              store.num_classes)
                images += 1
            task.advance(1)
    return diagnostics(confusion, store.class_names, images) if images else None


class LabelQuality:
    """How good the labels a training run trained on were: ground truth × label counts of each
    kind of label (online, offline) over the crops of the steps since the last log step.

    The ground truth is read here, from the index, and never reaches training; `truth` gives
    it for a step's images (None unless all of them have one) and `add` counts one kind's
    labels against it, crop by crop."""

    KINDS = ("online", "offline")

    def __init__(self, truths: list[Path | None], class_names: Sequence[str]) -> None:
        self.truths = truths
        self.class_names = list(class_names)
        self.counts = self._zeros()

    @classmethod
    def of(cls, store: PseudoLabelStore, index: DatasetIndex) -> LabelQuality | None:
        """For a store's images; None if none of them has ground truth."""
        truths = truth_paths(store.ids, index)
        return cls(truths, store.class_names) if any(truths) else None

    def _zeros(self) -> dict[str, np.ndarray]:
        size = len(self.class_names)
        return {kind: np.zeros((size, size + 1), np.int64) for kind in self.KINDS}

    def truth(self, indices: Sequence[int]) -> list[np.ndarray] | None:
        paths = [self.truths[i] for i in indices]
        if any(path is None for path in paths):
            return None
        return [read_label(path) for path in paths]

    def add(self, kind: str, labels: torch.Tensor, truth: torch.Tensor) -> None:
        """labels, truth: (B, h, w) crops of one step (255 = no label / no ground truth)."""
        self.counts[kind] += confusion_counts(labels.cpu().numpy().astype(np.uint8),
                                              truth.numpy().astype(np.uint8),
                                              len(self.class_names))

    def record(self, ranks: Ranks | None = None) -> dict[str, Any]:
        """`<kind>/label_accuracy`, `<kind>/label_coverage` and per class `<kind>/class_accuracy`
        (precision) and `<kind>/class_coverage` (share of the class's pixels labelled), over every
        rank's crops since the last call (a collective under torchrun); then starts over."""
        record: dict[str, Any] = {}
        for kind, counts in self.counts.items():
            counts = ranks.sum(counts) if ranks is not None else counts
            if not counts.any():
                continue
            found = diagnostics(counts, self.class_names, images=0)
            record[f"{kind}/label_accuracy"] = found["accuracy"]
            record[f"{kind}/label_coverage"] = found["coverage"]
            per_class = found["per_class"].values()
            record[f"{kind}/class_accuracy"] = [c["precision"] for c in per_class]
            record[f"{kind}/class_coverage"] = [c["coverage"] for c in per_class]
        self.counts = self._zeros()
        return record
