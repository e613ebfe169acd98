"""Background store writes and read-ahead: a reader always sees the last queued write."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from stages.artifacts.manifest import link_or_copy
from stages.runtime.errors import DudaError
from stages.store.pseudo_store import PseudoLabelStore, create_store
from stages.store.writer import ReadAhead, StoreWriter

H, W = 8, 12


def store(path: Path):
    s = create_store(path, ids=["a", "b", "c"], height=H, width=W, class_names=["x", "y"],
                     index_id="i")
    for i in range(3):
        s.write(i, np.full((H, W), i % 2, np.uint8), np.full((H, W), 0.5, np.float32))
    return s


@pytest.mark.parametrize("background", [True, False])
def test_a_read_sees_the_last_queued_write(tmp_path, background) -> None:
    opened = store(tmp_path / "s")
    with StoreWriter(opened, background=background) as writes:
        for value in (1, 0, 1):
            writes.write(0, np.full((H, W), value, np.uint8), np.zeros((H, W), np.float32))
            assert (writes.read_labels(0) == value).all()
        assert writes.version(0) == 3 and writes.version(1) == 0
    assert (opened.read_labels(0) == 1).all() and (opened.read_levels(0) == 0).all()


def test_a_write_after_a_read_ahead_began_is_seen_when_taken(tmp_path) -> None:
    opened = store(tmp_path / "s")
    started, release = threading.Event(), threading.Event()

    def slow_read(i: int) -> np.ndarray:
        labels = writes.read_labels(i)
        started.set()
        release.wait(5)
        return labels

    with StoreWriter(opened) as writes, ReadAhead(slow_read, writes.version) as reads:
        reads.prefetch([1, 2])
        started.wait(5)  # the read of image 1 has its (old) labels already
        writes.write(1, np.full((H, W), 255, np.uint8), np.zeros((H, W), np.float32))
        release.set()
        first, second = reads.take([1, 2])
    assert (first == 255).all()  # read again: image 1 was written after its read began
    assert (second == 0).all()  # unchanged, taken from the read ahead


def test_a_failed_background_write_is_raised_at_the_next_flush(tmp_path, monkeypatch) -> None:
    opened = store(tmp_path / "s")

    def full_disk(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(opened, "write_validated", full_disk)
    writes = StoreWriter(opened)
    writes.write(2, np.zeros((H, W), np.uint8), np.zeros((H, W), np.float32))
    with pytest.raises(DudaError, match=r"cannot write image 2 .*\(No space left on device\)"):
        writes.flush()
    writes.__exit__(None, None, None)


def test_invalid_writes_are_refused_in_the_callers_thread(tmp_path) -> None:
    with StoreWriter(store(tmp_path / "s")) as writes, pytest.raises(ValueError,
                                                                     match="outside 0..1"):
        writes.write(0, np.full((H, W), 7, np.uint8), np.zeros((H, W), np.float32))


def test_background_writes_and_snapshots_keep_every_chunk_digest_current(tmp_path) -> None:
    """Self-train's pattern: labels rewritten on the writer thread while the next batch is read
    ahead, a hard-linked snapshot in between. Every digest-checked read gives the last write,
    the snapshot keeps its own images, and no read ever reports a damaged chunk."""
    opened = store(tmp_path / "s")
    assert opened.digests
    rng = np.random.default_rng(0)
    last = {i: np.full((H, W), i % 2, np.uint8) for i in range(3)}
    with StoreWriter(opened) as writes, ReadAhead(writes.read_labels, writes.version) as reads:
        for step in range(40):
            batch = [int(i) for i in rng.choice(3, size=2, replace=False)]
            reads.prefetch(batch)
            for i in batch:
                last[i] = rng.integers(0, 2, (H, W), dtype=np.uint8)
                writes.write_labels(i, last[i])
            for i, labels in zip(batch, reads.take(batch), strict=True):
                np.testing.assert_array_equal(labels, last[i])
            if step == 20:
                writes.flush()
                shutil.copytree(tmp_path / "s", tmp_path / "snapshot",
                                copy_function=link_or_copy)
                at_snapshot = {i: labels.copy() for i, labels in last.items()}
    reopened = PseudoLabelStore(tmp_path / "s", writable=False)
    snapshot = PseudoLabelStore(tmp_path / "snapshot", writable=False)
    for i in range(3):
        np.testing.assert_array_equal(reopened.read_labels(i), last[i])
        np.testing.assert_array_equal(snapshot.read_labels(i), at_snapshot[i])
