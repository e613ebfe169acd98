"""The offline update of a batch of stored labels (docs/method.md#the-offline-update): the
thresholds τ^β over the batch, the four-case merge with the stored labels, written back; and the
kept / added / dropped counts it accumulates. The self-train loop and the update-offline stage
both call `offline_update`."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from stages.method.pseudo_labels import (
    confidence_and_prediction,
    merge_offline,
    offline_thresholds_of,
)
from stages.runtime.distributed import Ranks
from stages.store.pseudo_store import PseudoLabelStore
from stages.store.writer import StoreWriter

CHANGES = ("kept", "added", "dropped")


class OfflineChanges:
    """The pixels the offline update kept, added and dropped, per class, so far."""

    def __init__(self, num_classes: int) -> None:
        self.counts = {key: np.zeros(num_classes, np.int64) for key in CHANGES}

    def add(self, counts: dict[str, np.ndarray], ranks: Ranks | None = None,
            ) -> dict[str, np.ndarray]:
        """Add counts (summed over `ranks` first: a collective); returns what was added."""
        summed = np.stack([counts[key] for key in CHANGES]).astype(np.int64)
        if ranks is not None:
            summed = ranks.sum(summed)
        step = {key: summed[k] for k, key in enumerate(CHANGES)}
        for key in CHANGES:
            self.counts[key] += step[key]
        return step

    def per_class(self) -> dict[str, list[int]]:
        return {key: value.tolist() for key, value in self.counts.items()}

    def totals(self) -> dict[str, int]:
        return {key: int(value.sum()) for key, value in self.counts.items()}

    def state_dict(self) -> dict[str, list[int]]:
        return self.per_class()

    def load_state_dict(self, state: dict[str, list[int]]) -> None:
        self.counts = {key: np.asarray(state[key], np.int64) for key in CHANGES}


@dataclass
class UpdatedBatch:
    """What one offline update did: the change counts per class, and the labels before and
    after, (B, H, W) uint8 each."""

    changes: dict[str, np.ndarray]
    stored: np.ndarray
    merged: np.ndarray


@torch.no_grad()
def offline_update(store: PseudoLabelStore | StoreWriter, indices: list[int],
                   probabilities: torch.Tensor, beta: float, cap: float,
                   agree_requires_confidence: bool,
                   parent: PseudoLabelStore | None = None) -> UpdatedBatch:
    """The offline update of a batch of store images (docs/method.md, the offline update): the
    thresholds τ^β over the batch's images jointly (capped), the four-case merge of the new
    prediction with the stored labels, written back to `store`. Both the self-train loop and
    the update-offline stage call this. The stored labels are read from `parent` when given
    (a new version that does not copy its parent's images, as every image is rewritten).

    probabilities: (B, C, H, W) float softmax of images `indices` (resized to the store's size
    if they differ). Returns the kept/added/dropped pixel counts per class, (C,) int64 each,
    and the labels before and after.
    """
    size = (store.height, store.width)
    if tuple(probabilities.shape[-2:]) != size:
        probabilities = F.interpolate(probabilities, size=size, mode="bilinear",
                                      align_corners=True)
    confidence, prediction = confidence_and_prediction(probabilities)
    thresholds = offline_thresholds_of(confidence, prediction, probabilities.shape[1], beta, cap)
    source = store if parent is None else parent
    stored = torch.stack([torch.from_numpy(source.read_labels(i)) for i in indices])
    merged, changes = merge_offline(stored.to(prediction.device), prediction, confidence,
                                    thresholds, agree_requires_confidence)
    merged, confidence = merged.cpu().numpy(), confidence.clamp(0, 1).cpu().numpy()
    for b, i in enumerate(indices):
        store.write(i, merged[b], confidence[b])
    return UpdatedBatch({key: changes[key].cpu().numpy() for key in CHANGES},
                        stored.numpy(), merged.astype(np.uint8, copy=False))
