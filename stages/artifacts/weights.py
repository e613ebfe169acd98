"""Initial weights from local files: ImageNet backbones, external DeepLabV2s, duda checkpoints.

Every source is mapped onto the model by an explicit key translation followed by a shape check
on every tensor, never by position, and the result is an `ImportReport`: which file tensor went
to which model tensor, which file tensors were left unused and why, which model tensors keep
their initial values. Accepted formats (`FORMATS`, detected from the key names):
- `torchvision`: a torchvision ImageNet ResNet (`conv1`, `bn1`, `layer1..4`, `fc`): the
  backbone is loaded, `fc` is unused, the classifier keeps its initialisation;
- `deeplab_init`: the Caffe-ported DeepLab ResNet-101 init of the AdaptSegNet / FDA lineage
  (`DeepLab_resnet_pretrained_init-f81d91e8.pth`, every key under `Scale.`): the backbone is
  loaded; its 21-class `layer5` classifier belongs to another label set and is unused;
- `adaptsegnet`: an AdaptSegNet / FDA DeepLabV2 (`conv1`, `bn1`, `layer1..4`, the ASPP
  `layer5.conv2d_list.{0..3}`); `adaptsegnet_multi`: AdaptSegNet's two-level model, whose
  `layer6` is the classifier on layer4 and whose `layer5` (on layer3) has no counterpart here;
- `duda_reference`: a snapshot of the DUDA reference code (`backbone.*`, the ASPP
  `decoder.aspp.conv2d_list.*`; a mean teacher adds `n_averaged` and a `module.` prefix, twice
  when the student was wrapped for data parallelism);
- `iast`: an IAST checkpoint (`backbone.*` with torchvision's unused `backbone.fc`,
  `decoder.aspp.conv2d_list.*`, and after the adversarial warm-up `discriminators.*`, unused);
- `duda`: a duda checkpoint artifact or its `model.pt` (the teacher if it has one, else the
  student), or a bare state dict of this project's model.
Any number of leading `module.` prefixes (data-parallel and mean-teacher wrappers) is dropped.

The layouts are not interchangeable. The Caffe-ported ResNet of the AdaptSegNet / FDA / DUDA
lineage has the same tensors as torchvision's but puts a block's stride in its first 1×1 conv,
dilates every block of layer3 and layer4, and pools with ceil_mode: the same weights compute a
different function in the two layouts (docs/method.md). Each format therefore has a lineage, and
its weights are only loaded into a model configured for it: `caffe` lineage (deeplab_init,
adaptsegnet, duda_reference) needs `model.style: caffe` and `model.normalization: caffe_bgr`;
`torchvision` lineage (torchvision, iast) needs `model.style: torchvision` and
`model.normalization: imagenet_rgb`; a duda checkpoint needs the style and normalization it
records. Everything else, and every unreadable or ill-fitting file, is a DudaError naming the
file and the fix.
"""

from __future__ import annotations

import logging
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import ValidationError
from torch import nn

from stages.artifacts.checkpoint import MODEL_FILE, load_checkpoint_manifest
from stages.artifacts.manifest import MANIFEST
from stages.config import MODEL_CONFIGS, ModelConfig, parse_model_config
from stages.runtime.errors import DudaError

logger = logging.getLogger("duda")

Format = Literal["torchvision", "deeplab_init", "adaptsegnet", "adaptsegnet_multi",
                 "duda_reference", "iast", "duda"]
Lineage = Literal["caffe", "torchvision", "duda"]

# A rule's target: a model key template (re.sub replacement), or UNUSED with the reason.
UNUSED = None
BACKBONE_TENSORS = r"(conv1|bn1|layer[1-4])\.(.+)"
ASPP_BRANCH = r"conv2d_list\.([0-9]+)\.(weight|bias)"


@dataclass(frozen=True)
class FormatSpec:
    """How one external format names its tensors, and the layout its weights were trained in."""

    description: str
    lineage: Lineage
    # (pattern on the file key, model key template or UNUSED, reason when UNUSED)
    rules: tuple[tuple[str, str | None, str], ...]
    # True for ImageNet backbones: the classifier is not in the file and keeps its init.
    backbone_only: bool = False


FORMATS: dict[str, FormatSpec] = {
    "torchvision": FormatSpec(
        "a torchvision ImageNet ResNet", "torchvision",
        ((rf"^{BACKBONE_TENSORS}$", r"backbone.\1.\2", ""),
         (r"^fc\.(weight|bias)$", UNUSED, "ImageNet classification layer")),
        backbone_only=True),
    "deeplab_init": FormatSpec(
        "the Caffe-ported DeepLab ResNet-101 init (AdaptSegNet / FDA)", "caffe",
        ((rf"^Scale\.{BACKBONE_TENSORS}$", r"backbone.\1.\2", ""),
         (r"^Scale\.layer5\..+$", UNUSED,
          "the init's own 21-class classifier (another label set)")),
        backbone_only=True),
    "adaptsegnet": FormatSpec(
        "an AdaptSegNet / FDA DeepLabV2", "caffe",
        ((rf"^{BACKBONE_TENSORS}$", r"backbone.\1.\2", ""),
         (rf"^layer5\.{ASPP_BRANCH}$", r"classifier.branches.\1.\2", ""))),
    "adaptsegnet_multi": FormatSpec(
        "an AdaptSegNet two-level DeepLabV2", "caffe",
        ((rf"^{BACKBONE_TENSORS}$", r"backbone.\1.\2", ""),
         (rf"^layer6\.{ASPP_BRANCH}$", r"classifier.branches.\1.\2", ""),
         (r"^layer5\..+$", UNUSED,
          "AdaptSegNet's auxiliary classifier on layer3 (no counterpart in this model)"))),
    "duda_reference": FormatSpec(
        "a DUDA reference DeepLabV2 snapshot", "caffe",
        ((rf"^backbone\.{BACKBONE_TENSORS}$", r"backbone.\1.\2", ""),
         (rf"^decoder\.aspp\.{ASPP_BRANCH}$", r"classifier.branches.\1.\2", ""),
         (r"^n_averaged$", UNUSED, "the mean teacher's average counter"))),
    "iast": FormatSpec(
        "an IAST DeepLabV2 checkpoint", "torchvision",
        ((r"^backbone\.fc\.(weight|bias)$", UNUSED, "ImageNet classification layer"),
         (rf"^backbone\.{BACKBONE_TENSORS}$", r"backbone.\1.\2", ""),
         (rf"^decoder\.aspp\.{ASPP_BRANCH}$", r"classifier.branches.\1.\2", ""),
         (r"^discriminators\..+$", UNUSED, "the adversarial warm-up's discriminator"))),
    "duda": FormatSpec(
        "a duda model", "duda",
        ((r"^(backbone\..+)$", r"\1", ""),
         (r"^(classifier\.branches\.[0-9]+\.(?:weight|bias))$", r"\1", ""),
         (r"^n_averaged$", UNUSED, "the mean teacher's average counter"))),
}

# What a model configured as (style, normalization) may load, per lineage.
LINEAGE_LAYOUT: dict[str, tuple[str, str]] = {
    "caffe": ("caffe", "caffe_bgr"),
    "torchvision": ("torchvision", "imagenet_rgb"),
}

# BN batch counters carry no weights; files of the Caffe-ported lineage have none.
COUNTER = re.compile(r"num_batches_tracked$")


@dataclass
class ImportReport:
    """What `import_weights` loaded: the mapping table and the assumptions made.

    `mapped`: (file key, model key) for every tensor copied into the model;
    `unused`: (file key, reason) for every file tensor deliberately left out;
    `missing`: model tensors the file does not provide, which keep their initial values (BN
    `num_batches_tracked` counters aside); `zeroed_aspp_branches`: the classifier branches set to
    zero after loading; `notes`: the assumptions, in words.
    """

    format: Format
    description: str
    source: str
    lineage: Lineage
    mapped: list[tuple[str, str]] = field(default_factory=list)
    unused: list[tuple[str, str]] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    zeroed_aspp_branches: tuple[int, ...] = ()
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line: what was loaded from where, and the counts of the mapping table."""
        parts = "backbone" if FORMATS[self.format].backbone_only else "backbone and classifier"
        text = (f"{self.description} from {self.source}: {len(self.mapped)} tensors ({parts})"
                f", {len(self.unused)} unused, {len(self.missing)} left as initialised")
        if self.zeroed_aspp_branches:
            text += f", ASPP branches {', '.join(map(str, self.zeroed_aspp_branches))} zeroed"
        return text


def detect_format(keys: list[str] | set[str]) -> Format:
    """Tell the format of a state dict from its key names (`module.` prefixes already dropped).

    DUDA reference and IAST checkpoints share the `backbone.` / `decoder.aspp.` names; IAST's
    torchvision ResNet keeps its unused `fc` layer (and the adversarial warm-up its
    discriminators), DUDA's has none.
    """
    key_set = set(keys)

    def has(prefix: str) -> bool:
        return any(key.startswith(prefix) for key in key_set)

    if has("Scale."):
        return "deeplab_init"
    if has("classifier.branches."):
        return "duda"
    if has("backbone.") or has("decoder."):
        return "iast" if has("backbone.fc.") or has("discriminators.") else "duda_reference"
    if "conv1.weight" in key_set and has("layer1."):
        if has("layer6."):
            return "adaptsegnet_multi"
        if has("layer5."):
            return "adaptsegnet"
        return "torchvision"
    raise DudaError(f"cannot tell which model these weights belong to (keys such as "
                    f"{', '.join(sorted(key_set)[:5]) or 'none'})",
                    "pass a torchvision ResNet state dict, the DeepLab init, an AdaptSegNet/FDA, "
                    "DUDA or IAST DeepLabV2 snapshot, or a duda checkpoint artifact")


def _strip_wrappers(state: dict[str, Any]) -> dict[str, Any]:
    """Drop every leading `module.` (DDP inside a mean teacher gives `module.module.`)."""
    stripped = {}
    for key, value in state.items():
        while key.startswith("module."):
            key = key[len("module."):]
        stripped[key] = value
    return stripped


def _listing(items: list[str], limit: int = 10) -> str:
    shown = "; ".join(items[:limit])
    return shown + (f"; … and {len(items) - limit} more" if len(items) > limit else "")


def _load_file(path: Path) -> Any:
    """`torch.load(weights_only=True)` on the CPU, with every failure a DudaError."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # Weights-only loading names the Python callable it refused; without one, the bytes are
        # simply not a pickle torch can read.
        refused = re.search(r"GLOBAL ([\w.]+)", str(error))
        if refused is None:
            raise _unreadable(path, error) from None
        logger.debug("torch.load(%s) refused: %s", path, error)
        raise DudaError(f"weights file {path} holds Python objects ({refused.group(1)}), not "
                        "only tensors; it was not loaded, because unpickling it could run code",
                        "save a plain state dict: torch.save(model.state_dict(), path), in a "
                        "trusted environment") from None
    except Exception as error:  # noqa: BLE001 - torch.load raises many types on foreign bytes
        raise _unreadable(path, error) from None


def _unreadable(path: Path, error: BaseException) -> DudaError:
    logger.debug("torch.load(%s) failed: %r", path, error)
    return DudaError(f"weights file {path} is not a torch file, or it is truncated or corrupt",
                     "pass a file written by torch.save (a state dict) or a duda checkpoint "
                     "artifact")


def _checkpoint_layout(data: dict[str, Any], path: Path) -> ModelConfig:
    try:
        return parse_model_config(data["model_config"])
    except ValidationError as error:
        raise DudaError(f"checkpoint file {path} has an invalid model config: "
                        f"{str(error).splitlines()[0]}",
                        "it was written by an incompatible version of duda; retrain it") from None


def _read_state(path: Path) -> tuple[dict[str, torch.Tensor], str, ModelConfig | None]:
    """The weight tensors stored at `path`, what they are, and a duda checkpoint's config."""
    if path.is_dir():
        if not (path / MANIFEST).is_file():
            raise DudaError(f"initial weights {path} is a directory but not a checkpoint "
                            "artifact (no manifest.json)",
                            "pass a checkpoint artifact directory or a weights file")
        load_checkpoint_manifest(path)
        path = path / MODEL_FILE
        if not path.is_file():
            raise DudaError(f"checkpoint artifact {path.parent} has no {MODEL_FILE}",
                            "rerun the stage that wrote it")
    data = _load_file(path)
    if not isinstance(data, dict):
        raise DudaError(f"weights file {path} holds a {type(data).__name__}, not a state dict",
                        "save a state dict: torch.save(model.state_dict(), path)")
    if "student" in data and "model_config" in data:
        layout = _checkpoint_layout(data, path)
        which = "teacher" if isinstance(data.get("teacher"), dict) else "student"
        if not isinstance(data[which], dict):
            raise DudaError(f"checkpoint file {path} has no {which} state dict",
                            "rerun the stage that wrote it")
        return data[which], f"the {which} of duda checkpoint {path}", layout
    for container in ("state_dict", "model_state", "model"):
        if isinstance(data.get(container), dict):
            data = data[container]
            break
    tensors = {key: value for key, value in data.items()
               if isinstance(value, torch.Tensor) and isinstance(key, str)}
    if not tensors:
        raise DudaError(f"weights file {path} holds no tensors",
                        "pass a state dict saved with torch.save(model.state_dict(), path)")
    return tensors, str(path), None


def _unwrap(model: nn.Module) -> nn.Module:
    """The DeepLabV2 inside data-parallel or mean-teacher wrappers (their `.module`)."""
    while isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


def _model_config(model: nn.Module, config: ModelConfig | None) -> ModelConfig:
    if config is not None:
        return config
    found = getattr(model, "config", None)
    if not isinstance(found, MODEL_CONFIGS):
        raise TypeError("import_weights needs the model's ModelConfig: pass config=, or a "
                        "DeepLabV2 (which keeps it in .config)")
    return found


def _check_lineage(fmt: Format, path: Path, config: ModelConfig,
                   recorded: ModelConfig | None) -> None:
    """Refuse weights trained in another layout or input convention than the model's."""
    spec = FORMATS[fmt]
    if spec.lineage == "duda":
        if recorded is None:
            return  # a bare state dict of this project's model records no layout
        style, normalization = recorded.style, recorded.normalization
    else:
        style, normalization = LINEAGE_LAYOUT[spec.lineage]
    if (config.style, config.normalization) == (style, normalization):
        return
    backbone = " (with model.backbone resnet50 or resnet101)" if style == "caffe" else ""
    raise DudaError(f"initial weights {path} hold {spec.description}, trained in the {style} "
                    f"layout with {normalization} inputs, but the model is configured with "
                    f"model.style: {config.style} and model.normalization: {config.normalization}"
                    "; in another layout, or fed other inputs, the same weights compute a "
                    "different function",
                    f"set model.style: {style} and model.normalization: {normalization}{backbone}")


def _translate(state: dict[str, torch.Tensor], spec: FormatSpec,
               ) -> tuple[dict[str, tuple[str, torch.Tensor]], list[tuple[str, str]], list[str]]:
    """File keys -> {model key: (file key, tensor)}, (file key, reason) unused, untranslatable."""
    rules = [(re.compile(pattern), target, reason) for pattern, target, reason in spec.rules]
    translated: dict[str, tuple[str, torch.Tensor]] = {}
    unused: list[tuple[str, str]] = []
    unknown: list[str] = []
    for key, value in state.items():
        for pattern, target, reason in rules:
            if pattern.match(key):
                if target is UNUSED:
                    unused.append((key, reason))
                else:
                    translated[pattern.sub(target, key)] = (key, value)
                break
        else:
            unknown.append(key)
    return translated, unused, unknown


def import_weights(model: nn.Module, path: str | Path, *, config: ModelConfig | None = None,
                   zero_aspp_branches: tuple[int, ...] = (), format: Format | None = None,
                   ) -> ImportReport:
    """Load the weights at `path` into `model` by explicit key mapping; return the mapping table.

    `path`: a weights file or a duda checkpoint artifact directory (absolute, or relative to the
    current directory). `config`: the model's ModelConfig, by default `model.config`; its style
    and normalization must match the lineage of the weights (module docstring). `format`
    overrides the detection from key names (e.g. "iast" for an IAST checkpoint stripped of its
    `fc` and discriminators). `zero_aspp_branches`: classifier branches whose weights and biases
    are set to zero after loading; (2, 3) reproduces AdaptSegNet's single-level
    `model/deeplab.py`, whose ASPP loop returns after the second branch.

    Nothing is copied unless every tensor fits: untranslatable file keys, translated keys the
    model lacks, shape mismatches and model tensors the file should provide but lacks are all
    listed in one DudaError (the first ten and a count).
    """
    path = Path(path)
    if not path.exists():
        raise DudaError(f"initial weights {path} do not exist",
                        "pass an existing weights file or checkpoint artifact")
    model = _unwrap(model)
    config = _model_config(model, config)
    state, source, recorded = _read_state(path)
    state = _strip_wrappers(state)
    try:
        fmt: Format = format if format is not None else detect_format(list(state))
    except DudaError as error:
        raise DudaError(f"initial weights {path}: {error.message}", error.fix) from None
    if fmt not in FORMATS:
        raise DudaError(f"unknown weights format {fmt!r} for {path}",
                        f"use one of {', '.join(FORMATS)}")
    spec = FORMATS[fmt]
    _check_lineage(fmt, path, config, recorded)

    translated, unused, unknown = _translate(state, spec)
    own = model.state_dict()
    problems = [f"{key}: no counterpart in the model" for key in unknown]
    problems += [f"{file_key} -> {key}: not in the model"
                 for key, (file_key, _) in translated.items() if key not in own]
    problems += [f"{key}: file {tuple(value.shape)} vs model {tuple(own[key].shape)}"
                 for key, (_, value) in translated.items()
                 if key in own and tuple(value.shape) != tuple(own[key].shape)]
    missing = [key for key in own if key not in translated and not COUNTER.search(key)]
    required = [key for key in missing
                if not (spec.backbone_only and key.startswith("classifier."))]
    problems += [f"{key}: missing from the file" for key in required]
    if problems:
        raise DudaError(f"initial weights {path} ({spec.description}) do not fit the model "
                        f"({config.backbone}, {_model_classes(model)} classes): "
                        f"{len(problems)} problem(s): {_listing(problems)}",
                        "use weights of the configured backbone (model.backbone, "
                        "model.width_multiplier) and number of classes"
                        + (f", or pass the format explicitly if this is not {spec.description}"
                           if format is None else ""))
    branches = _check_branches(zero_aspp_branches, own, spec, path)

    with torch.no_grad():
        for key, (_, value) in translated.items():
            own[key].copy_(value.to(own[key].dtype))
        for index in branches:
            own[f"classifier.branches.{index}.weight"].zero_()
            own[f"classifier.branches.{index}.bias"].zero_()
    report = ImportReport(format=fmt, description=spec.description, source=source,
                          lineage=spec.lineage,
                          mapped=[(file_key, key) for key, (file_key, _) in translated.items()],
                          unused=unused, missing=missing, zeroed_aspp_branches=branches)
    report.notes = _notes(report, recorded)
    logger.debug("imported %s", report.summary())
    return report


def _model_classes(model: nn.Module) -> int | str:
    """The number of classes a model's classifier predicts ('?' when it has none)."""
    weight = model.state_dict().get("classifier.branches.0.weight")
    return int(weight.shape[0]) if weight is not None else "?"


def _check_branches(branches: tuple[int, ...], own: dict[str, torch.Tensor], spec: FormatSpec,
                    path: Path) -> tuple[int, ...]:
    if not branches:
        return ()
    count = len({key.split(".")[2] for key in own if key.startswith("classifier.branches.")})
    bad = [index for index in branches if not 0 <= index < count]
    if bad:
        raise DudaError(f"zero_aspp_branches {tuple(branches)} names branches the model lacks "
                        f"(it has {count}, numbered from 0)",
                        "name branches among " + ", ".join(map(str, range(count))))
    if spec.backbone_only:
        raise DudaError(f"zero_aspp_branches given for {path}, which holds {spec.description} "
                        "without a classifier",
                        "zero ASPP branches only when importing a full DeepLabV2")
    return tuple(sorted(set(branches)))


def _notes(report: ImportReport, recorded: ModelConfig | None) -> list[str]:
    notes = []
    if report.format in ("adaptsegnet", "adaptsegnet_multi"):
        if report.zeroed_aspp_branches == (2, 3):
            notes.append("ASPP branches 2 and 3 zeroed: reproduces AdaptSegNet's model/"
                         "deeplab.py and model/deeplab_multi.py, whose classifier returns after "
                         "summing branches 0 and 1")
        else:
            notes.append("all ASPP branches summed, as FDA's model/deeplab.py does; AdaptSegNet's "
                         "own model returns after branches 0 and 1 (import with "
                         "zero_aspp_branches=(2, 3) for its snapshots)")
    if FORMATS[report.format].backbone_only:
        notes.append("the classifier keeps its random initialisation")
    if report.lineage == "duda" and recorded is None:
        notes.append("a bare state dict records no layout: its style and normalization were "
                     "not checked")
    if not any(key.endswith("running_var") for _, key in report.mapped):
        notes.append("the file has no BN running statistics")
    return notes


def load_initial_weights(model: nn.Module, path: str | Path) -> str:
    """`import_weights` with the model's own config; returns the one-line summary."""
    return import_weights(model, path).summary()


# torchvision's ImageNet weights for `model.init: imagenet` (the classic V1 recipe).
IMAGENET_WEIGHTS = {"resnet101": "ResNet101_Weights", "resnet50": "ResNet50_Weights"}


def imagenet_file(backbone: str) -> tuple[str, Path]:
    """(download URL, local path in the torch hub cache) of torchvision's ImageNet weights."""
    import torchvision

    if backbone not in IMAGENET_WEIGHTS:
        raise DudaError(f"model.init: imagenet has no torchvision weights for {backbone}",
                        "use model.backbone resnet50 or resnet101, or a weights file as "
                        "model.init")
    url = getattr(torchvision.models, IMAGENET_WEIGHTS[backbone]).IMAGENET1K_V1.url
    return url, Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]


def initialize(model: nn.Module, config: ModelConfig | None = None) -> ImportReport | None:
    """Apply `model.init` to a freshly built model: None for `none`, else the ImportReport.

    `imagenet` reads torchvision's ImageNet weights from the torch hub cache
    (`torch.hub.get_dir()/checkpoints/<file>`), downloading them there first if the machine can;
    without a network it is a DudaError saying which file to place where. Any other value is a
    path, expected absolute (a relative one is resolved against the current directory).
    """
    config = _model_config(_unwrap(model), config)
    if config.init == "none":
        return None
    if config.init != "imagenet":
        return import_weights(model, Path(config.init).expanduser().resolve(), config=config)
    url, local = imagenet_file(config.backbone)
    if not local.is_file():
        try:
            local.parent.mkdir(parents=True, exist_ok=True)
            hash_prefix = torch.hub.HASH_REGEX.search(local.name)
            torch.hub.download_url_to_file(url, str(local),
                                           hash_prefix.group(1) if hash_prefix else None,
                                           progress=False)
        except Exception as error:  # noqa: BLE001 - any network or disk failure means the same
            logger.debug("downloading %s failed: %r", url, error)
            raise DudaError(f"model.init: imagenet needs torchvision's {config.backbone} ImageNet "
                            f"weights at {local}, which is missing, and downloading {url} "
                            f"failed ({type(error).__name__})",
                            f"download {url} on a machine with internet access and place it at "
                            f"{local} (or set TORCH_HOME), or set model.init to a weights file"
                            ) from None
    return import_weights(model, local, config=config, format="torchvision")
