"""Initial weights from local files: ImageNet backbones, project checkpoints, external DeepLabV2s.

Three sources are accepted, each through an explicit key translation followed by a shape check
on every tensor (ALGORITHM.md B.1, E.9 #16: never positional):
- a torchvision ImageNet ResNet state dict (`conv1.*`, `bn1.*`, `layer1..4.*`, `fc.*`): the
  backbone is loaded, `fc` is ignored, the classifier keeps its initialisation;
- a project checkpoint artifact directory (or its `model.pt`): the teacher if it has one,
  else the student;
- a DeepLabV2 checkpoint of the AdaptSegNet / FDA / DUDA lineage. AdaptSegNet and FDA name the
  ResNet `conv1`, `bn1`, `layer1..4` and the ASPP `layer5.conv2d_list.{0..3}`; DUDA prefixes
  `module.`, puts the ResNet under `backbone.` and the ASPP under `decoder.` and saves the
  mean teacher's `n_averaged` counter, which is dropped.
The Caffe-ported ResNet of that lineage has the same tensors as torchvision's, but puts the
stride in the first 1×1 conv of a block and pools with ceil_mode; those are layout, not weight,
differences, so its tensors load here unchanged.
Unmatched, missing or mis-shaped keys are listed in the error (the first ten and a count).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from stages.artifacts import MANIFEST
from stages.checkpoint import MODEL_FILE, load_checkpoint_manifest, load_torch
from stages.errors import DudaError

Format = Literal["torchvision", "adaptsegnet", "duda", "project"]

# (pattern on the checkpoint key after the `module.` prefix is stripped, replacement).
KEY_RULES: dict[str, list[tuple[str, str]]] = {
    "torchvision": [
        (r"^(conv1|bn1|layer[1-4])\.(.+)$", r"backbone.\1.\2"),
    ],
    # AdaptSegNet `model/deeplab.py` ResNetMulti / FDA `model/deeplab.py` (Caffe port).
    "adaptsegnet": [
        (r"^(conv1|bn1|layer[1-4])\.(.+)$", r"backbone.\1.\2"),
        (r"^layer5\.conv2d_list\.([0-9]+)\.(weight|bias)$", r"classifier.branches.\1.\2"),
    ],
    # DUDA `models/backbones/resnet.py`, `models/decoders/{deeplabv2_decoder,aspp}.py`.
    "duda": [
        (r"^backbone\.(conv1|bn1|layer[1-4])\.(.+)$", r"backbone.\1.\2"),
        (r"^decoder\.(?:aspp\.)?(?:conv2d_list|convs|branches)\.([0-9]+)\.(weight|bias)$",
         r"classifier.branches.\1.\2"),
    ],
    "project": [
        (r"^(backbone\..+)$", r"\1"),
        (r"^(classifier\.branches\.[0-9]+\.(?:weight|bias))$", r"\1"),
    ],
}

# Checkpoint keys that carry no weights and are dropped before translation.
DROPPED = re.compile(r"^(n_averaged|fc\.(weight|bias))$")

DESCRIPTIONS: dict[str, str] = {
    "torchvision": "a torchvision ImageNet ResNet backbone",
    "adaptsegnet": "an AdaptSegNet/FDA DeepLabV2",
    "duda": "a DUDA DeepLabV2",
    "project": "a duda model",
}


def detect_format(keys: list[str]) -> Format:
    """Tell the lineage of a state dict from its key names (after stripping `module.`)."""
    key_set = set(keys)
    if any(k.startswith("classifier.branches.") for k in key_set):
        return "project"
    if any(k.startswith("decoder.") for k in key_set) or any(
            k.startswith("backbone.") for k in key_set):
        return "duda"
    if any(k.startswith("layer5.") for k in key_set):
        return "adaptsegnet"
    if "conv1.weight" in key_set and any(k.startswith("layer1.") for k in key_set):
        return "torchvision"
    raise DudaError(f"cannot tell which model these weights belong to (keys such as "
                    f"{', '.join(sorted(keys)[:5])})",
                    "pass a torchvision ResNet state dict, a duda checkpoint artifact, or an "
                    "AdaptSegNet/FDA/DUDA DeepLabV2 checkpoint")


def translate(state: dict[str, torch.Tensor], fmt: Format) -> tuple[dict[str, torch.Tensor],
                                                                    list[str]]:
    """Rename checkpoint keys into the model's names: (translated, untranslatable keys)."""
    rules = [(re.compile(pattern), replacement) for pattern, replacement in KEY_RULES[fmt]]
    translated: dict[str, torch.Tensor] = {}
    unmatched: list[str] = []
    for key, value in state.items():
        if DROPPED.match(key):
            continue
        for pattern, replacement in rules:
            if pattern.match(key):
                translated[pattern.sub(replacement, key)] = value
                break
        else:
            unmatched.append(key)
    return translated, unmatched


def _listing(items: list[str], limit: int = 10) -> str:
    shown = "; ".join(items[:limit])
    return shown + (f"; … and {len(items) - limit} more" if len(items) > limit else "")


def _strip_module(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key.removeprefix("module."): value for key, value in state.items()}


def _read_state(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """The weight tensors stored at `path` and what they are (for the description)."""
    if path.is_dir():
        if not (path / MANIFEST).is_file():
            raise DudaError(f"initial weights {path} is a directory but not a checkpoint "
                            "artifact (no manifest.json)",
                            "pass a checkpoint artifact directory or a weights file")
        load_checkpoint_manifest(path)
        path = path / MODEL_FILE
    data = load_torch(path)
    if "student" in data and "model_config" in data:
        if data.get("teacher") is not None:
            return data["teacher"], f"the teacher of duda checkpoint {path}"
        return data["student"], f"the student of duda checkpoint {path}"
    for container in ("state_dict", "model_state", "model"):
        if isinstance(data.get(container), dict):
            data = data[container]
            break
    tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise DudaError(f"initial weights {path} hold no tensors",
                        "pass a state dict saved with torch.save(model.state_dict(), path)")
    return tensors, str(path)


def load_initial_weights(model: nn.Module, path: str | Path) -> str:
    """Load the weights at `path` into `model` by name with shape checks; return what was loaded.

    Raises DudaError listing untranslatable, unexpected, mis-shaped or missing keys. For a
    torchvision backbone the classifier (`classifier.*`) is allowed to stay as initialised;
    otherwise every model tensor must be provided (BN `num_batches_tracked` excepted).
    """
    path = Path(path)
    if not path.exists():
        raise DudaError(f"initial weights {path} do not exist",
                        "pass an existing file or checkpoint artifact to --init")
    state, source = _read_state(path)
    state = _strip_module(state)
    fmt = detect_format(list(state))
    translated, unmatched = translate(state, fmt)
    own = model.state_dict()
    problems: list[str] = [f"{key}: no counterpart in the model" for key in unmatched]
    problems += [f"{key} (from the file): not in the model" for key in translated
                 if key not in own]
    problems += [f"{key}: file {tuple(value.shape)} vs model {tuple(own[key].shape)}"
                 for key, value in translated.items()
                 if key in own and tuple(value.shape) != tuple(own[key].shape)]
    optional = re.compile(r"num_batches_tracked$" + (r"|^classifier\." if fmt == "torchvision"
                                                     else ""))
    missing = [key for key in own if key not in translated and not optional.search(key)]
    problems += [f"{key}: missing from the file" for key in missing]
    if problems:
        raise DudaError(f"initial weights {path} ({DESCRIPTIONS[fmt]}) do not fit the "
                        f"model: {len(problems)} problem(s): {_listing(problems)}",
                        "use weights of the configured backbone (model.backbone, "
                        "model.width_multiplier) and number of classes")
    with torch.no_grad():
        for key, value in translated.items():
            own[key].copy_(value.to(own[key].dtype))
    parts = "backbone" if fmt == "torchvision" else "backbone and classifier"
    return (f"{DESCRIPTIONS[fmt]} from {source}: {len(translated)} tensors ({parts})")
