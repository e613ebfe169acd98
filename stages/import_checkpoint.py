"""The `import-checkpoint` stage: an external state dict becomes a checkpoint artifact, untrained.

The weights (a DUDA reference snapshot, its mean teacher included; an IAST, FDA or AdaptSegNet
snapshot; the Caffe DeepLab or a torchvision ImageNet init; NVlabs' ImageNet MiT or a DAFormer
checkpoint for a SegFormer; a duda checkpoint of either family or its `model.pt`) are mapped key
by key with shape checks onto a model built from `config.model`
(`stages.artifacts.weights.import_weights`), and written as `model.pt` with the same weights as
student and teacher, iteration 0. The artifact is a `duda.checkpoint` like warmup's, so
`self-train`, `generate-pseudo`, `evaluate` and `predict` take it as their `--checkpoint`. Of a
file holding two models (a DAFormer checkpoint's student `model.*` and EMA teacher
`ema_model.*`, a duda self-train checkpoint's student and mean teacher) the one `weights` names
is imported: by default the config's `model.init_weights` (SegFormer; the teacher unless set),
the teacher for a DeepLabV2.

The class names come from a dataset index when one is given, else from the config's data
section (the 19 Cityscapes classes for every layout but `folder`, whose classes it names). The
manifest's input is the weights file, named by the SHA-256 of its bytes (or the checkpoint
artifact it came from), and its summary holds the mapping table: the format and lineage, the
model family (and a DeepLabV2's style), which of two models was imported, the counts of mapped,
unused and missing tensors, each unused key with its reason, and the assumptions made. Anything
that does not fit — a missing or mis-shaped tensor, another class count, weights of another
layout or model family, a file that is not a state dict — is a DudaError and leaves no output
behind.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, get_args

import torch

from stages.artifacts.checkpoint import (
    MODEL_FILE,
    load_checkpoint_manifest,
    load_torch,
    write_model_file,
)
from stages.artifacts.manifest import CHECKPOINT, MANIFEST, ArtifactRef, StageResult, file_digest
from stages.artifacts.weights import FORMATS, WHICH, Format, ImportReport, import_weights
from stages.artifacts.writer import ArtifactWriter
from stages.config import Config, config_hash
from stages.data.classes import ClassTable, class_table
from stages.data.index import load_dataset_index
from stages.nn.model import build_model
from stages.runtime.errors import DudaError
from stages.runtime.progress import Reporter

STAGE = "import_checkpoint"
WEIGHTS = "weights"  # the kind recorded for an input that is a plain weights file


def run(config: Config, source: str | Path, out: str | Path, *, data: str | Path | None = None,
        zero_aspp_branches: Sequence[int] = (), format: str | None = None,
        weights: str | None = None, force: bool = False,
        reporter: Reporter | None = None) -> StageResult:
    """Import the weights at `source` into a model of `config.model`; write the checkpoint
    artifact at `out`.

    `data`: a dataset index whose class table names the classes (default: the config's).
    `zero_aspp_branches`: classifier branches set to zero after loading ((2, 3) reproduces
    AdaptSegNet's single-level model; DeepLabV2 only). `format`: one of
    `stages.artifacts.weights.FORMATS`, overriding the detection from key names. `weights`:
    "teacher" or "student", the model to import from a file holding two; None: the config's
    `model.init_weights` (a SegFormer's), else the teacher.
    """
    reporter = reporter or Reporter()
    source = Path(source).expanduser()
    if format is not None and format not in FORMATS:
        raise DudaError(f"unknown weights format {format!r}",
                        f"use one of {', '.join(get_args(Format))}, or leave --format out to "
                        "detect it from the key names")
    if weights is not None and weights not in WHICH:
        raise DudaError(f"unknown --weights {weights!r}: it names the model to import from a "
                        "file holding two",
                        "use --weights teacher (DAFormer's ema_model.*, a duda mean teacher) or "
                        "--weights student (DAFormer's model.*, a duda student)")
    if zero_aspp_branches and config.model.name != "deeplabv2":
        raise DudaError(f"--zero-aspp-branches applies to DeepLabV2's summed ASPP classifier, but "
                        f"model.name is {config.model.name} (a {config.model.describe()}, whose "
                        "head has no such branches)",
                        "leave --zero-aspp-branches out for a SegFormer")
    inputs = {WEIGHTS: _source_ref(source)}
    if data is not None:
        index = load_dataset_index(data)
        classes = index.classes
        inputs["data"] = index.ref
    else:
        classes = class_table(config.data)
    branches = tuple(sorted({int(branch) for branch in zero_aspp_branches}))
    options: dict[str, Any] = {"format": format, "zero_aspp_branches": list(branches),
                               "class_names": list(classes.names)}
    if weights is not None:
        options["weights"] = weights  # recorded only when given: earlier imports keep their hash
    section: dict[str, Any] = {
        "seed": config.seed,
        "model": config.model.model_dump(mode="json"),
        STAGE: options,
    }
    with ArtifactWriter(out, kind=CHECKPOINT, stage=STAGE, config=section,
                        config_hash=config_hash(section), inputs=inputs, force=force) as writer:
        if writer.up_to_date:
            return writer.result()
        # A backbone-only file leaves the classifier at its initialisation: seeded, so the same
        # command writes the same model.
        torch.manual_seed(config.seed)
        model = build_model(config.model, classes.num_classes)
        report = import_weights(model, source, config=config.model,
                                zero_aspp_branches=branches, format=format,  # type: ignore[arg-type]
                                weights=weights)  # type: ignore[arg-type]
        if report.format == "duda":
            _check_duda_classes(source, classes)
        reporter.info(report.summary())
        write_model_file(writer.work / MODEL_FILE, student=model, teacher=model,
                         model_config=config.model, class_names=classes.names, iteration=0)
        writer.finish(_summary(report, config, classes), content=[MODEL_FILE])
    return writer.result()


def _source_ref(source: Path) -> ArtifactRef:
    """The input record of the weights: a checkpoint artifact's own ref, else the file's
    digest (the first 16 hex digits of its SHA-256)."""
    if not source.exists():
        raise DudaError(f"weights {source} do not exist",
                        "pass an existing weights file or checkpoint artifact directory")
    if source.is_dir():
        if not (source / MANIFEST).is_file():
            raise DudaError(f"weights {source} is a directory but not a checkpoint artifact (no "
                            f"{MANIFEST})", "pass a weights file or a checkpoint artifact")
        return load_checkpoint_manifest(source).ref(source)
    try:
        digest = file_digest(source)
    except OSError as error:
        raise DudaError(f"weights file {source} cannot be read ({error.strerror})",
                        "check the path and its permissions") from None
    return ArtifactRef(kind=WEIGHTS, id=digest[:16], path=str(source.resolve()))


def _check_duda_classes(source: Path, classes: ClassTable) -> None:
    """A duda checkpoint of as many classes but other names would silently relabel them."""
    path = source / MODEL_FILE if source.is_dir() else source
    data = load_torch(path)
    names = data.get("class_names")
    if isinstance(names, list) and tuple(map(str, names)) != tuple(classes.names):
        differ = [f"{i}: {a!r} vs {b!r}" for i, (a, b) in enumerate(zip(names, classes.names))
                  if a != b]
        raise DudaError(f"checkpoint {source} was trained for other classes than the "
                        f"{classes.num_classes} this import is for ({'; '.join(differ[:3])})",
                        "pass --data with the dataset index of the checkpoint's class table, "
                        "or set the config's data section to it")


def _summary(report: ImportReport, config: Config, classes: ClassTable) -> dict[str, Any]:
    """The manifest summary: what a warmup checkpoint records, and the mapping table."""
    model: dict[str, Any] = {"model": config.model.name, "backbone": config.model.backbone}
    if config.model.name == "deeplabv2":
        model["style"] = config.model.style
    else:
        model["head"] = config.model.head
    return {
        "iteration": 0,
        **model,
        "num_classes": classes.num_classes,
        "format": report.format,
        "description": report.description,
        "lineage": report.lineage,
        "source": report.source,
        "weights": report.weights,
        "mapped": len(report.mapped),
        "unused": [{"key": key, "reason": reason} for key, reason in report.unused],
        "missing": list(report.missing),
        "zeroed_aspp_branches": list(report.zeroed_aspp_branches),
        "assumptions": assumptions(report),
        "teacher": "the imported weights (student and teacher are the same)",
    }


def assumptions(report: ImportReport) -> list[str]:
    """The assumptions of an import, in words: a headline for the AdaptSegNet branch choice,
    then the importer's own notes."""
    lines = []
    if report.format in ("adaptsegnet", "adaptsegnet_multi"):
        level = "single-level" if report.format == "adaptsegnet" else "two-level"
        if report.zeroed_aspp_branches == (2, 3):
            lines.append(f"AdaptSegNet {level}: ASPP branches 2–3 zeroed")
        else:
            lines.append(f"FDA-style {level} DeepLabV2: all four ASPP branches summed")
    elif report.zeroed_aspp_branches:
        lines.append("ASPP branches "
                     f"{', '.join(map(str, report.zeroed_aspp_branches))} zeroed, as asked")
    return lines + list(report.notes)
