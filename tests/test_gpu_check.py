"""benchmarks/gpu_check.py at a tiny size on the CPU: the table, the JSON figures, bad devices."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
TINY = ["--device", "cpu", "--backbone", "resnet18", "--width-multiplier", "0.25",
        "--crop", "32", "64", "--full", "64", "128", "--warmup-steps", "1", "--steps", "2"]
ROW_FIELDS = {"precision", "seconds_per_iteration", "images_per_second", "peak_memory_gib",
              "projected_hours", "bare_seconds", "ratio_to_bare", "step_seconds", "error"}


def run_check(*extra: str) -> subprocess.CompletedProcess:
    # From another directory, as a user would run a script by its path.
    return subprocess.run([sys.executable, str(SCRIPT), *extra], capture_output=True, text=True,
                          timeout=120, cwd=SCRIPT.parents[1].parent, check=False)


def load_script():
    """The script as a module, to call `main(argv)` in this process (no second torch import)."""
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_cpu_run_prints_table_and_json() -> None:
    result = run_check(*TINY, "--precisions", "fp32", "--json")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    report = json.loads(lines[-1])

    assert report["device"] == "cpu"
    assert report["torch"] == torch.__version__
    assert report["command"].endswith(" ".join(TINY + ["--precisions", "fp32", "--json"]))
    assert report["crop"] == [32, 64] and report["full"] == [64, 128]
    assert report["batch_size"] == {"source": 2, "target": 2}
    assert report["steps"] == 2 and report["projected_iterations"] == 80_000
    assert "teacher" in report["bare_passes"] and "student" in report["bare_passes"]
    [row] = report["rows"]
    assert ROW_FIELDS <= row.keys()
    assert row["precision"] == "fp32" and row["error"] is None
    seconds = row["seconds_per_iteration"]
    assert seconds > 0 and row["bare_seconds"] > 0 and row["ratio_to_bare"] > 0
    assert len(row["step_seconds"]) == 2
    assert math.isclose(row["images_per_second"], 4 / seconds)
    assert math.isclose(row["projected_hours"], seconds * 80_000 / 3600)
    assert math.isclose(row["ratio_to_bare"], seconds / row["bare_seconds"])
    assert row["peak_memory_gib"] is None  # no CUDA memory figure on the CPU

    # The header lines and the table precede the JSON line.
    text = "\n".join(lines[:-1])
    assert f"torch:   {torch.__version__}" in text
    assert "command: " in text and "gpu_check.py" in text
    header = next(line for line in lines if line.startswith("precision"))
    assert header.split() == ["precision", "s/iter", "img/s", "peak", "GiB", "80k", "h",
                              "bare", "s", "x", "bare"]
    table_row = next(line for line in lines if line.startswith("fp32 "))
    assert table_row.split()[1] == f"{seconds:.3f}"
    assert table_row.split()[-1] == f"{row['ratio_to_bare']:.2f}"


def test_precisions_default_to_fp32_on_cpu_and_all_three_on_gpu() -> None:
    script = load_script()
    assert script.default_precisions(torch.device("cpu")) == ["fp32"]
    assert script.default_precisions(torch.device("cuda", 0)) == ["fp32", "bf16", "fp16"]
    assert script.parse_args([]).precisions is None  # resolved once the device is known


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_without_gpu_exits_2_with_a_fix(capsys: pytest.CaptureFixture[str]) -> None:
    assert load_script().main(["--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "no CUDA device" in err and "--device cpu" in err
