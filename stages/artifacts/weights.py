"""Initial weights from local files: ImageNet backbones, external DeepLabV2s and SegFormers, duda
checkpoints of either model family.

Every source is mapped onto the model by an explicit key translation followed by a shape check
on every tensor, never by position, and the result is an `ImportReport`: which file tensor went
to which model tensor, which file tensors were left unused and why, which model tensors keep
their initial values. Accepted formats (`FORMATS`, detected from the key names), for a model of
`model.name: deeplabv2`:
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
for a model of `model.name: segformer` (a MiT encoder `backbone.*` and a `decode_head.*`,
stages.nn.segformer):
- `mit`: NVlabs' ImageNet Mix Transformer `mit_b0.pth … mit_b5.pth` (a bare state dict:
  `patch_embed1.proj`, `block1.0.attn.q`, … `norm4`, and the classification `head`): the encoder
  is loaded as `backbone.*`, `head` is unused, the decode head keeps its initialisation;
- `daformer`: a DAFormer (mmsegmentation) checkpoint, `{"meta", "state_dict", "optimizer"}`
  whose state dict holds the student `model.backbone.*` / `model.decode_head.*`, the EMA
  teacher `ema_model.*` and the ImageNet feature-distance model `imnet_model.*` (unused). One
  of the two is loaded, by `which` (`model.init_weights`, `duda import-checkpoint --weights`;
  the teacher by default), the other is unused; a file with the student only (source-only
  training) gives the student and says so. A bare segmentor state dict (`backbone.*`,
  `decode_head.*`) with DAFormer's SegFormerHead is read too; that head's unused mmseg
  classifier `decode_head.conv_seg` (beside `linear_pred`) is unused;
and for either family:
- `duda`: a duda checkpoint artifact or its `model.pt`, or a bare state dict of this project's
  model (a SegFormer's has mmseg's names, so an mmseg segmentor with the DAFormer head reads as
  one). A checkpoint gives its teacher when it has one (else its student), or its student when
  `which` asks for it; it loads only into a config of the model it records (`model.name`,
  backbone, head and the keys that change its function), as `check_compatible` asks of every
  checkpoint.
Any number of leading `module.` prefixes (data-parallel and mean-teacher wrappers) is dropped.
mmsegmentation ≥ 0.17's renamed MiT (`layers.0.0.projection`, the attention's fused
`in_proj_weight`, 1×1 convs for the MLP) needs tensors split and reshaped, not renamed, and is
refused with a DudaError pointing at NVlabs' files.

The layouts are not interchangeable. The Caffe-ported ResNet of the AdaptSegNet / FDA / DUDA
lineage has the same tensors as torchvision's but puts a block's stride in its first 1×1 conv,
dilates every block of layer3 and layer4, and pools with ceil_mode: the same weights compute a
different function in the two layouts (docs/method.md). Each format therefore has a lineage, and
its weights are only loaded into a model configured for it: `caffe` lineage (deeplab_init,
adaptsegnet, duda_reference) needs `model.style: caffe` and `model.normalization: caffe_bgr`;
`torchvision` lineage (torchvision, iast) needs `model.style: torchvision` and
`model.normalization: imagenet_rgb`; `mit` lineage (mit, daformer) needs `model.name:
segformer` with the file's MiT variant (read from its stage widths and block counts), head and
embedding size; a duda checkpoint needs the model it records. Everything else, and every
unreadable or ill-fitting file, is a DudaError naming the file and the fix: weights of one
family offered to a model of the other name both formats and `model.name`.
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

from stages.artifacts.checkpoint import MODEL_FILE, Which, load_checkpoint_manifest
from stages.artifacts.manifest import MANIFEST
from stages.config import MODEL_CONFIGS, ModelConfig, parse_model_config
from stages.runtime.errors import DudaError

logger = logging.getLogger("duda")

Format = Literal["torchvision", "deeplab_init", "adaptsegnet", "adaptsegnet_multi",
                 "duda_reference", "iast", "mit", "daformer", "duda"]
Lineage = Literal["caffe", "torchvision", "mit", "duda"]
Family = Literal["deeplabv2", "segformer"]
WHICH: tuple[str, ...] = ("teacher", "student")

# A rule's target: a model key template (re.sub replacement), or UNUSED with the reason.
UNUSED = None
Rule = tuple[str, str | None, str]
BACKBONE_TENSORS = r"(conv1|bn1|layer[1-4])\.(.+)"
ASPP_BRANCH = r"conv2d_list\.([0-9]+)\.(weight|bias)"
MIT_TENSORS = r"((?:patch_embed|block|norm)[1-4]\..+)"
IMAGENET_HEAD = "ImageNet classification layer"


@dataclass(frozen=True)
class FormatSpec:
    """How one external format names its tensors, and the layout its weights were trained in."""

    description: str
    lineage: Lineage
    # (pattern on the file key, model key template or UNUSED, reason when UNUSED); empty for
    # `daformer`, whose rules depend on which of its models is loaded (`_daformer_rules`).
    rules: tuple[Rule, ...]
    # True for ImageNet backbones: the head is not in the file and keeps its init.
    backbone_only: bool = False
    # The model family the weights belong to; None for `duda` (either: as recorded or named).
    family: Family | None = "deeplabv2"


FORMATS: dict[str, FormatSpec] = {
    "torchvision": FormatSpec(
        "a torchvision ImageNet ResNet", "torchvision",
        ((rf"^{BACKBONE_TENSORS}$", r"backbone.\1.\2", ""),
         (r"^fc\.(weight|bias)$", UNUSED, IMAGENET_HEAD)),
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
        ((r"^backbone\.fc\.(weight|bias)$", UNUSED, IMAGENET_HEAD),
         (rf"^backbone\.{BACKBONE_TENSORS}$", r"backbone.\1.\2", ""),
         (rf"^decoder\.aspp\.{ASPP_BRANCH}$", r"classifier.branches.\1.\2", ""),
         (r"^discriminators\..+$", UNUSED, "the adversarial warm-up's discriminator"))),
    "mit": FormatSpec(
        "NVlabs' ImageNet MiT encoder", "mit",
        ((rf"^{MIT_TENSORS}$", r"backbone.\1", ""),
         (r"^head\.(weight|bias)$", UNUSED, IMAGENET_HEAD)),
        backbone_only=True, family="segformer"),
    "daformer": FormatSpec(
        "a DAFormer (mmsegmentation) SegFormer-family model", "mit", (), family="segformer"),
    "duda": FormatSpec(
        "a duda model", "duda",
        ((r"^(backbone\..+)$", r"\1", ""),
         (r"^(classifier\.branches\.[0-9]+\.(?:weight|bias))$", r"\1", ""),
         (r"^(decode_head\..+)$", r"\1", ""),
         (r"^n_averaged$", UNUSED, "the mean teacher's average counter")),
        family=None),
}

FAMILY_FORMATS: dict[str, str] = {
    "deeplabv2": "torchvision, deeplab_init, adaptsegnet, adaptsegnet_multi, duda_reference, "
                 "iast, or a duda DeepLabV2 checkpoint",
    "segformer": "NVlabs' ImageNet mit_b0.pth … mit_b5.pth (mit), a DAFormer checkpoint "
                 "(daformer), or a duda SegFormer checkpoint",
}

# What a model configured as (style, normalization) may load, per lineage.
LINEAGE_LAYOUT: dict[str, tuple[str, str]] = {
    "caffe": ("caffe", "caffe_bgr"),
    "torchvision": ("torchvision", "imagenet_rgb"),
}

# NVlabs' Mix Transformers: (channels of stage 1, blocks per stage), as the weights show them.
MIT_SHAPES: dict[str, tuple[int, tuple[int, ...]]] = {
    "mit_b0": (32, (2, 2, 2, 2)),
    "mit_b1": (64, (2, 2, 2, 2)),
    "mit_b2": (64, (3, 4, 6, 3)),
    "mit_b3": (64, (3, 4, 18, 3)),
    "mit_b4": (64, (3, 8, 27, 3)),
    "mit_b5": (64, (3, 6, 40, 3)),
}

# DAFormer's UDA wrapper: the student, the EMA teacher, the ImageNet feature-distance model.
DAFORMER_MODELS = {"student": "model.", "teacher": "ema_model."}
DAFORMER_IMNET = "imnet_model."

# BN batch counters carry no weights; files of the Caffe-ported lineage have none.
COUNTER = re.compile(r"num_batches_tracked$")


@dataclass
class ImportReport:
    """What `import_weights` loaded: the mapping table and the assumptions made.

    `mapped`: (file key, model key) for every tensor copied into the model;
    `unused`: (file key, reason) for every file tensor deliberately left out;
    `missing`: model tensors the file does not provide, which keep their initial values (BN
    `num_batches_tracked` counters aside); `zeroed_aspp_branches`: the classifier branches set to
    zero after loading; `notes`: the assumptions, in words; `model`: the family loaded into
    (`model.name`); `weights`: which model of a file holding two (a DAFormer or duda checkpoint)
    was loaded, None for a file of one model.
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
    model: Family = "deeplabv2"
    weights: Which | None = None

    def summary(self) -> str:
        """One line: what was loaded from where, and the counts of the mapping table."""
        head = "classifier" if self.model == "deeplabv2" else "decode head"
        parts = "backbone" if FORMATS[self.format].backbone_only else f"backbone and {head}"
        which = f"the {self.weights} of " if self.weights and self.format == "daformer" else ""
        text = (f"{which}{self.description} from {self.source}: {len(self.mapped)} tensors "
                f"({parts}), {len(self.unused)} unused, {len(self.missing)} left as initialised")
        if self.zeroed_aspp_branches:
            text += f", ASPP branches {', '.join(map(str, self.zeroed_aspp_branches))} zeroed"
        return text


def detect_format(keys: list[str] | set[str]) -> Format:
    """Tell the format of a state dict from its key names (`module.` prefixes already dropped).

    DUDA reference and IAST checkpoints share the `backbone.` / `decoder.aspp.` names; IAST's
    torchvision ResNet keeps its unused `fc` layer (and the adversarial warm-up its
    discriminators), DUDA's has none. In the SegFormer family, DAFormer's wrapper prefixes
    (`model.`, `ema_model.`, `imnet_model.`), or mmseg's SegFormerHead with its unused
    `decode_head.conv_seg` beside `linear_pred`, make `daformer`; other `backbone.patch_embed1`
    / `decode_head.` names are this project's SegFormer (`duda`); bare `patch_embed1.` and
    `block1.` are NVlabs' ImageNet MiT (`mit`).
    """
    key_set = set(keys)

    def has(prefix: str) -> bool:
        return any(key.startswith(prefix) for key in key_set)

    if has("Scale."):
        return "deeplab_init"
    if has("classifier.branches."):
        return "duda"
    if has("layers.0.0.projection.") or has("backbone.layers.0.0.projection."):
        raise DudaError("these weights are mmsegmentation ≥ 0.17's renamed Mix Transformer "
                        "(keys such as layers.0.0.projection.weight), whose attention and MLP "
                        "tensors would have to be split and reshaped, not renamed; it is not read",
                        "use NVlabs' original ImageNet file (mit_b0.pth … mit_b5.pth, keys "
                        "patch_embed1.…, block1.…), a DAFormer checkpoint or a duda checkpoint")
    if any(has(prefix) for prefix in (*DAFORMER_MODELS.values(), DAFORMER_IMNET)):
        return "daformer"
    if has("backbone.patch_embed1.") or has("decode_head."):
        mmseg_head = has("decode_head.conv_seg.") and has("decode_head.linear_pred.")
        return "daformer" if mmseg_head else "duda"
    if has("patch_embed1.") and has("block1."):
        return "mit"
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
                    "DUDA or IAST DeepLabV2 snapshot, NVlabs' ImageNet MiT, a DAFormer "
                    "checkpoint, or a duda checkpoint artifact")


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
        logger.debug("torch.load(%s) refused: %r", path, error)
        raise DudaError(f"weights file {path} holds Python objects ({refused.group(1)}), not "
                        "only tensors; it was not loaded, because unpickling it could run code",
                        "save a plain state dict: torch.save(model.state_dict(), path), in a "
                        "trusted environment; of a training checkpoint (mmcv's or DAFormer's "
                        "meta, state_dict, optimizer, whose meta may hold numpy values) keep the "
                        "state dict: torch.save(torch.load(path, weights_only=False)"
                        "['state_dict'], 'weights.pth')") from None
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


@dataclass
class _Source:
    """The tensors read from a weights file, in words, with a duda checkpoint's model config
    and which of its models they are."""

    state: dict[str, torch.Tensor]
    source: str
    recorded: ModelConfig | None = None
    weights: Which | None = None
    notes: list[str] = field(default_factory=list)


NO_TEACHER = ("the checkpoint has no teacher (a warmup checkpoint has none): its student was "
              "loaded")


def _read_state(path: Path, which: Which) -> _Source:
    """The weight tensors stored at `path`: of a duda checkpoint its `which` model (the student
    when it has no teacher), of any other file its state dict (or the file itself)."""
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
        has_teacher = isinstance(data.get("teacher"), dict)
        loaded: Which = "teacher" if which == "teacher" and has_teacher else "student"
        if not isinstance(data[loaded], dict):
            raise DudaError(f"checkpoint file {path} has no {loaded} state dict",
                            "rerun the stage that wrote it")
        notes = [] if loaded == which else [NO_TEACHER]
        return _Source(data[loaded], f"the {loaded} of duda checkpoint {path}", layout, loaded,
                       notes)
    for container in ("state_dict", "model_state", "model"):
        if isinstance(data.get(container), dict):
            data = data[container]
            break
    tensors = {key: value for key, value in data.items()
               if isinstance(value, torch.Tensor) and isinstance(key, str)}
    if not tensors:
        raise DudaError(f"weights file {path} holds no tensors",
                        "pass a state dict saved with torch.save(model.state_dict(), path)")
    return _Source(tensors, str(path))


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside data-parallel or mean-teacher wrappers (their `.module`)."""
    while isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


def _model_config(model: nn.Module, config: ModelConfig | None) -> ModelConfig:
    if config is not None:
        return config
    found = getattr(model, "config", None)
    if not isinstance(found, MODEL_CONFIGS):
        raise TypeError("import_weights needs the model's ModelConfig: pass config=, or a "
                        "DeepLabV2 or SegFormer (which keep it in .config)")
    return found


def _which(weights: str | None, config: ModelConfig) -> Which:
    """The model to load from a file holding two: `weights`, else the config's
    `model.init_weights` (SegFormer configs), else the teacher."""
    which = weights if weights is not None else getattr(config, "init_weights", "teacher")
    if which not in WHICH:
        raise DudaError(f"weights {which!r} names no model of a checkpoint",
                        "choose teacher (the EMA / mean teacher) or student")
    return which  # type: ignore[return-value]


def _family(spec: FormatSpec, recorded: ModelConfig | None, keys: Any) -> Family:
    """The model family of the weights: the format's, a checkpoint's recorded one, or for a bare
    state dict of this project's model the one its names show."""
    if spec.family is not None:
        return spec.family
    if recorded is not None:
        return recorded.name
    segformer = any(key.startswith(("decode_head.", "backbone.patch_embed")) for key in keys)
    return "segformer" if segformer else "deeplabv2"


FAMILY_NAMES = {"deeplabv2": "DeepLabV2", "segformer": "SegFormer"}


def _recorded_keys(recorded: ModelConfig) -> str:
    head = f", model.head: {recorded.head}" if recorded.name == "segformer" else ""
    return f"model.name: {recorded.name}, model.backbone: {recorded.backbone}{head}"


def _check_family(fmt: Format, family: Family, path: Path, config: ModelConfig,
                  recorded: ModelConfig | None, translated: dict[str, Any]) -> None:
    """Refuse weights of one model family offered to a model of the other, and a duda checkpoint
    of another SegFormer than the config's (a DeepLabV2 one is checked by its layout)."""
    if recorded is not None:
        both_segformer = recorded.name == config.name == "segformer"
        if recorded.name != config.name or (both_segformer
                                             and recorded.describe() != config.describe()):
            raise DudaError(f"checkpoint {path} holds a {recorded.describe()}, the config asks "
                            f"for a {config.describe()}",
                            f"set {_recorded_keys(recorded)} as the checkpoint records, or pass "
                            f"a checkpoint of a {config.describe()}")
        differ = [f"model.{key} {getattr(recorded, key)!r} (checkpoint) vs "
                  f"{getattr(config, key)!r} (config)" for key in config.FUNCTION_KEYS
                  if both_segformer and getattr(recorded, key) != getattr(config, key)]
        if differ:
            raise DudaError(f"checkpoint {path} computes another function than the config "
                            f"describes: {'; '.join(differ)}",
                            "set these model keys to the checkpoint's values")
    if family == config.name:
        return
    spec = FORMATS[fmt]
    if family == "segformer":
        variant = _mit_variant(_mit_shape(_backbone_shapes(translated)))
        fix = (f"set model.name: segformer and model.backbone: "
               f"{variant or 'its MiT (mit_b0 … mit_b5)'} to load them, or pass weights "
               f"of a DeepLabV2: {FAMILY_FORMATS['deeplabv2']}")
    else:
        fix = ("set model.name: deeplabv2 (with model.backbone resnet50 or resnet101) to load "
               f"them, or pass weights of a SegFormer: {FAMILY_FORMATS['segformer']}")
    raise DudaError(f"initial weights {path} hold {spec.description} (format {fmt}), weights of "
                    f"the {FAMILY_NAMES[family]} family, but model.name is {config.name} (a "
                    f"{config.describe()})", fix)


def _check_lineage(fmt: Format, path: Path, config: ModelConfig,
                   recorded: ModelConfig | None) -> None:
    """Refuse DeepLabV2 weights trained in another layout or input convention than the model's
    (a SegFormer has one layout and one normalization)."""
    spec = FORMATS[fmt]
    if config.name != "deeplabv2":
        return
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


def _backbone_shapes(translated: dict[str, tuple[str, torch.Tensor]]) -> dict[str, tuple[int, ...]]:
    """The shapes of the translated encoder tensors, by their name without `backbone.`."""
    return {key.removeprefix("backbone."): tuple(value.shape)
            for key, (_, value) in translated.items() if key.startswith("backbone.")}


def _mit_shape(shapes: dict[str, tuple[int, ...]]) -> tuple[int, tuple[int, ...]] | None:
    """(channels of stage 1, blocks per stage) of Mix Transformer tensors under NVlabs' names;
    None without `patch_embed1.proj.weight`."""
    embed = shapes.get("patch_embed1.proj.weight")
    if embed is None:
        return None
    depths = [0, 0, 0, 0]
    for key in shapes:
        block = re.match(r"block([1-4])\.([0-9]+)\.", key)
        if block:
            stage = int(block.group(1)) - 1
            depths[stage] = max(depths[stage], int(block.group(2)) + 1)
    return int(embed[0]), tuple(depths)


def _mit_variant(shape: tuple[int, tuple[int, ...]] | None) -> str | None:
    """The MiT (mit_b0 … mit_b5) of that shape, None for another or none."""
    return next((name for name, known in MIT_SHAPES.items() if known == shape), None)


HEAD_PREFIXES = {"daformer": "decode_head.embed_layers.", "segformer": "decode_head.linear_c."}


def _check_segformer_fit(path: Path, spec: FormatSpec, translated: dict[str, Any],
                         config: ModelConfig) -> None:
    """Name what differs between SegFormer weights and the configured SegFormer before the
    tensor-by-tensor check: the MiT variant, the head, its embedding size, the fusion branches."""
    what = f"initial weights {path} ({spec.description})"
    found = _mit_shape(_backbone_shapes(translated))
    if found is None and any(key.startswith("decode_head.") for key in translated):
        raise DudaError(f"{what} hold no MiT encoder (no backbone.patch_embed1.*): it is not a "
                        "model of the SegFormer family",
                        "pass a DAFormer or duda checkpoint of a MiT model (mit_b0 … mit_b5)")
    expected = MIT_SHAPES[config.backbone]
    if found is not None and found != expected:
        name = _mit_variant(found)
        gaps = [abs(a - b) for a, b in zip(found[1], expected[1])]
        if max(gaps) > 0:
            stage = gaps.index(max(gaps))
            detail = (f"block{stage + 1} has {found[1][stage]} blocks, {config.backbone}'s "
                      f"{expected[1][stage]}")
        else:
            detail = f"stage 1 has {found[0]} channels, {config.backbone}'s {expected[0]}"
        raise DudaError(f"{what} look like {name or 'another Mix Transformer'} ({detail}) but "
                        f"model.backbone is {config.backbone}",
                        (f"set model.backbone: {name}" if name else "use a MiT-B0…B5 file")
                        + f", or use {config.backbone} weights")
    if spec.backbone_only:
        return
    head = next((name for name, prefix in HEAD_PREFIXES.items()
                 if any(key.startswith(prefix) for key in translated)), None)
    if head is None:
        return  # the tensor-by-tensor check lists what is there
    if head != config.head:
        raise DudaError(f"{what} hold the {head} head ({HEAD_PREFIXES[head]}*) but model.head "
                        f"is {config.head}",
                        f"set model.head: {head}, or use weights of a {config.head} head")
    embed = translated.get(f"{HEAD_PREFIXES[head]}0.proj.weight")
    if embed is not None and int(embed[1].shape[0]) != config.embedding_dim:
        raise DudaError(f"{what} embed each stage to {int(embed[1].shape[0])} channels but "
                        f"model.embedding_dim is {config.embedding_dim}",
                        f"set model.embedding_dim: {int(embed[1].shape[0])}")
    if head == "daformer":
        branches = {key.split(".")[3] for key in translated
                    if key.startswith("decode_head.fuse_layer.aspp_modules.")}
        if branches and len(branches) != len(config.fusion_dilations):
            raise DudaError(f"{what} fuse the stages with {len(branches)} ASPP branches but "
                            f"model.fusion_dilations has {len(config.fusion_dilations)} "
                            f"({config.fusion_dilations})",
                            f"set model.fusion_dilations to the {len(branches)} dilations the "
                            "weights were trained with (DAFormer's: [1, 6, 12, 18])")


# Why a DAFormer checkpoint's other tensors are not loaded.
UNUSED_REASONS = {
    "teacher": ("the EMA teacher; pass --weights teacher (duda import-checkpoint) or set "
                "model.init_weights: teacher to load it instead"),
    "student": ("the student; pass --weights student (duda import-checkpoint) or set "
                "model.init_weights: student to load it instead"),
    "imnet": "DAFormer's ImageNet feature-distance model (the frozen ImageNet encoder)",
    "conv_seg": ("mmseg's classifier that DAFormer's SegFormerHead leaves unused (it predicts "
                 "with linear_pred)"),
}


def _daformer_rules(keys: Any, which: Which) -> tuple[tuple[Rule, ...], Which | None, list[str]]:
    """The rules of a DAFormer state dict: `which` model (`model.*` the student, `ema_model.*`
    the EMA teacher; the other when the file lacks it) mapped, the other and `imnet_model.*`
    unused; a bare segmentor (`backbone.*`, `decode_head.*`) mapped as it is. Also which model
    was loaded and the notes saying so."""
    keys = list(keys)
    present = {name: any(key.startswith(prefix) for key in keys)
               for name, prefix in DAFORMER_MODELS.items()}
    notes: list[str] = []
    loaded: Which | None
    if not any(present.values()):
        prefix, loaded = "", None
        notes.append("a single segmentor's state dict (backbone.*, decode_head.*): there is no "
                     "teacher or student to choose")
    else:
        loaded = which if present[which] else ("student" if which == "teacher" else "teacher")
        prefix = DAFORMER_MODELS[loaded]
        if loaded != which and which == "teacher":
            notes.append("the file holds no EMA teacher (no ema_model.*, as after source-only "
                         "training): its student (model.*) was loaded")
        elif loaded != which:
            notes.append("the file holds no student (no model.*): its EMA teacher (ema_model.*) "
                         "was loaded")
        elif loaded == "teacher":
            notes.append("the EMA teacher (ema_model.*) was loaded; DAFormer evaluates its "
                         "student (model.*). DAFormer averages the teacher's parameters only: "
                         "its BN running statistics are its own, gathered on target images")
        else:
            notes.append("the student (model.*) was loaded, the model DAFormer evaluates")
    escaped = re.escape(prefix)
    rules: list[Rule] = []
    if any(key.startswith(f"{prefix}decode_head.linear_pred.") for key in keys):
        rules.append((rf"^{escaped}decode_head\.conv_seg\.(weight|bias)$", UNUSED,
                      UNUSED_REASONS["conv_seg"]))
    rules += [
        (rf"^{escaped}((?:backbone|decode_head)\..+)$", r"\1", ""),
        (r"^ema_model\..+$", UNUSED, UNUSED_REASONS["teacher"]),
        (r"^model\..+$", UNUSED, UNUSED_REASONS["student"]),
        (rf"^{re.escape(DAFORMER_IMNET)}.+$", UNUSED, UNUSED_REASONS["imnet"]),
    ]
    return tuple(rules), loaded, notes


def _translate(state: dict[str, torch.Tensor], rules: tuple[Rule, ...],
               ) -> tuple[dict[str, tuple[str, torch.Tensor]], list[tuple[str, str]], list[str]]:
    """File keys -> {model key: (file key, tensor)}, (file key, reason) unused, untranslatable."""
    compiled = [(re.compile(pattern), target, reason) for pattern, target, reason in rules]
    translated: dict[str, tuple[str, torch.Tensor]] = {}
    unused: list[tuple[str, str]] = []
    unknown: list[str] = []
    for key, value in state.items():
        for pattern, target, reason in compiled:
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
                   weights: Which | None = None) -> ImportReport:
    """Load the weights at `path` into `model` by explicit key mapping; return the mapping table.

    `path`: a weights file or a duda checkpoint artifact directory (absolute, or relative to the
    current directory). `config`: the model's DeepLabV2Config or SegFormerConfig, by default
    `model.config`; the weights must be of its family, and of its layout (module docstring).
    `format` overrides the detection from key names (e.g. "iast" for an IAST checkpoint stripped
    of its `fc` and discriminators). `weights`: which model of a file holding two (a DAFormer
    checkpoint, a duda self-train checkpoint) to load, "teacher" or "student"; by default the
    config's `model.init_weights` (SegFormer), else the teacher. `zero_aspp_branches`: DeepLabV2
    classifier branches whose weights and biases are set to zero after loading; (2, 3)
    reproduces AdaptSegNet's single-level `model/deeplab.py`, whose ASPP loop returns after the
    second branch.

    Nothing is copied unless every tensor fits: untranslatable file keys, translated keys the
    model lacks, shape mismatches and model tensors the file should provide but lacks are all
    listed in one DudaError (the first ten and a count), after the checks that name a wrong
    family, layout, MiT variant or head outright.
    """
    path = Path(path)
    if not path.exists():
        raise DudaError(f"initial weights {path} do not exist",
                        "pass an existing weights file or checkpoint artifact")
    model = _unwrap(model)
    config = _model_config(model, config)
    which = _which(weights, config)
    if zero_aspp_branches and config.name != "deeplabv2":
        raise DudaError(f"zero_aspp_branches {tuple(zero_aspp_branches)} applies to DeepLabV2's "
                        f"summed ASPP classifier, but model.name is {config.name} (a "
                        f"{config.describe()}, whose head has no such branches)",
                        "leave --zero-aspp-branches out for a SegFormer")
    read = _read_state(path, which)
    state = _strip_wrappers(read.state)
    try:
        fmt: Format = format if format is not None else (
            "duda" if read.recorded is not None else detect_format(list(state)))
    except DudaError as error:
        raise DudaError(f"initial weights {path}: {error.message}", error.fix) from None
    if fmt not in FORMATS:
        raise DudaError(f"unknown weights format {fmt!r} for {path}",
                        f"use one of {', '.join(FORMATS)}")
    spec = FORMATS[fmt]
    rules, loaded, notes = spec.rules, read.weights, list(read.notes)
    if fmt == "daformer":
        rules, loaded, more = _daformer_rules(state, which)
        notes += more

    translated, unused, unknown = _translate(state, rules)
    _check_family(fmt, _family(spec, read.recorded, translated), path, config, read.recorded,
                  translated)
    _check_lineage(fmt, path, config, read.recorded)
    if config.name == "segformer":
        _check_segformer_fit(path, spec, translated, config)
    own = model.state_dict()
    problems = [f"{key}: no counterpart in the model" for key in unknown]
    problems += [f"{file_key} -> {key}: not in the model"
                 for key, (file_key, _) in translated.items() if key not in own]
    problems += [f"{key}: file {tuple(value.shape)} vs model {tuple(own[key].shape)}"
                 for key, (_, value) in translated.items()
                 if key in own and tuple(value.shape) != tuple(own[key].shape)]
    missing = [key for key in own if key not in translated and not COUNTER.search(key)]
    required = [key for key in missing
                if not (spec.backbone_only and not key.startswith("backbone."))]
    problems += [f"{key}: missing from the file" for key in required]
    if problems:
        if config.name == "deeplabv2":
            shape, keys = config.backbone, "model.backbone, model.width_multiplier"
        else:
            shape = config.describe()
            keys = "model.backbone, model.head, model.embedding_dim, model.fusion_dilations"
        raise DudaError(f"initial weights {path} ({spec.description}) do not fit the model "
                        f"({shape}, {_model_classes(model)} classes): "
                        f"{len(problems)} problem(s): {_listing(problems)}",
                        f"use weights of the configured backbone ({keys}) and number of classes"
                        + (f", or pass the format explicitly if this is not {spec.description}"
                           if format is None else ""))
    branches = _check_branches(zero_aspp_branches, own, spec, path)

    with torch.no_grad():
        for key, (_, value) in translated.items():
            own[key].copy_(value.to(own[key].dtype))
        for index in branches:
            own[f"classifier.branches.{index}.weight"].zero_()
            own[f"classifier.branches.{index}.bias"].zero_()
    report = ImportReport(format=fmt, description=spec.description, source=read.source,
                          lineage=spec.lineage,
                          mapped=[(file_key, key) for key, (file_key, _) in translated.items()],
                          unused=unused, missing=missing, zeroed_aspp_branches=branches,
                          model=config.name, weights=loaded)
    report.notes = notes + _notes(report, read.recorded)
    logger.debug("imported %s", report.summary())
    return report


def _model_classes(model: nn.Module) -> int | str:
    """The number of classes a model predicts ('?' when it does not say)."""
    classes = getattr(model, "num_classes", None)
    if isinstance(classes, int):
        return classes
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
    backbone_only = FORMATS[report.format].backbone_only
    if backbone_only:
        notes.append("the classifier keeps its random initialisation" if report.model ==
                     "deeplabv2" else "the decode head keeps its random initialisation")
    if report.lineage == "duda" and recorded is None:
        notes.append("a bare state dict records no layout: its style and normalization were "
                     "not checked" if report.model == "deeplabv2" else
                     "a bare state dict records no model config: its MiT variant, head and "
                     "embedding size were read from its tensors")
    if (not any(key.endswith("running_var") for _, key in report.mapped)
            and not (backbone_only and report.model == "segformer")):
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

    `imagenet` (DeepLabV2 only) reads torchvision's ImageNet weights from the torch hub cache
    (`torch.hub.get_dir()/checkpoints/<file>`), downloading them there first if the machine can;
    without a network it is a DudaError saying which file to place where. Any other value is a
    path, expected absolute (a relative one is resolved against the current directory); of a
    file holding two models, a SegFormer loads the one `model.init_weights` names.
    """
    config = _model_config(_unwrap(model), config)
    if config.init == "none":
        return None
    if config.name != "deeplabv2" or config.init != "imagenet":
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
