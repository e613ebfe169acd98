"""Reading images and trainId label maps, with errors that name the file.

Every path that opens an image goes through `open_image` (or `image_size` for a header-only
look), so the pixel limit `MAX_IMAGE_PIXELS` holds for dataset images and labels, predicted
images, imported pseudo labels and report panels alike (docs/design.md#errors-and-exit-codes).
"""

from __future__ import annotations

import hashlib
import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from stages.data.classes import IGNORE_INDEX
from stages.runtime.errors import DudaError

# The most pixels an image may claim in its header: 2**27 ≈ 134 megapixels, about six times the
# largest photos of any supported dataset (Mapillary-class 20-megapixel images; Cityscapes is
# 2 MP). A header above it is a decompression bomb or not a photo: its RGB decode alone would
# take more than 400 MB. PIL gets the same limit, so its own check (which warns above the
# limit and raises above twice it) agrees with ours; here both are refusals.
MAX_IMAGE_PIXELS = 2 ** 27
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS

DATASET_FIX = ("replace or remove the file, then rebuild the dataset index "
               "(`duda prepare-data --force`)")


def _opened(path: Path, source: Path | io.BytesIO, fix: str) -> Image.Image:
    """`Image.open` (header only), with the pixel limit and every PIL failure a DudaError."""
    try:
        with warnings.catch_warnings():  # PIL's warning above the limit: a refusal here
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(source)
    except FileNotFoundError:
        raise DudaError(f"{path} does not exist", fix) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise _too_large(path, None, fix) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise DudaError(f"{path} is unreadable or truncated ({error})", fix) from None
    check_pixels(path, image.size, fix)
    return image


def _too_large(path: Path, size: tuple[int, int] | None, fix: str) -> DudaError:
    claimed = f" claims {size[0]}×{size[1]} pixels and" if size else ""
    return DudaError(f"{path}{claimed} is larger than the limit of {MAX_IMAGE_PIXELS:,} pixels "
                     "an image may have (a decompression bomb, or not a photo)", fix)


def check_pixels(path: Path, size: tuple[int, int], fix: str = DATASET_FIX) -> None:
    """Refuse a (width, height) above `MAX_IMAGE_PIXELS`, before anything is decoded."""
    if size[0] * size[1] > MAX_IMAGE_PIXELS:
        raise _too_large(path, size, fix)


def image_size(path: Path, fix: str = DATASET_FIX) -> tuple[int, int]:
    """(width, height) from the file's header, nothing decoded; limits as `open_image`."""
    with _opened(path, path, fix) as image:
        return image.size


def open_image(path: Path, fix: str = DATASET_FIX, data: bytes | None = None) -> Image.Image:
    """Open and fully decode an image file (or its bytes `data`, read already); a truncated,
    unreadable or oversized file is a DudaError with `fix` as its fix."""
    image = _opened(path, path if data is None else io.BytesIO(data), fix)
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as error:
        raise DudaError(f"{path} is unreadable or truncated ({error})", fix) from None
    return image


def read_image(path: Path, fix: str = DATASET_FIX) -> np.ndarray:
    """(H, W, 3) uint8 RGB."""
    return np.asarray(open_image(path, fix).convert("RGB"))


def open_label_image(path: Path, fix: str = DATASET_FIX,
                     data: bytes | None = None) -> Image.Image:
    """Open and decode a label file, which must be a PNG by its bytes: a lossy format (a JPEG
    named .png) blurs class boundaries into other class ids and is refused."""
    image = open_image(path, fix, data)
    if image.format != "PNG":
        raise DudaError(f"{path} is a {image.format or 'non-PNG'} file, not a PNG; a lossy "
                        "format moves pixels to wrong classes",
                        "use the dataset's original PNG label files (label maps must be "
                        "stored losslessly)")
    return image


def read_label(path: Path, num_classes: int | None = None, sha256: str | None = None,
               ) -> np.ndarray:
    """(H, W) uint8 trainIds, 255 = ignore (as written by prepare-data).

    With `sha256` (recorded in the dataset index) a file changed since prepare-data is refused;
    with `num_classes` so is a value outside the class table, which would otherwise reach the
    loss as an out-of-bounds target."""
    data = _read_bytes(path)
    array = np.asarray(open_label_image(path, data=data))
    if array.ndim != 2:
        raise DudaError(f"{path} has {array.shape[2]} channels; a label map has one",
                        "rebuild the dataset index (`duda prepare-data --force`)")
    label = array.astype(np.uint8, copy=False)
    if num_classes is not None:  # first: the more telling message for an edit out of range
        check_label_values(path, label, num_classes)
    # A SHA-256 of a label PNG (tens of kB) takes tens of microseconds, beside milliseconds
    # to decode it.
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise DudaError(f"{path} changed after the dataset index was built (its content "
                        "differs from the digest prepare-data recorded)",
                        "rebuild the dataset index (`duda prepare-data --force`), or restore "
                        "the file")
    return label


def check_label_values(path: Path, label: np.ndarray, num_classes: int) -> None:
    """Refuse trainIds outside 0..num_classes-1 and 255 (ignore)."""
    # Two counting passes (about a millisecond on a 2-megapixel label); the values only on error.
    if np.count_nonzero(label >= num_classes) == np.count_nonzero(label == IGNORE_INDEX):
        return
    bad = [int(v) for v in np.unique(label[label >= num_classes]) if v != IGNORE_INDEX]
    if bad:
        raise DudaError(f"{path}: label value out of range ({', '.join(map(str, bad[:5]))}; "
                        f"the class table has 0..{num_classes - 1} and {IGNORE_INDEX} = "
                        "ignore)",
                        "rebuild the dataset index (`duda prepare-data --force`), which checks "
                        "every label, or restore the file")


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes (the label digests of the dataset index)."""
    return hashlib.sha256(_read_bytes(path)).hexdigest()


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise DudaError(f"{path} does not exist", DATASET_FIX) from None
    except OSError as error:
        raise DudaError(f"{path} cannot be read ({error.strerror})", DATASET_FIX) from None


def write_label(path: Path, label: np.ndarray) -> None:
    """Write a (H, W) uint8 label map as a single-channel PNG."""
    if label.dtype != np.uint8 or label.ndim != 2:
        raise ValueError(f"label must be a (H, W) uint8 array, got {label.dtype} {label.shape}")
    Image.fromarray(label, mode="L").save(path)
