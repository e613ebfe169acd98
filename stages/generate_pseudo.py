"""The generate-pseudo stage: offline pseudo labels for every target-train image
(docs/method.md#the-initial-pseudo-labels).

Two passes, one forward pass per image:

1. Inference. The teacher (or student; an ensemble of checkpoints averages probabilities, with
   optional flip TTA, docs/method.md#the-initial-pseudo-labels) sees each image at the configured
   size; its probabilities are resized to the images' native size, and argmax + confidence (max
   probability) of every pixel go into the store. The selector (`SELECTORS`, the interface
   `Selector` in stages/method/selectors.py) observes them on the way: CBST accumulates its
   per-class confidence histograms.
2. Selection. The class thresholds are computed from the kept first pass — IAST
   (docs/method.md#iast-instance-adaptive-thresholds) by walking the images in index order in
   groups, CBST (docs/method.md#cbst-class-balanced-thresholds) from the histograms, or a fixed
   threshold — and every image's stored argmax is replaced by its thresholded labels.

Under `torchrun` (RANK / WORLD_SIZE set) the images are split across ranks, each writing its own
chunks. CBST histograms and statistics are summed across ranks (sums do not depend on the
order). An ordered selector's update (IAST's) depends on the order: rank 0 runs it sequentially
over the stored confidences in index order and broadcasts the per-group thresholds, so the
result is identical to a single-process run. Rank 0 writes the attributes and the manifest.

Where target-train has ground truth (Cityscapes does), per-class precision, recall and coverage
of the pseudo labels are reported as diagnostics; the ground truth is never used otherwise.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numcodecs import Zstd

from stages.artifacts.checkpoint import (
    LoadedModel,
    check_compatible,
    load_checkpoint_manifest,
    load_model,
)
from stages.artifacts.manifest import PSEUDO_LABELS, ArtifactRef, StageResult
from stages.artifacts.writer import ArtifactWriter
from stages.config import Config, stage_config, stage_hash
from stages.data.full_images import FullImageDataset
from stages.data.index import DatasetIndex, Sample, load_dataset_index
from stages.data.io import image_size, read_label
from stages.engine.inference import (
    SlidingWindow,
    full_image_loader,
    predict,
    recalibrate_on_target,
    sliding_window,
)
from stages.engine.metrics import confusion_counts, diagnostics, statistics_from_counts
from stages.method.selectors import SELECTORS, Selector, apply_thresholds
from stages.runtime.distributed import Ranks, process_group
from stages.runtime.errors import DudaError
from stages.runtime.progress import Reporter
from stages.store.levels import quantize, threshold_levels
from stages.store.pseudo_store import (
    STORE_METADATA,
    PseudoLabelStore,
    create_store,
    open_unfinished,
)
from stages.store.writer import ReadAhead, StoreWriter

logger = logging.getLogger("duda")

READ_AHEAD = 4  # images read ahead of the selection pass
# The first pass is kept in host memory until the thresholds are known, so that every label is
# written to the store once: as plain arrays while this rank's whole pass fits RAW_BYTES, else
# zstd-compressed (a paper-scale pass, 2,975 maps of 1024×2048, compresses to about the size
# of its store, ~1.4 GB), and past COMPRESSED_BYTES in the store (then written twice).
RAW_BYTES = 1 << 30
COMPRESSED_BYTES = 4 << 30

# ------------------------------------------------------------------------------- stage


def run(config: Config, data: str | Path, checkpoint: str | Path | Sequence[str | Path],
        out: str | Path, *, force: bool = False, device: str = "auto",
        reporter: Reporter | None = None) -> StageResult:
    """Generate the pseudo-label store for target-train at `out`.

    `checkpoint` is one checkpoint artifact or several (an ensemble: probabilities averaged).
    """
    with process_group(device) as ranks:
        return _run(config, data, checkpoint, out, force=force, ranks=ranks,
                    reporter=ranks.reporter(reporter))


def _run(config: Config, data: str | Path, checkpoint: str | Path | Sequence[str | Path],
         out: str | Path, *, force: bool, ranks: Ranks, reporter: Reporter) -> StageResult:
    torch_device = ranks.compute_device
    cfg = config.generate_pseudo
    index = load_dataset_index(data)
    checkpoints = [Path(checkpoint)] if isinstance(checkpoint, (str, Path)) else [
        Path(path) for path in checkpoint]
    if not checkpoints:
        raise DudaError("no checkpoint given", "pass --checkpoint (repeat it for an ensemble)")
    manifests = [load_checkpoint_manifest(path) for path in checkpoints]
    inputs: dict[str, ArtifactRef] = {"data": index.ref}
    for number, (path, manifest) in enumerate(zip(checkpoints, manifests, strict=True)):
        inputs["checkpoint" if number == 0 else f"checkpoint_{number + 1}"] = manifest.ref(path)
    section = stage_config(config, "generate_pseudo")
    samples = index.samples("target", "train")

    with ArtifactWriter(out, kind=PSEUDO_LABELS, stage="generate_pseudo", config=section,
                        config_hash=stage_hash(config, "generate_pseudo"), inputs=inputs,
                        force=force,
                        round=max(manifest.round for manifest in manifests),
                        device=str(torch_device), ranks=ranks) as writer:
        if writer.up_to_date:
            return writer.result()
        height, width = native_size(samples)
        writer.require_store_space(len(samples), height, width)
        models = _load_models(checkpoints, cfg.inference.model, torch_device, index)
        if cfg.recalibration.enabled:
            for loaded in models:
                recalibrate_on_target(loaded.model, loaded.model_config.normalization, config,
                                      index, cfg.recalibration, torch_device, reporter,
                                      cfg.inference.num_workers)
        ranks.on_main(lambda: create_store(
            writer.work, ids=[sample.id for sample in samples], height=height, width=width,
            class_names=index.classes.names, index_id=index.manifest.id,
            palette=index.classes.palette).path)
        store = open_unfinished(writer.work)  # rank 0 created it; every rank writes its images
        mine = ranks.mine(len(samples), cfg.inference.batch_size)
        size = tuple(cfg.inference.size or config.input.target_size)

        selector = SELECTORS[cfg.selector.name](cfg.selector, store.num_classes)
        # An ordered selector walks every image on rank 0, so under torchrun its first pass goes
        # through the store; otherwise each rank keeps its own images in memory.
        walk_across_ranks = selector.ordered and ranks.world_size > 1
        first = FirstPass(store, limit=0 if walk_across_ranks else COMPRESSED_BYTES,
                          compress=len(mine) * height * width * 2 > RAW_BYTES)
        predicted = _infer(config, models, samples, mine, size, selector, first, torch_device,
                           reporter)
        ranks.barrier()
        predicted = ranks.sum(predicted)
        thresholds, group_thresholds = _select(selector, first, ranks, reporter)
        kept, confusion = _threshold(first, samples, mine, thresholds, group_thresholds,
                                     selector.group_size, reporter)
        kept = ranks.sum(kept)
        confusion = ranks.sum(confusion)
        ranks.barrier()

        summary = _summary(config, selector, index, store, models, thresholds, predicted,
                           kept, confusion, [sample.label is not None for sample in samples])
        if ranks.is_main:
            store.set_thresholds(thresholds.tolist())
            store.set_selector(_selector_description(config, selector))
            if group_thresholds is not None:
                store.set_attribute("group_thresholds", group_thresholds.tolist())
            store.set_statistics({**statistics_from_counts(
                kept, len(samples) * height * width), "predicted_pixels": predicted.tolist()})
            store.check_complete()
        writer.finish(summary, content=STORE_METADATA)
    return writer.result()


def native_size(samples: Sequence[Sample]) -> tuple[int, int]:
    """The (H, W) every target-train image shares (read from the file headers)."""
    if not samples:
        raise DudaError("the dataset index has no target-train images",
                        "check data.target and rerun prepare-data")
    sizes: dict[tuple[int, int], list[str]] = {}
    for sample in samples:
        width, height = image_size(sample.image)  # header only; unreadable or too large: DudaError
        sizes.setdefault((height, width), []).append(sample.id)
    if len(sizes) > 1:
        described = "; ".join(f"{h}×{w}: {len(ids)} images (e.g. {ids[0]})"
                              for (h, w), ids in sizes.items())
        raise DudaError(f"target-train images differ in size ({described}); the pseudo-label "
                        "store holds one label size",
                        "resize the target images to one size before prepare-data")
    return next(iter(sizes))


def _load_models(checkpoints: list[Path], which: str, device: torch.device,
                 index: DatasetIndex) -> list[LoadedModel]:
    models = []
    for path in checkpoints:
        loaded = load_model(path, which=which, device=device)  # type: ignore[arg-type]
        check_compatible(loaded, index.classes.names)
        models.append(loaded)
    normalizations = {loaded.model_config.normalization for loaded in models}
    if len(normalizations) > 1:
        raise DudaError(f"the ensemble's checkpoints expect different input normalisations "
                        f"({', '.join(sorted(normalizations))})",
                        "ensemble checkpoints trained with the same model.normalization")
    return models


def ensemble_probabilities(models: Sequence[LoadedModel], images: torch.Tensor,
                           out_size: tuple[int, int], flip: bool,
                           window: SlidingWindow | None = None,
                           precision: str = "fp32") -> torch.Tensor:
    """Mean softmax of every model (each flip-averaged if asked): (B, C, *out_size) float32."""
    total: torch.Tensor | None = None
    for loaded in models:
        probabilities = predict(loaded.model, images, out_size, flip=flip,
                                sliding_window=window, precision=precision)
        total = probabilities if total is None else total + probabilities
    assert total is not None
    return total / len(models)


class FirstPass:
    """This rank's argmax and confidence levels from the inference pass, and the selector's own
    scores if it declares any, until the thresholds are known: in memory up to `limit` bytes
    (plain, or zstd-compressed with `compress`), so that each image is written to the store
    once; an image past the limit goes to the store and only its labels are replaced by the
    second pass. A selector's own scores have no place in the store, so they stay in memory
    whatever the limit."""

    def __init__(self, store: PseudoLabelStore, limit: int, compress: bool) -> None:
        self.store = store
        self.limit = limit
        self.codec = Zstd(level=1) if compress else None
        self.memory: dict[int, tuple[Any, Any]] = {}
        self.scores: dict[int, Any] = {}
        self.bytes = 0

    def _keep(self, array: np.ndarray) -> tuple[Any, int]:
        """What is held of `array`, and its size in bytes."""
        if self.codec is None:
            return array, array.nbytes
        encoded = self.codec.encode(array)
        return encoded, len(encoded)

    def _restore(self, kept: Any) -> np.ndarray:
        if self.codec is None:
            return kept
        return np.frombuffer(self.codec.decode(kept), np.uint8).reshape(self.store.height,
                                                                          self.store.width)

    def put(self, writes: StoreWriter, i: int, prediction: np.ndarray, levels: np.ndarray,
            scores: np.ndarray | None = None) -> None:
        """Keep image i's argmax and levels, and the selector's scores (None: the levels)."""
        if scores is not None:
            self.scores[i], size = self._keep(scores)
            self.bytes += size
        (kept_prediction, prediction_size), (kept_levels, levels_size) = (
            self._keep(prediction), self._keep(levels))
        if self.bytes + prediction_size + levels_size > self.limit:
            writes.write(i, prediction, levels)
            return
        self.memory[i] = (kept_prediction, kept_levels)
        self.bytes += prediction_size + levels_size

    def read(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(prediction, levels, scores) of image i; the scores are the levels unless the
        selector declares its own."""
        if i in self.memory:
            prediction, levels = (self._restore(part) for part in self.memory[i])
        else:
            prediction, levels = self.store.read(i)
        scores = self._restore(self.scores[i]) if i in self.scores else levels
        return prediction, levels, scores

    def finish(self, writes: StoreWriter, i: int, labels: np.ndarray,
               levels: np.ndarray) -> None:
        """Store the thresholded labels of image i (with its levels, if not stored yet)."""
        self.scores.pop(i, None)
        if self.memory.pop(i, None) is not None:
            writes.write(i, labels, levels)
        else:
            writes.write_labels(i, labels)


def _infer(config: Config, models: list[LoadedModel], samples: list[Sample], mine: list[int],
           size: tuple[int, ...], selector: Selector, first: FirstPass, device: torch.device,
           reporter: Reporter) -> np.ndarray:
    """Pass 1: the argmax and confidence level of this rank's images (and the selector's own
    scores), kept by `first`; a selector that is not ordered observes them on the way.

    Returns the predicted pixels per class (C,)."""
    cfg = config.generate_pseudo
    store = first.store
    num_classes = store.num_classes
    predicted = np.zeros(num_classes, np.int64)
    dataset = FullImageDataset([samples[i] for i in mine], size,
                               models[0].model_config.normalization)
    loader = full_image_loader(dataset, cfg.inference.batch_size, cfg.inference.num_workers,
                               device)
    window = sliding_window(cfg.inference, config.input.crop_size)
    out_size = (store.height, store.width)
    with reporter.task("pseudo labels: inference", total=len(mine)) as task, \
            StoreWriter(store) as writes:
        for batch in loader:
            images = batch["image"].to(device, non_blocking=True)
            probabilities = ensemble_probabilities(models, images, out_size, cfg.inference.flip,
                                                   window, config.inference_precision)
            confidence, prediction = probabilities.max(dim=1)
            # The stored confidence levels are what every later step sees.
            levels = quantize(confidence)
            scores = selector.score(probabilities)
            prediction = prediction.to(torch.uint8).cpu().numpy()
            if not selector.ordered:
                selector.observe(levels if scores is None else scores, prediction)
            predicted += np.bincount(prediction.ravel(), minlength=num_classes)
            for position, label, level, score in zip(
                    batch["index"].tolist(), prediction, levels,
                    [None] * len(levels) if scores is None else scores, strict=True):
                first.put(writes, mine[position], label, level, score)
            task.advance(len(images))
    return predicted


def _select(selector: Selector, first: FirstPass, ranks: Ranks, reporter: Reporter,
            ) -> tuple[np.ndarray, np.ndarray | None]:
    """The class thresholds (C,), and for an ordered selector the thresholds of every group
    (G, C)."""
    if not selector.ordered:
        selector.combine(ranks.sum)
        return selector.thresholds(), None
    # Ordered (IAST): one process walks the whole set in index order (the reference walks a
    # sampler's order; index order makes it reproducible).
    groups = None
    if ranks.is_main:
        count = len(first.store)
        history = []
        with reporter.task(f"pseudo labels: {selector.title} thresholds", total=count) as task:
            for start in range(0, count, selector.group_size):
                members = [first.read(i) for i in range(start,
                                                        min(start + selector.group_size, count))]
                selector.observe(np.stack([member[2] for member in members]),
                                 np.stack([member[0] for member in members]))
                history.append(selector.thresholds())
                task.advance(len(members))
        groups = np.stack(history)
    groups = ranks.broadcast(groups)
    return groups[-1], groups


def _threshold(first: FirstPass, samples: list[Sample], mine: list[int],
               thresholds: np.ndarray, group_thresholds: np.ndarray | None, group_size: int,
               reporter: Reporter) -> tuple[np.ndarray, np.ndarray]:
    """Pass 2: this rank's thresholded labels, stored.

    Returns the kept pixels per class (C,) and, over images with ground truth, the confusion
    counts (C, C + 1) of ground truth × pseudo label (the last column: ignored).
    """
    num_classes = first.store.num_classes
    kept = np.zeros(num_classes, np.int64)
    confusion = np.zeros((num_classes, num_classes + 1), np.int64)
    def read(i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
        truth = samples[i].label  # diagnostics only
        return (*first.read(i), read_label(truth) if truth is not None else None)

    with reporter.task("pseudo labels: selection", total=len(mine)) as task, \
            StoreWriter(first.store) as writes, ReadAhead(read) as reads:
        for position, i in enumerate(mine):
            reads.prefetch(mine[position + 1:position + 1 + READ_AHEAD])
            prediction, levels, scores, truth = reads.take([i])[0]
            theta = thresholds if group_thresholds is None else group_thresholds[i // group_size]
            # On the kept score levels: a level is kept when level / 255 ≥ θ.
            labels = apply_thresholds(prediction, scores, threshold_levels(theta))
            first.finish(writes, i, labels, levels)
            kept += np.bincount(labels.ravel(), minlength=256)[:num_classes]
            if truth is not None:
                confusion += confusion_counts(labels, truth, num_classes)
            task.advance(1)
    return kept, confusion


def _selector_description(config: Config, selector: Selector) -> dict[str, Any]:
    description = config.generate_pseudo.selector.model_dump(mode="json")
    if selector.ordered:
        description["order"] = "index"
    return description


def _summary(config: Config, selector: Selector, index: DatasetIndex, store: PseudoLabelStore,
             models: list[LoadedModel], thresholds: np.ndarray, predicted: np.ndarray,
             kept: np.ndarray, confusion: np.ndarray, has_truth: list[bool]) -> dict[str, Any]:
    pixels = len(store) * store.height * store.width
    names = list(index.classes.names)
    summary: dict[str, Any] = {
        "images": len(store),
        "label_size": [store.height, store.width],
        "selector": _selector_description(config, selector),
        "models": [{"checkpoint": str(loaded.path), "weights": loaded.which,
                    "iteration": loaded.iteration} for loaded in models],
        "flip": config.generate_pseudo.inference.flip,
        "labelled_fraction": float(kept.sum() / pixels) if pixels else 0.0,
        "per_class": {name: {"threshold": float(thresholds[c]),
                             "predicted_pixels": int(predicted[c]),
                             "kept_pixels": int(kept[c]),
                             "kept_fraction": (float(kept[c] / predicted[c])
                                               if predicted[c] else None),
                             "coverage": float(kept[c] / pixels) if pixels else 0.0}
                      for c, name in enumerate(names)},
    }
    if any(has_truth):
        summary["diagnostics"] = diagnostics(confusion, names, sum(has_truth))
    return summary
