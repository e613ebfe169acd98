"""The mean teacher of DUDA self-training and its batch-norm recalibration.

This module owns the teacher's parameter averaging (docs/method.md#the-mean-teacher,
docs/method.md#mean-and-ema-teachers): by default the equal-weight running mean of every student
snapshot since the start (torch's `AveragedModel` with its default average, which the original code
uses), optionally an exponential moving average. Only parameters are averaged; the teacher's
batch-norm buffers are its own and are recomputed by `recalibrate_batchnorm` before evaluation and
saving. The number of averaged snapshots is a buffer, so it is saved and restored with the teacher's
state dict. `StudentAsTeacher` is the ablation without a teacher.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any, Literal

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from stages.runtime.devices import autocast

TeacherMode = Literal["mean", "ema"]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel / DataParallel wrapper, else `model`."""
    wrapped = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    return model.module if isinstance(model, wrapped) else model


class MeanTeacher(nn.Module):
    """A deep copy of the student whose parameters follow the student's running mean or EMA.

    After construction the teacher equals the student and `n_averaged` is 1
    (docs/method.md#starting-state: `AveragedModel(S)` followed by one update). `update(student)`
    then applies
      mean: θ_T ← θ_T + (θ_S − θ_T)/(n + 1), n ← n + 1, so θ_T is the mean of all n snapshots;
      ema:  θ_T ← d·θ_T + (1 − d)·θ_S,       n ← n + 1.
    Calling the teacher calls the wrapped model. State dict keys are `module.<name>` plus
    `n_averaged`, as in the original checkpoints (docs/method.md#the-mean-teacher).
    """

    n_averaged: torch.Tensor

    def __init__(
        self, student: nn.Module, mode: TeacherMode = "mean", ema_decay: float = 0.999
    ) -> None:
        super().__init__()
        if mode not in ("mean", "ema"):
            raise ValueError(f"teacher mode {mode!r} is not one of 'mean', 'ema'")
        if not 0.0 <= ema_decay <= 1.0:
            raise ValueError(f"ema_decay = {ema_decay} is outside [0, 1]")
        self.mode: TeacherMode = mode
        self.ema_decay = ema_decay
        self.module = copy.deepcopy(unwrap_model(student))
        for parameter in self.module.parameters():
            parameter.requires_grad_(False)
        self.register_buffer("n_averaged", torch.tensor(1, dtype=torch.long))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    @torch.no_grad()
    def update(self, student: nn.Module) -> None:
        """Fold the student's current parameters into the teacher
        (docs/method.md#one-step-in-execution-order)."""
        teacher_parameters = list(self.module.parameters())
        student_parameters = list(unwrap_model(student).parameters())
        if len(teacher_parameters) != len(student_parameters):
            raise ValueError(
                f"student has {len(student_parameters)} parameter tensors, the teacher "
                f"{len(teacher_parameters)}: the teacher was built from another architecture"
            )
        if self.mode == "mean":
            weight = 1.0 / (int(self.n_averaged.item()) + 1)
        else:
            weight = 1.0 - self.ema_decay
        sources = [
            source.detach().to(device=target.device, dtype=target.dtype)
            for target, source in zip(teacher_parameters, student_parameters, strict=True)
        ]
        # lerp(θ_T, θ_S, w) = θ_T + w·(θ_S − θ_T), torch's AveragedModel update.
        torch._foreach_lerp_(teacher_parameters, sources, weight)
        self.n_averaged += 1


class StudentAsTeacher:
    """The ablation without a teacher: the student itself, called under `no_grad` where the
    method calls the teacher (online labels, consistency target, offline update).

    It has nothing of its own to average, save or restore: `update` does nothing and its state
    dict is empty. `module` is the bare student (outside any DDP wrapper)."""

    def __init__(self, student: nn.Module) -> None:
        self.module = unwrap_model(student)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    @property
    def training(self) -> bool:
        return self.module.training

    def train(self, mode: bool = True) -> StudentAsTeacher:
        self.module.train(mode)
        return self

    def eval(self) -> StudentAsTeacher:
        return self.train(False)

    def update(self, student: nn.Module) -> None:
        """Nothing to fold in: the teacher is the student."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def _batchnorm_modules(model: nn.Module) -> list[_BatchNorm]:
    return [module for module in model.modules() if isinstance(module, _BatchNorm)]


def batchnorm_statistics(model: nn.Module) -> list[torch.Tensor]:
    """The running mean and variance buffers of every batch norm of `model` (what
    `recalibrate_batchnorm` recomputes), e.g. to share them across ranks."""
    return [buffer for norm in _batchnorm_modules(model) if norm.track_running_stats
            for buffer in (norm.running_mean, norm.running_var)]


@torch.no_grad()
def recalibrate_batchnorm(
    model: nn.Module, batches: Iterable[torch.Tensor], device: torch.device | str,
    precision: str = "fp32",
) -> int:
    """Recompute every batch-norm running mean/var as the cumulative average over `batches`.

    docs/method.md#batch-norm-recalibration: reset the running statistics to 0/1, set momentum to
    None (a cumulative average), run the model in train mode without gradients over the
    batches, then restore the momenta and each module's previous train/eval mode.
    batches: (B, 3, H, W) float tensors (or tuples/lists whose first element is one).
    Returns the number of batches seen. With no batch (or an error while running) the old
    statistics are restored and the error raised, rather than leaving reset 0/1 statistics.
    """
    norms = _batchnorm_modules(model)
    if not norms:
        return 0
    momenta = {norm: norm.momentum for norm in norms}
    saved = {norm: {k: v.clone() for k, v in norm.state_dict().items()} for norm in norms}
    modes = {module: module.training for module in model.modules()}
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    model.train()
    seen = 0
    try:
        for batch in batches:
            if isinstance(batch, (tuple, list)):
                batch = batch[0]
            with autocast(torch.device(device), precision):
                model(batch.to(device, non_blocking=True))
            seen += 1
        if seen == 0:
            raise ValueError("recalibrate_batchnorm got no batches; statistics left unchanged")
    except BaseException:
        for norm in norms:
            norm.load_state_dict(saved[norm])
        raise
    finally:
        for norm in norms:
            norm.momentum = momenta[norm]
        for module, training in modes.items():
            module.training = training
    return seen
