"""One self-training step on a one-convolution model: which terms it computes, the target loss it
backpropagates, the teacher's modes and when the teacher runs at all (derived from the declared
target terms)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from stages.config import LossWeights
from stages.data.transforms import CropParams
from stages.method.step import TARGET_TERMS, StepInputs, needs_teacher, self_train_step
from stages.nn import losses
from stages.nn.teacher import MeanTeacher

C, H, W = 3, 8, 12  # classes; crop size (the full view is 2H × 2W)


class OneConv(nn.Module):
    """A 1×1 convolution with batch norm: logits at the input size, like the real model."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(3)
        self.conv = nn.Conv2d(3, C, 1)
        self.calls: list[tuple[bool, tuple[int, ...]]] = []  # (training, input shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append((self.training, tuple(x.shape)))
        return self.conv(self.norm(x))


def batch(seed: int = 0) -> StepInputs:
    generator = torch.Generator().manual_seed(seed)
    # each crop: the full view scaled 1× and cut at (2, 3), no flip
    params = torch.stack([CropParams(2 * H, 2 * W, 2, 3, H, W, False).to_tensor()] * 2)
    offline = torch.randint(0, C, (2, H, W), generator=generator)
    offline[:, :2] = 255
    return StepInputs(
        source_image=torch.randn(2, 3, H, W, generator=generator),
        source_label=torch.randint(0, C, (2, H, W), generator=generator),
        target_image=torch.randn(2, 3, H, W, generator=generator),
        target_params=params,
        target_full=torch.randn(2, 3, 2 * H, 2 * W, generator=generator),
        offline_label=offline)


def run_step(weights: LossWeights, offline_update: bool = False, **options):
    torch.manual_seed(0)
    student = OneConv()
    teacher = MeanTeacher(student)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    before = [p.detach().clone() for p in student.parameters()]
    outputs = self_train_step(student, teacher, batch(), weights=weights, alpha=0.5,
                              optimizer=optimizer, scaler=scaler, offline_update=offline_update,
                              **options)
    return student, teacher, outputs, before


def test_terms_with_weight_zero_are_not_computed() -> None:
    weights = LossWeights(consistency=0.0, online_entropy=0.0, online_kld=0.0)
    _, _, outputs, _ = run_step(weights)
    assert set(outputs.terms) == {"loss/source_ce", "loss/offline_sce", "loss/online_ce",
                                  "loss/target"}


def test_the_target_loss_is_the_weighted_sum_of_its_terms() -> None:
    weights = LossWeights(offline=0.7, consistency=1.3, online=0.4, online_entropy=2.0,
                          online_kld=0.3, offline_entropy=0.5, offline_kld=0.25)
    _, _, outputs, _ = run_step(weights)
    terms = outputs.terms
    expected = sum(getattr(weights, name) * terms[f"loss/{key}"] for name, key in (
        ("offline", "offline_sce"), ("consistency", "consistency"), ("online", "online_ce"),
        ("online_entropy", "online_entropy"), ("online_kld", "online_kld"),
        ("offline_entropy", "offline_entropy"), ("offline_kld", "offline_kld")))
    torch.testing.assert_close(terms["loss/target"], expected)
    assert "loss/source_ce" in terms  # backpropagated on its own, not part of the target loss


def test_the_step_trains_the_student_and_returns_its_teacher_to_train_mode() -> None:
    student, teacher, outputs, before = run_step(LossWeights())
    assert any(not torch.equal(p, q) for p, q in zip(before, student.parameters()))
    assert teacher.training and teacher.module.training and student.training
    # the teacher ran in train mode for the consistency target and in eval mode for the labels
    modes = [training for training, shape in teacher.module.calls]
    assert modes == [True, False]
    assert all(shape == (2, 3, 2 * H, 2 * W) for _, shape in teacher.module.calls)
    assert outputs.online_label.shape == (2, H, W)
    assert outputs.teacher_probabilities.shape == (2, C, 2 * H, 2 * W)


def test_an_eval_mode_consistency_teacher_takes_one_pass() -> None:
    _, teacher, _, _ = run_step(LossWeights(), consistency_teacher_mode="eval")
    assert [training for training, _ in teacher.module.calls] == [False]


def test_the_reference_quirk_adds_a_train_mode_pass_on_the_crop() -> None:
    _, teacher, _, _ = run_step(LossWeights(), reproduce_teacher_bn_quirk=True)
    assert teacher.module.calls[0] == (True, (2, 3, H, W))
    assert len(teacher.module.calls) == 3


OFFLINE_ONLY = LossWeights(consistency=0.0, online=0.0, online_entropy=0.0, online_kld=0.0)


def test_without_online_terms_the_teacher_is_not_run() -> None:
    assert not needs_teacher(OFFLINE_ONLY, offline_update=False)
    _, teacher, outputs, _ = run_step(OFFLINE_ONLY)
    assert teacher.module.calls == [] and outputs.teacher_probabilities is None
    assert set(outputs.terms) == {"loss/source_ce", "loss/offline_sce", "loss/target"}


def test_the_offline_update_needs_the_teacher_even_without_online_terms() -> None:
    assert needs_teacher(OFFLINE_ONLY, offline_update=True)
    _, teacher, outputs, _ = run_step(OFFLINE_ONLY, offline_update=True)
    assert [training for training, _ in teacher.module.calls] == [False]
    assert outputs.teacher_probabilities is not None
    torch.testing.assert_close(outputs.teacher_probabilities.sum(1),
                               torch.ones(2, 2 * H, 2 * W))


# The LossWeights fields that are not the weight of a target term: the source loss has its own
# pass (step 2), the other two are the offline term's parameters.
NOT_TARGET_WEIGHTS = {"source", "offline_sce_a", "offline_sce_b"}


def test_every_loss_weight_is_a_declared_term() -> None:
    # A weight added to LossWeights without its row in TARGET_TERMS would never be applied, and a
    # teacher-based one would not make the step run the teacher: it must be declared.
    declared = [term.weight for term in TARGET_TERMS]
    assert len(declared) == len(set(declared))
    assert set(declared) == set(LossWeights.model_fields) - NOT_TARGET_WEIGHTS
    assert len({term.name for term in TARGET_TERMS}) == len(TARGET_TERMS)


def alone(weight: str) -> LossWeights:
    """Every target term switched off but the one weighted by `weight`."""
    return LossWeights(**{term.weight: 0.5 if term.weight == weight else 0.0
                          for term in TARGET_TERMS})


@pytest.mark.parametrize("term", TARGET_TERMS, ids=lambda term: term.weight)
def test_a_term_switched_on_alone_runs_the_teacher_it_needs(term) -> None:
    weights = alone(term.weight)
    assert needs_teacher(weights, offline_update=False) == term.needs_teacher
    _, teacher, outputs, _ = run_step(weights)
    assert set(outputs.terms) == {"loss/source_ce", term.name, "loss/target"}
    modes = [training for training, _ in teacher.module.calls]
    if term.against == "offline":
        assert modes == [] and outputs.online_label is None
    elif term.against == "consistency":  # its train-mode target, then the eval-mode labels
        assert modes == [True, False]
    else:
        assert modes == [False] and outputs.online_label is not None


def test_the_offline_term_is_the_symmetric_cross_entropy_of_the_student() -> None:
    weights = LossWeights(offline_sce_a=0.3, offline_sce_b=0.6)
    _, _, outputs, _ = run_step(weights)
    torch.manual_seed(0)
    fresh = OneConv()  # the student before its update: the same seeded initialisation
    fresh.train()
    inputs = batch()
    fresh(inputs.source_image)  # the source pass moves BN statistics first, as in the step
    logits = fresh(inputs.target_image)
    expected = losses.symmetric_cross_entropy(logits, inputs.offline_label, a=0.3, b=0.6)
    torch.testing.assert_close(outputs.terms["loss/offline_sce"], expected.detach())


@pytest.mark.parametrize("source", [0.0, 1.0])
def test_a_source_weight_of_zero_skips_the_source_pass(source: float) -> None:
    student, _, outputs, _ = run_step(LossWeights(source=source))
    assert ("loss/source_ce" in outputs.terms) == (source > 0)
    assert len(student.calls) == (2 if source > 0 else 1)


def test_micro_batches_give_the_whole_batch_update_and_outputs_in_order() -> None:
    # Without batch norm and without the per-batch online thresholds, two micro-batches of one
    # crop each must move the weights as one batch of two does (gradients summed, each loss
    # scaled by 1/2), and return the teacher's probabilities of both images in order.
    weights = LossWeights(online=0, online_entropy=0, online_kld=0)
    results = []
    for micro_batches in (1, 2):
        torch.manual_seed(0)
        student = OneConv()
        student.norm = nn.Identity()
        teacher = MeanTeacher(student)
        optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
        scaler = torch.amp.GradScaler("cuda", enabled=False)
        outputs = self_train_step(student, teacher, batch(), weights=weights, alpha=0.5,
                                  optimizer=optimizer, scaler=scaler, offline_update=True,
                                  micro_batches=micro_batches)
        results.append(([p.detach().clone() for p in student.parameters()], outputs))
    (one, whole), (two, split) = results
    for a, b in zip(one, two, strict=True):
        torch.testing.assert_close(a, b)
    assert split.teacher_probabilities.shape == whole.teacher_probabilities.shape
    torch.testing.assert_close(split.teacher_probabilities, whole.teacher_probabilities)
    torch.testing.assert_close(split.terms["loss/source_ce"], whole.terms["loss/source_ce"])
    # A control: one micro-batch of the first crop alone moves the weights elsewhere.
    torch.manual_seed(0)
    student = OneConv()
    student.norm = nn.Identity()
    half = batch().split(2)[0]
    self_train_step(student, MeanTeacher(student), half, weights=weights, alpha=0.5,
                    optimizer=torch.optim.SGD(student.parameters(), lr=0.1),
                    scaler=torch.amp.GradScaler("cuda", enabled=False))
    assert not torch.allclose(student.conv.weight, one[-2])
