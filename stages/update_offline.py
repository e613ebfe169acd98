"""The `update-offline` stage: a whole-set pass of the DUDA offline update.

The stage runs the method's offline update (`stages.method.offline.offline_update`, shared
with the self-train loop, under the same rule: `update_offline.offline_rule`) over every
target-train image: the teacher of a checkpoint predicts each one, and the four-case merge
combines the prediction with the stored labels, with τ^β computed jointly over each batch of
`update_offline.inference.batch_size` images as in the loop; the result is a new store version
whose manifest names its parent. The input store is never modified. Change statistics per class
(each category of `CHANGES`: kept, added, dropped) go into the summary and, where target-train
has ground truth, the store's quality before and after (diagnostics only).

Under `torchrun` the images are split across ranks, each writing its own chunks; the change
counts are summed across ranks and rank 0 writes the manifest.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stages.artifacts.checkpoint import check_compatible, load_checkpoint_manifest, load_model
from stages.artifacts.manifest import PSEUDO_LABELS, StageResult
from stages.artifacts.writer import ArtifactWriter
from stages.config import Config, stage_config, stage_hash
from stages.data.full_images import FullImageDataset
from stages.data.index import Sample, load_dataset_index
from stages.data.io import read_label
from stages.engine.inference import full_image_loader, predict, sliding_window
from stages.engine.metrics import confusion_counts, diagnostics, statistics_from_counts
from stages.method.offline import CHANGES, OfflineChanges, UpdatedBatch, offline_update
from stages.runtime.distributed import Ranks, process_group
from stages.runtime.progress import Reporter
from stages.store.pseudo_store import (
    STORE_METADATA,
    PseudoLabelStore,
    create_store,
    open_store,
    open_unfinished,
)
from stages.store.writer import StoreWriter


def run(config: Config, data: str | Path, checkpoint: str | Path, pseudo: str | Path,
        out: str | Path, *, force: bool = False, device: str = "auto",
        reporter: Reporter | None = None) -> StageResult:
    """Merge `checkpoint`'s predictions into the store `pseudo`; write the new version at
    `out`."""
    with process_group(device) as ranks:
        return _run(config, data, checkpoint, pseudo, out, force=force, ranks=ranks,
                    reporter=ranks.reporter(reporter))


def _run(config: Config, data: str | Path, checkpoint: str | Path, pseudo: str | Path,
         out: str | Path, *, force: bool, ranks: Ranks, reporter: Reporter) -> StageResult:
    torch_device = ranks.compute_device
    cfg = config.update_offline
    out = Path(out)
    index = load_dataset_index(data)
    checkpoint = Path(checkpoint)
    checkpoint_manifest = load_checkpoint_manifest(checkpoint)
    parent = open_store(pseudo, index)
    parent_ref = parent.manifest().ref(pseudo)
    inputs = {"data": index.ref, "checkpoint": checkpoint_manifest.ref(checkpoint),
              "parent": parent_ref}
    section = stage_config(config, "update_offline")
    with ArtifactWriter(out, kind=PSEUDO_LABELS, stage="update_offline", config=section,
                        config_hash=stage_hash(config, "update_offline"), inputs=inputs, force=force,
                        round=checkpoint_manifest.round, device=str(torch_device),
                        ranks=ranks) as writer:
        if writer.up_to_date:
            return writer.result()
        writer.require_store_space(len(parent), parent.height, parent.width)
        loaded = load_model(checkpoint, cfg.inference.model, torch_device)
        check_compatible(loaded, index.classes.names, what=f"dataset index {index.path}")
        # Every image is rewritten, so the new version starts empty (not a copy of its parent).
        ranks.on_main(lambda: create_store(
            writer.work, ids=parent.ids, height=parent.height, width=parent.width,
            class_names=parent.class_names, index_id=parent.index_id, palette=parent.palette,
            parent=parent_ref).path)
        store = open_unfinished(writer.work)  # rank 0 created it; every rank writes its images

        samples = index.samples("target", "train")
        mine = ranks.mine(len(samples), cfg.inference.batch_size)
        counts = _merge_pass(config, loaded.model, loaded.model_config.normalization,
                             [samples[i] for i in mine], mine, parent, store, torch_device,
                             reporter)
        counts.sum_over(ranks)  # once every rank's writes are done
        summary: dict[str, Any] = {}
        if ranks.is_main:
            store.set_thresholds(None)
            rule = cfg.offline_rule
            store.set_selector({"name": "duda_offline_update", "beta": cfg.beta,
                                "cap": rule.cap, "model": loaded.which,
                                "agree_requires_confidence": rule.agree_requires_confidence})
            statistics = statistics_from_counts(counts.kept, len(store) * store.height
                                                * store.width)
            store.set_statistics({**statistics, "changes": counts.changes.per_class()})
            store.check_complete()
            summary = _summary(index.classes.names, counts, statistics, loaded.which)
        writer.finish(summary, content=STORE_METADATA)
    return writer.result()


class PassCounts:
    """What a whole-set update counts as it goes: the changes, the labelled pixels per class
    after it, and (diagnostics only) the labels before and after against ground truth."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.changes = OfflineChanges(num_classes)
        self.kept = np.zeros(num_classes, np.int64)
        self.before = np.zeros((num_classes, num_classes + 1), np.int64)
        self.after = np.zeros_like(self.before)
        self.images_with_truth = 0

    def add(self, batch: UpdatedBatch, truths: list[Path | None]) -> None:
        self.changes.add(batch.changes)
        for stored, merged, truth in zip(batch.stored, batch.merged, truths, strict=True):
            self.kept += np.bincount(merged.ravel(), minlength=256)[:self.num_classes]
            if truth is not None:
                ground_truth = read_label(truth)
                self.before += confusion_counts(stored, ground_truth, self.num_classes)
                self.after += confusion_counts(merged, ground_truth, self.num_classes)
                self.images_with_truth += 1

    def sum_over(self, ranks: Ranks) -> None:
        """Every rank's counts summed (a collective)."""
        summed = OfflineChanges(self.num_classes)
        summed.add(self.changes.counts, ranks)
        self.changes = summed
        self.kept = ranks.sum(self.kept)
        self.before, self.after = ranks.sum(self.before), ranks.sum(self.after)
        self.images_with_truth = int(ranks.sum(np.array([self.images_with_truth]))[0])


@torch.no_grad()
def _merge_pass(config: Config, model: torch.nn.Module, normalization: str,
                samples: list[Sample], positions: list[int], parent: PseudoLabelStore,
                store: PseudoLabelStore, device: torch.device, reporter: Reporter) -> PassCounts:
    """Predict every image of this rank and apply the offline update to its labels in
    `parent`, batch by batch, into `store`; this rank's counts."""
    cfg = config.update_offline
    # The ground truth is read only for the diagnostics, never by the update.
    unlabelled = [dataclasses.replace(sample, label=None) for sample in samples]
    dataset = FullImageDataset(unlabelled, cfg.inference.size or config.input.target_size,
                               normalization)
    loader = full_image_loader(dataset, cfg.inference.batch_size, cfg.inference.num_workers,
                               device)
    window = sliding_window(cfg.inference, config.input.crop_size)
    counts = PassCounts(store.num_classes)
    with reporter.task("update-offline", total=len(samples)) as task, \
            StoreWriter(store) as writes:
        for batch in loader:
            probabilities = predict(model, batch["image"].to(device),
                                    (store.height, store.width), flip=cfg.inference.flip,
                                    sliding_window=window, precision=config.inference_precision)
            rows = batch["index"].tolist()
            updated = offline_update(writes, [positions[p] for p in rows], probabilities,
                                     cfg.beta, cfg.offline_rule, parent=parent)
            counts.add(updated, [samples[p].label for p in rows])
            task.advance(len(rows))
    return counts


def _summary(names: tuple[str, ...], counts: PassCounts, statistics: dict[str, Any],
             which: str) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "model": which,
        "labelled_fraction": statistics["labelled_fraction"],
        "changes": counts.changes.totals(),
        "per_class": {name: {key: int(counts.changes.counts[key][c]) for key in CHANGES}
                      for c, name in enumerate(names)},
    }
    if counts.images_with_truth:
        summary["diagnostics"] = {
            "before": diagnostics(counts.before, names, counts.images_with_truth),
            "after": diagnostics(counts.after, names, counts.images_with_truth)}
    return summary
