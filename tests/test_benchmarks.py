"""The benchmark scripts at a tiny size, so they cannot rot: generate_scaling runs both layouts
and prints the ratio; method_evidence runs every row of the ablation table and draws its figure."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

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
    rows = ["source-only", "AdaBN", "offline-only", "online-only", "no offline update",
            "CE, not SCE", "DUDA", "oracle"]
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
    assert "wall time" in result.stdout
    assert figure.stat().st_size > 10_000
