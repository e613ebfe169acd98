"""Writing an artifact: `ArtifactWriter` owns an output directory's life and the promises
made about it (docs/design.md, artifacts).

- **Only the project's own folders are ever replaced.** Every artifact directory carries a
  marker file, `.duda-artifact`, written when the directory is created, before anything else. An
  existing `--out` is reused, resumed or replaced only if it carries the marker (or, from runs
  started before markers existed, a `train_state.pt`); any other non-empty folder is refused.
- **Inputs are never outputs.** An `--out` equal to, inside, or containing an input artifact or
  file is refused before anything is touched.
- **One writer per artifact.** The writing process holds an exclusive OS lock (`fcntl.flock`)
  on `<parent>/.<name>.lock`, released by the kernel when the process ends, so a killed run never
  leaves a stale lock; a second writer is refused with the holder's pid, host and start time.
  The lock file exists only while a command runs: its holder removes it before releasing it,
  and a process that locked a file which is no longer the one at that path locks again.
- **`--force` never destroys before it has built.** A replacement is built in
  `<parent>/.<name>.partial` and swapped in when its manifest is written; a failed or
  interrupted `--force` leaves the old artifact intact (`--resume` continues the `.partial`).
  A symbolic link as `--out` is refused: the swap renames the path, which would replace the
  link rather than what it points to.
- **A place that cannot take the write is a user error.** A full disk, a quota, a read-only or
  immutable folder (`write_failure`) end the command with one message naming the folder, and a
  failed non-resumable stage leaves nothing behind; stages that write a lot check the free
  space first (`ArtifactWriter.require_space`).

Under `torchrun` only rank 0 touches the directory and holds the lock; the other ranks receive
its decision (or its error) by broadcast, so every rank of a refused job fails alike instead of
waiting at a barrier; `finish` returns on every rank once the artifact exists.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import fcntl
import json
import logging
import os
import shlex
import shutil
import socket
from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Self

from stages.artifacts.manifest import (
    MANIFEST,
    MARKER,
    VERSIONS,
    ArtifactRef,
    Manifest,
    StageResult,
    atomic_write_json,
    atomic_write_text,
    environment,
    file_digest,
    read_manifest,
    seal,
    verify,
)
from stages.config import recorded_hash
from stages.runtime.errors import DudaError

LEGACY_RUN_FILE = "train_state.pt"  # an unfinished training run from before markers existed

logger = logging.getLogger("duda")

# The command line being run (set by the command-line layer), recorded in every marker so that
# an unfinished output can say which command continues it; None when called from Python.
command_line: ContextVar[list[str] | None] = ContextVar("command_line", default=None)

# errno values that say the place cannot take the write: the user's to fix, not a bug.
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)


def is_ours(path: Path) -> bool:
    """Whether `path` is a folder the project wrote: it carries the marker (or is a training
    run from before markers existed)."""
    return (path / MARKER).is_file() or (path / LEGACY_RUN_FILE).is_file()


def write_marker(path: Path, kind: str, stage: str) -> None:
    """Create `path` if needed and mark it as the project's (the first file written), with the
    command line that wrote it when it is known."""
    _make_directory(path)
    if (path / MARKER).is_file():
        return
    marker: dict[str, Any] = {
        "kind": kind, "stage": stage,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    if command_line.get() is not None:
        marker.update(command=command_line.get(), cwd=os.getcwd())
    try:
        atomic_write_json(path / MARKER, marker)
    except OSError as error:
        raise write_failure(error, path) or error from None


def read_marker(path: Path) -> dict[str, Any]:
    """The marker's fields (markers from older versions lack `command`, `cwd` and `files`;
    an unreadable one reads as empty)."""
    try:
        marker = json.loads((path / MARKER).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    return marker if isinstance(marker, dict) else {}


def _make_directory(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        link = _dangling_link(path)
        if link is not None:
            raise DudaError(f"output {path} cannot be created: {link} is a symbolic link to "
                            f"{os.readlink(link)}, which does not exist",
                            "remove the link, or choose another --out") from None
        raise DudaError(f"output {path} cannot be created: it or a folder above it is a file",
                        "choose another --out") from None
    except NotADirectoryError:
        raise DudaError(f"output {path} cannot be created: a folder above it is a file",
                        "choose another --out") from None
    except OSError as error:
        raise write_failure(error, path) or DudaError(
            f"output {path} cannot be created ({error.strerror})",
            "choose an --out in a place you can write to") from None


def _dangling_link(path: Path) -> Path | None:
    """`path` or the folder above it that is a symbolic link to nothing, if any."""
    for candidate in (path, *path.parents):
        if candidate.is_symlink() and not candidate.exists():
            return candidate
    return None


def remove_ours(path: Path) -> None:
    """Delete a folder the project wrote; anything else is refused (a bug if reached). A
    symbolic link is removed as a link: what it points to is never touched."""
    if path.is_symlink():
        path.unlink()
        return
    if not path.exists():
        return
    if not is_ours(path):
        raise DudaError(f"{path} does not carry the project's marker; it is left untouched",
                        "remove it yourself if it is not needed")
    shutil.rmtree(path)


def _empty(path: Path) -> bool:
    return not path.exists() or (path.is_dir() and not any(path.iterdir()))


def remove_stale_temporaries(path: Path) -> None:
    """Remove the `.<name>.tmp-<pid>` files an interrupted atomic write left in `path`.

    Called only by the artifact's lock holder, so no other process is writing them."""
    if path.is_dir():
        for entry in path.glob(".*.tmp-*"):
            if entry.is_file():
                entry.unlink()


def check_not_input(out: Path, inputs: Iterable[str | Path]) -> None:
    """Refuse an output equal to, inside, or containing any input path."""
    target = out.resolve()
    for given in inputs:
        source = Path(given).resolve()
        if target == source:
            relation = "is"
        elif source in target.parents:
            relation = "lies inside"
        elif target in source.parents:
            relation = "contains"
        else:
            continue
        raise DudaError(f"--out {out} {relation} the input {given}; writing it would destroy "
                        "what the stage reads", "choose an --out outside every input")


# ------------------------------------------------------------------- places that cannot take it


def write_failure(error: BaseException, where: Path) -> DudaError | None:
    """The user error a failed write under the folder `where` is, or None (a bug).

    A full disk, an exceeded quota, a read-only mount or an immutable or unwritable folder show
    up as an OSError, or as the RuntimeError `torch.save` raises when its file stops taking
    bytes (the OSError is then its context)."""
    cause = _os_error(error)
    if cause is None:
        return None
    file = cause.filename or where
    if cause.errno in NO_SPACE:
        what = "the disk is full" if cause.errno == errno.ENOSPC else "the disk quota is used up"
        return DudaError(f"cannot write {file}: {what} ({_size(_free_bytes(where))} free on the "
                         f"filesystem holding {where})",
                         "make room on that disk (or choose an --out on another one) and run "
                         "the command again")
    return DudaError(f"cannot write {file}: {cause.strerror} (the folder {where} is read-only, "
                     "immutable or not yours to write)",
                     "choose an --out in a place you can write to, or make that folder writable")


def _os_error(error: BaseException | None) -> OSError | None:
    """The OSError of a write-refusing kind in `error`'s chain of causes, if any."""
    seen = 0
    while error is not None and seen < 8:
        if isinstance(error, OSError) and error.errno in NO_SPACE + NOT_WRITABLE:
            return error
        error, seen = error.__cause__ or error.__context__, seen + 1
    return None


def require_space(path: Path, needed: int, what: str) -> None:
    """Refuse (DudaError) when the filesystem that holds `path` has less than `needed` bytes
    free for `what`: a stage refuses at its start instead of failing hours later."""
    free = _free_bytes(path)
    if free < needed:
        raise DudaError(f"not enough disk space for {what}: it needs about {_size(needed)}, and "
                        f"the filesystem holding {path} has {_size(free)} free",
                        "make room on that disk, or choose an --out on another one")


def _free_bytes(path: Path) -> int:
    """Free bytes (for an unprivileged user) on the filesystem of `path` or of its nearest
    existing parent."""
    for candidate in (path, *path.absolute().parents):
        if candidate.exists():
            return shutil.disk_usage(candidate).free
    return 0


def _size(count: float) -> str:
    for unit in ("bytes", "kB", "MB", "GB"):
        if abs(count) < 1000 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "bytes" else f"{count:.1f} {unit}"
        count /= 1000
    raise AssertionError("unreachable")


# docs/design.md#disk-space: a pseudo-label store at paper scale takes about 1.4 GB per version
# for 2,975 images of 1024×2048 (0.23 bytes per pixel, labels and confidence compressed);
# the estimate allows twice that, plus a filesystem block for each of an image's two chunks.
STORE_BYTES_PER_PIXEL = 0.5
CHUNK_FILE_BYTES = 4096


def store_bytes(images: int, height: int, width: int) -> int:
    """The disk space a pseudo-label store of `images` label maps of `height`×`width` needs."""
    return int(images * (height * width * STORE_BYTES_PER_PIXEL + 2 * CHUNK_FILE_BYTES))


def checkpoint_bytes(model: Any, num_classes: int, *, teacher: bool) -> int:
    """The disk space a training run's checkpoint files need at their peak: model.pt and best.pt
    (student, and the mean teacher when `teacher`), train_state.pt (the models again and the
    SGD momentum) and the temporary copy of train_state.pt written before the old one is
    replaced. `model` is the run's `ModelConfig`; the size comes from building it on torch's
    meta device, which allocates nothing."""
    import torch  # the writer itself needs no torch; only this estimate does

    from stages.nn.model import build_model

    with torch.device("meta"):
        state = build_model(model, num_classes).state_dict()
    weights = sum(tensor.numel() * tensor.element_size() for tensor in state.values())
    models = 2 if teacher else 1
    return weights * (2 * models + 2 * (models + 1))


def run_bytes(model: Any, num_classes: int, store: Path, work: Path) -> int:
    """The disk space a self-training run needs: its checkpoints, the working copy of the input
    `store`, and two snapshots of it at a checkpoint, which are whole copies where the
    filesystem of `work` cannot hard-link (docs/design.md#disk-space)."""
    size = _tree_bytes(store)
    copies = 1 if _hard_links_work(work) else 3
    return checkpoint_bytes(model, num_classes, teacher=True) + copies * size


def _tree_bytes(path: Path) -> int:
    return sum(entry.stat().st_size for entry in path.rglob("*") if entry.is_file())


def _hard_links_work(folder: Path) -> bool:
    """Whether the filesystem of `folder` (one the project wrote) takes hard links."""
    probe, link = folder / f".link-probe-{os.getpid()}", folder / f".link-probe-{os.getpid()}-2"
    try:
        probe.touch()
        os.link(probe, link)
        return True
    except OSError:
        return False
    finally:
        for leftover in (link, probe):
            leftover.unlink(missing_ok=True)


@contextlib.contextmanager
def claim(directory: Path, kind: str, stage: str) -> Iterator[Path]:
    """Mark `directory` as the project's for an output written outside `ArtifactWriter` (a label
    export, overlays) and, if the block fails, remove what was written: the folder if this
    created it, else its content, so that nothing half-written looks finished. A write the place
    cannot take becomes a user error (`write_failure`)."""
    created = not directory.exists()
    write_marker(directory, kind, stage)
    try:
        yield directory
    except BaseException as error:
        if created:
            shutil.rmtree(directory, ignore_errors=True)
        else:
            _empty_folder(directory)
        failure = write_failure(error, directory) if isinstance(error, Exception) else None
        if failure is not None:
            raise failure from None
        raise


def _empty_folder(path: Path) -> None:
    for entry in path.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


# ------------------------------------------------------------------------------ the lock


class ArtifactLock:
    """An exclusive `fcntl.flock` on `<parent>/.<name>.lock`, held while the artifact is written.

    The file holds the holder's pid, host and start time for the refusal message. It lives
    beside the artifact because the artifact folder itself is swapped by rename. The holder
    removes it before unlocking; so that a process which opened the file just before that still
    locks the right thing, a lock counts only if the path still names the locked file afterwards
    (else it is taken again on the new file). A lock on a network filesystem is only as good as
    that filesystem's support of flock (NFS ≥ 4 and most cluster filesystems map it to their own
    locks; some do not lock across machines)."""

    def __init__(self, artifact: Path) -> None:
        self.artifact = artifact
        self.path = artifact.parent / f".{artifact.name}.lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        _make_directory(self.path.parent)
        while self._fd is None:
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise DudaError(f"{self.artifact} is being written by process {holder['pid']} "
                                f"on {holder['host']} since {holder['since']}",
                                "wait for that process to finish (or stop it); two processes "
                                "must never write one artifact") from None
            if _same_file(fd, self.path):
                self._fd = fd
            else:  # its holder removed it after this process opened it: lock the new one
                os.close(fd)
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, json.dumps({
            "pid": os.getpid(), "host": socket.gethostname(),
            "since": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        }).encode(), 0)

    def _open(self) -> int:
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise write_failure(error, self.path.parent) or DudaError(
                f"output {self.artifact} cannot be created ({error.strerror})",
                "choose an --out in a place you can write to") from None

    def release(self) -> None:
        if self._fd is not None:
            self.path.unlink(missing_ok=True)  # while locked: no one else holds this file
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _same_file(fd: int, path: Path) -> bool:
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    opened = os.fstat(fd)
    return (named.st_dev, named.st_ino) == (opened.st_dev, opened.st_ino)


def _read_holder(fd: int) -> dict[str, Any]:
    try:
        holder = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (ValueError, UnicodeDecodeError):
        holder = {}
    return {key: holder.get(key, "?") for key in ("pid", "host", "since")}


# ------------------------------------------------------------------------------ writing


class RankGroup(Protocol):
    """What the writer needs of `stages.runtime.distributed.Ranks` (kept abstract: no torch here)."""

    is_main: bool

    def broadcast(self, value: Any) -> Any: ...

    def barrier(self) -> None: ...


class _OneProcess:
    is_main = True

    def broadcast(self, value: Any) -> Any:
        return value

    def barrier(self) -> None:
        pass


@dataclass(frozen=True)
class _Plan:
    """Rank 0's decision about the output, shared with every rank."""

    work: Path  # where the stage writes: the output itself or its `.partial` sibling
    resuming: bool
    existing: Manifest | None


class ArtifactWriter:
    """Manage one output artifact directory (see the module docstring for the rules).

    Use as a context manager. On entry, `up_to_date` tells whether a finished artifact with the
    same kind, config hash and inputs already sits at `path` (the stage should return
    `result()` at once). Otherwise the stage writes into `work` (the output, or its `.partial`
    sibling under `--force`) and calls `finish`, which writes the manifest and swaps a
    `.partial` into place. A finished artifact that differs is refused unless `force`; an
    unfinished one is resumed (`resume`), refused (resumable stages: it holds checkpoints worth
    keeping) or replaced. If the stage raises, a non-resumable output is removed; a resumable
    one keeps its checkpoints.

    `protect`: further input paths (dataset roots, weight files) the output must not touch.
    `lock=False` for an artifact nested inside another one, whose lock already covers it.
    """

    def __init__(self, path: str | Path, *, kind: str, stage: str, config: dict[str, Any],
                 config_hash: str, inputs: dict[str, ArtifactRef] | None = None,
                 protect: Iterable[str | Path] = (), force: bool = False,
                 resume: bool = False, resumable: bool = False, round: int = 0,
                 device: str = "cpu", ranks: RankGroup | None = None,
                 lock: bool = True) -> None:
        self.path = Path(path)
        self.kind = kind
        self.stage = stage
        self.config = config
        self.config_hash = config_hash
        self.inputs = dict(inputs or {})
        self.protect = [ref.path for ref in self.inputs.values()] + [str(p) for p in protect]
        self.force = force
        self.resume = resume
        self.resumable = resumable
        self.round = round
        self.device = device
        self.ranks: RankGroup = ranks if ranks is not None else _OneProcess()
        self.partial = partial_path(self.path)
        self.work = self.path
        self.existing: Manifest | None = None
        self.resuming = False
        self._lock = ArtifactLock(self.path) if lock else None
        self._created = False
        self._manifest: Manifest | None = None

    @property
    def up_to_date(self) -> bool:
        return self.existing is not None

    @property
    def is_main(self) -> bool:
        return self.ranks.is_main

    def __enter__(self) -> Self:
        plan: _Plan | DudaError | None = None
        if self.is_main:
            try:
                plan = self._plan()
            except (DudaError, OSError) as error:
                self._release()
                plan = error if isinstance(error, DudaError) else write_failure(error, self.path)
                if plan is None:
                    raise
        plan = self.ranks.broadcast(plan)  # every rank of a refused job fails alike
        if isinstance(plan, DudaError):
            raise plan
        assert plan is not None
        self.work, self.resuming, self.existing = plan.work, plan.resuming, plan.existing
        if self.existing is not None:
            self._release()
        return self

    def _plan(self) -> _Plan:
        """Decide what to do with the output; create or clean the directory to write.

        Every refusal comes before anything is created: a refused command leaves the user's
        folder as it was (the lock file goes with the lock)."""
        check_not_input(self.path, self.protect)
        _refuse_link(self.path)
        if self._lock is not None:
            self._lock.acquire()
        self._complete_interrupted_swap()
        path = self.path
        if path.exists() and not path.is_dir():
            raise DudaError(f"output {path} exists and is not a directory",
                            "choose another --out")
        if not _empty(path) and not is_ours(path):
            raise DudaError(f"output {path} is a folder the project did not write (it holds "
                            "no .duda-artifact marker); it is left untouched",
                            "choose another --out, or empty that folder yourself")
        if self.resume and self.resumable and is_ours(self.partial) and not (
                self.partial / MANIFEST).is_file():
            return self._start(self.partial, resuming=True)  # an interrupted --force
        finished = (path / MANIFEST).is_file()
        if finished and not self.force:
            manifest = read_manifest(path)
            same_inputs = {k: v.id for k, v in manifest.inputs.items()} == {
                k: v.id for k, v in self.inputs.items()}
            if manifest.kind == self.kind and self._same_config(manifest) and same_inputs:
                verify(path, manifest)
                return _Plan(path, False, manifest)
            raise DudaError(f"{path} already holds a finished {manifest.kind} made with "
                            f"another config or other inputs{self._interrupted_force()}",
                            "choose another --out, or pass --force to replace it"
                            + self._resume_hint())
        if self.force and not _empty(path):
            self._announce_replacement(path)
            remove_ours(self.partial)
            return self._start(self.partial, resuming=False)
        if not _empty(path):  # the project's own unfinished output
            if self.resumable and self.resume:
                return self._start(path, resuming=True)
            if self.resumable:
                raise DudaError(_unfinished_message(path, self.partial),
                                f"continue it with `{_resume_command(path, self.partial)}`, "
                                "or start over with --force")
            self._announce_replacement(path)
            remove_ours(path)
        elif self.resume and self.resumable:
            raise DudaError(f"--resume was given but {path} holds no run to continue",
                            "drop --resume to start a new run")
        return self._start(path, resuming=False)

    def _interrupted_force(self) -> str:
        if not (is_ours(self.partial) and not (self.partial / MANIFEST).is_file()):
            return ""
        return (f"; an interrupted --force left its unfinished replacement in {self.partial}")

    def _resume_hint(self) -> str:
        if not self._interrupted_force():
            return ""
        if self.resumable:
            return (f" (`{_resume_command(self.path, self.partial)}` continues the "
                    "interrupted replacement)")
        return " (which starts the interrupted replacement over)"

    def _announce_replacement(self, path: Path) -> None:
        """Say which files a replacement deletes that the project did not write."""
        foreign = foreign_files(path)
        if foreign:
            logger.warning(f"--force: {path} is replaced, with files in it that duda did not "
                           f"write: {', '.join(foreign)}")

    def _same_config(self, manifest: Manifest) -> bool:
        """Whether a finished artifact was made with this config: its recorded hash, or its
        recorded config hashed under today's rule (an artifact made before a key was added or
        left out of the hash stays up to date, docs/design.md#configuration)."""
        return manifest.config_hash == self.config_hash or (
            recorded_hash(manifest.config, self.stage) == self.config_hash)

    def _start(self, work: Path, resuming: bool) -> _Plan:
        self._created = not work.exists()
        write_marker(work, self.kind, self.stage)
        remove_stale_temporaries(work)
        return _Plan(work, resuming, None)

    def _complete_interrupted_swap(self) -> None:
        """Finish a swap that a crash interrupted between its two renames. A `.<name>.old`
        that is a symbolic link (left by versions that renamed a linked --out) is removed as a
        link; what it points to stays."""
        old = self.path.parent / f".{self.path.name}.old"
        if not self.path.exists() and (self.partial / MANIFEST).is_file():
            os.replace(self.partial, self.path)
        if (old.exists() or old.is_symlink()) and self.path.exists():
            remove_ours(old)

    def _swap(self) -> None:
        """Put the finished `.partial` in place of the old artifact: two renames, then the old
        one is deleted (a crash in between is completed by the next writer)."""
        old = self.path.parent / f".{self.path.name}.old"
        remove_ours(old)
        if self.path.exists():
            os.replace(self.path, old)
        os.replace(self.work, self.path)
        remove_ours(old)
        self.work = self.path

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            failed = exc_type is not None and self._manifest is None and self.existing is None
            if failed and self.is_main and self.work.exists():
                if not self.resumable:
                    self._discard()
                elif not any(e.name != MARKER for e in self.work.iterdir()):
                    self._discard()  # nothing worth keeping for --resume
        finally:
            self._release()
        failure = write_failure(exc, self.work) if isinstance(exc, Exception) else None
        if failure is not None:
            if self.resumable and self.work.exists():  # its checkpoints are kept
                failure.fix = f"{failure.fix}; --resume continues from the last checkpoint"
            raise failure from None

    def _discard(self) -> None:
        """Remove what this writer wrote (the folder too, if it created it)."""
        if self._created or self.work == self.partial:
            shutil.rmtree(self.work, ignore_errors=True)
        else:  # a folder the user made empty for us: keep it, empty
            _empty_folder(self.work)

    def require_space(self, needed: Callable[[], int], what: str) -> None:
        """Refuse (on every rank alike) when the output's filesystem has less than `needed()`
        bytes free for `what` (estimated on rank 0 only); a resumed run needs only what its
        files do not already hold (docs/design.md#disk-space)."""
        error: DudaError | None = None
        if self.is_main:
            bytes_needed = needed() - (_tree_bytes(self.work) if self.resuming else 0)
            try:
                require_space(self.work, bytes_needed, what)
            except DudaError as refused:
                error = refused
        error = self.ranks.broadcast(error)
        if error is not None:
            raise error

    def require_store_space(self, images: int, height: int, width: int) -> None:
        """`require_space` for a pseudo-label store of `images` label maps of height×width."""
        self.require_space(lambda: store_bytes(images, height, width), "the pseudo-label store")

    def require_checkpoint_space(self, model: Any, num_classes: int) -> None:
        """`require_space` for a warmup run's checkpoints (`model`: its ModelConfig)."""
        self.require_space(lambda: checkpoint_bytes(model, num_classes, teacher=False),
                           "the checkpoints")

    def require_run_space(self, model: Any, num_classes: int, store: Path) -> None:
        """`require_space` for a self-training run from the input store at `store`."""
        self.require_space(lambda: run_bytes(model, num_classes, Path(store), self.work),
                           "the run's checkpoints and store copies")

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()

    def finish(self, summary: dict[str, Any], content: Iterable[str] = ()) -> Manifest:
        """Write the manifest (last, atomically), swap a `.partial` in place, return it.

        `content`: the artifact's content files (relative to it), whose digests the manifest
        records and every load checks. Called on every rank; returns once the artifact exists.
        """
        manifest: Manifest | None = None
        if self.is_main:
            digests = {name: file_digest(self.work / name) for name in content}
            _record_files(self.work)
            manifest = seal(Manifest(
                schema=f"{self.kind}/{VERSIONS[self.kind]}",
                id="",  # derived from the other fields by seal()
                created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                stage=self.stage,
                round=self.round,
                inputs=self.inputs,
                config=self.config,
                config_hash=self.config_hash,
                environment=environment(self.device),
                summary=summary,
                content=digests,
            ))
            atomic_write_text(self.work / MANIFEST,
                              manifest.model_dump_json(by_alias=True, indent=2) + "\n")
            if self.work != self.path:
                self._swap()
        self._manifest = self.ranks.broadcast(manifest)  # after the swap: the artifact exists
        self.work = self.path
        return self._manifest

    def result(self) -> StageResult:
        if self.existing is not None:
            return StageResult(self.path, self.existing, up_to_date=True)
        if self._manifest is None:
            raise RuntimeError("ArtifactWriter.result() before finish()")
        return StageResult(self.path, self._manifest)


def _refuse_link(path: Path) -> None:
    """Refuse a symbolic link as the output: the artifact is swapped by renaming its path,
    which would replace the link, not the folder it points to (docs/design.md, writing an
    artifact safely)."""
    if not path.is_symlink():
        return
    target = Path(os.readlink(path))
    if not path.exists():
        raise DudaError(f"--out {path} is a symbolic link to {target}, which does not exist",
                        "remove the link, or choose another --out")
    raise DudaError(f"--out {path} is a symbolic link (to {target}); duda writes only real "
                    "folders there", f"pass the folder itself: --out {path.resolve()}")


def _record_files(work: Path) -> None:
    """Add the names the artifact holds at its finish to its marker, so that a later --force
    can name the files a user put in it since."""
    marker = read_marker(work)
    if marker:
        marker["files"] = sorted(entry.name for entry in work.iterdir() if entry.name != MARKER)
        atomic_write_json(work / MARKER, marker)


def foreign_files(path: Path) -> list[str]:
    """The names in the finished artifact at `path` that it did not hold when it was finished
    (a user's files; empty when the marker predates that record or the output is unfinished)."""
    recorded = read_marker(path).get("files")
    if not isinstance(recorded, list):
        return []
    return sorted(entry.name for entry in path.iterdir()
                  if entry.name not in recorded and entry.name not in (MARKER, MANIFEST))


def _unfinished_message(path: Path, partial: Path) -> str:
    """'PATH holds an unfinished <stage> run', saying it was stopped before it finished and
    naming a `--force` replacement left beside it."""
    where = partial if is_ours(partial) and not (partial / MANIFEST).is_file() else path
    stage = read_marker(where).get("stage", "training")
    message = (f"{path} holds an unfinished {stage} run (stopped before it wrote its "
               f"{MANIFEST})")
    if where == partial:
        message += f"; an interrupted --force left its unfinished replacement in {partial}"
    return message


def _resume_command(path: Path, partial: Path) -> str:
    """The command that continues the unfinished run at `path` (or its `.partial`): the one
    recorded in its marker, else the one being run, with --resume and without --force."""
    where = partial if is_ours(partial) and not (partial / MANIFEST).is_file() else path
    marker = read_marker(where)
    words = marker.get("command") or command_line.get()
    if not words:
        stage = str(marker.get("stage", "STAGE")).replace("_", "-")
        return f"duda {stage} -c CONFIG ... --out {path} --resume"
    words = [word for word in words if word != "--force"]
    if "--resume" not in words:
        words.append("--resume")
    command = shlex.join(words)
    cwd = marker.get("cwd")
    if isinstance(cwd, str) and Path(cwd) != Path.cwd():
        command = f"cd {shlex.quote(cwd)} && {command}"
    return command


def partial_path(path: Path) -> Path:
    """Where `--force` builds the replacement of the artifact at `path`."""
    return path.parent / f".{path.name}.partial"


def unfinished(path: Path) -> bool:
    """Whether `path` (or its `--force` replacement) holds an unfinished run of the project."""
    return any(is_ours(candidate) and not (candidate / MANIFEST).is_file()
               for candidate in (path, partial_path(path)))
