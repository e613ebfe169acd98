"""Multi-process helpers for stages run under `torchrun`: ranks, reductions, a silent reporter.

A single process (no WORLD_SIZE) gets a no-op `Ranks`; under torchrun the process group is
initialised with NCCL on GPUs and gloo on the CPU.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from stages.reporting import Reporter, Task


class Ranks:
    """This process's rank and the world size; a no-op for a single process."""

    def __init__(self, device: torch.device) -> None:
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if self.world_size > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        self.rank = dist.get_rank() if self.world_size > 1 else 0
        # nccl reduces tensors on the GPU, gloo on the CPU.
        self.device = device if (self.world_size > 1 and device.type == "cuda") else (
            torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

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
