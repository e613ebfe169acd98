"""The `predict` stage: segment a folder of images (or a dataset split) and write prediction PNGs.

Inference is evaluate's (`config.evaluate`: the inference size, sliding window, flip, teacher
or student of `evaluate.inference`, and BN recalibration on target-train when
`evaluate.recalibration.enabled`, which needs a dataset index); the scores are resized bilinearly to each image's own size, so every PNG has the size
of its input image. One PNG per image and format, named by the input image's file stem:

- `trainid/<stem>.png`: the class index per pixel (uint8; for Cityscapes tables the trainId);
- `labelid/<stem>.png`: the Cityscapes label id (the official trainId -> labelId table), what
  the Cityscapes evaluator and benchmark server read; only for the 19-class Cityscapes table;
- `color/<stem>.png`: RGB in the class table's palette;
- `confidence/<stem>.png`: uint8, round(255 × the probability of the predicted class).

Keeping the input stem means a split of a prepared Cityscapes index gives
`<city>_<seq>_<frame>_leftImg8bit.png`, which cityscapesscripts' evaluator matches to its
`<city>_<seq>_<frame>_gtFine_labelIds.png` ground truth. Images are decoded ahead of the model (in
loader processes, or on a background thread with `num_workers: 0`) and PNGs are encoded on background threads, so neither stalls the model; a writer's
error is raised before the manifest is written. The artifact (`duda.predictions`) lists the
images and formats in `predictions.json`. Unreadable images are collected over the whole input
and named together; like every other refusal, they leave no output behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from stages.artifacts.checkpoint import check_compatible, load_checkpoint_manifest, load_model
from stages.artifacts.manifest import PREDICTIONS, ArtifactRef, StageResult, atomic_write_json
from stages.artifacts.writer import ArtifactWriter
from stages.config import Config, recorded_hash
from stages.data.classes import (
    CITYSCAPES_CLASSES,
    ClassTable,
    cityscapes_table,
    custom_table,
)
from stages.data.crops import resize_image
from stages.data.index import DatasetIndex, Domain, load_dataset_index
from stages.data.io import read_image
from stages.data.transforms import Normalization, normalize
from stages.engine.inference import (
    SlidingWindow,
    full_image_loader,
    predict_scores,
    recalibrate_on_target,
    sliding_window,
)
from stages.engine.predictions import (
    DEFAULT_FORMATS,
    BackgroundWriter,
    check_formats,
    parse_formats,
    write_prediction,
)
from stages.runtime.devices import resolve_device
from stages.runtime.errors import DudaError
from stages.runtime.progress import Reporter
from stages.store.levels import quantize

logger = logging.getLogger("duda")

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".tif", ".tiff", ".webp"})
LISTING_FILE = "predictions.json"
IMAGES = "images"  # the kind recorded for an input that is a plain folder of images

# --------------------------------------------------------------------------- the images


@dataclass(frozen=True)
class InputImage:
    """One image to segment: the stem its PNGs are named by, and its file."""

    stem: str
    path: Path


def find_images(folder: str | Path) -> list[InputImage]:
    """The images under `folder` (recursively; hidden files and folders skipped), sorted by
    path. An empty folder and two images with the same stem are DudaErrors."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DudaError(f"--images {folder} is not a folder" if folder.exists()
                        else f"--images {folder} does not exist",
                        "pass the folder that holds the images")
    paths = sorted(path for path in folder.rglob("*")
                   if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()
                   and not any(part.startswith(".") for part in path.relative_to(folder).parts))
    if not paths:
        raise DudaError(f"--images {folder} holds no images (searched recursively for "
                        f"{', '.join(sorted(IMAGE_SUFFIXES))})",
                        "pass the folder that holds the images, or use --split with a dataset "
                        "index")
    return _unique([InputImage(path.stem, path) for path in paths], f"--images {folder}")


def split_images(index: DatasetIndex, domain: Domain, split: str) -> list[InputImage]:
    """The images of a dataset split in index order, each named by its file's stem (a
    Cityscapes image keeps `<city>_<seq>_<frame>_leftImg8bit`)."""
    samples = index.samples(domain, split)
    if not samples:
        raise DudaError(f"the {domain} split '{split}' of dataset index {index.path} is empty",
                        "predict a split with images")
    return _unique([InputImage(sample.image.stem, sample.image) for sample in samples],
                   f"the {domain} split '{split}' of {index.path}")


def _unique(images: list[InputImage], where: str) -> list[InputImage]:
    seen: dict[str, Path] = {}
    for image in images:
        if image.stem in seen:
            raise DudaError(f"{where} holds two images named {image.stem}: {seen[image.stem]} and "
                            f"{image.path}; their predictions would overwrite each other",
                            "rename one of them, or predict the folders one at a time")
        seen[image.stem] = image.path
    return images


def folder_ref(folder: Path, images: list[InputImage]) -> ArtifactRef:
    """The input record of a plain folder: an id derived from its images' relative paths,
    sizes and modification times (a changed image changes the id)."""
    listing = []
    for image in images:
        stat = image.path.stat()
        listing.append([str(image.path.relative_to(folder)), stat.st_size, stat.st_mtime_ns])
    digest = hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:16]
    return ArtifactRef(kind=IMAGES, id=digest, path=str(folder.resolve()))


class _Images(Dataset):
    """Items: index, the image at the inference size, normalised (3, H, W) float32, and its
    native (H, W); or, for an image that does not decode, the error instead (returned, not
    raised, so that every unreadable file can be named at the end)."""

    def __init__(self, images: list[InputImage], size: tuple[int, int],
                 normalization: Normalization) -> None:
        self.images = images
        self.size = size
        self.normalization = normalization

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        try:
            image = read_image(self.images[index].path)
        except DudaError as error:
            return {"index": index, "error": error.message}
        return {"index": index, "size": image.shape[:2],
                "image": normalize(resize_image(image, self.size), self.normalization)}


def _collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    good = [item for item in items if "error" not in item]
    return {"index": [item["index"] for item in good],
            "size": [tuple(int(v) for v in item["size"]) for item in good],
            "image": torch.stack([item["image"] for item in good]) if good else None,
            "errors": [item["error"] for item in items if "error" in item]}


# ------------------------------------------------------------------------------- stage


def run(config: Config, checkpoint: str | Path, out: str | Path, *,
        images: str | Path | None = None, data: str | Path | None = None,
        split: str | None = None, domain: Domain = "target",
        formats: str | Sequence[str] = DEFAULT_FORMATS, force: bool = False,
        device: str = "auto", reporter: Reporter | None = None) -> StageResult:
    """Segment every image of the folder `images`, or of `domain`/`split` of the dataset index
    `data`, with `checkpoint`; write the prediction PNGs of `formats` under `out`.

    `data` alongside `images` only serves the BN recalibration (evaluate.recalibration), which
    needs target-train images and is refused without a dataset index.
    """
    formats = parse_formats(formats)
    reporter = reporter or Reporter()
    settings = config.evaluate
    inference = settings.inference
    if (images is None) == (split is None):
        raise DudaError("give either a folder of images or a dataset split to predict",
                        "pass --images DIR, or --split SPLIT (with --data DATA)")
    if domain not in ("source", "target"):
        raise DudaError(f"--domain {domain!r} is not a domain", "use source or target")
    if split is not None and data is None:
        raise DudaError("--split needs the dataset index it is a split of",
                        "pass --data DATA")
    if settings.recalibration.enabled and data is None:
        raise DudaError("evaluate.recalibration recomputes BN statistics on target-train images, "
                        "which needs a dataset index",
                        "pass --data DATA, or --set evaluate.recalibration.enabled=false")
    torch_device = resolve_device(device)
    index = load_dataset_index(data) if data is not None else None
    checkpoint = Path(checkpoint)
    inputs = {"checkpoint": load_checkpoint_manifest(checkpoint).ref(checkpoint)}
    if index is not None:
        inputs["data"] = index.ref
    if images is not None:
        folder = Path(images)
        listed = find_images(folder)
        inputs[IMAGES] = folder_ref(folder, listed)
        protect: list[Path] = []
    else:
        assert index is not None and split is not None
        listed = split_images(index, domain, split)
        protect = sorted({image.path.parent for image in listed})
    size = _inference_size(config, domain)
    section = {"inference_precision": config.inference_precision,
               "input": config.input.model_dump(mode="json"),
               "evaluate": {"inference": inference.model_dump(mode="json"),
                            "recalibration": settings.recalibration.model_dump(mode="json")},
               "predict": {"formats": list(formats), "domain": domain, "split": split}}

    with ArtifactWriter(out, kind=PREDICTIONS, stage="predict", config=section,
                        config_hash=recorded_hash(section, "predict"), inputs=inputs,
                        protect=protect,
                        force=force, device=str(torch_device)) as writer:
        if writer.up_to_date:
            return writer.result()
        loaded = load_model(checkpoint, settings.inference.model, torch_device)
        if index is not None:
            check_compatible(loaded, index.classes.names, what=f"dataset index {index.path}")
            classes = index.classes
        elif tuple(loaded.class_names) == CITYSCAPES_CLASSES:
            classes = cityscapes_table()
        else:
            classes = custom_table(loaded.class_names)
        check_formats(formats, classes, f"checkpoint {checkpoint}")
        recalibration = None
        if settings.recalibration.enabled:
            assert index is not None
            recalibration = recalibrate_on_target(
                loaded.model, loaded.model_config.normalization, config, index,
                settings.recalibration, torch_device, reporter, inference.num_workers)
        window = sliding_window(inference, config.input.crop_size)
        sizes = _predict(loaded.model.eval(), listed, size, window, inference.flip,
                         loaded.model_config.normalization, formats, classes, writer.work,
                         torch_device, inference.batch_size, inference.num_workers, reporter,
                         config.inference_precision)
        atomic_write_json(writer.work / LISTING_FILE, {
            "formats": list(formats),
            "classes": list(classes.names),
            "images": [{"stem": image.stem, "image": str(image.path.resolve()),
                        "size": list(sizes[i])} for i, image in enumerate(listed)],
        })
        summary = {
            "images": len(listed), "formats": list(formats),
            "source": (str(Path(images).resolve()) if images is not None
                       else f"{domain}/{split} of {index.path}"),  # type: ignore[union-attr]
            "model": loaded.which, "iteration": loaded.iteration, "size": list(size),
            "flip": inference.flip, "sliding_window": window.describe() if window else None,
            "bn_recalibration": recalibration, "checkpoint": str(checkpoint.resolve()),
        }
        writer.finish(summary, content=[LISTING_FILE])
    return writer.result()


def _inference_size(config: Config, domain: Domain) -> tuple[int, int]:
    """evaluate.inference.size, else the domain's base size (as evaluate)."""
    size = config.evaluate.inference.size
    if size is not None:
        return (size[0], size[1])
    base = config.input.target_size if domain == "target" else config.input.source_size
    return (base[0], base[1])


@torch.no_grad()
def _predict(model: torch.nn.Module, images: list[InputImage], size: tuple[int, int],
             window: SlidingWindow | None, flip: bool, normalization: Normalization,
             formats: tuple[str, ...], classes: ClassTable, out: Path, device: torch.device,
             batch_size: int, num_workers: int | str, reporter: Reporter,
             precision: str = "fp32") -> list[tuple[int, int]]:
    """Segment `images` and write their PNGs under `out`; returns each image's native size.

    Unreadable images do not stop the loop: the rest are still decoded (not segmented) so that
    the error names them all."""
    loader = full_image_loader(_Images(images, size, normalization), batch_size, num_workers,
                               device, collate=_collate)
    sizes: list[tuple[int, int]] = [(0, 0)] * len(images)
    unreadable: list[str] = []
    # Beside a CPU model, whose own threads take every core, one encoding thread is enough;
    # beside a GPU the cores are free.
    threads = 1 if device.type == "cpu" else 4
    with BackgroundWriter(threads, limit=max(8, 4 * batch_size)) as writer, \
            reporter.task(f"predicting {len(images)} images", total=len(images)) as task:
        for batch in loader:
            unreadable += batch["errors"]
            if unreadable or batch["image"] is None:
                task.advance(len(batch["index"]) + len(batch["errors"]))
                continue
            pixels = batch["image"].to(device, non_blocking=True)
            for rows, native in _groups_by_size(batch["size"]):
                scores, is_probability = predict_scores(model, pixels[rows], native, flip=flip,
                                                        sliding_window=window,
                                                        precision=precision)
                # The class evaluate takes (argmax of the same scores): max() returns the first
                # maximal index too, in a third of argmax's time over the class dimension.
                prediction = scores.max(1).indices.to(torch.uint8).cpu().numpy()
                confidence = None
                if "confidence" in formats:
                    probabilities = scores if is_probability else scores.softmax(1)
                    confidence = quantize(probabilities.amax(1))
                for row, i in enumerate(rows):
                    number = batch["index"][i]
                    sizes[number] = native
                    stem = images[number].stem
                    writer.submit(stem, write_prediction, out, stem, prediction[row],
                                  None if confidence is None else confidence[row], formats,
                                  classes)
            task.advance(len(batch["index"]))
        writer.flush()
    if unreadable:
        raise DudaError(f"{len(unreadable)} of {len(images)} images cannot be read: "
                        + "; ".join(unreadable[:10])
                        + (f"; … and {len(unreadable) - 10} more" if len(unreadable) > 10 else ""),
                        "replace or remove those files (nothing was written)")
    return sizes


def _groups_by_size(sizes: list[tuple[int, int]]) -> list[tuple[list[int], tuple[int, int]]]:
    """Batch rows grouped by native image size (one group when all images have one size)."""
    groups: dict[tuple[int, int], list[int]] = {}
    for row, size in enumerate(sizes):
        groups.setdefault(size, []).append(row)
    return [(rows, size) for size, rows in groups.items()]
