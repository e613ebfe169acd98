"""Initial weights: every accepted format mapped by name with shape checks into the layout it was
trained in, the mapping table reported, and every refusal a DudaError naming the file and fix."""

from __future__ import annotations

import os
import urllib.error
from pathlib import Path

import pytest
import torch

from stages.artifacts.checkpoint import MODEL_FILE, write_model_file
from stages.artifacts.manifest import CHECKPOINT
from stages.artifacts.weights import (
    ImportReport,
    detect_format,
    import_weights,
    initialize,
    load_initial_weights,
)
from stages.artifacts.writer import ArtifactWriter
from stages.config import DeepLabV2Config
from stages.nn.model import build_model
from stages.runtime.errors import DudaError

TINY = DeepLabV2Config(backbone="resnet18", width_multiplier=0.25, dropout=0.0,
                   normalization="imagenet_rgb")
CAFFE = DeepLabV2Config(backbone="resnet50", style="caffe", normalization="caffe_bgr", dropout=0.0)
TORCHVISION50 = DeepLabV2Config(backbone="resnet50", normalization="imagenet_rgb", dropout=0.0)


def blank(config: DeepLabV2Config = TINY, classes: int = 19) -> torch.nn.Module:
    """A model of `config` with every tensor zero: built on the meta device and materialised
    without the random initialisation, which is most of the cost of building a ResNet-50."""
    with torch.device("meta"):
        model = build_model(config, classes)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for tensor in model.state_dict().values():
            tensor.zero_()
    return model


def source_model(seed: int = 1, classes: int = 19, config: DeepLabV2Config = TINY):
    model = blank(config, classes)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(torch.randn(tensor.shape, generator=generator))
    return model


def renamed(model: torch.nn.Module, backbone: str = "", classifier: str | None = None,
            counters: bool = True) -> dict[str, torch.Tensor]:
    """The model's state dict under another lineage's names (classifier None: left out)."""
    state = {}
    for key, value in model.state_dict().items():
        if not counters and key.endswith("num_batches_tracked"):
            continue
        if key.startswith("backbone."):
            state[backbone + key.removeprefix("backbone.")] = value
        elif classifier is not None:
            state[key.replace("classifier.branches.", classifier)] = value
    return state


def assert_same(a: torch.nn.Module, b: torch.nn.Module, prefix: str = "") -> None:
    other = b.state_dict()
    for key, value in a.state_dict().items():
        if key.startswith(prefix) and not key.endswith("num_batches_tracked"):
            assert torch.equal(value, other[key]), key


@pytest.fixture(scope="module")
def caffe_source() -> torch.nn.Module:
    return source_model(config=CAFFE)


@pytest.fixture(scope="module")
def fda_file(caffe_source, tmp_path_factory) -> Path:
    """An FDA snapshot of `caffe_source`: ResNet names, the ASPP as `layer5.conv2d_list`."""
    path = tmp_path_factory.mktemp("fda") / "gta5_55000.pth"
    torch.save(renamed(caffe_source, classifier="layer5.conv2d_list."), path)
    return path


# ------------------------------------------------------------------------------- the formats


def test_torchvision_backbone_loads_fc_is_unused_and_the_classifier_keeps_its_init(
        tmp_path: Path) -> None:
    source = source_model()
    state = renamed(source)
    state["fc.weight"], state["fc.bias"] = torch.zeros(1000, 128), torch.zeros(1000)
    torch.save(state, tmp_path / "resnet.pth")
    target = blank(TINY)
    head_before = target.classifier.branches[0].weight.clone()
    report = import_weights(target, tmp_path / "resnet.pth")
    assert (report.format, report.lineage) == ("torchvision", "torchvision")
    assert_same(source, target, "backbone.")
    assert torch.equal(target.classifier.branches[0].weight, head_before)
    assert ("conv1.weight", "backbone.conv1.weight") in report.mapped
    assert dict(report.unused) == {"fc.weight": "ImageNet classification layer",
                                   "fc.bias": "ImageNet classification layer"}
    assert sorted(report.missing) == sorted(f"classifier.branches.{i}.{p}"
                                            for i in range(4) for p in ("weight", "bias"))
    assert "torchvision ImageNet ResNet" in load_initial_weights(target, tmp_path / "resnet.pth")


def test_caffe_deeplab_init_drops_scale_and_its_21_class_layer5(tmp_path: Path,
                                                               caffe_source) -> None:
    state = renamed(caffe_source, backbone="Scale.", counters=False)
    for i in range(4):
        state[f"Scale.layer5.conv2d_list.{i}.weight"] = torch.zeros(21, 2048, 3, 3)
        state[f"Scale.layer5.conv2d_list.{i}.bias"] = torch.zeros(21)
    torch.save(state, tmp_path / "DeepLab_resnet_pretrained_init-f81d91e8.pth")
    target = blank(CAFFE)
    report = import_weights(target, tmp_path / "DeepLab_resnet_pretrained_init-f81d91e8.pth")
    assert (report.format, report.lineage) == ("deeplab_init", "caffe")
    assert_same(caffe_source, target, "backbone.")
    assert ("Scale.layer1.0.conv1.weight", "backbone.layer1.0.conv1.weight") in report.mapped
    assert len(report.unused) == 8
    assert all("21-class" in reason for _, reason in report.unused)
    assert all(key.startswith("classifier.") for key in report.missing)


def test_fda_snapshot_maps_layer5_onto_the_aspp(fda_file: Path, caffe_source) -> None:
    target = blank(CAFFE)
    report = import_weights(target, fda_file)
    assert report.format == "adaptsegnet" and report.missing == [] and report.unused == []
    assert ("layer5.conv2d_list.3.bias", "classifier.branches.3.bias") in report.mapped
    assert len(report.mapped) == len(caffe_source.state_dict())
    assert_same(caffe_source, target)
    assert any("zero_aspp_branches=(2, 3)" in note for note in report.notes)


def test_adaptsegnet_single_level_snapshot_with_branches_2_and_3_zeroed(fda_file: Path,
                                                                        caffe_source) -> None:
    target = blank(CAFFE)
    report = import_weights(target, fda_file, zero_aspp_branches=(3, 2))
    assert report.zeroed_aspp_branches == (2, 3)
    assert "branches 2, 3 zeroed" in report.summary()
    assert any("returns after summing branches 0 and 1" in note for note in report.notes)
    for index in (2, 3):
        assert not target.classifier.branches[index].weight.any()
        assert not target.classifier.branches[index].bias.any()
    assert_same(caffe_source, target, "backbone.")
    assert torch.equal(target.classifier.branches[1].weight,
                       caffe_source.classifier.branches[1].weight)


def test_adaptsegnet_two_level_snapshot_uses_layer6_and_leaves_the_layer3_classifier(
        tmp_path: Path, caffe_source) -> None:
    state = renamed(caffe_source, classifier="layer6.conv2d_list.")
    for i in range(4):
        state[f"layer5.conv2d_list.{i}.weight"] = torch.zeros(19, 1024, 3, 3)
        state[f"layer5.conv2d_list.{i}.bias"] = torch.zeros(19)
    torch.save(state, tmp_path / "GTA2Cityscapes_multi.pth")
    target = blank(CAFFE)
    report = import_weights(target, tmp_path / "GTA2Cityscapes_multi.pth")
    assert report.format == "adaptsegnet_multi"
    assert len(report.unused) == 8 and all("layer3" in reason for _, reason in report.unused)
    assert_same(caffe_source, target)


def test_duda_reference_mean_teacher_with_module_module_prefix_and_n_averaged(
        tmp_path: Path, caffe_source) -> None:
    state = {"n_averaged": torch.tensor(5)}
    for key, value in renamed(caffe_source, backbone="backbone.",
                              classifier="decoder.aspp.conv2d_list.").items():
        state[f"module.module.{key}"] = value
    torch.save(state, tmp_path / "best_mean_model.pth")
    target = blank(CAFFE)
    report = import_weights(target, tmp_path / "best_mean_model.pth")
    assert (report.format, report.lineage) == ("duda_reference", "caffe")
    assert report.unused == [("n_averaged", "the mean teacher's average counter")]
    assert ("decoder.aspp.conv2d_list.0.weight", "classifier.branches.0.weight") in report.mapped
    assert_same(caffe_source, target)


def test_iast_checkpoint_with_fc_and_discriminator_loads_into_the_torchvision_layout(
        tmp_path: Path) -> None:
    source = source_model()
    state = {f"module.{key}": value for key, value in renamed(
        source, backbone="backbone.", classifier="decoder.aspp.conv2d_list.").items()}
    state["module.backbone.fc.weight"] = torch.zeros(1000, 128)
    state["module.backbone.fc.bias"] = torch.zeros(1000)
    state["module.discriminators.Origin-Predictor.conv1.weight"] = torch.zeros(64, 19, 3, 3)
    torch.save(state, tmp_path / "G_gtav_at_warmup_v100.pth")
    target = blank(TINY)
    report = import_weights(target, tmp_path / "G_gtav_at_warmup_v100.pth")
    assert (report.format, report.lineage) == ("iast", "torchvision")
    assert {key for key, _ in report.unused} == {
        "backbone.fc.weight", "backbone.fc.bias", "discriminators.Origin-Predictor.conv1.weight"}
    assert_same(source, target)


def test_an_iast_checkpoint_without_fc_is_read_as_iast_when_told(tmp_path: Path) -> None:
    source = source_model()
    torch.save(renamed(source, backbone="backbone.", classifier="decoder.aspp.conv2d_list."),
               tmp_path / "stripped.pth")
    with pytest.raises(DudaError, match="set model.style: caffe"):
        import_weights(blank(TINY), tmp_path / "stripped.pth")
    target = blank(TINY)
    assert import_weights(target, tmp_path / "stripped.pth", format="iast").format == "iast"
    assert_same(source, target)


def test_duda_checkpoint_artifact_and_its_model_file_load_the_teacher(tmp_path: Path) -> None:
    student, teacher = source_model(1), source_model(2)
    path = tmp_path / "ckpt"
    with ArtifactWriter(path, kind=CHECKPOINT, stage="self_train", config={},
                        config_hash="x") as writer:
        write_model_file(path / MODEL_FILE, student=student, teacher=teacher, model_config=TINY,
                         class_names=[str(i) for i in range(19)], iteration=1)
        writer.finish({})
    for source in (path, path / MODEL_FILE):
        target = blank(TINY)
        report = import_weights(target, source)
        assert (report.format, report.lineage) == ("duda", "duda")
        assert report.source.startswith("the teacher of duda checkpoint")
        assert_same(teacher, target)


def test_bare_project_state_dict_loads_and_says_its_layout_was_not_checked(
        tmp_path: Path) -> None:
    source = source_model()
    torch.save(source.state_dict(), tmp_path / "state.pt")
    target = blank(TINY)
    report = import_weights(target, tmp_path / "state.pt")
    assert report.format == "duda" and any("not checked" in note for note in report.notes)
    assert_same(source, target)
    wrapped = torch.optim.swa_utils.AveragedModel(blank(TINY))  # a mean teacher's wrapper
    import_weights(wrapped, tmp_path / "state.pt")
    assert_same(source, wrapped.module)


def test_legacy_torch_serialisation_and_a_state_dict_container_load(tmp_path: Path) -> None:
    source = source_model()
    torch.save({"state_dict": source.state_dict(), "iteration": 3}, tmp_path / "old.pth",
               _use_new_zipfile_serialization=False)
    target = blank(TINY)
    assert import_weights(target, tmp_path / "old.pth").format == "duda"
    assert_same(source, target)


def test_detect_format_from_key_names() -> None:
    assert detect_format(["Scale.conv1.weight"]) == "deeplab_init"
    assert detect_format(["conv1.weight", "layer1.0.conv1.weight", "fc.weight"]) == "torchvision"
    assert detect_format(["conv1.weight", "layer1.0.conv1.weight",
                          "layer5.conv2d_list.0.weight"]) == "adaptsegnet"
    assert detect_format(["backbone.conv1.weight", "decoder.aspp.conv2d_list.0.weight"]
                         ) == "duda_reference"
    assert detect_format(["backbone.conv1.weight", "backbone.fc.weight"]) == "iast"
    assert detect_format(["backbone.conv1.weight", "classifier.branches.0.weight"]) == "duda"


# ------------------------------------------------------------------------------- the layout


def test_caffe_lineage_weights_are_refused_by_a_torchvision_model(fda_file: Path) -> None:
    for config in (TORCHVISION50, CAFFE.model_copy(update={"normalization": "imagenet_rgb"})):
        target = blank(config)
        before = target.backbone.conv1.weight.clone()
        with pytest.raises(DudaError) as error:
            import_weights(target, fda_file)
        assert str(fda_file) in error.value.message
        assert error.value.fix.startswith("set model.style: caffe and model.normalization: "
                                          "caffe_bgr")
        assert torch.equal(target.backbone.conv1.weight, before)


def test_torchvision_imagenet_weights_are_refused_by_a_caffe_model(tmp_path: Path) -> None:
    torch.save(renamed(blank(TORCHVISION50)), tmp_path / "resnet50-0676ba61.pth")
    with pytest.raises(DudaError) as error:
        import_weights(blank(CAFFE), tmp_path / "resnet50-0676ba61.pth")
    assert "resnet50-0676ba61.pth" in error.value.message
    assert error.value.fix == ("set model.style: torchvision and model.normalization: "
                               "imagenet_rgb")


def test_a_duda_checkpoint_is_refused_by_a_model_of_another_layout(tmp_path: Path) -> None:
    write_model_file(tmp_path / MODEL_FILE, student=source_model(), teacher=None,
                     model_config=TINY, class_names=[str(i) for i in range(19)], iteration=1)
    other = TINY.model_copy(update={"normalization": "caffe_bgr"})
    with pytest.raises(DudaError, match="normalization: imagenet_rgb"):
        import_weights(blank(other), tmp_path / MODEL_FILE)


# ------------------------------------------------------------------------------- bad input


def test_mis_shaped_and_unmatched_keys_are_listed(tmp_path: Path, caffe_source) -> None:
    small = source_model(classes=7, config=CAFFE)  # another number of classes
    state = renamed(small, classifier="layer5.conv2d_list.")
    state["layer6.extra.weight"] = torch.zeros(3)
    torch.save(state, tmp_path / "w.pth")
    target = blank(CAFFE)
    before = target.backbone.conv1.weight.clone()
    with pytest.raises(DudaError) as error:
        import_weights(target, tmp_path / "w.pth", format="adaptsegnet")
    message = error.value.message
    assert "layer6.extra.weight: no counterpart in the model" in message
    assert "classifier.branches.0.weight: file (7, 2048, 3, 3) vs model (19, 2048, 3, 3)" in message
    assert "9 problem(s)" in message and "19 classes" in message
    assert torch.equal(target.backbone.conv1.weight, before)  # nothing copied


def test_missing_keys_and_another_backbone_are_listed_with_a_count(tmp_path: Path) -> None:
    source = source_model()
    state = {k: v for k, v in renamed(source).items() if not k.startswith("layer4.")}
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(DudaError, match=r"backbone\.layer4\.0\.conv1\.weight: missing from"):
        import_weights(blank(TINY), tmp_path / "partial.pth")

    wide = source_model(config=TINY.model_copy(update={"width_multiplier": 1.0}))
    torch.save(wide.state_dict(), tmp_path / "wide.pth")
    with pytest.raises(DudaError, match=r"; … and \d+ more") as error:
        import_weights(blank(TINY), tmp_path / "wide.pth")
    assert "backbone.conv1.weight: file (64, 3, 7, 7) vs model (16, 3, 7, 7)" in error.value.message


def test_a_resnet101_snapshot_into_a_resnet50_model_names_the_extra_blocks(tmp_path: Path,
                                                                           caffe_source) -> None:
    state = renamed(caffe_source, classifier="layer5.conv2d_list.")
    state["layer3.6.conv1.weight"] = state["layer3.5.conv1.weight"]
    torch.save(state, tmp_path / "r101.pth")
    with pytest.raises(DudaError, match=r"layer3\.6\.conv1\.weight -> backbone\.layer3\.6\.conv1"
                                        r"\.weight: not in the model"):
        import_weights(blank(CAFFE), tmp_path / "r101.pth")


def test_a_text_file_is_not_a_torch_file(tmp_path: Path) -> None:
    for name, content in (("notes.pth", b"hello world\nthis is text\n"),
                          ("bad.pth", b"\x00" * 30), ("empty.pth", b"")):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(DudaError) as error:
            import_weights(blank(TINY), tmp_path / name)
        assert f"weights file {tmp_path / name} is not a torch file" in error.value.message


class _Touch:
    """A pickled object whose unpickling would create a file: the test of 'never executed'."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def test_a_pickle_that_would_run_code_is_refused_and_not_run(tmp_path: Path) -> None:
    marker = tmp_path / "was-run"
    torch.save({"conv1.weight": torch.zeros(1), "payload": _Touch(marker)}, tmp_path / "evil.pth")
    with pytest.raises(DudaError) as error:
        import_weights(blank(TINY), tmp_path / "evil.pth")
    assert "holds Python objects (posix.mkdir)" in error.value.message
    assert "could run code" in error.value.message
    assert not marker.exists()


def test_other_bad_inputs(tmp_path: Path) -> None:
    torch.save({"foo.weight": torch.zeros(2)}, tmp_path / "odd.pth")
    with pytest.raises(DudaError, match="odd.pth: cannot tell which model"):
        import_weights(blank(TINY), tmp_path / "odd.pth")
    with pytest.raises(DudaError, match="do not exist"):
        import_weights(blank(TINY), tmp_path / "none.pth")
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(DudaError, match="holds a list, not a state dict"):
        import_weights(blank(TINY), tmp_path / "list.pth")
    torch.save({"iteration": 3}, tmp_path / "empty.pth")
    with pytest.raises(DudaError, match="holds no tensors"):
        import_weights(blank(TINY), tmp_path / "empty.pth")
    (tmp_path / "folder").mkdir()
    with pytest.raises(DudaError, match="not a checkpoint artifact"):
        import_weights(blank(TINY), tmp_path / "folder")


def test_zero_aspp_branches_must_name_existing_branches_of_a_full_deeplab(tmp_path: Path) -> None:
    source = source_model()
    torch.save(source.state_dict(), tmp_path / "state.pt")
    with pytest.raises(DudaError, match="it has 4, numbered from 0"):
        import_weights(blank(TINY), tmp_path / "state.pt", zero_aspp_branches=(4,))
    torch.save(renamed(source), tmp_path / "resnet.pth")
    with pytest.raises(DudaError, match="without a classifier"):
        import_weights(blank(TINY), tmp_path / "resnet.pth", zero_aspp_branches=(2,))


# ------------------------------------------------------------------------------- model.init


def test_initialize_none_and_a_path(tmp_path: Path) -> None:
    model = blank(TINY)
    assert initialize(model) is None
    source = source_model()
    torch.save(source.state_dict(), tmp_path / "state.pt")
    config = TINY.model_copy(update={"init": str(tmp_path / "state.pt")})
    report = initialize(blank(config))
    assert isinstance(report, ImportReport) and report.format == "duda"


def test_initialize_imagenet_reads_the_torch_hub_cache(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    config = TORCHVISION50.model_copy(update={"init": "imagenet"})
    state = {key: torch.full_like(value, 0.5) for key, value in renamed(blank(config)).items()}
    state["fc.weight"], state["fc.bias"] = torch.zeros(1000, 2048), torch.zeros(1000)
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(state, tmp_path / "hub" / "checkpoints" / "resnet50-0676ba61.pth")
    model = blank(config)
    report = initialize(model)
    assert report.format == "torchvision"
    assert torch.all(model.backbone.layer4[2].conv3.weight == 0.5)


def test_initialize_imagenet_without_cache_or_network_says_which_file_to_place_where(
        tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    config = DeepLabV2Config(backbone="resnet101", normalization="imagenet_rgb", init="imagenet")
    with torch.device("meta"):
        model = build_model(config, 19)
    with pytest.raises(DudaError) as error:
        initialize(model)
    expected = tmp_path / "hub" / "checkpoints" / "resnet101-63fe2227.pth"
    assert str(expected) in error.value.message and "URLError" in error.value.message
    assert "https://download.pytorch.org/models/resnet101-63fe2227.pth" in error.value.fix
    assert f"place it at {expected}" in error.value.fix
