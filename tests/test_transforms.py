"""Recorded crop parameters, the full-image→crop mapping
(docs/method.md#the-teachers-full-view-and-the-crop-mapping), normalisation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import default_collate

from stages.data.transforms import (
    CropParams,
    apply_crop,
    denormalize,
    full_to_crop,
    normalize,
    sample_crop_params,
)

BASE_H, BASE_W, CROP_H, CROP_W = 48, 96, 32, 56


def _smooth_image(height: int, width: int) -> torch.Tensor:
    """(3, H, W) float: slow, left-right asymmetric waves of amplitude ≤ 1 (period ≥ 40 px)."""
    y = torch.arange(height, dtype=torch.float32).view(-1, 1)
    x = torch.arange(width, dtype=torch.float32).view(1, -1)
    return torch.stack([
        torch.sin(2 * math.pi * x / 60.0 + 0.3) * torch.ones_like(y),
        torch.cos(2 * math.pi * (x / 80.0 + y / 50.0)),
        x / width - y / (2 * height),
    ])


def _params_list(seed: int, count: int) -> list[CropParams]:
    rng = np.random.default_rng(seed)
    return [sample_crop_params(rng, BASE_H, BASE_W, CROP_H, CROP_W) for _ in range(count)]


def test_crop_params_round_trip_and_collate() -> None:
    params = _params_list(0, 4)
    rows = default_collate([p.to_tensor() for p in params])
    assert rows.shape == (4, 7) and rows.dtype == torch.int64
    assert [CropParams.from_tensor(row) for row in rows] == params


def test_sampled_params_stay_inside_and_are_reproducible() -> None:
    params = _params_list(1, 500)
    assert params == _params_list(1, 500)
    for p in params:
        assert p.crop_h == CROP_H and p.crop_w == CROP_W
        assert CROP_H <= p.scaled_h <= math.floor(1.6 * BASE_H)
        assert CROP_W <= p.scaled_w <= math.floor(1.6 * BASE_W)
        assert 0 <= p.y1 <= p.scaled_h - CROP_H and 0 <= p.x1 <= p.scaled_w - CROP_W
    flips = sum(p.flip for p in params) / len(params)
    assert flips == pytest.approx(0.5, abs=0.08)


def test_sampled_scale_is_raised_to_the_crop_size() -> None:
    rng = np.random.default_rng(0)
    p = sample_crop_params(rng, 40, 40, 40, 40, scale_range=(0.51, 0.52), flip_probability=0.0)
    assert (p.scaled_h, p.scaled_w, p.y1, p.x1, p.flip) == (40, 40, 0, 0, False)


def test_apply_crop_shapes_and_label_follow_image() -> None:
    image = _smooth_image(BASE_H, BASE_W)
    # Label = left half 1, right half 2: after a flip, the crop's left side shows the right half.
    label = torch.ones(BASE_H, BASE_W, dtype=torch.uint8)
    label[:, BASE_W // 2:] = 2
    params = CropParams(scaled_h=48, scaled_w=96, y1=0, x1=20, crop_h=32, crop_w=56, flip=True)
    image_crop, label_crop = apply_crop(image, label, params)
    assert image_crop.shape == (3, 32, 56) and label_crop.shape == (32, 56)
    assert label_crop.dtype == torch.uint8
    # Unscaled: columns 20..75, flipped; column 75 (label 2) comes first, column 20 last.
    assert torch.allclose(image_crop, image[:, :32, 20:76].flip(-1), atol=1e-6)
    assert label_crop[0, 0] == 2 and label_crop[0, -1] == 1
    assert set(label_crop.unique().tolist()) == {1, 2}
    _, none = apply_crop(image, None, params)
    assert none is None


def test_nearest_label_resize_keeps_class_ids_only() -> None:
    rng = np.random.default_rng(0)
    label = torch.from_numpy(rng.choice([0, 5, 255], size=(BASE_H, BASE_W)).astype(np.uint8))
    for params in _params_list(2, 10):
        _, label_crop = apply_crop(torch.zeros(3, BASE_H, BASE_W), label, params)
        assert set(label_crop.unique().tolist()) <= {0, 5, 255}


def _reference_full_to_crop(logits: torch.Tensor, params: list[CropParams]) -> torch.Tensor:
    """docs/method.md#the-teachers-full-view-and-the-crop-mapping literally: resize the whole map
    (align_corners=True), slice, flip."""
    out = []
    for i, p in enumerate(params):
        scaled = F.interpolate(logits[i:i + 1], size=(p.scaled_h, p.scaled_w), mode="bilinear",
                               align_corners=True)
        crop = scaled[:, :, p.y1:p.y1 + p.crop_h, p.x1:p.x1 + p.crop_w]
        out.append(crop.flip(-1) if p.flip else crop)
    return torch.cat(out)


@pytest.mark.parametrize("logit_size", [(BASE_H, BASE_W), (24, 48)])
def test_full_to_crop_equals_resize_slice_flip(logit_size: tuple[int, int]) -> None:
    params = _params_list(3, 6)
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5, *logit_size, generator=generator)
    expected = _reference_full_to_crop(logits, params)
    from_list = full_to_crop(logits, params)
    from_tensor = full_to_crop(logits, torch.stack([p.to_tensor() for p in params]))
    assert from_list.shape == (6, 5, CROP_H, CROP_W)
    # Same sampling points up to float32 rounding of the source coordinates (~1e-5 px).
    assert torch.allclose(from_list, expected, atol=1e-4)
    assert torch.equal(from_list, from_tensor)


def test_full_to_crop_of_the_image_matches_the_image_crop() -> None:
    """The teacher's full-image map lands on the student's crop pixel for pixel.

    The two paths differ by the resize convention (align_corners True vs False, with antialias
    when shrinking): at most about half a pixel of shift, so on these waves (slope ≤ 0.16 per
    pixel) the tolerance is 0.1 in the max and 0.01 on average. A wrong flip or offset gives
    errors near 1.
    """
    image = _smooth_image(BASE_H, BASE_W)
    params = _params_list(4, 16)
    assert any(p.flip for p in params) and not all(p.flip for p in params)
    crops = torch.stack([apply_crop(image, None, p)[0] for p in params])
    mapped = full_to_crop(image.expand(len(params), -1, -1, -1), params)
    difference = (mapped - crops).abs()
    assert difference.max().item() < 0.1
    assert difference.mean().item() < 0.01
    unflipped = [CropParams(p.scaled_h, p.scaled_w, p.y1, p.x1, p.crop_h, p.crop_w, not p.flip)
                 for p in params]
    wrong = (full_to_crop(image.expand(len(params), -1, -1, -1), unflipped) - crops).abs()
    assert wrong.max().item() > 0.5


def test_full_to_crop_rejects_mixed_crop_sizes() -> None:
    params = [CropParams(48, 96, 0, 0, 32, 56, False), CropParams(48, 96, 0, 0, 30, 56, False)]
    with pytest.raises(ValueError, match="one size"):
        full_to_crop(torch.zeros(2, 3, 48, 96), params)


def test_normalize_caffe_bgr_subtracts_bgr_means() -> None:
    pixel = np.array([[[10, 20, 30]]], dtype=np.uint8)  # R, G, B
    result = normalize(pixel, "caffe_bgr")
    expected = torch.tensor([30 - 104.00698793, 20 - 116.66876762, 10 - 122.67891434])
    assert result.shape == (3, 1, 1) and result.dtype == torch.float32
    assert torch.allclose(result.view(3), expected, atol=1e-4)


def test_normalize_imagenet_rgb() -> None:
    pixel = torch.tensor([255, 0, 128], dtype=torch.uint8).view(3, 1, 1)
    result = normalize(pixel, "imagenet_rgb").view(3)
    expected = torch.tensor([(1 - 0.485) / 0.229, (0 - 0.456) / 0.224, (128 / 255 - 0.406) / 0.225])
    assert torch.allclose(result, expected, atol=1e-5)


@pytest.mark.parametrize("mode", ["caffe_bgr", "imagenet_rgb"])
def test_normalize_numpy_and_tensor_agree_and_denormalize_inverts(mode: str) -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    from_numpy = normalize(image, mode)
    from_tensor = normalize(torch.from_numpy(image).permute(2, 0, 1), mode)
    assert torch.equal(from_numpy, from_tensor)
    restored = denormalize(from_numpy, mode)
    assert restored.dtype == np.uint8 and np.array_equal(restored, image)


def test_normalize_rejects_unknown_mode() -> None:
    with pytest.raises(ValueError, match="caffe_bgr"):
        normalize(np.zeros((2, 2, 3), np.uint8), "bgr")  # type: ignore[arg-type]
