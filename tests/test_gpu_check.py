"""benchmarks/gpu_check.py at a tiny size on the CPU: the table, the JSON figures (the step and
the evaluation with BN recalibration projected to the paper config's counts), bad devices."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stages.config import load_config

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
TINY = ["--device", "cpu", "--backbone", "resnet18", "--width-multiplier", "0.25",
        "--crop", "32", "64", "--full", "64", "128", "--warmup-steps", "1", "--steps", "2",
        "--eval-batches", "2", "--eval-images", "3"]
ROW_FIELDS = {"precision", "seconds_per_iteration", "images_per_second", "peak_memory_gib",
              "projected_hours", "bare_seconds", "ratio_to_bare", "step_seconds",
              "recalibration_seconds_per_batch", "val_seconds_per_image", "evaluation_seconds",
              "evaluations_hours", "error"}


def run_check(*extra: str) -> subprocess.CompletedProcess:
    # From another directory, as a user would run a script by its path.
    return subprocess.run([sys.executable, str(SCRIPT), *extra], capture_output=True, text=True,
                          timeout=120, cwd=SCRIPT.parents[1].parent, check=False)


def load_script():
    """The script as a module, to call `main(argv)` in this process (no second torch import)."""
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_tiny_cpu_run_prints_table_and_json() -> None:
    script = load_script()
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

    # The evaluation: the paper config's recalibration (the whole target-train split) and its
    # 500 val images, 16 periodic evaluations, then the recalibration before model.pt.
    paper = load_config(script.PAPER_CONFIG)
    recalibration = paper.self_train.recalibration
    evaluation = report["evaluation"]
    assert evaluation["recalibration_batch_size"] == recalibration.batch_size
    assert evaluation["recalibration_batches"] == (recalibration.batches
                                                   or 2975 // recalibration.batch_size)
    assert evaluation["val_images"] == 500 and evaluation["evaluations"] == 16
    assert row["recalibration_seconds_per_batch"] > 0 and row["val_seconds_per_image"] > 0
    recalibration = evaluation["recalibration_batches"] * row["recalibration_seconds_per_batch"]
    one = recalibration + 500 * row["val_seconds_per_image"]
    assert math.isclose(row["evaluation_seconds"], one)
    assert math.isclose(row["evaluations_hours"], (16 * one + recalibration) / 3600)

    # The header lines and the table precede the JSON line.
    text = "\n".join(lines[:-1])
    assert f"torch:   {torch.__version__}" in text
    assert "command: " in text and "gpu_check.py" in text
    header = next(line for line in lines if line.startswith("precision"))
    assert header.split() == ["precision", "s/iter", "img/s", "peak", "GiB", "80k", "h",
                              "bare", "s", "x", "bare", "eval", "s", "evals", "h"]
    table_row = next(line for line in lines if line.startswith("fp32 ")).split()
    assert table_row[1] == f"{seconds:.3f}"
    assert table_row[6] == f"{row['ratio_to_bare']:.2f}"
    assert table_row[7:] == [f"{row['evaluation_seconds']:.1f}",
                             f"{row['evaluations_hours']:.2f}"]
    assert "eval:    16 × (recalibration" in text


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


def test_an_unreadable_config_exits_2_naming_it(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "absent.yaml"
    assert load_script().main([*TINY, "--config", str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err
