"""One image per chunk file, read and written directly.

The arrays of a pseudo-label store hold one image per chunk, as uint8 compressed with zstd (the
zarr v3 codec chain `bytes` → `zstd`). A chunk file of such an array is exactly the zstd frame
of the image's bytes, so reading or writing one image needs that codec and one file and nothing
else: about 0.2 ms for a 128×256 map, where zarr's general asynchronous path takes about 2 ms, a
cost that dominates at small image sizes. The files are the ones zarr reads and writes (tested
both ways); an array of any other layout is left to zarr.

With `digests` on, each chunk is bound to its image (docs/design.md#the-pseudo-label-store): a
side file `digests/<i>` in the array's folder, which plain zarr never reads, holds a BLAKE2b
digest of the array's name, the image index and the compressed chunk bytes. It is written after
the chunk and checked on every read, so chunks exchanged between images, or copied in from
another store, are refused even where zstd's own checksum passes (a chunk is a valid frame
wherever it lies). Hashing the compressed bytes costs microseconds: no decoding is added.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
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
DIGESTS_DIR = "digests"
DIGEST_SIZE = 16
# A reader racing another process's write of the same image can see the new chunk with the old
# digest for the moment between the two renames: a mismatch is read again before it is believed.
DIGEST_RETRIES = 3


class ChunkLayoutError(ValueError):
    """An array's `zarr.json` that cannot be read or parsed (what is wrong, in words)."""


class ChunkDigestError(ValueError):
    """A chunk that is not the one written for its image, or whose digest is missing."""


def chunk_digest(name: str, i: int, data: bytes) -> str:
    """The digest binding compressed chunk bytes to image `i` of array `name`."""
    digest = hashlib.blake2b(f"{name}/{i}/".encode(), digest_size=DIGEST_SIZE)
    digest.update(data)
    return digest.hexdigest()


def read_array_metadata(folder: Path) -> dict:
    """The parsed `zarr.json` of the array in `folder`; ChunkLayoutError when it is missing,
    unreadable or not a JSON object."""
    try:
        meta = json.loads((folder / "zarr.json").read_bytes())
    except FileNotFoundError:
        raise ChunkLayoutError("zarr.json is missing") from None
    except OSError as error:
        raise ChunkLayoutError(f"zarr.json cannot be read ({error.strerror})") from None
    except ValueError as error:  # JSONDecodeError and UnicodeDecodeError
        raise ChunkLayoutError(f"zarr.json is not valid JSON ({error})") from None
    if not isinstance(meta, dict):
        raise ChunkLayoutError("zarr.json is not a JSON object")
    return meta


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

    def __init__(self, folder: Path, count: int, height: int, width: int, fill_value: int,
                 codec: Zstd, digests: bool = False) -> None:
        self.folder = folder
        self.count = count
        self.shape = (height, width)
        self.fill_value = fill_value
        self.codec = codec
        self.digests = digests
        self._made: set[Path] = set()

    @classmethod
    def open(cls, folder: Path, digests: bool = False) -> Self | None:
        """The direct reader/writer of the array in `folder`, or None when its layout is not one
        image per chunk of uint8 through `bytes` → `zstd` (zarr then does the I/O). With
        `digests`, every chunk written gets its digest file and every chunk read is checked
        against it. A `zarr.json` that does not parse raises ChunkLayoutError."""
        meta = read_array_metadata(folder)
        try:
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
                      and type(meta["fill_value"]) is int and 0 <= meta["fill_value"] <= 255
                      and [codec["name"] for codec in codecs] == ["bytes", "zstd"])
            if not direct:
                return None
            zstd = codecs[1]["configuration"]
            codec = Zstd(level=int(zstd["level"]), checksum=bool(zstd["checksum"]))
            return cls(folder, int(shape[0]), int(shape[1]), int(shape[2]),
                       int(meta["fill_value"]), codec, digests)
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            return None

    def path(self, i: int) -> Path:
        return chunk_path(self.folder, i)

    def digest_path(self, i: int) -> Path:
        return self.folder / DIGESTS_DIR / str(i)

    def exists(self, i: int) -> bool:
        """Whether image i is on disk: its chunk file (and, with digests, its digest file)."""
        return self.path(i).is_file() and (not self.digests or self.digest_path(i).is_file())

    def read(self, i: int) -> np.ndarray:
        """Image i, (H, W) uint8; a chunk never written reads as the fill value (as in zarr).
        A damaged chunk raises (zstd's checksum or a size mismatch; ChunkDigestError for a chunk
        that is not image i's)."""
        try:
            data = self._read_checked(i)
        except FileNotFoundError:
            return np.full(self.shape, self.fill_value, np.uint8)
        decoded = np.frombuffer(self.codec.decode(data), np.uint8)
        if decoded.size != self.shape[0] * self.shape[1]:
            raise ValueError(f"the chunk holds {decoded.size} bytes, not "
                             f"{self.shape[0] * self.shape[1]}")
        return decoded.reshape(self.shape).copy()  # writable, as zarr's are

    def _read_checked(self, i: int) -> bytes:
        """The compressed bytes of chunk i, checked against its digest file when digests are
        on (re-read a few times first: see DIGEST_RETRIES)."""
        data = self.path(i).read_bytes()
        if not self.digests:
            return data
        for attempt in range(DIGEST_RETRIES):
            try:
                recorded = self.digest_path(i).read_text().strip()
            except FileNotFoundError:
                raise ChunkDigestError("its chunk has no digest file "
                                       f"({DIGESTS_DIR}/{i})") from None
            if recorded == chunk_digest(self.folder.name, i, data):
                return data
            time.sleep(0.001 * (attempt + 1))
            data = self.path(i).read_bytes()
        raise ChunkDigestError("its chunk is not the one written for this image (the chunk's "
                               "digest does not match: chunks exchanged, copied in or edited)")

    def write_digest(self, i: int, data: bytes | None = None) -> None:
        """Record the digest of chunk i (of `data`, its compressed bytes, or of the file)."""
        data = self.path(i).read_bytes() if data is None else data
        folder = self.folder / DIGESTS_DIR
        if folder not in self._made:
            folder.mkdir(exist_ok=True)
            self._made.add(folder)
        _replace(self.digest_path(i), chunk_digest(self.folder.name, i, data).encode())

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
        _replace(path, encoded)
        if self.digests:
            self.write_digest(i, encoded)


def _replace(path: Path, data: bytes) -> None:
    """Write `path` atomically: a temporary file beside it, renamed over it."""
    partial = path.with_name(f"{path.name}.{uuid.uuid4().hex}.partial")
    try:
        with open(partial, "wb") as file:
            file.write(data)
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
