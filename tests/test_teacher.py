"""The mean teacher (docs/method.md#the-mean-teacher) and batch-norm recalibration."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from stages.nn.teacher import MeanTeacher, recalibrate_batchnorm


def _student() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Conv2d(4, 2, 1))


def _perturb(model: nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator))


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_teacher_starts_equal_to_student() -> None:
    student = _student()
    teacher = MeanTeacher(student)
    assert teacher.n_averaged.item() == 1
    pairs = zip(student.named_parameters(), teacher.module.parameters(), strict=True)
    for (name, p_s), p_t in pairs:
        assert torch.equal(p_s, p_t), name
    x = torch.randn(2, 3, 8, 8)
    student.eval()
    teacher.eval()
    assert torch.equal(student(x), teacher(x))


def test_mean_teacher_is_arithmetic_mean_of_snapshots() -> None:
    student = _student()
    teacher = MeanTeacher(student, mode="mean")
    snapshots = [_snapshot(student)]
    for t in range(1, 6):
        _perturb(student, seed=t)
        snapshots.append(_snapshot(student))
        teacher.update(student)
    assert teacher.n_averaged.item() == 6
    for name, p_t in teacher.module.named_parameters():
        mean = torch.stack([snapshot[name] for snapshot in snapshots]).mean(dim=0)
        assert torch.allclose(p_t, mean, atol=1e-6), name


def test_ema_teacher_follows_formula() -> None:
    student = _student()
    decay = 0.9
    teacher = MeanTeacher(student, mode="ema", ema_decay=decay)
    expected = _snapshot(student)
    for t in range(1, 4):
        _perturb(student, seed=t)
        current = _snapshot(student)
        expected = {k: decay * expected[k] + (1 - decay) * current[k] for k in expected}
        teacher.update(student)
    for name, p_t in teacher.module.named_parameters():
        assert torch.allclose(p_t, expected[name], atol=1e-6), name
    assert teacher.n_averaged.item() == 4


def test_batchnorm_buffers_are_not_averaged() -> None:
    student = _student()
    teacher = MeanTeacher(student)
    teacher_buffers = {k: v.clone() for k, v in teacher.module.named_buffers()}
    student.train()
    student(torch.randn(4, 3, 8, 8) * 5 + 3)  # moves the student's running statistics
    teacher.update(student)
    for name, buffer in teacher.module.named_buffers():
        assert torch.equal(buffer, teacher_buffers[name]), name
    assert not torch.equal(student[1].running_mean, teacher.module[1].running_mean)


def test_update_unwraps_a_module_wrapper() -> None:
    student = _student()
    teacher = MeanTeacher(nn.DataParallel(student))
    assert not isinstance(teacher.module, nn.DataParallel)
    _perturb(student, seed=1)
    teacher.update(nn.DataParallel(student))
    assert teacher.n_averaged.item() == 2


def test_state_dict_round_trip_restores_n_averaged() -> None:
    student = _student()
    teacher = MeanTeacher(student)
    for t in range(3):
        _perturb(student, seed=t)
        teacher.update(student)
    state = teacher.state_dict()
    assert "n_averaged" in state and any(key.startswith("module.") for key in state)
    restored = MeanTeacher(_student())
    restored.load_state_dict(state)
    assert restored.n_averaged.item() == 4
    # The next update uses weight 1/5, as it would have without the restart.
    _perturb(student, seed=10)
    teacher.update(student)
    restored.update(student)
    for p_a, p_b in zip(teacher.parameters(), restored.parameters(), strict=True):
        assert torch.equal(p_a, p_b)


def test_recalibrate_batchnorm_gives_cumulative_statistics() -> None:
    model = nn.Sequential(nn.BatchNorm2d(3))
    model.eval()
    model[0].momentum = 0.1
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(2, 3, 4, 5, generator=generator) * (i + 1) + i for i in range(3)]
    seen = recalibrate_batchnorm(model, batches, "cpu")
    assert seen == 3
    # Cumulative average of per-batch statistics (equal batch sizes): the plain mean of means,
    # and of the unbiased per-batch variances.
    means = torch.stack([b.mean(dim=(0, 2, 3)) for b in batches])
    variances = torch.stack([b.var(dim=(0, 2, 3), unbiased=True) for b in batches])
    assert torch.allclose(model[0].running_mean, means.mean(dim=0), atol=1e-5)
    assert torch.allclose(model[0].running_var, variances.mean(dim=0), atol=1e-5)
    assert model[0].momentum == 0.1
    assert not model.training and not model[0].training


def test_recalibrate_batchnorm_restores_train_mode_and_rejects_no_batches() -> None:
    model = nn.Sequential(nn.BatchNorm2d(3))
    model.train()
    before = model[0].running_mean.clone()
    recalibrate_batchnorm(model, [torch.ones(2, 3, 2, 2)], "cpu")
    assert model.training
    assert torch.equal(model[0].running_mean, torch.ones(3))
    model[0].running_mean.copy_(before)
    with pytest.raises(ValueError, match="no batches"):
        recalibrate_batchnorm(model, [], "cpu")
    assert torch.equal(model[0].running_mean, before)
