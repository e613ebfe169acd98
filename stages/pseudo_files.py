"""Pseudo-label stores to and from folders of PNG files (`duda pseudo import|export`).

`run()` is the import stage: it builds a finished store artifact from one label PNG per
target-train image (published initial labels, say), with confidence 1 where labelled. `export`
writes a store's labels as PNGs, into a new folder or an earlier export only, after checking
every chunk.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from PIL import Image

from stages.artifact_writer import ArtifactWriter, check_not_input, is_ours, write_marker
from stages.artifacts import PSEUDO_LABELS, StageResult, atomic_open
from stages.classes import IGNORE_INDEX
from stages.data.index import load_dataset_index
from stages.data.io import open_image, open_label_image
from stages.errors import DudaError
from stages.metrics import label_statistics
from stages.pseudo_store import STORE_METADATA, PseudoLabelStore, create_store
from stages.reporting import Reporter

LABEL_EXPORT = "duda.label_export"


def export(store: PseudoLabelStore, directory: str | Path, colour: bool = False,
                  reporter: Reporter | None = None) -> int:
    """Write one PNG per image, `<id>.png`: single-channel trainIds (255 = ignore), or with
    `colour` a palette PNG whose pixel values are still the trainIds. Returns the count.

    `directory` must be new, empty, or an earlier export (it carries the project's marker);
    every chunk is checked before the first PNG is written."""
    directory = Path(directory)
    check_not_input(directory, [store.path])
    if directory.exists() and not (directory.is_dir() and (
            not any(directory.iterdir()) or is_ours(directory))):
        raise DudaError(f"{directory} exists and is not an earlier label export; its files are "
                        "left untouched", "export into a new or empty folder")
    store.validate(reporter)
    write_marker(directory, LABEL_EXPORT, "pseudo_export")
    palette = None
    if colour:
        colours = store.palette or _default_palette(store.num_classes)
        palette = [0] * 768
        for c, rgb in enumerate(colours):
            palette[3 * c:3 * c + 3] = [int(v) for v in rgb]
    reporter = reporter or Reporter()
    with reporter.task("export", total=len(store)) as task:
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
    offenders.
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
    width, height = open_image(samples[0].image).size
    num_classes = index.num_classes
    wrong_size, out_of_range = [], []
    for path in matched:
        image = open_label_image(path)  # a corrupt or lossy (non-PNG) file is a DudaError
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
    reporter = reporter or Reporter()
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
                labels = np.asarray(open_label_image(path))
                store.write(i, labels, (labels != IGNORE_INDEX).astype(np.float32))
                task.advance(1)
        store.set_selector({"name": "imported", "directory": str(directory.resolve())})
        statistics = label_statistics(store)
        store.set_statistics(statistics)
        store.check_complete()
        summary = {"images": len(store), "label_size": [height, width],
                   "selector": store.selector,
                   "labelled_fraction": statistics["labelled_fraction"],
                   "per_class": {name: {"kept_pixels": statistics["kept_pixels"][c],
                                        "coverage": statistics["coverage"][c]}
                                 for c, name in enumerate(store.class_names)}}
        writer.finish(summary, content=[STORE_METADATA])
    return writer.result()
