"""`duda run`: every stage in order into one folder; a rerun is a no-op; an interrupted run
continues where it stopped."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

import stages.self_train
from duda_cli.app import app

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
