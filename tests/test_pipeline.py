"""`duda run`: every stage in order into one folder; a rerun is a no-op; an interrupted run
continues where it stopped."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import tiny
from typer.testing import CliRunner

import stages.self_train
from duda_cli.app import app
from stages import pipeline
from stages.artifacts.manifest import Environment, Manifest, StageResult
from stages.config import load_config

runner = CliRunner()


@pytest.mark.slow
def test_run_builds_every_artifact_and_resumes_after_ctrl_c(tiny_config_file, tmp_path,
                                                            monkeypatch) -> None:
    out = tmp_path / "runs"
    args = ["run", "-c", str(tiny_config_file), "--out", str(out), "--device", "cpu"]

    # Ctrl-C during the third self-train step, after the checkpoint at iteration 2.
    step = stages.self_train.self_train_step
    calls = []

    def interrupted_step(*positional, **keywords):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return step(*positional, **keywords)

    monkeypatch.setattr(stages.self_train, "self_train_step", interrupted_step)
    first = runner.invoke(app, args)
    assert first.exit_code == 130, first.output
    assert "--resume" in first.stderr
    assert (out / "warmup" / "manifest.json").is_file()
    assert not (out / "round1" / "manifest.json").exists()
    monkeypatch.setattr(stages.self_train, "self_train_step", step)

    second = runner.invoke(app, [*args, "--json"])
    assert second.exit_code == 0, second.output
    said = " ".join(second.stderr.split())  # the console wraps long lines
    assert "[warmup] up to date" in said
    assert "resuming" in said and "at iteration 2" in said
    report = json.loads(second.stdout)
    assert report["artifact"] == str(out / "evaluate")
    assert set(report["stages"]) == {"data", "warmup", "evaluate_warmup", "evaluate_adabn",
                                     "pseudo", "round1", "round1_offline", "evaluate", "report"}
    assert set(report["comparison"]) == {"source-only", "source-only + AdaBN",
                                         "DUDA (mean teacher)"}
    adabn = json.loads((out / "evaluate_adabn" / "report.json").read_text())
    protocol = str(adabn["primary_protocol"])  # the benchmark's 14 classes
    for row in report["comparison"].values():
        assert len(row["per_class"]) == 19 and set(row["miou_by_protocol"]) == {protocol}
    assert adabn["protocol"]["bn_recalibration"] is not None  # target BN statistics
    assert report["adabn_miou"] == adabn["miou"]
    assert report["comparison"]["source-only + AdaBN"]["miou_by_protocol"][protocol] == adabn[
        "miou"]
    # The run's report draws the training runs and the three evaluations.
    html = (out / "report" / "index.html").read_text()
    for name in ("warmup", "round1", "evaluate_warmup", "evaluate_adabn", "evaluate"):
        assert name in html, name
    final = json.loads((out / "evaluate" / "manifest.json").read_text())
    assert final["inputs"]["checkpoint"]["path"] == str((out / "round1").resolve())
    assert 0.0 <= report["summary"]["miou"] <= 1.0
    warm = json.loads((out / "evaluate_warmup" / "report.json").read_text())
    assert warm["protocol"]["bn_recalibration"] is None  # the baseline as trained
    assert not (out / "round1" / "snapshots").exists()

    third = runner.invoke(app, args)
    assert third.exit_code == 0 and "[round1] up to date" in " ".join(third.stderr.split())
    # The closing table: one column per model, a row per class and the mIoU.
    table = third.stderr
    for column in ("source-only", "AdaBN", "DUDA"):
        assert column in table, column
    assert "road" in table and f"mIoU-{protocol}" in table
    assert f"{100 * adabn['miou']:.2f}" in table


ADABN_SEGFORMER = "source-only + AdaBN (decoder BN only: the MiT encoder has LayerNorm)"


def test_the_closing_table_names_what_adabn_recalibrates_and_the_teacher() -> None:
    # A DeepLabV2 with the mean teacher: the rows as they always were.
    assert pipeline.comparison_labels(tiny()) == {
        "evaluate_warmup": "source-only", "evaluate_adabn": "source-only + AdaBN",
        "evaluate": "DUDA (mean teacher)"}
    assert pipeline.PipelineResult({}).labels == pipeline.comparison_labels(tiny())
    # A MiT encoder has LayerNorm only: AdaBN recomputes the decoder's BN; the teacher is named.
    segformer = tiny(model={"name": "segformer", "backbone": "mit_b0"}, input__crop_size=[32, 64],
                     self_train__teacher={"name": "ema", "decay": 0.999})
    assert pipeline.comparison_labels(segformer) == {
        "evaluate_warmup": "source-only", "evaluate_adabn": ADABN_SEGFORMER,
        "evaluate": "DUDA (EMA teacher)"}
    shipped = load_config(Path(__file__).parents[1] / "configs"
                          / "gta5_to_cityscapes_daformer.yaml")
    assert list(pipeline.comparison_labels(shipped).values())[1:] == [ADABN_SEGFORMER,
                                                                      "DUDA (EMA teacher)"]


def test_duda_run_prints_the_segformer_rows(monkeypatch, tiny_config_file, tmp_path) -> None:
    """`duda run`'s table and JSON with the segformer row names (the stages replaced by a
    result whose three evaluations are written by hand)."""
    raw = yaml.safe_load(tiny_config_file.read_text())
    raw["model"] = {"name": "segformer", "backbone": "mit_b0"}
    raw["input"]["crop_size"] = [32, 64]  # a MiT encoder's smallest
    tiny_config_file.write_text(yaml.safe_dump(raw))
    evaluation = tmp_path / "evaluate"
    evaluation.mkdir()
    (evaluation / "report.json").write_text(json.dumps({"primary_protocol": "19",
                                                        "protocols": {"19": ["road"]}}))

    def evaluated(miou: float) -> StageResult:
        summary = {"miou": miou, "miou_by_protocol": {"19": miou}, "per_class": {"road": miou},
                   "primary_protocol": "19"}
        manifest = Manifest(schema="duda.evaluation/1", id="0123456789abcdef",
                            created="2026-01-01T00:00:00+00:00", stage="evaluate", config={},
                            config_hash="h", environment=Environment(python="3", packages={},
                                                                     device="cpu"),
                            summary=summary)
        return StageResult(evaluation, manifest)

    def run(config, root, **kwargs):
        stages = {"evaluate_warmup": evaluated(0.25), "evaluate_adabn": evaluated(0.375),
                  "evaluate": evaluated(0.5)}
        return pipeline.PipelineResult(stages, pipeline.comparison_labels(config))

    monkeypatch.setattr(pipeline, "run", run)
    args = ["run", "-c", str(tiny_config_file), "--out", str(tmp_path / "r")]
    table = runner.invoke(app, args)
    assert table.exit_code == 0, table.output
    words = table.stderr.split()  # the console wraps the long column name inside its box
    for word in ("AdaBN", "(decoder", "only:", "MiT", "LayerNorm)", "37.50"):
        assert word in words, word
    report = json.loads(runner.invoke(app, [*args, "--json"]).stdout)
    assert list(report["comparison"]) == ["source-only", ADABN_SEGFORMER, "DUDA (mean teacher)"]
    assert (report["warmup_miou"], report["adabn_miou"], report["summary"]["miou"]) == (
        0.25, 0.375, 0.5)
