"""Whole images for inference: evaluation, pseudo-label generation, the offline update.

`FullImageDataset` serves each sample's image resized to the inference size (PIL Lanczos, as the
training base size, docs/method.md#data-and-augmentation) and normalised, with its trainId label map
kept at the label's native size, so metrics are computed at the ground truth's resolution
(docs/method.md#evaluation).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from stages.data.crops import resize_image
from stages.data.index import Sample
from stages.data.io import read_image
from stages.data.transforms import Normalization, normalize
from stages.runtime.errors import DudaError


class FullImageDataset(Dataset):
    """Items are dicts:

    - index: int, the sample's position in `samples`;
    - image: (3, size[0], size[1]) float32, normalised;
    - label (only if `with_labels`): (H_label, W_label) int64 trainIds at native size, 255 = ignore.

    With `with_labels`, every sample must have a label; a split without one is a DudaError.
    """

    def __init__(self, samples: Sequence[Sample], size: Sequence[int],
                 normalization: Normalization, with_labels: bool = False) -> None:
        self.samples = list(samples)
        self.size = (int(size[0]), int(size[1]))
        self.normalization = normalization
        self.with_labels = with_labels
        if with_labels:
            unlabelled = [sample.id for sample in self.samples if sample.label is None]
            if unlabelled:
                raise DudaError(f"{len(unlabelled)} of {len(self.samples)} images have no "
                                f"ground-truth label (first: {unlabelled[0]})",
                                "evaluate a split with labels (evaluate.domain / "
                                "evaluate.split)")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.samples[index]
        image = resize_image(read_image(sample.image), self.size)
        item: dict[str, Any] = {"index": index, "image": normalize(image, self.normalization)}
        if self.with_labels:
            label = sample.read_label()
            item["label"] = torch.from_numpy(label.astype(np.int64))
        return item


def collate_full_images(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack images (B, 3, H, W); labels stay a list (native sizes may differ per image)."""
    batch: dict[str, Any] = {
        "index": torch.tensor([item["index"] for item in items], dtype=torch.int64),
        "image": torch.stack([item["image"] for item in items]),
    }
    if "label" in items[0]:
        batch["label"] = [item["label"] for item in items]
    return batch
