"""Schedules against the tables of docs/method.md#optimisation (learning rate) and
docs/method.md#online-pseudo-labels-and-the-alpha-schedule (α, β)."""

from __future__ import annotations

import pytest

from stages.runtime.schedules import alpha_schedule, beta_schedule, lr_factor

TOTAL = 80000

ALPHA_TABLE = {0: 0.200, 1000: 0.200, 2000: 0.200, 5000: 0.214, 10000: 0.241, 20000: 0.300,
               40000: 0.427, 60000: 0.561, 80000: 0.700}
BETA_TABLE = {0: 0.25, 5000: 0.25, 9999: 0.25, 10000: 0.275, 20000: 0.335, 40000: 0.466,
              60000: 0.606, 80000: 0.750}
# docs/method.md#optimisation's lr/base table where the clean form agrees with the original (t =
# 2000 differs: the original holds 1.0 for two steps, the clean form is already at (1 −
# 2000/80000)^0.9).
LR_TABLE = {0: 0.20, 1000: 0.60, 10000: 0.887, 20000: 0.772, 40000: 0.536, 60000: 0.287,
            80000: 0.0}


@pytest.mark.parametrize(("it", "expected"), ALPHA_TABLE.items())
def test_alpha_matches_table(it: int, expected: float) -> None:
    assert alpha_schedule(it, TOTAL) == pytest.approx(expected, abs=5e-4)


@pytest.mark.parametrize(("it", "expected"), BETA_TABLE.items())
def test_beta_matches_table(it: int, expected: float) -> None:
    # The table is rounded to 3 decimals; at 60000 the formula gives 0.60547 (table 0.606).
    assert beta_schedule(it, TOTAL) == pytest.approx(expected, abs=1e-3)


def test_beta_formula_after_offline_start() -> None:
    for it in (10000, 37000, 60000):
        expected = 0.25 + 0.5 * ((it - 5000) / 75000) ** 1.1
        assert beta_schedule(it, TOTAL) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(("t", "expected"), LR_TABLE.items())
def test_lr_factor_matches_table(t: int, expected: float) -> None:
    assert lr_factor(t, TOTAL) == pytest.approx(expected, abs=1e-3)


def test_lr_factor_clean_form_values() -> None:
    assert lr_factor(10000, TOTAL) == pytest.approx((1 - 10000 / 80000) ** 0.9)
    assert lr_factor(10000, TOTAL) == pytest.approx(0.8867, abs=1e-4)
    assert lr_factor(2000, TOTAL) == pytest.approx(0.975**0.9)
    assert lr_factor(1999, TOTAL) == pytest.approx(0.2 + 0.8 * 1999 / 2000)
    assert lr_factor(90000, TOTAL) == 0.0
    assert lr_factor(0, 100, warmup_iterations=0) == 1.0


def test_schedules_are_monotone_and_bounded() -> None:
    alphas = [alpha_schedule(it, TOTAL) for it in range(0, TOTAL + 1, 500)]
    betas = [beta_schedule(it, TOTAL) for it in range(0, TOTAL + 1, 500)]
    assert alphas == sorted(alphas) and min(alphas) >= 0.2 and max(alphas) == pytest.approx(0.7)
    assert betas == sorted(betas) and min(betas) >= 0.25 and max(betas) == pytest.approx(0.75)


def test_short_runs_never_raise_negative_numbers_to_a_power() -> None:
    # docs/method.md#one-alpha-ramp-parameter: a run shorter than the ramp start stays finite and
    # real.
    assert alpha_schedule(50, 100) == 0.2
    assert alpha_schedule(2500, 2000) == pytest.approx(0.7)
    assert beta_schedule(20, 100, offset=1, offline_start=2) == pytest.approx(
        0.25 + 0.5 * (19 / 99) ** 1.1
    )
    assert alpha_schedule(3, 4, ramp_start=1) == pytest.approx(0.2 + 0.5 * (2 / 3) ** 1.1)
