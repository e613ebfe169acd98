"""Whole-image inference shared by evaluate, generate-pseudo, update-offline and predict, the
in-training evaluation, and BatchNorm recalibration on target-train.

The model sees the image at the configured inference size, either whole or as overlapping
sliding windows whose logits are averaged where they overlap; optional horizontal-flip
test-time augmentation averages the softmax of the plain and the flipped (and flipped back)
passes (docs/method.md, evaluation). The result is resized bilinearly (align_corners=True, as
the model's own upsampling) to the requested output size, e.g. the ground truth's.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from stages.config import Config, InferenceConfig, Recalibration, Size
from stages.data.crops import CropDataset, InfiniteLoader
from stages.data.full_images import FullImageDataset, collate_full_images
from stages.data.index import DatasetIndex
from stages.engine.metrics import ConfusionMatrix
from stages.nn.teacher import recalibrate_batchnorm
from stages.runtime.devices import autocast, worker_count
from stages.runtime.progress import Reporter

# The recalibration crops' seed, apart from the training loaders' (seed, seed + 1).
RECALIBRATION_SEED_OFFSET = 2


@dataclass(frozen=True)
class SlidingWindow:
    """Windows of `size` [H, W] whose neighbours overlap by `overlap` (a fraction of the size)."""

    size: tuple[int, int]
    overlap: float = 1 / 3

    def describe(self) -> dict[str, object]:
        return {"window": list(self.size), "overlap": self.overlap}


def sliding_window(settings: InferenceConfig, crop_size: Size) -> SlidingWindow | None:
    """The sliding window an inference setting asks for (default window: the training crop)."""
    if not settings.sliding_window:
        return None
    window = settings.window or crop_size
    return SlidingWindow((window[0], window[1]), settings.window_overlap)


def full_image_loader(dataset: Dataset, batch_size: int, num_workers: int | str,
                      device: torch.device,
                      collate: Callable[[list[Any]], Any] = collate_full_images,
                      ) -> Iterable[Any]:
    """Batches of whole images in index order (`FullImageDataset` items) for a model on
    `device`: decoded ahead in `num_workers` loader processes (`auto`: from the available
    cores), or with 0 as `ahead` says (a background thread beside a GPU, in turn on the CPU)."""
    num_workers = worker_count(num_workers)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=collate, pin_memory=device.type == "cuda")
    return ahead(loader, num_workers, device)


class ThreadAhead:
    """Iterates `iterable` on a background thread, `depth` items ahead of the consumer (what
    the loop does meanwhile overlaps the loading); errors are raised where the item is taken."""

    def __init__(self, iterable: Iterable[Any], depth: int = 2) -> None:
        self.iterable = iterable
        self.depth = depth

    def __len__(self) -> int:
        return len(self.iterable)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Any]:
        items: queue.Queue[tuple[bool, Any]] = queue.Queue(self.depth)
        stop = threading.Event()

        def put(entry: tuple[bool, Any]) -> bool:
            """Hand an entry over unless the consumer has stopped (then: False)."""
            while not stop.is_set():
                try:
                    items.put(entry, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def produce() -> None:
            try:
                for item in self.iterable:
                    if not put((True, item)):
                        return
                put((False, None))
            except BaseException as error:  # noqa: BLE001 - handed to the consumer
                put((False, error))

        thread = threading.Thread(target=produce, name="duda-load", daemon=True)
        thread.start()
        try:
            while True:
                more, item = items.get()
                if not more:
                    if item is not None:
                        raise item
                    return
                yield item
        finally:
            stop.set()
            thread.join()


def ahead(batches: Iterable[Any], workers: int, device: torch.device) -> Iterable[Any]:
    """`batches` as they come from loader processes; without any, made on a background thread
    while a GPU computes, or in turn on the CPU, where a Python thread beside the model's
    threads slows both (measured: 64 images of 128×256 through a ResNet-18 ×0.5 took 1.9 s
    with the thread, 1.2 s without)."""
    if workers > 0 or device.type != "cuda":
        return batches
    return ThreadAhead(batches)


def window_starts(length: int, window: int, overlap: float) -> list[int]:
    """Start offsets covering [0, length) with windows of `window`; the last ends at `length`."""
    if window >= length:
        return [0]
    stride = max(1, int(window * (1.0 - overlap)))
    starts = list(range(0, length - window + 1, stride))
    if starts[-1] != length - window:
        starts.append(length - window)
    return starts


def _sliding_logits(model: nn.Module, images: torch.Tensor, window: SlidingWindow) -> torch.Tensor:
    """(B, 3, H, W) -> (B, C, H, W): logits averaged over every window covering each pixel."""
    height, width = images.shape[-2:]
    window_h, window_w = min(window.size[0], height), min(window.size[1], width)
    total: torch.Tensor | None = None
    count = torch.zeros(1, 1, height, width, device=images.device)
    for y in window_starts(height, window_h, window.overlap):
        for x in window_starts(width, window_w, window.overlap):
            logits = model(images[:, :, y:y + window_h, x:x + window_w]).float()
            if total is None:
                total = torch.zeros(images.shape[0], logits.shape[1], height, width,
                                    device=images.device)
            total[:, :, y:y + window_h, x:x + window_w] += logits
            count[:, :, y:y + window_h, x:x + window_w] += 1
    assert total is not None
    return total / count


def _logits(model: nn.Module, images: torch.Tensor, out_size: tuple[int, int],
            sliding_window: SlidingWindow | None) -> torch.Tensor:
    if sliding_window is None:
        logits = model(images).float()
    else:
        logits = _sliding_logits(model, images, sliding_window)
    if tuple(logits.shape[-2:]) != tuple(out_size):
        logits = F.interpolate(logits, size=tuple(out_size), mode="bilinear", align_corners=True)
    return logits


@torch.no_grad()
def predict_scores(model: nn.Module, images: torch.Tensor, out_size: tuple[int, int],
                   flip: bool = False, sliding_window: SlidingWindow | None = None,
                   precision: str = "fp32") -> tuple[torch.Tensor, bool]:
    """Class scores whose argmax is the prediction, without a softmax where none is needed.

    images: (B, 3, H, W) normalised float on the model's device.
    Returns ((B, C, *out_size) float32, is_probability): logits without flip; with flip the
    mean of the two softmaxes.
    """
    with autocast(images.device, precision):
        logits = _logits(model, images, out_size, sliding_window)
        if not flip:
            return logits, False
        flipped = _logits(model, images.flip(-1), out_size, sliding_window).flip(-1)
    return (logits.softmax(1) + flipped.softmax(1)) / 2, True


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, out_size: tuple[int, int],
            flip: bool = False, sliding_window: SlidingWindow | None = None,
            precision: str = "fp32") -> torch.Tensor:
    """Softmax probabilities (B, C, *out_size) float32, averaged over the flip if asked.

    images: (B, 3, H, W) normalised float on the model's device; the model is used as is
    (call `model.eval()` first for deterministic inference).
    """
    scores, is_probability = predict_scores(model, images, out_size, flip, sliding_window,
                                            precision)
    return scores if is_probability else scores.softmax(1)


@torch.no_grad()
def predict_classes(model: nn.Module, images: torch.Tensor, out_size: tuple[int, int],
                    flip: bool = False, sliding_window: SlidingWindow | None = None,
                    precision: str = "fp32") -> torch.Tensor:
    """The predicted class map (B, *out_size) int64: argmax of `predict`'s probabilities (taken
    with max(), which returns the first maximal index as argmax does, in a third of its time)."""
    scores, _ = predict_scores(model, images, out_size, flip, sliding_window, precision)
    return scores.max(1).indices


def recalibrate_on_target(model: torch.nn.Module, normalization: str, config: Config,
                          index: DatasetIndex, settings: Recalibration, device: torch.device,
                          reporter: Reporter | None = None,
                          num_workers: int | str = "auto") -> dict[str, Any]:
    """Recompute `model`'s BN running statistics (a cumulative average) on weak target-train
    crops: the training view at input.crop_size, a fixed sequence drawn from `config.seed + 2`
    (`settings.batches` batches of `settings.batch_size`, 0 = one pass over the split), decoded
    ahead of the model by `num_workers` loader processes (0: a background thread) and run at
    `config.inference_precision`. The model is left in eval mode. The mean teacher's
    recalibration before each evaluation (docs/method.md#batch-norm-recalibration); applied to a
    source-only model it is AdaBN. Returns the protocol, for reports."""
    seed = config.seed + RECALIBRATION_SEED_OFFSET
    samples = [dataclasses.replace(sample, label=None)
               for sample in index.samples("target", "train")]
    dataset = CropDataset(samples, config.input.target_size, config.input.crop_size,
                          config.input.scale_range, config.input.flip_probability,
                          normalization, seed=seed, with_labels=False)
    workers = worker_count(num_workers)
    loader = InfiniteLoader(dataset, settings.batch_size, seed=seed, num_workers=workers,
                            pin_memory=device.type == "cuda")
    total = settings.batches or loader.batches_per_epoch
    with (reporter or Reporter()).task("recalibrating BN", total=total) as task:
        def images() -> Iterator[torch.Tensor]:
            for _ in range(total):
                yield next(loader)["image"]
                task.advance(1)

        batches = ahead(images(), workers, device)
        try:
            seen = recalibrate_batchnorm(model, batches, device, config.inference_precision)
        finally:
            loader.close()
    model.eval()
    return {"applied": True, "view": "weak target-train crops", "seed": seed, "batches": seen,
            "batch_size": settings.batch_size, "crop_size": list(config.input.crop_size)}


@torch.no_grad()
def target_val_miou(model: torch.nn.Module, config: Config, index: DatasetIndex,
                    device: torch.device, *, num_workers: int | str) -> float:
    """Target-val mIoU of the table's primary protocol, at input.target_size, whole image, no
    flip, at `config.inference_precision`: the in-training evaluation of warmup and
    self-train."""
    model.eval()
    dataset = FullImageDataset(index.samples("target", "val"), config.input.target_size,
                               config.model.normalization, with_labels=True)
    # A private generator: building the loader must not draw from the global RNG (resume).
    generator = torch.Generator()
    generator.manual_seed(0)
    # Batch 1: labels keep their native sizes, which may differ between images.
    workers = worker_count(num_workers)
    loader = DataLoader(dataset, batch_size=1, num_workers=workers, generator=generator,
                        pin_memory=device.type == "cuda")
    matrix = ConfusionMatrix(index.num_classes)
    for batch in ahead(loader, workers, device):
        label = batch["label"]  # (1, H, W) int64
        prediction = predict_classes(model, batch["image"].to(device), tuple(label.shape[-2:]),
                                     precision=config.inference_precision)
        matrix.update(prediction.cpu(), label)
    return float(matrix.miou(index.classes.primary_protocol[1]))
