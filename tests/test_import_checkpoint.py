"""`duda import-checkpoint`: external state dicts become checkpoint artifacts that the other
stages read, with the mapping table printed and recorded; every bad file is refused (exit 2)
with nothing written."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_CONFIG
from typer.testing import CliRunner

from duda_cli.app import app
from stages import evaluate, generate_pseudo, self_train
from stages.artifacts.checkpoint import MODEL_FILE, load_torch, write_model_file
from stages.artifacts.manifest import CHECKPOINT, MANIFEST, load_artifact
from stages.artifacts.writer import ArtifactWriter
from stages.config import Config, DeepLabV2Config
from stages.data.classes import CITYSCAPES_CLASSES
from stages.nn.model import build_model

runner = CliRunner()
TINY = DeepLabV2Config.model_validate(TINY_CONFIG["model"])
CAFFE = ["--set", "model.backbone=resnet50", "--set", "model.width_multiplier=1.0",
         "--set", "model.style=caffe", "--set", "model.normalization=caffe_bgr"]


def source_model(config: DeepLabV2Config = TINY, classes: int = 19, seed: int = 1) -> torch.nn.Module:
    """A model with random values in every float tensor (built without the costly init)."""
    with torch.device("meta"):
        model = build_model(config, classes)
    model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(torch.randn(tensor.shape, generator=generator))
            else:
                tensor.zero_()
    return model


def renamed(model: torch.nn.Module, backbone: str = "", classifier: str | None = None,
            prefix: str = "") -> dict[str, torch.Tensor]:
    """The model's tensors under another code base's names (classifier None: left out)."""
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith("backbone."):
            state[prefix + backbone + key.removeprefix("backbone.")] = value
        elif classifier is not None:
            state[prefix + key.replace("classifier.branches.", classifier)] = value
    return state


def iast_snapshot(path: Path, model: torch.nn.Module) -> Path:
    """An IAST checkpoint: `module.` names, torchvision's fc and a discriminator (unused)."""
    state = renamed(model, "backbone.", "decoder.aspp.conv2d_list.", prefix="module.")
    state["module.backbone.fc.weight"] = torch.zeros(1000, 8)
    state["module.backbone.fc.bias"] = torch.zeros(1000)
    state["module.discriminators.Origin-Predictor.conv1.weight"] = torch.zeros(64, 19, 3, 3)
    torch.save(state, path)
    return path


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    """The tiny config's data, input and model sections: all that an import reads."""
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({"experiment": "import", "seed": 0,
                                    **{key: TINY_CONFIG[key] for key in ("data", "input", "model")}},
                                   sort_keys=False))
    return path


def invoke(source: Path, out: Path, config: Path, *extra: str):
    return runner.invoke(app, ["import-checkpoint", str(source), "-c", str(config), "--out",
                               str(out), *extra])


def assert_weights(state: dict[str, torch.Tensor], model: torch.nn.Module) -> None:
    for key, value in model.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(state[key], value), key


def words(text: str) -> str:
    return " ".join(text.split())


# ------------------------------------------------------------------------------ imports


@pytest.mark.slow
def test_an_iast_snapshot_is_a_checkpoint_self_train_starts_from(tmp_path: Path,
                                                                  config_file: Path) -> None:
    from conftest import make_index

    torch.manual_seed(1)
    source = build_model(TINY, 19)  # initialised like a real model: it must segment sensibly
    weights = iast_snapshot(tmp_path / "G_gtav_at_warmup_v100.pth", source)
    result = invoke(weights, tmp_path / "imported", config_file, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)["summary"]
    assert (summary["format"], summary["lineage"]) == ("iast", "torchvision")
    assert summary["mapped"] == len(source.state_dict())
    assert summary["missing"] == [] and summary["iteration"] == 0
    assert {entry["key"]: entry["reason"] for entry in summary["unused"]} == {
        "backbone.fc.weight": "ImageNet classification layer",
        "backbone.fc.bias": "ImageNet classification layer",
        "discriminators.Origin-Predictor.conv1.weight":
            "the adversarial warm-up's discriminator"}

    manifest = load_artifact(tmp_path / "imported", CHECKPOINT)
    assert manifest.stage == "import_checkpoint"
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()[:16]
    assert manifest.inputs["weights"].model_dump() == {
        "kind": "weights", "id": digest, "path": str(weights.resolve())}
    model = load_torch(tmp_path / "imported" / MODEL_FILE)
    assert model["class_names"] == list(CITYSCAPES_CLASSES) and model["iteration"] == 0
    assert_weights(model["student"], source)
    assert_weights(model["teacher"], source)

    table = invoke(weights, tmp_path / "imported", config_file)
    assert table.exit_code == 0 and "up to date" in table.stderr
    shown = words(table.stderr)
    assert "mapped" in shown and "ImageNet classification layer (e.g. backbone.fc.weight)" in shown
    assert "the adversarial warm-up's discriminator" in shown

    # The other stages take it as their --checkpoint: the teacher is the imported model.
    config = Config.model_validate(TINY_CONFIG)
    data = make_index(tmp_path / "data")
    report = evaluate.run(config, data, tmp_path / "imported", tmp_path / "eval", device="cpu")
    assert report.manifest.summary["model"] == "teacher"
    pseudo = generate_pseudo.run(config, data, tmp_path / "imported", tmp_path / "pseudo",
                                 device="cpu").path
    run = self_train.run(config, data, tmp_path / "imported", pseudo, tmp_path / "run",
                         device="cpu")
    assert run.manifest.summary["iteration"] == config.self_train.iterations
    assert run.manifest.inputs["checkpoint"].id == manifest.id


def test_reference_mean_teacher_and_adaptsegnet_single_level(tmp_path: Path,
                                                             config_file: Path) -> None:
    caffe = DeepLabV2Config(backbone="resnet50", style="caffe", normalization="caffe_bgr")
    source = source_model(caffe)
    teacher = {"module.module.n_averaged": torch.tensor(5),
               **renamed(source, "backbone.", "decoder.aspp.conv2d_list.",
                         prefix="module.module.")}
    torch.save(teacher, tmp_path / "best_mean_model.pth")
    result = invoke(tmp_path / "best_mean_model.pth", tmp_path / "reference", config_file,
                    *CAFFE, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)["summary"]
    assert (summary["format"], summary["lineage"], summary["style"]) == (
        "duda_reference", "caffe", "caffe")
    assert summary["unused"] == [{"key": "n_averaged",
                                  "reason": "the mean teacher's average counter"}]
    assert_weights(load_torch(tmp_path / "reference" / MODEL_FILE)["teacher"], source)

    torch.save(renamed(source, classifier="layer5.conv2d_list."), tmp_path / "GTA5_50000.pth")
    result = invoke(tmp_path / "GTA5_50000.pth", tmp_path / "adaptsegnet", config_file, *CAFFE,
                    "--zero-aspp-branches", "2,3")
    assert result.exit_code == 0, result.output
    assert "AdaptSegNet single-level: ASPP branches 2–3 zeroed" in words(result.stderr)
    manifest = load_artifact(tmp_path / "adaptsegnet", CHECKPOINT)
    assert manifest.summary["zeroed_aspp_branches"] == [2, 3]
    assert manifest.summary["assumptions"][0] == "AdaptSegNet single-level: ASPP branches 2–3 zeroed"
    student = load_torch(tmp_path / "adaptsegnet" / MODEL_FILE)["student"]
    assert not student["classifier.branches.2.weight"].any()
    assert not student["classifier.branches.3.bias"].any()
    assert torch.equal(student["classifier.branches.1.weight"],
                       source.state_dict()["classifier.branches.1.weight"])


def test_an_imagenet_backbone_leaves_a_seeded_classifier(tmp_path: Path, config_file: Path) -> None:
    state = renamed(source_model())
    state["fc.weight"], state["fc.bias"] = torch.zeros(1000, 8), torch.zeros(1000)
    torch.save(state, tmp_path / "resnet18.pth")
    first = invoke(tmp_path / "resnet18.pth", tmp_path / "a", config_file)
    second = invoke(tmp_path / "resnet18.pth", tmp_path / "b", config_file)
    assert first.exit_code == 0 and second.exit_code == 0, first.output
    shown = words(first.stderr)
    assert "keep their initialisation: classifier.branches.* (8)" in shown
    assert "the classifier keeps its random initialisation" in shown
    a, b = (load_torch(tmp_path / name / MODEL_FILE) for name in ("a", "b"))
    assert torch.equal(a["student"]["classifier.branches.0.weight"],
                       b["student"]["classifier.branches.0.weight"])
    assert load_artifact(tmp_path / "a", CHECKPOINT).id == load_artifact(tmp_path / "b",
                                                                          CHECKPOINT).id


def test_a_duda_checkpoint_keeps_its_classes_and_the_data_option_names_them(
        tmp_path: Path, config_file: Path) -> None:
    names = [f"class{i}" for i in range(19)]
    with ArtifactWriter(tmp_path / "ckpt", kind=CHECKPOINT, stage="warmup", config={},
                        config_hash="other-classes") as writer:
        write_model_file(tmp_path / "ckpt" / MODEL_FILE, student=source_model(), teacher=None,
                         model_config=TINY, class_names=names, iteration=5)
        writer.finish({})
    result = invoke(tmp_path / "ckpt", tmp_path / "out", config_file)
    assert result.exit_code == 2 and "other classes" in words(result.stderr)
    assert "--data" in result.stderr and not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------ refusals


class _Touch:
    """Unpickling it would create a folder: the proof that the file was never executed."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def refused(tmp_path: Path, config_file: Path, source: Path, *extra: str) -> str:
    out = tmp_path / "out"
    result = invoke(source, out, config_file, *extra)
    assert result.exit_code == 2, result.output
    assert not out.exists() and not (tmp_path / ".out.partial").exists()
    return words(result.stderr)


def test_files_that_are_not_state_dicts(tmp_path: Path, config_file: Path) -> None:
    (tmp_path / "notes.pth").write_text("some text, not weights\n")
    assert "is not a torch file" in refused(tmp_path, config_file, tmp_path / "notes.pth")
    torch.save([torch.zeros(2)], tmp_path / "list.pth")
    assert "holds a list, not a state dict" in refused(tmp_path, config_file,
                                                       tmp_path / "list.pth")
    marker = tmp_path / "was-run"
    torch.save({"conv1.weight": torch.zeros(1), "payload": _Touch(marker)}, tmp_path / "evil.pth")
    message = refused(tmp_path, config_file, tmp_path / "evil.pth")
    assert "could run code" in message and not marker.exists()
    assert "do not exist" in refused(tmp_path, config_file, tmp_path / "missing.pth")


def test_weights_of_another_class_count_or_architecture(tmp_path: Path, config_file: Path) -> None:
    iast_snapshot(tmp_path / "21.pth", source_model(classes=21))
    message = refused(tmp_path, config_file, tmp_path / "21.pth")
    assert "do not fit the model (resnet18, 19 classes)" in message
    assert "classifier.branches.0.weight: file (21," in message
    wider = DeepLabV2Config.model_validate({**TINY_CONFIG["model"], "width_multiplier": 0.5})
    iast_snapshot(tmp_path / "wide.pth", source_model(wider))
    assert "file (32, 3, 7, 7) vs model (16, 3, 7, 7)" in refused(tmp_path, config_file,
                                                                  tmp_path / "wide.pth")


def test_caffe_lineage_weights_need_the_caffe_style(tmp_path: Path, config_file: Path) -> None:
    torch.save(renamed(source_model(), classifier="layer5.conv2d_list."), tmp_path / "fda.pth")
    message = refused(tmp_path, config_file, tmp_path / "fda.pth")
    assert "model.style: torchvision" in message
    assert "set model.style: caffe and model.normalization: caffe_bgr" in message


def test_bad_options(tmp_path: Path, config_file: Path) -> None:
    weights = iast_snapshot(tmp_path / "iast.pth", source_model())
    assert "not a list of branch numbers" in refused(tmp_path, config_file, weights,
                                                     "--zero-aspp-branches", "2,x")
    assert "names branches the model lacks" in refused(tmp_path, config_file, weights,
                                                       "--zero-aspp-branches", "7")
    message = refused(tmp_path, config_file, weights, "--format", "caffe")
    assert "unknown weights format 'caffe'" in message and "duda_reference" in message


def test_a_failed_force_leaves_the_old_checkpoint(tmp_path: Path, config_file: Path) -> None:
    weights = iast_snapshot(tmp_path / "iast.pth", source_model())
    assert invoke(weights, tmp_path / "out", config_file).exit_code == 0
    before = (tmp_path / "out" / MANIFEST).read_text()
    (tmp_path / "bad.pth").write_text("not weights")
    result = invoke(tmp_path / "bad.pth", tmp_path / "out", config_file, "--force")
    assert result.exit_code == 2 and "is not a torch file" in result.stderr
    assert (tmp_path / "out" / MANIFEST).read_text() == before
    assert not (tmp_path / ".out.partial").exists()


def test_every_option_reaches_the_stage(tmp_path: Path, config_file: Path, monkeypatch) -> None:
    from stages import import_checkpoint

    seen = {}

    def run(config, source, out, **kwargs):
        seen.update(config=config, source=source, out=out, **kwargs)
        raise import_checkpoint.DudaError("stop here")

    monkeypatch.setattr(import_checkpoint, "run", run)
    result = runner.invoke(app, ["import-checkpoint", "w.pth", "-c", str(config_file), "--data",
                                 "d", "--zero-aspp-branches", "2, 3", "--format", "adaptsegnet",
                                 "--force", "--seed", "7"])
    assert result.exit_code == 2 and "stop here" in result.stderr
    assert (seen["source"], seen["out"], seen["data"]) == (
        Path("w.pth"), Path("runs/import/imported"), Path("d"))
    assert seen["zero_aspp_branches"] == (2, 3) and seen["format"] == "adaptsegnet"
    assert seen["force"] is True and seen["config"].seed == 7
