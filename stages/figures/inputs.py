"""What `duda report` reads: training runs (finished or in progress) and evaluations, from disk.

A checkpoint artifact is read through its `metrics.jsonl` (a truncated last line, from a run
killed mid-write, is skipped and counted), its manifest and, for a run still in progress (a
folder with `metrics.jsonl` and no manifest), its `train_state.pt` for the planned length. An
evaluation artifact is read through its `report.json` and saved predictions. Anything else is a
`Skipped` entry that says why, so the report can draw what it can and list the rest.

An evaluation also knows the model family of the checkpoint it evaluated (from that checkpoint's
manifest), so that a BN recalibration is named by what it recomputed: every BN of a DeepLabV2,
only the decoder's of a SegFormer, whose MiT encoder has LayerNorm (`adabn_label`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stages.artifacts.checkpoint import BEST_FILE, METRICS_FILE, MODEL_FILE, TRAIN_STATE_FILE
from stages.artifacts.manifest import (
    CHECKPOINT,
    EVALUATION,
    MANIFEST,
    MARKER,
    VERSIONS,
    ArtifactRef,
    Manifest,
    read_manifest,
)
from stages.artifacts.writer import partial_path
from stages.config import parse_model_config
from stages.runtime.errors import DudaError

EVALUATION_REPORT = "report.json"  # what `duda evaluate` writes
PREDICTIONS_DIR = "predictions"
MAX_PANELS = 4  # prediction panels embedded per evaluation

logger = logging.getLogger("duda")

# What a BN recalibration (AdaBN, on a source-only model) recomputes, by model family, where it
# is not every normalisation of the network: a MiT encoder normalises with LayerNorm, which keeps
# no running statistics, so only the BatchNorm of the decoder head is recomputed.
RECALIBRATION_SCOPE = {"segformer": "decoder BN only: the MiT encoder has LayerNorm"}


def adabn_label(model_name: str | None) -> str:
    """AdaBN (BN statistics recomputed on target-train) named for the model family `model_name`
    (`model.name`): `AdaBN`, or `AdaBN (decoder BN only: the MiT encoder has LayerNorm)` for
    a segformer."""
    scope = RECALIBRATION_SCOPE.get(model_name or "")
    return f"AdaBN ({scope})" if scope else "AdaBN"

def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def plural(count: int) -> str:
    return "" if count == 1 else "s"


DRAWABLE = ("checkpoints (training curves), evaluations (IoU per class, confusion matrix, "
            "predictions) and training runs in progress (a folder with metrics.jsonl)")

# The training curves take the offline update's outcome categories (`offline/<category>` keys)
# from the caller: they are the method's `CHANGES`, which this layer does not import
# (docs/design.md#folder-layout: figures and method are independent).


def curve_groups(changes: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """Training-curve figures in page order, (name, title) each, each drawing the scalar keys
    `curve_group` gives it; "other" takes every key no group names. Per-class lists are drawn
    apart, as heat maps. `changes`: the offline update's outcome categories."""
    return (
        ("losses", "loss terms"),
        ("evaluation", "periodic evaluation (target-val)"),
        ("labels", "pseudo labels: coverage, agreement, accuracy"),
        ("offline", "offline update: pixels " + ", ".join(changes)),
        ("schedules", "learning rate, α, β"),
        ("other", "other figures"),
    )


def curve_group(key: str, changes: Sequence[str]) -> str:
    """The `curve_groups` name a scalar metrics key is drawn in; `changes`: the offline
    update's outcome categories."""
    head, _, tail = key.partition("/")
    if head == "loss":
        return "losses"
    if head == "val":
        return "evaluation"
    if head == "offline" and tail in changes:
        return "offline"
    if head in ("lr", "alpha", "beta"):
        return "schedules"
    if any(word in key for word in ("coverage", "agreement", "accuracy")):
        return "labels"
    return "other"


# ------------------------------------------------------------------------------ reading


@dataclass(frozen=True)
class Metrics:
    """The complete lines of a `metrics.jsonl`; `skipped` counts the others (a line cut short
    by a killed run, or one that is not a JSON object with an iteration)."""

    records: list[dict[str, Any]]
    skipped: int
    digest: str

    @property
    def last_iteration(self) -> int:
        return max(int(record["iteration"]) for record in self.records)


def read_metrics(path: Path) -> Metrics:
    data = path.read_bytes()  # read once: a live run may append while we parse
    records, skipped = [], 0
    for line in data.split(b"\n"):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (ValueError, UnicodeDecodeError):
            skipped += 1
            continue
        if isinstance(record, dict) and is_number(record.get("iteration")):
            records.append(record)
        else:
            skipped += 1
    return Metrics(records, skipped, hashlib.sha256(data).hexdigest()[:16])


def scalar_series(records: Iterable[dict[str, Any]]) -> dict[str, list[tuple[float, float]]]:
    """Every key holding a number, as (iteration, value) pairs in file order."""
    series: dict[str, list[tuple[float, float]]] = {}
    for record in records:
        for key, value in record.items():
            if key != "iteration" and is_number(value):
                series.setdefault(key, []).append((record["iteration"], float(value)))
    return series


def class_series(records: Iterable[dict[str, Any]]) -> dict[str, tuple[list[float], np.ndarray]]:
    """Every key holding a list of numbers (one per class; null is NaN), as (iterations (T,),
    values (T, C)). A line whose list has another length than the key's first is left out."""
    rows: dict[str, tuple[list[float], list[list[float]]]] = {}
    for record in records:
        for key, value in record.items():
            if not isinstance(value, list) or not value or not all(
                    v is None or is_number(v) for v in value):
                continue
            iterations, values = rows.setdefault(key, ([], []))
            if not values or len(values[0]) == len(value):
                iterations.append(record["iteration"])
                values.append([math.nan if v is None else float(v) for v in value])
    return {key: (iterations, np.array(values, dtype=float))
            for key, (iterations, values) in rows.items()}


@dataclass
class Training:
    """A checkpoint artifact or a run in progress (`manifest` None), read from `folder`."""

    name: str
    path: Path  # as given
    folder: Path  # where it was read: `path`, or its `.partial` sibling during a --force rebuild
    manifest: Manifest | None
    metrics: Metrics
    stage: str
    class_names: list[str] | None
    total: int | None
    notes: list[str] = field(default_factory=list)

    @property
    def ref(self) -> ArtifactRef:
        if self.manifest is not None:
            return self.manifest.ref(self.path)
        # A live run has no id yet: its metrics' digest stands in, so a report of it is
        # rebuilt as soon as the run logs another line.
        return ArtifactRef(kind=CHECKPOINT, id=f"unfinished-{self.metrics.digest}",
                           path=str(self.folder.resolve()))

    @property
    def state(self) -> str:
        if self.manifest is not None:
            return (f"{self.stage} checkpoint (round {self.manifest.round}), "
                    f"{self.metrics.last_iteration} iterations")
        if self.total:
            return f"unfinished run (iteration {self.metrics.last_iteration} of {self.total})"
        return f"unfinished run, last logged iteration {self.metrics.last_iteration}"


@dataclass
class Evaluation:
    name: str
    path: Path
    manifest: Manifest
    report: dict[str, Any]
    predictions: list[Path]
    prediction_caption: str
    model_name: str | None = None  # the evaluated checkpoint's model family, if known

    @property
    def ref(self) -> ArtifactRef:
        return self.manifest.ref(self.path)

    @property
    def class_names(self) -> list[str]:
        return list(self.report.get("per_class", {}))

    @property
    def protocol_classes(self) -> list[str]:
        """The classes the headline mIoU averages (all, when the report does not say)."""
        primary = str(self.report.get("primary_protocol", ""))
        return list(self.report.get("protocols", {}).get(primary, self.class_names))

    @property
    def headline(self) -> str:
        primary = self.report.get("primary_protocol")
        label = f"mIoU-{primary}" if primary else "mIoU"
        protocol = self.report.get("protocol", {})
        where = f"{protocol.get('domain', '?')}/{protocol.get('split', '?')}"
        text = (f"{label} {100 * self.report['miou']:.1f} on {where} "
                f"({protocol.get('images', '?')} images)")
        if protocol.get("model"):
            text += f", {protocol['model']} at iteration {protocol.get('iteration', '?')}"
        scope = RECALIBRATION_SCOPE.get(self.model_name or "")
        if protocol.get("bn_recalibration") and scope:
            text += f", BN recalibrated on target-train ({scope})"
        return text


@dataclass(frozen=True)
class Skipped:
    path: Path
    reason: str
    fix: str


def open_artifacts(path: Path, name: str) -> list[Training | Evaluation | Skipped]:
    """Read one input, or say why it cannot be drawn. A finished checkpoint that `--force` is
    rebuilding beside it (in its `.partial` sibling) comes with the rebuild, as a second run."""
    opened = _open_one(path, name)
    live = partial_path(path)
    if isinstance(opened, Training) and opened.manifest is not None and _is_live_run(live):
        rebuild = _training(path, live, f"{name} (rebuild)", None, note=(
            f"a rebuild (--force) in progress or interrupted, read from {live}"))
        return [opened, rebuild]
    return [opened]


def _open_one(path: Path, name: str) -> Training | Evaluation | Skipped:
    if not path.exists():
        return Skipped(path, "does not exist", "check the path")
    if not path.is_dir():
        return Skipped(path, "is not a folder",
                       "pass an artifact folder (the one holding manifest.json) or the folder "
                       "of a training run")
    live = partial_path(path)
    if not (path / MANIFEST).is_file():
        if (path / METRICS_FILE).is_file():
            return _training(path, path, name, None)
        if _is_live_run(live):
            return _training(path, live, name, None)
        return _unfinished(path)
    try:
        manifest = read_manifest(path)
    except DudaError as error:
        return Skipped(path, error.message.removeprefix(f"artifact {path} "), error.fix or "")
    if manifest.kind not in (CHECKPOINT, EVALUATION):
        return Skipped(path, f"is a {manifest.kind} artifact; only {DRAWABLE} can be drawn",
                       "pass a checkpoint (from warmup or self-train) or an evaluation "
                       "artifact")
    if manifest.version != VERSIONS[manifest.kind]:
        return Skipped(path, f"has format {manifest.schema_id}; this version of duda reads "
                       f"{manifest.kind}/{VERSIONS[manifest.kind]}",
                       "draw it with the version of duda that wrote it")
    if manifest.kind == EVALUATION:
        return _evaluation(path, name, manifest)
    return _training(path, path, name, manifest)


def _unfinished(path: Path) -> Skipped:
    """Why a folder without manifest or metrics cannot be drawn."""
    try:
        kind = json.loads((path / MARKER).read_text()).get("kind")
    except (OSError, ValueError, AttributeError):
        kind = None
    if kind == CHECKPOINT or (path / TRAIN_STATE_FILE).is_file():
        return Skipped(path, "is a training run that has not logged an iteration yet",
                       "run the report again once it has (every log_every iterations)")
    if kind is not None:
        return Skipped(path, f"is an unfinished {kind} artifact (no manifest.json yet)",
                       "run the report again once the stage writing it has finished")
    return Skipped(path, "is neither an artifact (no manifest.json) nor a training run "
                   "(no metrics.jsonl)", _fix_for_folder(path))


def _is_live_run(folder: Path) -> bool:
    return (folder / METRICS_FILE).is_file() and not (folder / MANIFEST).is_file()


def _fix_for_folder(path: Path) -> str:
    inside = sorted(child for child in path.iterdir()
                    if child.is_dir() and ((child / MANIFEST).is_file()
                                           or (child / METRICS_FILE).is_file()))
    if inside:
        return "pass the artifacts it holds, e.g. " + " ".join(str(c) for c in inside[:6])
    return f"pass one of: {DRAWABLE}"


def _training(path: Path, folder: Path, name: str, manifest: Manifest | None,
              note: str = "") -> Training | Skipped:
    metrics_path = folder / METRICS_FILE
    if not metrics_path.is_file():
        return Skipped(path, "is a checkpoint without metrics.jsonl (imported or converted, not "
                       "trained here): it has no training curves",
                       "pass a checkpoint that warmup or self-train wrote, or its evaluation")
    metrics = read_metrics(metrics_path)
    if not metrics.records:
        cut = f" ({metrics.skipped} incomplete)" if metrics.skipped else ""
        return Skipped(path, f"has no complete line in metrics.jsonl yet{cut}",
                       "run the report again once the run has logged its first iteration")
    state = None if manifest is not None else _train_state(folder)
    stage = _stage(manifest, folder, state)
    total = _total_iterations(manifest, state, stage)
    training = Training(name, path, folder, manifest, metrics, stage,
                        _class_names(manifest, folder), total)
    if note:
        training.notes.append(note)
    if metrics.skipped:
        training.notes.append(f"{metrics.skipped} incomplete line{plural(metrics.skipped)} of "
                              f"{METRICS_FILE} skipped (a line cut short by a killed run is "
                              "one); the curves use the complete lines")
    return training


def _train_state(folder: Path) -> dict[str, Any] | None:
    """The saved training state of a run in progress, if it has one yet (best effort: a
    report never fails on it). Memory-mapped: only the small entries are read."""
    path = folder / TRAIN_STATE_FILE
    if not path.is_file():
        return None
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - being replaced, foreign or damaged: draw without it
        return None
    return state if isinstance(state, dict) else None


def _stage(manifest: Manifest | None, folder: Path, state: dict[str, Any] | None) -> str:
    if manifest is not None:
        return manifest.stage
    try:
        return str(json.loads((folder / MARKER).read_text())["stage"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    config = (state or {}).get("identity", {}).get("config", {})
    for stage in ("self_train", "warmup"):
        if stage in config:
            return stage
    return "training"


def _total_iterations(manifest: Manifest | None, state: dict[str, Any] | None,
                      stage: str) -> int | None:
    config = manifest.config if manifest is not None else (
        (state or {}).get("identity", {}).get("config", {}))
    total = config.get(stage, {}).get("iterations") if isinstance(config, dict) else None
    return int(total) if is_number(total) else None


def _class_names(manifest: Manifest | None, folder: Path) -> list[str] | None:
    """From the dataset index the checkpoint was trained on, else from its model file (a run
    in progress has `best.pt` after its first periodic evaluation)."""
    if manifest is not None and "data" in manifest.inputs:
        try:
            index = json.loads((Path(manifest.inputs["data"].path) / "index.json").read_text())
            return [str(name) for name in index["classes"]["names"]]
        except (OSError, ValueError, KeyError, TypeError):
            pass
    for path in (folder / MODEL_FILE, folder / BEST_FILE):
        if not path.is_file():
            continue
        import torch

        try:
            model = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            return [str(name) for name in model["class_names"]]
        except Exception as error:  # noqa: BLE001 - best effort: generic class labels instead
            logger.debug("class names from %s: %r", path, error)
    return None


def _evaluation(path: Path, name: str, manifest: Manifest) -> Evaluation | Skipped:
    try:
        report = json.loads((path / EVALUATION_REPORT).read_text())
        float(report["miou"])
        dict(report["per_class"])
    except (OSError, ValueError, KeyError, TypeError):
        return Skipped(path, f"is an evaluation whose {EVALUATION_REPORT} is missing or "
                       "unreadable", "rebuild it with `duda evaluate --force`")
    predictions, caption = _prediction_images(path / PREDICTIONS_DIR)
    return Evaluation(name, path, manifest, report, predictions, caption,
                      _model_family(manifest))


def _model_family(manifest: Manifest) -> str | None:
    """`model.name` of the checkpoint an evaluation evaluated, from that checkpoint's manifest
    (a model section without a name is a deeplabv2); None where it cannot be read (the
    checkpoint moved or was deleted since)."""
    ref = manifest.inputs.get("checkpoint")
    if ref is None:
        return None
    try:
        model = read_manifest(Path(ref.path)).config.get("model")
        return None if model is None else parse_model_config(model).name
    except (DudaError, OSError, ValueError):  # pydantic's ValidationError is a ValueError
        return None


def _prediction_images(folder: Path) -> tuple[list[Path], str]:
    """The first few saved panels (image | prediction | ground truth), else colour predictions.

    Panels are `<id>_panel.png` or files in a `panel*` subfolder; colour predictions sit
    directly in the folder or in `color/` (`colour/`). Other subfolders (trainIds, label ids,
    confidence) are not pictures to look at."""
    if not folder.is_dir():
        return [], ""
    files = sorted(p for p in folder.rglob("*.png") if p.is_file())
    panels = [p for p in files if p.stem.endswith("_panel") or any(
        part.lower().startswith("panel") for part in p.relative_to(folder).parts[:-1])]
    if panels:
        return panels[:MAX_PANELS], "image | prediction | ground truth"
    colour = [p for p in files if p.parent == folder
              or p.relative_to(folder).parts[0].lower() in ("color", "colour")]
    return colour[:MAX_PANELS], "prediction"


def short_names(paths: Sequence[Path]) -> list[str]:
    """A label per path: its folder name, with parent folders added where names repeat."""
    parts = [Path(p).resolve().parts for p in paths]
    depth = [1] * len(paths)
    for _ in range(max((len(p) for p in parts), default=1)):
        names = ["/".join(p[-d:]) for p, d in zip(parts, depth)]
        repeated = {n for n in names if names.count(n) > 1}
        if not repeated:
            return names
        depth = [d + 1 if n in repeated else d for n, d in zip(names, depth)]
    return [f"{n} ({i + 1})" for i, n in enumerate(names)]
