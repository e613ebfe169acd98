"""Direct chunk-file I/O reads and writes exactly the files zarr does."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr
from zarr.codecs import ZstdCodec

from stages.store.chunk_files import (
    ChunkDigestError,
    ChunkFiles,
    ChunkLayoutError,
    create_image_array,
)


def _array(root: Path, name: str = "labels", dtype: str = "uint8",
           chunks: tuple[int, int, int] = (1, 6, 10)) -> zarr.Array:
    group = zarr.open_group(root, mode="a")
    return group.create_array(name, shape=(3, 6, 10), chunks=chunks, dtype=dtype,
                              fill_value=255, compressors=ZstdCodec(level=9, checksum=True),
                              chunk_key_encoding={"name": "default", "separator": "/"},
                              config={"write_empty_chunks": True})


def _image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 20, (6, 10), dtype=np.uint8)


def test_direct_writes_are_read_by_zarr_and_zarr_writes_are_read_directly(tmp_path: Path):
    array = _array(tmp_path)
    files = ChunkFiles.open(tmp_path / "labels")
    assert files is not None
    files.write(0, _image(0))
    np.testing.assert_array_equal(array[0], _image(0))
    array[1] = _image(1)
    np.testing.assert_array_equal(files.read(1), _image(1))
    # Byte for byte the file zarr writes for the same image.
    zarr_bytes = files.path(1).read_bytes()
    files.write(1, _image(1))
    assert files.path(1).read_bytes() == zarr_bytes
    assert not list((tmp_path / "labels").rglob("*.partial"))


def test_an_unwritten_chunk_reads_as_the_fill_value_and_a_damaged_one_raises(tmp_path: Path):
    _array(tmp_path)
    files = ChunkFiles.open(tmp_path / "labels")
    assert files is not None
    assert not files.exists(2)
    assert (files.read(2) == 255).all()
    files.write(2, _image(2))
    data = bytearray(files.path(2).read_bytes())
    data[len(data) // 2] ^= 0xFF
    files.path(2).write_bytes(bytes(data))
    with pytest.raises((RuntimeError, ValueError)):
        files.read(2)


def test_other_layouts_are_left_to_zarr(tmp_path: Path):
    _array(tmp_path, "float", dtype="float16")
    _array(tmp_path, "blocks", chunks=(2, 6, 10))
    assert ChunkFiles.open(tmp_path / "float") is None
    assert ChunkFiles.open(tmp_path / "blocks") is None


@pytest.mark.parametrize("damage, message", [
    (lambda meta: meta.unlink(), "is missing"),
    (lambda meta: meta.write_text(meta.read_text()[:40]), "not valid JSON"),
    (lambda meta: meta.write_bytes(b"\xff\xfe"), "not valid JSON"),
    (lambda meta: meta.write_text("[1, 2]"), "not a JSON object"),
])
def test_metadata_that_does_not_parse_raises_a_layout_error(tmp_path: Path, damage, message):
    _array(tmp_path)
    meta = tmp_path / "labels" / "zarr.json"
    damage(meta)
    with pytest.raises(ChunkLayoutError, match=message):
        ChunkFiles.open(tmp_path / "labels")


def test_an_edited_data_type_or_fill_value_is_not_read_directly(tmp_path: Path):
    _array(tmp_path)
    meta_path = tmp_path / "labels" / "zarr.json"
    original = json.loads(meta_path.read_text())
    for edit in ({"data_type": "int8"}, {"fill_value": 300}, {"fill_value": "255"}):
        meta_path.write_text(json.dumps({**original, **edit}))
        assert ChunkFiles.open(tmp_path / "labels") is None, edit


def test_digests_bind_each_chunk_to_its_image(tmp_path: Path):
    """Two chunks exchanged (with or without their digest files) are refused, even when both
    hold the same bytes; zarr reads the array as before."""
    array = _array(tmp_path)
    files = ChunkFiles.open(tmp_path / "labels", digests=True)
    assert files is not None
    for i in range(3):
        files.write(i, _image(0) if i < 2 else _image(2))
    assert files.digest_path(0).read_text() != files.digest_path(1).read_text()
    np.testing.assert_array_equal(files.read(1), _image(0))
    np.testing.assert_array_equal(array[2], _image(2))  # plain zarr ignores digests/
    assert array.nchunks_initialized == 3
    for swap_digests in (False, True):
        paths = [files.path(1), files.path(2)] + (
            [files.digest_path(1), files.digest_path(2)] if swap_digests else [])
        for a, b in zip(paths[::2], paths[1::2], strict=True):
            data_a, data_b = a.read_bytes(), b.read_bytes()
            a.write_bytes(data_b)
            b.write_bytes(data_a)
        with pytest.raises(ChunkDigestError, match="not the one written for this image"):
            files.read(1)
    # Identical bytes under another index are refused too: the index is part of the digest.
    files.path(0).write_bytes(files.path(1).read_bytes())
    files.digest_path(0).write_bytes(files.digest_path(1).read_bytes())
    with pytest.raises(ChunkDigestError):
        files.read(0)
    files.digest_path(0).unlink()
    with pytest.raises(ChunkDigestError, match="no digest file"):
        files.read(0)
    assert not files.exists(0)


def test_a_wrong_image_is_refused_before_anything_is_written(tmp_path: Path):
    _array(tmp_path)
    files = ChunkFiles.open(tmp_path / "labels")
    assert files is not None
    with pytest.raises(ValueError, match="uint8"):
        files.write(0, _image(0).astype(np.int64))
    assert not files.exists(0)


def test_the_store_layout_is_read_and_written_directly(tmp_path: Path):
    group = zarr.open_group(tmp_path, mode="a")
    create_image_array(group, "labels", 3, 6, 10, fill_value=255, level=9)
    create_image_array(group, "confidence", 3, 6, 10, fill_value=0, level=3)
    for name in ("labels", "confidence"):
        files = ChunkFiles.open(tmp_path / name)
        assert files is not None, name
        files.write(0, _image(0))
        np.testing.assert_array_equal(zarr.open_array(tmp_path / name, mode="r")[0], _image(0))
