"""Artifacts: versioned, validated, immutable stage outputs (DESIGN.md "Artifacts").

Every stage output is a directory whose `manifest.json` is written last and atomically. A
directory without a valid manifest is unfinished and refused as input. `ArtifactWriter` owns an
output directory's life: the up-to-date check (same config and inputs: a no-op), `--force`,
`--resume`, removing a half-written output after an error, and the final manifest.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import shutil
import subprocess
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from stages.errors import DudaError

MANIFEST = "manifest.json"

DATASET_INDEX = "duda.dataset_index"
CHECKPOINT = "duda.checkpoint"
PSEUDO_LABELS = "duda.pseudo_labels"
EVALUATION = "duda.evaluation"

# The format version each kind is written with; loaders accept exactly these.
VERSIONS: dict[str, int] = {DATASET_INDEX: 1, CHECKPOINT: 1, PSEUDO_LABELS: 1, EVALUATION: 1}


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
    id: str
    created: str
    stage: str
    round: int = 0
    inputs: dict[str, ArtifactRef] = Field(default_factory=dict)
    config: dict[str, Any]
    config_hash: str
    environment: Environment
    summary: dict[str, Any] = Field(default_factory=dict)

    @property
    def kind(self) -> str:
        return self.schema_id.split("/", 1)[0]

    @property
    def version(self) -> int:
        return int(self.schema_id.split("/", 1)[1])

    def ref(self, path: str | Path) -> ArtifactRef:
        return ArtifactRef(kind=self.kind, id=self.id, path=str(Path(path).resolve()))


@dataclass(frozen=True)
class StageResult:
    """What a stage's `run()` returns: the artifact, and whether it was already up to date."""

    path: Path
    manifest: Manifest
    up_to_date: bool = False


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file and `os.replace`."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


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
    except (ValidationError, ValueError) as error:
        raise DudaError(f"artifact {path} has a corrupt {MANIFEST}: "
                        f"{str(error).splitlines()[0]}",
                        "rebuild it with --force") from None


def load_artifact(path: str | Path, kind: str) -> Manifest:
    """Read an artifact and check that it is of `kind` at the version this code reads."""
    manifest = read_manifest(path)
    if manifest.kind != kind:
        raise DudaError(f"artifact {path} is a {manifest.kind}, expected a {kind}",
                        f"pass a {kind.removeprefix('duda.').replace('_', ' ')} artifact")
    if manifest.version != VERSIONS[kind]:
        raise DudaError(f"artifact {path} has format {manifest.schema_id}; this version of duda "
                        f"reads {kind}/{VERSIONS[kind]}",
                        "rebuild it with this version of duda (--force)")
    return manifest


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


def file_digest(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class ArtifactWriter:
    """Manage one output artifact directory.

    Use as a context manager. On entry, `up_to_date` tells whether a finished artifact with the
    same kind, config hash and inputs already sits at `path` (the stage should return
    `result()` at once). A finished artifact that differs is refused unless `force`; an
    unfinished one is resumed (`resume`), refused (resumable stages, no `resume`: it may hold
    checkpoints worth keeping) or replaced. If the stage raises, a non-resumable output is
    removed so nothing half-written is left behind; a resumable one keeps its checkpoints.
    """

    def __init__(self, path: str | Path, *, kind: str, stage: str, config: dict[str, Any],
                 config_hash: str, inputs: dict[str, ArtifactRef] | None = None,
                 force: bool = False, resume: bool = False, resumable: bool = False,
                 round: int = 0, device: str = "cpu", is_writer: bool = True) -> None:
        self.path = Path(path)
        self.kind = kind
        self.stage = stage
        self.config = config
        self.config_hash = config_hash
        self.inputs = dict(inputs or {})
        self.force = force
        self.resume = resume
        self.resumable = resumable
        self.round = round
        self.device = device
        self.is_writer = is_writer
        self.existing: Manifest | None = None
        self.resuming = False
        self._created = False
        self._manifest: Manifest | None = None

    @property
    def up_to_date(self) -> bool:
        return self.existing is not None

    def __enter__(self) -> Self:
        if (self.path / MANIFEST).is_file() and not self.force:
            manifest = read_manifest(self.path)
            same_inputs = {k: v.id for k, v in manifest.inputs.items()} == {
                k: v.id for k, v in self.inputs.items()}
            if (manifest.kind == self.kind and manifest.config_hash == self.config_hash
                    and same_inputs):
                self.existing = manifest
                return self
            raise DudaError(f"{self.path} already holds a finished {manifest.kind} made with "
                            "another config or other inputs",
                            "choose another --out, or pass --force to replace it")
        if self.path.exists() and not self.path.is_dir():
            raise DudaError(f"output {self.path} exists and is not a directory",
                            "choose another --out")
        # Other ranks of a multi-process stage take the same decisions (so every rank raises
        # the same error) but leave the directory to the writer.
        if self.path.exists() and self.force:
            if self.is_writer:
                shutil.rmtree(self.path)
        elif self.path.exists() and any(self.path.iterdir()):
            if self.resumable and self.resume:
                self.resuming = True
            elif self.resumable:
                raise DudaError(f"{self.path} holds an unfinished run",
                                "continue it with --resume, or start over with --force")
            elif self.is_writer:
                shutil.rmtree(self.path)
        elif self.resume and self.resumable:
            raise DudaError(f"--resume was given but {self.path} holds no run to continue",
                            "drop --resume to start a new run")
        if not self.is_writer:
            return self
        self._created = not self.path.exists()
        self.path.mkdir(parents=True, exist_ok=True)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        failed = exc_type is not None and self._manifest is None and self.existing is None
        if failed and self.is_writer and not self.resumable and self.path.exists():
            shutil.rmtree(self.path, ignore_errors=True)
        elif (failed and self.is_writer and self.resumable and self._created
              and self.path.exists() and not any(self.path.iterdir())):
            self.path.rmdir()

    def finish(self, summary: dict[str, Any], digest: str = "") -> Manifest:
        """Write the manifest (last, atomically) and return it."""
        identity = json.dumps({"kind": self.kind, "config": self.config_hash,
                               "inputs": sorted(v.id for v in self.inputs.values()),
                               "digest": digest}, sort_keys=True)
        manifest = Manifest(
            schema=f"{self.kind}/{VERSIONS[self.kind]}",
            id=hashlib.sha256(identity.encode()).hexdigest()[:16],
            created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            stage=self.stage,
            round=self.round,
            inputs=self.inputs,
            config=self.config,
            config_hash=self.config_hash,
            environment=environment(self.device),
            summary=summary,
        )
        if self.is_writer:
            atomic_write_text(self.path / MANIFEST,
                              manifest.model_dump_json(by_alias=True, indent=2) + "\n")
        self._manifest = manifest
        return manifest

    def result(self) -> StageResult:
        if self.existing is not None:
            return StageResult(self.path, self.existing, up_to_date=True)
        if self._manifest is None:
            raise RuntimeError("ArtifactWriter.result() before finish()")
        return StageResult(self.path, self._manifest)
