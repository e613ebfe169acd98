"""Pseudo-label stores to and from folders of PNG files (`duda pseudo import|export`).

`run()` is the import stage: it builds a finished store artifact from one label PNG per
target-train image (published initial labels, say), with confidence 1 where labelled. `export`
writes a store's labels as PNGs, into a new folder or an earlier export only, after checking
every chunk; `overlays` draws the first images' labels and confidence over them for a look.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from PIL import Image

from stages.artifacts.manifest import PSEUDO_LABELS, StageResult, atomic_open
from stages.artifacts.writer import ArtifactWriter, check_not_input, claim, is_ours
from stages.data.classes import IGNORE_INDEX
from stages.data.index import DatasetIndex, load_dataset_index
from stages.data.io import image_size, open_image, open_label_image
from stages.engine.metrics import label_statistics
from stages.engine.predictions import colorize
from stages.runtime.errors import DudaError
from stages.runtime.progress import Reporter
from stages.store.pseudo_store import STORE_METADATA, PseudoLabelStore, create_store

LABEL_EXPORT = "duda.label_export"
LABEL_OVERLAYS = "duda.label_overlays"


def export(store: PseudoLabelStore, directory: str | Path, colour: bool = False,
                  reporter: Reporter | None = None) -> int:
    """Write one PNG per image, `<id>.png`: single-channel trainIds (255 = ignore), or with
    `colour` a palette PNG whose pixel values are still the trainIds. Returns the count.

    `directory` must be new, empty, or an earlier export (it carries the project's marker);
    every chunk is checked before the first PNG is written."""
    directory = _claimable(directory, [store.path], "an earlier label export",
                           "export into a new or empty folder")
    store.validate(reporter)
    palette = None
    if colour:
        colours = store.palette or _default_palette(store.num_classes)
        palette = [0] * 768
        for c, rgb in enumerate(colours):
            palette[3 * c:3 * c + 3] = [int(v) for v in rgb]
    reporter = reporter or Reporter()
    with (claim(directory, LABEL_EXPORT, "pseudo_export"),  # removed again if a write fails
          reporter.task("export", total=len(store)) as task):
        for i, sample_id in enumerate(store.ids):
            labels = store.read_labels(i)
            if palette is None:
                image = Image.fromarray(labels, mode="L")
            else:
                image = Image.fromarray(labels, mode="P")
                image.putpalette(palette)
            with atomic_open(directory / f"{sample_id}.png") as handle:
                image.save(handle, format="PNG")
            task.advance(1)
    return len(store)


def overlays(store: PseudoLabelStore, index: DatasetIndex, directory: str | Path,
             images: int, reporter: Reporter | None = None) -> list[Path]:
    """Write `<id>.png` panels for the store's first `images` images: the image | its stored
    labels over it (unlabelled pixels dimmed) | the stored confidence (white = 1) | the
    ground truth where target-train has one. Returns the files written.

    `directory` must be new, empty, or an earlier overlay folder (it carries the project's
    marker)."""
    directory = _claimable(directory, [store.path, index.path], "an earlier overlay folder",
                           "write the overlays into a new or empty folder")
    samples = {sample.id: sample for sample in index.samples("target", "train")}
    missing = [sample_id for sample_id in store.ids[:images] if sample_id not in samples]
    if missing:
        raise DudaError(f"{index.path} has no target-train image {missing[0]} of store "
                        f"{store.path}", "pass the dataset index the store was made from")
    palette = store.palette or _default_palette(store.num_classes)
    written = []
    reporter = reporter or Reporter()
    with (claim(directory, LABEL_OVERLAYS, "pseudo_overlays"),
          reporter.task("overlays", total=min(images, len(store))) as task):
        for i, sample_id in enumerate(store.ids[:images]):
            sample = samples[sample_id]
            labels, levels = store.read_labels(i), store.read_levels(i)
            size = (labels.shape[1], labels.shape[0])
            image = np.asarray(open_image(sample.image).convert("RGB").resize(
                size, Image.Resampling.BILINEAR))
            coloured = colorize(labels, palette)
            labelled = (labels != IGNORE_INDEX)[..., None]
            blended = np.where(labelled, (0.4 * image + 0.6 * coloured), 0.35 * image)
            parts = [image, blended.astype(np.uint8), np.repeat(levels[..., None], 3, axis=2)]
            if sample.label is not None:
                truth = Image.fromarray(sample.read_label()).resize(
                    size, Image.Resampling.NEAREST)
                parts.append(colorize(np.asarray(truth), palette))
            path = directory / f"{sample_id}.png"
            with atomic_open(path) as handle:
                Image.fromarray(np.concatenate(parts, axis=1)).save(handle, format="PNG")
            written.append(path)
            task.advance(1)
    return written


def _claimable(directory: str | Path, inputs: list[Path], what: str, fix: str) -> Path:
    """`directory`, if it is none of `inputs` and is new, empty or carries the project's marker
    (an earlier output of the same command); otherwise a DudaError, nothing touched."""
    directory = Path(directory)
    check_not_input(directory, inputs)
    if directory.exists() and not (directory.is_dir() and (
            not any(directory.iterdir()) or is_ours(directory))):
        raise DudaError(f"{directory} exists and is not {what}; its files are left untouched",
                        fix)
    return directory


def _label_png(path: Path) -> Image.Image:
    """A decoded label PNG of the import folder; its errors point at the folder, not at the
    dataset (the labels are the user's files, prepare-data never saw them)."""
    try:
        return open_label_image(path)
    except DudaError as error:
        raise DudaError(error.message, f"replace {path.name} in the label folder with a "
                        "single-channel PNG of trainIds (255 = ignore), then rerun "
                        "`duda pseudo import`") from None


def _report_ignored(directory: Path, files: dict[str, list[Path]], matched: list[Path],
                    reporter: Reporter) -> int:
    """Say which files of the label folder the import leaves out, and why; returns how many."""
    used = set(matched)
    unmatched = [str(path.relative_to(directory)) for paths in files.values() for path in paths
                 if path not in used]
    others = [str(path.relative_to(directory)) for path in sorted(directory.rglob("*"))
              if path.is_file() and path.suffix != ".png"]
    if unmatched:
        reporter.info(f"ignored {len(unmatched)} PNG(s) in {directory} named like no "
                      f"target-train image (neither <sample id>.png nor <image stem>.png): "
                      f"{_first(unmatched)}")
    if others:
        reporter.info(f"ignored {len(others)} file(s) in {directory} that are not .png: "
                      f"{_first(others)}")
    return len(unmatched) + len(others)


def _default_palette(count: int) -> list[tuple[int, int, int]]:
    rng = np.random.default_rng(0)
    return [tuple(int(v) for v in rng.integers(0, 256, 3)) for _ in range(count)]


def _first(items: list[str], count: int = 5) -> str:
    more = f", … ({len(items)} in all)" if len(items) > count else ""
    return ", ".join(items[:count]) + more


def run(directory: str | Path, data: str | Path, out: str | Path, *, force: bool = False,
        reporter: Reporter | None = None) -> StageResult:
    """Build a finished store from a folder of label PNGs named like the target-train images.

    A PNG matches a sample by its id (`<id>.png`) or its image's stem (`<stem>.png`), searched
    recursively. Every image needs one; every PNG must have the images' size and hold values
    in 0..C−1 or 255. Confidence is 1 where labelled and 0 elsewhere. Errors list the first
    offenders; files that match no image are left out and listed (`reporter.info`).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise DudaError(f"label folder {directory} does not exist",
                        "pass the folder holding one label PNG per target-train image")
    index = load_dataset_index(data)
    samples = index.samples("target", "train")
    files: dict[str, list[Path]] = {}
    for path in sorted(directory.rglob("*.png")):
        files.setdefault(path.stem, []).append(path)
    duplicates = [f"{stem} ({len(paths)} files)" for stem, paths in files.items()
                  if len(paths) > 1]
    if duplicates:
        raise DudaError(f"label folder {directory} holds several PNGs with the same name: "
                        f"{_first(duplicates)}", "keep one label PNG per image")
    matched: list[Path] = []
    missing: list[str] = []
    for sample in samples:
        path = files.get(sample.id) or files.get(sample.image.stem)
        if path is None:
            missing.append(sample.id)
        else:
            matched.append(path[0])
    if missing:
        raise DudaError(f"label folder {directory} has no PNG for {len(missing)} of "
                        f"{len(samples)} target-train images: {_first(missing)}",
                        "name each PNG like its image (<image stem>.png or <sample id>.png)")
    reporter = reporter or Reporter()
    ignored = _report_ignored(directory, files, matched, reporter)
    width, height = image_size(samples[0].image)
    num_classes = index.num_classes
    wrong_size, out_of_range = [], []
    for path in matched:
        image = _label_png(path)  # a corrupt, oversized or lossy (non-PNG) file is a DudaError
        if image.size != (width, height):
            wrong_size.append(f"{path.name} ({image.size[1]}×{image.size[0]})")
            continue
        labels = np.asarray(image)
        if labels.ndim != 2:
            raise DudaError(f"{path} has {labels.shape[2]} channels; a label PNG has one",
                            "write single-channel (or palette) PNGs of trainIds, 255 = ignore")
        bad = np.unique(labels[(labels >= num_classes) & (labels != IGNORE_INDEX)])
        if bad.size:
            out_of_range.append(f"{path.name} ({', '.join(str(v) for v in bad[:4])})")
    if wrong_size:
        raise DudaError(f"{len(wrong_size)} label PNGs are not {height}×{width} like the "
                        f"target-train images: {_first(wrong_size)}",
                        "resize the labels (nearest neighbour) to the images' size")
    if out_of_range:
        raise DudaError(f"{len(out_of_range)} label PNGs hold values outside 0..{num_classes - 1}"
                        f" and {IGNORE_INDEX}: {_first(out_of_range)}",
                        "write trainIds (not label ids or colours), 255 = ignore")
    listing = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in matched]
    config = {"directory": str(directory.resolve())}
    identity = hashlib.sha256(json.dumps([config, listing]).encode()).hexdigest()[:16]
    with ArtifactWriter(out, kind=PSEUDO_LABELS, stage="pseudo_import", config=config,
                        config_hash=identity, inputs={"data": index.ref},
                        protect=[directory], force=force) as writer:
        if writer.up_to_date:
            return writer.result()
        store = create_store(writer.work, ids=[sample.id for sample in samples], height=height,
                             width=width, class_names=index.classes.names,
                             index_id=index.manifest.id, palette=index.classes.palette)
        with reporter.task("import", total=len(matched)) as task:
            for i, path in enumerate(matched):
                labels = np.asarray(_label_png(path))
                store.write(i, labels, (labels != IGNORE_INDEX).astype(np.float32))
                task.advance(1)
        store.set_selector({"name": "imported", "directory": str(directory.resolve())})
        statistics = label_statistics(store)
        store.set_statistics(statistics)
        store.check_complete()
        summary = {"images": len(store), "label_size": [height, width], "ignored_files": ignored,
                   "selector": store.selector,
                   "labelled_fraction": statistics["labelled_fraction"],
                   "per_class": {name: {"kept_pixels": statistics["kept_pixels"][c],
                                        "coverage": statistics["coverage"][c]}
                                 for c, name in enumerate(store.class_names)}}
        writer.finish(summary, content=STORE_METADATA)
    return writer.result()
