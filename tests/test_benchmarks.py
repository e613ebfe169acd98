"""The benchmark scripts at a tiny size, so they cannot rot: generate_scaling runs both layouts
and prints the ratio; method_evidence runs every row of the ablation table and draws its figure;
paper_scale runs every stage on fake datasets in the distributed layouts and prints its budget."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "generate_scaling.py"


@pytest.mark.slow
def test_generate_scaling_prints_rates_and_the_ratio() -> None:
    result = subprocess.run([sys.executable, str(SCRIPT), "--images", "8", "--size", "32", "64",
                             "--width", "0.25", "--repeats", "1", "--threads", "2"],
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    rates = re.findall(r"x \d thread\(s\): +([\d.]+) images/s", result.stdout)
    assert len(rates) == 3 and all(float(rate) > 0 for rate in rates), result.stdout
    ratio = re.search(r"scaling ratio 2 processes / 1: ([\d.]+) \(efficiency ([\d.]+)\)",
                      result.stdout)
    assert ratio, result.stdout
    assert float(ratio.group(1)) == pytest.approx(float(rates[1]) / float(rates[0]), rel=0.02)


@pytest.mark.slow
def test_method_evidence_runs_every_row(tiny_config_file, tmp_path) -> None:
    script = SCRIPT.parent / "method_evidence.py"
    out, figure = tmp_path / "evidence", tmp_path / "evidence.png"
    result = subprocess.run(
        [sys.executable, str(script), "--config", str(tiny_config_file), "--seeds", "0", "1",
         "--out", str(out), "--device", "cpu", "--plot", str(figure),
         "--set", "self_train.eval_every=2"],
        capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    rows = ["source-only", "AdaBN", "plain mean teacher", "offline-only", "online-only",
            "no offline update", "CE, not SCE", "DUDA", "ceiling", "oracle"]
    for row in rows:
        values = [results["seeds"][seed][row]["miou"] for seed in ("0", "1")]
        assert all(0.0 <= value <= 100.0 for value in values), row
        line = next(line for line in result.stdout.splitlines() if line.startswith(f"| {row} |"))
        assert f"{values[0]:.1f}" in line and "±" in line, line
    duda = results["seeds"]["0"]["DUDA"]["curves"]
    assert [step for step, _ in duda["val/miou"]] == [2, 4]
    assert "offline/label_accuracy" in duda and "online/label_accuracy" in duda
    # online-only trains on no stored labels, offline-only on no online ones
    assert "online/label_accuracy" not in results["seeds"]["0"]["offline-only"]["curves"]
    plain = results["seeds"]["0"]["plain mean teacher"]["curves"]
    assert "online/label_accuracy" in plain
    # the ceiling trains on target-train ground truth: its stored labels are all correct
    ceiling = results["seeds"]["0"]["ceiling"]["curves"]
    assert all(value == pytest.approx(1.0) for _, value in ceiling["offline/label_accuracy"])
    assert "wall time" in result.stdout
    assert figure.stat().st_size > 10_000


PAPER_SCALE_STAGES = ["prepare-data", "warmup", "generate-pseudo", "self-train", "update-offline",
                      "evaluate", "self-train evaluations (16×)"]


@pytest.mark.slow
def test_paper_scale_prints_a_budget_row_per_stage(tmp_path) -> None:
    script = SCRIPT.parent / "paper_scale.py"
    work = tmp_path / "work"
    result = subprocess.run(
        [sys.executable, str(script), "--images", "4", "--iterations", "1", "--scale", "0.125",
         "--work", str(work)],
        capture_output=True, text=True, timeout=600, check=False,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = result.stdout.splitlines()
    header = next(line for line in lines if line.startswith("| stage |"))
    columns = [cell.strip() for cell in header.strip("|").split("|")]
    rows = {cells[0]: dict(zip(columns, cells)) for cells in (
        [cell.strip() for cell in line.strip("|").split("|")]
        for line in lines if line.startswith("| ") and line != header)}
    assert list(rows) == PAPER_SCALE_STAGES
    number = r"[\d,]+\.?\d*"
    for name, row in rows.items():
        for column in ("CPU-s/img", "host CPU-s/img", "peak RSS MiB", "host CPU-h",
                       "paper disk GB (est.)"):
            assert re.fullmatch(number, row[column]), (name, column, row[column])
        assert float(row["peak RSS MiB"]) > 10, name
        assert re.fullmatch(rf"{number} \((host|GPU)\)", row["2 GPUs h (est.)"]), row
    assert rows["prepare-data"]["images here"] == "12"
    assert rows["prepare-data"]["paper images"] == "28,441"  # 24,966 + 2,975 + 500
    assert rows["self-train"]["paper images"] == "640,000"  # 80k iterations × (4 + 4) crops
    assert float(rows["generate-pseudo"]["disk MB/img"]) > 0  # the store's label chunks
    assert float(rows["warmup"]["paper disk GB (est.)"]) > 0.1  # a ResNet-101 checkpoint
    # The fake datasets are in the distributed layouts: labelIds only, palettised GTA5 labels.
    cityscapes = work / "datasets" / "Cityscapes" / "gtFine" / "train"
    assert sorted(p.name.split("_gtFine_")[1] for p in cityscapes.rglob("*.png")) == [
        "labelIds.png"] * 4
    with Image.open(next((work / "datasets" / "GTA5" / "labels").iterdir())) as label:
        assert label.mode == "P" and label.size == (239, 132)
