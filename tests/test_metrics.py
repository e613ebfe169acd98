"""The confusion matrix and IoU / mIoU of docs/method.md#evaluation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stages.data.classes import PROTOCOLS
from stages.engine.metrics import ConfusionMatrix


def test_hand_computed_three_class_example() -> None:
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
    prediction = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 2]])
    cm = ConfusionMatrix(3)
    cm.update(prediction, target)
    # rows = ground truth, columns = prediction; the 255 pixel is dropped.
    assert cm.matrix.tolist() == [[1, 1, 0], [0, 2, 1], [1, 0, 1]]
    # class 0: I=1, U=2+2-1=3; class 1: I=2, U=3+3-2=4; class 2: I=1, U=2+2-1=3
    assert cm.iou().tolist() == pytest.approx([1 / 3, 2 / 4, 1 / 3])
    assert cm.miou() == pytest.approx((1 / 3 + 1 / 2 + 1 / 3) / 3)
    assert cm.pixel_accuracy() == pytest.approx(4 / 7)


def test_sums_over_the_split_not_per_image_means() -> None:
    cm = ConfusionMatrix(2)
    cm.update(torch.tensor([0, 0, 0, 0]), torch.tensor([0, 0, 0, 0]))  # image IoU_0 = 1
    cm.update(torch.tensor([1]), torch.tensor([0]))                    # image IoU_0 = 0
    assert cm.iou()[0].item() == pytest.approx(4 / 5)


def test_prediction_on_an_ignored_pixel_is_not_counted() -> None:
    cm = ConfusionMatrix(2)
    cm.update(torch.tensor([1, 1]), torch.tensor([255, 0]))
    assert cm.matrix.tolist() == [[0, 1], [0, 0]]


def test_absent_class_has_iou_zero_and_counts_in_the_mean() -> None:
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([0, 1]), torch.tensor([0, 1]))
    assert cm.iou().tolist() == pytest.approx([1.0, 1.0, 0.0])
    assert cm.present().tolist() == [True, True, False]
    assert cm.miou() == pytest.approx(2 / 3)


def _numpy_iou(preds: list[np.ndarray], targets: list[np.ndarray], n: int) -> np.ndarray:
    """The reference formula, written independently: histograms of I, pred and GT per image."""
    inter = np.zeros(n)
    area_pred = np.zeros(n)
    area_gt = np.zeros(n)
    for pred, gt in zip(preds, targets):
        pred = pred.copy()
        pred[gt == 255] = 255
        hit = pred[pred == gt]
        inter += np.bincount(hit[hit < n], minlength=n)
        area_pred += np.bincount(pred[pred < n], minlength=n)
        area_gt += np.bincount(gt[gt < n], minlength=n)
    return inter / (area_pred + area_gt - inter + 1e-10)


def test_matches_an_independent_numpy_computation_on_random_maps() -> None:
    rng = np.random.default_rng(0)
    n = 19
    preds, targets = [], []
    cm = ConfusionMatrix(n)
    for _ in range(5):
        gt = rng.integers(0, n, (2, 24, 40)).astype(np.int64)
        gt[rng.random(gt.shape) < 0.1] = 255
        gt[gt == 16] = 255  # one class never in the ground truth
        pred = rng.integers(0, n, gt.shape).astype(np.int64)
        pred[pred == 9] = 8  # one class never predicted
        preds.append(pred)
        targets.append(gt)
        cm.update(torch.from_numpy(pred), torch.from_numpy(gt))
    expected = _numpy_iou(preds, targets, n)
    assert np.allclose(cm.iou().numpy(), expected, atol=1e-12)
    for protocol in (19, 16, 13):
        classes = PROTOCOLS[protocol]
        assert cm.miou(classes) == pytest.approx(expected[list(classes)].mean(), abs=1e-12)


def test_16_and_13_class_protocols_are_subsets_of_the_19_class_vector() -> None:
    cm = ConfusionMatrix(19)
    # Perfect on every class except terrain (9), truck (14), train (16), which are missed:
    # their pixels are predicted as road (0), so road's IoU drops too.
    target = torch.arange(19).repeat_interleave(10)
    prediction = target.clone()
    prediction[(target == 9) | (target == 14) | (target == 16)] = 0
    cm.update(prediction, target)
    iou = cm.iou()
    assert iou[0].item() == pytest.approx(10 / 40)
    assert iou[9].item() == iou[14].item() == iou[16].item() == 0.0
    assert cm.miou(PROTOCOLS[16]) == pytest.approx((10 / 40 + 15) / 16)
    # 13 also drops wall (3), fence (4), pole (5)
    assert cm.miou(PROTOCOLS[13]) == pytest.approx((10 / 40 + 12) / 13)
    assert cm.miou_by_protocol({19: PROTOCOLS[19], 16: PROTOCOLS[16]}) == {
        "19": pytest.approx((10 / 40 + 15) / 19), "16": pytest.approx((10 / 40 + 15) / 16)}


def test_shape_mismatch_is_refused() -> None:
    with pytest.raises(ValueError, match="differ in shape"):
        ConfusionMatrix(2).update(torch.zeros(2, 3), torch.zeros(3, 2))
