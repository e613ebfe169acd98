"""Checkpoint files and artifacts: round trip, teacher fallback, truncated files, compatibility."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from stages.artifacts.checkpoint import (
    MODEL_FILE,
    check_compatible,
    load_model,
    load_torch,
    save_torch,
    write_model_file,
)
from stages.artifacts.manifest import CHECKPOINT, DATASET_INDEX
from stages.artifacts.writer import ArtifactWriter
from stages.config import DeepLabV2Config
from stages.data.classes import CITYSCAPES_CLASSES
from stages.nn.model import build_model
from stages.nn.teacher import MeanTeacher
from stages.runtime.errors import DudaError

TINY = DeepLabV2Config(backbone="resnet18", width_multiplier=0.25, dropout=0.0)


def write_checkpoint(path: Path, *, teacher: bool = True, classes=CITYSCAPES_CLASSES,
                     config: DeepLabV2Config = TINY, seed: int = 0) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(seed)
    student = build_model(config, len(classes))
    mean = None
    if teacher:
        mean = MeanTeacher(student)
        with torch.no_grad():
            for p in mean.module.parameters():
                p.add_(1.0)
    with ArtifactWriter(path, kind=CHECKPOINT, stage="warmup", config={}, config_hash="t") as w:
        write_model_file(path / MODEL_FILE, student=student, teacher=mean, model_config=config,
                         class_names=list(classes), iteration=7)
        w.finish({"iteration": 7, "backbone": config.backbone, "num_classes": len(classes)})
    return path, student


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    data = {"a": torch.arange(5), "b": [1, "x"], "c": {"d": 2.5}}
    save_torch(data, tmp_path / "f.pt")
    loaded = load_torch(tmp_path / "f.pt")
    assert torch.equal(loaded["a"], data["a"]) and loaded["b"] == [1, "x"]
    assert not list(tmp_path.glob(".f.pt.tmp*"))


@pytest.mark.parametrize("keep", [0, 10, 0.5, -20])
def test_a_truncated_file_is_a_user_error(tmp_path: Path, keep: float) -> None:
    save_torch({"a": torch.randn(2000)}, tmp_path / "f.pt")
    raw = (tmp_path / "f.pt").read_bytes()
    cut = int(len(raw) * keep) if isinstance(keep, float) else keep
    (tmp_path / "f.pt").write_bytes(raw[:cut])
    with pytest.raises(DudaError, match="f.pt is truncated or corrupt"):
        load_torch(tmp_path / "f.pt")


def test_a_missing_file_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(DudaError, match="does not exist"):
        load_torch(tmp_path / "nope.pt")


def test_load_model_returns_the_teacher_or_the_student(tmp_path: Path) -> None:
    path, student = write_checkpoint(tmp_path / "ckpt")
    loaded = load_model(path, "student")
    assert loaded.which == "student" and loaded.iteration == 7
    assert loaded.class_names == list(CITYSCAPES_CLASSES) and loaded.model_config == TINY
    assert not loaded.model.training
    for key, value in student.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value)
    teacher = load_model(path, "teacher")
    assert teacher.which == "teacher"
    assert torch.allclose(teacher.model.backbone.conv1.weight, student.backbone.conv1.weight + 1)


def test_teacher_falls_back_to_the_student_and_says_so(tmp_path: Path) -> None:
    path, student = write_checkpoint(tmp_path / "ckpt", teacher=False)
    loaded = load_model(path, "teacher")
    assert loaded.which.startswith("student") and "no teacher" in loaded.which
    assert torch.equal(loaded.model.backbone.conv1.weight, student.backbone.conv1.weight)


def test_load_model_refuses_other_artifacts_and_truncated_files(tmp_path: Path) -> None:
    other = tmp_path / "index"
    with ArtifactWriter(other, kind=DATASET_INDEX, stage="prepare_data", config={},
                        config_hash="x") as writer:
        writer.finish({})
    with pytest.raises(DudaError, match="expected a duda.checkpoint"):
        load_model(other)
    path, _ = write_checkpoint(tmp_path / "ckpt")
    raw = (path / MODEL_FILE).read_bytes()
    (path / MODEL_FILE).write_bytes(raw[: len(raw) // 3])
    with pytest.raises(DudaError, match="truncated or corrupt"):
        load_model(path)
    (path / MODEL_FILE).unlink()
    with pytest.raises(DudaError, match="model.pt does not exist"):
        load_model(path)


def test_check_compatible_names_both_class_counts_and_backbones(tmp_path: Path) -> None:
    path, _ = write_checkpoint(tmp_path / "ckpt", classes=("a", "b", "c"))
    loaded = load_model(path, "student")
    check_compatible(loaded, ["a", "b", "c"], TINY)
    with pytest.raises(DudaError, match="3 classes but the dataset index has 19"):
        check_compatible(loaded, CITYSCAPES_CLASSES)
    with pytest.raises(DudaError, match="other names"):
        check_compatible(loaded, ["a", "b", "x"])
    with pytest.raises(DudaError, match=r"DeepLabV2 resnet18 \(width × 0.25\) model but the "
                                        r"config asks for DeepLabV2 resnet101"):
        check_compatible(loaded, ["a", "b", "c"], DeepLabV2Config())
