"""`duda report`: figures, the self-contained page and the comparison tables, from hand-built
artifacts (no model runs); runs in progress; bad inputs; the up-to-date check."""

from __future__ import annotations

import base64
import csv
import io
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from duda_cli.app import app
from stages import report
from stages.artifacts.manifest import (
    CHECKPOINT,
    DATASET_INDEX,
    EVALUATION,
    PSEUDO_LABELS,
    ArtifactRef,
)
from stages.artifacts.writer import ArtifactWriter
from stages.figures import plots
from stages.figures.inputs import adabn_label, open_artifacts
from stages.method.offline import CHANGES

runner = CliRunner()
CLASSES = ["road", "sky", "car"]


def _artifact(path: Path, kind: str, stage: str, files: dict[str, str | bytes],
              config: dict | None = None, inputs: dict[str, ArtifactRef] | None = None,
              summary: dict | None = None) -> Path:
    """A finished artifact of `kind` holding `files`, written the way the stages write one."""
    with ArtifactWriter(path, kind=kind, stage=stage, config=config or {},
                        config_hash=f"test-{path.name}", inputs=inputs) as writer:
        for name, content in files.items():
            target = writer.path / name
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                target.write_bytes(content)
            else:
                target.write_text(content)
        writer.finish(summary or {})
    return path


def _index(root: Path) -> Path:
    return _artifact(root / "data", DATASET_INDEX, "prepare_data",
                     {"index.json": json.dumps({"classes": {"names": CLASSES}})})


def _records(last: int, every: int = 10) -> list[dict]:
    """Metrics lines as self-train logs them, with per-class lists (null: undefined)."""
    lines = []
    for it in range(every, last + 1, every):
        lines.append({"iteration": it, "loss/source_ce": 1.0 / it, "loss/offline_sce": 2.0 / it,
                      "lr": 0.01 * (1 - it / 100), "alpha": 0.2 + it / 1000, "beta": 0.25,
                      "online/coverage": it / 100, "online/accuracy": 0.9,
                      "offline/kept": 100.0 + it, "offline/added": 10.0, "offline/dropped": 1.0,
                      "online/thresholds": [0.9, 0.5, 0.0],
                      "online/class_accuracy": [0.95, None, it / 100],
                      "newly/added_key": float(it)})
        if it % 20 == 0:
            lines.append({"iteration": it, "val/miou": 0.3 + it / 1000,
                          "offline_store/accuracy": 0.8})
    return lines


def _losses(last: int, every: int = 10) -> list[dict]:
    """Metrics lines with one key: one figure to draw, for the tests that draw twice."""
    return [{"iteration": it, "loss/source_ce": 1.0 / it} for it in range(every, last + 1, every)]


def _metrics_text(records: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def _checkpoint(root: Path, name: str, records: list[dict], data: Path | None = None,
                total: int = 100) -> Path:
    inputs = {"data": ArtifactRef(kind=DATASET_INDEX, id="index", path=str(data))} if data else {}
    return _artifact(root / name, CHECKPOINT, "self_train", {"metrics.jsonl":
                                                              _metrics_text(records)},
                     config={"self_train": {"iterations": total}}, inputs=inputs,
                     summary={"iteration": total, "miou_best": 0.4,
                              "offline_changes": {"kept": 5, "added": 2, "dropped": 1}})


def _live_run(root: Path, records: list[dict], tail: str = "", total: int | None = 200) -> Path:
    """A training run in progress: metrics, a saved training state, no manifest."""
    run = root / "live"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text(_metrics_text(records) + tail)
    if total is not None:
        torch.save({"progress": {"iteration": records[-1]["iteration"]},
                    "identity": {"config": {"self_train": {"iterations": total}}}},
                   run / "train_state.pt")
    return run


def _png(width: int, height: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _evaluation(root: Path, name: str, per_class: dict[str, float], miou: float,
                protocol: list[str], predictions: dict[str, bytes]) -> Path:
    confusion = [[90, 5, 5], [10, 80, 10], [0, 0, 0]]  # car absent from the ground truth
    content = {"miou": miou, "primary_protocol": str(len(protocol)),
               "miou_by_protocol": {str(len(protocol)): miou},
               "protocols": {str(len(protocol)): protocol}, "per_class": per_class,
               "present_in_ground_truth": {c: c != "car" for c in per_class},
               "confusion_matrix": confusion,
               "protocol": {"domain": "target", "split": "val", "images": 2,
                            "model": "teacher", "iteration": 40}}
    return _artifact(root / name, EVALUATION, "evaluate",
                     {"report.json": json.dumps(content), **predictions})


def _check_png(path: Path, least: int = 100) -> None:
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and min(image.size) >= least, path
        grey = np.asarray(image.convert("L"), dtype=float)
    assert grey.std() > 5, f"{path} is blank"


def _invoke(*args: str | Path):
    return runner.invoke(app, ["report", *map(str, args)])


def _said(result) -> str:
    return " ".join(result.stderr.split())  # rich wraps long lines


def test_report_of_runs_and_evaluations(tmp_path: Path) -> None:
    data = _index(tmp_path)
    round1 = _checkpoint(tmp_path / "seed0", "round1", _records(100), data)
    other = _checkpoint(tmp_path / "seed1", "round1", _records(60), data)
    full = _evaluation(tmp_path, "teacher", {"road": 0.9, "sky": 0.5, "car": 0.25}, 0.55,
                       CLASSES, {"predictions/a.png": _png(64, 32, 1),
                                 "predictions/a_panel.png": _png(2100, 40, 2)})
    partial = _evaluation(tmp_path, "warmup", {"road": 0.8, "sky": 0.6, "car": 0.0}, 0.7,
                          ["road", "sky"], {"predictions/color/b.png": _png(64, 32, 3),
                                            "predictions/trainid/b.png": _png(64, 32, 4)})
    out = tmp_path / "report"

    result = _invoke(round1, other, full, partial, "--out", out)

    assert result.exit_code == 0, result.output
    pngs = sorted(p.name for p in out.glob("*.png"))
    for group in ("losses", "evaluation", "labels", "offline", "schedules", "other"):
        assert f"curves-{group}.png" in pngs  # "other" holds the key no group names
    assert {"classes-online-thresholds.png", "classes-online-class-accuracy.png",
            "teacher-iou.png", "teacher-confusion.png", "warmup-iou.png",
            "comparison-iou.png"} <= set(pngs)
    assert "teacher-prediction-a-panel.png" in pngs  # panels preferred to bare predictions
    assert "warmup-prediction-b.png" in pngs and len([p for p in pngs if "-b" in p]) == 1
    assert Image.open(out / "teacher-prediction-a-panel.png").width == report.PANEL_WIDTH
    for name in pngs:
        _check_png(out / name, least=16 if "-prediction-" in name else 100)

    page = (out / "index.html").read_text()
    for name in pngs:
        assert base64.b64encode((out / name).read_bytes()).decode() in page, name
    assert "http://" not in page and "https://" not in page and "<script" not in page
    assert "seed0/round1" in page and "seed1/round1" in page  # same folder names told apart
    assert "<th>car</th><td>25.0</td><td>–</td>" in page

    markdown = (out / "comparison.md").read_text()
    assert "| class | teacher | warmup |" in markdown
    assert "| road | **90.0** | 80.0 |" in markdown
    assert "| car | **25.0** | – |" in markdown  # car is outside the warmup protocol
    assert "| mIoU | 55.0 | **70.0** |" in markdown
    assert "| mIoU-3 | **55.0** | – |" in markdown and "| mIoU-2 | – | **70.0** |" in markdown
    rows = {row[0]: row[1:] for row in csv.reader((out / "comparison.csv").open())}
    assert rows["class"] == ["teacher", "warmup"]
    assert rows["sky"] == ["50.00", "60.00"] and rows["car"] == ["25.00", ""]
    assert rows["mIoU"] == ["55.00", "70.00"]

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["schema"] == "duda.report/1"
    assert set(manifest["inputs"]) == {"seed0/round1", "seed1/round1", "teacher", "warmup"}
    assert manifest["summary"]["evaluations"]["warmup"]["miou"] == 0.7


def test_second_call_is_a_no_op_and_force_rebuilds(tmp_path: Path) -> None:
    run = _checkpoint(tmp_path, "round1", _losses(40))
    out = tmp_path / "report"
    first = report.run([run], out)
    written = (out / "index.html").stat().st_mtime_ns

    again = _invoke(run, "--out", out)

    assert again.exit_code == 0 and "up to date" in _said(again)
    assert (out / "index.html").stat().st_mtime_ns == written
    forced = report.run([run], out, force=True)
    assert not forced.up_to_date and forced.manifest.created >= first.manifest.created
    assert (out / "index.html").stat().st_mtime_ns != written


def test_live_run_banner_truncated_line_and_rebuild_as_it_grows(tmp_path: Path) -> None:
    records = _losses(40)
    run = _live_run(tmp_path, records, tail='{"iteration": 50, "loss/sour')
    out = tmp_path / "report"

    result = _invoke(run, "--out", out)

    assert result.exit_code == 0, result.output
    assert "unfinished run (iteration 40 of 200)" in _said(result)
    page = (out / "index.html").read_text()
    assert "unfinished run (iteration 40 of 200)" in page
    assert "1 incomplete line of metrics.jsonl skipped" in page
    summary = json.loads((out / "manifest.json").read_text())["summary"]
    assert summary["runs"]["live"] == {"path": str(run), "finished": False,
                                       "last_iteration": 40, "total_iterations": 200,
                                       "skipped_lines": 1}
    # The run logs on: the same command redraws it, no --force needed.
    (run / "metrics.jsonl").write_text(_metrics_text(_losses(60)))
    grown = report.run([run], out)
    assert not grown.up_to_date
    assert "unfinished run (iteration 60 of 200)" in (out / "index.html").read_text()


def test_live_run_without_saved_state(tmp_path: Path) -> None:
    run = _live_run(tmp_path, _losses(30), total=None)
    result = report.run([run], tmp_path / "report")
    assert result.manifest.summary["runs"]["live"]["total_iterations"] is None
    assert "unfinished run, last logged iteration 30" in (
        tmp_path / "report" / "index.html").read_text()


def test_checkpoint_being_rebuilt_is_drawn_with_its_rebuild(tmp_path: Path) -> None:
    run = _checkpoint(tmp_path, "round1", _losses(40))
    rebuild = tmp_path / ".round1.partial"  # where `--force` builds the replacement
    rebuild.mkdir()
    (rebuild / "metrics.jsonl").write_text(_metrics_text(_losses(20)))

    result = report.run([run], tmp_path / "report")

    runs = result.manifest.summary["runs"]
    assert runs["round1"]["finished"] and runs["round1"]["last_iteration"] == 40
    assert runs["round1 (rebuild)"] == {"path": str(rebuild), "finished": False,
                                        "last_iteration": 20, "total_iterations": None,
                                        "skipped_lines": 0}


def _bad_inputs(root: Path) -> dict[str, tuple[Path, str]]:
    (root / "file.txt").write_text("x")
    (root / "stranger").mkdir()
    (root / "stranger" / "notes.txt").write_text("x")
    (root / "empty_run").mkdir()
    (root / "empty_run" / "metrics.jsonl").write_text('{"iteration": 1, "lo')
    return {
        "missing": (root / "nowhere", "does not exist"),
        "file": (root / "file.txt", "is not a folder"),
        "unknown folder": (root / "stranger", "is neither an artifact"),
        "dataset index": (_index(root), "is a duda.dataset_index artifact; only checkpoints"),
        "pseudo-label store": (_artifact(root / "store", PSEUDO_LABELS, "generate_pseudo", {}),
                               "is a duda.pseudo_labels artifact; only checkpoints"),
        "no metrics": (_artifact(root / "imported", CHECKPOINT, "import", {}),
                       "is a checkpoint without metrics.jsonl"),
        "nothing logged": (root / "empty_run", "no complete line in metrics.jsonl yet (1 "),
    }


@pytest.mark.parametrize("case", ["missing", "file", "unknown folder", "dataset index",
                                  "pseudo-label store", "no metrics", "nothing logged"])
def test_bad_input_is_one_message_and_exit_2(tmp_path: Path, case: str) -> None:
    path, message = _bad_inputs(tmp_path)[case]
    out = tmp_path / "report"

    result = _invoke(path, "--out", out)

    assert result.exit_code == 2, result.output
    said = _said(result)
    assert said.startswith("error: nothing to draw:") and message in said and "fix:" in said
    assert "Traceback" not in result.output
    assert not out.exists()


def test_what_cannot_be_drawn_is_skipped_and_listed(tmp_path: Path) -> None:
    run = _checkpoint(tmp_path, "round1", _losses(20))
    index = _index(tmp_path)
    out = tmp_path / "report"

    result = _invoke(run, index, tmp_path / "nowhere", "--out", out)

    assert result.exit_code == 0, result.output
    assert f"skipped {index}: is a duda.dataset_index artifact" in _said(result)
    page = (out / "index.html").read_text()
    assert "Skipped" in page and "does not exist" in page
    assert len(json.loads((out / "manifest.json").read_text())["summary"]["skipped"]) == 2


def test_unknown_folder_holding_artifacts_names_them(tmp_path: Path) -> None:
    _checkpoint(tmp_path / "pipeline", "warmup", _losses(20))
    result = _invoke(tmp_path / "pipeline", "--out", tmp_path / "report")
    assert result.exit_code == 2
    assert f"fix: pass the artifacts it holds, e.g. {tmp_path / 'pipeline' / 'warmup'}" in (
        _said(result))


def test_out_holding_another_artifact_or_an_input_is_refused(tmp_path: Path) -> None:
    run = _checkpoint(tmp_path, "round1", _losses(20))
    other = _checkpoint(tmp_path, "round2", _losses(20))

    into_artifact = _invoke(run, "--out", other)
    into_input = _invoke(run, "--out", run / "report")

    assert into_artifact.exit_code == 2 and "holds a duda.checkpoint artifact" in (
        _said(into_artifact))
    assert into_input.exit_code == 2 and "lies inside the input" in _said(into_input)
    assert (other / "metrics.jsonl").is_file() and not (run / "report").exists()


def test_without_matplotlib_the_fix_is_the_install_command(tmp_path: Path,
                                                           monkeypatch) -> None:
    run = _checkpoint(tmp_path, "round1", _losses(20))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` fails

    result = _invoke(run, "--out", tmp_path / "report")

    assert result.exit_code == 2
    assert "fix: pip install -e '.[report]'" in result.stderr
    with pytest.raises(Exception, match="matplotlib"):
        plots.require_matplotlib()


def test_curves_figure_with_bands(tmp_path: Path) -> None:
    steps = range(0, 100, 10)
    path = plots.curves_figure({"DUDA": [(i, 0.3 + i / 500) for i in steps],
                                "source only": [(i, 0.2) for i in steps]},
                               tmp_path / "curves.png", title="mIoU over seeds",
                               ylabel="mIoU", std={"DUDA": [0.02] * 10})
    _check_png(path)


def test_short_names_add_parents_only_where_names_repeat() -> None:
    names = report.short_names([Path("/x/seed0/round1"), Path("/x/seed1/round1"),
                                Path("/x/evaluate")])
    assert names == ["seed0/round1", "seed1/round1", "evaluate"]


def test_metrics_keys_fall_into_groups() -> None:
    assert report.curve_group("loss/online_kld", CHANGES) == "losses"
    assert report.curve_group("offline/accuracy", CHANGES) == "labels"
    assert report.curve_group("offline/dropped", CHANGES) == "offline"
    assert report.curve_group("val/miou", CHANGES) == "evaluation"
    assert report.curve_group("lr", CHANGES) == "schedules"
    assert report.curve_group("grad/norm", CHANGES) == "other"


def test_the_offline_curves_follow_the_methods_change_categories() -> None:
    # One list (stages.method.offline.CHANGES) names the categories: a new one is drawn and
    # titled with the others without touching the figures.
    categories = (*CHANGES, "relabelled")
    assert report.curve_group("offline/relabelled", categories) == "offline"
    assert report.curve_group("offline/relabelled", CHANGES) == "other"
    titles = dict(report.curve_groups(categories))
    assert titles["offline"] == "offline update: pixels kept, added, dropped, relabelled"


def test_a_run_written_before_a_change_category_existed_shows_it_as_zero(tmp_path: Path) -> None:
    run = _artifact(tmp_path / "old", CHECKPOINT, "self_train",
                    {"metrics.jsonl": _metrics_text(_losses(20))},
                    config={"self_train": {"iterations": 20}},
                    summary={"iteration": 20, "offline_changes": {"kept": 5, "dropped": 1}})
    out = tmp_path / "report"

    result = _invoke(run, "--out", out)

    assert result.exit_code == 0, result.output
    page = (out / "index.html").read_text()
    for key, value in (("kept", 5), ("added", 0), ("dropped", 1)):
        assert f"<strong>offline_changes/{key}</strong> {value}</li>" in page


def test_change_counts_that_are_not_counts_are_one_message_and_exit_2(tmp_path: Path) -> None:
    run = _artifact(tmp_path / "odd", CHECKPOINT, "self_train",
                    {"metrics.jsonl": _metrics_text(_losses(20))},
                    summary={"iteration": 20, "offline_changes": [5, 2, 1]})
    out = tmp_path / "report"

    result = _invoke(run, "--out", out)

    assert result.exit_code == 2, result.output
    said = _said(result)
    assert f"checkpoint {run} records its offline change counts as list" in said
    assert "fix: rebuild it with --force" in said and "Traceback" not in result.output
    assert not (out / "manifest.json").exists()


def test_class_names_are_literal_text_in_comparison_md(tmp_path: Path) -> None:
    hostile = "<img src=x onerror=alert(1)>"
    names = ["road", hostile, "a|b *c*"]
    evaluation = _evaluation(tmp_path, "teacher", {"road": 0.9, hostile: 0.5, "a|b *c*": 0.25},
                             0.55, names, {})

    result = _invoke(evaluation, "--out", tmp_path / "report")

    assert result.exit_code == 0, result.output
    markdown = (tmp_path / "report" / "comparison.md").read_text()
    assert "<img" not in markdown
    assert "| &lt;img src=x onerror=alert(1)&gt; | 50.0 |" in markdown
    assert "| a\\|b \\*c\\* | 25.0 |" in markdown  # one cell, no emphasis
    rows = {row[0]: row[1:] for row in csv.reader((tmp_path / "report" / "comparison.csv").open())}
    assert rows[hostile] == ["50.00"]  # the CSV keeps the name as it is


def _recalibrated_evaluation(root: Path, model: dict | None, recalibrated: bool = True) -> Path:
    """An evaluation of a warmup checkpoint whose manifest records `model` (None: no model
    section), with or without BN recalibration."""
    checkpoint = _artifact(root / "warmup", CHECKPOINT, "warmup", {},
                           config={} if model is None else {"model": model})
    content = {"miou": 0.5, "per_class": {"road": 0.5}, "primary_protocol": "19",
               "protocol": {"domain": "target", "split": "val", "images": 2, "model": "student",
                            "iteration": 40, "bn_recalibration": {"applied": True}
                            if recalibrated else None}}
    ref = ArtifactRef(kind=CHECKPOINT, id="warmup", path=str(checkpoint.resolve()))
    return _artifact(root / "evaluate_adabn", EVALUATION, "evaluate",
                     {"report.json": json.dumps(content)}, inputs={"checkpoint": ref})


SEGFORMER_SCOPE = "BN recalibrated on target-train (decoder BN only: the MiT encoder has LayerNorm)"


def test_a_segformer_evaluation_with_adabn_says_only_the_decoder_bn_was_recalibrated(
        tmp_path: Path) -> None:
    segformer = {"name": "segformer", "backbone": "mit_b0", "head": "daformer"}
    path = _recalibrated_evaluation(tmp_path / "mit", segformer)
    [evaluation] = open_artifacts(path, "evaluate_adabn")
    assert evaluation.model_name == "segformer"
    assert evaluation.headline == ("mIoU-19 50.0 on target/val (2 images), student at iteration "
                                   f"40, {SEGFORMER_SCOPE}")
    # Without recalibration there is nothing to qualify.
    path = _recalibrated_evaluation(tmp_path / "plain", segformer, recalibrated=False)
    assert "BN" not in open_artifacts(path, "evaluate_warmup")[0].headline


@pytest.mark.parametrize("model", [{"backbone": "resnet18"}, {"name": "deeplabv2"}, None])
def test_a_deeplab_evaluation_with_adabn_is_named_as_before(tmp_path: Path,
                                                            model: dict | None) -> None:
    # A model section without a name (every checkpoint written before the choice) is a
    # DeepLabV2, every BN of which is recalibrated: the headline is as it always was.
    [evaluation] = open_artifacts(_recalibrated_evaluation(tmp_path, model), "evaluate_adabn")
    assert evaluation.model_name == (None if model is None else "deeplabv2")
    assert evaluation.headline == ("mIoU-19 50.0 on target/val (2 images), student at iteration "
                                   "40")


def test_an_evaluation_whose_checkpoint_is_gone_is_still_drawn(tmp_path: Path) -> None:
    path = _recalibrated_evaluation(tmp_path, {"name": "segformer"})
    shutil.rmtree(tmp_path / "warmup")
    [evaluation] = open_artifacts(path, "evaluate_adabn")
    assert evaluation.model_name is None and "BN" not in evaluation.headline
    assert adabn_label(None) == adabn_label("deeplabv2") == "AdaBN"
    assert adabn_label("segformer") == "AdaBN (decoder BN only: the MiT encoder has LayerNorm)"
