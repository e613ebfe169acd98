"""The zarr pseudo-label store: round trip, validation, missing chunks, write-once, lineage."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from stages.artifacts.manifest import PSEUDO_LABELS
from stages.artifacts.writer import ArtifactWriter
from stages.data.classes import CITYSCAPES_CLASSES
from stages.data.index import load_dataset_index
from stages.engine.metrics import label_statistics
from stages.runtime.errors import DudaError
from stages.store.pseudo_store import (
    STORE_METADATA,
    PseudoLabelStore,
    copy_store,
    create_store,
    open_store,
    open_unfinished,
)
from tests.conftest import make_index

H, W = 16, 24
NAMES = list(CITYSCAPES_CLASSES)


def label_map(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 19, (H, W)).astype(np.uint8)
    labels[rng.uniform(size=(H, W)) < 0.3] = 255
    return labels, rng.uniform(0, 1, (H, W)).astype(np.float32)


def finished_store(path: Path, count: int = 4, index_id: str = "index-1",
                   names: list[str] = NAMES,
                   content: tuple[str, ...] = STORE_METADATA) -> Path:
    with ArtifactWriter(path, kind=PSEUDO_LABELS, stage="test", config={},
                        config_hash="h") as writer:
        store = create_store(path, ids=[f"img{i}" for i in range(count)], height=H, width=W,
                             class_names=names, index_id=index_id)
        for i in range(count):
            store.write(i, *label_map(i))
        store.set_thresholds([0.5] * len(names))
        store.set_statistics(label_statistics(store))
        writer.finish({}, content=content)
    return path


def test_round_trip_keeps_labels_exactly_and_confidence_to_a_level(tmp_path: Path) -> None:
    path = finished_store(tmp_path / "store")
    store = open_store(path)
    assert store.manifest().schema_id == "duda.pseudo_labels/2"
    for i in range(4):
        labels, confidence = label_map(i)
        got_labels, got_levels = store.read(i)
        np.testing.assert_array_equal(got_labels, labels)
        assert got_labels.dtype == np.uint8 and got_levels.dtype == np.uint8
        # round(255 × p): the confidence PNG's quantiser, within half a level
        np.testing.assert_array_equal(got_levels, np.rint(confidence * 255).astype(np.uint8))
        np.testing.assert_allclose(store.read_confidence(i), confidence, atol=0.5 / 255 + 1e-7)
    assert store.ids == ["img0", "img1", "img2", "img3"]
    assert store.thresholds == [0.5] * 19
    stats = store.statistics
    kept = sum(int((label_map(i)[0] != 255).sum()) for i in range(4))
    assert stats["labelled_pixels"] == kept
    assert stats["pixels"] == 4 * H * W
    # Any zarr client reads it.
    group = zarr.open_group(path, mode="r")
    assert group["labels"].shape == (4, H, W) and group["labels"].dtype == np.uint8
    assert group["confidence"].dtype == np.uint8


def test_write_accepts_tensors_and_all_ignore_maps(tmp_path: Path) -> None:
    store = create_store(tmp_path / "s", ids=["a", "b"], height=H, width=W, class_names=NAMES,
                         index_id="x")
    store.write(0, torch.full((H, W), 255, dtype=torch.int64), torch.zeros(H, W))
    store.write(1, torch.zeros(H, W, dtype=torch.uint8), torch.ones(H, W, dtype=torch.float16))
    assert store.missing() == []  # an all-fill image is still stored as a chunk
    assert (store.read_labels(0) == 255).all() and (store.read_labels(1) == 0).all()


@pytest.mark.parametrize("labels, message", [
    (np.full((H, W), 19), "outside 0..18"),
    (np.full((H, W), -1), "outside 0..18"),
    (np.full((H, W), 300), "outside 0..18"),
    (np.full((H, W), 3.0), "must be integers"),
    (np.zeros((H, W + 1), np.uint8), "shape"),
])
def test_write_refuses_values_that_uint8_would_wrap(tmp_path: Path, labels, message) -> None:
    store = create_store(tmp_path / "s", ids=["a"], height=H, width=W, class_names=NAMES,
                         index_id="x")
    with pytest.raises(ValueError, match=message):
        store.write(0, labels, np.zeros((H, W), np.float32))
    assert store.missing() == [0]  # nothing was written


@pytest.mark.parametrize("value", [1.5, -0.1, float("nan")])
def test_write_refuses_confidence_outside_zero_one(tmp_path: Path, value: float) -> None:
    store = create_store(tmp_path / "s", ids=["a"], height=H, width=W, class_names=NAMES,
                         index_id="x")
    confidence = np.zeros((H, W), np.float32)
    confidence[3, 4] = value
    with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
        store.write(0, np.zeros((H, W), np.uint8), confidence)


def test_unfinished_store_is_refused(tmp_path: Path) -> None:
    store = create_store(tmp_path / "s", ids=["a"], height=H, width=W, class_names=NAMES,
                         index_id="x")
    store.write(0, *label_map(0))
    with pytest.raises(DudaError, match="unfinished"):
        open_store(tmp_path / "s")


def test_unwritten_image_is_reported_missing(tmp_path: Path) -> None:
    path = tmp_path / "s"
    with (pytest.raises(DudaError, match=r"1 of 3 images are missing.*first: 1 \(b\)"),
          ArtifactWriter(path, kind=PSEUDO_LABELS, stage="test", config={},
                         config_hash="h") as writer):
        store = create_store(path, ids=["a", "b", "c"], height=H, width=W,
                             class_names=NAMES, index_id="x")
        store.write(0, *label_map(0))
        store.write(2, *label_map(2))
        assert store.missing() == [1]
        store.check_complete()
        writer.finish({})
    assert not path.exists()  # the half-written store was removed


@pytest.mark.parametrize("array", ["labels", "confidence"])
def test_a_deleted_chunk_file_is_detected(tmp_path: Path, array: str) -> None:
    path = finished_store(tmp_path / "store")
    (path / array / "c" / "2" / "0" / "0").unlink()
    with pytest.raises(DudaError, match=r"incomplete: 1 of 4 .*first: 2 \(img2\)"):
        open_store(path)


def test_finished_store_is_read_only(tmp_path: Path) -> None:
    path = finished_store(tmp_path / "store")
    store = open_store(path)
    with pytest.raises(DudaError, match="read-only"):
        store.write(0, *label_map(0))
    with pytest.raises(DudaError, match="read-only"):
        store.set_thresholds([0.1] * 19)
    # A writable handle kept past the manifest refuses too.
    with pytest.raises(DudaError, match="write-once"):
        open_unfinished(path)
    with pytest.raises(DudaError, match="finished artifact"):
        create_store(path, ids=["a"], height=H, width=W, class_names=NAMES, index_id="x")
    np.testing.assert_array_equal(open_store(path).read_labels(0), label_map(0)[0])


def test_writer_handle_refuses_after_the_manifest_is_written(tmp_path: Path) -> None:
    path = tmp_path / "s"
    with ArtifactWriter(path, kind=PSEUDO_LABELS, stage="test", config={},
                        config_hash="h") as writer:
        store = create_store(path, ids=["a"], height=H, width=W, class_names=NAMES,
                             index_id="x")
        store.write(0, *label_map(0))
        writer.finish({})
    with pytest.raises(DudaError, match="finished"):
        store.write(0, *label_map(1))


def test_copy_is_a_new_version_naming_its_parent(tmp_path: Path) -> None:
    parent = finished_store(tmp_path / "v1")
    child_path = tmp_path / "v2"
    with ArtifactWriter(child_path, kind=PSEUDO_LABELS, stage="test", config={},
                        config_hash="h2") as writer:
        child = copy_store(parent, child_path)
        assert child.parent is not None and child.parent.path == str(parent.resolve())
        changed = np.full((H, W), 7, np.uint8)
        child.write_labels(1, changed)
        writer.inputs["parent"] = child.parent
        manifest = writer.finish({}, content=["zarr.json"])
    assert manifest.inputs["parent"].id == open_store(parent).manifest().id
    # The parent is untouched by the child's write (chunks are replaced, not edited).
    np.testing.assert_array_equal(open_store(parent).read_labels(1), label_map(1)[0])
    reopened = open_store(child_path)
    np.testing.assert_array_equal(reopened.read_labels(1), changed)
    np.testing.assert_array_equal(reopened.read_labels(0), label_map(0)[0])
    np.testing.assert_allclose(reopened.read_confidence(1), label_map(1)[1], atol=0.5 / 255 + 1e-7)


def test_store_for_another_index_or_class_table_is_refused(tmp_path: Path) -> None:
    index = load_dataset_index(make_index(tmp_path / "data"))
    good = finished_store(tmp_path / "good", index_id=index.manifest.id)
    assert open_store(good, index).ids[0] == "img0"
    other = finished_store(tmp_path / "other", index_id="0123456789abcdef")
    with pytest.raises(DudaError, match="made for dataset index 0123456789abcdef"):
        open_store(other, index)
    names = [f"class{i}" for i in range(19)]
    renamed = finished_store(tmp_path / "renamed", index_id=index.manifest.id, names=names)
    with pytest.raises(DudaError, match="19 classes \\(class0"):
        open_store(renamed, index)


def test_store_can_be_read_in_another_process_after_pickling(tmp_path: Path) -> None:
    store = open_store(finished_store(tmp_path / "store"))
    store.read_labels(0)
    clone = pickle.loads(pickle.dumps(store))
    assert clone._group is None
    np.testing.assert_array_equal(clone.read_labels(3), label_map(3)[0])
    loader = torch.utils.data.DataLoader(_Items(store), batch_size=2, num_workers=2)
    batches = [batch for batch in loader]
    np.testing.assert_array_equal(batches[1][1].numpy(), label_map(3)[0])


class _Items(torch.utils.data.Dataset):
    def __init__(self, store) -> None:
        self.store = store

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.store.read_labels(i)


def format_1_store(path: Path, monkeypatch) -> Path:
    """A store as duda wrote them before confidences were stored as levels: float16."""
    import stages.artifacts.manifest

    monkeypatch.setitem(stages.artifacts.manifest.VERSIONS, PSEUDO_LABELS, 1)
    with ArtifactWriter(path, kind=PSEUDO_LABELS, stage="test", config={},
                        config_hash="old") as writer:
        group = zarr.open_group(path, mode="a", zarr_format=3)
        group.attrs.update({"duda_pseudo_labels": 1, "ids": [f"img{i}" for i in range(3)],
                            "class_names": NAMES, "palette": None, "index_id": "index-1",
                            "height": H, "width": W, "thresholds": None, "selector": None,
                            "statistics": None, "parent": None})
        arrays = {"labels": ("uint8", 255), "confidence": ("float16", 0.0),
                  "written": ("uint8", 0)}
        for name, (dtype, fill) in arrays.items():
            shape = (3,) if name == "written" else (3, H, W)
            group.create_array(name, shape=shape, chunks=(1,) + shape[1:], dtype=dtype,
                               fill_value=fill, chunk_key_encoding={"name": "default",
                                                                    "separator": "/"})
        for i in range(3):
            labels, confidence = label_map(i)
            group["labels"][i] = labels
            group["confidence"][i] = confidence.astype(np.float16)
            group["written"][i] = 1
        writer.finish({}, content=["zarr.json"])
    monkeypatch.undo()
    return path


def test_a_format_1_store_still_loads_and_its_copy_is_format_2(tmp_path: Path,
                                                               monkeypatch) -> None:
    old = open_store(format_1_store(tmp_path / "old", monkeypatch))
    assert old.manifest().schema_id == "duda.pseudo_labels/1" and old.format == 1
    labels, confidence = label_map(1)
    np.testing.assert_array_equal(old.read_labels(1), labels)
    np.testing.assert_array_equal(old.read_confidence(1), confidence.astype(np.float16))
    stored = confidence.astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(old.read_levels(1), np.rint(stored * 255).astype(np.uint8))
    with pytest.raises(DudaError, match="format-1 store, which is read only"):
        PseudoLabelStore(tmp_path / "old", writable=True)
    with ArtifactWriter(tmp_path / "new", kind=PSEUDO_LABELS, stage="test", config={},
                        config_hash="new") as writer:
        copy = copy_store(old, tmp_path / "new")
        assert copy.format == 2 and not (tmp_path / "new" / "written").exists()
        np.testing.assert_array_equal(copy.read_levels(1), old.read_levels(1))
        copy.write_labels(0, np.zeros((H, W), np.uint8))
        manifest = writer.finish({}, content=["zarr.json"])
    assert manifest.schema_id == "duda.pseudo_labels/2"
    np.testing.assert_array_equal(open_store(tmp_path / "old").read_labels(0), label_map(0)[0])


# ------------------------------------------------------------------ integrity


def _swap(a: Path, b: Path) -> None:
    data_a, data_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(data_b)
    b.write_bytes(data_a)


@pytest.mark.parametrize("edit, message", [
    (lambda meta: meta.write_text(meta.read_text().replace('"uint8"', '"int8"')),
     "labels/zarr.json: it does not describe the layout duda writes (data_type 'int8'"),
    (lambda meta: meta.write_text(meta.read_text()[:60]),
     "labels/zarr.json: zarr.json is not valid JSON"),
])
def test_edited_array_metadata_is_a_damaged_store(tmp_path: Path, edit, message) -> None:
    """The manifest covers each array's zarr.json; a store whose manifest predates that (only
    the group's zarr.json recorded) is still refused by the layout check, naming the file."""
    covered = finished_store(tmp_path / "covered")
    edit(covered / "labels" / "zarr.json")
    with pytest.raises(DudaError, match="labels/zarr.json differs from the file its manifest"):
        open_store(covered)
    older = finished_store(tmp_path / "older", content=("zarr.json",))
    edit(older / "labels" / "zarr.json")
    with pytest.raises(DudaError) as error:
        open_store(older)
    assert message in str(error.value) and "is damaged" in str(error.value)
    assert "rerun the stage that wrote it with --force" in str(error.value)


def test_a_truncated_group_metadata_is_a_damaged_store(tmp_path: Path) -> None:
    path = finished_store(tmp_path / "store", content=("labels/zarr.json",))
    (path / "zarr.json").write_text((path / "zarr.json").read_text()[:50])
    with pytest.raises(DudaError, match=r"store .*store is damaged: zarr.json is not valid JSON"):
        open_store(path)


@pytest.mark.parametrize("array", ["labels", "confidence"])
def test_swapped_chunks_are_refused_naming_the_image(tmp_path: Path, array: str) -> None:
    path = finished_store(tmp_path / "store")
    folder = path / array
    _swap(folder / "c" / "0" / "0" / "0", folder / "c" / "1" / "0" / "0")
    _swap(folder / "digests" / "0", folder / "digests" / "1")
    store = open_store(path)
    with pytest.raises(DudaError, match=rf"image 0 \(img0\): {array}: its chunk is not the one "
                                        "written for this image"):
        store.validate()
    np.testing.assert_array_equal(store.read_labels(2), label_map(2)[0])  # the others read


def test_a_store_without_chunk_digests_is_read_and_its_copy_gains_them(tmp_path: Path) -> None:
    """Stores written before chunk digests stay readable; a copy (what self-train and
    update-offline work on) binds every chunk, so a later swap in it is refused."""
    path = finished_store(tmp_path / "old", content=())
    for name in ("labels", "confidence"):
        shutil.rmtree(path / name / "digests")
    attrs = json.loads((path / "zarr.json").read_text())
    del attrs["attributes"]["chunk_digests"]
    (path / "zarr.json").write_text(json.dumps(attrs))
    old = open_store(path)
    assert not old.digests
    np.testing.assert_array_equal(old.read_labels(1), label_map(1)[0])
    with ArtifactWriter(tmp_path / "new", kind=PSEUDO_LABELS, stage="test", config={},
                        config_hash="new") as writer:
        copy = copy_store(old, tmp_path / "new")
        assert copy.digests
        copy.write_labels(3, np.zeros((H, W), np.uint8))
        writer.finish({}, content=STORE_METADATA)
    new = open_store(tmp_path / "new")
    assert (new.read_labels(3) == 0).all()
    np.testing.assert_array_equal(new.read_labels(1), label_map(1)[0])
    labels = tmp_path / "new" / "labels"
    _swap(labels / "c" / "1" / "0" / "0", labels / "c" / "2" / "0" / "0")
    with pytest.raises(DudaError, match=r"image 1 \(img1\)"):
        new.read_labels(1)
