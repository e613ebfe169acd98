"""DeepLabV2: output size and stride, the two ResNet layouts, frozen BN affine, parameter groups."""

from __future__ import annotations

import pytest
import torch
import torchvision
from pydantic import ValidationError
from torch import nn

from stages.config import DeepLabV2Config
from stages.nn.model import build_model, parameter_groups

TINY = DeepLabV2Config(backbone="resnet18", width_multiplier=0.25, dropout=0.1)


def test_logits_come_back_at_the_input_size() -> None:
    model = build_model(TINY, 19).eval()
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 32, 64))
    assert logits.shape == (2, 19, 32, 64)
    assert logits.dtype == torch.float32


@pytest.mark.parametrize("size, features", [((32, 64), (4, 8)), ((65, 113), (9, 15)),
                                            ((128, 256), (16, 32))])
def test_resnet18_backbone_has_output_stride_8(size: tuple[int, int],
                                               features: tuple[int, int]) -> None:
    model = build_model(TINY, 5).eval()
    with torch.no_grad():
        out = model.features(torch.randn(1, 3, *size))
    assert out.shape == (1, 128, *features)  # 512 channels × 0.25


def test_resnet50_backbone_has_output_stride_8_and_2048_channels() -> None:
    model = build_model(DeepLabV2Config(backbone="resnet50", dropout=0.0), 3).eval()
    with torch.no_grad():
        out = model.features(torch.randn(1, 3, 64, 64))
    assert out.shape == (1, 2048, 8, 8)


def test_layer3_and_layer4_are_dilated_2_and_4() -> None:
    model = build_model(TINY, 19)
    backbone = model.backbone
    # torchvision layout: the first block of a dilated layer keeps the previous dilation.
    assert backbone.layer3[0].conv1.dilation == (1, 1)
    assert backbone.layer3[1].conv2.dilation == (2, 2)
    assert backbone.layer3[1].conv2.padding == (2, 2)
    assert backbone.layer4[0].conv1.dilation == (2, 2)
    assert backbone.layer4[1].conv1.dilation == (4, 4)
    assert all(conv.stride == (1, 1) for conv in (backbone.layer3[0].conv1,
                                                   backbone.layer4[0].conv1))


def test_aspp_has_four_summed_branches_with_the_configured_rates() -> None:
    model = build_model(TINY, 7)
    branches = model.classifier.branches
    assert [conv.dilation[0] for conv in branches] == [6, 12, 18, 24]
    assert all(conv.bias is not None and conv.out_channels == 7 for conv in branches)
    feats = torch.randn(1, 128, 4, 8)
    expected = sum(conv(feats) for conv in branches)
    assert torch.allclose(model.classifier(feats), expected, atol=1e-6)


def test_resnet18_at_full_width_takes_a_torchvision_state_dict() -> None:
    model = build_model(DeepLabV2Config(backbone="resnet18"), 19)
    reference = torchvision.models.resnet18().state_dict()
    ours = {k.removeprefix("backbone."): v.shape for k, v in model.state_dict().items()
            if k.startswith("backbone.")}
    assert set(reference) - set(ours) == {"fc.weight", "fc.bias"}
    assert all(reference[k].shape == shape for k, shape in ours.items())


def test_frozen_bn_affine_is_excluded_from_the_groups_but_bn_uses_batch_statistics() -> None:
    model = build_model(TINY, 19)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(not p.requires_grad for m in norms for p in m.parameters())
    groups = parameter_groups(model, lr=0.01, backbone_lr_multiplier=0.1, weight_decay=2e-4)
    assert [g["name"] for g in groups] == ["backbone", "head"]
    grouped = {id(p) for g in groups for p in g["params"]}
    assert not grouped & {id(p) for m in norms for p in m.parameters()}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert grouped == trainable
    assert groups[0]["lr"] == pytest.approx(0.001) and groups[0]["base_lr"] == pytest.approx(0.001)
    assert groups[1]["lr"] == pytest.approx(0.01)
    assert all(g["weight_decay"] == 2e-4 for g in groups)
    head = {id(p) for p in model.classifier.parameters()}
    assert {id(p) for p in groups[1]["params"]} == head

    model.train()
    before = norms[0].running_mean.clone()
    model(torch.randn(2, 3, 32, 64) + 3.0)
    assert not torch.equal(before, norms[0].running_mean)


def test_unfrozen_bn_affine_is_trained_in_the_backbone_group() -> None:
    model = build_model(TINY.model_copy(update={"freeze_bn_affine": False}), 19)
    groups = parameter_groups(model, lr=0.01, backbone_lr_multiplier=0.1, weight_decay=0.0)
    assert id(model.backbone.bn1.weight) in {id(p) for p in groups[0]["params"]}


def test_forward_backward_reaches_the_backbone_and_the_head() -> None:
    torch.manual_seed(0)
    model = build_model(TINY, 19).train()
    logits = model(torch.randn(2, 3, 32, 64))
    loss = nn.functional.cross_entropy(logits, torch.randint(0, 19, (2, 32, 64)))
    loss.backward()
    assert model.backbone.conv1.weight.grad is not None
    assert model.backbone.conv1.weight.grad.abs().sum() > 0
    assert model.classifier.branches[3].weight.grad.abs().sum() > 0
    assert model.backbone.bn1.weight.grad is None


def test_dropout_zero_means_no_dropout_module() -> None:
    model = build_model(TINY.model_copy(update={"dropout": 0.0}), 19)
    assert not any(isinstance(m, nn.Dropout2d) for m in model.modules())
    model = build_model(TINY, 19)
    assert any(isinstance(m, nn.Dropout2d) and m.p == 0.1 for m in model.modules())


CAFFE50 = DeepLabV2Config(backbone="resnet50", style="caffe", dropout=0.0)


def test_caffe_layout_puts_the_stride_in_the_first_1x1_conv_and_dilates_every_block() -> None:
    backbone = build_model(CAFFE50, 19).backbone
    assert backbone.maxpool.ceil_mode is True
    for name, stride, dilation in (("layer1", 1, 1), ("layer2", 2, 1), ("layer3", 1, 2),
                                   ("layer4", 1, 4)):
        layer = getattr(backbone, name)
        assert layer[0].conv1.stride == (stride, stride), name
        assert layer[0].downsample[0].stride == (stride, stride), name
        assert all(block.downsample is None for block in layer[1:]), name
        for block in layer:
            assert block.conv2.stride == (1, 1), name
            assert block.conv2.dilation == (dilation, dilation), name
            assert block.conv2.padding == (dilation, dilation), name
        assert all(block.conv1.stride == (1, 1) for block in layer[1:]), name


def test_both_layouts_have_the_same_tensor_names_and_shapes() -> None:
    with torch.device("meta"):
        caffe = build_model(CAFFE50, 19).state_dict()
        torchvision_style = build_model(CAFFE50.model_copy(update={"style": "torchvision"}),
                                        19).state_dict()
    assert {k: v.shape for k, v in caffe.items()} == {k: v.shape
                                                     for k, v in torchvision_style.items()}
    assert "backbone.layer4.0.downsample.1.running_var" in caffe


@pytest.mark.parametrize("backbone", ["resnet101", "resnet50"])
@pytest.mark.parametrize("style, size, features", [
    ("caffe", (1024, 2048), (129, 257)), ("caffe", (512, 896), (65, 113)),
    ("torchvision", (1024, 2048), (128, 256)), ("torchvision", (512, 896), (64, 112))])
def test_feature_map_sizes_of_the_two_layouts(backbone: str, style: str, size: tuple[int, int],
                                              features: tuple[int, int]) -> None:
    # Shapes only, on the meta device: a full-size ResNet-101 forward is too slow for a test.
    with torch.device("meta"):
        model = build_model(DeepLabV2Config(backbone=backbone, style=style), 19)
        out = model.features(torch.empty(1, 3, *size))
        logits = model(torch.empty(1, 3, *size))
    assert tuple(out.shape) == (1, 2048, *features)
    assert tuple(logits.shape) == (1, 19, *size)


def test_caffe_style_is_refused_for_resnet18_with_the_fix() -> None:
    with pytest.raises(ValidationError, match="set model.backbone to resnet50 or resnet101"):
        DeepLabV2Config(backbone="resnet18", style="caffe")


def test_a_stored_model_config_without_style_or_init_reads_as_torchvision_without_init() -> None:
    stored = DeepLabV2Config(backbone="resnet18").model_dump(mode="json")
    del stored["style"], stored["init"]
    config = DeepLabV2Config.model_validate(stored)
    assert config.style == "torchvision" and config.init == "none"


def test_imagenet_init_needs_the_torchvision_layout_and_rgb_inputs() -> None:
    ok = DeepLabV2Config(backbone="resnet50", normalization="imagenet_rgb", init="imagenet")
    assert ok.init == "imagenet"
    for bad in ({"backbone": "resnet50", "normalization": "caffe_bgr"},
                {"backbone": "resnet50", "normalization": "imagenet_rgb", "style": "caffe"},
                {"backbone": "resnet18", "normalization": "imagenet_rgb"}):
        with pytest.raises(ValidationError, match="model.style: torchvision and "
                                                  "model.normalization: imagenet_rgb"):
            DeepLabV2Config(init="imagenet", **bad)
    with pytest.raises(ValidationError, match="model.init is empty"):
        DeepLabV2Config(init=" ")
