"""One DUDA self-training step (docs/method.md#one-step-in-execution-order), as a function of
models, batches and weights.

The step is separate from the stage's loop (`stages/self_train.py`) so that its order and its loss
terms can be read top to bottom and tested on tiny models. It returns the named loss terms and the
teacher's eval-mode probabilities on the full target images, which the loop uses for the in-loop
offline update (docs/method.md#the-offline-update). Pixels of the offline labels are given already
cropped; the offline merge itself is `stages.method.pseudo_labels.merge_offline`.

The target loss terms are declared once, in `TARGET_TERMS`: each names its `LossWeights` field and
what it is computed against, and the step derives from the active terms which teacher passes it
runs (`needs_teacher`), so a new term is one row there (docs/method.md#the-losses).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from stages.config import LossWeights
from stages.data.classes import IGNORE_INDEX
from stages.data.transforms import full_to_crop
from stages.method.pseudo_labels import online_pseudo_labels
from stages.nn import losses
from stages.runtime.devices import autocast


@dataclass
class StepInputs:
    """One step's batches, on the device.

    source_image (B,3,h,w) float, source_label (B,h,w) long: source crops.
    target_image (B,3,h,w) float: the student's weak crops; target_params (B,7) int64: their
    recorded scale/crop/flip; target_full (B,3,H,W) float: the full base-size target images
    (the teacher's view); offline_label (B,h,w) long: the stored offline labels, cropped alike.
    """

    source_image: torch.Tensor
    source_label: torch.Tensor
    target_image: torch.Tensor
    target_params: torch.Tensor
    target_full: torch.Tensor
    offline_label: torch.Tensor

    def split(self, parts: int) -> list[StepInputs]:
        """`parts` micro-batches, each taking its share of every tensor's rows in order."""
        if parts == 1:
            return [self]
        columns = {name: getattr(self, name).chunk(parts) for name in _INPUT_FIELDS}
        return [StepInputs(**{name: chunks[i] for name, chunks in columns.items()})
                for i in range(parts)]


_INPUT_FIELDS = ("source_image", "source_label", "target_image", "target_params", "target_full",
                 "offline_label")


@dataclass
class StepOutputs:
    terms: dict[str, torch.Tensor]  # loss/<name> → 0-d detached value (unweighted), for logging
    teacher_probabilities: torch.Tensor | None  # (B,C,H,W) eval-mode teacher on the full images
    online_label: torch.Tensor | None  # (B,h,w) long
    online_thresholds: torch.Tensor | None  # (C,) float

    @staticmethod
    def join(parts: list[StepOutputs]) -> StepOutputs:
        """One step's outputs from its micro-batches': rows concatenated in order, loss terms
        and online thresholds averaged."""
        if len(parts) == 1:
            return parts[0]

        def cat(values: list[torch.Tensor | None]) -> torch.Tensor | None:
            return None if values[0] is None else torch.cat(values)  # type: ignore[arg-type]

        def mean(values: list[torch.Tensor | None]) -> torch.Tensor | None:
            return None if values[0] is None else torch.stack(values).mean(0)  # type: ignore

        return StepOutputs(
            {name: mean([part.terms[name] for part in parts]) for name in parts[0].terms},
            cat([part.teacher_probabilities for part in parts]),
            cat([part.online_label for part in parts]),
            mean([part.online_thresholds for part in parts]))


# What a target term compares the student's target logits with: the stored offline labels, the
# teacher's online labels (its eval-mode pass, step 7), or the teacher's consistency logits (its
# train-mode pass, step 6, or the eval-mode one with consistency_teacher_mode "eval").
Against = Literal["offline", "online", "consistency"]


@dataclass(frozen=True)
class TargetTerm:
    """One term of the target loss: logged as `name`, weighted by the `LossWeights` field
    `weight` (0 switches it off, and it is then not computed), computed by `loss` from the
    student's target logits, the target named by `against` and the weights (for a term's own
    parameters)."""

    name: str
    weight: str
    against: Against
    loss: Callable[[torch.Tensor, torch.Tensor, LossWeights], torch.Tensor]

    @property
    def needs_teacher(self) -> bool:
        return self.against != "offline"

    def active(self, weights: LossWeights) -> bool:
        return getattr(weights, self.weight) > 0


# Every target loss term (docs/method.md#the-losses), grouped by what it is computed against in
# the order the step sums them: the offline terms (step 4), then, after the teacher's passes, the
# consistency term and the online ones (steps 8–9). A new term is one row, with its weight field
# in `LossWeights` (tests/test_self_train_step.py holds every weight field to a row).
TARGET_TERMS: tuple[TargetTerm, ...] = (
    TargetTerm("loss/offline_sce", "offline", "offline",
               lambda logits, labels, w: losses.symmetric_cross_entropy(
                   logits, labels, a=w.offline_sce_a, b=w.offline_sce_b)),
    TargetTerm("loss/offline_entropy", "offline_entropy", "offline",
               lambda logits, labels, w: losses.entropy_regularizer(logits, labels)),
    TargetTerm("loss/offline_kld", "offline_kld", "offline",
               lambda logits, labels, w: losses.kld_regularizer(logits, labels)),
    TargetTerm("loss/consistency", "consistency", "consistency",
               lambda logits, target, w: losses.consistency_mse(logits, target)),
    TargetTerm("loss/online_ce", "online", "online",
               lambda logits, labels, w: losses.cross_entropy(logits, labels)),
    TargetTerm("loss/online_entropy", "online_entropy", "online",
               lambda logits, labels, w: losses.entropy_regularizer(logits, labels)),
    TargetTerm("loss/online_kld", "online_kld", "online",
               lambda logits, labels, w: losses.kld_regularizer(logits, labels)),
)


def needs_teacher(weights: LossWeights, offline_update: bool) -> bool:
    """Whether the step runs the teacher at all: an active term computed against its output, or
    the offline update, which reads its probabilities (the offline-only ablation needs none)."""
    return offline_update or any(term.needs_teacher and term.active(weights)
                                 for term in TARGET_TERMS)


def self_train_step(
    student: nn.Module,
    teacher: nn.Module,
    batch: StepInputs,
    *,
    weights: LossWeights,
    alpha: float,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    precision: str = "fp32",
    offline_update: bool = False,
    consistency_teacher_mode: str = "train",
    reproduce_teacher_bn_quirk: bool = False,
    micro_batches: int = 1,
) -> StepOutputs:
    """docs/method.md#one-step-in-execution-order; the caller then updates the teacher (step 11).

    With `micro_batches` > 1 steps 2–10's backward run once per micro-batch, each loss scaled by
    1/micro_batches so the summed gradients are the whole batch's mean
    (docs/method.md#the-batch); the optimizer steps once."""
    # 1. Student and teacher in train mode, gradients cleared.
    student.train()
    teacher.train()
    optimizer.zero_grad(set_to_none=True)
    parts = [_backward(student, teacher, part, weights=weights, alpha=alpha, scaler=scaler,
                       precision=precision, offline_update=offline_update,
                       consistency_teacher_mode=consistency_teacher_mode,
                       reproduce_teacher_bn_quirk=reproduce_teacher_bn_quirk,
                       scale=1.0 / micro_batches)
             for part in batch.split(micro_batches)]
    # 10b. One optimizer and scaler step for the whole batch.
    scaler.step(optimizer)
    scaler.update()
    return StepOutputs.join(parts)


def _backward(student: nn.Module, teacher: nn.Module, batch: StepInputs, *,
              weights: LossWeights, alpha: float, scaler: torch.amp.GradScaler,
              precision: str, offline_update: bool, consistency_teacher_mode: str,
              reproduce_teacher_bn_quirk: bool, scale: float) -> StepOutputs:
    """Steps 2–10 of one (micro-)batch up to the target backward; gradients accumulate."""
    device = batch.source_image.device
    terms: dict[str, torch.Tensor] = {}

    def scaled(loss: torch.Tensor) -> torch.Tensor:
        return loss if scale == 1.0 else loss * scale

    # 2. Source loss, backward at once to free the source activations
    # (docs/method.md#one-step-in-execution-order).
    if weights.source > 0:
        with autocast(device, precision):
            source_logits = student(batch.source_image)
        source_ce = losses.cross_entropy(source_logits.float(), batch.source_label)
        scaler.scale(scaled(weights.source * source_ce)).backward()
        terms["loss/source_ce"] = source_ce.detach()
        del source_logits

    # 3. Student on the weak target crop.
    with autocast(device, precision):
        target_logits = student(batch.target_image).float()

    # 4. Offline terms: symmetric cross-entropy on the stored labels and, where switched on,
    # the regularisers on them (docs/method.md#the-losses).
    target_loss = target_logits.new_zeros(())

    def add(against: Against, target: torch.Tensor) -> None:
        """Add weight·term to the target loss for each active term against `target`."""
        nonlocal target_loss
        for term in TARGET_TERMS:
            if term.against == against and term.active(weights):
                value = term.loss(target_logits, target, weights)
                target_loss = target_loss + getattr(weights, term.weight) * value
                terms[term.name] = value.detach()

    add("offline", batch.offline_label)

    teacher_probabilities = online_label = online_thresholds = None
    if needs_teacher(weights, offline_update):
        consistency = any(term.against == "consistency" and term.active(weights)
                          for term in TARGET_TERMS)
        with torch.no_grad():
            # 5. The reference's discarded crop pass
            # (docs/method.md#one-teacher-pass-instead-of-a-wasted-one): only its BN side effect
            # remains.
            if reproduce_teacher_bn_quirk:
                with autocast(device, precision):
                    teacher(batch.target_image)
            # 6. Consistency target from the stochastic train-mode teacher
            # (docs/method.md#the-consistency-teachers-mode).
            consistency_logits = None
            if consistency and consistency_teacher_mode == "train":
                with autocast(device, precision):
                    consistency_logits = full_to_crop(teacher(batch.target_full).float(),
                                                      batch.target_params)
            # 7. Eval-mode teacher pass: pseudo labels and the offline update. It runs whenever
            # the teacher does: the loop logs its online labels' quality.
            teacher.eval()
            with autocast(device, precision):
                full_logits = teacher(batch.target_full).float()
            teacher.train()
            teacher_probabilities = full_logits.softmax(dim=1)
            crop_logits = full_to_crop(full_logits, batch.target_params)
            if consistency_logits is None:
                consistency_logits = crop_logits
            # 7b. Online pseudo labels at α on the crop
            # (docs/method.md#online-pseudo-labels-and-the-alpha-schedule).
            online_label, online_thresholds = online_pseudo_labels(
                crop_logits.softmax(dim=1), alpha)

        # 8. Consistency; online cross-entropy; 9. regularisers on the online map
        # (docs/method.md#the-losses).
        add("consistency", consistency_logits)
        add("online", online_label)

    # 10. Target backward (the optimizer steps after the last micro-batch).
    scaler.scale(scaled(target_loss)).backward()
    terms["loss/target"] = target_loss.detach()
    return StepOutputs(terms, teacher_probabilities, online_label, online_thresholds)


def label_agreement(online: torch.Tensor, offline: torch.Tensor) -> tuple[float, float, float]:
    """(online coverage, offline coverage, agreement where both are labelled) on a crop."""
    online_valid = online != IGNORE_INDEX
    offline_valid = offline != IGNORE_INDEX
    both = online_valid & offline_valid
    agree = (online == offline) & both
    both_count = int(both.sum())
    return (float(online_valid.float().mean()), float(offline_valid.float().mean()),
            float(agree.sum()) / both_count if both_count else float("nan"))
