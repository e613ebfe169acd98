"""Percentiles against numpy, online labels
(docs/method.md#online-pseudo-labels-and-the-alpha-schedule), docs/method.md#the-four-case-merge."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stages.method.pseudo_labels import (
    class_percentile_thresholds,
    merge_offline,
    offline_thresholds,
    online_pseudo_labels,
    percentile,
)

Q_VALUES = [0.0, 1.0, 12.5, 25.0, 30.0, 33.3, 50.0, 72.5, 80.0, 99.9, 100.0]


@pytest.mark.parametrize("size", [1, 2, 3, 7, 10, 101, 1000, 4099])
@pytest.mark.parametrize("q", Q_VALUES)
def test_percentile_equals_numpy(size: int, q: float) -> None:
    rng = np.random.default_rng(size * 1000 + int(q * 10))
    values = rng.random(size).astype(np.float32)
    result = percentile(torch.from_numpy(values), q)
    assert result.dtype == torch.float32 and result.dim() == 0
    assert result.item() == np.float32(np.percentile(values, q))


@pytest.mark.parametrize("q", Q_VALUES)
def test_percentile_with_duplicates_equals_numpy(q: float) -> None:
    rng = np.random.default_rng(7)
    values = rng.choice(np.array([0.1, 0.5, 0.5, 0.9], np.float32), size=333)
    assert percentile(torch.from_numpy(values), q).item() == np.float32(np.percentile(values, q))


def test_percentile_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        percentile(torch.rand(5), 101.0)
    with pytest.raises(ValueError):
        percentile(torch.empty(0), 50.0)


@pytest.mark.parametrize("q", Q_VALUES)
def test_class_percentiles_equal_numpy_per_class(q: float) -> None:
    rng = np.random.default_rng(int(q * 10))
    num_classes = 6
    # Class 4 is absent, class 5 has a single pixel, class 3 has many duplicated values.
    prediction = rng.choice([0, 1, 2, 3], size=(2, 17, 23))
    prediction[0, 0, 0] = 5
    confidence = rng.random((2, 17, 23)).astype(np.float32)
    confidence[prediction == 3] = np.round(confidence[prediction == 3], 1)
    thresholds = class_percentile_thresholds(
        torch.from_numpy(confidence), torch.from_numpy(prediction), num_classes, q,
        absent_value=-1.0,
    )
    assert thresholds.shape == (num_classes,) and thresholds.dtype == torch.float32
    for c in range(num_classes):
        members = confidence[prediction == c]
        expected = np.float32(np.percentile(members, q)) if members.size else -1.0
        assert thresholds[c].item() == expected, f"class {c}"


def test_class_percentiles_accept_per_class_q_and_float16() -> None:
    rng = np.random.default_rng(3)
    prediction = rng.integers(0, 3, size=500)
    confidence = rng.random(500).astype(np.float16)
    q = torch.tensor([10.0, 50.0, 95.0])
    thresholds = class_percentile_thresholds(
        torch.from_numpy(confidence), torch.from_numpy(prediction), 3, q
    )
    for c in range(3):
        members = confidence[prediction == c].astype(np.float32)
        assert thresholds[c].item() == np.float32(np.percentile(members, q[c].item()))


def test_class_percentiles_handle_negative_values_and_empty_input() -> None:
    confidence = torch.tensor([-2.0, -0.5, 0.0, 3.0, -1.0])
    prediction = torch.tensor([0, 0, 0, 0, 1])
    thresholds = class_percentile_thresholds(confidence, prediction, 2, 40.0)
    assert thresholds[0].item() == np.float32(np.percentile([-2.0, -0.5, 0.0, 3.0], 40.0))
    assert thresholds[1].item() == -1.0
    empty = class_percentile_thresholds(torch.empty(0), torch.empty(0, dtype=torch.long), 2, 5.0)
    assert torch.equal(empty, torch.zeros(2))


def _random_probabilities(seed: int, shape: tuple[int, int, int, int]) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.softmax(3.0 * torch.randn(shape, generator=generator), dim=1)


@pytest.mark.parametrize("alpha", [0.2, 0.45, 0.7])
def test_online_labels_keep_about_alpha_of_each_class(alpha: float) -> None:
    probabilities = _random_probabilities(0, (2, 5, 40, 60))
    labels, thresholds = online_pseudo_labels(probabilities, alpha)
    confidence, prediction = probabilities.max(dim=1)
    assert labels.dtype == torch.long and labels.shape == (2, 40, 60)
    kept = labels != 255
    assert torch.equal(labels[kept], prediction[kept])
    for c in range(5):
        predicted = prediction == c
        fraction = (kept & predicted).sum().item() / predicted.sum().item()
        # Percentile at 100·(1 − α) of n values keeps ⌈α·(n − 1)⌉ or so of them.
        assert fraction == pytest.approx(alpha, abs=2.0 / predicted.sum().item())
        # Thresholds are pooled over both images of the batch.
        expected = np.percentile(confidence[predicted].numpy(), 100 * (1 - alpha))
        assert thresholds[c].item() == np.float32(expected)


def test_online_labels_give_absent_class_threshold_zero() -> None:
    probabilities = torch.zeros(1, 3, 2, 2)
    probabilities[:, 0] = 0.9
    probabilities[:, 1] = 0.1
    labels, thresholds = online_pseudo_labels(probabilities, 0.5)
    assert thresholds[1].item() == 0.0 and thresholds[2].item() == 0.0
    assert torch.equal(labels, torch.zeros(1, 2, 2, dtype=torch.long))  # all ties → all kept


def test_offline_thresholds_are_capped() -> None:
    probabilities = torch.zeros(1, 3, 1, 4)
    probabilities[0, 0] = torch.tensor([0.995, 0.999, 0.9999, 0.996])
    probabilities[0, 1] = 1 - probabilities[0, 0]
    thresholds = offline_thresholds(probabilities, beta=0.25)
    assert thresholds[0].item() == pytest.approx(0.99)
    assert thresholds[1].item() == 0.0 and thresholds[2].item() == 0.0
    uncapped = offline_thresholds(probabilities, beta=0.25, cap=1.0)
    expected = np.percentile(probabilities[0, 0].numpy().ravel(), 75.0)
    assert uncapped[0].item() == np.float32(expected)


def test_merge_offline_follows_the_four_case_table() -> None:
    # Columns: ignore+confident, ignore+unsure, agree+confident, agree+unsure,
    #          disagree+confident, disagree+unsure.
    stored = torch.tensor([[255, 255, 1, 2, 1, 2]], dtype=torch.uint8)
    prediction = torch.tensor([[0, 0, 1, 2, 0, 1]])
    confidence = torch.tensor([[0.9, 0.1, 0.9, 0.1, 0.99, 0.1]])
    thresholds = torch.tensor([0.5, 0.5, 0.5])
    merged, stats = merge_offline(stored, prediction, confidence, thresholds)
    assert merged.dtype == torch.uint8
    assert merged.tolist() == [[0, 255, 1, 2, 255, 255]]
    assert stats["added"].tolist() == [1, 0, 0]
    assert stats["kept"].tolist() == [0, 1, 1]
    assert stats["dropped"].tolist() == [0, 1, 1]


def test_merge_offline_agreement_can_require_confidence() -> None:
    stored = torch.tensor([[255, 255, 1, 2, 1, 2]], dtype=torch.uint8)
    prediction = torch.tensor([[0, 0, 1, 2, 0, 1]])
    confidence = torch.tensor([[0.9, 0.1, 0.9, 0.1, 0.99, 0.1]])
    thresholds = torch.tensor([0.5, 0.5, 0.5])
    merged, stats = merge_offline(
        stored, prediction, confidence, thresholds, agree_requires_confidence=True
    )
    assert merged.tolist() == [[0, 255, 1, 255, 255, 255]]
    assert stats["added"].tolist() == [1, 0, 0]
    assert stats["kept"].tolist() == [0, 1, 0]
    assert stats["dropped"].tolist() == [0, 1, 2]


def test_merge_offline_threshold_is_inclusive_and_per_predicted_class() -> None:
    stored = torch.full((1, 2, 2), 255, dtype=torch.uint8)
    prediction = torch.tensor([[[0, 1], [0, 1]]])
    confidence = torch.tensor([[[0.5, 0.5], [0.4, 0.8]]])
    merged, stats = merge_offline(stored, prediction, confidence, torch.tensor([0.5, 0.7]))
    assert merged.tolist() == [[[0, 255], [255, 1]]]
    assert stats["added"].tolist() == [1, 1]


def test_merge_offline_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="same shape"):
        merge_offline(
            torch.zeros(1, 4, 4, dtype=torch.uint8),
            torch.zeros(1, 2, 2, dtype=torch.long),
            torch.zeros(1, 2, 2),
            torch.zeros(3),
        )
