"""Speed and memory of DUDA self-training on one GPU, per precision, before a long run.

The check builds the paper-size model (DeepLabV2, ResNet-101, Dropout2d 0.5, frozen BN affine, Caffe
BGR input; 19 classes; docs/method.md#the-network) from random weights, feeds it random images and
random offline labels, and runs `stages.self_train_step.self_train_step` exactly as the `self-train`
stage does (docs/method.md#one-step-in-execution-order, default loss weights): 2 source + 2 target
student crops of 512×896, the teacher on the 2 full 1024×2048 target images, SGD with Nesterov
momentum over the two parameter groups (docs/method.md#optimisation), a `GradScaler` (active for
fp16 only), then the mean-teacher update. cuDNN runs deterministic with autotuning off, as
`stages.training.seed_everything` sets it for training. Each precision (fp32, bf16, fp16) gets a
fresh model, `--warmup-steps` untimed iterations, then `--steps` timed ones.

How to read the table, one row per precision:
- s/iter: median wall time of one iteration = `self_train_step` + `teacher.update`, between two
  `torch.cuda.synchronize()` calls. Data loading is not included (the batches sit on the GPU).
- img/s: source + target crops trained per second (4 / s/iter with the default batches).
- peak GiB: `torch.cuda.max_memory_allocated` over the timed iterations (reset per precision);
  the caching allocator reserves somewhat more.
- 80k h: s/iter × 80,000 iterations (the paper's schedule) in hours, one GPU, data loading and
  the periodic evaluation and checkpoints excluded.
- bare s: median time of the model passes the step cannot avoid, measured in the same run,
  alternating with the timed iterations, at the same precision: student forward + backward on
  the source crops, student forward + backward on the target crops (a mean of the logits as the
  loss), and the teacher without gradients on the full target images twice (train mode for the
  consistency target, eval mode for the pseudo labels, as the default step does).
- x bare: s/iter ÷ bare s, the step's overhead over these passes (losses, pseudo labels, the
  full→crop mapping, the optimizer, the scaler and the teacher update). Near 1 is good.

    python benchmarks/gpu_check.py                      # paper size, fp32 bf16 fp16, about 2 min
    python benchmarks/gpu_check.py --precisions bf16 --steps 20 --json

With `--device cpu` only fp32 is run unless `--precisions` asks otherwise; the project never uses
autocast on the CPU, so bf16/fp16 rows there run in fp32.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

try:
    import stages  # noqa: F401
except ImportError:  # run from a checkout without the editable install
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from stages.classes import IGNORE_INDEX
from stages.config import LossWeights, ModelConfig, OptimizerConfig
from stages.data.transforms import sample_crop_params
from stages.devices import autocast, resolve_device
from stages.errors import DudaError
from stages.nn.model import DeepLabV2, build_model, parameter_groups
from stages.nn.teacher import MeanTeacher
from stages.self_train_step import StepInputs, self_train_step
from stages.training import build_optimizer, seed_everything

NUM_CLASSES = 19
PAPER_ITERATIONS = 80_000
ALPHA = 0.2  # α at the start of self-training (docs/method.md#starting-state)
PRECISIONS = ("fp32", "bf16", "fp16")
BARE_PASSES = ("student forward+backward on the source crops; student forward+backward on the "
               "target crops; teacher forward without gradients on the full target images, "
               "train mode and eval mode")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu", "auto"])
    parser.add_argument("--crop", type=int, nargs=2, default=[512, 896], metavar=("H", "W"),
                        help="student crop size (source and target)")
    parser.add_argument("--full", type=int, nargs=2, default=[1024, 2048], metavar=("H", "W"),
                        help="full target image size (the teacher's input)")
    parser.add_argument("--backbone", default="resnet101",
                        choices=["resnet101", "resnet50", "resnet18"])
    parser.add_argument("--width-multiplier", type=float, default=1.0,
                        help="channel multiplier (resnet18 only)")
    parser.add_argument("--batch-size", type=int, default=2,
                        help="source and target crops per iteration, each (paper: 2)")
    parser.add_argument("--warmup-steps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10, help="timed iterations per precision")
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=None,
                        help="default: fp32 bf16 fp16 on a GPU, fp32 on the CPU")
    parser.add_argument("--json", action="store_true", help="also print one JSON object")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup_steps < 0 or args.batch_size < 1:
        parser.error("--steps and --batch-size must be at least 1, --warmup-steps at least 0")
    if min(*args.crop, *args.full) < 1:
        parser.error("--crop and --full sizes must be positive")
    return args


def default_precisions(device: torch.device) -> list[str]:
    """All three on a GPU; fp32 alone on the CPU, where the project never uses autocast."""
    return list(PRECISIONS) if device.type == "cuda" else ["fp32"]


def make_batch(args: argparse.Namespace, device: torch.device, seed: int) -> StepInputs:
    """Random normalised images, random labels with some ignored pixels, valid crop params."""
    generator = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    b = args.batch_size
    crop_h, crop_w = args.crop
    full_h, full_w = args.full

    def labels() -> torch.Tensor:  # (B, h, w) long, about 10 % ignored
        label = torch.randint(0, NUM_CLASSES, (b, crop_h, crop_w), generator=generator)
        ignored = torch.rand((b, crop_h, crop_w), generator=generator) < 0.1
        return label.masked_fill(ignored, IGNORE_INDEX)

    params = torch.stack([sample_crop_params(rng, full_h, full_w, crop_h, crop_w).to_tensor()
                          for _ in range(b)])  # (B, 7) int64
    batch = StepInputs(
        source_image=torch.randn((b, 3, crop_h, crop_w), generator=generator) * 50,
        source_label=labels(),
        target_image=torch.randn((b, 3, crop_h, crop_w), generator=generator) * 50,
        target_params=params,
        target_full=torch.randn((b, 3, full_h, full_w), generator=generator) * 50,
        offline_label=labels(),
    )
    for name, value in vars(batch).items():
        setattr(batch, name, value.to(device))
    return batch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_passes(student: DeepLabV2, teacher: MeanTeacher, batch: StepInputs,
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


def measure(args: argparse.Namespace, device: torch.device, precision: str) -> dict[str, Any]:
    """Warm-up then timed iterations of one precision, alternating the step and its bare passes."""
    seed_everything(0)
    model_config = ModelConfig(backbone=args.backbone, width_multiplier=args.width_multiplier,
                               dropout=0.5, freeze_bn_affine=True, normalization="caffe_bgr")
    student = build_model(model_config, NUM_CLASSES).to(device)
    teacher = MeanTeacher(student)
    optimizer_config = OptimizerConfig()
    optimizer = build_optimizer(
        parameter_groups(student, optimizer_config.lr, optimizer_config.backbone_lr_multiplier,
                         optimizer_config.weight_decay), optimizer_config)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    weights = LossWeights()
    batch = make_batch(args, device, seed=0)

    step_times: list[float] = []
    bare_times: list[float] = []
    peak_bytes = 0
    for iteration in range(args.warmup_steps + args.steps):
        timed = iteration >= args.warmup_steps
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
        if timed:
            step_times.append(elapsed)
            bare_times.append(bare_elapsed)

    seconds = statistics.median(step_times)
    bare = statistics.median(bare_times)
    return {
        "precision": precision,
        "seconds_per_iteration": seconds,
        "images_per_second": 2 * args.batch_size / seconds,
        "peak_memory_gib": peak_bytes / 2**30 if device.type == "cuda" else None,
        "projected_hours": seconds * PAPER_ITERATIONS / 3600,
        "bare_seconds": bare,
        "ratio_to_bare": seconds / bare,
        "step_seconds": step_times,
        "bare_step_seconds": bare_times,
        "loss_scale": scaler.get_scale() if scaler.is_enabled() else None,
        "error": None,
    }


def run_precision(args: argparse.Namespace, device: torch.device, precision: str
                  ) -> dict[str, Any]:
    """`measure`, turning a CUDA out-of-memory error into a row that says so."""
    try:
        return measure(args, device, precision)
    except torch.cuda.OutOfMemoryError as error:
        return {"precision": precision, "error": f"out of memory: {str(error).splitlines()[0]}"}
    finally:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def format_table(rows: list[dict[str, Any]]) -> str:
    """One aligned text row per precision; a failed precision shows its error instead."""
    header = ["precision", "s/iter", "img/s", "peak GiB", "80k h", "bare s", "x bare"]
    cells = []
    for row in rows:
        if row.get("error"):
            continue
        peak = row["peak_memory_gib"]
        cells.append([row["precision"], f"{row['seconds_per_iteration']:.3f}",
                      f"{row['images_per_second']:.2f}",
                      "n/a" if peak is None else f"{peak:.1f}",
                      f"{row['projected_hours']:.1f}", f"{row['bare_seconds']:.3f}",
                      f"{row['ratio_to_bare']:.2f}"])
    widths = [max(len(line[i]) for line in [header, *cells]) for i in range(len(header))]

    def render(line: list[str]) -> str:
        return "  ".join([line[0].ljust(widths[0])]
                         + [cell.rjust(width) for cell, width in zip(line[1:], widths[1:])])

    lines = [render(header)] + [render(line) for line in cells]
    lines += [f"{row['precision'].ljust(widths[0])}  {row['error']}"
              for row in rows if row.get("error")]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        device = resolve_device(args.device)
    except DudaError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.precisions is None:
        args.precisions = default_precisions(device)
    command = shlex.join([Path(sys.executable).name, *sys.argv])
    crop_h, crop_w = args.crop
    full_h, full_w = args.full
    print(f"command: {command}")
    print(f"device:  {device_name(device)}")
    print(f"torch:   {torch.__version__}"
          + (f" (CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()})"
             if device.type == "cuda" else ""))
    print(f"model:   DeepLabV2 {args.backbone}"
          + (f" ×{args.width_multiplier}" if args.width_multiplier != 1.0 else "")
          + f", {NUM_CLASSES} classes, random weights")
    print(f"batch:   {args.batch_size} source + {args.batch_size} target crops {crop_h}×{crop_w},"
          f" teacher on {args.batch_size} full images {full_h}×{full_w}")
    print(f"steps:   {args.warmup_steps} warm-up + {args.steps} timed per precision")
    print(f"bare:    {BARE_PASSES}")
    if device.type == "cpu" and set(args.precisions) - {"fp32"}:
        print("note:    autocast is off on the CPU, so bf16/fp16 rows run in fp32")
    print()

    sys.stdout.flush()
    rows = []
    for precision in args.precisions:
        started = time.perf_counter()
        rows.append(run_precision(args, device, precision))
        row = rows[-1]
        figure = row["error"] or f"{row['seconds_per_iteration']:.3f} s/iter"
        print(f"{precision}: {figure} ({time.perf_counter() - started:.0f} s for this precision)",
              file=sys.stderr, flush=True)
    print(format_table(rows))

    if args.json:
        print(json.dumps({
            "command": command,
            "device": device.type,
            "device_name": device_name(device),
            "torch": torch.__version__,
            "cuda": torch.version.cuda if device.type == "cuda" else None,
            "backbone": args.backbone,
            "width_multiplier": args.width_multiplier,
            "num_classes": NUM_CLASSES,
            "crop": [crop_h, crop_w],
            "full": [full_h, full_w],
            "batch_size": {"source": args.batch_size, "target": args.batch_size},
            "warmup_steps": args.warmup_steps,
            "steps": args.steps,
            "projected_iterations": PAPER_ITERATIONS,
            "bare_passes": BARE_PASSES,
            "rows": rows,
        }))
    return 1 if any(row.get("error") for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
