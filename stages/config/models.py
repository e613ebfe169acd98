"""The pydantic models of every config section (`stages.config` assembles and loads them).

Every model forbids unknown keys and is strict about types, because PyYAML reads `1e-3` as a
string and `on`/`no` as booleans: a lax float field would hide the first. Variants (the
pseudo-label selector, the teacher) are discriminated unions on `name`, so a setting of another
variant is an error that names the variant. Shared sub-models (`InferenceConfig`,
`Recalibration`, `TrainingRuntime`, the schedules) keep one definition of what several stages
share.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    field_validator,
    model_validator,
)

Size = list[int]  # [height, width]
# A worker count, or `auto`: derived from the CPU cores this process may use
# (stages.runtime.devices.worker_count). Worker counts change no result: no stage hashes them.
Workers = int | Literal["auto"]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


def _check_size(value: Size | None, name: str) -> None:
    if value is not None and (len(value) != 2 or min(value) <= 0):
        raise ValueError(f"{name} must be [height, width] with two positive integers, got {value}")


def _check_workers(value: Workers, name: str, minimum: int = 0) -> None:
    if isinstance(value, int) and value < minimum:
        raise ValueError(f"{name} must be auto or an integer >= {minimum}, got {value}")


# --------------------------------------------------------------------------------------- data


class DomainConfig(Section):
    """Where one domain's images come from and in which layout
    (docs/method.md#datasets-and-classes)."""

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
    seed: int = Field(default=0, ge=0, lt=2**32, description="0 <= seed < 2**32, as numpy "
                      "seeds")
    height: int = Field(default=128, ge=8, description="image height in pixels")
    width: int = Field(default=256, ge=8, description="image width in pixels")
    num_source_train: int = Field(default=600, ge=1)
    num_source_val: int = Field(default=100, ge=1)
    num_target_train: int = Field(default=300, ge=1)
    num_target_val: int = Field(default=100, ge=1)


class DataConfig(Section):
    source: DomainConfig
    target: DomainConfig
    synthetic: SyntheticConfig = SyntheticConfig()
    protocols: list[int] = Field(default_factory=lambda: [19],
                                 description="class protocols to report: 19, 16, 13")
    headline_protocol: int | None = Field(
        default=None, description="the protocol every summary headlines and warmup/self-train "
        "select best.pt by (default: the first of `protocols`); SYNTHIA: 16, the field's "
        "protocol. Recorded in the dataset index: changing it rebuilds the index")
    workers: Workers = Field(default="auto", description="processes that decode labels "
                             "(auto: the available CPU cores)")

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        bad = [p for p in self.protocols if p not in (19, 16, 13)]
        if bad and self.source.layout != "folder":
            raise ValueError(f"protocols must be among 19, 16, 13, got {bad}")
        if self.headline_protocol is not None and self.headline_protocol not in self.protocols:
            raise ValueError(f"data.headline_protocol {self.headline_protocol} is not among "
                             f"data.protocols {self.protocols}: add it there or pick one of them")
        _check_workers(self.workers, "data.workers", minimum=1)
        return self

    def ordered_protocols(self) -> tuple[int, ...]:
        """The protocols with the headline first (the class table's primary protocol)."""
        first = self.headline_protocol if self.headline_protocol is not None else self.protocols[0]
        return (first, *(p for p in self.protocols if p != first))


# -------------------------------------------------------------------------------------- input


class RareClassSamplingConfig(Section):
    """DAFormer's rare-class sampling of the source crops (docs/method.md#rare-class-sampling):
    a class drawn by its pixel share at `temperature`, a source image holding more than
    `min_pixels` of it, a crop re-drawn until it holds more than min_pixels × min_crop_ratio.
    Off by default; the defaults are DAFormer's."""

    enabled: bool = Field(default=False, description="draw source crops by rare classes")
    temperature: float = Field(default=0.01, gt=0, description="T of P(c) ∝ exp((1 − f_c) / T); "
                               "smaller favours rare classes more")
    min_pixels: int = Field(default=3000, ge=0, description="an image is drawn for a class only "
                            "if its label holds more pixels of it than this")
    min_crop_ratio: float = Field(default=0.5, ge=0, description="re-draw the crop (up to 10 "
                                  "times) until it holds more than min_pixels × this of the "
                                  "class; 0 keeps the first crop")


class InputConfig(Section):
    """Image sizes and the geometric augmentation of docs/method.md#data-and-augmentation."""

    source_size: Size = Field(default_factory=lambda: [1052, 1914],
                              description="[H, W] every source image is resized to")
    target_size: Size = Field(default_factory=lambda: [1024, 2048],
                              description="[H, W] every target image is resized to (teacher view)")
    crop_size: Size = Field(default_factory=lambda: [512, 896], description="[H, W] student crop")
    scale_range: list[float] = Field(default_factory=lambda: [0.51, 1.6])
    flip_probability: float = Field(default=0.5, ge=0.0, le=1.0)
    rare_class_sampling: RareClassSamplingConfig = RareClassSamplingConfig()

    @model_validator(mode="after")
    def _check(self) -> InputConfig:
        for name in ("source_size", "target_size", "crop_size"):
            _check_size(getattr(self, name), f"input.{name}")
        if len(self.scale_range) != 2 or not 0 < self.scale_range[0] <= self.scale_range[1]:
            raise ValueError(f"input.scale_range must be [low, high] with 0 < low <= high, "
                             f"got {self.scale_range}")
        return self


# -------------------------------------------------------------------------------------- model


class DeepLabV2Config(Section):
    """DeepLabV2 and its initial weights (docs/method.md, the network).

    `style` picks the ResNet layout: `torchvision` (IAST's: stride on a block's 3×3 conv, the
    first block of a dilated layer keeps the previous dilation, max-pool rounding down) or
    `caffe`, the DUDA / FDA / AdaptSegNet reference DeepLabV2 (stride on the first 1×1 conv,
    every block of layer3 dilated 2 and of layer4 dilated 4, max-pool rounding up). The two
    compute different functions of the same weights, so weights are only loaded into the layout
    they were trained in. `init` names the initial weights: `none`, `imagenet` (torchvision's
    ImageNet weights), or the path of a weights file or checkpoint artifact.
    """

    # Keys beside the backbone that change the function a model's weights compute: a checkpoint
    # loads only into a config that agrees on them (dropout and the like only change training).
    FUNCTION_KEYS: ClassVar[tuple[str, ...]] = ("style", "normalization", "aspp_rates")

    name: Literal["deeplabv2"] = "deeplabv2"
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

    def describe(self) -> str:
        """The network in words: `DeepLabV2 resnet18 (width × 0.5)`."""
        width = "" if self.width_multiplier == 1.0 else f" (width × {self.width_multiplier:g})"
        return f"DeepLabV2 {self.backbone}{width}"

    @model_validator(mode="after")
    def _check(self) -> DeepLabV2Config:
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


MIT_ENCODERS = ("mit_b0", "mit_b1", "mit_b2", "mit_b3", "mit_b4", "mit_b5")


class SegFormerConfig(Section):
    """A Mix Transformer (MiT-B0…B5) encoder with a SegFormer or DAFormer decoder head
    (docs/method.md#the-segformer-family).

    `head: daformer` is DAFormer's context-aware fusion (each stage embedded to
    `embedding_dim` channels by a linear layer, upsampled to stride 4, concatenated, fused by an
    ASPP of depthwise-separable convs with dilations 1, 6, 12, 18 and BN); `head: segformer` is
    SegFormer's all-MLP head (the same embeddings fused by a 1×1 conv with BN). The encoder has
    LayerNorm only; BatchNorm lives in the head. `init` as for DeepLabV2: `none`, or the path of
    an NVlabs ImageNet MiT file, a DAFormer checkpoint or a duda checkpoint of this family.
    """

    FUNCTION_KEYS: ClassVar[tuple[str, ...]] = ("head", "embedding_dim", "fusion_dilations",
                                                "normalization")

    name: Literal["segformer"]
    backbone: Literal["mit_b0", "mit_b1", "mit_b2", "mit_b3", "mit_b4", "mit_b5"] = "mit_b5"
    head: Literal["daformer", "segformer"] = Field(
        default="daformer", description="daformer (context-aware fusion) or segformer (all-MLP)")
    embedding_dim: int = Field(default=256, ge=1, description="channels of each stage's "
                               "embedding and of the fused features (DAFormer: 256)")
    fusion_dilations: list[int] = Field(
        default_factory=lambda: [1, 6, 12, 18],
        description="daformer head: the fusion ASPP's dilations (1 is a 1×1 conv)")
    dropout: float = Field(default=0.1, ge=0.0, lt=1.0,
                           description="Dropout2d before the 1×1 classifier (DAFormer: 0.1)")
    drop_path_rate: float = Field(default=0.1, ge=0.0, lt=1.0,
                                  description="the encoder's stochastic depth (DAFormer: 0.1)")
    normalization: Literal["imagenet_rgb"] = Field(
        default="imagenet_rgb", description="MiT is trained on RGB with ImageNet mean and std")
    init: str = Field(default="none",
                      description="initial weights: none, or the path of an NVlabs MiT file, a "
                                  "DAFormer checkpoint or a duda checkpoint artifact")
    init_weights: Literal["teacher", "student"] = Field(
        default="teacher", description="which model of a checkpoint holding two (a DAFormer "
                                       "checkpoint, a duda self-train checkpoint) to load")

    def describe(self) -> str:
        """The network in words: `SegFormer mit_b5 with the daformer head`."""
        return f"SegFormer {self.backbone} with the {self.head} head"

    @model_validator(mode="after")
    def _check(self) -> SegFormerConfig:
        if not self.init.strip():
            raise ValueError("model.init is empty: set it to none, or the path of an NVlabs MiT "
                             "file, a DAFormer checkpoint or a duda checkpoint artifact")
        if self.init == "imagenet":
            raise ValueError("model.init: imagenet names torchvision's ResNet weights, which a "
                             "MiT encoder cannot load: pass the path of NVlabs' ImageNet "
                             f"{self.backbone}.pth instead")
        if self.head == "daformer" and (not self.fusion_dilations
                                        or min(self.fusion_dilations) < 1):
            raise ValueError("model.fusion_dilations must be a non-empty list of dilations >= 1, "
                             f"got {self.fusion_dilations}")
        return self


def _model_variant(data: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    """`model: segformer` is shorthand for `{name: segformer}`. A section without a `name` is
    deeplabv2, the model of every config written before the choice; it is validated on its own,
    so its errors name its keys where they always were (`model.backbone`, no variant)."""
    data = _named_variant({"model": data}, "model")["model"]
    if isinstance(data, dict) and data.get("name", "deeplabv2") == "deeplabv2":
        return DeepLabV2Config.model_validate(data)
    return handler(data)


# The model family: a tagged union on `name` (docs/design.md#configuration).
ModelConfig = Annotated[DeepLabV2Config | SegFormerConfig,
                        WrapValidator(_model_variant), Field(discriminator="name")]
MODEL_CONFIGS = (DeepLabV2Config, SegFormerConfig)


class SgdOptimizerConfig(Section):
    """SGD with Nesterov momentum, linear warm-up from a fraction of lr then poly decay
    (docs/method.md#optimisation): the optimizer of every config that names none."""

    name: Literal["sgd"] = "sgd"
    lr: float = Field(default=2.0e-3, gt=0)
    backbone_lr_multiplier: float = Field(default=0.1, ge=0)
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = Field(default=2.0e-4, ge=0)
    warmup_iterations: int = Field(default=2000, ge=0)
    warmup_start: float = Field(default=0.2, ge=0, le=1)
    poly_power: float = 0.9

    @property
    def warmup_start_factor(self) -> float:
        """The learning-rate factor at t = 0."""
        return self.warmup_start


class AdamwOptimizerConfig(Section):
    """DAFormer's recipe (docs/method.md#optimisation): AdamW, the head at ×10 the backbone's
    lr, no weight decay on parameters whose names contain `norm` or `pos_block` (biases are
    decayed), linear warm-up from an absolute lr then poly decay."""

    name: Literal["adamw"]
    lr: float = Field(default=6.0e-5, gt=0, description="the backbone's lr")
    head_lr_multiplier: float = Field(default=10.0, ge=0, description="the head's lr is "
                                      "lr × head_lr_multiplier")
    betas: list[float] = Field(default_factory=lambda: [0.9, 0.999],
                               description="Adam's [β1, β2]")
    weight_decay: float = Field(default=0.01, ge=0)
    no_decay: list[str] = Field(
        default_factory=lambda: ["norm", "pos_block"], description="a parameter whose name "
        "contains one of these gets no weight decay (DAFormer's decay_mult 0)")
    warmup_iterations: int = Field(default=1500, ge=0)
    warmup_start_lr: float = Field(default=1.0e-6, ge=0, description="the backbone's lr at "
                                   "t = 0, an absolute value at most lr (the head's is "
                                   "head_lr_multiplier times it)")
    poly_power: float = 1.0

    @model_validator(mode="after")
    def _check(self) -> AdamwOptimizerConfig:
        if len(self.betas) != 2 or not all(0 <= beta < 1 for beta in self.betas):
            raise ValueError(f"optimizer.betas must be [β1, β2], each in [0, 1), got "
                             f"{self.betas}")
        if self.warmup_start_lr > self.lr:
            raise ValueError(f"optimizer.warmup_start_lr ({self.warmup_start_lr}) must not "
                             f"exceed optimizer.lr ({self.lr}): the warm-up rises to lr")
        return self

    @property
    def warmup_start_factor(self) -> float:
        """The learning-rate factor at t = 0: the absolute start as a fraction of lr."""
        return self.warmup_start_lr / self.lr


def _optimizer_variant(data: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    """`optimizer: adamw` is shorthand for `{name: adamw}`. A section without a `name` is sgd,
    the optimizer of every config written before the choice; it is validated on its own, so
    its errors name its keys where they always were (`warmup.optimizer.lr`, no variant)."""
    data = _named_variant({"optimizer": data}, "optimizer")["optimizer"]
    if isinstance(data, dict) and data.get("name", "sgd") == "sgd":
        return SgdOptimizerConfig.model_validate(data)
    return handler(data)


OptimizerConfig = Annotated[SgdOptimizerConfig | AdamwOptimizerConfig,
                            WrapValidator(_optimizer_variant), Field(discriminator="name")]


Precision = Literal["fp32", "bf16", "fp16"]


class TrainingRuntime(Section):
    """How a training stage runs; none of it changes what a one-process CPU run computes."""

    precision: Precision = Field(
        default="fp32",
        description="autocast on GPUs (fp16 adds a gradient scaler); the CPU always runs fp32")
    sync_batchnorm: bool = Field(
        default=True, description="under torchrun, batch-norm statistics over every process's "
        "batch (the reference's SyncBatchNorm); no effect in one process")
    num_workers: Workers = Field(default="auto", description="worker processes of each data "
                                 "loader (auto: the CPU cores available to this process, shared "
                                 "by its loaders)")
    prefetch: bool = Field(default=True, description="self-train: store writes on a background "
                           "thread and the next batch's offline labels read ahead (the same "
                           "results either way)")

    @model_validator(mode="after")
    def _check(self) -> TrainingRuntime:
        _check_workers(self.num_workers, "runtime.num_workers")
        return self


class InferenceConfig(Section):
    """How a model is run on whole images: generate-pseudo, update-offline, evaluate."""

    model: Literal["teacher", "student"] = Field(
        default="teacher", description="which weights of the checkpoint (a checkpoint without "
        "a teacher falls back to its student)")
    size: Size | None = Field(default=None, description="inference [H, W] (default: the "
                              "domain's base size, input.target_size for target images)")
    flip: bool = Field(default=False, description="average with the horizontally flipped pass")
    sliding_window: bool = False
    window: Size | None = Field(default=None, description="sliding window [H, W] (default "
                                "input.crop_size)")
    window_overlap: float = Field(default=1 / 3, ge=0, lt=1)
    batch_size: int = Field(default=2, ge=1)
    num_workers: Workers = Field(default="auto", description="image decoding worker processes "
                                 "(auto: the CPU cores available to this process)")

    @model_validator(mode="after")
    def _check(self) -> InferenceConfig:
        for name in ("size", "window"):
            _check_size(getattr(self, name), f"inference.{name}")
        _check_workers(self.num_workers, "inference.num_workers")
        return self


class Recalibration(Section):
    """Recomputing BatchNorm statistics on target-train before inference (for a source-only
    model this is AdaBN), on the weak crops self-training's periodic evaluation uses: the same
    seeded sequence, so an evaluation of a finished run with the run's `recalibrate_batches` and
    `target_batch_size` here reproduces the mIoU the run logged."""

    enabled: bool = False
    batches: int = Field(default=0, ge=0, description="batches of target-train crops (0: one "
                         "pass over the split)")
    batch_size: int = Field(default=2, ge=1, description="crops per batch")


class AdversarialConfig(Section):
    """Output-space adversarial warm-up (docs/method.md, the warmup)."""

    enabled: bool = False
    weight: float = Field(default=0.05, ge=0, description="λ_adv: 0.05 GTA5, 0.001 SYNTHIA")
    lr: float = Field(default=1.0e-4, gt=0, description="discriminator Adam learning rate")


class WarmupConfig(Section):
    train_domain: Literal["source", "target"] = Field(
        default="source", description="target: train on target-train labels (the oracle, the "
        "upper bound of an adaptation table)")
    iterations: int = Field(default=40000, ge=1)
    batch_size: int = Field(default=2, ge=1, description="source crops per step, over all "
                            "processes (under torchrun each process takes its share)")
    optimizer: OptimizerConfig = SgdOptimizerConfig(lr=2.5e-4)
    adversarial: AdversarialConfig = AdversarialConfig()
    checkpoint_every: int = Field(default=1000, ge=1)
    eval_every: int = Field(default=0, ge=0, description="evaluate on target-val every N (0: off)")
    log_every: int = Field(default=50, ge=1)
    runtime: TrainingRuntime = TrainingRuntime()


# ----------------------------------------------------------------------------- pseudo labels


class IastSelectorConfig(Section):
    """IAST's instance-adaptive thresholds, updated per group of images in index order."""

    name: Literal["iast"]
    alpha: float = Field(default=0.2, gt=0, le=1, description="proportion α")
    beta: float = Field(default=0.9, ge=0, lt=1, description="threshold momentum β")
    gamma: float = Field(default=8.0, ge=0, description="hard-class decay γ")
    theta0: float = Field(default=0.9, gt=0, lt=1, description="initial threshold")
    group_size: int = Field(default=2, ge=1, description="images per threshold update")


class CbstSelectorConfig(Section):
    """Class-balanced thresholds over the whole split: each class keeps its `portion` most
    confident pixels."""

    name: Literal["cbst"]
    portion: float = Field(default=0.45, gt=0, le=1, description="CBST portion p")


class FixedSelectorConfig(Section):
    """One confidence threshold for every class."""

    name: Literal["fixed"]
    threshold: float = Field(default=0.9, ge=0, le=1)


# Every variant's `name` is a key of stages.method.selectors.SELECTORS (a test checks it).
SelectorConfig = Annotated[IastSelectorConfig | CbstSelectorConfig | FixedSelectorConfig,
                           Field(discriminator="name")]


class GeneratePseudoConfig(Section):
    """Offline pseudo-label generation (docs/method.md, the initial pseudo labels)."""

    selector: SelectorConfig = CbstSelectorConfig(name="cbst")
    inference: InferenceConfig = InferenceConfig()
    recalibration: Recalibration = Field(
        default=Recalibration(), description="AdaBN before labelling (off in the paper's runs)")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        return _named_variant(data, "selector")


# ------------------------------------------------------------------------------ self-training


class LossWeights(Section):
    """Weights of every loss term (docs/method.md, the losses); 0 switches a term off."""

    source: float = 1.0
    offline: float = 1.0
    offline_sce_a: float = 0.2
    offline_sce_b: float = 1.0
    consistency: float = 1.0
    online: float = 0.5
    online_entropy: float = 1.0
    online_kld: float = 0.05
    offline_entropy: float = Field(default=0.0, description="the regularisers on the offline "
                                   "labels too (off in the reference)")
    offline_kld: float = Field(default=0.0, description="the regularisers on the offline "
                               "labels too (off in the reference)")


class Schedule(Section):
    """A proportion held at `start`, then ramped towards `end` over the rest of the run:
    start + (end − start)·((it − offset)/(iterations − offset))^power."""

    start: float = Field(ge=0, le=1)
    end: float = Field(ge=0, le=1)
    offset: int = Field(ge=0)
    power: float = Field(default=1.1, gt=0)


class AlphaSchedule(Schedule):
    """The online labels' proportion α; the ramp begins at `offset`."""

    start: float = Field(default=0.2, ge=0, le=1)
    end: float = Field(default=0.7, ge=0, le=1)
    offset: int = Field(default=2000, ge=0)


class BetaSchedule(Schedule):
    """The offline update's proportion β; the ramp begins at `offline_start`, measured from
    `offset` (the reference's 5000 with its update starting at 10000)."""

    start: float = Field(default=0.25, ge=0, le=1)
    end: float = Field(default=0.75, ge=0, le=1)
    offset: int = Field(default=5000, ge=0)


class MeanTeacherConfig(Section):
    """The equal-weight running mean of every student since the start (the reference's)."""

    name: Literal["mean"]


class EmaTeacherConfig(Section):
    """An exponential moving average of the student."""

    name: Literal["ema"]
    decay: float = Field(default=0.999, gt=0, lt=1)


class StudentTeacherConfig(Section):
    """The ablation without a teacher: online labels, consistency target and offline update all
    come from the student itself (under no_grad); model.pt then holds no teacher."""

    name: Literal["student"]


Teacher = Annotated[MeanTeacherConfig | EmaTeacherConfig | StudentTeacherConfig,
                    Field(discriminator="name")]


class OfflineRuleConfig(Section):
    """The offline update's rule (docs/method.md#the-offline-update), one model for the two
    stages that apply it. It is built from each stage's own keys (`self_train.offline_cap`,
    `self_train.agree_requires_confidence`; `update_offline.cap`,
    `update_offline.agree_requires_confidence`), which stay where they are so that every
    existing config hashes as before (docs/design.md#configuration)."""

    cap: float = Field(default=0.99, gt=0, le=1, description="the largest threshold τ^β_c")
    agree_requires_confidence: bool = Field(
        default=False, description="a stored label the teacher agrees with is kept only if "
        "the teacher is confident")


class SelfTrainConfig(Section):
    iterations: int = Field(default=80000, ge=1)
    source_batch_size: int = Field(default=2, ge=1, description="source crops per step, over "
                                   "all processes and micro-batches")
    target_batch_size: int = Field(default=2, ge=1, description="target crops per step, over "
                                   "all processes and micro-batches")
    gradient_accumulation: int = Field(
        default=1, ge=1, description="micro-batches per step, for a GPU that cannot hold the "
        "step's batch: gradients are summed over them before one optimizer step; batch-norm "
        "statistics and online thresholds are then per micro-batch (docs/method.md)")
    optimizer: OptimizerConfig = SgdOptimizerConfig()
    loss: LossWeights = LossWeights()
    alpha: AlphaSchedule = AlphaSchedule()
    beta: BetaSchedule = BetaSchedule()
    offline_update: bool = Field(default=True, description="false: the stored labels are never "
                                 "updated during the run (an ablation)")
    offline_start: int = Field(default=10000, ge=0, description="first iteration of the "
                               "in-loop offline update")
    offline_cap: float = Field(default=0.99, gt=0, le=1, description="the offline rule's cap "
                               "on τ^β (the same rule as update_offline.cap)")
    agree_requires_confidence: bool = Field(
        default=False, description="a stored label the teacher agrees with is kept only if "
        "confident (the reference keeps it whatever the confidence); the same rule as "
        "update_offline.agree_requires_confidence")
    teacher: Teacher = MeanTeacherConfig(name="mean")
    consistency_teacher_mode: Literal["train", "eval"] = Field(
        default="train", description="train: the stochastic train-mode teacher of the "
        "reference; eval: the eval-mode pass that also makes the online labels")
    reproduce_teacher_bn_quirk: bool = Field(
        default=False, description="add the reference's discarded crop teacher pass, whose only "
        "effect is on the teacher's BN statistics")
    checkpoint_every: int = Field(default=5000, ge=1)
    eval_every: int = Field(default=5000, ge=0)
    log_every: int = Field(default=50, ge=1)
    recalibrate_batches: int = Field(default=0, ge=0,
                                     description="teacher BN recalibration batches before "
                                     "evaluation/saving (0: the whole target-train split)")
    recalibrate_batch_size: int | None = Field(
        default=None, ge=1, description="crops per recalibration batch (default: "
        "target_batch_size); evaluate.recalibration.batch_size must equal it for `duda "
        "evaluate` to reproduce the logged mIoU")
    runtime: TrainingRuntime = TrainingRuntime()

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        return _named_variant(data, "teacher")

    @property
    def recalibration(self) -> Recalibration:
        """The teacher's BN recalibration before each evaluation and before saving."""
        return Recalibration(enabled=True, batches=self.recalibrate_batches,
                             batch_size=self.recalibrate_batch_size or self.target_batch_size)

    @property
    def offline_rule(self) -> OfflineRuleConfig:
        """The in-loop offline update's rule (the same model update-offline builds)."""
        return OfflineRuleConfig(cap=self.offline_cap,
                                 agree_requires_confidence=self.agree_requires_confidence)


class UpdateOfflineConfig(Section):
    """Whole-set offline update (docs/method.md, the offline update), in batches of
    `inference.batch_size` images whose thresholds are computed jointly."""

    beta: float = Field(default=0.75, gt=0, le=1)
    cap: float = Field(default=0.99, gt=0, le=1, description="the offline rule's cap on τ^β "
                       "(the same rule as self_train.offline_cap)")
    agree_requires_confidence: bool = Field(
        default=False, description="a stored label the teacher agrees with is kept only if "
        "confident; the same rule as self_train.agree_requires_confidence")
    inference: InferenceConfig = InferenceConfig()

    @property
    def offline_rule(self) -> OfflineRuleConfig:
        """The whole-set update's rule (the same model self-train builds)."""
        return OfflineRuleConfig(cap=self.cap,
                                 agree_requires_confidence=self.agree_requires_confidence)


# --------------------------------------------------------------------------------- evaluate


class EvaluateConfig(Section):
    """Evaluation protocol (docs/method.md, evaluation)."""

    split: Literal["val", "train"] = "val"
    domain: Literal["target", "source"] = "target"
    inference: InferenceConfig = InferenceConfig()
    recalibration: Recalibration = Field(
        default=Recalibration(), description="recompute BN statistics on target-train first "
        "(the mean teacher's protocol; for a source-only model this is AdaBN)")
    save_predictions: list[Literal["trainid", "labelid", "color", "confidence", "panel"]] = Field(
        default_factory=list, description="prediction PNGs to save, each in predictions/<format>/: "
        "trainid, labelid (Cityscapes label ids, for the benchmark server), color, confidence "
        "(255 × max probability), panel (image | prediction | ground truth); true means [color]")

    @field_validator("save_predictions", mode="before")
    @classmethod
    def _boolean_shorthand(cls, value: Any) -> Any:
        if isinstance(value, bool):
            return ["color"] if value else []
        return value


def _named_variant(data: Any, key: str) -> Any:
    """Accept `key: NAME` as shorthand for `key: {name: NAME}`."""
    if isinstance(data, dict) and isinstance(data.get(key), str):
        return {**data, key: {"name": data[key]}}
    return data
