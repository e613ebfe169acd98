"""Prediction PNGs, written by `duda predict` and by `duda evaluate` with `save_predictions`: one
file per image and format (class indices, Cityscapes label ids, colours, confidence), encoded on
background threads so the model never waits on them."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Self

import numpy as np
from PIL import Image

from stages.data.classes import CITYSCAPES_CLASSES, IGNORE_INDEX, ClassTable, cityscapes_label_ids
from stages.runtime.errors import DudaError
from stages.store.writer import PendingWrites

FORMATS: tuple[str, ...] = ("trainid", "labelid", "color", "confidence")
DEFAULT_FORMATS: tuple[str, ...] = ("trainid", "color")
_LABEL_IDS = np.asarray(cityscapes_label_ids(), np.uint8)


# ----------------------------------------------------------------------------- the PNGs


def parse_formats(formats: str | Sequence[str]) -> tuple[str, ...]:
    """'trainid,color' (or a sequence of words) -> the formats, in FORMATS order; an unknown or
    missing word is a DudaError."""
    words = formats.split(",") if isinstance(formats, str) else list(formats)
    words = [word.strip().lower() for word in words if word.strip()]
    unknown = [word for word in words if word not in FORMATS]
    if unknown or not words:
        what = f"unknown format {', '.join(map(repr, unknown))}" if unknown else "no format given"
        raise DudaError(f"--format: {what}",
                        f"choose among {','.join(FORMATS)}, separated by commas "
                        f"(default {','.join(DEFAULT_FORMATS)})")
    return tuple(name for name in FORMATS if name in words)


def check_formats(formats: Sequence[str], classes: ClassTable, what: str) -> None:
    """Refuse `labelid` for a class table other than the 19 Cityscapes classes (`what` names
    where the table comes from)."""
    if "labelid" in formats and tuple(classes.names) != CITYSCAPES_CLASSES:
        raise DudaError(f"labelid writes Cityscapes label ids, which exist only for the 19 "
                        f"Cityscapes classes; {what} has {classes.describe()}",
                        "drop labelid from --format (trainid holds the class indices)")


def colorize(prediction: np.ndarray, palette: Sequence[Sequence[int]]) -> np.ndarray:
    """(H, W) uint8 class map -> (H, W, 3) uint8 RGB in `palette`; 255 and ids past the
    palette are black."""
    table = np.zeros((256, 3), np.uint8)
    table[: len(palette)] = np.asarray(palette, np.uint8).reshape(-1, 3)
    table[IGNORE_INDEX] = 0
    return table[prediction]


def write_prediction(folder: Path, stem: str, prediction: np.ndarray,
                     confidence: np.ndarray | None, formats: Sequence[str],
                     classes: ClassTable) -> None:
    """Write `folder/<format>/<stem>.png` for every format in `formats`.

    prediction: (H, W) uint8 class indices; confidence: (H, W) uint8, round(255 × max
    probability), needed only for the `confidence` format. `labelid` needs the 19-class
    Cityscapes table (`check_formats`). Subfolders are created as needed.
    """
    if prediction.dtype != np.uint8 or prediction.ndim != 2:
        raise ValueError(f"prediction must be (H, W) uint8, got {prediction.dtype} "
                         f"{prediction.shape}")
    for name in formats:
        if name == "trainid":
            image = Image.fromarray(prediction, mode="L")
        elif name == "labelid":
            image = Image.fromarray(_LABEL_IDS[prediction], mode="L")
        elif name == "color":
            image = Image.fromarray(colorize(prediction, classes.palette), mode="RGB")
        elif name == "confidence":
            if confidence is None:
                raise ValueError("the confidence format needs the confidence map")
            image = Image.fromarray(confidence, mode="L")
        else:
            raise ValueError(f"unknown prediction format {name!r}")
        target = folder / name
        target.mkdir(parents=True, exist_ok=True)
        image.save(target / f"{stem}.png", compress_level=1)


class BackgroundWriter:
    """PNG writes (`write_prediction`) on a few threads, so encoding overlaps the model's next
    batch.

    At most `limit` writes are pending (the caller waits beyond that); `flush()` waits for all
    of them and raises the first error. Use as a context manager: leaving it, even by an
    exception, waits for the running writes and drops the queued ones, so no thread writes into
    a folder that is being removed."""

    def __init__(self, threads: int = 2, limit: int = 16) -> None:
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="duda-png")
        self._pending = PendingWrites(limit, lambda stem, error: DudaError(
            f"cannot write the predictions of {stem} ({error.strerror or error})",
            "choose an --out on a disk with room that you can write to"))

    def submit(self, stem: str, write: Callable[..., None], *arguments: Any) -> None:
        """Run `write(*arguments)` on a writer thread (`stem` names the image in errors)."""
        self._pending.make_room()
        self._pending.add(stem, self._pool.submit(write, *arguments))

    def flush(self) -> None:
        self._pending.flush()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
