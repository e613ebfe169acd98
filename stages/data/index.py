"""The dataset index artifact (`duda.dataset_index`): image/label pairs per domain and split.

`prepare-data` writes `index.json` (the `IndexFile` model) into the artifact; every later stage
reads it through `load_dataset_index`. Labels listed here are already trainIds (uint8 PNG,
255 = ignore): conversion happens once, in prepare-data. A relative path in the index is
relative to the artifact directory (converted labels, the synthetic benchmark); an absolute one
points into the user's dataset.

Each label's SHA-256 is recorded with it (`label_sha256`; absent in an index written before
digests were recorded), and `Sample.read_label` refuses a label edited after indexing: a value
outside the class table would otherwise reach the loss, and an edit to another valid class
would be trained on silently.

Each labelled sample also records its per-class pixel counts (`pixel_counts`, at the label
file's resolution; absent in an index written before they were kept), which rare-class sampling
draws images by (stages.data.rare_classes); a split's `pixel_counts` is their sum.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from stages.artifacts.manifest import DATASET_INDEX, ArtifactRef, Manifest, load_artifact
from stages.data.classes import ClassTable
from stages.data.io import read_label
from stages.runtime.errors import DudaError

INDEX_FILE = "index.json"

Domain = Literal["source", "target"]


class SampleEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    image: str
    label: str | None = None
    label_sha256: str | None = None  # of the label file's bytes, as prepare-data checked it
    pixel_counts: list[int] | None = None  # per trainId, in this sample's label


class SplitEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    samples: list[SampleEntry]
    pixel_counts: list[int] | None = None  # per trainId, over the split's labels


class DomainEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    layout: str
    root: str | None = None
    splits: dict[str, SplitEntry]


class IndexFile(BaseModel):
    """The content of `index.json`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    classes: ClassTable
    domains: dict[str, DomainEntry]


@dataclass(frozen=True)
class Sample:
    """One image with its trainId label (None where the split has no ground truth)."""

    id: str
    image: Path
    label: Path | None
    label_sha256: str | None = None
    num_classes: int | None = None  # of the index's class table, which label values must fit

    def read_label(self) -> np.ndarray:
        """(H, W) uint8 trainIds; a label changed since indexing, or holding a value outside
        the class table, is a DudaError naming the file."""
        if self.label is None:
            raise DudaError(f"sample {self.id} ({self.image}) has no label",
                            "train and evaluate on a split with labels")
        return read_label(self.label, self.num_classes, self.label_sha256)


class DatasetIndex:
    """A loaded, validated dataset index artifact."""

    def __init__(self, path: Path, manifest: Manifest, content: IndexFile) -> None:
        self.path = path
        self.manifest = manifest
        self.content = content

    @property
    def classes(self) -> ClassTable:
        return self.content.classes

    @property
    def num_classes(self) -> int:
        return self.content.classes.num_classes

    @property
    def ref(self) -> ArtifactRef:
        return self.manifest.ref(self.path)

    def has_split(self, domain: Domain, split: str) -> bool:
        entry = self.content.domains.get(domain)
        return entry is not None and split in entry.splits

    def samples(self, domain: Domain, split: str) -> list[Sample]:
        """The samples of `domain`/`split`, in index order (the order stores use)."""
        if not self.has_split(domain, split):
            present = {d: sorted(e.splits) for d, e in self.content.domains.items()}
            raise DudaError(f"dataset index {self.path} has no {domain} split '{split}' "
                            f"(it has {present})",
                            "add the split to data.<domain>.splits and rerun prepare-data")
        return [Sample(id=s.id, image=self._resolve(s.image),
                       label=self._resolve(s.label) if s.label is not None else None,
                       label_sha256=s.label_sha256, num_classes=self.num_classes)
                for s in self.content.domains[domain].splits[split].samples]

    def image_pixel_counts(self, domain: Domain, split: str) -> np.ndarray:
        """(N, C) int64: per sample of `domain`/`split` (index order), its label's pixels of
        each class. An index written before per-image counts were kept is refused."""
        self.samples(domain, split)  # refuses a missing split with its message
        entries = self.content.domains[domain].splits[split].samples
        missing = [entry.id for entry in entries if entry.pixel_counts is None]
        if missing:
            raise DudaError(f"dataset index {self.path} has no per-image class pixel counts "
                            f"for {domain}/{split} (first: {missing[0]}); rare-class sampling "
                            "needs them",
                            "rerun duda prepare-data --force to rebuild the index with them, "
                            "or set input.rare_class_sampling.enabled: false")
        counts = np.asarray([entry.pixel_counts for entry in entries], np.int64)
        if counts.shape != (len(entries), self.num_classes):
            raise DudaError(f"dataset index {self.path}: the per-image class pixel counts of "
                            f"{domain}/{split} do not have {self.num_classes} classes",
                            "rerun duda prepare-data --force")
        return counts

    def _resolve(self, path: str) -> Path:
        candidate = Path(path)
        return candidate if candidate.is_absolute() else self.path / candidate


def load_dataset_index(path: str | Path) -> DatasetIndex:
    """Load and validate a dataset index artifact."""
    path = Path(path)
    manifest = load_artifact(path, DATASET_INDEX)
    index_path = path / INDEX_FILE
    try:
        content = IndexFile.model_validate_json(index_path.read_text())
    except FileNotFoundError:
        raise DudaError(f"dataset index {path} has a manifest but no {INDEX_FILE}",
                        "rebuild it with `duda prepare-data --force`") from None
    except (ValidationError, ValueError) as error:
        raise DudaError(f"dataset index {path}: {INDEX_FILE} is corrupt "
                        f"({str(error).splitlines()[0]})",
                        "rebuild it with `duda prepare-data --force`") from None
    return DatasetIndex(path.resolve(), manifest, content)


def check_classes(index: DatasetIndex, names: list[str] | tuple[str, ...], what: str) -> None:
    """Refuse an artifact (`what`) whose class names differ from the dataset index's."""
    if tuple(names) != tuple(index.classes.names):
        raise DudaError(f"{what} was made for {len(names)} classes ({', '.join(names[:3])}, …) "
                        f"but dataset index {index.path} has {index.classes.describe()}",
                        "use artifacts made for the same class table, or rebuild them "
                        "against this dataset index")
