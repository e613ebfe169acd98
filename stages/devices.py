"""Device selection: `--device auto|cpu|cuda`, and the autocast context for mixed precision."""

from __future__ import annotations

import contextlib
import os
from typing import Literal

import torch

from stages.errors import DudaError

DeviceName = Literal["auto", "cpu", "cuda"]


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
