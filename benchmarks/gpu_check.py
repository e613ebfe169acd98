"""Speed and memory of DUDA self-training on one GPU, per network and precision, before a run.

Two networks are measured side by side, each as its paper config trains it:
- `deeplabv2`: DeepLabV2-ResNet-101 (Dropout2d 0.5, frozen BN affine, Caffe BGR input;
  docs/method.md#the-network), 2 source + 2 target student crops of 512×896, the teacher on the
  2 full 1024×2048 target images, SGD with Nesterov momentum over the two parameter groups and
  the equal-weight mean teacher (`configs/gta5_to_cityscapes.yaml`, 80,000 iterations);
- `segformer`: a MiT-B5 encoder with DAFormer's context-aware fusion head (256 channels,
  ImageNet RGB input; docs/method.md#the-segformer-family), DAFormer's 512×512 crops (the same
  2 + 2), the teacher on 2 full 512×1024 images, AdamW over the backbone and ×10 head groups
  with and without decay and the EMA teacher (`configs/gta5_to_cityscapes_daformer.yaml`, 40,000
  iterations).
Each gets 19 classes and random weights, random images and random offline labels, and runs
`stages.method.step.self_train_step` exactly as the `self-train` stage does
(docs/method.md#one-step-in-execution-order, default loss weights) with a `GradScaler` (active
for fp16 only), then the teacher update; the optimizer and teacher are its config's
`self_train` ones. cuDNN runs deterministic with autotuning off, as
`stages.engine.training.seed_everything` sets it for training. Each network and precision
(fp32, bf16, fp16) gets a fresh model, `--warmup-steps` untimed iterations, then `--steps` timed
ones.

Beside the step, each row measures the teacher's periodic evaluation as self-train runs it
(docs/method.md#batch-norm-recalibration): BN recalibration over train-mode crops in batches of
the config's recalibration batch size (a MiT encoder has LayerNorm only, so for `segformer` it
recomputes the decoder's BN), then inference on full target images in batches of
`evaluate.inference.batch_size` (with its flip), the scores upsampled to the ground truth's
`--full` size (Cityscapes' 1024×2048), and the confusion matrix; `--eval-batches` and
`--eval-images` of them are timed and projected to the config's counts (its
`self_train.recalibrate_batches`, 0 = one pass over Cityscapes' 2,975 training images; 500 val
images; an evaluation every `self_train.eval_every` iterations, and the recalibration alone
before `model.pt`).

How to read the table, one row per network and precision, the networks of a precision next to
each other:
- s/iter: median wall time of one iteration = `self_train_step` + `teacher.update`, between two
  `torch.cuda.synchronize()` calls. Data loading is not included (the batches sit on the GPU).
- img/s: source + target crops trained per second (4 / s/iter with the default batches).
- peak GiB: `torch.cuda.max_memory_allocated` over the timed iterations (reset per row); the
  caching allocator reserves somewhat more.
- run h: s/iter × the config's `self_train.iterations` (80,000 for deeplabv2, 40,000 for
  segformer) in hours, one GPU, data loading and the periodic evaluation and checkpoints
  excluded.
- bare s: median time of the model passes the step cannot avoid, measured in the same run,
  alternating with the timed iterations, at the same precision: student forward + backward on
  the source crops, student forward + backward on the target crops (a mean of the logits as the
  loss), and the teacher without gradients on the full target images twice (train mode for the
  consistency target, eval mode for the pseudo labels, as the default step does).
- x bare: s/iter ÷ bare s, the step's overhead over these passes (losses, pseudo labels, the
  full→crop mapping, the optimizer, the scaler and the teacher update). Near 1 is good.
- eval s: one periodic evaluation projected to the config's counts = recalibration batches ×
  s/batch + 500 × s/val image (images already on the device: decoding is not included).
- evals h: all the run's evaluations (16 for deeplabv2, 10 for segformer) and the recalibration
  before `model.pt`, in hours; add it to run h.

    python benchmarks/gpu_check.py                      # both networks, fp32 bf16 fp16, ~4 min
    python benchmarks/gpu_check.py --models segformer --precisions bf16 --steps 20 --json

`--models` picks the networks; the segformer one needs the `segformer` extra. `--backbone`,
`--crop` and `--config` shape the deeplabv2 row, `--encoder`, `--head`, `--embedding-dim`,
`--segformer-crop`, `--segformer-full` and `--segformer-config` the segformer one. With
`--device cpu` only fp32 is run unless `--precisions` asks otherwise; the project never uses
autocast on the CPU, so bf16/fp16 rows there run in fp32.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

try:
    import stages  # noqa: F401
except ImportError:  # run from a checkout without the editable install
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from stages.config import (
    MIT_ENCODERS,
    Config,
    DeepLabV2Config,
    EmaTeacherConfig,
    LossWeights,
    ModelConfig,
    OptimizerConfig,
    SegFormerConfig,
    load_config,
)
from stages.data.classes import IGNORE_INDEX
from stages.data.transforms import sample_crop_params
from stages.engine.inference import predict_classes
from stages.engine.training import build_optimizer, optimizer_groups
from stages.method.step import StepInputs, self_train_step
from stages.nn.model import build_model
from stages.nn.teacher import MeanTeacher, recalibrate_batchnorm
from stages.runtime.devices import autocast, resolve_device
from stages.runtime.errors import DudaError
from stages.runtime.seeding import seed_everything

NUM_CLASSES = 19
ALPHA = 0.2  # α at the start of self-training (docs/method.md#starting-state)
PRECISIONS = ("fp32", "bf16", "fp16")
NETWORKS = ("deeplabv2", "segformer")
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PAPER_CONFIG = CONFIGS / "gta5_to_cityscapes.yaml"
SEGFORMER_CONFIG = CONFIGS / "gta5_to_cityscapes_daformer.yaml"
TARGET_TRAIN_IMAGES, TARGET_VAL_IMAGES = 2_975, 500  # Cityscapes (docs/method.md#datasets-and-classes)
BARE_PASSES = ("student forward+backward on the source crops; student forward+backward on the "
               "target crops; teacher forward without gradients on the full target images, "
               "train mode and eval mode")
# The spread of the random input images: normalised pixels under each input convention
# (caffe_bgr subtracts the mean only; imagenet_rgb also divides by the std).
INPUT_SCALE = {"caffe_bgr": 50.0, "imagenet_rgb": 1.0}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu", "auto"])
    parser.add_argument("--models", nargs="+", choices=NETWORKS, default=list(NETWORKS),
                        help="the networks to measure (default: both)")
    parser.add_argument("--batch-size", type=int, default=2,
                        help="source and target crops per iteration, each (paper: 2)")
    parser.add_argument("--full", type=int, nargs=2, default=[1024, 2048], metavar=("H", "W"),
                        help="full target image size: the deeplabv2 teacher's input, and the "
                        "ground truth's size every evaluation is upsampled to")
    deeplab = parser.add_argument_group("deeplabv2")
    deeplab.add_argument("--crop", type=int, nargs=2, default=[512, 896], metavar=("H", "W"),
                         help="student crop size (source and target)")
    deeplab.add_argument("--backbone", default="resnet101",
                         choices=["resnet101", "resnet50", "resnet18"])
    deeplab.add_argument("--width-multiplier", type=float, default=1.0,
                         help="channel multiplier (resnet18 only)")
    deeplab.add_argument("--config", type=Path, default=PAPER_CONFIG,
                         help="its optimizer, teacher, iterations and evaluation's batch sizes, "
                         "flip and counts come from this config")
    segformer = parser.add_argument_group("segformer")
    segformer.add_argument("--encoder", default="mit_b5", choices=list(MIT_ENCODERS))
    segformer.add_argument("--head", default="daformer", choices=["daformer", "segformer"])
    segformer.add_argument("--embedding-dim", type=int, default=256,
                           help="the head's channels (DAFormer: 256)")
    segformer.add_argument("--segformer-crop", type=int, nargs=2, default=[512, 512],
                           metavar=("H", "W"), help="student crop size (DAFormer: 512×512)")
    segformer.add_argument("--segformer-full", type=int, nargs=2, default=[512, 1024],
                           metavar=("H", "W"), help="full target image size, the teacher's "
                           "input and the evaluation's (DAFormer: 512×1024)")
    segformer.add_argument("--segformer-config", type=Path, default=SEGFORMER_CONFIG,
                           help="as --config, for the segformer row")
    parser.add_argument("--warmup-steps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10, help="timed iterations per row")
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=None,
                        help="default: fp32 bf16 fp16 on a GPU, fp32 on the CPU")
    parser.add_argument("--eval-batches", type=int, default=20,
                        help="recalibration batches timed per row")
    parser.add_argument("--eval-images", type=int, default=10,
                        help="full target images evaluated per row")
    parser.add_argument("--json", action="store_true", help="also print one JSON object")
    args = parser.parse_args(argv)
    if min(args.steps, args.batch_size, args.eval_batches, args.eval_images,
           args.embedding_dim) < 1 or args.warmup_steps < 0:
        parser.error("--steps, --batch-size, --eval-batches, --eval-images and --embedding-dim "
                     "must be at least 1, --warmup-steps at least 0")
    if min(*args.crop, *args.full, *args.segformer_crop, *args.segformer_full) < 1:
        parser.error("--crop, --full, --segformer-crop and --segformer-full sizes must be "
                     "positive")
    args.models = list(dict.fromkeys(args.models))  # each once, in the order given
    return args


@dataclass(frozen=True)
class EvaluationPlan:
    """Self-train's periodic evaluation as a config sets it, at the paper's image counts."""

    recalibration_batches: int
    recalibration_batch_size: int
    val_batch_size: int
    flip: bool
    evaluations: int

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "val_images": TARGET_VAL_IMAGES}


def evaluation_plan(config: Config) -> EvaluationPlan:
    """Recalibration batches (0 in the config: one pass over target-train, whole batches, as the
    loader's epoch), the evaluation's batch and flip, and how many periodic evaluations a run
    makes (one every `eval_every` iterations)."""
    cfg = config.self_train
    recalibration = cfg.recalibration
    batches = recalibration.batches or TARGET_TRAIN_IMAGES // recalibration.batch_size
    evaluations = cfg.iterations // cfg.eval_every if cfg.eval_every else 0
    return EvaluationPlan(batches, recalibration.batch_size, config.evaluate.inference.batch_size,
                          config.evaluate.inference.flip, evaluations)


@dataclass(frozen=True)
class Network:
    """One measured network: its model, sizes, and what its config trains it with.

    crop: the student's crops (H, W); full: the teacher's full target images and the
    evaluation's input (H, W); ground_truth: the size the evaluation's scores are upsampled to.
    The optimizer, teacher, iterations and evaluation plan are `config`'s."""

    key: str
    model: ModelConfig
    crop: tuple[int, int]
    full: tuple[int, int]
    ground_truth: tuple[int, int]
    config: Path
    optimizer: OptimizerConfig
    ema_decay: float | None  # None: the equal-weight mean teacher
    iterations: int
    plan: EvaluationPlan

    @property
    def label(self) -> str:
        """The table's name of the network, one word: `resnet101`, `mit_b5+daformer`."""
        if isinstance(self.model, SegFormerConfig):
            return f"{self.model.backbone}+{self.model.head}"
        width = self.model.width_multiplier
        return self.model.backbone + ("" if width == 1.0 else f"x{width:g}")

    def teacher(self, student: torch.nn.Module) -> MeanTeacher:
        if self.ema_decay is None:
            return MeanTeacher(student, "mean")
        return MeanTeacher(student, "ema", self.ema_decay)

    def describe(self) -> str:
        """The header line of the network: model, optimizer, teacher, sizes, schedule."""
        teacher = ("mean teacher" if self.ema_decay is None
                   else f"EMA teacher {self.ema_decay:g}")
        crop_h, crop_w = self.crop
        full_h, full_w = self.full
        plan = self.plan
        return (f"{self.model.describe()}, {self.optimizer.name}, {teacher}; crops "
                f"{crop_h}×{crop_w}, teacher on full images {full_h}×{full_w}; "
                f"{self.iterations:,} iterations; eval {plan.evaluations} × (recalibration "
                f"{plan.recalibration_batches} batches of {plan.recalibration_batch_size} crops "
                f"+ {TARGET_VAL_IMAGES} images in batches of {plan.val_batch_size}"
                f"{', flipped' if plan.flip else ''}, scored at "
                f"{self.ground_truth[0]}×{self.ground_truth[1]}) + the recalibration before "
                f"model.pt; from {self.config.name}")

    def to_json(self) -> dict[str, Any]:
        return {"label": self.label, "model": self.model.model_dump(mode="json"),
                "crop": list(self.crop), "full": list(self.full),
                "ground_truth": list(self.ground_truth), "config": str(self.config),
                "optimizer": self.optimizer.model_dump(mode="json"),
                "teacher": {"name": "mean"} if self.ema_decay is None
                else {"name": "ema", "decay": self.ema_decay},
                "projected_iterations": self.iterations, "evaluation": self.plan.to_json()}


def networks(args: argparse.Namespace) -> list[Network]:
    """The networks `--models` asks for, their configs read (a DudaError names a bad one) and
    their models built once on the meta device (a DudaError names a missing extra)."""
    built = []
    for key in args.models:
        if key == "deeplabv2":
            model: ModelConfig = DeepLabV2Config(
                backbone=args.backbone, width_multiplier=args.width_multiplier, dropout=0.5,
                freeze_bn_affine=True, normalization="caffe_bgr")
            path, crop, full = args.config, args.crop, args.full
        else:
            model = SegFormerConfig(name="segformer", backbone=args.encoder, head=args.head,
                                    embedding_dim=args.embedding_dim)
            path, crop, full = args.segformer_config, args.segformer_crop, args.segformer_full
        config = load_config(path)
        try:
            with torch.device("meta"):
                build_model(model, NUM_CLASSES)
        except DudaError as error:  # the segformer extra is missing
            raise DudaError(error.message, f"{error.fix}; or measure the other network alone: "
                            f"--models {' '.join(n for n in NETWORKS if n != key)}") from None
        teacher = config.self_train.teacher
        built.append(Network(
            key=key, model=model, crop=(crop[0], crop[1]), full=(full[0], full[1]),
            ground_truth=(args.full[0], args.full[1]), config=path,
            optimizer=config.self_train.optimizer,
            ema_decay=teacher.decay if isinstance(teacher, EmaTeacherConfig) else None,
            iterations=config.self_train.iterations, plan=evaluation_plan(config)))
    return built


def default_precisions(device: torch.device) -> list[str]:
    """All three on a GPU; fp32 alone on the CPU, where the project never uses autocast."""
    return list(PRECISIONS) if device.type == "cuda" else ["fp32"]


def make_batch(network: Network, batch_size: int, device: torch.device, seed: int) -> StepInputs:
    """Random normalised images, random labels with some ignored pixels, valid crop params."""
    generator = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    b = batch_size
    crop_h, crop_w = network.crop
    full_h, full_w = network.full
    spread = INPUT_SCALE[network.model.normalization]

    def labels() -> torch.Tensor:  # (B, h, w) long, about 10 % ignored
        label = torch.randint(0, NUM_CLASSES, (b, crop_h, crop_w), generator=generator)
        ignored = torch.rand((b, crop_h, crop_w), generator=generator) < 0.1
        return label.masked_fill(ignored, IGNORE_INDEX)

    params = torch.stack([sample_crop_params(rng, full_h, full_w, crop_h, crop_w).to_tensor()
                          for _ in range(b)])  # (B, 7) int64
    batch = StepInputs(
        source_image=torch.randn((b, 3, crop_h, crop_w), generator=generator) * spread,
        source_label=labels(),
        target_image=torch.randn((b, 3, crop_h, crop_w), generator=generator) * spread,
        target_params=params,
        target_full=torch.randn((b, 3, full_h, full_w), generator=generator) * spread,
        offline_label=labels(),
    )
    for name, value in vars(batch).items():
        setattr(batch, name, value.to(device))
    return batch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_passes(student: torch.nn.Module, teacher: MeanTeacher, batch: StepInputs,
                device: torch.device, precision: str) -> None:
    """The model passes one default self-training step makes, with nothing around them."""
    student.train()
    teacher.train()
    student.zero_grad(set_to_none=True)
    for images in (batch.source_image, batch.target_image):
        with autocast(device, precision):
            logits = student(images)
        logits.float().mean().backward()
        del logits
    with torch.no_grad():
        for mode in ("train", "eval"):
            teacher.train(mode == "train")
            with autocast(device, precision):
                teacher(batch.target_full)
    teacher.train()
    student.zero_grad(set_to_none=True)


def timed(device: torch.device, function: Callable[[], Any]) -> float:
    synchronize(device)
    start = time.perf_counter()
    function()
    synchronize(device)
    return time.perf_counter() - start


def measure_evaluation(model: torch.nn.Module, network: Network, args: argparse.Namespace,
                       device: torch.device, precision: str) -> dict[str, Any]:
    """One periodic evaluation of `model` (the teacher), timed on `--eval-batches` recalibration
    batches and `--eval-images` full images and projected to the network's plan."""
    plan = network.plan
    spread = INPUT_SCALE[network.model.normalization]
    generator = torch.Generator().manual_seed(1)
    crops = (torch.randn((plan.recalibration_batch_size, 3, *network.crop), generator=generator)
             * spread).to(device)
    images = (torch.randn((plan.val_batch_size, 3, *network.full), generator=generator)
              * spread).to(device)
    labels = torch.randint(0, NUM_CLASSES, (plan.val_batch_size, *network.ground_truth),
                           generator=generator).to(device)
    confusion = torch.zeros(NUM_CLASSES * NUM_CLASSES, dtype=torch.long, device=device)

    def recalibrate(count: int) -> None:
        recalibrate_batchnorm(model, (crops for _ in range(count)), device, precision)

    def evaluate(batches: int) -> None:
        for _ in range(batches):
            predicted = predict_classes(model, images, network.ground_truth, flip=plan.flip,
                                        precision=precision)
            confusion.add_(torch.bincount(labels.flatten() * NUM_CLASSES + predicted.flatten(),
                                          minlength=NUM_CLASSES * NUM_CLASSES))

    recalibrate(1)  # warm-up: first passes pay one-off costs
    evaluate(1)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    per_batch = timed(device, lambda: recalibrate(args.eval_batches)) / args.eval_batches
    val_batches = -(-args.eval_images // plan.val_batch_size)
    per_image = (timed(device, lambda: evaluate(val_batches))
                 / (val_batches * plan.val_batch_size))
    recalibration = plan.recalibration_batches * per_batch
    seconds = recalibration + TARGET_VAL_IMAGES * per_image
    return {"recalibration_seconds_per_batch": per_batch, "val_seconds_per_image": per_image,
            "evaluation_seconds": seconds,
            "evaluations_hours": (plan.evaluations * seconds + recalibration) / 3600,
            "evaluation_peak_memory_gib": (torch.cuda.max_memory_allocated(device) / 2**30
                                           if device.type == "cuda" else None)}


def measure(network: Network, args: argparse.Namespace, device: torch.device,
            precision: str) -> dict[str, Any]:
    """Warm-up then timed iterations of one network at one precision, alternating the step and
    its bare passes."""
    seed_everything(0)
    student = build_model(network.model, NUM_CLASSES).to(device)
    teacher = network.teacher(student)
    optimizer = build_optimizer(optimizer_groups(student, network.optimizer), network.optimizer)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    weights = LossWeights()
    batch = make_batch(network, args.batch_size, device, seed=0)

    step_times: list[float] = []
    bare_times: list[float] = []
    peak_bytes = 0
    for iteration in range(args.warmup_steps + args.steps):
        counted = iteration >= args.warmup_steps
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        synchronize(device)
        start = time.perf_counter()
        self_train_step(student, teacher, batch, weights=weights, alpha=ALPHA,
                        optimizer=optimizer, scaler=scaler, precision=precision)
        teacher.update(student)
        synchronize(device)
        elapsed = time.perf_counter() - start
        if device.type == "cuda":
            peak_bytes = max(peak_bytes, torch.cuda.max_memory_allocated(device))

        start = time.perf_counter()
        bare_passes(student, teacher, batch, device, precision)
        synchronize(device)
        bare_elapsed = time.perf_counter() - start
        if counted:
            step_times.append(elapsed)
            bare_times.append(bare_elapsed)

    seconds = statistics.median(step_times)
    bare = statistics.median(bare_times)
    evaluation = measure_evaluation(teacher.module, network, args, device, precision)
    return {
        "model": network.key,
        "precision": precision,
        "seconds_per_iteration": seconds,
        "images_per_second": 2 * args.batch_size / seconds,
        "peak_memory_gib": peak_bytes / 2**30 if device.type == "cuda" else None,
        "projected_iterations": network.iterations,
        "projected_hours": seconds * network.iterations / 3600,
        "bare_seconds": bare,
        "ratio_to_bare": seconds / bare,
        "step_seconds": step_times,
        "bare_step_seconds": bare_times,
        "loss_scale": scaler.get_scale() if scaler.is_enabled() else None,
        **evaluation,
        "error": None,
    }


def run_row(network: Network, args: argparse.Namespace, device: torch.device,
            precision: str) -> dict[str, Any]:
    """`measure`, turning a CUDA out-of-memory error into a row that says so."""
    try:
        return measure(network, args, device, precision)
    except torch.cuda.OutOfMemoryError as error:
        return {"model": network.key, "precision": precision,
                "error": f"out of memory: {str(error).splitlines()[0]}"}
    finally:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def format_table(rows: list[dict[str, Any]], labels: dict[str, str]) -> str:
    """One aligned text row per network and precision, in the order measured; a failed row
    shows its error instead, below the table. `labels`: the table's name of each network."""
    header = ["model", "precision", "s/iter", "img/s", "peak GiB", "run h", "bare s", "x bare",
              "eval s", "evals h"]
    cells = []
    for row in rows:
        if row.get("error"):
            continue
        peak = row["peak_memory_gib"]
        cells.append([labels[row["model"]], row["precision"],
                      f"{row['seconds_per_iteration']:.3f}",
                      f"{row['images_per_second']:.2f}",
                      "n/a" if peak is None else f"{peak:.1f}",
                      f"{row['projected_hours']:.1f}", f"{row['bare_seconds']:.3f}",
                      f"{row['ratio_to_bare']:.2f}", f"{row['evaluation_seconds']:.1f}",
                      f"{row['evaluations_hours']:.2f}"])
    widths = [max(len(line[i]) for line in [header, *cells]) for i in range(len(header))]

    def render(line: list[str]) -> str:
        return "  ".join([line[0].ljust(widths[0]), line[1].ljust(widths[1])]
                         + [cell.rjust(width) for cell, width in zip(line[2:], widths[2:])])

    lines = [render(header)] + [render(line) for line in cells]
    lines += [f"{labels[row['model']].ljust(widths[0])}  {row['precision'].ljust(widths[1])}  "
              f"{row['error']}" for row in rows if row.get("error")]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        device = resolve_device(args.device)
        measured = networks(args)
    except DudaError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.precisions is None:
        args.precisions = default_precisions(device)
    command = shlex.join([Path(sys.executable).name, *sys.argv])
    labels = {network.key: network.label for network in measured}
    print(f"command: {command}")
    print(f"device:  {device_name(device)}")
    print(f"torch:   {torch.__version__}"
          + (f" (CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()})"
             if device.type == "cuda" else ""))
    print(f"batch:   {args.batch_size} source + {args.batch_size} target crops, the teacher on "
          f"{args.batch_size} full images; {NUM_CLASSES} classes, random weights")
    for network in measured:
        print(f"{network.label}: {network.describe()}")
    print(f"steps:   {args.warmup_steps} warm-up + {args.steps} timed per row")
    print(f"bare:    {BARE_PASSES}")
    print(f"eval:    timed on {args.eval_batches} recalibration batches and {args.eval_images} "
          "images per row, projected to each config's counts")
    if device.type == "cpu" and set(args.precisions) - {"fp32"}:
        print("note:    autocast is off on the CPU, so bf16/fp16 rows run in fp32")
    print()

    sys.stdout.flush()
    rows = []
    for precision in args.precisions:  # the networks of a precision next to each other
        for network in measured:
            started = time.perf_counter()
            rows.append(run_row(network, args, device, precision))
            row = rows[-1]
            figure = row["error"] or f"{row['seconds_per_iteration']:.3f} s/iter"
            print(f"{network.label} {precision}: {figure} "
                  f"({time.perf_counter() - started:.0f} s for this row)",
                  file=sys.stderr, flush=True)
    print(format_table(rows, labels))

    if args.json:
        print(json.dumps({
            "command": command,
            "device": device.type,
            "device_name": device_name(device),
            "torch": torch.__version__,
            "cuda": torch.version.cuda if device.type == "cuda" else None,
            "num_classes": NUM_CLASSES,
            "batch_size": {"source": args.batch_size, "target": args.batch_size},
            "warmup_steps": args.warmup_steps,
            "steps": args.steps,
            "bare_passes": BARE_PASSES,
            "models": {network.key: network.to_json() for network in measured},
            "rows": rows,
        }))
    return 1 if any(row.get("error") for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
