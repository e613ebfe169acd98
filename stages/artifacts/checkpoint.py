"""Checkpoint files and checkpoint artifacts (`duda.checkpoint`): writing, reading, validating.

A checkpoint artifact holds `model.pt` = {"student": state_dict, "teacher": state_dict | None,
"model_config": ModelConfig as JSON, "class_names": [...], "iteration": int}, optionally
`best.pt` in the same format, `train_state.pt` (the resumable training state) and
`metrics.jsonl`. Every file is written through a temporary file and `os.replace`, so a crash
never leaves a half-written checkpoint under its final name, and read with
`torch.load(weights_only=True)`: only tensors, numbers, strings, lists and dicts.
"""

from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import ValidationError
from torch import nn

from stages.artifacts.manifest import CHECKPOINT, Manifest, atomic_open, load_artifact
from stages.config import ModelConfig, parse_model_config
from stages.runtime.errors import DudaError

MODEL_FILE = "model.pt"
BEST_FILE = "best.pt"
TRAIN_STATE_FILE = "train_state.pt"
METRICS_FILE = "metrics.jsonl"

logger = logging.getLogger("duda")

Which = Literal["teacher", "student"]


def save_torch(obj: Any, path: str | Path) -> None:
    """`torch.save` to a temporary file beside `path`, fsync, then swap it in atomically."""
    with atomic_open(Path(path)) as handle:
        torch.save(obj, handle)


def load_torch(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint file on the CPU with `weights_only=True`.

    A missing file, one that is truncated, corrupt or not a torch file at all, and one holding
    Python objects that weights-only loading refuses (a pickle that would run code; it is never
    executed) are each a DudaError naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise DudaError(f"checkpoint file {path} does not exist",
                        "check the path, or rerun the stage that writes it")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "Weights only load failed" not in str(error):
            raise _unreadable(path, error) from None
        logger.debug("torch.load(%s) failed: %r", path, error)
        raise DudaError(f"{path} holds Python objects, not only tensors and plain values; "
                        "it was not loaded (loading it could run code)",
                        "save a plain state dict: torch.save(model.state_dict(), path)"
                        ) from None
    except Exception as error:  # noqa: BLE001 - torch.load raises many types on foreign bytes
        raise _unreadable(path, error) from None
    if not isinstance(data, dict):
        raise DudaError(f"checkpoint file {path} holds a {type(data).__name__}, not a dict",
                        "pass a checkpoint written by duda")
    return data


def _unreadable(path: Path, error: BaseException) -> DudaError:
    logger.debug("torch.load(%s) failed: %r", path, error)
    return DudaError(f"checkpoint file {path} is truncated or corrupt, or not a torch file",
                     "rerun the stage that wrote it (with --force), or use another file")


def model_state_dict(model: nn.Module | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The plain DeepLabV2 state dict (CPU copies) of a model, a wrapped model or a state dict.

    A mean-teacher or DDP wrapper's `module.` prefix and the teacher's `n_averaged` counter are
    dropped, so student and teacher entries of `model.pt` have the same keys.
    """
    if isinstance(model, nn.Module):
        while hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        state = model.state_dict()
    else:
        state = model
    clean = {}
    for key, value in state.items():
        if key == "n_averaged":
            continue
        clean[key.removeprefix("module.")] = value.detach().to("cpu", copy=True)
    return clean


def write_model_file(path: str | Path, *, student: nn.Module | dict[str, torch.Tensor],
                     teacher: nn.Module | dict[str, torch.Tensor] | None,
                     model_config: ModelConfig, class_names: list[str] | tuple[str, ...],
                     iteration: int) -> None:
    """Write `model.pt` (or `best.pt`) atomically in the format described above."""
    save_torch({
        "student": model_state_dict(student),
        "teacher": model_state_dict(teacher) if teacher is not None else None,
        "model_config": model_config.model_dump(mode="json"),
        "class_names": list(class_names),
        "iteration": int(iteration),
    }, path)


def load_checkpoint_manifest(path: str | Path) -> Manifest:
    """Validate that `path` is a finished checkpoint artifact and return its manifest."""
    return load_artifact(path, CHECKPOINT)


@dataclass
class LoadedModel:
    """A model restored from a checkpoint artifact, in eval mode on the requested device.

    `which` says which weights were loaded: "teacher", "student", or "student (the checkpoint
    has no teacher)" when the teacher was asked for but the checkpoint has none.
    """

    model: nn.Module
    model_config: ModelConfig
    class_names: list[str]
    manifest: Manifest
    which: str
    iteration: int
    path: Path

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def read_model_file(path: Path) -> tuple[dict[str, Any], ModelConfig, list[str]]:
    """Load and validate a `model.pt`-format file: (content, model config, class names)."""
    data = load_torch(path)
    missing = [key for key in ("student", "model_config", "class_names") if key not in data]
    if missing:
        raise DudaError(f"checkpoint file {path} lacks {', '.join(missing)}: it is not a duda "
                        "model file", "pass a checkpoint artifact written by duda")
    try:
        model_config = parse_model_config(data["model_config"])
    except ValidationError as error:
        raise DudaError(f"checkpoint file {path} has an invalid model config: "
                        f"{str(error).splitlines()[0]}",
                        "it was written by an incompatible version of duda; retrain it") from None
    return data, model_config, [str(name) for name in data["class_names"]]


def load_model(checkpoint_dir: str | Path, which: Which = "teacher",
               device: torch.device | str = "cpu", file: str = MODEL_FILE) -> LoadedModel:
    """Build the model of a checkpoint artifact and load its teacher or student weights.

    The teacher is asked for by default (the mean teacher is what DUDA evaluates,
    docs/method.md#evaluation-during-training); a checkpoint without one (a warm-up checkpoint)
    falls back to its student and says so in `LoadedModel.which`.
    """
    from stages.nn.model import build_model

    checkpoint_dir = Path(checkpoint_dir)
    manifest = load_checkpoint_manifest(checkpoint_dir)
    path = checkpoint_dir / file
    data, model_config, class_names = read_model_file(path)
    state = data.get("teacher") if which == "teacher" else data["student"]
    loaded_which = which
    if state is None:
        state = data["student"]
        loaded_which = "student (the checkpoint has no teacher)"
    # Built on the meta device and filled by assignment: no time spent on a random init.
    with torch.device("meta"):
        model = build_model(model_config, len(class_names))
    try:
        model.load_state_dict(state, assign=True)
    except RuntimeError as error:
        raise DudaError(f"checkpoint file {path}: the {which} weights do not fit the model "
                        f"{model_config.describe()} it describes "
                        f"({str(error).splitlines()[0]})",
                        "the file is damaged or was edited; rerun the stage that wrote it") from None
    model.to(device).eval()
    return LoadedModel(model=model, model_config=model_config, class_names=class_names,
                       manifest=manifest, which=loaded_which,
                       iteration=int(data.get("iteration", 0)), path=checkpoint_dir)


def check_compatible(loaded: LoadedModel, class_names: list[str] | tuple[str, ...],
                     model_config: ModelConfig | None = None, what: str = "the dataset index",
                     ) -> None:
    """Refuse a checkpoint whose classes (or backbone, if `model_config` is given) differ from
    what the consumer expects; the message names both sides."""
    names = tuple(class_names)
    if tuple(loaded.class_names) != names:
        if len(loaded.class_names) != len(names):
            detail = f"{len(loaded.class_names)} classes but {what} has {len(names)}"
        else:
            differ = [f"{i}: {a!r} vs {b!r}" for i, (a, b)
                      in enumerate(zip(loaded.class_names, names)) if a != b]
            detail = (f"the same number of classes ({len(names)}) but other names "
                      f"({'; '.join(differ[:3])})")
        raise DudaError(f"checkpoint {loaded.path} was trained for {detail}",
                        "use a checkpoint trained on the same class table as the dataset "
                        "index, or rebuild the index with the checkpoint's classes")
    if model_config is None:
        return
    theirs, ours = loaded.model_config, model_config
    if theirs.name != ours.name:
        raise DudaError(f"checkpoint {loaded.path} holds a {theirs.describe()} (model.name "
                        f"{theirs.name}) but the config asks for {ours.describe()} (model.name "
                        f"{ours.name})",
                        "set model.name and model.backbone to the checkpoint's, or use a "
                        "checkpoint of this model family")
    if theirs.describe() != ours.describe():
        raise DudaError(f"checkpoint {loaded.path} holds a {theirs.describe()} model but the "
                        f"config asks for {ours.describe()}",
                        "set model.backbone (and model.width_multiplier or model.head) to the "
                        "checkpoint's, or use a checkpoint of this backbone")
    differ = [f"model.{key} {getattr(theirs, key)!r} (checkpoint) vs {getattr(ours, key)!r} "
              "(config)" for key in ours.FUNCTION_KEYS
              if getattr(theirs, key) != getattr(ours, key)]
    if differ:
        raise DudaError(f"checkpoint {loaded.path} computes another function than the config "
                        f"describes: {'; '.join(differ)}",
                        "set these model keys to the checkpoint's values")
