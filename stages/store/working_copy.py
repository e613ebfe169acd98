"""A self-training run's own offline store and its snapshots, the part of the training state that
lives on disk.

The in-loop offline update rewrites store images between checkpoints, so a resumed run must not
see the updates made after the checkpoint it resumes from. At every checkpoint rank 0 hard-links
the working store (`RUN/pseudo`) into `RUN/snapshots/pseudo-<iteration>` (cheap: zarr replaces
chunk files by rename, so a later write never touches a snapshot's file), the training state is
written naming that snapshot, then older snapshots are removed. Resuming replaces the working
store with the named snapshot. A crash at any point leaves either the previous state or the new
one, never a mix.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Protocol

import numpy as np

from stages.artifacts.manifest import link_or_copy
from stages.runtime.distributed import Ranks
from stages.runtime.errors import DudaError
from stages.store.pseudo_store import PseudoLabelStore, copy_store, open_unfinished
from stages.store.writer import ReadAhead, StoreWriter

STORE_DIR = "pseudo"
SNAPSHOTS_DIR = "snapshots"


class AtIteration(Protocol):
    """What names a snapshot: the training run's progress (`stages.engine.training.Progress`)."""

    iteration: int


class WorkingStore:
    """The run's own offline store (`out/pseudo`) and its snapshots (`out/snapshots`), kept by
    rank 0. Its state is the name of the snapshot that belongs to the saved training state;
    restoring puts that snapshot back as the working store."""

    def __init__(self, out: Path, progress: AtIteration, ranks: Ranks) -> None:
        self.path, self.snapshots = out / STORE_DIR, out / SNAPSHOTS_DIR
        self.progress = progress
        self.ranks = ranks
        self.name: str | None = None
        self.store: PseudoLabelStore | None = None
        self.writes: StoreWriter | None = None
        self.reads: ReadAhead | None = None

    def open(self, prefetch: bool) -> PseudoLabelStore:
        """Open the working store (every rank): writes go through a background writer and the
        next batch's labels are read ahead, unless `prefetch` is off (the same results)."""
        self.store = open_unfinished(self.path)
        self.writes = StoreWriter(self.store, background=prefetch)
        self.reads = ReadAhead(self.writes.read_labels, self.writes.version, background=prefetch)
        return self.store

    def labels(self, indices: list[int]) -> list[np.ndarray]:
        """The stored labels of `indices`, as the last queued writes left them."""
        assert self.reads is not None
        return self.reads.take(indices)

    def prefetch(self, indices: list[int]) -> None:
        assert self.reads is not None
        self.reads.prefetch(indices)

    def flush(self) -> None:
        """Wait for this rank's queued writes (before a snapshot or a whole-store read)."""
        if self.writes is not None:
            self.writes.flush()

    def close(self) -> None:
        if self.reads is not None:
            self.reads.close()
        if self.writes is not None:
            self.writes.__exit__(None, None, None)

    def start(self, source: PseudoLabelStore) -> None:
        """A new run: the working store is a fresh (hard-linked) copy of the input store."""
        if self.ranks.is_main:
            shutil.rmtree(self.path, ignore_errors=True)
            shutil.rmtree(self.snapshots, ignore_errors=True)
            copy_store(source, self.path)

    def snapshot(self) -> None:
        """Hard-link the working store into snapshots/pseudo-<iteration>."""
        if not self.ranks.is_main:
            return
        name = f"pseudo-{self.progress.iteration:08d}"
        self.snapshots.mkdir(exist_ok=True)
        final, partial = self.snapshots / name, self.snapshots / f".{name}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(self.path, partial, copy_function=link_or_copy)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        self.name = name

    def prune(self) -> None:
        """Remove every snapshot but the one the saved training state names."""
        if self.ranks.is_main:
            for old in self.snapshots.iterdir():
                if old.name != self.name:
                    shutil.rmtree(old, ignore_errors=True)

    def state_dict(self) -> dict[str, str | None]:
        return {"snapshot": self.name}

    def load_state_dict(self, state: dict[str, str | None]) -> None:
        self.name = state["snapshot"]
        snapshot = self.snapshots / str(self.name)
        if not snapshot.is_dir():
            raise DudaError(f"the run's store snapshot {snapshot} is missing",
                            "the run directory was edited; start over with --force")
        if self.ranks.is_main:
            shutil.rmtree(self.path, ignore_errors=True)
            shutil.copytree(snapshot, self.path, copy_function=link_or_copy)
