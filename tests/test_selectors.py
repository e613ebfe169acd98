"""Selectors (docs/method.md#iast-instance-adaptive-thresholds,
docs/method.md#cbst-class-balanced-thresholds): IAST against a direct numpy transcription, CBST
against numpy's exact percentiles, the thresholding rule, and the SELECTORS table that builds
every configurable selector."""

from __future__ import annotations

import typing

import numpy as np
import pytest
import torch

from stages.config import SelectorConfig
from stages.method.selectors import (
    SELECTORS,
    FixedSelector,
    IastSelector,
    LevelHistogram,
    Selector,
    apply_thresholds,
)
from stages.store.levels import quantize, threshold_levels


def iast_reference(groups, num_classes, alpha, beta, gamma, theta0):
    """docs/method.md#iast-instance-adaptive-thresholds, transcribed literally: a Python loop over
    classes with np.percentile."""
    theta = np.full(num_classes, theta0, dtype=np.float64)
    history = []
    for confidence, prediction in groups:
        confidence = confidence.astype(np.float16)
        for c in range(num_classes):
            values = np.concatenate([confidence[prediction == c].astype(np.float64),
                                     [theta[c]]])
            psi = np.percentile(values, 100 * (1 - alpha * theta[c] ** gamma))
            theta[c] = beta * theta[c] + (1 - beta) * psi
        theta[theta >= 1] = 0.999
        history.append(theta.copy())
    return history


def random_groups(rng, count, num_classes, shape=(2, 24, 40)):
    groups = []
    for _ in range(count):
        # Class-dependent confidence levels, some classes absent from some groups.
        prediction = rng.integers(0, num_classes - 1, shape)
        level = rng.uniform(0.3, 0.99, num_classes)[prediction]
        confidence = np.clip(level + rng.normal(0, 0.08, shape), 1 / num_classes, 1.0)
        groups.append((confidence.astype(np.float16), prediction))
    return groups


@pytest.mark.parametrize("alpha", [0.2, 0.3])
def test_iast_thresholds_match_the_direct_transcription_of_d1(alpha: float) -> None:
    rng = np.random.default_rng(1)
    groups = random_groups(rng, 12, num_classes=7)
    expected = iast_reference(groups, 7, alpha, 0.9, 8.0, 0.9)
    selector = IastSelector(7, alpha=alpha, beta=0.9, gamma=8.0, theta0=0.9)
    for (confidence, prediction), reference in zip(groups, expected, strict=True):
        got = selector.update(confidence, prediction)
        np.testing.assert_allclose(got, reference, atol=1e-6)
    # The last class never appears: its threshold stays at θ0 (S_c = {θ_c}).
    assert selector.thresholds()[6] == pytest.approx(0.9)


def test_iast_caps_thresholds_that_reach_one() -> None:
    selector = IastSelector(2, alpha=0.2, beta=0.0, gamma=8.0, theta0=0.9)
    confidence = np.ones((4, 4), np.float32)
    prediction = np.zeros((4, 4), np.int64)
    thresholds = selector.update(confidence, prediction)
    assert thresholds[0] == pytest.approx(0.999)
    assert thresholds[1] == pytest.approx(0.9)


@pytest.mark.parametrize("portion", [0.2, 0.45, 0.9, 1.0])
def test_cbst_thresholds_are_the_exact_order_statistics_of_the_stored_levels(
        portion: float) -> None:
    rng = np.random.default_rng(2)
    num_classes = 5
    histogram = LevelHistogram(num_classes)
    levels, predictions = [], []
    for _ in range(6):  # images added one at a time, never all held at once by the histogram
        prediction = rng.integers(0, num_classes - 1, (20, 30))
        level = quantize(rng.beta(5, 1.5, (20, 30)))
        histogram.add(level, prediction)
        levels.append(level)
        predictions.append(prediction)
    level = np.concatenate(levels).ravel()
    prediction = np.concatenate(predictions).ravel()
    thresholds = histogram.thresholds(portion)
    for c in range(num_classes - 1):
        values = np.sort(level[prediction == c])[::-1]
        rank = min(int(np.floor(portion * values.size)), values.size - 1)
        assert thresholds[c] == values[rank] / 255
    assert thresholds[num_classes - 1] == 0.0  # absent class


def test_cbst_keeps_the_portion_of_each_class_and_its_ties() -> None:
    rng = np.random.default_rng(3)
    histogram = LevelHistogram(3)
    prediction = rng.integers(0, 3, (100, 100))
    levels = quantize(rng.uniform(0.3, 1.0, (100, 100)))
    histogram.add(levels, prediction)
    thresholds = histogram.thresholds(0.45)
    labels = apply_thresholds(prediction, levels, threshold_levels(thresholds))
    for c in range(3):
        kept = (labels == c).sum() / (prediction == c).sum()
        assert 0.45 <= kept <= 0.45 + ((prediction == c) & (levels == round(thresholds[c] * 255))
                                       ).sum() / (prediction == c).sum()


def test_a_threshold_keeps_a_level_exactly_when_its_value_reaches_it() -> None:
    level_values = np.arange(256) / 255
    for theta in (0.0, 0.5, 0.9, 100 / 255, 229 / 255, 0.999, 1.0):
        kept = np.arange(256) >= threshold_levels([theta])[0]
        np.testing.assert_array_equal(kept, level_values >= theta - 1e-12)


def test_histograms_sum_across_processes_to_the_whole_set() -> None:
    rng = np.random.default_rng(4)
    whole, part_a, part_b = (LevelHistogram(4) for _ in range(3))
    for i in range(4):
        prediction = rng.integers(0, 4, (8, 8))
        levels = quantize(rng.uniform(0, 1, (8, 8)))
        whole.add(levels, prediction)
        (part_a if i % 2 else part_b).add(levels, prediction)
    np.testing.assert_array_equal(whole.counts, part_a.counts + part_b.counts)


def test_apply_thresholds_ignores_pixels_below_their_class_threshold() -> None:
    prediction = np.array([[0, 1, 2], [255, 1, 0]])
    confidence = np.array([[0.5, 0.95, 0.2], [0.99, 0.85, 0.79]])
    labels = apply_thresholds(prediction, confidence, np.array([0.8, 0.9, 0.1]))
    np.testing.assert_array_equal(labels, [[255, 1, 2], [255, 255, 255]])
    assert labels.dtype == np.uint8
    fixed = apply_thresholds(prediction, confidence, FixedSelector(3, 0.5).thresholds())
    np.testing.assert_array_equal(fixed, [[0, 1, 255], [255, 1, 0]])


def test_every_configurable_selector_has_an_implementation() -> None:
    # A variant added to the config's union without a SELECTORS entry fails here, not at run
    # time in generate-pseudo.
    (union, *_) = typing.get_args(SelectorConfig)
    variants = typing.get_args(union)
    names = {typing.get_args(variant.model_fields["name"].annotation)[0]: variant
             for variant in variants}
    assert set(names) == set(SELECTORS)
    for name, variant in names.items():
        selector = SELECTORS[name](variant(name=name), 19)
        assert isinstance(selector, Selector)
        assert selector.thresholds().shape == (19,)


def test_an_ordered_selector_cannot_declare_its_own_score() -> None:
    # Its walk under torchrun reads other processes' images from the store, which keeps only
    # the confidence levels: the class is refused when it is defined.
    with pytest.raises(TypeError, match="cannot declare a score of its own"):
        class Margin(IastSelector):
            def score(self, probabilities: torch.Tensor) -> np.ndarray | None:
                return None
