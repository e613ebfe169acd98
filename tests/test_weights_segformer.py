"""Initial weights of the SegFormer family: NVlabs' ImageNet MiT files, DAFormer checkpoints
(teacher or student) and duda SegFormer checkpoints mapped by name with shape checks, the mapping
table reported, and every wrong combination a DudaError naming the file and the fix."""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import TINY_CONFIG
from typer.testing import CliRunner

from duda_cli.app import app
from stages.artifacts.checkpoint import MODEL_FILE, load_torch, write_model_file
from stages.artifacts.manifest import CHECKPOINT, load_artifact
from stages.artifacts.weights import detect_format, import_weights, initialize
from stages.config import DeepLabV2Config, SegFormerConfig, parse_model_config
from stages.data.classes import CITYSCAPES_CLASSES
from stages.nn.model import build_model
from stages.nn.segformer import HEADS, embed_dims
from stages.runtime.errors import DudaError

MIT = SegFormerConfig(name="segformer", backbone="mit_b0", head="daformer", embedding_dim=16,
                      dropout=0.0, drop_path_rate=0.0)
MLP_HEAD = MIT.model_copy(update={"head": "segformer"})
DEEPLAB = DeepLabV2Config(backbone="resnet18", width_multiplier=0.25, dropout=0.0,
                          normalization="imagenet_rgb")
runner = CliRunner()


@functools.cache
def _built(config_json: str, classes: int) -> torch.nn.Module:
    config = parse_model_config(json.loads(config_json))
    if config.name == "segformer" and config.backbone == MIT.backbone and (
            config, classes) != (MIT, 19):
        # The MiT's own initialisation is most of the cost: reuse the encoder, build the head.
        model = copy.deepcopy(_built(MIT.model_dump_json(), 19))
        model.config, model.num_classes = config, classes
        model.decode_head = HEADS[config.head](embed_dims(config.backbone), config, classes)
        return model
    with torch.device("meta"):
        model = build_model(config, classes)
    return model.to_empty(device="cpu")


def blank(config=MIT, classes: int = 19) -> torch.nn.Module:
    """A model of `config` with every tensor zero (a copy of one built once per config)."""
    model = copy.deepcopy(_built(config.model_dump_json(), classes))
    with torch.no_grad():
        for tensor in model.state_dict().values():
            tensor.zero_()
    return model


def source_model(seed: int, config=MIT, classes: int = 19) -> torch.nn.Module:
    """A model of `config` with random values in every float tensor."""
    model = blank(config, classes)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(torch.randn(tensor.shape, generator=generator))
    return model


def assert_same(a: torch.nn.Module | dict, b: torch.nn.Module, prefix: str = "") -> None:
    theirs = a if isinstance(a, dict) else a.state_dict()
    for key, value in b.state_dict().items():
        if key.startswith(prefix) and not key.endswith("num_batches_tracked"):
            assert torch.equal(theirs[key], value), key


def prefixed(model: torch.nn.Module, prefix: str, only: str = "") -> dict[str, torch.Tensor]:
    return {prefix + key: value for key, value in model.state_dict().items()
            if key.startswith(only)}


def nvlabs_mit(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """NVlabs' mit_b0.pth layout: the encoder's tensors without `backbone.`, and the ImageNet
    classifier `head`."""
    state = {key.removeprefix("backbone."): value for key, value in model.state_dict().items()
             if key.startswith("backbone.")}
    state["head.weight"], state["head.bias"] = torch.zeros(1000, 256), torch.zeros(1000)
    return state


@pytest.fixture(scope="module")
def student() -> torch.nn.Module:
    return source_model(1)


@pytest.fixture(scope="module")
def teacher() -> torch.nn.Module:
    return source_model(2)


@pytest.fixture(scope="module")
def daformer_file(student, teacher, tmp_path_factory) -> Path:
    """A DAFormer checkpoint as mmcv writes it: meta of plain values, the UDA wrapper's state
    dict (student, EMA teacher, ImageNet feature-distance model), the optimizer state."""
    state = {**prefixed(student, "model."), **prefixed(teacher, "ema_model."),
             **prefixed(source_model(3), "imnet_model.")}
    meta = {"CLASSES": ("road", "sidewalk"), "PALETTE": [[128, 64, 128], [244, 35, 232]],
            "iter": 40000, "mmcv_version": "1.3.7", "config": "uda = dict(type='DACS')"}
    optimizer = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(2)}},
                 "param_groups": [{"lr": 6e-5, "params": [0]}]}
    path = tmp_path_factory.mktemp("daformer") / "iter_40000.pth"
    torch.save({"meta": meta, "state_dict": state, "optimizer": optimizer}, path)
    return path


# ------------------------------------------------------------------------------- the formats


def test_nvlabs_imagenet_mit_loads_the_encoder_and_the_decode_head_keeps_its_init(
        tmp_path: Path, student) -> None:
    torch.save(nvlabs_mit(student), tmp_path / "mit_b0.pth")
    target = source_model(9)
    head_before = {key: value.clone() for key, value in target.state_dict().items()
                   if key.startswith("decode_head.")}
    report = import_weights(target, tmp_path / "mit_b0.pth")
    assert (report.format, report.lineage, report.model, report.weights) == (
        "mit", "mit", "segformer", None)
    assert_same(student, target, "backbone.")
    for key, value in target.state_dict().items():
        if key.startswith("decode_head."):
            assert torch.equal(value, head_before[key]), key
    backbone = [key for key in target.state_dict() if key.startswith("backbone.")]
    assert len(report.mapped) == len(backbone) == 176  # stage 4 (sr ratio 1) has no attn.sr
    assert ("block1.0.attn.q.weight", "backbone.block1.0.attn.q.weight") in report.mapped
    assert ("norm4.bias", "backbone.norm4.bias") in report.mapped
    assert report.unused == [("head.weight", "ImageNet classification layer"),
                             ("head.bias", "ImageNet classification layer")]
    assert report.missing and all(key.startswith("decode_head.") for key in report.missing)
    assert "the decode head keeps its random initialisation" in report.notes
    assert "BN running statistics" not in " ".join(report.notes)  # the MiT has LayerNorm only
    assert "NVlabs' ImageNet MiT encoder" in report.summary()
    assert "176 tensors (backbone), 2 unused" in report.summary()


def test_a_daformer_checkpoint_gives_the_teacher_by_default_and_the_student_when_asked(
        daformer_file: Path, student, teacher) -> None:
    target = blank()
    report = import_weights(target, daformer_file)
    assert (report.format, report.lineage, report.weights) == ("daformer", "mit", "teacher")
    assert_same(teacher, target)
    size = len(teacher.state_dict())
    assert len(report.mapped) == size and report.missing == []
    reasons = {}
    for key, reason in report.unused:
        reasons.setdefault(key.split(".")[0], set()).add(reason)
    assert {key: len(value) for key, value in reasons.items()} == {"model": 1, "imnet_model": 1}
    assert reasons["model"] == {("the student; pass --weights student (duda import-checkpoint) "
                                 "or set model.init_weights: student to load it instead")}
    assert "feature-distance" in reasons["imnet_model"].pop()
    assert len(report.unused) == 2 * size
    assert report.summary().startswith("the teacher of a DAFormer")

    target = blank()
    report = import_weights(target, daformer_file, weights="student")
    assert report.weights == "student"
    assert_same(student, target)
    assert any(reason.startswith("the EMA teacher; pass --weights teacher")
               for _, reason in report.unused)

    # model.init with model.init_weights: student, as warmup applies it
    config = MIT.model_copy(update={"init": str(daformer_file), "init_weights": "student"})
    target = blank(config)
    assert initialize(target, config).weights == "student"
    assert_same(student, target)


def test_a_source_only_daformer_checkpoint_gives_its_student_and_says_so(
        tmp_path: Path, student) -> None:
    torch.save({"meta": {"iter": 10}, "state_dict": prefixed(student, "model.")},
               tmp_path / "source_only.pth")
    target = blank()
    report = import_weights(target, tmp_path / "source_only.pth")  # the teacher is asked
    assert report.weights == "student" and report.unused == []
    assert_same(student, target)
    assert any("holds no EMA teacher" in note and "student (model.*) was loaded" in note
               for note in report.notes)


def test_daformers_segformer_head_leaves_its_mmseg_conv_seg_unused(tmp_path: Path) -> None:
    source = source_model(4, MLP_HEAD)
    state = dict(source.state_dict())
    state["decode_head.conv_seg.weight"] = torch.zeros(19, 16, 1, 1)
    state["decode_head.conv_seg.bias"] = torch.zeros(19)
    torch.save({"state_dict": state}, tmp_path / "segformer.pth")  # a bare mmseg segmentor
    target = blank(MLP_HEAD)
    report = import_weights(target, tmp_path / "segformer.pth")
    assert report.format == "daformer" and report.weights is None
    assert_same(source, target)
    assert [key for key, _ in report.unused] == ["decode_head.conv_seg.weight",
                                                 "decode_head.conv_seg.bias"]
    assert "leaves unused (it predicts with linear_pred)" in report.unused[0][1]


def test_detect_format_of_both_families() -> None:
    assert detect_format(["patch_embed1.proj.weight", "block1.0.attn.q.weight",
                          "head.weight"]) == "mit"
    assert detect_format(["model.backbone.patch_embed1.proj.weight",
                          "ema_model.decode_head.conv_seg.weight"]) == "daformer"
    assert detect_format(["backbone.patch_embed1.proj.weight",
                          "decode_head.embed_layers.0.proj.weight"]) == "duda"
    # the DeepLab formats as before
    assert detect_format(["Scale.conv1.weight"]) == "deeplab_init"
    assert detect_format(["conv1.weight", "layer1.0.conv1.weight", "fc.weight"]) == "torchvision"
    assert detect_format(["backbone.conv1.weight", "decoder.aspp.conv2d_list.0.weight"]
                         ) == "duda_reference"
    assert detect_format(["backbone.conv1.weight", "backbone.fc.weight"]) == "iast"
    assert detect_format(["backbone.conv1.weight", "classifier.branches.0.weight"]) == "duda"
    with pytest.raises(DudaError) as error:
        detect_format(["layers.0.0.projection.weight", "layers.0.1.0.attn.attn.in_proj_weight"])
    assert "mmsegmentation ≥ 0.17" in error.value.message and "mit_b0.pth" in error.value.fix


# ----------------------------------------------------------------------- duda checkpoints, CLI


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "mit.yaml"
    model = {"name": "segformer", "backbone": "mit_b0", "head": "daformer", "embedding_dim": 16}
    sizes = {**TINY_CONFIG["input"], "crop_size": [32, 64]}  # a MiT needs 32 pixels each way
    path.write_text(yaml.safe_dump({"experiment": "import", "seed": 0, "model": model,
                                    "data": TINY_CONFIG["data"], "input": sizes}))
    return path


def invoke(source: Path, out: Path, config: Path, *extra: str):
    return runner.invoke(app, ["import-checkpoint", str(source), "-c", str(config), "--out",
                               str(out), *extra])


def test_a_duda_segformer_checkpoint_round_trip(tmp_path: Path, config_file: Path, student,
                                               teacher) -> None:
    write_model_file(tmp_path / MODEL_FILE, student=student, teacher=teacher, model_config=MIT,
                     class_names=CITYSCAPES_CLASSES, iteration=7)
    target = blank()
    report = import_weights(target, tmp_path / MODEL_FILE)
    assert (report.format, report.lineage, report.weights) == ("duda", "duda", "teacher")
    assert report.source.startswith("the teacher of duda checkpoint")
    assert_same(teacher, target)
    target = blank(MIT.model_copy(update={"init_weights": "student"}))
    assert import_weights(target, tmp_path / MODEL_FILE).weights == "student"
    assert_same(student, target)

    result = invoke(tmp_path / MODEL_FILE, tmp_path / "imported", config_file,
                    "--weights", "student", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)["summary"]
    assert (summary["format"], summary["weights"], summary["mapped"]) == (
        "duda", "student", len(student.state_dict()))
    saved = load_torch(tmp_path / "imported" / MODEL_FILE)
    assert saved["class_names"] == list(CITYSCAPES_CLASSES)
    assert_same(saved["student"], student)
    assert_same(saved["teacher"], student)


def test_import_checkpoint_of_a_daformer_file_records_the_family_and_the_choice(
        tmp_path: Path, config_file: Path, daformer_file: Path, student) -> None:
    result = invoke(daformer_file, tmp_path / "student", config_file, "--weights", "student",
                    "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)["summary"]
    assert (summary["model"], summary["backbone"], summary["head"]) == (
        "segformer", "mit_b0", "daformer")
    assert "style" not in summary
    assert (summary["format"], summary["lineage"], summary["weights"]) == (
        "daformer", "mit", "student")
    assert summary["mapped"] == len(student.state_dict()) and summary["missing"] == []
    saved = load_torch(tmp_path / "student" / MODEL_FILE)
    assert saved["model_config"]["name"] == "segformer"
    assert_same(saved["teacher"], student)
    assert load_artifact(tmp_path / "student", CHECKPOINT).stage == "import_checkpoint"

    table = invoke(daformer_file, tmp_path / "student", config_file, "--weights", "student")
    assert table.exit_code == 0 and "up to date" in table.stderr
    shown = " ".join(table.stderr.split())
    assert "imported the student of a DAFormer" in shown
    assert "the EMA teacher; pass --weights teacher" in shown and "feature-distance" in shown


def test_import_checkpoint_refuses_deeplab_weights_and_bad_options_for_a_segformer(
        tmp_path: Path, config_file: Path, daformer_file: Path) -> None:
    resnet = {key: value for key, value in blank(DEEPLAB).state_dict().items()
              if key.startswith("backbone.")}
    torch.save({key.removeprefix("backbone."): value for key, value in resnet.items()},
               tmp_path / "resnet18.pth")
    for source, extra, expected in (
            (tmp_path / "resnet18.pth", (), ("format torchvision), weights of the DeepLabV2 "
                                             "family, but model.name is segformer")),
            (daformer_file, ("--zero-aspp-branches", "2,3"), "model.name is segformer"),
            (daformer_file, ("--weights", "ema"), "unknown --weights 'ema'")):
        result = invoke(source, tmp_path / "out", config_file, *extra)
        assert result.exit_code == 2, result.output
        assert expected in " ".join(result.stderr.split())
        assert "Traceback" not in result.output and not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------- refusals


def refusal(model: torch.nn.Module, path: Path, **kwargs) -> DudaError:
    before = {key: value.clone() for key, value in model.state_dict().items()}
    with pytest.raises(DudaError) as error:
        import_weights(model, path, **kwargs)
    assert str(path) in error.value.message
    assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items())
    return error.value


def test_a_mit_b5_file_into_a_mit_b0_model_names_both(tmp_path: Path) -> None:
    # NVlabs' mit_b5.pth layout: 64 channels in stage 1, 3, 6, 40 and 3 blocks (values tiny)
    state = {"patch_embed1.proj.weight": torch.zeros(64, 3, 7, 7), "norm4.weight": torch.zeros(1),
             "head.weight": torch.zeros(1000, 512)}
    for stage, depth in enumerate((3, 6, 40, 3), start=1):
        for block in range(depth):
            state[f"block{stage}.{block}.norm1.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "mit_b5.pth")
    error = refusal(blank(), tmp_path / "mit_b5.pth")
    assert "look like mit_b5 (block3 has 40 blocks, mit_b0's 2) but model.backbone is mit_b0" \
        in error.message
    assert error.fix.startswith("set model.backbone: mit_b5")


def test_weights_of_one_family_are_refused_by_a_model_of_the_other(tmp_path: Path,
                                                                   student) -> None:
    torch.save(nvlabs_mit(student), tmp_path / "mit_b0.pth")
    error = refusal(blank(DEEPLAB), tmp_path / "mit_b0.pth")
    assert "(format mit), weights of the SegFormer family, but model.name is deeplabv2" \
        in error.message
    assert error.fix.startswith("set model.name: segformer and model.backbone: mit_b0")

    write_model_file(tmp_path / "segformer.pt", student=student, teacher=None, model_config=MIT,
                     class_names=[str(i) for i in range(19)], iteration=1)
    error = refusal(blank(DEEPLAB), tmp_path / "segformer.pt")
    assert ("holds a SegFormer mit_b0 with the daformer head, the config asks for a DeepLabV2 "
            "resnet18 (width × 0.25)") in error.message
    assert "set model.name: segformer, model.backbone: mit_b0, model.head: daformer" in error.fix

    write_model_file(tmp_path / "deeplab.pt", student=blank(DEEPLAB), teacher=None,
                     model_config=DEEPLAB, class_names=[str(i) for i in range(19)], iteration=1)
    error = refusal(blank(), tmp_path / "deeplab.pt")
    assert "holds a DeepLabV2 resnet18 (width × 0.25), the config asks for a SegFormer" \
        in error.message

    wider = MIT.model_copy(update={"embedding_dim": 32})
    error = refusal(blank(wider), tmp_path / "segformer.pt")
    assert ("computes another function than the config describes: model.embedding_dim 16 "
            "(checkpoint) vs 32 (config)") in error.message


def test_another_head_embedding_or_class_count_is_named(daformer_file: Path) -> None:
    error = refusal(blank(MLP_HEAD), daformer_file)
    assert "hold the daformer head (decode_head.embed_layers.*) but model.head is segformer" \
        in error.message and error.fix.startswith("set model.head: daformer")
    error = refusal(blank(MIT.model_copy(update={"embedding_dim": 32})), daformer_file)
    assert "embed each stage to 16 channels but model.embedding_dim is 32" in error.message
    error = refusal(blank(classes=7), daformer_file)
    assert "do not fit the model (SegFormer mit_b0 with the daformer head, 7 classes)" \
        in error.message
    assert "decode_head.conv_seg.weight: file (19, 16, 1, 1) vs model (7, 16, 1, 1)" \
        in error.message


def test_a_training_checkpoint_whose_meta_weights_only_refuses_says_so(tmp_path: Path,
                                                                       student) -> None:
    torch.save({"meta": {"hook_msgs": {"best_score": np.float64(0.5)}},
                "state_dict": prefixed(student, "model.")}, tmp_path / "best.pth")
    error = refusal(blank(), tmp_path / "best.pth")
    assert "holds Python objects (numpy." in error.message and "could run code" in error.message
    assert "['state_dict']" in error.fix
