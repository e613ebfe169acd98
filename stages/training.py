"""Small pieces every training loop shares: optimizer, learning rate, RNG state, metrics, resume.

The training stages (`warmup`, `self_train`) each own one readable loop; this module holds the
few helpers they have in common, never the loop itself. Everything a resumed run needs is
returned as plain tensors, numbers, strings, lists and dicts, so that the training state
loads with `torch.load(weights_only=True)` (PITFALLS.md "Checkpoints").
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stages.config import OptimizerConfig
from stages.errors import DudaError
from stages.schedules import lr_factor

TRAIN_STATE = "train_state.pt"
METRICS = "metrics.jsonl"


# ------------------------------------------------------------------------------ optimisation


def build_optimizer(groups: list[dict[str, Any]], cfg: OptimizerConfig) -> torch.optim.SGD:
    """SGD with (Nesterov) momentum over parameter groups (ALGORITHM.md B.2).

    Each group carries its own base `lr` (the backbone's is already scaled by its multiplier)
    and `weight_decay`; the base is kept as `initial_lr` so `apply_lr_factor` can rescale it.
    """
    prepared = []
    for group in groups:
        group = dict(group)
        group.setdefault("lr", cfg.lr)
        group.setdefault("weight_decay", cfg.weight_decay)
        group["initial_lr"] = group.get("base_lr", group["lr"])
        prepared.append(group)
    return torch.optim.SGD(prepared, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                           weight_decay=cfg.weight_decay)


def learning_rate_factor(t: int, total: int, cfg: OptimizerConfig) -> float:
    """The LR multiplier after t optimizer steps: linear warmup, then poly (ALGORITHM.md B.2)."""
    return lr_factor(t, total, warmup_iterations=cfg.warmup_iterations,
                     warmup_start=cfg.warmup_start, power=cfg.poly_power)


def apply_lr_factor(optimizer: torch.optim.Optimizer, factor: float) -> float:
    """Set every group's lr to initial_lr·factor; return the largest (the head's) lr."""
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * factor
    return max(group["lr"] for group in optimizer.param_groups)


# ---------------------------------------------------------------------------------- RNG state


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (every CUDA device too); cuDNN deterministic (B.2)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def capture_rng_state() -> dict[str, Any]:
    """Python, numpy, torch and CUDA generator states as weights_only-loadable values."""
    version, internal, gauss_next = random.getstate()
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64),
                   "gauss_next": gauss_next},
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)),
                  "position": int(position), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached_gaussian)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restore what `capture_rng_state` returned."""
    python = state["python"]
    random.setstate((python["version"], tuple(int(v) for v in python["state"].tolist()),
                     python["gauss_next"]))
    numpy = state["numpy"]
    np.random.set_state((numpy["name"], numpy["keys"].numpy().astype(np.uint32),
                         numpy["position"], numpy["has_gauss"], numpy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][:torch.cuda.device_count()])


# ------------------------------------------------------------------------------------ metrics


def append_metrics(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line (e.g. {"iteration": 50, "loss/source_ce": 1.2, "lr": 2e-3})."""
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")


def truncate_metrics(path: Path, iteration: int) -> None:
    """Drop the lines logged after `iteration`: a resumed run logs them again."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by the interruption
            continue
        if record.get("iteration", 0) <= iteration:
            kept.append(line)
    path.write_text("".join(line + "\n" for line in kept))


def check_finite(values: dict[str, float], iteration: int, stage: str, section: str) -> None:
    """Stop a run whose logged loss terms (keys "loss/…") are NaN or infinite."""
    bad = [name for name, value in values.items()
           if name.startswith("loss/") and not math.isfinite(value)]
    if bad:
        raise DudaError(f"{stage} diverged at iteration {iteration}: {', '.join(bad)} is not "
                        "finite",
                        f"lower {section}.optimizer.lr (or use precision fp32/bf16) and start "
                        "over with --force")


# ------------------------------------------------------------------------------------- resume


def save_train_state(path: Path, state: dict[str, Any]) -> None:
    """Write the full training state atomically (temp file + rename)."""
    from stages.checkpoint import save_torch

    save_torch(state, path)


def load_train_state(path: Path) -> dict[str, Any]:
    """Read a training state written by `save_train_state` (weights_only)."""
    from stages.checkpoint import load_torch

    return load_torch(path)


def flatten_config(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"warmup": {"optimizer": {"lr": 1}}} -> {"warmup.optimizer.lr": 1}."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten_config(value, name + "."))
        else:
            flat[name] = value
    return flat


def changed_fields(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """'key: old -> new' for every flattened key whose value differs (or exists on one side)."""
    old, new = flatten_config(stored), flatten_config(current)
    missing = object()

    def show(value: Any) -> str:
        return "(absent)" if value is missing else json.dumps(value)

    lines = []
    for key in sorted(old.keys() | new.keys()):
        before, after = old.get(key, missing), new.get(key, missing)
        if before != after:
            lines.append(f"{key}: {show(before)} -> {show(after)}")
    return lines


def check_resume_config(stored: dict[str, Any], current: dict[str, Any], where: Path) -> None:
    """Refuse to resume the run in `where` with a config other than the one it started with."""
    changes = changed_fields(stored, current)
    if changes:
        raise DudaError(f"cannot resume {where}: the config differs from the one the run "
                        "started with:\n    " + "\n    ".join(changes),
                        "resume with the original values, or start over with --force")
