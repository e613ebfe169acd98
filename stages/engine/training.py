"""Small pieces every training loop shares: optimizer, learning rate, RNG state, metrics, the
training state and progress, resume.

The training stages (`warmup`, `self_train`) each own one readable loop; this module holds the
few pieces they have in common, never the loop itself. `TrainState` is one plain dict of named
objects with `state_dict`/`load_state_dict` (models, optimizers, scalers, loaders, RNGs,
progress, the metrics log, the store snapshot) that saving and resuming both iterate, so the
list of what a run saves is written once. Everything is saved as plain tensors, numbers,
strings, lists and dicts, so the training state loads with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from stages.config import AdamwOptimizerConfig, OptimizerConfig, hashed_section
from stages.nn.model import parameter_groups
from stages.runtime.errors import DudaError
from stages.runtime.schedules import lr_factor
from stages.runtime.seeding import capture_rng_state, restore_rng_state

TENSORBOARD_DIR = "tensorboard"
EVENT_FILES = "events.out.tfevents.*"  # the names TensorBoard's event writer gives its files

if TYPE_CHECKING:
    from stages.runtime.distributed import Ranks


# ------------------------------------------------------------------------------ optimisation


def optimizer_groups(model: torch.nn.Module, cfg: OptimizerConfig) -> list[dict[str, Any]]:
    """`model`'s parameter groups under the chosen optimizer (docs/method.md#optimisation):
    sgd's backbone at lr × backbone_lr_multiplier and head at lr; adamw's backbone at lr and
    head at lr × head_lr_multiplier, each split into a decayed group and one without weight
    decay for the parameters named by `no_decay`."""
    if isinstance(cfg, AdamwOptimizerConfig):
        return parameter_groups(model, cfg.lr, 1.0, cfg.weight_decay,
                                head_lr_multiplier=cfg.head_lr_multiplier,
                                no_decay=cfg.no_decay)
    return parameter_groups(model, cfg.lr, cfg.backbone_lr_multiplier, cfg.weight_decay)


def build_optimizer(groups: list[dict[str, Any]], cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """The chosen optimizer over parameter groups (docs/method.md#optimisation): SGD with
    (Nesterov) momentum, or AdamW with `betas`.

    Each group carries its own base `lr` (already scaled by its multiplier) and
    `weight_decay`; the base is kept as `initial_lr` so `apply_lr_factor` can rescale it.
    """
    prepared = []
    for group in groups:
        group = dict(group)
        group.setdefault("lr", cfg.lr)
        group.setdefault("weight_decay", cfg.weight_decay)
        group["initial_lr"] = group.get("base_lr", group["lr"])
        prepared.append(group)
    if isinstance(cfg, AdamwOptimizerConfig):
        beta1, beta2 = cfg.betas
        return torch.optim.AdamW(prepared, lr=cfg.lr, betas=(beta1, beta2),
                                 weight_decay=cfg.weight_decay)
    return torch.optim.SGD(prepared, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                           weight_decay=cfg.weight_decay)


def learning_rate_factor(t: int, total: int, cfg: OptimizerConfig) -> float:
    """The LR multiplier after t optimizer steps: linear warmup from the variant's start (sgd: a
    fraction of lr; adamw: an absolute lr, as a fraction of lr), then poly
    (docs/method.md#optimisation)."""
    return lr_factor(t, total, warmup_iterations=cfg.warmup_iterations,
                     warmup_start=cfg.warmup_start_factor, power=cfg.poly_power)


def apply_lr_factor(optimizer: torch.optim.Optimizer, factor: float) -> float:
    """Set every group's lr to initial_lr·factor; return the largest (the head's) lr."""
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * factor
    return max(group["lr"] for group in optimizer.param_groups)


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


class LogWindow:
    """The values of each logged quantity since the last log step."""

    def __init__(self) -> None:
        self.values: dict[str, list[float | torch.Tensor]] = {}

    def add(self, name: str, value: float | torch.Tensor) -> None:
        self.values.setdefault(name, []).append(value)

    def add_all(self, values: dict[str, float | torch.Tensor]) -> None:
        for name, value in values.items():
            self.add(name, value)

    def means(self) -> dict[str, float]:
        """The mean of each quantity, NaN values left out (tensors are read from the device
        here, once per log interval, not every step)."""
        means = {}
        for name, values in self.values.items():
            finite = [v for v in (float(value) for value in values) if not math.isnan(v)]
            means[name] = sum(finite) / len(finite) if finite else float("nan")
        return means

    def clear(self) -> None:
        self.values = {}


def check_finite(values: dict[str, float], iteration: int, stage: str, section: str) -> None:
    """Stop a run whose logged loss terms (keys "loss/…") are NaN or infinite."""
    bad = [name for name, value in values.items()
           if name.startswith("loss/") and not math.isfinite(value)]
    if bad:
        raise DudaError(f"{stage} diverged at iteration {iteration}: {', '.join(bad)} is not "
                        "finite",
                        f"lower {section}.optimizer.lr (or use precision fp32/bf16) and start "
                        "over with --force")


# ------------------------------------------------------------------------- state and progress


class Stateful(Protocol):
    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> Any: ...


class RandomState:
    """Every rank's python, numpy, torch and CUDA generator states (a collective: every rank
    calls `state_dict`)."""

    def __init__(self, ranks: Ranks) -> None:
        self.ranks = ranks

    def state_dict(self) -> list[dict[str, Any]]:
        return self.ranks.gather(capture_rng_state())

    def load_state_dict(self, state: list[dict[str, Any]] | dict[str, Any]) -> None:
        restore_rng_state(state[self.ranks.rank] if isinstance(state, list) else state)


@dataclass
class Progress:
    """Where a run is and what its periodic evaluations found (model selection on the
    evaluation split: the best is reported beside the last)."""

    iteration: int = 0
    miou_last: float | None = None
    miou_best: float | None = None
    best_iteration: int | None = None

    def record_evaluation(self, miou: float) -> bool:
        """Record an evaluation at the current iteration; True if it is a new best."""
        self.miou_last = miou
        if self.miou_best is not None and miou <= self.miou_best:
            return False
        self.miou_best, self.best_iteration = miou, self.iteration
        return True

    def summary(self, protocol: str) -> dict[str, Any]:
        if self.miou_last is None:
            return {}
        return {"miou_last": self.miou_last, "miou_best": self.miou_best,
                "best_iteration": self.best_iteration, "best_protocol": protocol}

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for field in fields(self):
            setattr(self, field.name, state[field.name])


class MetricsLog:
    """`metrics.jsonl`: one JSON line per log step, written by rank 0, and with `tensorboard`
    the same values as TensorBoard scalars in `tensorboard/` beside it (a per-class list becomes
    one scalar per class). Its state is the iteration of the run's progress when saved;
    restoring drops the lines logged after it, which a resumed run logs again, and the event
    writer of a resumed run purges the events after it (`purge_step`)."""

    def __init__(self, path: Path, progress: Progress, writer: bool, tensorboard: bool = False,
                 class_names: Sequence[str] = ()) -> None:
        self.path = path
        self.progress = progress
        self.writer = writer
        self.tensorboard = tensorboard and writer
        self.class_names = list(class_names)
        self.events: Any = None  # the SummaryWriter, opened at the first record
        self.purge_step: int | None = None
        if self.tensorboard:
            summary_writer()  # a missing package is named before training starts

    @property
    def events_dir(self) -> Path:
        return self.path.parent / TENSORBOARD_DIR

    def start(self) -> None:
        """A new run: the files of an earlier, replaced run are removed."""
        if self.writer:
            self.path.unlink(missing_ok=True)
            for events in self.events_dir.glob(EVENT_FILES):  # only what the writer makes
                events.unlink()

    def append(self, record: dict[str, Any]) -> None:
        if not self.writer:
            return
        append_metrics(self.path, record)
        if self.tensorboard:
            self._scalars(record)

    def _scalars(self, record: dict[str, Any]) -> None:
        if self.events is None:
            self.events = summary_writer()(str(self.events_dir), purge_step=self.purge_step)
        step = int(record["iteration"])
        for key, value in record.items():
            if key == "iteration":
                continue
            if isinstance(value, list):
                names = self.class_names if len(value) == len(self.class_names) else (
                    [str(i) for i in range(len(value))])
                for name, item in zip(names, value, strict=True):
                    if isinstance(item, int | float):
                        self.events.add_scalar(f"{key}/{name}", item, step)
            elif isinstance(value, int | float) and not isinstance(value, bool):
                self.events.add_scalar(key, value, step)
        self.events.flush()

    def close(self) -> None:
        if self.events is not None:
            self.events.close()
            self.events = None

    def state_dict(self) -> dict[str, int]:
        return {"iteration": self.progress.iteration}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if self.writer:
            truncate_metrics(self.path, int(state["iteration"]))
            self.purge_step = int(state["iteration"]) + 1


def summary_writer() -> Any:
    """TensorBoard's SummaryWriter class, or a DudaError naming the extra that provides it."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise DudaError("logging.tensorboard needs the tensorboard package, which is not "
                        "installed", "pip install -e '.[report]' (or set "
                        "logging.tensorboard=false)") from None
    return SummaryWriter


class TrainState:
    """Everything a resumed run needs: named objects with `state_dict`/`load_state_dict`, saved
    together into one file with the run's identity (its config and inputs) and world size.

    `save` is called on every rank (the RNG entry gathers every rank's state); rank 0 writes.
    `load` refuses a run started with another config or number of processes, then restores the
    entries in order (put the RNG last, after anything that draws from it)."""

    def __init__(self, path: Path, stage: str, identity: dict[str, Any], ranks: Ranks,
                 entries: dict[str, Stateful]) -> None:
        self.path = path
        self.stage = stage
        self.identity = identity
        self.ranks = ranks
        self.entries = entries

    def save(self) -> None:
        from stages.artifacts.checkpoint import save_torch

        state = {name: entry.state_dict() for name, entry in self.entries.items()}
        if self.ranks.is_main:
            save_torch({"identity": self.identity, "world_size": self.ranks.world_size,
                        **state}, self.path)

    def load(self, where: Path) -> None:
        from stages.artifacts.checkpoint import load_torch

        state = load_torch(self.path)
        stored = dict(state["identity"])
        # What an older version recorded, under today's hashing rule (docs/design.md#configuration).
        stored["config"] = hashed_section(stored.get("config", {}), self.stage)
        check_resume_config(stored, self.identity, where)
        self.ranks.check_resume(state, where)
        missing = [name for name in self.entries if name not in state]
        if missing:
            raise DudaError(f"cannot resume {where}: its {self.path.name} lacks "
                            f"{', '.join(missing)} (written by another version of duda)",
                            "start over with --force")
        for name, entry in self.entries.items():
            entry.load_state_dict(state[name])


def per_process_batch(step_batch: int, world_size: int, micro_batches: int, key: str) -> int:
    """The crops one process takes per micro-batch when a step takes `step_batch` crops over
    `world_size` processes and `micro_batches` micro-batches each (docs/method.md#the-batch)."""
    parts = world_size * micro_batches
    if step_batch % parts:
        raise DudaError(f"{key} is {step_batch} crops per step, which {world_size} process(es) "
                        f"× {micro_batches} micro-batch(es) cannot share evenly",
                        f"set {key} to a multiple of {parts}, or launch another number of "
                        "processes")
    return step_batch // parts


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
