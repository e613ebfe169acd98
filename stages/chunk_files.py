"""One image per chunk file, read and written directly.

The arrays of a pseudo-label store hold one image per chunk, as uint8 compressed with zstd (the
zarr v3 codec chain `bytes` → `zstd`). A chunk file of such an array is exactly the zstd frame
of the image's bytes, so reading or writing one image needs that codec and one file and nothing
else: about 0.2 ms for a 128×256 map, where zarr's general asynchronous path takes about 2 ms, a
cost that dominates at small image sizes. The files are the ones zarr reads and writes (tested
both ways); an array of any other layout is left to zarr.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Self

import numpy as np
import zarr
from numcodecs import Zstd
from zarr.codecs import ZstdCodec

CHUNK_KEY_ENCODING = {"name": "default", "separator": "/"}
# An image holding only the fill value must still be stored as a chunk file, or it could not be
# told apart from a missing one.
ARRAY_CONFIG = {"write_empty_chunks": True}


def create_image_array(group: zarr.Group, name: str, count: int, height: int, width: int,
                       fill_value: int, level: int) -> zarr.Array:
    """A uint8 (count, height, width) array in `group`, one image per chunk, zstd at `level`
    with its checksum: the layout `ChunkFiles` reads and writes."""
    return group.create_array(name, shape=(count, height, width), chunks=(1, height, width),
                              dtype="uint8", fill_value=fill_value,
                              compressors=ZstdCodec(level=level, checksum=True),
                              chunk_key_encoding=CHUNK_KEY_ENCODING, config=ARRAY_CONFIG)


def chunk_path(folder: Path, i: int) -> Path:
    """zarr's file of chunk (i, 0, 0) of the array in `folder`."""
    return folder / "c" / str(i) / "0" / "0"


class ChunkFiles:
    """The chunk files of one zarr v3 array of shape (N, H, W) chunked (1, H, W)."""

    def __init__(self, folder: Path, height: int, width: int, fill_value: int,
                 codec: Zstd) -> None:
        self.folder = folder
        self.shape = (height, width)
        self.fill_value = fill_value
        self.codec = codec
        self._made: set[Path] = set()

    @classmethod
    def open(cls, folder: Path) -> Self | None:
        """The direct reader/writer of the array in `folder`, or None when its layout is not one
        image per chunk of uint8 through `bytes` → `zstd` (zarr then does the I/O)."""
        try:
            meta = json.loads((folder / "zarr.json").read_text())
            shape = meta["shape"]
            chunks = meta["chunk_grid"]["configuration"]["chunk_shape"]
            encoding = meta["chunk_key_encoding"]
            codecs = meta["codecs"]
            direct = (meta["zarr_format"] == 3 and meta["data_type"] == "uint8"
                      and len(shape) == 3 and chunks == [1, shape[1], shape[2]]
                      and meta["chunk_grid"]["name"] == "regular"
                      and encoding["name"] == "default"
                      and encoding.get("configuration", {}).get("separator") == "/"
                      and not meta.get("storage_transformers")
                      and [codec["name"] for codec in codecs] == ["bytes", "zstd"])
            if not direct:
                return None
            zstd = codecs[1]["configuration"]
            codec = Zstd(level=int(zstd["level"]), checksum=bool(zstd["checksum"]))
            return cls(folder, int(shape[1]), int(shape[2]), int(meta["fill_value"]), codec)
        except (OSError, ValueError, KeyError, IndexError, TypeError):
            return None

    def path(self, i: int) -> Path:
        return chunk_path(self.folder, i)

    def exists(self, i: int) -> bool:
        return self.path(i).is_file()

    def read(self, i: int) -> np.ndarray:
        """Image i, (H, W) uint8; a chunk never written reads as the fill value (as in zarr).
        A damaged chunk raises (zstd's checksum or a size mismatch)."""
        try:
            data = self.path(i).read_bytes()
        except FileNotFoundError:
            return np.full(self.shape, self.fill_value, np.uint8)
        decoded = np.frombuffer(self.codec.decode(data), np.uint8)
        if decoded.size != self.shape[0] * self.shape[1]:
            raise ValueError(f"the chunk holds {decoded.size} bytes, not "
                             f"{self.shape[0] * self.shape[1]}")
        return decoded.reshape(self.shape).copy()  # writable, as zarr's are

    def write(self, i: int, image: np.ndarray) -> None:
        """Store image i atomically (a temporary file renamed over the chunk)."""
        if image.shape != self.shape or image.dtype != np.uint8:
            raise ValueError(f"expected a {self.shape} uint8 image, got {image.shape} "
                             f"{image.dtype}")
        encoded = self.codec.encode(np.ascontiguousarray(image))
        path = self.path(i)
        if path.parent not in self._made:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._made.add(path.parent)
        partial = path.with_name(f"{path.name}.{uuid.uuid4().hex}.partial")
        try:
            with open(partial, "wb") as file:
                file.write(encoded)
            os.replace(partial, path)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
