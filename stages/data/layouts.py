"""Dataset layouts as distributed (docs/method.md#datasets-and-classes), and decoding their labels
into trainIds.

`list_split` finds one split's images and labels in a layout and pairs them by file stem, never by
sorted position; it refuses a split with no images, unmatched files on either side, and images
copied into the label folder. `convert_pair` decodes one pair in a worker process: it checks that
the image decodes, reads the label in its layout's encoding (docs/method.md#datasets-and-classes),
checks its values and size, and returns trainIds (uint8, 255 = ignore).

Encodings (`LabelFormat`):
- `train_ids`: Cityscapes `*_gtFine_labelTrainIds.png`, used in place after a value check;
- `cityscapes_ids`: Cityscapes `*_gtFine_labelIds.png`, ids mapped with CITYSCAPES_ID_TO_TRAINID;
- `gta5_palette`: GTA5 palettised PNGs whose palette index is the Cityscapes label id;
- `synthia_ids`: SYNTHIA 16-bit multi-channel PNGs, class id in the first (R) channel;
- `class_indices`: the folder layout, values are class indices (255 ignore), used in place.
"""

from __future__ import annotations

import filecmp
import hashlib
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from stages.config import DomainConfig
from stages.data.classes import (
    CITYSCAPES_ID_TO_TRAINID,
    IGNORE_INDEX,
    SYNTHIA_ID_TO_TRAINID,
    lookup_table,
)
from stages.data.io import check_pixels, file_sha256, open_image, open_label_image, write_label
from stages.runtime.errors import DudaError

LabelFormat = Literal["train_ids", "cityscapes_ids", "gta5_palette", "synthia_ids",
                      "class_indices"]

# Formats whose files already hold trainIds: the index points at them, nothing is written.
IN_PLACE: frozenset[str] = frozenset({"train_ids", "class_indices"})

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

# docs/method.md#datasets-and-classes: the 25 GTA5 ids missing from IAST's data/gtav_train.json.
IAST_DROPPED_GTA5: frozenset[int] = frozenset(
    [*range(2154, 2159), *range(4634, 4638), *range(7115, 7120), *range(9683, 9689),
     *range(12050, 12055)])

# The largest raw id each id-encoded format may hold (Cityscapes ids 0..33, SYNTHIA 0..22).
MAX_RAW_ID = {"cityscapes_ids": 33, "gta5_palette": 33, "synthia_ids": 22}
RAW_TABLES = {
    "cityscapes_ids": np.asarray(lookup_table(CITYSCAPES_ID_TO_TRAINID), np.uint8),
    "gta5_palette": np.asarray(lookup_table(CITYSCAPES_ID_TO_TRAINID), np.uint8),
    "synthia_ids": np.asarray(lookup_table(SYNTHIA_ID_TO_TRAINID), np.uint8),
}

SHOWN = 5  # how many unmatched files an error lists


@dataclass(frozen=True)
class Pair:
    """One image and its label file (None in a split without labels)."""

    id: str
    image: Path
    label: Path | None
    label_format: LabelFormat | None


@dataclass
class SplitListing:
    """The pairs of one split, and what was left out of it on purpose."""

    domain: str
    split: str
    layout: str
    pairs: list[Pair]
    images_without_labels: int = 0  # a split indexed without labels (folder layout only)
    excluded: list[str] = field(default_factory=list)  # ids dropped by a config option


def list_split(domain: str, config: DomainConfig, split: str) -> SplitListing:
    """List and pair one split of a dataset in `config.layout`; raises DudaError on bad input."""
    root = Path(config.root or "")
    if not root.is_dir():
        raise DudaError(f"data.{domain}.root {root} does not exist or is not a directory",
                        f"point data.{domain}.root (or --data-root) at the {config.layout} "
                        "dataset folder")
    lister = {"cityscapes": _cityscapes, "gta5": _gta5, "synthia": _synthia,
              "folder": _folder}[config.layout]
    if config.layout in ("gta5", "synthia") and split != "train":
        raise DudaError(f"data.{domain}.splits has '{split}', but {config.layout} has no splits: "
                        "all of it is the 'train' split",
                        f"set data.{domain}.splits to [train]")
    listing = lister(domain, config, split, root)
    listing.pairs.sort(key=lambda pair: pair.id)
    return listing


def _files(folder: Path, pattern: str) -> list[Path]:
    return sorted(path for path in folder.glob(pattern) if path.is_file())


def _require_folder(folder: Path, what: str, layout: str) -> None:
    if not folder.is_dir():
        raise DudaError(f"{folder} does not exist ({what} of the {layout} layout)",
                        f"check the dataset root; the {layout} layout is described in "
                        "docs/method.md#datasets-and-classes and the README")


def _no_images(folder: Path, pattern: str) -> DudaError:
    return DudaError(f"the split has no images: {folder} holds no {pattern} files",
                     "check the dataset root and data.<domain>.splits")


def _pair(images: dict[str, Path], labels: dict[str, Path], formats: dict[str, LabelFormat],
          image_folder: Path, label_folder: Path) -> list[Pair]:
    """Pair by stem; unmatched files on either side are an error listing the first few."""
    orphans = sorted(set(labels) - set(images))
    if orphans:
        names = ", ".join(labels[i].name for i in orphans[:SHOWN])
        raise DudaError(f"{len(orphans)} label file(s) in {label_folder} have no image in "
                        f"{image_folder} (first: {names})",
                        "add the missing images or remove those labels; images and labels "
                        "are paired by file name")
    missing = sorted(set(images) - set(labels))
    if missing:
        names = ", ".join(images[i].name for i in missing[:SHOWN])
        raise DudaError(f"{len(missing)} image(s) in {image_folder} have no label in "
                        f"{label_folder} (first: {names})",
                        "add the missing labels or remove those images; images and labels "
                        "are paired by file name")
    pairs = [Pair(i, images[i], labels[i], formats[i]) for i in images]
    _check_not_copied(pairs[:3], label_folder)
    return pairs


def _check_not_copied(pairs: list[Pair], label_folder: Path) -> None:
    for pair in pairs:
        if pair.label is not None and filecmp.cmp(pair.image, pair.label, shallow=False):
            raise copied_error(pair, label_folder)


def copied_error(pair: Pair, label_folder: Path | None = None) -> DudaError:
    folder = label_folder or (pair.label.parent if pair.label else pair.image.parent)
    return DudaError(f"images copied into the label folder: {pair.label} is a copy of the "
                     f"image {pair.image}",
                     f"put the label maps, not the images, in {folder}")


def _cityscapes(domain: str, config: DomainConfig, split: str, root: Path) -> SplitListing:
    image_folder = root / "leftImg8bit" / split
    label_folder = root / "gtFine" / split
    _require_folder(image_folder, "the images", "cityscapes")
    suffix = "_leftImg8bit.png"
    images = {p.name[:-len(suffix)]: p for p in _files(image_folder, f"*/*{suffix}")}
    if not images:
        raise _no_images(image_folder, f"<city>/*{suffix}")
    copied = _files(label_folder, f"*/*{suffix}") if label_folder.is_dir() else []
    if copied:
        raise DudaError(f"images copied into the label folder: {label_folder} holds "
                        f"{len(copied)} *{suffix} files (first: {copied[0]})",
                        f"remove them; {label_folder} holds *_gtFine_labelTrainIds.png or "
                        "*_gtFine_labelIds.png")
    train_ids = {p.name[:-len("_gtFine_labelTrainIds.png")]: p
                 for p in (_files(label_folder, "*/*_gtFine_labelTrainIds.png")
                           if label_folder.is_dir() else [])}
    label_ids = {p.name[:-len("_gtFine_labelIds.png")]: p
                 for p in (_files(label_folder, "*/*_gtFine_labelIds.png")
                           if label_folder.is_dir() else [])}
    if not train_ids and not label_ids:
        raise DudaError(f"{label_folder} holds neither *_gtFine_labelTrainIds.png nor "
                        "*_gtFine_labelIds.png files",
                        "download gtFine_trainvaltest.zip and unpack it next to leftImg8bit "
                        "(labelIds are converted here; labelTrainIds are used as they are)")
    # Prefer labelTrainIds (used in place) and fall back to labelIds (converted) per image.
    labels: dict[str, Path] = {**label_ids, **train_ids}
    formats: dict[str, LabelFormat] = {i: "cityscapes_ids" for i in label_ids}
    formats.update({i: "train_ids" for i in train_ids})
    return SplitListing(domain, split, "cityscapes",
                        _pair(images, labels, formats, image_folder, label_folder))


def _gta5(domain: str, config: DomainConfig, split: str, root: Path) -> SplitListing:
    image_folder, label_folder = root / "images", root / "labels"
    _require_folder(image_folder, "the images", "gta5")
    _require_folder(label_folder, "the labels", "gta5")
    images = {p.stem: p for p in _files(image_folder, "*.png")}
    if not images:
        raise _no_images(image_folder, "*.png")
    labels = {p.stem: p for p in _files(label_folder, "*.png")}
    excluded: list[str] = []
    if config.exclude_iast_dropped:
        excluded = sorted(i for i in images if i.isdigit() and int(i) in IAST_DROPPED_GTA5)
        for i in excluded:
            images.pop(i)
            labels.pop(i, None)
    pairs = _pair(images, labels, dict.fromkeys(labels, "gta5_palette"), image_folder,
                  label_folder)
    return SplitListing(domain, split, "gta5", pairs, excluded=excluded)


def _synthia(domain: str, config: DomainConfig, split: str, root: Path) -> SplitListing:
    image_folder, label_folder = root / "RGB", root / "GT" / "LABELS"
    if not image_folder.is_dir() and (root / "RAND_CITYSCAPES" / "RGB").is_dir():
        raise DudaError(f"{image_folder} does not exist, but {root / 'RAND_CITYSCAPES'} does",
                        f"set data.{domain}.root to {root / 'RAND_CITYSCAPES'}")
    _require_folder(image_folder, "the images", "synthia")
    _require_folder(label_folder, "the labels", "synthia")
    images = {p.stem: p for p in _files(image_folder, "*.png")}
    if not images:
        raise _no_images(image_folder, "*.png")
    labels = {p.stem: p for p in _files(label_folder, "*.png")}
    pairs = _pair(images, labels, dict.fromkeys(labels, "synthia_ids"), image_folder,
                  label_folder)
    return SplitListing(domain, split, "synthia", pairs)


def _folder(domain: str, config: DomainConfig, split: str, root: Path) -> SplitListing:
    image_folder, label_folder = root / split / "images", root / split / "labels"
    _require_folder(image_folder, "the images", "folder")
    images = _by_stem([p for p in _files(image_folder, "*")
                       if p.suffix.lower() in IMAGE_SUFFIXES], image_folder)
    if not images:
        raise _no_images(image_folder, "/".join(IMAGE_SUFFIXES))
    if not label_folder.exists():
        # An unlabelled split (e.g. the user's own target images): indexed without labels.
        pairs = [Pair(i, p, None, None) for i, p in images.items()]
        return SplitListing(domain, split, "folder", pairs, images_without_labels=len(pairs))
    others = [p for p in _files(label_folder, "*") if p.suffix.lower() != ".png"]
    if others:
        raise DudaError(f"images copied into the label folder: {label_folder} holds "
                        f"{len(others)} non-PNG file(s) (first: {others[0].name})",
                        f"{label_folder} holds single-channel PNG label maps only")
    labels = {p.stem: p for p in _files(label_folder, "*.png")}
    pairs = _pair(images, labels, dict.fromkeys(labels, "class_indices"), image_folder,
                  label_folder)
    return SplitListing(domain, split, "folder", pairs)


def _by_stem(paths: list[Path], folder: Path) -> dict[str, Path]:
    """{stem: path}; two files with one stem (`a.png`, `a.jpg`) would pair with one label and
    one of them would be dropped unseen, so they are refused."""
    found: dict[str, Path] = {}
    for path in paths:
        if path.stem in found:
            raise DudaError(f"{folder} holds two images named {path.stem}: {found[path.stem].name} "
                            f"and {path.name}; images are paired with labels by name",
                            "keep one file per image name (rename or remove the other)")
        found[path.stem] = path
    return found


# ---------------------------------------------------------------------------- decoding labels


def read_synthia_ids(path: Path, data: bytes | None = None) -> np.ndarray:
    """(H, W) int32 class ids from the first (R) channel of a SYNTHIA label PNG.

    PIL opens 16-bit RGB(A) PNGs as 8-bit RGB keeping only the high byte of every sample, so
    every SYNTHIA id (< 256) would read as 0. For those files the PNG chunks are parsed here and
    the image data is decoded twice by PIL's PNG ("zip") decoder, once keeping the high and once
    the low bytes (`Image.frombytes` with the rawmodes `;16B` and `;16L`).
    """
    data = _read_bytes(path) if data is None else data
    header, image_data = _png_chunks(data, path)
    width, height, bit_depth, colour_type, interlace = header
    check_pixels(path, (width, height))  # before the two decodes allocate it
    if bit_depth != 16 or colour_type not in (2, 6):
        # 8-bit or grey: PIL reads the values as they are.
        array = np.asarray(open_image(path, data=data)).astype(np.int32)
        return array if array.ndim == 2 else array[..., 0]
    if interlace:
        raise DudaError(f"{path} is an interlaced 16-bit PNG, which is not supported",
                        "re-save the label without interlacing")
    mode = "RGB" if colour_type == 2 else "RGBA"
    try:
        high = Image.frombytes(mode, (width, height), image_data, "zip", f"{mode};16B")
        low = Image.frombytes(mode, (width, height), image_data, "zip", f"{mode};16L")
    except (ValueError, OSError) as error:
        raise DudaError(f"{path} is unreadable or truncated ({error})",
                        "replace or remove the file, then rerun prepare-data") from None
    return (np.asarray(high)[..., 0].astype(np.int32) << 8) | np.asarray(low)[..., 0]


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise DudaError(f"{path} cannot be read ({error.strerror})",
                        "check the file, then rerun prepare-data") from None


def _png_chunks(data: bytes, path: Path) -> tuple[tuple[int, int, int, int, int], bytes]:
    """The IHDR fields (width, height, bit depth, colour type, interlace) and the IDAT data."""
    broken = DudaError(f"{path} is unreadable or truncated (not a complete PNG file)",
                       "replace or remove the file, then rerun prepare-data")
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        raise broken
    position, header, image_data = 8, None, []
    while position + 12 <= len(data):
        length, kind = struct.unpack(">I4s", data[position:position + 8])
        body = data[position + 8:position + 8 + length]
        if len(body) < length:
            raise broken
        if kind == b"IHDR":
            width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", body[:13])
            header = (width, height, depth, colour, interlace)
        elif kind == b"IDAT":
            image_data.append(body)
        elif kind == b"IEND":
            break
        position += 12 + length
    else:
        raise broken
    if header is None or not image_data:
        raise broken
    return header, b"".join(image_data)


def read_raw_label(path: Path, label_format: LabelFormat,
                   data: bytes | None = None) -> np.ndarray:
    """The label's raw values, (H, W) integer, before mapping (from its bytes `data` if read
    already); checks the channel count."""
    if label_format == "synthia_ids":
        return read_synthia_ids(path, data)
    image = open_label_image(path, data=data)
    if image.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L"):
        raise DudaError(f"{path} is a {len(image.getbands())}-channel ({image.mode}) image; "
                        "a label map has one channel of class values",
                        "use the single-channel label files of the dataset (not the colourised "
                        "*_color.png ones)")
    return np.asarray(image)


def to_train_ids(raw: np.ndarray, label_format: LabelFormat, num_classes: int,
                 path: Path) -> np.ndarray:
    """Check the raw values of one label and map them to (H, W) uint8 trainIds."""
    values = np.unique(raw)
    if label_format in IN_PLACE:
        bad = values[((values >= num_classes) & (values != IGNORE_INDEX)) | (values < 0)]
        allowed = f"0..{num_classes - 1} and {IGNORE_INDEX}"
    else:
        bad = values[(values > MAX_RAW_ID[label_format]) | (values < 0)]
        allowed = f"ids 0..{MAX_RAW_ID[label_format]}"
    if bad.size:
        shown = ", ".join(str(int(b)) for b in bad[:SHOWN])
        raise DudaError(f"{path} holds values outside the class table ({shown}; allowed: "
                        f"{allowed})",
                        "check that data.<domain>.layout matches the dataset and that the "
                        "labels are the dataset's own class-id files")
    if label_format in IN_PLACE:
        return raw.astype(np.uint8, copy=False)
    return RAW_TABLES[label_format][raw]


@dataclass(frozen=True)
class PairResult:
    """The outcome of checking (and converting) one pair in a worker."""

    pixel_counts: list[int] | None = None  # per class; None where the pair has no label
    label_sha256: str | None = None  # of the label file the index points at, as checked
    size_mismatch: str | None = None  # GTA5: the pair is excluded with this description
    error: tuple[str, str | None] | None = None  # DudaError (message, fix)


def convert_pair(pair: Pair, num_classes: int, output: Path | None,
                 exclude_size_mismatch: bool) -> PairResult:
    """Decode the image and label of `pair`, check them, write converted trainIds to `output`.

    Runs in worker processes, so a DudaError comes back as data rather than raised.
    """
    try:
        image = open_image(pair.image)
        if pair.label is None or pair.label_format is None:
            return PairResult()
        data = _read_bytes(pair.label)  # read once: the digest is of the bytes checked here
        try:
            raw = read_raw_label(pair.label, pair.label_format, data)
            label = to_train_ids(raw, pair.label_format, num_classes, pair.label)
        except DudaError:
            if filecmp.cmp(pair.image, pair.label, shallow=False):
                raise copied_error(pair) from None
            raise
        if label.shape != (image.height, image.width):
            description = (f"{pair.id}: image {image.width}x{image.height}, label "
                           f"{label.shape[1]}x{label.shape[0]}")
            if exclude_size_mismatch:
                return PairResult(size_mismatch=description)
            raise DudaError(f"{pair.label} is {label.shape[1]}x{label.shape[0]} but its image "
                            f"{pair.image} is {image.width}x{image.height}",
                            "replace the label with the one made for this image")
        if output is not None:
            output.parent.mkdir(parents=True, exist_ok=True)
            write_label(output, label)
        counts = np.bincount(label.ravel(), minlength=256)[:num_classes]
        return PairResult(pixel_counts=[int(c) for c in counts],
                          label_sha256=(file_sha256(output) if output is not None
                                        else hashlib.sha256(data).hexdigest()))
    except DudaError as error:
        return PairResult(error=(error.message, error.fix))
