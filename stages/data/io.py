"""Reading images and trainId label maps, with errors that name the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from stages.errors import DudaError


def open_image(path: Path) -> Image.Image:
    """Open and fully decode an image file; a truncated or unreadable file is a DudaError."""
    try:
        image = Image.open(path)
        image.load()
    except FileNotFoundError:
        raise DudaError(f"{path} does not exist",
                        "rebuild the dataset index (`duda prepare-data --force`)") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise DudaError(f"{path} is unreadable or truncated ({error})",
                        "replace or remove the file, then rerun prepare-data") from None
    return image


def read_image(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB."""
    return np.asarray(open_image(path).convert("RGB"))


def open_label_image(path: Path) -> Image.Image:
    """Open and decode a label file, which must be a PNG by its bytes: a lossy format (a JPEG
    named .png) blurs class boundaries into other class ids and is refused."""
    image = open_image(path)
    if image.format != "PNG":
        raise DudaError(f"{path} is a {image.format or 'non-PNG'} file, not a PNG; a lossy "
                        "format moves pixels to wrong classes",
                        "use the dataset's original PNG label files (label maps must be "
                        "stored losslessly)")
    return image


def read_label(path: Path) -> np.ndarray:
    """(H, W) uint8 trainIds, 255 = ignore (as written by prepare-data)."""
    image = open_label_image(path)
    array = np.asarray(image)
    if array.ndim != 2:
        raise DudaError(f"{path} has {array.shape[2]} channels; a label map has one",
                        "rebuild the dataset index (`duda prepare-data --force`)")
    return array.astype(np.uint8, copy=False)


def write_label(path: Path, label: np.ndarray) -> None:
    """Write a (H, W) uint8 label map as a single-channel PNG."""
    if label.dtype != np.uint8 or label.ndim != 2:
        raise ValueError(f"label must be a (H, W) uint8 array, got {label.dtype} {label.shape}")
    Image.fromarray(label, mode="L").save(path)
