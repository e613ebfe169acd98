"""The `evaluate` stage: mIoU of a checkpoint's teacher or student on a labelled split.

Whole-image (or sliding-window) inference at the configured size, optional flip TTA, predictions
upsampled to the ground truth's size, one confusion matrix summed over the split, IoU per class and
mIoU for every protocol of the dataset's class table (19, and 16/13 for SYNTHIA-trained models)
(docs/method.md, evaluation). For the mean teacher, its BatchNorm statistics can first be recomputed
on target-train. Writes an evaluation artifact (`duda.evaluation`) with `report.json` and, on
request, colourised predictions and image | prediction | ground-truth panels under `predictions/`.

Under `torchrun` the images are split across ranks in whole batches and the confusion matrices
summed, so the report equals a single-process one; every rank recalibrates alike and then takes
rank 0's statistics, and rank 0 writes the report and the manifest.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from stages.artifacts.checkpoint import (
    LoadedModel,
    check_compatible,
    load_checkpoint_manifest,
    load_model,
)
from stages.artifacts.manifest import EVALUATION, StageResult, atomic_write_json
from stages.artifacts.writer import ArtifactWriter
from stages.config import Config, stage_config, stage_hash
from stages.data.classes import ClassTable
from stages.data.crops import resize_image
from stages.data.full_images import FullImageDataset
from stages.data.index import DatasetIndex, Sample, load_dataset_index
from stages.data.io import read_image
from stages.engine.inference import (
    SlidingWindow,
    full_image_loader,
    predict_scores,
    recalibrate_on_target,
    sliding_window,
)
from stages.engine.metrics import ConfusionMatrix
from stages.engine.predictions import (
    BackgroundWriter,
    check_formats,
    colorize,
    write_prediction,
)
from stages.nn.teacher import batchnorm_statistics
from stages.runtime.distributed import Ranks, process_group
from stages.runtime.errors import DudaError
from stages.runtime.progress import Reporter
from stages.store.levels import quantize

REPORT_FILE = "report.json"
PREDICTIONS_DIR = "predictions"

logger = logging.getLogger("duda")


def run(config: Config, data: str | Path, checkpoint: str | Path, out: str | Path, *,
        force: bool = False, device: str = "auto", reporter: Reporter | None = None,
        ) -> StageResult:
    """Evaluate `checkpoint` on config.evaluate.domain / split of the dataset index `data`."""
    with process_group(device) as ranks:
        return _run(config, data, checkpoint, out, force=force, ranks=ranks,
                    reporter=ranks.reporter(reporter))


def _run(config: Config, data: str | Path, checkpoint: str | Path, out: str | Path, *,
         force: bool, ranks: Ranks, reporter: Reporter) -> StageResult:
    torch_device = ranks.compute_device
    settings = config.evaluate
    index = load_dataset_index(data)
    checkpoint = Path(checkpoint)
    checkpoint_manifest = load_checkpoint_manifest(checkpoint)
    samples = index.samples(settings.domain, settings.split)
    _check_labelled(index, samples, settings.domain, settings.split)
    check_formats(settings.save_predictions, index.classes, f"dataset index {index.path}")
    section = stage_config(config, "evaluate")
    inputs = {"data": index.ref, "checkpoint": checkpoint_manifest.ref(checkpoint)}

    with ArtifactWriter(out, kind=EVALUATION, stage="evaluate", config=section,
                        config_hash=stage_hash(config, "evaluate"), inputs=inputs, force=force,
                        device=str(torch_device), ranks=ranks) as writer:
        if writer.up_to_date:
            return writer.result()
        loaded = load_model(checkpoint, settings.inference.model, torch_device)
        check_compatible(loaded, index.classes.names, what=f"dataset index {index.path}")
        recalibration = _recalibrate(config, index, loaded, torch_device, reporter)
        if recalibration is not None:
            ranks.broadcast_tensors(batchnorm_statistics(loaded.model))
        size = _inference_size(config)
        window = sliding_window(settings.inference, config.input.crop_size)
        mine = ranks.mine(len(samples), settings.inference.batch_size)
        matrix = _evaluate(loaded, [samples[i] for i in mine], size, window, config,
                           writer.work, index.classes, torch_device, reporter)
        matrix.matrix = torch.from_numpy(ranks.sum(matrix.matrix.cpu().numpy()))
        report = _report(matrix, index.classes, {
            "domain": settings.domain, "split": settings.split, "images": len(samples),
            "size": list(size), "flip": settings.inference.flip,
            "sliding_window": window.describe() if window else None,
            "model": loaded.which, "iteration": loaded.iteration,
            "bn_recalibration": recalibration,
            "checkpoint": str(checkpoint.resolve()),
        })
        if ranks.is_main:
            atomic_write_json(writer.work / REPORT_FILE, report)
        summary = {key: report[key] for key in ("miou", "miou_by_protocol", "per_class")}
        summary.update(model=loaded.which, domain=settings.domain, split=settings.split,
                       images=len(samples), primary_protocol=report["primary_protocol"])
        writer.finish(summary, content=[REPORT_FILE])
    return writer.result()


def _check_labelled(index: DatasetIndex, samples: list[Sample], domain: str, split: str) -> None:
    unlabelled = [sample.id for sample in samples if sample.label is None]
    if unlabelled:
        raise DudaError(f"the {domain} split '{split}' of dataset index {index.path} has no "
                        f"ground truth for {len(unlabelled)} of {len(samples)} images "
                        f"(first: {unlabelled[0]})",
                        "evaluate a labelled split: set evaluate.domain / evaluate.split, "
                        "e.g. --set evaluate.split=val")
    if not samples:
        raise DudaError(f"the {domain} split '{split}' of dataset index {index.path} is empty",
                        "evaluate a split with images")


def _inference_size(config: Config) -> tuple[int, int]:
    settings = config.evaluate
    if settings.inference.size is not None:
        return (settings.inference.size[0], settings.inference.size[1])
    base = config.input.target_size if settings.domain == "target" else config.input.source_size
    return (base[0], base[1])


def _recalibrate(config: Config, index: DatasetIndex, loaded: LoadedModel,
                 device: torch.device, reporter: Reporter) -> dict[str, Any] | None:
    """Recompute the model's BN statistics on target-train before evaluating, if asked.
    Returns what was done, for the report."""
    settings = config.evaluate.recalibration
    if not settings.enabled:
        return None
    return recalibrate_on_target(loaded.model, loaded.model_config.normalization, config, index,
                                 settings, device, reporter,
                                 config.evaluate.inference.num_workers)


def _evaluate(loaded: LoadedModel, samples: list[Sample], size: tuple[int, int],
              window: SlidingWindow | None, config: Config, out: Path, classes: ClassTable,
              device: torch.device, reporter: Reporter) -> ConfusionMatrix:
    settings = config.evaluate
    formats = settings.save_predictions
    model = loaded.model.eval()
    dataset = FullImageDataset(samples, size, loaded.model_config.normalization,
                               with_labels=True)
    loader = full_image_loader(dataset, settings.inference.batch_size,
                               settings.inference.num_workers, device)
    matrix = ConfusionMatrix(len(classes.names))
    with reporter.task(f"evaluating {settings.domain}/{settings.split}",
                       total=len(dataset)) as task, BackgroundWriter() as writer:
        for batch in loader:
            images = batch["image"].to(device, non_blocking=True)
            labels = [label.to(device, non_blocking=True) for label in batch["label"]]
            for rows, out_size in _groups_by_size(labels):
                scores, is_probability = predict_scores(
                    model, images[rows], out_size, flip=settings.inference.flip,
                    sliding_window=window, precision=config.inference_precision)
                prediction = scores.argmax(1)
                target = torch.stack([labels[i] for i in rows])
                matrix.update(prediction, target)
                if formats:
                    confidence = None
                    if "confidence" in formats:
                        probabilities = scores if is_probability else scores.softmax(1)
                        confidence = quantize(probabilities.amax(1))
                    for row, i in enumerate(rows):
                        sample = samples[int(batch["index"][i])]
                        writer.submit(sample.id, _save_prediction, out / PREDICTIONS_DIR, sample,
                                      prediction[row].to(torch.uint8).cpu().numpy(),
                                      None if confidence is None else confidence[row],
                                      target[row].cpu().numpy(), formats, classes)
            task.advance(images.shape[0], miou=matrix.miou(classes.primary_protocol[1]))
        writer.flush()
    return matrix


def _groups_by_size(labels: list[torch.Tensor]) -> list[tuple[list[int], tuple[int, int]]]:
    """Batch rows grouped by label size (one group when every label has the same size)."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, label in enumerate(labels):
        groups.setdefault((int(label.shape[0]), int(label.shape[1])), []).append(i)
    return [(rows, size) for size, rows in groups.items()]


def _save_prediction(folder: Path, sample: Sample, prediction: np.ndarray,
                     confidence: np.ndarray | None, target: np.ndarray, formats: list[str],
                     classes: ClassTable) -> None:
    """The prediction PNGs of one image: predict's formats, and `panel` (image | prediction |
    ground truth) in `folder/panel/`."""
    write_prediction(folder, sample.id, prediction, confidence,
                     [name for name in formats if name != "panel"], classes)
    if "panel" in formats:
        image = resize_image(read_image(sample.image), prediction.shape)
        panel = np.concatenate([image, colorize(prediction, classes.palette),
                                colorize(np.clip(target, 0, 255).astype(np.uint8),
                                         classes.palette)], axis=1)
        (folder / "panel").mkdir(parents=True, exist_ok=True)
        Image.fromarray(panel).save(folder / "panel" / f"{sample.id}.png", compress_level=1)


def _report(matrix: ConfusionMatrix, classes: ClassTable,
            protocol: dict[str, Any]) -> dict[str, Any]:
    iou = matrix.iou().tolist()
    present = matrix.present().tolist()
    by_protocol = matrix.miou_by_protocol(classes.protocols)
    primary = next(iter(by_protocol))
    return {
        "miou": by_protocol[primary],
        "primary_protocol": primary,
        "miou_by_protocol": by_protocol,
        "protocols": {name: [classes.names[i] for i in ids]
                      for name, ids in ((str(k), v) for k, v in classes.protocols.items())},
        "per_class": dict(zip(classes.names, iou)),
        "present_in_ground_truth": dict(zip(classes.names, present)),
        "absent_classes_note": "a class absent from both ground truth and prediction has "
                               "IoU 0 and counts in the mean (the reference formula)",
        "pixel_accuracy": matrix.pixel_accuracy(),
        "confusion_matrix": matrix.matrix.cpu().tolist(),
        "confusion_matrix_axes": "rows: ground truth, columns: prediction",
        "protocol": protocol,
    }
