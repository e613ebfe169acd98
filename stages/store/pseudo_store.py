"""The pseudo-label store (`duda.pseudo_labels`): a zarr v3 group of labels and confidences.

The artifact directory is itself the zarr group, so any zarr client opens it directly:

- `labels`: uint8 (N, H, W) trainIds, 255 = ignore (fill value 255);
- `confidence`: uint8 (N, H, W), round(255 × the confidence) of every pixel (fill value 0), the
  quantiser of predict's confidence PNGs; every threshold is applied to this stored value;
- (format 1 only: `written`, uint8 (N,), a marker per written image);

each array chunked one image per chunk, zstd with its checksum on (labels level 9, which
stores them in fewer bytes than PNG files; the rest level 3), and each chunk bound to its image
by a digest in `<array>/digests/<i>` (`stages.store.chunk_files`; a store's `chunk_digests` attribute
says it has them: stores written before they existed are read unchecked). Group attributes
hold the image ids in dataset-index order, the class names (and palette), the dataset index id,
the class thresholds, the selector, per-class statistics and the parent version.

Every `zarr.json` of the store (the group's and each array's) is a content file whose digest the
manifest records, and opening a store checks that each array's metadata describes the layout
written here: metadata that does not parse or was edited (an `int8` data type) is a damaged
store, not a zarr error.

zarr fails silently in several ways (docs/design.md#zarr), guarded against here: every write
is validated (a uint8 array would wrap 300 to 44); every image is one chunk file per array,
written even when it holds only the fill value, and opening a store checks that every chunk file
exists (a missing chunk reads back as the fill value); readers open with `mode="r"` (the default
creates a missing store); consolidated metadata, which goes stale, is never used. Chunks are read
and written directly (`stages.store.chunk_files`: the same files, without zarr's per-call overhead).

Write-once: a store is writable only until its `manifest.json` exists. An update makes a new
version with `copy_store`, whose attributes (and the caller's manifest `inputs["parent"]`) name
its parent. Chunk files are replaced atomically (temp file + rename), so `copy_store` hard-links
the parent's chunk files: a write to the copy replaces its own directory entry and never touches
the parent. A `PseudoLabelStore` can be handed to DataLoader worker processes: the zarr handles
are opened lazily in each process and are not pickled.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from stages.artifacts.manifest import (
    MANIFEST,
    PSEUDO_LABELS,
    ArtifactRef,
    Manifest,
    link_or_copy,
    load_artifact,
)
from stages.artifacts.writer import write_marker
from stages.data.classes import IGNORE_INDEX
from stages.runtime.errors import DudaError
from stages.runtime.progress import Reporter
from stages.store.chunk_files import (
    ARRAY_CONFIG,
    ChunkDigestError,
    ChunkFiles,
    ChunkLayoutError,
    chunk_path,
    create_image_array,
    read_array_metadata,
)
from stages.store.levels import LEVELS, quantize

FORMAT = 2  # 1: float16 confidence (still read; every new store is 2)
READABLE_FORMATS = (1, 2)
ARRAYS = ("labels", "confidence")
# Every zarr.json of a store (the group's attributes, each array's layout): the content files
# whose digests a store's manifest records (docs/design.md#content-digests-and-ids).
STORE_METADATA = ("zarr.json", "labels/zarr.json", "confidence/zarr.json")
# The group attribute saying that every chunk has its digest file (see `stages.store.chunk_files`).
DIGESTS_ATTRIBUTE, DIGEST_SCHEME = "chunk_digests", "blake2b-128(array/image/chunk bytes)"
FIXED_ATTRIBUTES = ("duda_pseudo_labels", "ids", "class_names", "index_id", "height", "width",
                    DIGESTS_ATTRIBUTE)

ArrayLike = np.ndarray | torch.Tensor


# zstd level 9 for labels: measured on 1024×2048 pseudo-label maps, level 3 gives 1.28× the
# bytes of the same maps as PNG, level 9 0.95× at about 7 ms per map
# (benchmarks/pseudo_store_size.py); confidences stay at level 3 (17 ms instead of 100 ms).
LABEL_ZSTD_LEVEL = 9
ZSTD_LEVEL = 3


def _to_numpy(value: ArrayLike) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu").numpy()
    return np.asarray(value)


class PseudoLabelStore:
    """One version of the pseudo-label store, writable (while unfinished) or read-only."""

    def __init__(self, path: str | Path, *, writable: bool) -> None:
        self.path = Path(path)
        self.writable = writable
        self._pid: int | None = None
        self._group: zarr.Group | None = None
        self._arrays: dict[str, zarr.Array] = {}
        self._direct: dict[str, ChunkFiles | None] = {}
        attrs = self._open_group().attrs.asdict()
        self.format = attrs.get("duda_pseudo_labels")
        if self.format not in READABLE_FORMATS:
            raise DudaError(f"{self.path} is not a duda pseudo-label store (format "
                            f"{self.format!r}, expected one of {READABLE_FORMATS})",
                            "pass a store written by `duda generate-pseudo`, or rebuild it")
        if writable and self.format != FORMAT:
            raise DudaError(f"{self.path} is a format-{self.format} store, which is read only",
                            "write into a new store (copy_store converts it)")
        try:
            self.ids: list[str] = list(attrs["ids"])
            self.class_names: list[str] = list(attrs["class_names"])
            self.palette: list[list[int]] | None = attrs.get("palette")
            self.index_id: str = attrs["index_id"]
            self.height: int = int(attrs["height"])
            self.width: int = int(attrs["width"])
        except (KeyError, TypeError, ValueError) as error:
            raise self._damaged_metadata("zarr.json", f"its attributes lack or mangle {error}")
        self.digests = attrs.get(DIGESTS_ATTRIBUTE) == DIGEST_SCHEME
        self._check_layout()

    # ------------------------------------------------------------------ zarr handles

    def _open_group(self) -> zarr.Group:
        """The zarr group, opened once per process (DataLoader workers reopen it)."""
        if self._group is None or self._pid != os.getpid():
            if (self.path / "zarr.json").is_file():
                read_group_metadata(self.path)  # a damaged zarr.json named, not a zarr error
            try:
                self._group = zarr.open_group(self.path, mode="r+" if self.writable else "r",
                                              use_consolidated=False)
            except (FileNotFoundError, zarr.errors.GroupNotFoundError, ValueError) as error:
                raise DudaError(f"{self.path} holds no zarr pseudo-label store ({error})",
                                "pass a store written by `duda generate-pseudo`") from None
            self._pid = os.getpid()
            self._arrays = {}
        return self._group

    def _array(self, name: str) -> zarr.Array:
        group = self._open_group()
        if name not in self._arrays:
            try:
                array = group[name]
            except KeyError:
                raise DudaError(f"pseudo-label store {self.path} has no '{name}' array: it is "
                                "truncated", "rebuild it with --force") from None
            # write_empty_chunks is a runtime setting, not stored in the metadata.
            self._arrays[name] = array.with_config(ARRAY_CONFIG)  # type: ignore[union-attr]
        return self._arrays[name]

    def _files(self, name: str) -> ChunkFiles | None:
        """Direct chunk-file I/O for array `name` (zarr only for a format-1 store's float16
        confidence); metadata that does not parse or does not describe that layout is a
        damaged store."""
        if name not in self._direct:
            try:
                files = ChunkFiles.open(self.path / name, digests=self.digests)
            except ChunkLayoutError as error:
                raise self._damaged_metadata(f"{name}/zarr.json", str(error)) from None
            if files is None and not (self.format == 1 and name == "confidence"):
                raise self._damaged_metadata(f"{name}/zarr.json", "it does not describe the "
                                             "layout duda writes (" + _layout(self.path / name)
                                             + ")")
            self._direct[name] = files
        return self._direct[name]

    def _check_layout(self) -> None:
        """Every array of the store's format holds (N, H, W) images, one per chunk."""
        expected = (len(self.ids), self.height, self.width)
        for name in ARRAYS + (("written",) if self.format == 1 else ()):
            files = self._files(name) if name in ARRAYS else None
            try:
                shape = ((files.count, *files.shape) if files is not None
                         else tuple(self._array(name).shape))
            except DudaError:
                raise
            except Exception as error:  # noqa: BLE001 - zarr raises many types for bad metadata
                raise self._damaged_metadata(f"{name}/zarr.json", str(error)) from None
            if name != "written" and shape != expected:
                raise self._damaged_metadata(f"{name}/zarr.json",
                                             f"array '{name}' has shape {shape}, expected "
                                             f"{expected}")

    def _damaged_metadata(self, file: str, what: str) -> DudaError:
        return DudaError(f"pseudo-label store {self.path} is damaged: {file}: {what}",
                         "rebuild the store (rerun the stage that wrote it with --force); a "
                         "store must not be edited by hand")

    def _put(self, name: str, i: int, image: np.ndarray) -> None:
        files = self._files(name)
        if files is not None:
            files.write(i, image)
        else:
            self._array(name)[i] = image

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_group=None, _arrays={}, _direct={}, _pid=None)
        return state

    # ------------------------------------------------------------------ properties

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def attrs(self) -> dict[str, Any]:
        return self._open_group().attrs.asdict()

    @property
    def thresholds(self) -> list[float] | None:
        return self.attrs.get("thresholds")

    @property
    def statistics(self) -> dict[str, Any] | None:
        return self.attrs.get("statistics")

    @property
    def selector(self) -> dict[str, Any] | None:
        return self.attrs.get("selector")

    @property
    def parent(self) -> ArtifactRef | None:
        parent = self.attrs.get("parent")
        return ArtifactRef(**parent) if parent else None

    @property
    def finished(self) -> bool:
        return (self.path / MANIFEST).is_file()

    def manifest(self) -> Manifest:
        return load_artifact(self.path, PSEUDO_LABELS)

    # ------------------------------------------------------------------ writing

    def _check_writable(self) -> None:
        if not self.writable:
            raise DudaError(f"pseudo-label store {self.path} is opened read-only",
                            "make a new version with copy_store() and write into that")
        if self.finished:
            raise DudaError(f"pseudo-label store {self.path} is finished (it has a {MANIFEST}) "
                            "and stores are write-once",
                            "write a new version (update-offline, or copy_store()) instead")

    def _check_index(self, i: int) -> int:
        if not 0 <= int(i) < len(self.ids):
            raise IndexError(f"image {i} is outside the store's {len(self.ids)} images")
        return int(i)

    def validate_labels(self, labels: ArrayLike) -> np.ndarray:
        array = _to_numpy(labels)
        if array.shape != (self.height, self.width):
            raise ValueError(f"labels have shape {array.shape}, the store holds "
                             f"{(self.height, self.width)}")
        if array.dtype == np.bool_ or not np.issubdtype(array.dtype, np.integer):
            raise ValueError(f"labels must be integers, got {array.dtype} (a cast to uint8 "
                             "would wrap silently)")
        valid = (array == IGNORE_INDEX) | ((array >= 0) & (array < self.num_classes))
        if not valid.all():
            bad = np.unique(array[~valid])[:5].tolist()
            raise ValueError(f"labels hold values {bad} outside 0..{self.num_classes - 1} and "
                             f"{IGNORE_INDEX}")
        return array.astype(np.uint8, copy=False)

    def _validate_confidence(self, confidence: ArrayLike) -> np.ndarray:
        """Confidence as stored levels: uint8 levels as they are, floats in [0, 1] quantised."""
        array = _to_numpy(confidence)
        if array.shape != (self.height, self.width):
            raise ValueError(f"confidence has shape {array.shape}, the store holds "
                             f"{(self.height, self.width)}")
        if array.dtype == np.uint8:
            return array
        if not np.issubdtype(array.dtype, np.floating):
            raise ValueError(f"confidence must be floating point in [0, 1] or uint8 levels, got "
                             f"{array.dtype}")
        if not (np.isfinite(array).all() and array.min() >= 0.0 and array.max() <= 1.0):
            raise ValueError(f"confidence holds values outside [0, 1] (min {np.nanmin(array)}, "
                             f"max {np.nanmax(array)}) or non-finite values")
        return quantize(array)

    def write(self, i: int, labels: ArrayLike, confidence: ArrayLike) -> None:
        """Store image i: labels (H, W) integers in 0..C−1 or 255, confidence (H, W) floats in
        [0, 1] (quantised to levels) or uint8 levels.

        Validated before anything is written.
        """
        i, labels, levels = self.validate_write(i, labels, confidence)
        self.write_validated(i, labels, levels)

    def validate_write(self, i: int, labels: ArrayLike, confidence: ArrayLike,
                       ) -> tuple[int, np.ndarray, np.ndarray]:
        """Check a write without doing it: (index, uint8 labels, uint8 confidence levels)."""
        self._check_writable()
        return (self._check_index(i), self.validate_labels(labels),
                self._validate_confidence(confidence))

    def write_validated(self, i: int, labels: np.ndarray, levels: np.ndarray) -> None:
        """The chunk writes of `write`, for arrays `validate_write` returned."""
        self._put("labels", i, labels)
        self._put("confidence", i, levels)

    def write_labels(self, i: int, labels: ArrayLike) -> None:
        """Replace the labels of an already written image i, keeping its confidence."""
        self._check_writable()
        i = self._check_index(i)
        label_array = self.validate_labels(labels)
        if not chunk_path(self.path / "confidence", i).is_file():
            raise ValueError(f"image {i} has not been written yet: write() it first")
        self._put("labels", i, label_array)

    def _set_attr(self, key: str, value: Any) -> None:
        self._check_writable()
        self._open_group().attrs[key] = json.loads(json.dumps(value))

    def set_thresholds(self, thresholds: Sequence[float] | None) -> None:
        """The per-class confidence thresholds the labels were selected with (C values)."""
        if thresholds is not None and len(thresholds) != self.num_classes:
            raise ValueError(f"{len(thresholds)} thresholds for {self.num_classes} classes")
        self._set_attr("thresholds", None if thresholds is None
                       else [float(value) for value in thresholds])

    def set_selector(self, selector: dict[str, Any] | None) -> None:
        """How the labels were selected, e.g. {"name": "cbst", "portion": 0.45}."""
        self._set_attr("selector", selector)

    def set_statistics(self, statistics: dict[str, Any] | None) -> None:
        """Per-class statistics (see `stages.engine.metrics.label_statistics`)."""
        self._set_attr("statistics", statistics)

    def set_attribute(self, key: str, value: Any) -> None:
        """Any other JSON-ready attribute (e.g. a selector's per-group thresholds)."""
        if key in FIXED_ATTRIBUTES:
            raise ValueError(f"attribute {key!r} is fixed when the store is created")
        self._set_attr(key, value)

    # ------------------------------------------------------------------ reading

    def read(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """labels (H, W) uint8 and confidence levels (H, W) uint8 of image i."""
        return self.read_labels(i), self.read_levels(i)

    def read_labels(self, i: int) -> np.ndarray:
        """(H, W) uint8 trainIds, 255 = ignore. A chunk that does not decode or holds values
        that are not class ids is a DudaError naming the image."""
        labels = np.asarray(self._read_chunk("labels", i))
        invalid = (labels >= self.num_classes) & (labels != IGNORE_INDEX)
        if invalid.any():
            raise self._damaged(i, f"its labels hold values {np.unique(labels[invalid])[:5]} "
                                   f"outside 0..{self.num_classes - 1} and {IGNORE_INDEX}")
        return labels

    def read_levels(self, i: int) -> np.ndarray:
        """(H, W) uint8: the stored confidence levels (a format-1 store's float16 quantised)."""
        stored = np.asarray(self._read_chunk("confidence", i))
        return stored if stored.dtype == np.uint8 else quantize(stored)

    def read_confidence(self, i: int) -> np.ndarray:
        """(H, W) float32 in [0, 1]: the stored levels / 255 (a format-1 store's float16)."""
        stored = np.asarray(self._read_chunk("confidence", i))
        if stored.dtype == np.uint8:
            return stored.astype(np.float32) / np.float32(LEVELS)
        return stored.astype(np.float32)

    def _read_chunk(self, name: str, i: int) -> np.ndarray:
        i = self._check_index(i)
        try:
            files = self._files(name)
            return files.read(i) if files is not None else self._array(name)[i]
        except DudaError:
            raise
        except ChunkDigestError as error:
            raise self._damaged(i, f"{name}: {error}") from None
        except Exception as error:  # noqa: BLE001 - zarr/numcodecs raise many types
            raise self._damaged(i, f"its {name} chunk does not decode ({error})") from None

    def _damaged(self, i: int, what: str) -> DudaError:
        return DudaError(f"pseudo-label store {self.path} is damaged: image {i} ({self.ids[i]}): "
                         f"{what}",
                         "rebuild the store (rerun the stage that wrote it with --force); a "
                         "store must not be edited by hand")

    def validate(self, reporter: Reporter | None = None) -> None:
        """Read and check every chunk once (a DudaError names the first damaged image)."""
        reporter = reporter or Reporter()
        with reporter.task("checking the pseudo-label store", total=len(self)) as task:
            for i in range(len(self)):
                self.read_labels(i)
                self.read_confidence(i)
                task.advance(1)

    def missing(self) -> list[int]:
        """The images not (completely) on disk: a chunk file missing (or, in a format-1 store,
        no `written` marker). A missing chunk would read back as the fill value, so the files
        themselves are checked."""
        missing: set[int] = set()
        if self.format == 1:
            written = np.asarray(self._array("written")[:])
            missing.update(np.flatnonzero(written != 1).tolist())
        for name in ARRAYS:
            files = self._files(name)
            exists = files.exists if files is not None else (
                lambda i, name=name: chunk_path(self.path / name, i).is_file())
            missing.update(i for i in range(len(self.ids)) if not exists(i))
        return sorted(missing)

    def check_complete(self) -> None:
        """Raise a DudaError naming the first missing images, if any."""
        missing = self.missing()
        if missing:
            names = ", ".join(f"{i} ({self.ids[i]})" for i in missing[:5])
            raise DudaError(f"pseudo-label store {self.path} is incomplete: {len(missing)} of "
                            f"{len(self.ids)} images are missing or have a missing chunk "
                            f"(first: {names})",
                            "rebuild the store (generate-pseudo --force); a store must not be "
                            "edited by hand")


def _check_destination(path: Path) -> None:
    if (path / MANIFEST).exists():
        raise DudaError(f"{path} is a finished artifact; stores are write-once",
                        "write the new version to another directory")
    if path.exists() and not path.is_dir():
        raise DudaError(f"{path} exists and is not a directory", "choose another output path")
    if path.exists() and any(not entry.name.startswith(".") for entry in path.iterdir()):
        raise DudaError(f"{path} is not empty", "write the store into a new or empty directory")


def create_store(path: str | Path, *, ids: Sequence[str], height: int, width: int,
                 class_names: Sequence[str], index_id: str,
                 palette: Sequence[Sequence[int]] | None = None,
                 parent: ArtifactRef | None = None) -> PseudoLabelStore:
    """Create an empty, writable store for `ids` (dataset-index order) at `path`.

    `path` must not exist or be an empty directory (e.g. one an `ArtifactWriter` just made).
    """
    path = Path(path)
    _check_destination(path)
    if not ids:
        raise DudaError("a pseudo-label store needs at least one image",
                        "check that the dataset index has target-train images")
    if len(set(ids)) != len(ids):
        raise ValueError("image ids must be unique")
    count = len(ids)
    write_marker(path, PSEUDO_LABELS, "store")
    # "a" creates the group: the folder holds only the marker (checked above), which zarr's
    # exclusive mode "w-" would count as existing data.
    group = zarr.open_group(path, mode="a", zarr_format=3)
    group.attrs.update(json.loads(json.dumps({
        "duda_pseudo_labels": FORMAT, "ids": list(ids), "class_names": list(class_names),
        "palette": [list(colour) for colour in palette] if palette is not None else None,
        "index_id": index_id, "height": int(height), "width": int(width), "thresholds": None,
        "selector": None, "statistics": None, DIGESTS_ATTRIBUTE: DIGEST_SCHEME,
        "parent": parent.model_dump() if parent is not None else None})))
    create_image_array(group, "labels", count, height, width, IGNORE_INDEX, LABEL_ZSTD_LEVEL)
    create_image_array(group, "confidence", count, height, width, 0, ZSTD_LEVEL)
    return PseudoLabelStore(path, writable=True)


def open_unfinished(path: str | Path) -> PseudoLabelStore:
    """Open a store that is still being written (no manifest yet), writable.

    For the other ranks of a multi-process stage, after rank 0 has created the store.
    """
    path = Path(path)
    if (path / MANIFEST).exists():
        raise DudaError(f"pseudo-label store {path} is finished and stores are write-once",
                        "write a new version instead")
    return PseudoLabelStore(path, writable=True)


def open_store(path: str | Path, index: Any | None = None) -> PseudoLabelStore:
    """Open a finished store read-only and validate it.

    Refuses an unfinished store (no manifest), one with missing images or chunk files, and,
    when `index` (a `DatasetIndex`) is given, one made for another dataset index or class table.
    """
    path = Path(path)
    manifest = load_artifact(path, PSEUDO_LABELS)
    store = PseudoLabelStore(path, writable=False)  # checks each array's layout
    store.check_complete()
    if index is not None:
        check_store_matches(store, index, manifest)
    return store


def check_store_matches(store: PseudoLabelStore, index: Any,
                        manifest: Manifest | None = None) -> None:
    """Refuse a store made for another dataset index or class table than `index`."""
    if store.index_id != index.manifest.id:
        raise DudaError(f"pseudo-label store {store.path} was made for dataset index "
                        f"{store.index_id}, but {index.path} is dataset index "
                        f"{index.manifest.id}",
                        "pass the dataset index the store was made with, or regenerate the "
                        "pseudo labels against this one")
    names = tuple(index.classes.names)
    if tuple(store.class_names) != names:
        raise DudaError(f"pseudo-label store {store.path} has {len(store.class_names)} classes "
                        f"({', '.join(store.class_names[:3])}, …) but dataset index "
                        f"{index.path} has {index.classes.describe()}",
                        "regenerate the pseudo labels against this dataset index")


def copy_store(src: str | Path | PseudoLabelStore, dst: str | Path) -> PseudoLabelStore:
    """A new writable version at `dst` with the content of the finished store `src`.

    The copy's `parent` attribute names `src` (put `store.parent` into the new manifest's
    `inputs["parent"]`); thresholds, selector and statistics are carried over until the new
    version sets its own. Chunk files are hard-linked when possible (see the module doc).
    """
    source = src if isinstance(src, PseudoLabelStore) else open_store(src)
    if not source.finished:
        raise DudaError(f"pseudo-label store {source.path} is unfinished",
                        "finish it, or copy a finished store")
    manifest = source.manifest()
    dst = Path(dst)
    _check_destination(dst)
    write_marker(dst, PSEUDO_LABELS, "copy")
    converting = source.format != FORMAT  # a format-1 parent: its float16 confidence converted
    for entry in sorted(source.path.iterdir()):
        if entry.name == MANIFEST or entry.name.startswith("."):
            continue
        if entry.is_dir() and not (converting and entry.name in ("confidence", "written")):
            shutil.copytree(entry, dst / entry.name, copy_function=link_or_copy,
                            ignore=shutil.ignore_patterns("*.partial"))
        elif entry.name == "zarr.json":
            shutil.copy2(entry, dst / entry.name)
    group = zarr.open_group(dst, mode="r+", zarr_format=3)
    if converting:
        group.attrs["duda_pseudo_labels"] = FORMAT
        create_image_array(group, "confidence", len(source), source.height, source.width, 0,
                           ZSTD_LEVEL)
        levels = ChunkFiles.open(dst / "confidence", digests=True)
        assert levels is not None
        for i in range(len(source)):
            levels.write(i, source.read_levels(i))
    if not source.digests:  # a store written before chunk digests: bind its chunks now
        _add_digests(dst, len(source), skip=("confidence",) if converting else ())
        group.attrs[DIGESTS_ATTRIBUTE] = DIGEST_SCHEME
    store = PseudoLabelStore(dst, writable=True)
    store._set_attr("parent", manifest.ref(source.path).model_dump())
    return store


def _add_digests(path: Path, count: int, skip: Sequence[str] = ()) -> None:
    """Write the digest file of every chunk of the store at `path` (a copy of a store written
    before chunk digests existed; its chunks were checked by zstd when the copy was opened)."""
    for name in ARRAYS:
        files = ChunkFiles.open(path / name, digests=True)
        if name in skip or files is None:
            continue
        for i in range(count):
            if files.path(i).is_file():
                files.write_digest(i)


def read_group_metadata(path: Path) -> dict[str, Any]:
    """The parsed group `zarr.json` of the store at `path`, or a DudaError naming it."""
    try:
        return read_array_metadata(path)
    except ChunkLayoutError as error:
        raise DudaError(f"pseudo-label store {path} is damaged: {error}",
                        "rebuild the store (rerun the stage that wrote it with --force); a "
                        "store must not be edited by hand") from None


def _layout(folder: Path) -> str:
    """The data type, shape and codecs an array's zarr.json records, in words."""
    meta = read_array_metadata(folder)
    codecs = meta.get("codecs")
    names = [c.get("name") for c in codecs if isinstance(c, dict)] if isinstance(
        codecs, list) else codecs
    return (f"data_type {meta.get('data_type')!r}, shape {meta.get('shape')}, codecs {names}, "
            f"fill_value {meta.get('fill_value')!r}; expected uint8, one image per chunk, "
            "bytes → zstd")
