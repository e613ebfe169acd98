"""The `prepare-data` stage: build the dataset index artifact (`duda.dataset_index`).

For each domain and split of the config it lists the image/label pairs of the dataset layout
(`stages.data.layouts`), or generates the built-in synthetic benchmark (`stages.data.synthetic`),
then checks every pair in worker processes: the image decodes, the label decodes, has one channel
(SYNTHIA: several by design), holds only values of its class table and matches the image size.
Labels that are not trainIds already are converted once and written into the artifact
(`labels/<domain>/<split>/<id>.png`); later stages read only trainIds. The index records
per-class pixel counts per labelled image (what rare-class sampling draws by,
docs/method.md#rare-class-sampling) and their sum per split, and the SHA-256 of every label, so a label edited later is
refused where it is read (stages.data.index); the summary shows the pairs and class pixel shares.

Artifact layout: `index.json` (stages.data.index.IndexFile), `labels/` (converted labels),
`images/` (synthetic benchmark only), `manifest.json`.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from stages.artifacts.manifest import DATASET_INDEX, StageResult
from stages.artifacts.writer import ArtifactWriter
from stages.config import Config, DataConfig, DomainConfig, stage_config, stage_hash
from stages.data import synthetic
from stages.data.classes import CITYSCAPES_CLASSES, ClassTable, class_table
from stages.data.index import INDEX_FILE, DomainEntry, IndexFile, SampleEntry, SplitEntry
from stages.data.io import file_sha256
from stages.data.layouts import IN_PLACE, PairResult, SplitListing, convert_pair, list_split
from stages.runtime.devices import available_cores
from stages.runtime.errors import DudaError
from stages.runtime.progress import Reporter

PARALLEL_MIN = 64  # fewer jobs than this run in-process: starting workers would cost more
SHOWN = 5


def run(config: Config, out: Path, *, force: bool = False,
        reporter: Reporter | None = None) -> StageResult:
    """Index (or generate) the datasets of `config.data` into the artifact at `out`."""
    reporter = reporter or Reporter()
    section = stage_config(config, "prepare_data")
    roots = [domain.root for domain in (config.data.source, config.data.target) if domain.root]
    with ArtifactWriter(out, kind=DATASET_INDEX, stage="prepare_data", config=section,
                        config_hash=stage_hash(config, "prepare_data"), protect=roots,
                        force=force) as writer:
        if writer.up_to_date:
            return writer.result()
        data = config.data
        classes = class_table(data)
        # List every split first, so a layout error shows before any long conversion.
        listings = {(domain, split): list_split(domain, getattr(data, domain), split)
                    for domain in ("source", "target")
                    for split in _splits(domain, getattr(data, domain))
                    if getattr(data, domain).layout != "synthetic"}
        domains: dict[str, DomainEntry] = {}
        rows: list[dict[str, Any]] = []
        warnings: list[str] = []
        for domain in ("source", "target"):
            domain_config: DomainConfig = getattr(data, domain)
            splits: dict[str, SplitEntry] = {}
            for split in _splits(domain, domain_config):
                if domain_config.layout == "synthetic":
                    entry, row = _generate(data, domain, split, writer.work, reporter)
                else:
                    entry, row = _convert(listings[domain, split], domain_config, classes,
                                          _workers(data), writer.work, reporter, warnings)
                row["pixel_shares"] = pixel_shares(entry.pixel_counts, classes.names)
                splits[split] = entry
                rows.append(row)
            domains[domain] = DomainEntry(layout=domain_config.layout, root=domain_config.root,
                                          splits=splits)
        text = IndexFile(classes=classes, domains=domains).model_dump_json(indent=1)
        (writer.work / INDEX_FILE).write_text(text)
        writer.finish({"splits": rows, "classes": list(classes.names), "warnings": warnings},
                      content=[INDEX_FILE])
    return writer.result()


def _workers(data: DataConfig) -> int:
    """Decoding processes: `data.workers`, or with `auto` every available core (nothing else
    runs beside them)."""
    return available_cores() if data.workers == "auto" else int(data.workers)


def pixel_shares(counts: list[int] | None, names: tuple[str, ...]) -> dict[str, float]:
    """{class name: share of the split's labelled pixels}; empty without labels."""
    if not counts or sum(counts) == 0:
        return {}
    total = float(sum(counts))
    return {name: round(count / total, 6) for name, count in zip(names, counts)}


def _splits(domain: str, config: DomainConfig) -> list[str]:
    if len(set(config.splits)) != len(config.splits):
        raise DudaError(f"data.{domain}.splits lists a split twice: {config.splits}",
                        "list each split once")
    return list(config.splits)


def _call(job: tuple[Callable[..., Any], tuple[Any, ...]]) -> Any:
    function, arguments = job
    return function(*arguments)


def _map(function: Callable[..., Any], jobs: list[tuple[Any, ...]],
         workers: int) -> Iterator[Any]:
    """`function(*job)` for every job, in order; in `workers` processes for long job lists."""
    if workers <= 1 or len(jobs) < PARALLEL_MIN:
        for job in jobs:
            yield function(*job)
        return
    # spawn, not fork: the parent may hold torch threads that a forked child cannot use.
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        yield from pool.imap(_call, [(function, job) for job in jobs], chunksize=4)


def _convert(listing: SplitListing, config: DomainConfig, classes: ClassTable, workers: int,
             out: Path, reporter: Reporter,
             warnings: list[str]) -> tuple[SplitEntry, dict[str, Any]]:
    """Check (and convert) every pair of one split; returns its index entry and summary row."""
    name = f"{listing.domain}/{listing.split}"
    jobs = []
    for pair in listing.pairs:
        converted = pair.label is not None and pair.label_format not in IN_PLACE
        output = out / _label_path(listing.domain, listing.split, pair.id) if converted else None
        jobs.append((pair, classes.num_classes, output, listing.layout == "gta5"))
    samples: list[SampleEntry] = []
    mismatches: list[str] = []
    counts = np.zeros(classes.num_classes, np.int64)
    with reporter.task(f"{name}: checking {listing.layout} pairs", total=len(jobs)) as task:
        for (pair, _, output, _), result in zip(jobs, _map(convert_pair, jobs, workers)):
            result: PairResult
            if result.error is not None:
                raise DudaError(*result.error)
            task.advance(1)
            if result.size_mismatch is not None:
                mismatches.append(result.size_mismatch)
                continue
            if result.pixel_counts is not None:
                counts += np.asarray(result.pixel_counts, np.int64)
            label = None
            if pair.label is not None:
                label = (_label_path(listing.domain, listing.split, pair.id)
                         if output is not None else str(pair.label.resolve()))
            samples.append(SampleEntry(id=pair.id, image=str(pair.image.resolve()), label=label,
                                       label_sha256=result.label_sha256,
                                       pixel_counts=result.pixel_counts))
    if mismatches:
        message = (f"{name}: left out {len(mismatches)} {listing.layout} pair(s) whose image "
                   f"and label sizes differ (first: {'; '.join(mismatches[:SHOWN])})")
        warnings.append(message)
        reporter.info(message)
    if listing.excluded:
        reporter.info(f"{name}: left out {len(listing.excluded)} ids by "
                      f"exclude_iast_dropped ({', '.join(listing.excluded[:SHOWN])}, …)")
    if listing.images_without_labels:
        message = (f"{name}: no labels folder, so its {listing.images_without_labels} images "
                   "are indexed without labels")
        warnings.append(message)
        reporter.info(message)
    if not samples:
        raise DudaError(f"{name}: no usable pairs are left in {config.root}",
                        "check the dataset: every pair was left out")
    labelled = any(sample.label is not None for sample in samples)
    entry = SplitEntry(samples=samples,
                       pixel_counts=[int(c) for c in counts] if labelled else None)
    row = {"domain": listing.domain, "split": listing.split, "layout": listing.layout,
           "pairs": sum(sample.label is not None for sample in samples),
           "images_without_labels": listing.images_without_labels,
           "labels_without_images": 0, "excluded": len(listing.excluded),
           "size_mismatches": len(mismatches)}
    return entry, row


def _label_path(domain: str, split: str, sample_id: str) -> str:
    return f"labels/{domain}/{split}/{sample_id}.png"


def _generate(data: DataConfig, domain: str, split: str, out: Path,
              reporter: Reporter) -> tuple[SplitEntry, dict[str, Any]]:
    """Generate one split of the synthetic benchmark into the artifact."""
    sizes = data.synthetic
    count = getattr(sizes, f"num_{domain}_{split}", None)
    if count is None:
        raise DudaError(f"data.{domain}.splits has '{split}', but the synthetic benchmark has "
                        "the splits train and val only",
                        f"set data.{domain}.splits to [train, val] (or a subset)")
    jobs, samples = [], []
    for index in range(count):
        sample_id = f"{domain}_{split}_{index:05d}"
        image = f"images/{domain}/{split}/{sample_id}.png"
        label = _label_path(domain, split, sample_id)
        jobs.append((sizes.seed, domain, split, index, sizes.height, sizes.width,
                     out / image, out / label, sizes.pair))
        samples.append(SampleEntry(id=sample_id, image=image, label=label))
    for folder in ("images", "labels"):
        (out / folder / domain / split).mkdir(parents=True, exist_ok=True)
    counts = np.zeros(len(CITYSCAPES_CLASSES), np.int64)
    per_image: list[list[int]] = []
    with reporter.task(f"{domain}/{split}: generating synthetic scenes", total=count) as task:
        for pixel_counts in _map(synthetic.write_sample, jobs, _workers(data)):
            counts += np.asarray(pixel_counts, np.int64)
            per_image.append(pixel_counts)
            task.advance(1)
    samples = [sample.model_copy(update={"label_sha256": file_sha256(out / sample.label),
                                         "pixel_counts": image_counts})
               for sample, image_counts in zip(samples, per_image)]  # every image is labelled
    entry = SplitEntry(samples=samples, pixel_counts=[int(c) for c in counts])
    row = {"domain": domain, "split": split, "layout": "synthetic", "pairs": count,
           "images_without_labels": 0, "labels_without_images": 0, "excluded": 0,
           "size_mismatches": 0}
    return entry, row
