"""Pseudo-label rules of DUDA self-training, as pure device-side functions of tensors.

This module owns the per-class confidence percentiles (numpy's default 'linear' percentile, computed
with one sort on the tensor's own device,
docs/method.md#fast-percentiles-with-the-same-interpolation), the online pseudo labels of
docs/method.md#online-pseudo-labels-and-the-alpha-schedule, the offline thresholds of
docs/method.md#the-offline-update and the single offline merge rule (the
docs/method.md#the-four-case-merge) that both `self-train` and `update-offline` call. Nothing here
moves data to the host or synchronises with the device; confidences are handled in float32 even when
the probabilities arrive in float16.
"""

from __future__ import annotations

import math

import torch

# Offsets that turn (class, float32 bit pattern) into one int64 key whose order is
# (class ascending, confidence ascending): the float bits are mapped to an order-preserving
# unsigned 32-bit value and placed in the low half.
_LOW_HALF = 1 << 32
_SIGN_BIT = 1 << 31
_LOW_MASK = _LOW_HALF - 1


def _check_percentile(q: float) -> None:
    if not 0.0 <= q <= 100.0 or math.isnan(q):
        raise ValueError(f"percentile q = {q} is outside [0, 100]")


def _lerp_like_numpy(
    lower: torch.Tensor, upper: torch.Tensor, gamma: torch.Tensor
) -> torch.Tensor:
    """numpy's `_lerp` in float32: a + (b−a)·γ for γ < 0.5, b − (b−a)·(1−γ) otherwise.

    lower, upper: float32; gamma: float64 of the same shape. numpy casts γ and 1−γ (computed in
    float64) to float32 before multiplying, and so does this function.
    """
    difference = upper - lower
    from_lower = lower + difference * gamma.float()
    from_upper = upper - difference * (1.0 - gamma).float()
    return torch.where(gamma >= 0.5, from_upper, from_lower)


def percentile(values: torch.Tensor, q: float) -> torch.Tensor:
    """The q-th percentile of `values`, exactly as `np.percentile(values, q)` (method 'linear').

    values: (N,) float, N ≥ 1 (any shape is flattened); q in [0, 100]. Returns a 0-d float32
    tensor on the values' device.
    """
    _check_percentile(q)
    flat = values.reshape(-1).float()
    count = flat.numel()
    if count == 0:
        raise ValueError("percentile of an empty tensor is undefined")
    ordered, _ = torch.sort(flat)
    # numpy: virtual index = (n − 1)·(q / 100) in float64, neighbours floor and floor + 1,
    # both clipped to the last element.
    virtual = (count - 1) * (q / 100.0)
    lower_index = min(math.floor(virtual), count - 1)
    upper_index = min(lower_index + 1, count - 1)
    gamma = torch.tensor(virtual - lower_index, dtype=torch.float64, device=flat.device)
    return _lerp_like_numpy(ordered[lower_index], ordered[upper_index], gamma)


def _order_preserving_bits(confidence: torch.Tensor) -> torch.Tensor:
    """(N,) float32 → (N,) int64 in [0, 2³²) with the same order as the float values."""
    bits = confidence.view(torch.int32).to(torch.int64)
    # Non-negative floats: set the sign bit; negative floats: invert all 32 bits.
    return torch.where(bits >= 0, bits + _SIGN_BIT, (~bits) & _LOW_MASK)


def class_percentile_thresholds(
    confidence: torch.Tensor,
    prediction: torch.Tensor,
    num_classes: int,
    q: float | torch.Tensor,
    absent_value: float = 0.0,
) -> torch.Tensor:
    """Per class c, `np.percentile` of the confidences of the pixels predicted as c.

    confidence: (N,) or (B, H, W) float; prediction: same shape, long class ids (pixels whose
    id is outside [0, num_classes) are not counted anywhere); q: a percentile in [0, 100], or a
    (num_classes,) tensor with one percentile per class. A class with no pixel gets
    `absent_value`. Returns a (num_classes,) float32 tensor on the confidences' device.
    One sort of all pixels by (class, confidence), then an index per class; no host sync.
    """
    if confidence.shape != prediction.shape:
        raise ValueError(
            f"confidence {tuple(confidence.shape)} and prediction {tuple(prediction.shape)} "
            "must have the same shape"
        )
    device = confidence.device
    if isinstance(q, torch.Tensor):
        if q.numel() != num_classes:
            raise ValueError(f"per-class q has {q.numel()} values for {num_classes} classes")
        quantile = q.to(device=device, dtype=torch.float64).reshape(-1) / 100.0
    else:
        _check_percentile(float(q))
        quantile = torch.full((num_classes,), float(q), dtype=torch.float64, device=device)
        quantile = quantile / 100.0
    flat_confidence = confidence.reshape(-1).float()
    flat_prediction = prediction.reshape(-1).long()
    total = flat_confidence.numel()
    if total == 0:
        return torch.full((num_classes,), absent_value, dtype=torch.float32, device=device)

    keys = flat_prediction * _LOW_HALF + _order_preserving_bits(flat_confidence)
    sorted_keys, order = torch.sort(keys)
    ordered_confidence = flat_confidence[order]
    ordered_class = torch.div(sorted_keys, _LOW_HALF, rounding_mode="floor")
    class_ids = torch.arange(num_classes, device=device, dtype=torch.int64)
    starts = torch.searchsorted(ordered_class, class_ids)
    counts = torch.searchsorted(ordered_class, class_ids, right=True) - starts

    # numpy 'linear': virtual index (n − 1)·q/100 in float64 within each class's sorted run.
    last = counts - 1
    virtual = last.to(torch.float64) * quantile
    floor_index = torch.floor(virtual)
    at_end = virtual >= last.to(torch.float64)
    lower = torch.where(at_end, last, floor_index.to(torch.int64))
    upper = torch.where(at_end, last, lower + 1)
    gamma = virtual - lower.to(torch.float64)
    lower_value = ordered_confidence[(starts + lower).clamp(0, total - 1)]
    upper_value = ordered_confidence[(starts + upper).clamp(0, total - 1)]
    thresholds = _lerp_like_numpy(lower_value, upper_value, gamma)
    absent = torch.full_like(thresholds, absent_value)
    return torch.where(counts > 0, thresholds, absent)


def confidence_and_prediction(probabilities: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pixel max probability and argmax.

    probabilities: (B, C, H, W) float. Returns confidence (B, H, W) float32 and prediction
    (B, H, W) long.
    """
    confidence, prediction = probabilities.max(dim=1)
    return confidence.float(), prediction


def online_pseudo_labels(
    probabilities: torch.Tensor, alpha: float, ignore_index: int = 255
) -> tuple[torch.Tensor, torch.Tensor]:
    """Online pseudo labels that keep about a fraction α of every predicted class.

    docs/method.md#online-pseudo-labels-and-the-alpha-schedule: τ_c = percentile at 100·(1 − α) of
    the confidences predicted as c over all images of the batch jointly (absent class → 0, no cap);
    label = prediction, or `ignore_index` where confidence < τ_prediction.
    probabilities: (B, C, H, W) float, the teacher's softmax already mapped onto the crop.
    Returns labels (B, H, W) long and thresholds (C,) float32.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha = {alpha} is outside [0, 1]")
    num_classes = probabilities.shape[1]
    confidence, prediction = confidence_and_prediction(probabilities)
    thresholds = class_percentile_thresholds(
        confidence, prediction, num_classes, 100.0 * (1.0 - alpha)
    )
    rejected = confidence < thresholds[prediction]
    labels = torch.where(rejected, torch.full_like(prediction, ignore_index), prediction)
    return labels, thresholds


def offline_thresholds(
    probabilities: torch.Tensor, beta: float, cap: float = 0.99
) -> torch.Tensor:
    """Offline-update thresholds τ^β (docs/method.md#the-offline-update).

    τ^β_c = percentile at 100·(1 − β) of the confidences predicted as c over all images of the
    batch jointly; an absent class gets 0; then τ^β_c ← min(τ^β_c, cap).
    probabilities: (B, C, H, W) float, the eval-mode teacher's softmax on the full images.
    Returns (C,) float32.
    """
    confidence, prediction = confidence_and_prediction(probabilities)
    return offline_thresholds_of(confidence, prediction, probabilities.shape[1], beta, cap)


def offline_thresholds_of(
    confidence: torch.Tensor, prediction: torch.Tensor, num_classes: int, beta: float,
    cap: float = 0.99
) -> torch.Tensor:
    """`offline_thresholds` from the per-pixel max probability and argmax already taken."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta = {beta} is outside [0, 1]")
    thresholds = class_percentile_thresholds(
        confidence, prediction, num_classes, 100.0 * (1.0 - beta)
    )
    return thresholds.clamp_max(cap)


def _class_counts(classes: torch.Tensor, mask: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(num_classes,) long: how many pixels under `mask` have each class id (no host sync)."""
    classes = classes.reshape(-1).long()
    in_range = mask.reshape(-1) & (classes >= 0) & (classes < num_classes)
    # Pixels outside the mask go to an extra bin that is dropped.
    bins = torch.where(in_range, classes, torch.full_like(classes, num_classes))
    counts = torch.zeros(num_classes + 1, dtype=torch.int64, device=classes.device)
    counts.scatter_add_(0, bins, torch.ones_like(bins))
    return counts[:num_classes]


def merge_offline(
    stored: torch.Tensor,
    prediction: torch.Tensor,
    confidence: torch.Tensor,
    thresholds: torch.Tensor,
    agree_requires_confidence: bool = False,
    ignore_index: int = 255,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Merge a stored offline pseudo-label map with a new teacher prediction
    (docs/method.md#the-offline-update).

    The 4-case table, with τ = thresholds[prediction]:
      stored = ignore,  conf ≥ τ  → prediction       (added)
      stored = ignore,  conf < τ  → ignore
      stored = c = prediction     → c                (kept; with `agree_requires_confidence`,
                                                      ignore when conf < τ, counted as dropped)
      stored = c ≠ prediction     → ignore           (dropped, whatever the confidence)
    stored: (..., H, W) uint8; prediction: same shape, long (the unthresholded argmax);
    confidence: same shape, float; thresholds: (C,) float.
    Returns the merged map (same shape, uint8) and per-class counts, each (C,) long:
    "kept" and "dropped" indexed by the stored class, "added" by the new class.
    """
    if not stored.shape == prediction.shape == confidence.shape:
        raise ValueError(
            f"stored labels {tuple(stored.shape)}, prediction {tuple(prediction.shape)} and "
            f"confidence {tuple(confidence.shape)} must have the same shape (the stored map "
            "must be at the resolution of the teacher's full-image prediction)"
        )
    num_classes = thresholds.numel()
    stored_long = stored.long()
    prediction = prediction.long()
    confident = confidence.float() >= thresholds.float()[prediction]
    unlabelled = stored_long == ignore_index
    agree = ~unlabelled & (stored_long == prediction)

    added = unlabelled & confident
    kept = agree & confident if agree_requires_confidence else agree
    dropped = ~unlabelled & ~kept

    ignore = torch.full_like(stored_long, ignore_index)
    merged = torch.where(added, prediction, torch.where(kept, stored_long, ignore))
    stats = {
        "kept": _class_counts(stored_long, kept, num_classes),
        "added": _class_counts(prediction, added, num_classes),
        "dropped": _class_counts(stored_long, dropped, num_classes),
    }
    return merged.to(torch.uint8), stats
