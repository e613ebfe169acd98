"""Iteration schedules of the training stages, as pure functions of the iteration number.

This module owns the learning-rate factor (linear warmup then poly decay, the clean form of
docs/method.md#optimisation), the online pseudo-label proportion α
(docs/method.md#online-pseudo-labels-and-the-alpha-schedule) and the offline-update proportion β
(docs/method.md#the-offline-update), with every constant that the original code hard-coded exposed
as a parameter (docs/method.md#one-alpha-ramp-parameter, docs/method.md#exposed-beta-constants).
Because they depend only on the iteration, a resumed run recomputes them exactly.
"""

from __future__ import annotations


def _ramp(it: float, begin: float, total: float, power: float) -> float:
    """((it − begin)/(total − begin))^power, clamped to [0, 1]; 1 once total ≤ begin."""
    span = total - begin
    if span <= 0:
        return 1.0
    progress = min(max((it - begin) / span, 0.0), 1.0)
    return progress**power


def lr_factor(
    t: int,
    total: int,
    warmup_iterations: int = 2000,
    warmup_start: float = 0.2,
    power: float = 0.9,
) -> float:
    """Learning-rate multiplier after t scheduler steps.

    docs/method.md#optimisation (clean form): t < W → warmup_start + (1 − warmup_start)·t/W,
    otherwise (1 − t/total)^power, clamped at 0 from t = total on. The poly curve runs on the
    global step, so at t = W the factor drops from about 1 to (1 − W/total)^power (2.2 % with the
    paper's 2000 of 80000), as the reference's does two steps later.
    """
    if total <= 0:
        raise ValueError(f"total iterations = {total} must be positive")
    if t < warmup_iterations:
        return warmup_start + (1.0 - warmup_start) * t / warmup_iterations
    return max(0.0, 1.0 - t / total) ** power


def alpha_schedule(
    it: int,
    total: int,
    start: float = 0.2,
    end: float = 0.7,
    ramp_start: int = 2000,
    power: float = 1.1,
) -> float:
    """Online pseudo-label proportion α at iteration `it`
    (docs/method.md#online-pseudo-labels-and-the-alpha-schedule,
    docs/method.md#one-alpha-ramp-parameter).

    α = start for it < ramp_start, else start + (end − start)·((it − ramp_start)/(total −
    ramp_start))^power. One `ramp_start` serves both the test and the normalisation, so a
    later ramp never raises a negative number to a fractional power.
    """
    if it < ramp_start:
        return start
    return start + (end - start) * _ramp(it, ramp_start, total, power)


def beta_schedule(
    it: int,
    total: int,
    start: float = 0.25,
    end: float = 0.75,
    offset: int = 5000,
    offline_start: int = 10000,
    power: float = 1.1,
) -> float:
    """Offline-update proportion β at iteration `it` (docs/method.md#the-offline-update,
    docs/method.md#exposed-beta-constants).

    β = start for it < offline_start, else start + (end − start)·((it − offset)/(total −
    offset))^power. With the defaults β jumps from 0.25 to 0.275 at 10000, as in the original.
    """
    if it < offline_start:
        return start
    return start + (end - start) * _ramp(it, offset, total, power)
