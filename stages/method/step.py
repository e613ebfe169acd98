"""One DUDA self-training step (docs/method.md#one-step-in-execution-order), as a function of
models, batches and weights.

The step is separate from the stage's loop (`stages/self_train.py`) so that its order and its loss
terms can be read top to bottom and tested on tiny models. It returns the named loss terms and the
teacher's eval-mode probabilities on the full target images, which the loop uses for the in-loop
offline update (docs/method.md#the-offline-update). Pixels of the offline labels are given already
cropped; the offline merge itself is `stages.method.pseudo_labels.merge_offline`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

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


def needs_teacher(weights: LossWeights, offline_update: bool) -> bool:
    """Whether the step needs the teacher at all (the offline-only ablation does not)."""
    return offline_update or any(w > 0 for w in (weights.consistency, weights.online,
                                                 weights.online_entropy, weights.online_kld))


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

    # 4. Offline loss: symmetric cross-entropy on the stored labels (docs/method.md#the-losses).
    target_loss = target_logits.new_zeros(())

    def add(name: str, weight: float, compute: Callable[[], torch.Tensor]) -> None:
        """Add weight·term to the target loss (skipped, not computed, at weight 0)."""
        nonlocal target_loss
        if weight > 0:
            value = compute()
            target_loss = target_loss + weight * value
            terms[name] = value.detach()

    offline = batch.offline_label
    add("loss/offline_sce", weights.offline, lambda: losses.symmetric_cross_entropy(
        target_logits, offline, a=weights.offline_sce_a, b=weights.offline_sce_b))
    add("loss/offline_entropy", weights.offline_entropy,
        lambda: losses.entropy_regularizer(target_logits, offline))
    add("loss/offline_kld", weights.offline_kld,
        lambda: losses.kld_regularizer(target_logits, offline))

    teacher_probabilities = online_label = online_thresholds = None
    if needs_teacher(weights, offline_update):
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
            if weights.consistency > 0 and consistency_teacher_mode == "train":
                with autocast(device, precision):
                    consistency_logits = full_to_crop(teacher(batch.target_full).float(),
                                                      batch.target_params)
            # 7. Eval-mode teacher pass: pseudo labels and the offline update.
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

        online = online_label
        add("loss/consistency", weights.consistency,
            lambda: losses.consistency_mse(target_logits, consistency_logits))
        # 8. Online cross-entropy; 9. regularisers on the online map (docs/method.md#the-losses).
        add("loss/online_ce", weights.online, lambda: losses.cross_entropy(target_logits, online))
        add("loss/online_entropy", weights.online_entropy,
            lambda: losses.entropy_regularizer(target_logits, online))
        add("loss/online_kld", weights.online_kld,
            lambda: losses.kld_regularizer(target_logits, online))

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
