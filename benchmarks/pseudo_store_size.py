"""Pseudo-label store size and memory: bytes per image versus PNG files, and peak memory.

Measured side by side in one run on realistic pseudo-label maps: the synthetic benchmark's
street scenes (stages/data/synthetic.py) with class boundaries and low-confidence blobs set to
255, as a selector leaves them, and a smooth confidence field.
- labels: bytes per image of the store's `labels` chunks versus the same maps as single-channel
  PNG files (PIL, optimize=True) (target ≤ 1.0); the `confidence` chunks are reported apart
  (versus 16-bit PNGs of the same float16 values), since PNG label folders carry none;
- peak memory (tracemalloc, Python allocations including numpy) while writing the store and
  computing its statistics, for N and 4N images: it should not grow with N.

    python benchmarks/pseudo_store_size.py [--images 16] [--size 256 512]
"""

from __future__ import annotations

import argparse
import io
import tempfile
import tracemalloc
from pathlib import Path

import numpy as np
from PIL import Image

from stages.data.classes import CITYSCAPES_CLASSES
from stages.data.synthetic import generate_sample
from stages.engine.metrics import label_statistics
from stages.store.pseudo_store import create_store


def smooth_field(rng: np.random.Generator, height: int, width: int, cells: int = 8) -> np.ndarray:
    """A smooth random field in [0, 1]: bilinear upsampling of a coarse grid of noise."""
    grid = rng.uniform(0, 1, (cells + 1, cells + 1)).astype(np.float32)
    image = Image.fromarray(grid, mode="F").resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(image)


def pseudo_label(i: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(labels uint8, confidence float32) of one realistic pseudo-labelled image."""
    _, label = generate_sample(0, "target", "train", i, height, width)
    rng = np.random.default_rng(i)
    confidence = 0.35 + 0.64 * smooth_field(rng, height, width)
    boundary = np.zeros(label.shape, bool)
    boundary[1:] |= label[1:] != label[:-1]
    boundary[:, 1:] |= label[:, 1:] != label[:, :-1]
    confidence[boundary] *= 0.6  # uncertain along class boundaries
    labels = np.where(confidence >= 0.7, label, 255).astype(np.uint8)
    return labels, confidence


def png_bytes(array: np.ndarray, mode: str) -> int:
    buffer = io.BytesIO()
    image = Image.fromarray(array) if mode == "I;16" else Image.fromarray(array, mode=mode)
    image.save(buffer, format="PNG", optimize=True)
    return buffer.tell()


def folder_bytes(path: Path) -> int:
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file())


def write_store(path: Path, count: int, height: int, width: int) -> None:
    store = create_store(path, ids=[str(i) for i in range(count)], height=height, width=width,
                         class_names=CITYSCAPES_CLASSES, index_id="bench")
    for i in range(count):
        store.write(i, *pseudo_label(i % 64, height, width))
    store.set_statistics(label_statistics(store))


def peak_memory(root: Path, count: int, height: int, width: int) -> int:
    tracemalloc.start()
    write_store(root, count, height, width)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--size", type=int, nargs=2, default=[256, 512], metavar=("H", "W"))
    args = parser.parse_args()
    height, width = args.size
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_store(root / "store", args.images, height, width)
        label_png = confidence_png = 0
        for i in range(args.images):
            labels, confidence = pseudo_label(i % 64, height, width)
            label_png += png_bytes(labels, "L")
            bits = confidence.astype(np.float16).view(np.uint16)
            confidence_png += png_bytes(bits, "I;16")
        store_labels = folder_bytes(root / "store" / "labels")
        store_confidence = folder_bytes(root / "store" / "confidence")
        store_total = folder_bytes(root / "store")
        small = peak_memory(root / "small", args.images, height, width)
        large = peak_memory(root / "large", 4 * args.images, height, width)
    n = args.images
    print(f"{n} pseudo-label maps {height}x{width}, "
          f"{100 * np.mean([(pseudo_label(i % 64, height, width)[0] != 255).mean() for i in range(n)]):.0f}% labelled")
    print(f"labels:     store {store_labels / n / 1024:8.1f} KiB/image, PNG "
          f"{label_png / n / 1024:8.1f} KiB/image, ratio store / PNG "
          f"{store_labels / label_png:.3f} (target <= 1.0)")
    print(f"confidence: store {store_confidence / n / 1024:8.1f} KiB/image, 16-bit PNG "
          f"{confidence_png / n / 1024:8.1f} KiB/image, ratio {store_confidence / confidence_png:.3f}")
    print(f"whole store (labels, confidence, markers, metadata): {store_total / n / 1024:.1f} "
          f"KiB/image")
    print(f"peak traced memory writing {n} images: {small / 2**20:.1f} MiB; {4 * n} images: "
          f"{large / 2**20:.1f} MiB; ratio {large / small:.2f} (independent of N: about 1)")


if __name__ == "__main__":
    main()
