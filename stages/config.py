"""The experiment configuration: pydantic models for every section, loading, overrides, hashing.

One YAML per experiment (`configs/`), no inheritance. Every model forbids unknown keys and is
strict about types, because PyYAML reads `1e-3` as a string and `on`/`no` as booleans
(PITFALLS.md): a lax float field would hide the first. Errors name the file, the key and the fix.
Each stage hashes only the sections it depends on (`STAGE_SECTIONS`), so changing the evaluate
section does not invalidate a trained checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from stages.errors import DudaError

Size = list[int]  # [height, width]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


def _check_size(value: Size | None, name: str) -> None:
    if value is not None and (len(value) != 2 or min(value) <= 0):
        raise ValueError(f"{name} must be [height, width] with two positive integers, got {value}")


# --------------------------------------------------------------------------------------- data


class DomainConfig(Section):
    """Where one domain's images come from and in which layout (ALGORITHM.md A.3)."""

    layout: Literal["cityscapes", "gta5", "synthia", "folder", "synthetic"]
    root: str | None = Field(
        default=None,
        description="dataset root; a relative path is resolved against --data-root / DUDA_DATA_ROOT",
    )
    splits: list[str] = Field(default_factory=lambda: ["train"])
    classes: list[str] | None = Field(
        default=None, description="class names, for the folder layout only (label value = index)")
    exclude_iast_dropped: bool = Field(
        default=False, description="GTA5: drop the 25 ids missing from IAST's gtav_train.json")

    @model_validator(mode="after")
    def _check(self) -> DomainConfig:
        if self.layout != "synthetic" and not self.root:
            raise ValueError(f"layout '{self.layout}' needs a root: set data.<domain>.root")
        if self.layout == "folder" and not self.classes:
            raise ValueError("layout 'folder' needs the class names: set data.<domain>.classes")
        if self.layout != "folder" and self.classes is not None:
            raise ValueError("classes are only given for layout 'folder'")
        return self


class SyntheticConfig(Section):
    """Sizes of the built-in synthetic street-scene benchmark, and which domain pair it draws."""

    pair: Literal["easy", "hard"] = Field(
        default="easy",
        description="easy: a mostly global change of appearance; hard: class-by-class "
                    "appearance, camera geometry and class frequencies change")
    seed: int = 0
    height: int = 128
    width: int = 256
    num_source_train: int = 600
    num_source_val: int = 100
    num_target_train: int = 300
    num_target_val: int = 100


class DataConfig(Section):
    source: DomainConfig
    target: DomainConfig
    synthetic: SyntheticConfig = SyntheticConfig()
    protocols: list[int] = Field(default_factory=lambda: [19],
                                 description="class protocols to report: 19, 16, 13")
    workers: int = Field(default=2, ge=1, description="processes that decode labels")

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        bad = [p for p in self.protocols if p not in (19, 16, 13)]
        if bad and self.source.layout != "folder":
            raise ValueError(f"protocols must be among 19, 16, 13, got {bad}")
        return self


# -------------------------------------------------------------------------------------- input


class InputConfig(Section):
    """Image sizes and the geometric augmentation of ALGORITHM.md A.4."""

    source_size: Size = Field(default_factory=lambda: [1052, 1914],
                              description="[H, W] every source image is resized to")
    target_size: Size = Field(default_factory=lambda: [1024, 2048],
                              description="[H, W] every target image is resized to (teacher view)")
    crop_size: Size = Field(default_factory=lambda: [512, 896], description="[H, W] student crop")
    scale_range: list[float] = Field(default_factory=lambda: [0.51, 1.6])
    flip_probability: float = Field(default=0.5, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _check(self) -> InputConfig:
        for name in ("source_size", "target_size", "crop_size"):
            _check_size(getattr(self, name), f"input.{name}")
        if len(self.scale_range) != 2 or not 0 < self.scale_range[0] <= self.scale_range[1]:
            raise ValueError(f"input.scale_range must be [low, high] with 0 < low <= high, "
                             f"got {self.scale_range}")
        return self


# -------------------------------------------------------------------------------------- model


class ModelConfig(Section):
    """DeepLabV2 and its initial weights (docs/method.md, the network).

    `style` picks the ResNet layout: `torchvision` (IAST's: stride on a block's 3×3 conv, the
    first block of a dilated layer keeps the previous dilation, max-pool rounding down) or
    `caffe`, the DUDA / FDA / AdaptSegNet reference DeepLabV2 (stride on the first 1×1 conv,
    every block of layer3 dilated 2 and of layer4 dilated 4, max-pool rounding up). The two
    compute different functions of the same weights, so weights are only loaded into the layout
    they were trained in. `init` names the initial weights: `none`, `imagenet` (torchvision's
    ImageNet weights), or the path of a weights file or checkpoint artifact.
    """

    backbone: Literal["resnet101", "resnet50", "resnet18"] = "resnet101"
    style: Literal["torchvision", "caffe"] = Field(
        default="torchvision",
        description="ResNet layout: torchvision, or caffe (the reference DeepLabV2; resnet50/101)")
    width_multiplier: float = Field(default=1.0, gt=0,
                                    description="channel multiplier (resnet18 only)")
    dropout: float = Field(default=0.5, ge=0.0, lt=1.0,
                           description="Dropout2d before the ASPP classifier (DUDA: 0.5)")
    aspp_rates: list[int] = Field(default_factory=lambda: [6, 12, 18, 24])
    freeze_bn_affine: bool = True
    normalization: Literal["caffe_bgr", "imagenet_rgb"] = "caffe_bgr"
    init: str = Field(default="none",
                      description="initial weights: none, imagenet, or a weights file or "
                                  "checkpoint artifact path")

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.width_multiplier != 1.0 and self.backbone != "resnet18":
            raise ValueError("model.width_multiplier is only supported for backbone resnet18")
        if self.style == "caffe" and self.backbone == "resnet18":
            raise ValueError("model.style: caffe is the Bottleneck ResNet of the reference "
                             "DeepLabV2: set model.backbone to resnet50 or resnet101, or use "
                             "model.style: torchvision with resnet18")
        if not self.init.strip():
            raise ValueError("model.init is empty: set it to none, imagenet, or the path of a "
                             "weights file or checkpoint artifact")
        if self.init == "imagenet" and (self.backbone == "resnet18" or self.style != "torchvision"
                                        or self.normalization != "imagenet_rgb"):
            raise ValueError("model.init: imagenet loads torchvision's ImageNet ResNet-50/101 "
                             "weights: set model.backbone to resnet50 or resnet101, "
                             "model.style: torchvision and model.normalization: imagenet_rgb")
        return self


class OptimizerConfig(Section):
    """SGD with Nesterov momentum, linear warm-up then poly decay (ALGORITHM.md B.2)."""

    lr: float = Field(default=2.0e-3, gt=0)
    backbone_lr_multiplier: float = Field(default=0.1, ge=0)
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = Field(default=2.0e-4, ge=0)
    warmup_iterations: int = Field(default=2000, ge=0)
    warmup_start: float = Field(default=0.2, ge=0, le=1)
    poly_power: float = 0.9


Precision = Literal["fp32", "bf16", "fp16"]
PRECISION_HELP = ("autocast on GPUs (fp16 adds a gradient scaler); the CPU always runs fp32")
SYNC_BN_HELP = ("under torchrun, batch-norm statistics over every process's batch "
                "(the reference's SyncBatchNorm); no effect in one process")


class AdversarialConfig(Section):
    """Output-space adversarial warm-up (ALGORITHM.md C.1)."""

    enabled: bool = False
    weight: float = Field(default=0.05, ge=0, description="λ_adv: 0.05 GTA5, 0.001 SYNTHIA")
    lr: float = Field(default=1.0e-4, gt=0, description="discriminator Adam learning rate")


class WarmupConfig(Section):
    train_domain: Literal["source", "target"] = Field(
        default="source", description="target: train on target-train labels (the oracle, the "
        "upper bound of an adaptation table)")
    iterations: int = Field(default=40000, ge=1)
    batch_size: int = Field(default=2, ge=1, description="source crops per process (under "
                            "torchrun the step sees processes × batch_size)")
    optimizer: OptimizerConfig = OptimizerConfig(lr=2.5e-4)
    adversarial: AdversarialConfig = AdversarialConfig()
    checkpoint_every: int = Field(default=1000, ge=1)
    eval_every: int = Field(default=0, ge=0, description="evaluate on target-val every N (0: off)")
    log_every: int = Field(default=50, ge=1)
    precision: Precision = Field(default="fp32", description=PRECISION_HELP)
    sync_batchnorm: bool = Field(default=True, description=SYNC_BN_HELP)
    num_workers: int = Field(default=2, ge=0)


# ----------------------------------------------------------------------------- pseudo labels


class GeneratePseudoConfig(Section):
    """Offline pseudo-label generation (ALGORITHM.md D)."""

    selector: Literal["iast", "cbst", "fixed"] = "cbst"
    alpha: float = Field(default=0.2, gt=0, le=1, description="IAST proportion α")
    beta: float = Field(default=0.9, ge=0, lt=1, description="IAST threshold momentum β")
    gamma: float = Field(default=8.0, ge=0, description="IAST hard-class decay γ")
    theta0: float = Field(default=0.9, gt=0, lt=1, description="IAST initial threshold")
    group_size: int = Field(default=2, ge=1, description="IAST: images per threshold update")
    portion: float = Field(default=0.45, gt=0, le=1, description="CBST portion p")
    threshold: float = Field(default=0.9, ge=0, le=1, description="fixed confidence threshold")
    histogram_bins: int = Field(default=2000, ge=10, description="CBST confidence bins")
    size: Size | None = Field(default=None, description="inference [H, W] (default target_size)")
    flip: bool = False
    model: Literal["teacher", "student"] = "teacher"
    recalibrate_bn: bool = Field(
        default=False, description="recompute BN statistics on target-train before labelling "
        "(AdaBN; off in the paper's runs)")
    recalibrate_batches: int = Field(default=0, ge=0, description="0: the whole split")
    batch_size: int = Field(default=2, ge=1)
    num_workers: int = Field(default=2, ge=0)


# ------------------------------------------------------------------------------ self-training


class LossWeights(Section):
    """Weights of every loss term (ALGORITHM.md E.3; E.9 #12 exposes them all)."""

    source: float = 1.0
    offline: float = 1.0
    offline_sce_a: float = 0.2
    offline_sce_b: float = 1.0
    consistency: float = 1.0
    online: float = 0.5
    online_entropy: float = 1.0
    online_kld: float = 0.05
    offline_entropy: float = Field(default=0.0, description="dual-RGR ablation (E.9 #3)")
    offline_kld: float = Field(default=0.0, description="dual-RGR ablation (E.9 #3)")


class SelfTrainConfig(Section):
    iterations: int = Field(default=80000, ge=1)
    source_batch_size: int = Field(default=2, ge=1, description="per process")
    target_batch_size: int = Field(default=2, ge=1, description="per process")
    optimizer: OptimizerConfig = OptimizerConfig()
    loss: LossWeights = LossWeights()
    alpha_start: float = 0.2
    alpha_end: float = 0.7
    alpha_ramp_start: int = 2000
    alpha_power: float = 1.1
    beta_start: float = 0.25
    beta_end: float = 0.75
    beta_offset: int = 5000
    beta_power: float = 1.1
    offline_start: int = Field(default=10000, ge=0, description="first iteration of the "
                               "in-loop offline update")
    offline_cap: float = Field(default=0.99, gt=0, le=1)
    agree_requires_confidence: bool = False
    teacher: Literal["mean", "ema"] = "mean"
    ema_decay: float = Field(default=0.999, gt=0, lt=1)
    consistency_teacher_mode: Literal["train", "eval"] = Field(
        default="train", description="train: stochastic teacher as in the reference (E.9 #5)")
    reproduce_teacher_bn_quirk: bool = Field(
        default=False, description="add the reference's wasted crop teacher pass (E.9 #4)")
    checkpoint_every: int = Field(default=5000, ge=1)
    eval_every: int = Field(default=5000, ge=0)
    log_every: int = Field(default=50, ge=1)
    recalibrate_batches: int = Field(default=0, ge=0,
                                     description="teacher BN recalibration batches before "
                                     "evaluation/saving (0: the whole target-train split)")
    precision: Precision = Field(default="fp32", description=PRECISION_HELP)
    sync_batchnorm: bool = Field(default=True, description=SYNC_BN_HELP)
    num_workers: int = Field(default=2, ge=0)


class UpdateOfflineConfig(Section):
    """Whole-set offline update (ALGORITHM.md E.6 in batch mode)."""

    beta: float = Field(default=0.75, gt=0, le=1)
    cap: float = Field(default=0.99, gt=0, le=1)
    agree_requires_confidence: bool = False
    model: Literal["teacher", "student"] = "teacher"
    flip: bool = False
    batch_size: int = Field(default=2, ge=1)
    num_workers: int = Field(default=2, ge=0)


# --------------------------------------------------------------------------------- evaluate


class EvaluateConfig(Section):
    """Evaluation protocol (ALGORITHM.md F)."""

    split: Literal["val", "train"] = "val"
    domain: Literal["target", "source"] = "target"
    size: Size | None = Field(default=None, description="inference [H, W] (default target_size)")
    sliding_window: bool = False
    window: Size | None = Field(default=None, description="sliding window [H, W] (default crop)")
    window_overlap: float = Field(default=1 / 3, ge=0, lt=1)
    flip: bool = False
    model: Literal["teacher", "student"] = "teacher"
    recalibrate_bn: bool = Field(
        default=False, description="recompute BN statistics on target-train before evaluating "
        "(E.7; for a source-only model this is AdaBN)")
    recalibrate_batches: int = Field(default=0, ge=0, description="0: the whole split")
    save_predictions: bool = False
    batch_size: int = Field(default=2, ge=1)
    num_workers: int = Field(default=2, ge=0)


class PipelineConfig(Section):
    """`duda run`: how many self-train → update-offline rounds."""

    rounds: int = Field(default=1, ge=1)


class Config(Section):
    experiment: str
    seed: int = 888
    data: DataConfig
    input: InputConfig = InputConfig()
    model: ModelConfig = ModelConfig()
    warmup: WarmupConfig = WarmupConfig()
    generate_pseudo: GeneratePseudoConfig = GeneratePseudoConfig()
    self_train: SelfTrainConfig = SelfTrainConfig()
    update_offline: UpdateOfflineConfig = UpdateOfflineConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    pipeline: PipelineConfig = PipelineConfig()


# Which sections each stage depends on: the part of the config its artifact records and hashes.
STAGE_SECTIONS: dict[str, tuple[str, ...]] = {
    "prepare_data": ("data",),
    "warmup": ("seed", "input", "model", "warmup"),
    "generate_pseudo": ("input", "generate_pseudo"),
    "self_train": ("seed", "input", "model", "self_train"),
    "update_offline": ("input", "update_offline"),
    "evaluate": ("input", "evaluate"),
}


def stage_config(config: Config, stage: str) -> dict[str, Any]:
    """The JSON-ready sections of `config` that `stage` depends on."""
    dumped = config.model_dump(mode="json")
    return {key: dumped[key] for key in STAGE_SECTIONS[stage]}


def config_hash(section: dict[str, Any]) -> str:
    """A short stable hash of a JSON-ready config dict."""
    text = json.dumps(section, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------ loading


def _format_validation_error(error: ValidationError, source: str,
                              overrides: list[str] | None = None) -> str:
    lines, from_file = [], False
    for item in error.errors():
        key = "'" + (".".join(str(part) for part in item["loc"]) or "(top level)") + "'"
        setting = _overridden(item["loc"], overrides or [])
        if setting is not None:
            key = f"{key} (from --set {setting!r})"
        else:
            from_file = True
        lines.append(_describe_error(item, key))
    where = f"config {source}" if from_file else "--set override"
    return f"invalid {where}:\n  " + "\n  ".join(lines)


def _describe_error(item: Any, key: str) -> str:
    kind = item["type"]
    if kind == "extra_forbidden":
        return f"unknown key {key}{_allowed_keys(item['loc'])}"
    if kind in ("float_type", "int_type", "bool_type") and isinstance(item["input"], str):
        hint = ""
        if kind == "float_type":
            hint = (" (YAML reads 1e-3 as a string: write it with a dot and a signed "
                    "exponent, 1.0e-3)")
        elif kind == "bool_type":
            hint = " (write true or false)"
        expected = {"float_type": "a number", "int_type": "an integer",
                    "bool_type": "true or false"}[kind]
        return f"{key} must be {expected}, got the string {item['input']!r}{hint}"
    if kind == "missing":
        return f"missing key {key}"
    return f"{key}: {item['msg']} (got {item['input']!r})"


def _allowed_keys(location: tuple[Any, ...]) -> str:
    model: type[BaseModel] = Config
    for part in location[:-1]:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None) if field else None
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
        else:
            return ""
    return "; allowed keys: " + ", ".join(model.model_fields)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`section.key=value` -> (["section", "key"], value parsed as YAML)."""
    if "=" not in text:
        raise DudaError(f"--set {text!r} is not of the form section.key=value",
                        "write for example --set warmup.iterations=200")
    key, raw = text.split("=", 1)
    path = [part for part in key.strip().split(".") if part]
    if not path:
        raise DudaError(f"--set {text!r} has an empty key", "write --set section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as error:
        raise DudaError(f"--set {text!r}: the value is not valid YAML ({error})") from None
    return path, value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of the raw config dict with every `--set` override applied.

    A mapping value merges into the section it names (`--set 'warmup.optimizer={lr: 0.1}'`
    changes only `lr`), any other value replaces the key."""
    result = json.loads(json.dumps(raw))
    for text in overrides:
        path, value = parse_override(text)
        node = result
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise DudaError(f"--set {text!r}: '{part}' is not a section",
                                "check the key path with `duda config show`")
            node = child
        _merge(node, path[-1], value)
    return result


def _merge(node: dict[str, Any], key: str, value: Any) -> None:
    if isinstance(value, dict) and isinstance(node.get(key), dict):
        for child_key, child_value in value.items():
            _merge(node[key], str(child_key), child_value)
    else:
        node[key] = value


def _overridden(location: tuple[Any, ...], overrides: list[str]) -> str | None:
    """The `--set` text that set the key at `location` (or a section holding it), if any."""
    keys = [str(part) for part in location]
    for text in reversed(overrides):
        path, _ = parse_override(text)
        if keys[:len(path)] == path or path[:len(keys)] == keys:
            return text
    return None


def load_config(path: str | Path, overrides: list[str] | None = None,
                data_root: str | Path | None = None) -> Config:
    """Read, override, validate a YAML config; resolve relative dataset roots.

    `data_root` (from --data-root or DUDA_DATA_ROOT, read by the CLI) anchors relative roots.
    """
    path = Path(path)
    if not path.is_file():
        raise DudaError(f"config file {path} does not exist",
                        "pass an existing YAML file with --config (see configs/)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise DudaError(f"config file {path} is not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise DudaError(f"config file {path} must hold a mapping of sections",
                        "start from one of the files in configs/")
    raw = apply_overrides(raw, overrides or [])
    try:
        config = Config.model_validate(raw)
    except ValidationError as error:
        raise DudaError(_format_validation_error(error, str(path), overrides),
                        "fix the key or value; `duda config schema` lists every key") from None
    return resolve_roots(config, data_root)


def resolve_roots(config: Config, data_root: str | Path | None) -> Config:
    """Make relative dataset roots absolute, against `data_root` or the working directory."""
    data = config.data
    domains = {}
    for name in ("source", "target"):
        domain: DomainConfig = getattr(data, name)
        if domain.root is None:
            domains[name] = domain
            continue
        root = Path(os.path.expanduser(domain.root))
        if not root.is_absolute():
            root = (Path(data_root) if data_root else Path.cwd()) / root
        domains[name] = domain.model_copy(update={"root": str(root.resolve())})
    new_data = data.model_copy(update=domains)
    return config.model_copy(update={"data": new_data})


def config_schema() -> dict[str, Any]:
    """The JSON schema of the whole config."""
    return Config.model_json_schema()
