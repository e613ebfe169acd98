"""The SegFormer family (`model.name: segformer`): the config choice, the model, and a
warmup → generate-pseudo → self-train → evaluate chain with exact resume."""

from __future__ import annotations

import builtins
import json
import re
from pathlib import Path

import pytest
import torch
from conftest import TINY_CONFIG, make_index, store_labels
from typer.testing import CliRunner

from duda_cli.app import app
from stages import evaluate, generate_pseudo, self_train, warmup
from stages.artifacts.checkpoint import load_model, load_torch
from stages.config import (
    Config,
    DeepLabV2Config,
    SegFormerConfig,
    apply_overrides,
    load_config,
    parse_model_config,
    stage_hash,
)
from stages.nn.model import build_model, parameter_groups
from stages.runtime.errors import DudaError
from tests.test_self_train import InterruptAt, assert_same_runs
from tests.test_warmup import Interrupt, InterruptingReporter, assert_same_checkpoints

ROOT = Path(__file__).resolve().parents[1]
TINY_MIT = {"name": "segformer", "backbone": "mit_b0", "head": "daformer", "embedding_dim": 16}


def mit_config(**model) -> Config:
    """The tiny config with a MiT-B0 and DAFormer's AdamW in both training stages."""
    raw = apply_overrides(TINY_CONFIG, [
        "warmup.optimizer={name: adamw, lr: 1.0e-3, warmup_iterations: 1}",
        "self_train.optimizer={name: adamw, lr: 1.0e-3, warmup_iterations: 1}"])
    raw["model"] = {**TINY_MIT, **model}
    raw["input"]["crop_size"] = [32, 64]  # a MiT needs 32 pixels each way
    return Config.model_validate(raw)


# ----------------------------------------------------------------------------------- config


def test_a_model_section_without_a_name_is_deeplabv2_and_keeps_its_hash():
    config = Config.model_validate(TINY_CONFIG)
    assert isinstance(config.model, DeepLabV2Config) and config.model.name == "deeplabv2"
    named = Config.model_validate(apply_overrides(TINY_CONFIG, ["model.name=deeplabv2"]))
    for stage in ("warmup", "self_train"):
        assert stage_hash(named, stage) == stage_hash(config, stage)
    # A checkpoint written before the choice records no name and parses as DeepLabV2.
    assert parse_model_config({"backbone": "resnet18"}).name == "deeplabv2"


def test_segformer_is_chosen_by_name_with_its_defaults():
    config = Config.model_validate(apply_overrides(TINY_CONFIG, [
        "model=segformer", "input.crop_size=[32, 64]"]))
    model = config.model
    assert isinstance(model, SegFormerConfig)
    assert (model.backbone, model.head, model.embedding_dim) == ("mit_b5", "daformer", 256)
    assert model.normalization == "imagenet_rgb" and model.init_weights == "teacher"
    assert stage_hash(config, "warmup") != stage_hash(Config.model_validate(TINY_CONFIG),
                                                      "warmup")


def test_a_deeplab_key_under_segformer_names_the_variant(tmp_path):
    path = tmp_path / "bad.yaml"
    raw = {**TINY_CONFIG, "model": {**TINY_MIT, "style": "caffe"}}
    path.write_text(json.dumps(raw))
    with pytest.raises(DudaError) as raised:
        load_config(path)
    text = str(raised.value)
    assert "model.segformer.style" in text and "embedding_dim" in text


def test_a_crop_too_small_for_a_mit_is_refused_naming_the_key(tmp_path):
    path = tmp_path / "small.yaml"
    path.write_text(json.dumps({**TINY_CONFIG, "model": TINY_MIT}))  # crops of 24×48
    with pytest.raises(DudaError, match=r"input.crop_size \[24, 48\] is too small for a MiT"):
        load_config(path)


def test_imagenet_init_is_refused_for_a_mit_encoder():
    with pytest.raises(ValueError, match="mit_b0.pth"):
        parse_model_config({**TINY_MIT, "init": "imagenet"})


# ------------------------------------------------------------------------------------ model


@pytest.mark.parametrize("head", ["daformer", "segformer"])
def test_each_head_gives_logits_at_input_size_under_the_published_names(head):
    torch.manual_seed(0)
    model = build_model(parse_model_config({**TINY_MIT, "head": head}), 19)
    x = torch.randn(2, 3, 40, 72)
    logits = model(x)
    assert logits.shape == (2, 19, 40, 72)
    names = list(model.state_dict())
    assert "backbone.patch_embed1.proj.weight" in names and "backbone.norm4.bias" in names
    if head == "daformer":
        assert {"decode_head.embed_layers.3.proj.weight",
                "decode_head.fuse_layer.aspp_modules.0.conv.weight",
                "decode_head.fuse_layer.aspp_modules.1.depthwise_conv.conv.weight",
                "decode_head.fuse_layer.bottleneck.bn.running_var",
                "decode_head.conv_seg.weight"} <= set(names)
    else:
        assert {"decode_head.linear_c.0.proj.weight", "decode_head.linear_fuse.bn.weight",
                "decode_head.linear_pred.bias"} <= set(names)
    assert all(name.startswith(("backbone.", "decode_head.")) for name in names)
    # The encoder has LayerNorm only; every BatchNorm is the head's.
    batchnorms = [name for name, module in model.named_modules()
                  if isinstance(module, torch.nn.BatchNorm2d)]
    assert batchnorms and all(name.startswith("decode_head.") for name in batchnorms)


def test_adamw_groups_split_the_encoder_from_the_head_and_spare_the_norms():
    model = build_model(parse_model_config(TINY_MIT), 19)
    groups = {group["name"]: group for group in parameter_groups(
        model, 6e-5, 1.0, 0.01, head_lr_multiplier=10.0, no_decay=("norm", "pos_block"))}
    assert set(groups) == {"backbone", "backbone_no_decay", "head"}
    assert groups["backbone"]["lr"] == pytest.approx(6e-5)
    assert groups["head"]["lr"] == pytest.approx(6e-4)
    assert groups["backbone_no_decay"]["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    undecayed = {names[id(p)] for p in groups["backbone_no_decay"]["params"]}
    assert "backbone.norm1.weight" in undecayed and "backbone.block1.0.attn.norm.bias" in undecayed
    assert not any("norm" in names[id(p)] for p in groups["backbone"]["params"])


def test_the_meta_device_builds_the_model_without_weights():
    with torch.device("meta"):
        model = build_model(parse_model_config(TINY_MIT), 19)
    assert {parameter.device.type for parameter in model.parameters()} == {"meta"}


def test_a_missing_library_names_the_extra(monkeypatch, tmp_path):
    real_import = builtins.__import__

    def without_smp(name, *args, **kwargs):
        if name.startswith("segmentation_models_pytorch"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_smp)
    with pytest.raises(DudaError) as raised:
        build_model(parse_model_config(TINY_MIT), 19)
    assert "segmentation-models-pytorch" in raised.value.message
    assert "pip install -e '.[segformer]'" in raised.value.fix

    # Through the command line: exit 2, the extra named, no traceback, nothing written.
    data = make_index(tmp_path / "data")
    config = tmp_path / "mit.yaml"
    config.write_text(json.dumps({**TINY_CONFIG, "model": TINY_MIT,
                                  "input": {**TINY_CONFIG["input"], "crop_size": [32, 64]}}))
    result = CliRunner().invoke(app, ["warmup", "-c", str(config), "--data", str(data),
                                      "--out", str(tmp_path / "w"), "--device", "cpu"])
    assert result.exit_code == 2, result.output
    assert "[segformer]" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "w").exists()


# ---------------------------------------------------------------------------------- stages


@pytest.fixture(scope="module")
def mit_chain(tmp_path_factory) -> dict[str, Path]:
    """A MiT-B0 warmup (2 steps, checkpoint after the first) and its pseudo labels."""
    root = tmp_path_factory.mktemp("mit")
    config = mit_config().model_copy(update={"warmup": mit_config().warmup.model_copy(
        update={"iterations": 2, "checkpoint_every": 1})})
    data = make_index(root / "data")
    checkpoint = warmup.run(config, data, root / "warmup", device="cpu").path
    pseudo = generate_pseudo.run(config, data, checkpoint, root / "pseudo", device="cpu").path
    return {"data": data, "checkpoint": checkpoint, "pseudo": pseudo, "root": root,
            "config": config}


def test_mit_warmup_trains_and_resumes_bit_identically(mit_chain, tmp_path):
    config = mit_chain["config"]
    straight = mit_chain["checkpoint"]
    saved = load_torch(straight / "model.pt")
    assert saved["model_config"]["name"] == "segformer"
    torch.manual_seed(config.seed)
    state = load_torch(straight / "train_state.pt")
    assert {"exp_avg", "exp_avg_sq"} <= set(state["optimizer"]["state"][0])

    with pytest.raises(Interrupt):
        warmup.run(config, mit_chain["data"], tmp_path / "resumed", device="cpu",
                   reporter=InterruptingReporter(after=2))
    assert load_torch(tmp_path / "resumed" / "train_state.pt")["progress"]["iteration"] == 1
    resumed = warmup.run(config, mit_chain["data"], tmp_path / "resumed", resume=True,
                         device="cpu").path
    assert_same_checkpoints(straight, resumed)


def test_mit_self_train_resumes_bit_identically_and_evaluates(mit_chain, tmp_path):
    config = mit_chain["config"].model_copy(update={
        "self_train": mit_chain["config"].self_train.model_copy(
            update={"iterations": 2, "checkpoint_every": 1, "offline_start": 1})})
    args = (config, mit_chain["data"], mit_chain["checkpoint"], mit_chain["pseudo"])
    straight = self_train.run(*args, tmp_path / "straight", device="cpu")
    with pytest.raises(KeyboardInterrupt):
        self_train.run(*args, tmp_path / "resumed", device="cpu", reporter=InterruptAt(2))
    resumed = self_train.run(*args, tmp_path / "resumed", device="cpu", resume=True)
    assert_same_runs(straight.path, resumed.path)
    assert store_labels(straight.path / "pseudo").shape[0] == 6

    loaded = load_model(straight.path)
    assert loaded.model_config.name == "segformer" and loaded.which == "teacher"
    result = evaluate.run(config, mit_chain["data"], straight.path, tmp_path / "eval",
                          device="cpu")
    assert 0.0 <= result.manifest.summary["miou"] <= 1.0


def test_a_deeplab_checkpoint_is_refused_by_a_segformer_self_train(mit_chain, prepared,
                                                                   tmp_path):
    config = mit_config()
    with pytest.raises(DudaError) as raised:
        self_train.run(config, prepared["data"], prepared["checkpoint"], prepared["pseudo"],
                       tmp_path / "run", device="cpu")
    assert re.search(r"DeepLabV2 resnet18.*SegFormer mit_b0", raised.value.message)
    assert "model.name" in raised.value.fix
    assert not (tmp_path / "run").exists()
