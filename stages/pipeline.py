"""`duda run`: the whole pipeline, stage by stage, skipping what is already current.

warmup → generate-pseudo → (self-train → update-offline) × rounds → evaluate, after
prepare-data; the warmup model is also evaluated as trained (source-only) and with its BN
statistics recomputed on target-train (AdaBN: every BN of a DeepLabV2, the decoder's only for a
SegFormer, whose MiT encoder has LayerNorm), and the report of the run is drawn last. Every stage
writes its usual artifact under `runs/<experiment>/`; a stage whose artifact is up to date is a
no-op, and an interrupted training stage is resumed, so running the same command again continues
where it stopped. `PipelineResult.comparison` names the three evaluations for the closing table
(`comparison_labels`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from stages import (
    evaluate,
    generate_pseudo,
    prepare_data,
    report,
    self_train,
    update_offline,
    warmup,
)
from stages.artifacts.manifest import CHECKPOINT, EVALUATION, StageResult, default_name
from stages.artifacts.writer import unfinished
from stages.config import Config
from stages.figures import plots
from stages.figures.inputs import adabn_label
from stages.runtime.errors import DudaError
from stages.runtime.progress import Reporter

# The closing table's adapted model, named by its teacher (self_train.teacher.name).
TEACHER_WORDS = {"mean": "mean teacher", "ema": "EMA teacher", "student": "student as teacher"}


def comparison_labels(config: Config) -> dict[str, str]:
    """The rows of the closing table, by the key of the evaluation each shows: the warmup model
    as trained (`source-only`), the same with its BN statistics recomputed on target-train
    (`source-only + AdaBN`; for a segformer `source-only + AdaBN (decoder BN only: the MiT
    encoder has LayerNorm)`), and the adapted model (`DUDA (mean teacher)`, or its EMA teacher
    or the student as teacher)."""
    return {"evaluate_warmup": "source-only",
            "evaluate_adabn": f"source-only + {adabn_label(config.model.name)}",
            "evaluate": f"DUDA ({TEACHER_WORDS[config.self_train.teacher.name]})"}


@dataclass(frozen=True)
class PipelineResult:
    """Every stage's result, in execution order, keyed by the artifact's short name, and the
    closing table's row name of each evaluation it compares (`comparison_labels`)."""

    stages: dict[str, StageResult]
    # A DeepLabV2 with the mean teacher's labels unless the run says otherwise.
    labels: dict[str, str] = field(default_factory=lambda: {
        "evaluate_warmup": "source-only", "evaluate_adabn": "source-only + AdaBN",
        "evaluate": "DUDA (mean teacher)"})

    @property
    def final(self) -> StageResult:
        return self.stages["evaluate"]

    @property
    def comparison(self) -> dict[str, StageResult]:
        """The compared evaluations by row name: source-only, + AdaBN, DUDA, in that order."""
        return {label: self.stages[key] for key, label in self.labels.items()}


def run(config: Config, root: Path, *, init: Path | None = None, force: bool = False,
        device: str = "auto", reporter: Reporter | None = None) -> PipelineResult:
    """Run every stage into `root` (e.g. runs/<experiment>) and return their results."""
    reporter = reporter or Reporter()
    results: dict[str, StageResult] = {}

    def note(name: str, result: StageResult) -> StageResult:
        results[name] = result
        state = "up to date" if result.up_to_date else "done"
        reporter.info(f"[{name}] {state}: {result.path}")
        return result

    data = note("data", prepare_data.run(config, root / default_name("prepare_data"),
                                         force=force, reporter=reporter))
    out = root / default_name("warmup")
    checkpoint = note("warmup", warmup.run(
        config, data.path, out, init=init, resume=unfinished(out), force=force, device=device,
        reporter=reporter)).path
    # The source-only baseline as trained (BN recalibration on the target is part of the
    # adaptation being measured), and the same model with its BN statistics recomputed on
    # target-train (AdaBN; a segformer's decoder BN only): what the adaptation gains beyond new
    # normalisation statistics.
    for name, recalibrated in (("evaluate_warmup", False), ("evaluate_adabn", True)):
        settings = config.model_copy(update={"evaluate": config.evaluate.model_copy(
            update={"recalibration": config.evaluate.recalibration.model_copy(
                update={"enabled": recalibrated})})})
        note(name, evaluate.run(settings, data.path, checkpoint, root / default_name(name),
                                force=force, device=device, reporter=reporter))
    pseudo = note("pseudo", generate_pseudo.run(
        config, data.path, checkpoint, root / default_name("generate_pseudo"), force=force,
        device=device, reporter=reporter)).path
    for round_index in range(1, config.pipeline.rounds + 1):
        out = root / default_name("self_train", round_index)
        checkpoint = note(out.name, self_train.run(
            config, data.path, checkpoint, pseudo, out, resume=unfinished(out), force=force,
            device=device, reporter=reporter, round=round_index)).path
        updated = root / default_name("update_offline", round_index)
        pseudo = note(updated.name, update_offline.run(
            config, data.path, checkpoint, checkpoint / self_train.STORE_DIR, updated,
            force=force, device=device, reporter=reporter)).path
    note("evaluate", evaluate.run(config, data.path, checkpoint, root / default_name("evaluate"),
                                  force=force, device=device, reporter=reporter))
    _report(root, results, force, reporter)
    return PipelineResult(results, comparison_labels(config))


def _report(root: Path, results: dict[str, StageResult], force: bool,
            reporter: Reporter) -> None:
    """The run's report (`duda report` of its training runs and evaluations) under `root`;
    skipped, with one line, without matplotlib."""
    try:
        plots.require_matplotlib()
    except DudaError:
        reporter.info("report skipped: matplotlib is not installed (pip install -e '.[report]' "
                      "and rerun to draw it)")
        return
    drawn = [result.path for result in results.values()
             if result.manifest.kind in (CHECKPOINT, EVALUATION)]
    results["report"] = report.run(drawn, root / default_name("report"), force=force,
                                   reporter=reporter)
    reporter.info(f"[report] {results['report'].path / report.HTML_FILE}")
