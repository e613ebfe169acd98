"""Pseudo-label store reads and writes off the model's path: writes on a background thread,
reads ahead of need.

`StoreWriter` queues writes for a few threads (at most `limit` pending; the caller waits beyond
that; the writes of one image stay in order) and answers reads of an image whose write is still pending from the pending arrays, so a
reader never sees a stale image. `flush()` waits for every write and raises the first error; the
stages flush before any manifest, checkpoint, snapshot or whole-store read. `ReadAhead` reads
the images of the next batch on a thread while the current batch is computed; an image written
after its read began (an offline update of the last batch of an epoch, read again at the start of
the next) is read again when taken, so what is taken is always what a direct read would give.
With `background=False` both do their work inline: the same results, in the same order.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Self

import numpy as np

from stages.runtime.errors import DudaError
from stages.store.pseudo_store import ArrayLike, PseudoLabelStore


class PendingWrites:
    """The futures of background writes, oldest first, keyed by what they write. `make_room`
    collects the finished ones and waits while `limit` are pending; `flush` waits for all. A
    write's OSError becomes the DudaError that `failure(key, error)` makes, raised by the call
    that collects it."""

    def __init__(self, limit: int, failure: Callable[[Any, OSError], DudaError]) -> None:
        self.limit = limit
        self.failure = failure
        self._queue: deque[tuple[Any, Future[None]]] = deque()

    def __len__(self) -> int:
        return len(self._queue)

    def make_room(self) -> None:
        while len(self._queue) >= self.limit or (self._queue and self._queue[0][1].done()):
            self._collect()

    def add(self, key: Any, future: Future[None]) -> None:
        self._queue.append((key, future))

    def _collect(self) -> None:
        key, future = self._queue.popleft()
        try:
            future.result()
        except OSError as error:
            raise self.failure(key, error) from None

    def flush(self) -> None:
        while self._queue:
            self._collect()


class StoreWriter:
    """A writable store whose writes run on a background thread (see the module docstring).

    Offers the store's `read_labels`, `write`, `write_labels` and sizes, so code written for a
    store works on it."""

    def __init__(self, store: PseudoLabelStore, background: bool = True, limit: int = 8,
                 threads: int = 2) -> None:
        self.store = store
        self.background = background
        self.height, self.width, self.num_classes = store.height, store.width, store.num_classes
        # One single-thread pool per lane, an image always in the same lane: the writes of an
        # image stay in order, those of different images run side by side.
        self._lanes = [ThreadPoolExecutor(max_workers=1, thread_name_prefix="duda-store")
                       for _ in range(threads)] if background else []
        self._queue = PendingWrites(limit, lambda i, error: DudaError(
            f"cannot write image {i} of pseudo-label store {store.path} "
            f"({error.strerror or error})", "make room on the disk, or write to another place"))
        self._pending: dict[int, tuple[object, np.ndarray]] = {}  # image -> (token, labels)
        self._versions: dict[int, int] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.store)

    # ---------------------------------------------------------------- writing

    def write(self, i: int, labels: ArrayLike, confidence: ArrayLike) -> None:
        """Queue image i's labels and confidence (validated now, in the caller's thread)."""
        i, label_array, levels = self.store.validate_write(i, labels, confidence)
        self._submit(i, label_array, lambda: self.store.write_validated(i, label_array, levels))

    def write_labels(self, i: int, labels: ArrayLike) -> None:
        """Queue a replacement of image i's labels, keeping its confidence."""
        label_array = self.store.validate_labels(labels)
        self._submit(int(i), label_array, lambda: self.store.write_labels(i, label_array))

    def _submit(self, i: int, labels: np.ndarray, write: Callable[[], None]) -> None:
        token = object()
        with self._lock:
            self._pending[i] = (token, labels)
            self._versions[i] = self._versions.get(i, 0) + 1
        if not self._lanes:
            self._run(i, token, write)
            return
        self._queue.make_room()
        lane = self._lanes[i % len(self._lanes)]
        self._queue.add(i, lane.submit(self._run, i, token, write))

    def _run(self, i: int, token: object, write: Callable[[], None]) -> None:
        try:
            write()
        finally:
            with self._lock:
                if self._pending.get(i, (None,))[0] is token:
                    del self._pending[i]

    def flush(self) -> None:
        """Wait for every queued write; raise the first error."""
        self._queue.flush()

    # ---------------------------------------------------------------- reading

    def read_labels(self, i: int) -> np.ndarray:
        """Image i's labels, as the last write queued for it left them."""
        with self._lock:
            pending = self._pending.get(int(i))
        return pending[1].copy() if pending is not None else self.store.read_labels(i)

    def version(self, i: int) -> int:
        """How many writes of image i were queued so far."""
        with self._lock:
            return self._versions.get(int(i), 0)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        try:
            if exc_type is None:
                self.flush()
        finally:
            for lane in self._lanes:
                lane.shutdown(wait=True, cancel_futures=exc_type is not None)


class ReadAhead:
    """`read(i)` for the images of the next batch, started on a thread while the current batch
    is computed (see the module docstring). `version(i)` tells whether image i was written since
    its read began; such an image is read again when taken."""

    def __init__(self, read: Callable[[int], Any], version: Callable[[int], int] | None = None,
                 background: bool = True) -> None:
        self.read = read
        self.version = version or (lambda i: 0)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="duda-read") if (
            background) else None
        self._ahead: dict[int, tuple[int, Future[Any]]] = {}

    def prefetch(self, indices: Sequence[int]) -> None:
        if self._pool is None:
            return
        for i in indices:
            if i not in self._ahead:
                self._ahead[i] = (self.version(i), self._pool.submit(self.read, i))

    def take(self, indices: Sequence[int]) -> list[Any]:
        """`read(i)` for every index, prefetched where possible."""
        values = []
        for i in indices:
            ahead = self._ahead.pop(i, None)
            if ahead is not None and ahead[0] == self.version(i):
                values.append(ahead[1].result())
            else:
                values.append(self.read(i))
        return values

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        self._ahead = {}

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
