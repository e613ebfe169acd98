"""Device selection: `--device auto|cpu|cuda`, the autocast context for mixed precision, and
worker counts derived from the CPU cores a process may use."""

from __future__ import annotations

import contextlib
import os
from typing import Literal

import torch

from stages.runtime.errors import DudaError

DeviceName = Literal["auto", "cpu", "cuda"]


# `auto` never starts more loader processes than this per loader.
MAX_AUTO_WORKERS = 8


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, e.g. under a batch scheduler)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def worker_count(setting: int | str, loaders: int = 1) -> int:
    """The worker processes of one of `loaders` loaders that run at once in this process.

    An integer is used as given. `auto`: the cores of this machine shared by the processes of
    a torchrun job on it (LOCAL_WORLD_SIZE), one core left to the process that drives the
    model, the rest split between its loaders (at most MAX_AUTO_WORKERS each); 0 means decoding
    on a background thread. E.g. 16 cores, 2 GPU processes, 2 training loaders: 3 each.
    """
    if setting != "auto":
        return int(setting)
    processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    spare = max(1, available_cores() // processes) - 1
    return min(MAX_AUTO_WORKERS, spare // max(1, loaders))


def evaluation_workers(setting: int | str, device: torch.device) -> int:
    """Loader processes of a training stage's periodic evaluation (BN recalibration and
    target-val): the training runtime's count on a GPU; on the CPU none, the decoding running on
    a background thread, since a process would take a core from the model it feeds."""
    return worker_count(setting) if device.type == "cuda" else 0


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when available (the local rank's GPU under torchrun), else the CPU."""
    if name not in ("auto", "cpu", "cuda"):
        raise DudaError(f"unknown device {name!r}", "use --device auto, cpu or cuda")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DudaError("--device cuda was asked for but no CUDA device is available",
                        "use --device cpu or --device auto")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast for bf16/fp16 on CUDA; the CPU path always stays fp32."""
    if device.type != "cuda" or precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast("cuda", dtype=dtype)
