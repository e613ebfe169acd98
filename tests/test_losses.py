"""Loss terms against hand-computed values on tiny hand-built tensors
(docs/method.md#the-losses)."""

from __future__ import annotations

import math

import pytest
import torch

from stages.nn.losses import (
    consistency_mse,
    cross_entropy,
    entropy_regularizer,
    kld_regularizer,
    symmetric_cross_entropy,
)

# Two classes, one image of 1×3 pixels. Pixel logits (0, 0), (ln 3, 0), (0, ln 4): softmax
# (1/2, 1/2), (3/4, 1/4), (1/5, 4/5).
LOGITS = torch.tensor([[[[0.0, math.log(3.0), 0.0]], [[0.0, 0.0, math.log(4.0)]]]])
PROBABILITIES = [(0.5, 0.5), (0.75, 0.25), (0.2, 0.8)]
LABELS = torch.tensor([[[0, 1, 255]]])
ALL_IGNORED = torch.full((1, 1, 3), 255)


def _leaf() -> torch.Tensor:
    return LOGITS.clone().requires_grad_(True)


def test_cross_entropy_is_mean_over_labelled_pixels() -> None:
    expected = (-math.log(0.5) - math.log(0.25)) / 2
    assert cross_entropy(LOGITS, LABELS).item() == pytest.approx(expected, rel=1e-6)


def test_cross_entropy_accepts_uint8_labels() -> None:
    expected = cross_entropy(LOGITS, LABELS)
    assert cross_entropy(LOGITS, LABELS.to(torch.uint8)).item() == pytest.approx(expected.item())


def test_symmetric_cross_entropy_matches_closed_form() -> None:
    ce = (-math.log(0.5) - math.log(0.25)) / 2
    # RCE per pixel = −log(1e-4)·(1 − p_y): pixel 0 p_y = 0.5, pixel 1 p_y = 0.25.
    rce = -math.log(1e-4) * ((1 - 0.5) + (1 - 0.25)) / 2
    value = symmetric_cross_entropy(LOGITS, LABELS, a=0.2, b=1.0)
    assert value.item() == pytest.approx(0.2 * ce + rce, rel=1e-6)
    assert symmetric_cross_entropy(LOGITS, LABELS, a=1.0, b=0.0).item() == pytest.approx(ce)


def test_symmetric_cross_entropy_applies_probability_clamp() -> None:
    # p_y = sigmoid(−30) ≈ 9e-14 is clamped to 1e-7 and p_other ≈ 1 stays 1:
    # RCE = −log(1e-4)·(p̃_other) with the clamped off-label probability 1.
    logits = torch.tensor([[[[30.0]], [[0.0]]]])
    labels = torch.tensor([[[1]]])
    value = symmetric_cross_entropy(logits, labels, a=0.0, b=1.0)
    assert value.item() == pytest.approx(-math.log(1e-4), rel=1e-6)


def test_consistency_mse_is_mean_over_all_elements() -> None:
    teacher = torch.zeros_like(LOGITS)  # softmax = 1/2 everywhere
    squared = [(p[0] - 0.5) ** 2 + (p[1] - 0.5) ** 2 for p in PROBABILITIES]
    expected = sum(squared) / 6  # B·C·H·W = 1·2·1·3
    assert consistency_mse(LOGITS, teacher).item() == pytest.approx(expected, rel=1e-6)


def test_consistency_mse_detaches_teacher() -> None:
    student, teacher = _leaf(), torch.zeros_like(LOGITS).requires_grad_(True)
    consistency_mse(student, teacher).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


def test_entropy_regularizer_uses_ignored_pixels_only() -> None:
    # Only pixel 2 (probabilities 0.2, 0.8) is ignored; |I| = 1, C = 2.
    entropy = -(0.2 * math.log(0.2 + 1e-8) + 0.8 * math.log(0.8 + 1e-8))
    assert entropy_regularizer(LOGITS, LABELS).item() == pytest.approx(entropy / 2, rel=1e-6)


def test_kld_regularizer_uses_labelled_pixels_only() -> None:
    # Pixels 0 and 1 are labelled; per pixel Σ_c −(1/C)·log p_c; divided by |L|·C = 4.
    per_pixel = [-(math.log(p[0]) + math.log(p[1])) / 2 for p in PROBABILITIES[:2]]
    expected = sum(per_pixel) / (2 * 2)
    assert kld_regularizer(LOGITS, LABELS).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize(
    "loss",
    [cross_entropy, symmetric_cross_entropy, kld_regularizer],
    ids=["cross_entropy", "symmetric_cross_entropy", "kld_regularizer"],
)
def test_losses_on_labelled_pixels_are_zero_when_all_ignored(loss) -> None:
    logits = _leaf()
    value = loss(logits, ALL_IGNORED)
    assert value.item() == 0.0 and not torch.isnan(value)
    value.backward()
    assert logits.grad is not None and torch.equal(logits.grad, torch.zeros_like(logits))


def test_entropy_regularizer_is_zero_when_nothing_ignored() -> None:
    logits = _leaf()
    value = entropy_regularizer(logits, torch.zeros(1, 1, 3, dtype=torch.long))
    assert value.item() == 0.0
    value.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_half_precision_logits_give_float32_losses() -> None:
    value = symmetric_cross_entropy(LOGITS.half(), LABELS)
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(symmetric_cross_entropy(LOGITS, LABELS).item(), rel=1e-3)
