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
- **`--force` never destroys before it has built.** A replacement is built in
  `<parent>/.<name>.partial` and swapped in when its manifest is written; a failed or
  interrupted `--force` leaves the old artifact intact (`--resume` continues the `.partial`).

Under `torchrun` only rank 0 touches the directory and holds the lock; the other ranks receive
its decision (or its error) by broadcast, so every rank of a refused job fails alike instead of
waiting at a barrier; `finish` returns on every rank once the artifact exists.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import json
import os
import shutil
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Self

from stages.artifacts import (
    MANIFEST,
    MARKER,
    VERSIONS,
    ArtifactRef,
    Manifest,
    StageResult,
    artifact_id,
    atomic_write_json,
    atomic_write_text,
    environment,
    file_digest,
    read_manifest,
    verify,
)
from stages.errors import DudaError

LEGACY_RUN_FILE = "train_state.pt"  # an unfinished training run from before markers existed


def is_ours(path: Path) -> bool:
    """Whether `path` is a folder the project wrote: it carries the marker (or is a training
    run from before markers existed)."""
    return (path / MARKER).is_file() or (path / LEGACY_RUN_FILE).is_file()


def write_marker(path: Path, kind: str, stage: str) -> None:
    """Create `path` if needed and mark it as the project's (the first file written)."""
    _make_directory(path)
    if not (path / MARKER).is_file():
        atomic_write_json(path / MARKER, {
            "kind": kind, "stage": stage,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")})


def _make_directory(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise DudaError(f"output {path} cannot be created: it or a folder above it is a file",
                        "choose another --out") from None
    except NotADirectoryError:
        raise DudaError(f"output {path} cannot be created: a folder above it is a file",
                        "choose another --out") from None
    except OSError as error:
        raise DudaError(f"output {path} cannot be created ({error.strerror})",
                        "choose an --out in a place you can write to") from None


def remove_ours(path: Path) -> None:
    """Delete a folder the project wrote; anything else is refused (a bug if reached)."""
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


class ArtifactLock:
    """An exclusive `fcntl.flock` on `<parent>/.<name>.lock`, held while the artifact is written.

    The file holds the holder's pid, host and start time for the refusal message. A lock on a
    network filesystem is only as good as that filesystem's support of flock (NFS ≥ 4 and most
    cluster filesystems map it to their own locks; some do not lock across machines)."""

    def __init__(self, artifact: Path) -> None:
        self.artifact = artifact
        self.path = artifact.parent / f".{artifact.name}.lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        _make_directory(self.path.parent)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise DudaError(f"output {self.artifact} cannot be created ({error.strerror})",
                            "choose an --out in a place you can write to") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise DudaError(f"{self.artifact} is being written by process {holder['pid']} on "
                            f"{holder['host']} since {holder['since']}",
                            "wait for that process to finish (or stop it); two processes must "
                            "never write one artifact") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({
            "pid": os.getpid(), "host": socket.gethostname(),
            "since": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        }).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _read_holder(fd: int) -> dict[str, Any]:
    try:
        holder = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (ValueError, UnicodeDecodeError):
        holder = {}
    return {key: holder.get(key, "?") for key in ("pid", "host", "since")}


# ------------------------------------------------------------------------------ writing


class RankGroup(Protocol):
    """What the writer needs of `stages.distributed.Ranks` (kept abstract: no torch here)."""

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
            except DudaError as error:
                self._release()
                plan = error
        plan = self.ranks.broadcast(plan)  # every rank of a refused job fails alike
        if isinstance(plan, DudaError):
            raise plan
        assert plan is not None
        self.work, self.resuming, self.existing = plan.work, plan.resuming, plan.existing
        if self.existing is not None:
            self._release()
        return self

    def _plan(self) -> _Plan:
        """Decide what to do with the output; create or clean the directory to write."""
        check_not_input(self.path, self.protect)
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
            if (manifest.kind == self.kind and manifest.config_hash == self.config_hash
                    and same_inputs):
                verify(path, manifest)
                return _Plan(path, False, manifest)
            raise DudaError(f"{path} already holds a finished {manifest.kind} made with "
                            "another config or other inputs",
                            "choose another --out, or pass --force to replace it")
        if self.force and not _empty(path):
            remove_ours(self.partial)
            return self._start(self.partial, resuming=False)
        if not _empty(path):  # the project's own unfinished output
            if self.resumable and self.resume:
                return self._start(path, resuming=True)
            if self.resumable:
                raise DudaError(f"{path} holds an unfinished run",
                                "continue it with --resume, or start over with --force")
            remove_ours(path)
        elif self.resume and self.resumable:
            raise DudaError(f"--resume was given but {path} holds no run to continue",
                            "drop --resume to start a new run")
        return self._start(path, resuming=False)

    def _start(self, work: Path, resuming: bool) -> _Plan:
        self._created = not work.exists()
        write_marker(work, self.kind, self.stage)
        remove_stale_temporaries(work)
        return _Plan(work, resuming, None)

    def _complete_interrupted_swap(self) -> None:
        """Finish a swap that a crash interrupted between its two renames."""
        old = self.path.parent / f".{self.path.name}.old"
        if not self.path.exists() and (self.partial / MANIFEST).is_file():
            os.replace(self.partial, self.path)
        if old.exists() and self.path.exists():
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
                elif self._created and not any(e.name != MARKER for e in self.work.iterdir()):
                    shutil.rmtree(self.work)
        finally:
            self._release()

    def _discard(self) -> None:
        """Remove what this writer wrote (the folder too, if it created it)."""
        if self._created or self.work == self.partial:
            shutil.rmtree(self.work, ignore_errors=True)
        else:  # a folder the user made empty for us: keep it, empty
            for entry in self.work.iterdir():
                if entry.is_dir():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink()

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
            manifest = Manifest(
                schema=f"{self.kind}/{VERSIONS[self.kind]}",
                id=artifact_id(self.kind, self.config, self.config_hash, self.inputs, digests),
                created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                stage=self.stage,
                round=self.round,
                inputs=self.inputs,
                config=self.config,
                config_hash=self.config_hash,
                environment=environment(self.device),
                summary=summary,
                content=digests,
            )
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


def partial_path(path: Path) -> Path:
    """Where `--force` builds the replacement of the artifact at `path`."""
    return path.parent / f".{path.name}.partial"


def unfinished(path: Path) -> bool:
    """Whether `path` (or its `--force` replacement) holds an unfinished run of the project."""
    return any(is_ours(candidate) and not (candidate / MANIFEST).is_file()
               for candidate in (path, partial_path(path)))
