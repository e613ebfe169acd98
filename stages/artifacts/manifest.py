"""Artifacts: versioned, validated, immutable stage outputs (docs/design.md, artifacts).

Every stage output is a directory whose `manifest.json` is written last and atomically. A
directory without a valid manifest is unfinished and refused as input. This module owns what
an artifact is and how it is read: the manifest model, the content-derived id and the
manifest's own digest, the check on load that both and the content files still match the
manifest (an edited manifest or a changed `model.pt` is refused), atomic file writes, and
lineage. Writing an artifact, with its safety rules, is `stages.artifacts.writer`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, BinaryIO

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from stages.runtime.errors import DudaError

MANIFEST = "manifest.json"
MARKER = ".duda-artifact"

DATASET_INDEX = "duda.dataset_index"
CHECKPOINT = "duda.checkpoint"
PSEUDO_LABELS = "duda.pseudo_labels"
EVALUATION = "duda.evaluation"
REPORT = "duda.report"
PREDICTIONS = "duda.predictions"

# The format version each kind is written with; loaders accept exactly these.
VERSIONS: dict[str, int] = {DATASET_INDEX: 1, CHECKPOINT: 1, PSEUDO_LABELS: 2, EVALUATION: 1,
                           REPORT: 1, PREDICTIONS: 1}
# Older versions still read (a version-1 pseudo-label store stores float16 confidences).
READABLE: dict[str, tuple[int, ...]] = {PSEUDO_LABELS: (1, 2)}

# How a manifest vouches for itself, whatever the artifact's kind
# (docs/design.md#content-digests-and-ids). 1: the id hashes the kind, config, config hash,
# input ids and content digests, and nothing else is checked. 2: the id also hashes the stage,
# the round and which input is which, and `digest` hashes every other field (summary, inputs'
# paths, created, environment), so no field a command prints can be edited unnoticed. Format-1
# manifests are still verified by their own rule, so finished runs stay usable; every new
# manifest is format 2.
MANIFEST_FORMAT = 2


class ArtifactRef(BaseModel):
    """A pointer to an input artifact: its kind, id and where it was read from."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: str
    id: str
    path: str


class Environment(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    python: str
    packages: dict[str, str]
    device: str
    git_revision: str | None = None


class Manifest(BaseModel):
    """The manifest every artifact directory carries."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    schema_id: str = Field(alias="schema", description="kind/version, e.g. duda.checkpoint/1")
    manifest_format: int = Field(1, description="how id and digest are derived (1: absent)")
    id: str
    created: str
    stage: str
    round: int = 0
    inputs: dict[str, ArtifactRef] = Field(default_factory=dict)
    config: dict[str, Any]
    config_hash: str
    environment: Environment
    summary: dict[str, Any] = Field(default_factory=dict)
    content: dict[str, str] = Field(
        default_factory=dict, description="SHA-256 of each content file, by relative path")
    digest: str | None = Field(None, description="SHA-256 of every other field (format 2)")

    @property
    def kind(self) -> str:
        return self.schema_id.split("/", 1)[0]

    @property
    def version(self) -> int:
        return int(self.schema_id.split("/", 1)[1])

    def ref(self, path: str | Path) -> ArtifactRef:
        return ArtifactRef(kind=self.kind, id=self.id, path=str(Path(path).resolve()))


def default_name(stage: str, round: int = 1) -> str:
    """The folder name of a stage's artifact under runs/<experiment>/, the same for a stage
    command's default --out and for `duda run`."""
    return {"prepare_data": "data", "warmup": "warmup", "generate_pseudo": "pseudo",
            "self_train": f"round{round}", "update_offline": f"round{round}_offline",
            "evaluate": "evaluate", "evaluate_warmup": "evaluate_warmup",
            "evaluate_adabn": "evaluate_adabn", "report": "report", "predict": "predictions",
            "import_checkpoint": "imported", "pseudo_import": "pseudo_import"}[stage]


@dataclass(frozen=True)
class StageResult:
    """What a stage's `run()` returns: the artifact, and whether it was already up to date."""

    path: Path
    manifest: Manifest
    up_to_date: bool = False


@contextlib.contextmanager
def atomic_open(path: Path) -> Iterator[BinaryIO]:
    """A binary handle whose content replaces `path` atomically when the block ends.

    It writes a temporary file beside `path` (`.<name>.tmp-<pid>`), fsyncs it and
    `os.replace`s it, so a crash never leaves a half-written file under the final name. The
    temporary file is removed if the block fails, and by the artifact's next writer if the
    process was killed."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_open(path) as handle:
        handle.write(text.encode())


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


# ------------------------------------------------------------------------------ reading


def read_manifest(path: str | Path) -> Manifest:
    """Read and validate `path/manifest.json`; an error names the artifact and the fix."""
    path = Path(path)
    if not path.exists():
        raise DudaError(f"artifact {path} does not exist",
                        "check the path, or run the stage that writes it")
    if not path.is_dir():
        raise DudaError(f"artifact {path} is not a directory",
                        "pass the artifact directory (the one holding manifest.json)")
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise DudaError(f"artifact {path} is unfinished (no {MANIFEST})",
                        "finish it (--resume where the stage supports it) or rebuild it "
                        "with --force")
    try:
        return Manifest.model_validate_json(manifest_path.read_text())
    except (ValidationError, ValueError, UnicodeDecodeError) as error:
        raise DudaError(f"artifact {path} has a corrupt {MANIFEST}: "
                        f"{str(error).splitlines()[0]}",
                        "rebuild it with --force") from None


def load_artifact(path: str | Path, kind: str) -> Manifest:
    """Read an artifact, check that it is of `kind` at the version this code reads, and that
    its id and content files match what its manifest records."""
    manifest = read_manifest(path)
    if manifest.kind != kind:
        raise DudaError(f"artifact {path} is a {manifest.kind}, expected a {kind}",
                        f"pass a {kind.removeprefix('duda.').replace('_', ' ')} artifact")
    readable = READABLE.get(kind, (VERSIONS[kind],))
    if manifest.version not in readable:
        raise DudaError(f"artifact {path} has format {manifest.schema_id}; this version of duda "
                        f"reads {' and '.join(f'{kind}/{v}' for v in readable)}",
                        "rebuild it with this version of duda (--force)")
    verify(Path(path), manifest)
    return manifest


def artifact_id(manifest: Manifest) -> str:
    """The content-derived id, by the rule of the manifest's format (see MANIFEST_FORMAT).
    It leaves out what differs between two identical runs (times, paths, speed figures), so
    rebuilding an artifact with the same content keeps its id and its consumers up to date."""
    identity: dict[str, Any] = {"kind": manifest.kind, "config": manifest.config,
                                "config_hash": manifest.config_hash,
                                "content": manifest.content}
    if manifest.manifest_format == 1:
        identity["inputs"] = sorted(ref.id for ref in manifest.inputs.values())
    else:
        identity.update(manifest_format=manifest.manifest_format, stage=manifest.stage,
                        round=manifest.round,
                        inputs={key: ref.id for key, ref in manifest.inputs.items()})
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def manifest_digest(manifest: Manifest) -> str:
    """SHA-256 of every field of a format-2 manifest but `digest` itself."""
    fields = manifest.model_dump(mode="json", by_alias=True, exclude={"digest"})
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def seal(manifest: Manifest) -> Manifest:
    """`manifest` in the current format, with its id and digest computed on what reading it
    back gives (JSON writes a NaN in a summary as null)."""
    current = Manifest.model_validate_json(manifest.model_copy(
        update={"manifest_format": MANIFEST_FORMAT}).model_dump_json(by_alias=True))
    current = current.model_copy(update={"id": artifact_id(current)})
    return current.model_copy(update={"digest": manifest_digest(current)})


def verify(path: Path, manifest: Manifest) -> None:
    """Refuse an artifact whose manifest was edited or whose content files were changed,
    checking the manifest by the rule of its own format (see MANIFEST_FORMAT)."""
    edited = DudaError(f"artifact {path}: {MANIFEST} was edited (its id or digest does not match "
                       "its recorded fields)", "rebuild the artifact with --force")
    if manifest.manifest_format not in (1, MANIFEST_FORMAT):
        raise DudaError(f"artifact {path} has manifest format {manifest.manifest_format}; this "
                        f"version of duda reads formats 1 and {MANIFEST_FORMAT}",
                        "rebuild it with this version of duda (--force)")
    if manifest.manifest_format == 1 and not manifest.content:
        # Every format-1 writer recorded content digests: none left means they were removed.
        raise DudaError(f"artifact {path}: {MANIFEST} records no content digests (edited, or "
                        "written by a duda too old to check)", "rebuild the artifact with --force")
    if artifact_id(manifest) != manifest.id:
        raise edited
    if manifest.manifest_format == MANIFEST_FORMAT and manifest.digest != manifest_digest(
            manifest):
        raise edited
    for name, recorded in manifest.content.items():
        file = path / name
        if not file.is_file():
            raise DudaError(f"artifact {path} is damaged: {name} is missing",
                            "rebuild the artifact with --force")
        if file_digest(file) != recorded:
            raise DudaError(f"artifact {path} is damaged: {name} differs from the file its "
                            "manifest records (changed or corrupted after it was written)",
                            "rebuild the artifact with --force")


_DIGESTS: dict[tuple[str, int, int], str] = {}


def file_digest(path: Path, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file (remembered per path, size and modification time)."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            while block := handle.read(chunk):
                digest.update(block)
        _DIGESTS[key] = digest.hexdigest()
    return _DIGESTS[key]


def environment(device: str = "cpu") -> Environment:
    packages = {}
    for name in ("duda", "torch", "torchvision", "numpy", "zarr", "pydantic"):
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return Environment(python=platform.python_version(), packages=packages, device=device,
                       git_revision=_git_revision())


def _git_revision() -> str | None:
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                                capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None if result.returncode == 0 else None


def link_or_copy(src: str, dst: str) -> None:
    """`shutil.copytree` copy function: hard-link files (zarr replaces a chunk by renaming a new
    file over it, so a later write never touches the linked copy); copy zarr.json metadata,
    which attribute updates rewrite in place."""
    if os.path.basename(src) == "zarr.json":
        shutil.copy2(src, dst)
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)



@dataclass(frozen=True)
class LineageEntry:
    """One version in an artifact's chain of parents."""

    path: str
    found: bool
    id: str | None = None
    stage: str | None = None
    round: int | None = None
    created: str | None = None
    checkpoints: tuple[str, ...] = ()  # the checkpoints it was made from
    parent: str | None = None  # the parent's id


def lineage(path: str | Path, kind: str, limit: int = 50) -> list[LineageEntry]:
    """The chain of versions from the artifact at `path` back through each manifest's
    `inputs["parent"]` (newest first); the last entry says whether a parent is missing."""
    chain: list[LineageEntry] = []
    current: Path | None = Path(path)
    seen: set[str] = set()
    expected: str | None = None  # the id the child recorded for its parent
    while current is not None and len(chain) < limit:
        try:
            manifest = load_artifact(current, kind)
        except DudaError:
            manifest = None
        if manifest is None or expected not in (None, manifest.id):
            chain.append(LineageEntry(path=str(current), found=False))  # gone or replaced
            break
        if manifest.id in seen:
            break
        seen.add(manifest.id)
        parent = manifest.inputs.get("parent")
        chain.append(LineageEntry(
            path=str(current), found=True, id=manifest.id, stage=manifest.stage,
            round=manifest.round, created=manifest.created,
            checkpoints=tuple(ref.path for key, ref in manifest.inputs.items()
                              if key.startswith("checkpoint")),
            parent=parent.id if parent else None))
        current = Path(parent.path) if parent is not None else None
        expected = parent.id if parent is not None else None
    return chain
