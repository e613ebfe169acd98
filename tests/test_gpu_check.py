"""benchmarks/gpu_check.py at a tiny size on the CPU: the table with both networks side by side,
the JSON figures (the step and the evaluation with BN recalibration projected to each paper
config's counts), bad devices, configs and a missing extra."""

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
        "--crop", "32", "64", "--full", "64", "128",
        "--encoder", "mit_b0", "--embedding-dim", "32", "--segformer-crop", "32", "32",
        "--segformer-full", "32", "64",
        "--warmup-steps", "1", "--steps", "2", "--eval-batches", "2", "--eval-images", "3"]
ROW_FIELDS = {"model", "precision", "seconds_per_iteration", "images_per_second",
              "peak_memory_gib", "projected_iterations", "projected_hours", "bare_seconds",
              "ratio_to_bare", "step_seconds", "recalibration_seconds_per_batch",
              "val_seconds_per_image", "evaluation_seconds", "evaluations_hours", "error"}


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


def test_tiny_cpu_run_prints_both_networks_side_by_side_and_json() -> None:
    script = load_script()
    result = run_check(*TINY, "--precisions", "fp32", "--json")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    report = json.loads(lines[-1])

    assert report["device"] == "cpu"
    assert report["torch"] == torch.__version__
    assert report["command"].endswith(" ".join(TINY + ["--precisions", "fp32", "--json"]))
    assert report["batch_size"] == {"source": 2, "target": 2}
    assert report["steps"] == 2
    assert "teacher" in report["bare_passes"] and "student" in report["bare_passes"]
    deeplab, segformer = report["models"]["deeplabv2"], report["models"]["segformer"]
    assert deeplab["crop"] == [32, 64] and deeplab["full"] == [64, 128]
    assert segformer["crop"] == [32, 32] and segformer["full"] == [32, 64]
    # Both evaluations are scored at the ground truth's size, the segformer's upsampled to it.
    assert deeplab["ground_truth"] == segformer["ground_truth"] == [64, 128]
    assert deeplab["model"]["backbone"] == "resnet18"
    assert segformer["model"] | {"name": "segformer", "backbone": "mit_b0", "head": "daformer",
                                 "embedding_dim": 32} == segformer["model"]
    # Each trains as its paper config does: SGD and the mean teacher over 80k iterations;
    # DAFormer's AdamW and EMA teacher over 40k.
    assert deeplab["optimizer"]["name"] == "sgd" and deeplab["teacher"] == {"name": "mean"}
    assert segformer["optimizer"] | {"name": "adamw", "lr": 6.0e-5,
                                     "head_lr_multiplier": 10.0} == segformer["optimizer"]
    assert segformer["teacher"] == {"name": "ema", "decay": 0.999}
    assert (deeplab["projected_iterations"], segformer["projected_iterations"]) == (80_000,
                                                                                    40_000)

    rows = report["rows"]
    assert [(row["model"], row["precision"]) for row in rows] == [("deeplabv2", "fp32"),
                                                                 ("segformer", "fp32")]
    for row in rows:
        network = report["models"][row["model"]]
        assert ROW_FIELDS <= row.keys()
        assert row["error"] is None
        seconds = row["seconds_per_iteration"]
        assert seconds > 0 and row["bare_seconds"] > 0 and row["ratio_to_bare"] > 0
        assert len(row["step_seconds"]) == 2
        assert math.isclose(row["images_per_second"], 4 / seconds)
        assert row["projected_iterations"] == network["projected_iterations"]
        assert math.isclose(row["projected_hours"],
                            seconds * network["projected_iterations"] / 3600)
        assert math.isclose(row["ratio_to_bare"], seconds / row["bare_seconds"])
        assert row["peak_memory_gib"] is None  # no CUDA memory figure on the CPU

        # The evaluation: the config's recalibration (the whole target-train split) and its
        # 500 val images, one evaluation per eval_every, then the recalibration before model.pt.
        paper = load_config(network["config"])
        recalibration = paper.self_train.recalibration
        evaluation = network["evaluation"]
        assert evaluation["recalibration_batch_size"] == recalibration.batch_size
        assert evaluation["recalibration_batches"] == (recalibration.batches
                                                       or 2975 // recalibration.batch_size)
        count = paper.self_train.iterations // paper.self_train.eval_every
        assert evaluation["val_images"] == 500 and evaluation["evaluations"] == count
        assert row["recalibration_seconds_per_batch"] > 0 and row["val_seconds_per_image"] > 0
        recalibrated = evaluation["recalibration_batches"] * row["recalibration_seconds_per_batch"]
        one = recalibrated + 500 * row["val_seconds_per_image"]
        assert math.isclose(row["evaluation_seconds"], one)
        assert math.isclose(row["evaluations_hours"], (count * one + recalibrated) / 3600)
    assert Path(deeplab["config"]) == script.PAPER_CONFIG
    assert Path(segformer["config"]) == script.SEGFORMER_CONFIG
    assert [report["models"][k]["evaluation"]["evaluations"] for k in ("deeplabv2",
                                                                       "segformer")] == [16, 10]

    # The header lines and the table precede the JSON line.
    text = "\n".join(lines[:-1])
    assert f"torch:   {torch.__version__}" in text
    assert "command: " in text and "gpu_check.py" in text
    assert "resnet18x0.25: DeepLabV2 resnet18 (width × 0.25), sgd, mean teacher" in text
    assert ("mit_b0+daformer: SegFormer mit_b0 with the daformer head, adamw, EMA teacher "
            "0.999; crops 32×32, teacher on full images 32×64; 40,000 iterations; eval 10 ×") in text
    header = next(line for line in lines if line.startswith("model"))
    assert header.split() == ["model", "precision", "s/iter", "img/s", "peak", "GiB", "run",
                              "h", "bare", "s", "x", "bare", "eval", "s", "evals", "h"]
    table = lines[lines.index(header) + 1:lines.index(header) + 3]
    for line, row, label in zip(table, rows, ("resnet18x0.25", "mit_b0+daformer"), strict=True):
        cells = line.split()
        assert cells[:2] == [label, "fp32"]
        assert cells[2] == f"{row['seconds_per_iteration']:.3f}"
        assert cells[5] == f"{row['projected_hours']:.1f}"
        assert cells[7] == f"{row['ratio_to_bare']:.2f}"
        assert cells[8:] == [f"{row['evaluation_seconds']:.1f}",
                             f"{row['evaluations_hours']:.2f}"]


def test_models_picks_the_networks(capsys: pytest.CaptureFixture[str]) -> None:
    script = load_script()
    assert script.main([*TINY, "--models", "segformer", "--steps", "1", "--eval-images",
                        "1", "--eval-batches", "1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert list(report["models"]) == ["segformer"]
    assert [row["model"] for row in report["rows"]] == ["segformer"]


def test_a_missing_segformer_extra_exits_2_naming_it(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "segmentation_models_pytorch.encoders.mix_transformer",
                        None)  # the import then fails, as without the extra
    assert load_script().main([*TINY, "--models", "segformer"]) == 2
    err = capsys.readouterr().err
    assert "segmentation-models-pytorch" in err and ".[segformer]" in err
    assert "--models deeplabv2" in err


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
