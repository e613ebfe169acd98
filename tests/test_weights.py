"""Initial weights: torchvision backbones, project checkpoints and external DeepLabV2 lineages,
mapped by name with shape checks; every mismatch is listed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from stages.artifacts import CHECKPOINT, ArtifactWriter
from stages.checkpoint import MODEL_FILE, write_model_file
from stages.config import ModelConfig
from stages.errors import DudaError
from stages.nn.model import build_model
from stages.nn.weights import load_initial_weights

TINY = ModelConfig(backbone="resnet18", width_multiplier=0.25, dropout=0.0)


def source_model(seed: int = 1, classes: int = 19, config: ModelConfig = TINY):
    torch.manual_seed(seed)
    model = build_model(config, classes)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.normal_()
    return model


def assert_same(a: torch.nn.Module, b: torch.nn.Module, prefix: str = "") -> None:
    other = b.state_dict()
    for key, value in a.state_dict().items():
        if key.startswith(prefix) and not key.endswith("num_batches_tracked"):
            assert torch.equal(value, other[key]), key


def test_torchvision_backbone_loads_and_fc_is_ignored(tmp_path: Path) -> None:
    source = source_model()
    state = {k.removeprefix("backbone."): v for k, v in source.state_dict().items()
             if k.startswith("backbone.")}
    state["fc.weight"] = torch.zeros(1000, 128)
    state["fc.bias"] = torch.zeros(1000)
    torch.save(state, tmp_path / "resnet.pth")
    target = build_model(TINY, 19)
    head_before = target.classifier.branches[0].weight.clone()
    description = load_initial_weights(target, tmp_path / "resnet.pth")
    assert "torchvision ImageNet ResNet backbone" in description
    assert_same(source, target, "backbone.")
    assert torch.equal(target.classifier.branches[0].weight, head_before)


def test_adaptsegnet_fda_checkpoint_maps_layer5_onto_the_aspp(tmp_path: Path) -> None:
    source = source_model()
    state = {}
    for key, value in source.state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue  # old Caffe-port checkpoints have none
        key = key.removeprefix("backbone.").replace("classifier.branches.",
                                                    "layer5.conv2d_list.")
        state[key] = value
    torch.save(state, tmp_path / "GTA5_fda.pth")
    target = build_model(TINY, 19)
    assert "AdaptSegNet/FDA" in load_initial_weights(target, tmp_path / "GTA5_fda.pth")
    assert_same(source, target)


def test_duda_checkpoint_with_module_prefix_decoder_and_n_averaged(tmp_path: Path) -> None:
    source = source_model()
    state = {"n_averaged": torch.tensor(5)}
    for key, value in source.state_dict().items():
        key = key.replace("classifier.branches.", "decoder.aspp.conv2d_list.")
        state[f"module.{key}"] = value
    torch.save({"state_dict": state}, tmp_path / "best_mean_model.pth")
    target = build_model(TINY, 19)
    assert "DUDA" in load_initial_weights(target, tmp_path / "best_mean_model.pth")
    assert_same(source, target)


def test_project_checkpoint_artifact_loads_its_teacher(tmp_path: Path) -> None:
    student, teacher = source_model(1), source_model(2)
    path = tmp_path / "ckpt"
    with ArtifactWriter(path, kind=CHECKPOINT, stage="self_train", config={},
                        config_hash="x") as writer:
        write_model_file(path / MODEL_FILE, student=student, teacher=teacher, model_config=TINY,
                         class_names=[str(i) for i in range(19)], iteration=1)
        writer.finish({})
    target = build_model(TINY, 19)
    assert "teacher" in load_initial_weights(target, path)
    assert_same(teacher, target)


def test_mis_shaped_and_unmatched_keys_are_listed(tmp_path: Path) -> None:
    source = source_model(classes=7)  # another number of classes: the ASPP shapes differ
    state = {k.removeprefix("backbone.").replace("classifier.branches.", "layer5.conv2d_list."):
             v for k, v in source.state_dict().items()}
    state["layer6.extra.weight"] = torch.zeros(3)
    torch.save(state, tmp_path / "w.pth")
    with pytest.raises(DudaError) as error:
        load_initial_weights(build_model(TINY, 19), tmp_path / "w.pth")
    message = error.value.message
    assert "layer6.extra.weight: no counterpart in the model" in message
    assert "classifier.branches.0.weight: file (7, 128, 3, 3) vs model (19, 128, 3, 3)" in message
    assert "9 problem(s)" in message  # 1 unmatched + 4 weights + 4 biases


def test_missing_keys_and_another_backbone_are_listed_with_a_count(tmp_path: Path) -> None:
    source = source_model()
    state = {k.removeprefix("backbone."): v for k, v in source.state_dict().items()
             if k.startswith("backbone.") and ".layer4." not in f".{k.removeprefix('backbone.')}"}
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(DudaError, match=r"layer4\.0\.conv1\.weight: missing from the file"):
        load_initial_weights(build_model(TINY, 19), tmp_path / "partial.pth")

    wide = source_model(config=ModelConfig(backbone="resnet18", dropout=0.0))
    torch.save(wide.state_dict(), tmp_path / "wide.pth")
    with pytest.raises(DudaError, match=r"; … and \d+ more") as error:
        load_initial_weights(build_model(TINY, 19), tmp_path / "wide.pth")
    assert "backbone.conv1.weight: file (64, 3, 7, 7) vs model (16, 3, 7, 7)" in error.value.message


def test_unknown_file_and_missing_path(tmp_path: Path) -> None:
    torch.save({"foo.weight": torch.zeros(2)}, tmp_path / "odd.pth")
    with pytest.raises(DudaError, match="cannot tell which model"):
        load_initial_weights(build_model(TINY, 19), tmp_path / "odd.pth")
    with pytest.raises(DudaError, match="do not exist"):
        load_initial_weights(build_model(TINY, 19), tmp_path / "none.pth")
    (tmp_path / "bad.pth").write_bytes(b"\x00" * 30)
    with pytest.raises(DudaError, match="truncated or corrupt"):
        load_initial_weights(build_model(TINY, 19), tmp_path / "bad.pth")
