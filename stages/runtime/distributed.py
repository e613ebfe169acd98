"""Multi-process helpers for stages run under `torchrun`: ranks, reductions, data-parallel
training, a silent reporter.

A single process (no WORLD_SIZE) gets a no-op `Ranks`; under torchrun the process group is
initialised with NCCL on GPUs and gloo on the CPU.

Data-parallel training (`Ranks.data_parallel`) wraps the student in PyTorch's
DistributedDataParallel, which averages the gradients of every backward pass over the ranks, so
N ranks with batch b take the step one process takes with batch N·b. Batch norm is then the one
difference: each rank would normalise its own b images. With `sync_batchnorm` the statistics
are computed over all N·b images: torch's `SyncBatchNorm` on GPUs, and on the CPU (where torch's
version refuses to run) `ProcessGroupBatchNorm`, the same computation written with
differentiable all-reduces that gloo supports.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import warnings
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_functional
from torch import nn

from stages.runtime.devices import resolve_device
from stages.runtime.errors import DudaError
from stages.runtime.progress import Reporter, Task
from stages.runtime.seeding import seed_everything

COLLECTIVE_TIMEOUT_MINUTES = 60

T = TypeVar("T")

# The autograd-aware all-reduce ProcessGroupBatchNorm needs; its suggested replacement is private.
warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.all_reduce",
                        category=FutureWarning)


@contextlib.contextmanager
def process_group(device: str = "auto") -> Iterator[Ranks]:
    """The ranks of one stage: the device resolved, and under torchrun the process group started
    (NCCL on GPUs, gloo on the CPU) for the stage and ended after it."""
    ranks = Ranks(resolve_device(device))
    try:
        yield ranks
    finally:
        ranks.close()


class Ranks:
    """This process's rank and the world size; a no-op for a single process.

    `compute_device` is where the stage runs its models; `device` is where collectives reduce
    (the GPU for NCCL, the CPU for gloo)."""

    def __init__(self, device: torch.device) -> None:
        self.compute_device = device
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self._owns_group = False
        if self.world_size > 1 and not dist.is_initialized():
            if device.type == "cuda":
                torch.cuda.set_device(device)
            # Ranks wait while rank 0 alone evaluates or recalibrates during training.
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                    timeout=datetime.timedelta(minutes=COLLECTIVE_TIMEOUT_MINUTES))
            self._owns_group = True
        self.rank = dist.get_rank() if self.world_size > 1 else 0
        # nccl reduces tensors on the GPU, gloo on the CPU.
        self.device = device if (self.world_size > 1 and device.type == "cuda") else (
            torch.device("cpu"))

    def close(self) -> None:
        """End the process group this object started."""
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()
        self._owns_group = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def reporter(self, reporter: Reporter | None) -> Reporter:
        """`reporter` (or the logging default) on rank 0; the others report nothing."""
        return (reporter or Reporter()) if self.is_main else Silent()

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def sum(self, array: np.ndarray) -> np.ndarray:
        """Element-wise sum over ranks of an int64 (or float64) array."""
        if self.world_size == 1:
            return array
        tensor = torch.from_numpy(np.ascontiguousarray(array)).to(self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor.cpu().numpy()

    def broadcast(self, value: Any) -> Any:
        """Rank 0's `value` on every rank."""
        if self.world_size == 1:
            return value
        holder = [value]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]

    def on_main(self, function: Callable[[], T]) -> T:
        """Run `function` on rank 0 only and hand its result, or its DudaError, to every rank
        (so a user error stops every rank alike instead of leaving the others waiting)."""
        outcome: tuple[bool, Any] | None = None
        if self.is_main:
            try:
                outcome = (True, function())
            except DudaError as error:
                outcome = (False, error)
        outcome = self.broadcast(outcome)
        assert outcome is not None
        succeeded, value = outcome
        if not succeeded:
            raise value
        return value

    def gather(self, value: Any) -> list[Any]:
        """Every rank's `value`, in rank order, on every rank."""
        if self.world_size == 1:
            return [value]
        values: list[Any] = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    def average(self, tensors: list[torch.Tensor]) -> None:
        """Replace each floating-point tensor by its mean over ranks, in place."""
        if self.world_size == 1:
            return
        tensors = [t for t in tensors if t.is_floating_point()]
        if not tensors:
            return
        flat = torch.cat([t.detach().reshape(-1).to(self.device, torch.float64)
                          for t in tensors])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= self.world_size
        offset = 0
        for tensor in tensors:
            count = tensor.numel()
            tensor.data.copy_(flat[offset:offset + count].view_as(tensor))
            offset += count

    def average_gradients(self, module: nn.Module) -> None:
        """Average the gradients of `module`'s parameters over ranks (a model outside DDP)."""
        self.average([p.grad for p in module.parameters() if p.grad is not None])

    def broadcast_tensors(self, tensors: list[torch.Tensor]) -> None:
        """Copy rank 0's tensors into every rank's, in place."""
        if self.world_size == 1:
            return
        for tensor in tensors:
            buffer = tensor.detach().to(self.device)
            dist.broadcast(buffer, src=0)
            tensor.data.copy_(buffer)

    def data_parallel(self, model: nn.Module, sync_batchnorm: bool) -> nn.Module:
        """The model to call for training steps: `model` itself for one process, else a
        DistributedDataParallel wrapper of it (after converting its batch norm to synchronised
        batch norm when asked). Call it after the optimizer holds the model's parameters and
        after any weights were loaded: the wrapper starts every rank from rank 0's weights."""
        if self.world_size == 1:
            return model
        if sync_batchnorm:
            convert_batchnorm(model, self.device)
        device = next(model.parameters()).device
        return nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    # ------------------------------------------------------------------------ training

    def announce(self, reporter: Reporter, batches: str) -> None:
        if self.world_size > 1:
            reporter.info(f"{self.world_size} processes ({dist.get_backend()}), {batches}")

    def seed_apart(self, seed: int) -> None:
        """Give each rank its own torch/numpy/python random stream (dropout), once the models
        every rank must build alike are built. A single process keeps its seeded stream."""
        if self.world_size > 1:
            seed_everything(int(np.random.SeedSequence([seed, self.rank]).generate_state(1)[0]))

    def mean_of(self, values: dict[str, Any]) -> dict[str, Any]:
        """The mean over ranks of each logged value (NaN ones left out; lists element-wise)."""
        if self.world_size == 1:
            return values
        gathered = self.gather(values)
        merged: dict[str, Any] = {}
        for key, value in values.items():
            column = np.array([entry[key] for entry in gathered], dtype=np.float64)
            finite = ~np.isnan(column)
            mean = (np.where(finite, column, 0).sum(axis=0)
                    / np.maximum(finite.sum(axis=0), 1))
            mean = np.where(finite.any(axis=0), mean, np.nan)
            merged[key] = mean.tolist() if isinstance(value, list) else float(mean)
        return merged

    def check_resume(self, state: dict[str, Any], where: Any) -> None:
        """Refuse to resume a run saved by another number of processes: its loader positions
        count batches of that world size."""
        saved = int(state.get("world_size", 1))
        if saved != self.world_size:
            launch = ("without torchrun" if saved == 1
                      else f"with {saved} processes in all (torchrun --nproc_per_node {saved} "
                      "on one node)")
            raise DudaError(f"cannot resume {where}: it was trained by {saved} process(es), "
                            f"this launch has {self.world_size}",
                            f"resume it {launch}, or start over with --force")

    def rng_state_of_rank(self, state: dict[str, Any]) -> dict[str, Any]:
        """This rank's random-generator states out of a saved training state."""
        rng = state["rng"]
        return rng[self.rank] if isinstance(rng, list) else rng

    def describe(self, device: torch.device, precision: str, sync_batchnorm: bool,
                 batch: int) -> dict[str, Any]:
        """The run's layout for the artifact summary: what actually ran (`batch`: the crops of
        one step over all processes)."""
        return {"processes": self.world_size,
                "batch_per_step": batch,
                "precision": precision if device.type == "cuda" else "fp32",
                "sync_batchnorm": sync_batchnorm and self.world_size > 1}

    def mine(self, count: int, batch_size: int) -> list[int]:
        """The image indices this rank handles: whole batches of the single-process order, in
        turn, so every batch (and so every result) is the one a single process computes."""
        return [i for i in range(count) if (i // batch_size) % self.world_size == self.rank]


class Silent(Reporter):
    """The reporter of ranks other than 0: they report nothing."""

    def task(self, description: str, total: int | None, completed: int = 0,
             log_every: int = 0) -> Task:
        return Task(description, total, completed, 0)

    def info(self, message: str) -> None:
        pass


# ------------------------------------------------------------------ synchronised batch norm


class ProcessGroupBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training-mode statistics are those of all ranks' batches together.

    The per-channel sums of x and x² and the pixel count are all-reduced with the autograd-aware
    `torch.distributed.nn.functional.all_reduce`, so the backward pass sums the gradients of the
    statistics over the ranks as well: the gradients equal those of one process holding every
    rank's batch. Running statistics follow `nn.BatchNorm2d` (unbiased variance, `momentum`, or
    a cumulative average when it is None). Outside training, or without a process group, it is
    a plain BatchNorm2d. Works on every backend (gloo included), unlike torch's SyncBatchNorm.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        channels = x.shape[1]
        local = torch.cat([x.sum(dim=(0, 2, 3)), (x * x).sum(dim=(0, 2, 3)),
                           x.new_full((1,), x.numel() / channels)])
        total = dist_functional.all_reduce(local)
        count = total[-1]
        mean = total[:channels] / count
        variance = (total[channels:2 * channels] / count - mean * mean).clamp_min(0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                factor = (1.0 / float(self.num_batches_tracked) if self.momentum is None
                          else self.momentum)
                unbiased = variance * (count / (count - 1).clamp_min(1))
                self.running_mean.lerp_(mean.detach(), factor)
                self.running_var.lerp_(unbiased.detach(), factor)
        shape = (1, channels, 1, 1)
        y = (x - mean.view(shape)) * torch.rsqrt(variance + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


def convert_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Replace every BatchNorm2d of `model` in place by a synchronised one that keeps its
    parameters (the same tensors, so an optimizer holding them still works) and buffers:
    torch's SyncBatchNorm on CUDA, ProcessGroupBatchNorm elsewhere."""
    for name, child in list(model.named_children()):
        if type(child) is nn.BatchNorm2d:
            sync: nn.BatchNorm2d | nn.SyncBatchNorm
            if device.type == "cuda":
                sync = nn.SyncBatchNorm(child.num_features, child.eps, child.momentum,
                                        child.affine, child.track_running_stats)
            else:
                sync = ProcessGroupBatchNorm(child.num_features, child.eps, child.momentum,
                                             child.affine, child.track_running_stats)
            if child.affine:
                sync.weight, sync.bias = child.weight, child.bias
            if child.track_running_stats:
                sync.running_mean, sync.running_var = child.running_mean, child.running_var
                sync.num_batches_tracked = child.num_batches_tracked
            sync.train(child.training)
            setattr(model, name, sync)
        else:
            convert_batchnorm(child, device)
    return model
