"""The offline update of a batch of stored labels (docs/method.md#the-offline-update): the
thresholds τ^β over the batch, the four-case merge with the stored labels, written back; and the
kept / added / dropped counts it accumulates. The self-train loop and the update-offline stage
both call `offline_update`, each with its section's `OfflineRuleConfig`.

`CHANGES` is the one list of the update's outcome categories: the report and the command line
read it (the report's figures receive it from the report stage, as figures does not import the
method). Counts written before a category existed load with zeros for it (`complete_changes`):
a category that did not exist counted nothing."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from stages.artifacts.checkpoint import TRAIN_STATE_FILE
from stages.config.models import OfflineRuleConfig
from stages.method.pseudo_labels import (
    confidence_and_prediction,
    merge_offline,
    offline_thresholds_of,
)
from stages.runtime.distributed import Ranks
from stages.runtime.errors import DudaError
from stages.store.pseudo_store import PseudoLabelStore
from stages.store.writer import StoreWriter

# The offline update's outcome per labelled pixel (docs/method.md#the-four-case-merge), in the
# order tables and summaries show them.
CHANGES = ("kept", "added", "dropped")


def complete_changes(counts: Any, zero: Any, where: str) -> dict[str, Any]:
    """Change counts (a summary's totals, a store's or saved state's per-class lists) with
    every category of `CHANGES`, in that order: one missing (counts written before it existed)
    is `zero`, as it counted nothing. A category this version does not know is kept after them,
    so nothing is hidden. Counts that are not a mapping are a DudaError naming `where`."""
    if not isinstance(counts, Mapping):
        raise DudaError(f"{where} records its offline change counts as {type(counts).__name__}, "
                        f"not as counts per category ({', '.join(CHANGES)})",
                        "rebuild it with --force")
    return {**{key: counts.get(key, zero) for key in CHANGES}, **counts}


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
        """Restore saved counts; a category the saved run did not have yet starts at zero."""
        num_classes = len(next(iter(self.counts.values())))
        where = f"the saved training state ({TRAIN_STATE_FILE})"
        state = complete_changes(state, [0] * num_classes, where)
        unknown = [key for key in state if key not in CHANGES]
        if unknown:
            raise DudaError(f"{where} counts offline changes this version of duda does not "
                            f"know ({', '.join(map(str, unknown))}): a newer version wrote it",
                            "resume it with the version of duda that wrote it, or start over "
                            "with --force")
        counts = {key: np.asarray(state[key], np.int64) for key in CHANGES}
        wrong = [key for key, value in counts.items() if value.shape != (num_classes,)]
        if wrong:
            raise DudaError(f"{where} counts offline changes ({', '.join(wrong)}) for another "
                            f"number of classes than the run's {num_classes}",
                            "start over with --force")
        self.counts = counts


@dataclass
class UpdatedBatch:
    """What one offline update did: the change counts per class, and the labels before and
    after, (B, H, W) uint8 each."""

    changes: dict[str, np.ndarray]
    stored: np.ndarray
    merged: np.ndarray


@torch.no_grad()
def offline_update(store: PseudoLabelStore | StoreWriter, indices: list[int],
                   probabilities: torch.Tensor, beta: float, rule: OfflineRuleConfig,
                   parent: PseudoLabelStore | None = None) -> UpdatedBatch:
    """The offline update of a batch of store images (docs/method.md, the offline update): the
    thresholds τ^β over the batch's images jointly (capped at `rule.cap`), the four-case merge
    of the new prediction with the stored labels (`rule.agree_requires_confidence`), written
    back to `store`. Both the self-train loop and the update-offline stage call this, each with
    its section's `offline_rule`. The stored labels are read from `parent` when given (a new
    version that does not copy its parent's images, as every image is rewritten).

    probabilities: (B, C, H, W) float softmax of images `indices` (resized to the store's size
    if they differ). Returns the pixel counts per class of each category of `CHANGES`, (C,)
    int64 each, and the labels before and after.
    """
    size = (store.height, store.width)
    if tuple(probabilities.shape[-2:]) != size:
        probabilities = F.interpolate(probabilities, size=size, mode="bilinear",
                                      align_corners=True)
    confidence, prediction = confidence_and_prediction(probabilities)
    thresholds = offline_thresholds_of(confidence, prediction, probabilities.shape[1], beta,
                                        rule.cap)
    source = store if parent is None else parent
    stored = torch.stack([torch.from_numpy(source.read_labels(i)) for i in indices])
    merged, changes = merge_offline(stored.to(prediction.device), prediction, confidence,
                                    thresholds, rule.agree_requires_confidence)
    merged, confidence = merged.cpu().numpy(), confidence.clamp(0, 1).cpu().numpy()
    for b, i in enumerate(indices):
        store.write(i, merged[b], confidence[b])
    return UpdatedBatch({key: changes[key].cpu().numpy() for key in CHANGES},
                        stored.numpy(), merged.astype(np.uint8, copy=False))
