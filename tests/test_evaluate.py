"""The evaluate stage and `duda evaluate`: report values, options, bad inputs (exit 2)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_index
from typer.testing import CliRunner

from duda_cli.app import app
from stages import evaluate
from stages.artifacts.checkpoint import MODEL_FILE, write_model_file
from stages.artifacts.manifest import CHECKPOINT, MANIFEST
from stages.artifacts.writer import ArtifactWriter
from stages.config import Config, DeepLabV2Config
from stages.data.classes import CITYSCAPES_CLASSES
from stages.data.index import load_dataset_index
from stages.data.io import read_image, read_label
from stages.data.transforms import normalize
from stages.engine.inference import SlidingWindow, predict, predict_classes, window_starts
from stages.nn.model import build_model
from stages.nn.teacher import MeanTeacher
from stages.runtime.errors import DudaError

runner = CliRunner()
TINY = DeepLabV2Config(backbone="resnet18", width_multiplier=0.25, dropout=0.1,
                   normalization="imagenet_rgb")


def make_checkpoint(path: Path, classes=CITYSCAPES_CLASSES, teacher: bool = False,
                    seed: int = 0) -> Path:
    torch.manual_seed(seed)
    student = build_model(TINY, len(classes))
    with torch.no_grad():  # bias the head towards a few classes so the IoUs are not all 0
        for conv in student.classifier.branches:
            conv.bias[:4] += torch.tensor([1.0, 0.5, 0.8, 0.3])[: len(classes)]
    mean = MeanTeacher(student) if teacher else None
    with ArtifactWriter(path, kind=CHECKPOINT, stage="warmup", config={},
                        config_hash="test") as writer:
        write_model_file(path / MODEL_FILE, student=student, teacher=mean, model_config=TINY,
                         class_names=list(classes), iteration=3)
        writer.finish({"iteration": 3, "backbone": TINY.backbone, "num_classes": len(classes)})
    return path


def with_evaluate(config: Config, section: dict) -> Config:
    raw = config.model_dump(mode="json")
    raw["evaluate"] = section
    return Config.model_validate(raw)


def direct_confusion(checkpoint: Path, index_path: Path) -> np.ndarray:
    """Independent evaluation: the student on every target-val image, one at a time."""
    data = torch.load(checkpoint / MODEL_FILE, weights_only=True)
    model = build_model(TINY, 19)
    model.load_state_dict(data["student"])
    model.eval()
    matrix = np.zeros((19, 19), np.int64)
    for sample in load_dataset_index(index_path).samples("target", "val"):
        image = normalize(read_image(sample.image), "imagenet_rgb")
        with torch.no_grad():
            prediction = model(image[None])[0].argmax(0).numpy()
        label = read_label(sample.label).astype(np.int64)
        keep = label != 255
        np.add.at(matrix, (label[keep], prediction[keep]), 1)
    return matrix


def test_report_equals_a_direct_computation(tiny_index: Path, tiny_config: Config,
                                            tmp_path: Path) -> None:
    checkpoint = make_checkpoint(tmp_path / "ckpt")
    result = evaluate.run(tiny_config, tiny_index, checkpoint, tmp_path / "eval", device="cpu")
    report = json.loads((result.path / "report.json").read_text())
    matrix = direct_confusion(checkpoint, tiny_index)
    assert report["confusion_matrix"] == matrix.tolist()
    inter = np.diag(matrix)
    iou = inter / (matrix.sum(0) + matrix.sum(1) - inter + 1e-10)
    assert list(report["per_class"]) == list(CITYSCAPES_CLASSES)
    assert list(report["per_class"].values()) == pytest.approx(iou.tolist())
    assert report["miou"] == pytest.approx(iou.mean())
    assert report["miou_by_protocol"] == {"19": pytest.approx(iou.mean())}
    assert report["present_in_ground_truth"]["car"] and not report["present_in_ground_truth"]["bus"]
    protocol = report["protocol"]
    assert protocol["size"] == [32, 64] and protocol["flip"] is False
    assert protocol["sliding_window"] is None and protocol["bn_recalibration"] is None
    assert protocol["model"].startswith("student") and "no teacher" in protocol["model"]
    assert protocol["images"] == 4 and (protocol["domain"], protocol["split"]) == ("target", "val")
    summary = result.manifest.summary
    assert summary["miou"] == report["miou"] and summary["per_class"] == report["per_class"]
    assert summary["miou_by_protocol"] == report["miou_by_protocol"]
    assert result.manifest.inputs["checkpoint"].path == str(checkpoint.resolve())

    again = evaluate.run(tiny_config, tiny_index, checkpoint, tmp_path / "eval", device="cpu")
    assert again.up_to_date and again.manifest.id == result.manifest.id


def test_teacher_with_bn_recalibration_flip_window_and_predictions(
        tiny_index: Path, tiny_config: Config, tmp_path: Path) -> None:
    checkpoint = make_checkpoint(tmp_path / "ckpt", teacher=True)
    config = with_evaluate(tiny_config, {
        "recalibration": {"enabled": True, "batches": 2},
        "save_predictions": ["trainid", "labelid", "color", "confidence", "panel"],
        "inference": {"flip": True, "sliding_window": True, "window": [32, 48],
                      "batch_size": 2, "num_workers": 0}})
    result = evaluate.run(config, tiny_index, checkpoint, tmp_path / "eval", device="cpu")
    report = json.loads((result.path / "report.json").read_text())
    protocol = report["protocol"]
    assert protocol["model"] == "teacher" and protocol["flip"] is True
    assert protocol["sliding_window"] == {"window": [32, 48], "overlap": pytest.approx(1 / 3)}
    recalibration = protocol["bn_recalibration"]
    assert recalibration["applied"] and recalibration["batches"] == 2
    assert recalibration["view"] == "weak target-train crops" and recalibration["seed"] == 2
    predictions = result.path / "predictions"
    names = [f"target_val_{i:04d}.png" for i in range(4)]
    for folder in ("trainid", "labelid", "color", "confidence", "panel"):
        assert sorted(p.name for p in (predictions / folder).iterdir()) == names, folder
    from PIL import Image
    assert Image.open(predictions / "panel" / names[0]).size == (3 * 64, 32)
    assert Image.open(predictions / "color" / names[0]).mode == "RGB"
    # The saved class maps are the ones the confusion matrix counted.
    matrix = np.zeros((19, 19), np.int64)
    for i, name in enumerate(names):
        prediction = np.asarray(Image.open(predictions / "trainid" / name))
        truth = read_label(tiny_index / "target" / "val" / f"{i:04d}_label.png")
        valid = truth != 255
        np.add.at(matrix, (truth[valid], prediction[valid]), 1)
    assert matrix.tolist() == report["confusion_matrix"]
    label_ids = np.asarray(Image.open(predictions / "labelid" / names[0]))
    assert set(np.unique(label_ids)) <= {7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26,
                                         27, 28, 31, 32, 33}


def test_save_predictions_true_means_colour(tiny_config: Config) -> None:
    assert with_evaluate(tiny_config, {"save_predictions": True}
                         ).evaluate.save_predictions == ["color"]
    assert with_evaluate(tiny_config, {"save_predictions": False}
                         ).evaluate.save_predictions == []


def test_a_split_without_labels_is_refused(tiny_config: Config, tmp_path: Path) -> None:
    tiny_index = make_index(tmp_path / "data", unlabelled=(("target", "val"),))
    checkpoint = make_checkpoint(tmp_path / "ckpt")
    with pytest.raises(DudaError, match="has no ground truth for 4 of 4 images"):
        evaluate.run(tiny_config, tiny_index, checkpoint, tmp_path / "eval", device="cpu")
    assert not (tmp_path / "eval").exists()


# ------------------------------------------------------------------------------- inference


def test_sliding_window_covering_the_image_equals_whole_image_inference() -> None:
    torch.manual_seed(0)
    model = build_model(TINY, 5).eval()
    images = torch.randn(2, 3, 32, 64)
    whole = predict(model, images, (32, 64))
    windowed = predict(model, images, (32, 64), sliding_window=SlidingWindow((40, 80)))
    assert torch.allclose(whole, windowed, atol=1e-6)
    assert torch.allclose(whole.sum(1), torch.ones(2, 32, 64), atol=1e-5)
    assert window_starts(64, 32, 1 / 3) == [0, 21, 32]
    assert window_starts(10, 20, 0.5) == [0]


def test_flip_averages_the_softmax_of_the_flipped_pass_and_output_is_resized() -> None:
    torch.manual_seed(0)
    model = build_model(TINY, 5).eval()
    images = torch.randn(1, 3, 32, 64)
    with torch.no_grad():
        plain = model(images).softmax(1)
        mirrored = model(images.flip(-1)).flip(-1).softmax(1)
    assert torch.allclose(predict(model, images, (32, 64), flip=True), (plain + mirrored) / 2,
                          atol=1e-6)
    big = predict(model, images, (64, 128))
    assert big.shape == (1, 5, 64, 128)
    assert torch.equal(predict_classes(model, images, (64, 128)), big.argmax(1))


# ------------------------------------------------------------------------------------- CLI


def cli(config_file: Path, data: Path, checkpoint: Path, out: Path, *extra: str):
    return runner.invoke(app, ["evaluate", "-c", str(config_file), "--data", str(data),
                               "--checkpoint", str(checkpoint), "--out", str(out),
                               "--device", "cpu", *extra])


def test_cli_json_and_table(tiny_index: Path, tiny_config_file: Path, tmp_path: Path) -> None:
    checkpoint = make_checkpoint(tmp_path / "ckpt")
    result = cli(tiny_config_file, tiny_index, checkpoint, tmp_path / "eval", "--json")
    assert result.exit_code == 0, result.stderr
    payload = json.loads(result.stdout)
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert payload["artifact"] == str(tmp_path / "eval")
    assert payload["summary"]["miou"] == report["miou"]
    assert payload["summary"]["per_class"] == report["per_class"]
    assert payload["summary"]["miou_by_protocol"] == report["miou_by_protocol"]

    shown = cli(tiny_config_file, tiny_index, checkpoint, tmp_path / "eval2",
                "--set", "evaluate.inference.flip=true")
    assert shown.exit_code == 0, shown.stderr
    assert "mIoU-19" in shown.stderr and "sidewalk" in shown.stderr
    assert "wrote evaluation" in shown.stderr and shown.stdout == ""


def test_cli_checkpoint_for_another_number_of_classes(tiny_index: Path, tiny_config_file: Path,
                                                      tmp_path: Path) -> None:
    checkpoint = make_checkpoint(tmp_path / "ckpt", classes=("a", "b", "c", "d", "e"))
    result = cli(tiny_config_file, tiny_index, checkpoint, tmp_path / "eval")
    assert result.exit_code == 2
    assert "5 classes but dataset index" in result.stderr and "has 19" in result.stderr
    assert not (tmp_path / "eval").exists()


def test_cli_class_table_differs_from_the_index(tiny_index: Path, tiny_config_file: Path,
                                                tmp_path: Path) -> None:
    names = list(CITYSCAPES_CLASSES)
    names[18] = "scooter"
    checkpoint = make_checkpoint(tmp_path / "ckpt", classes=names)
    result = cli(tiny_config_file, tiny_index, checkpoint, tmp_path / "eval")
    assert result.exit_code == 2
    assert "other names" in result.stderr and "scooter" in result.stderr


def test_cli_truncated_checkpoint_file(tiny_index: Path, tiny_config_file: Path,
                                       tmp_path: Path) -> None:
    checkpoint = make_checkpoint(tmp_path / "ckpt")
    raw = (checkpoint / MODEL_FILE).read_bytes()
    (checkpoint / MODEL_FILE).write_bytes(raw[: len(raw) // 2])
    result = cli(tiny_config_file, tiny_index, checkpoint, tmp_path / "eval")
    assert result.exit_code == 2
    assert "truncated or corrupt" in result.stderr and "model.pt" in result.stderr
    assert not (tmp_path / "eval").exists()


def test_cli_missing_or_unfinished_checkpoint(tiny_index: Path, tiny_config_file: Path,
                                              tmp_path: Path) -> None:
    result = cli(tiny_config_file, tiny_index, tmp_path / "nowhere", tmp_path / "eval")
    assert result.exit_code == 2 and "does not exist" in result.stderr
    checkpoint = make_checkpoint(tmp_path / "ckpt")
    (checkpoint / MANIFEST).unlink()
    result = cli(tiny_config_file, tiny_index, checkpoint, tmp_path / "eval")
    assert result.exit_code == 2 and "unfinished" in result.stderr
    shutil.rmtree(checkpoint)
