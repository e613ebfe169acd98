"""Loss terms of source training and DUDA self-training, as pure functions of tensors.

This module owns the exact definitions of docs/method.md#the-losses (and the IAST regularisers of
docs/method.md#the-losses): cross-entropy with an ignore label, the symmetric cross-entropy used on
offline pseudo labels, the probability-space consistency loss, and the entropy / KL-to-uniform
regularisers. Every function computes in float32 whatever the logits' dtype, returns a 0-d tensor,
and returns 0 (still attached to the graph, so `backward()` works) when its pixel set is empty,
instead of the NaN the original code produced (docs/method.md#empty-mask-guards). None of them
synchronises with the device.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# docs/method.md#the-losses: q = one-hot clamped to [1e-4, 1], so log q is 0 on the label and
# log(1e-4) elsewhere; p = softmax clamped to [1e-7, 1].
RCE_LOG_FLOOR = math.log(1e-4)
RCE_PROBABILITY_FLOOR = 1e-7
ENTROPY_EPSILON = 1e-8


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` over `mask`; 0 (graph kept) when the mask is empty, without a host sync."""
    total = torch.where(mask, values, torch.zeros_like(values)).sum()
    return total / mask.sum().clamp_min(1)


def _valid_mask_and_targets(
    labels: torch.Tensor, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, W) bool mask of labelled pixels and (B, H, W) long targets with ignored set to 0."""
    labels = labels.long()
    valid = labels != ignore_index
    return valid, torch.where(valid, labels, torch.zeros_like(labels))


def cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = 255
) -> torch.Tensor:
    """Mean cross-entropy over labelled pixels.

    logits: (B, C, H, W) float; labels: (B, H, W) integer, `ignore_index` marks unlabelled pixels.
    Returns a 0-d float32 tensor; 0 when no pixel is labelled.
    """
    logits = logits.float()
    valid, targets = _valid_mask_and_targets(labels, ignore_index)
    per_pixel = F.cross_entropy(logits, targets, reduction="none")  # (B, H, W)
    return _masked_mean(per_pixel, valid)


def symmetric_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    a: float = 0.2,
    b: float = 1.0,
    ignore_index: int = 255,
) -> torch.Tensor:
    """Symmetric cross-entropy a·CE + b·RCE on labelled pixels (docs/method.md#the-losses, L_off).

    RCE per pixel = −Σ_c p̃_c·log q_c with p̃ = softmax clamped to [1e-7, 1] and q = one-hot
    clamped to [1e-4, 1], i.e. −log(1e-4)·Σ_{c≠y} p̃_c. Both terms are means over labelled pixels.
    logits: (B, C, H, W) float; labels: (B, H, W) integer. Returns a 0-d float32 tensor; 0 when
    no pixel is labelled.
    """
    logits = logits.float()
    valid, targets = _valid_mask_and_targets(labels, ignore_index)
    ce = F.cross_entropy(logits, targets, reduction="none")  # (B, H, W)
    clamped = F.softmax(logits, dim=1).clamp(RCE_PROBABILITY_FLOOR, 1.0)  # (B, C, H, W)
    on_label = clamped.gather(1, targets.unsqueeze(1)).squeeze(1)  # (B, H, W)
    # log q_y = 0, so only the off-label channels contribute −log(1e-4)·p̃_c.
    rce = -RCE_LOG_FLOOR * (clamped.sum(dim=1) - on_label)
    return a * _masked_mean(ce, valid) + b * _masked_mean(rce, valid)


def consistency_mse(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over B·C·H·W of (softmax(student) − softmax(teacher))² (docs/method.md#the-losses).

    student_logits, teacher_logits: (B, C, H, W) float, pixel-aligned (the teacher's already
    mapped into the student's crop). The teacher side is detached. Returns a 0-d float32 tensor.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} must have the same shape"
        )
    student = F.softmax(student_logits.float(), dim=1)
    teacher = F.softmax(teacher_logits.detach().float(), dim=1)
    return F.mse_loss(student, teacher)


def entropy_regularizer(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = 255
) -> torch.Tensor:
    """R_ent = Σ_{u: label = ignore} H(p(u)) / (|I|·C), H(p) = −Σ_c p_c·log(p_c + 1e-8).

    docs/method.md#the-losses: sharpens predictions where there is no pseudo label.
    logits: (B, C, H, W) float; labels: (B, H, W) integer. Returns a 0-d float32 tensor; 0 when
    no pixel is ignored.
    """
    logits = logits.float()
    num_classes = logits.shape[1]
    probabilities = F.softmax(logits, dim=1)
    entropy = -(probabilities * torch.log(probabilities + ENTROPY_EPSILON)).sum(dim=1)
    ignored = labels.long() == ignore_index
    return _masked_mean(entropy, ignored) / num_classes


def kld_regularizer(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = 255
) -> torch.Tensor:
    """R_kld = Σ_{u: label ≠ ignore} Σ_c −(1/C)·log p_c(u) / (|L|·C), log p the log-softmax.

    docs/method.md#the-losses: the KL divergence to the uniform distribution without its constant,
    which smooths predictions where there is a pseudo label. logits: (B, C, H, W) float; labels: (B,
    H, W) integer. Returns a 0-d float32 tensor; 0 when no pixel is labelled
    (docs/method.md#empty-mask-guards).
    """
    logits = logits.float()
    num_classes = logits.shape[1]
    per_pixel = -F.log_softmax(logits, dim=1).sum(dim=1) / num_classes  # (B, H, W)
    labelled = labels.long() != ignore_index
    return _masked_mean(per_pixel, labelled) / num_classes
