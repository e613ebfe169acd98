"""The paper-scale budget of every stage, measured at full resolution and extrapolated.

Builds fake datasets in the layouts as distributed (docs/method.md#datasets-and-classes):
Cityscapes `leftImg8bit/{train,val}/<city>/*_leftImg8bit.png` at 2048×1024 with
`gtFine/.../*_gtFine_labelIds.png` only (no trainIds files), and GTA5 `images/NNNNN.png` at
1914×1052 with palettised `labels/NNNNN.png` — `--images` of each split, drawn by the synthetic
street-scene renderer, so the PNGs compress like photographs rather than noise. Then runs every
stage through the command line, one process each, with `configs/gta5_to_cityscapes.yaml` as the
paper sets it except for what a CPU cannot run: a shrunk model (`model.backbone=resnet18`,
`model.style=torchvision`, `model.width_multiplier=0.25`, `model.init=none`,
`model.normalization=imagenet_rgb`), `--iterations` training iterations, no periodic evaluation
or intermediate checkpoints, and the in-loop offline update from the first iteration (the paper
runs it for 70k of its 80k iterations). Image, crop and inference sizes stay the paper's.

Per stage it prints, from the stage's process (loader workers included, as `wait4` reports
them):
- CPU-s/img: user+sys seconds over the images the stage processed (decoded crops for the
  training stages), less the start-up of a process that only imports the stage;
- model: the CPU seconds of the shrunk model's own passes per image (timed here, bare, for the
  passes the stage makes), and host = the difference: decoding, augmentation, the store,
  thresholds, PNGs, manifests — the work that stays on the CPU when the model runs on a GPU (an
  upper bound where loader workers share the cores with the model's threads, which slows the
  model inside the stage below its bare time);
- peak RSS of the largest process, and the bytes the stage added to disk per image (files shared
  by hard links counted once; model files kept apart: they scale with the model, not the images;
  the pseudo labels of a random model compress differently from a trained one's).

The extrapolation to the paper's counts (24,966 GTA5 + 2,975 Cityscapes train + 500 val; 40k
warmup iterations × batch, 80k self-train iterations × 4+4 crops, 16 periodic evaluations with
the teacher recalibrated, on the first process alone, at evaluate's measured cost; the
recalibration before model.pt is in self-train's row) is an estimate: host CPU hours = host
CPU-s/img × images; GPU hours =
the ResNet-101 FLOPs of the stage's passes (counted by torch's FLOP counter at a small size and
scaled by pixels) at `--gpu-tflops` sustained; the stage's hours on G GPUs = the larger of host
hours / `--cores` and GPU hours / G, with host work spread perfectly over the cores (a lower
bound). A stage marked "host" would starve its GPUs. The segmentation model's tensors in model
files (state dicts, SGD momentum) are scaled by ResNet-101's size over the shrunk model's.

    python benchmarks/paper_scale.py [--images 8] [--iterations 2] [--scale 1.0] [--cores 16]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from stages.artifacts.manifest import read_manifest
from stages.config import Config, Recalibration, load_config
from stages.data.classes import cityscapes_label_ids
from stages.data.synthetic import generate_sample
from stages.nn.model import build_model

ROOT = Path(__file__).resolve().parents[1]
PAPER_CONFIG = ROOT / "configs" / "gta5_to_cityscapes.yaml"
SHRUNK_MODEL = ["model.backbone=resnet18", "model.style=torchvision",
                "model.width_multiplier=0.25", "model.init=none",
                "model.normalization=imagenet_rgb"]
GTA5_SIZE, CITYSCAPES_SIZE = (1052, 1914), (1024, 2048)  # H, W as distributed
PAPER_IMAGES = {"gta5": 24_966, "train": 2_975, "val": 500}
CITIES = ("aachen", "bochum", "bremen")
FLOP_PROBE = (96, 192)  # H, W at which ResNet-101's FLOPs are counted, then scaled by pixels
STAGE_MODULES = {"prepare-data": "prepare_data", "warmup": "warmup",
                 "generate-pseudo": "generate_pseudo", "self-train": "self_train",
                 "update-offline": "update_offline", "evaluate": "evaluate"}
# A process's peak RSS counts the memory of the process it was forked from (the kernel keeps
# the pre-exec high-water mark), and this one holds torch and models: each stage is therefore
# forked from a small launcher that reports its child's rusage as JSON on stdout.
LAUNCHER = """import json, os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
print(json.dumps([os.waitstatus_to_exitcode(status), usage.ru_utime + usage.ru_stime,
                  usage.ru_maxrss]))
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, default=PAPER_CONFIG,
                        help="a GTA5 → Cityscapes config (data roots GTA5 and Cityscapes)")
    parser.add_argument("--images", type=int, default=8,
                        help="images of each split: GTA5, Cityscapes train and val (at "
                             "least the paper's batch, 4)")
    parser.add_argument("--iterations", type=int, default=2,
                        help="warmup and self-train iterations")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="image and crop sizes × this (1.0: the paper's sizes)")
    parser.add_argument("--cores", type=int, default=16,
                        help="CPU cores of the GPU machine the extrapolation assumes")
    parser.add_argument("--gpu-tflops", type=float, default=100.0,
                        help="sustained bf16 TFLOP/s assumed per GPU (A100-class: about a "
                             "third of its 312 peak)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="more config overrides, as on the command line")
    parser.add_argument("--work", type=Path, default=None,
                        help="folder for the datasets and artifacts (default: a temporary one, "
                             "removed at the end); must not exist")
    args = parser.parse_args(argv)
    if args.images < 1 or args.iterations < 1 or args.scale <= 0:
        parser.error("--images and --iterations must be at least 1, --scale positive")
    if args.work is not None and args.work.exists():
        parser.error(f"--work {args.work} exists; name a new folder")
    return args


def scaled(size: tuple[int, int], scale: float) -> tuple[int, int]:
    return max(8, round(size[0] * scale)), max(8, round(size[1] * scale))


# ------------------------------------------------------------------------------ fake datasets


def write_datasets(root: Path, images: int, scale: float) -> None:
    """Cityscapes (labelIds only) and GTA5 (palettised) trees of `images` per split."""
    to_label_id = np.asarray(cityscapes_label_ids(), np.uint8)
    palette = [v for i in range(256) for v in ((i * 7) % 256, i, 255 - i)]
    height, width = scaled(GTA5_SIZE, scale)
    for i in range(images):
        image, label = generate_sample(0, "source", "train", i, height, width)
        name = f"{i + 1:05d}"
        _save(root / "GTA5" / "images" / f"{name}.png", Image.fromarray(image))
        labels = Image.fromarray(to_label_id[label], mode="P")
        labels.putpalette(palette)
        _save(root / "GTA5" / "labels" / f"{name}.png", labels)
    height, width = scaled(CITYSCAPES_SIZE, scale)
    for split in ("train", "val"):
        for i in range(images):
            image, label = generate_sample(0, "target", split, i, height, width)
            city = CITIES[i % len(CITIES)]
            stem = f"{city}_{i:06d}_000019"
            _save(root / "Cityscapes" / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png",
                  Image.fromarray(image))
            _save(root / "Cityscapes" / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png",
                  Image.fromarray(to_label_id[label], mode="L"))


def _save(path: Path, image: Image.Image) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


# ---------------------------------------------------------------------------- configuration


def overrides(args: argparse.Namespace) -> list[str]:
    """The paper config's changes for a CPU run: the shrunk model, few iterations, the sizes."""
    n = args.iterations
    changes = [*SHRUNK_MODEL,
               f"warmup.iterations={n}", f"warmup.checkpoint_every={n}", "warmup.eval_every=0",
               f"self_train.iterations={n}", f"self_train.checkpoint_every={n}",
               "self_train.eval_every=0", "self_train.offline_start=0"]
    if args.scale != 1.0:
        paper = load_config(args.config)
        for key in ("source_size", "target_size", "crop_size"):
            h, w = scaled(tuple(getattr(paper.input, key)), args.scale)
            changes.append(f"input.{key}=[{h},{w}]")
    return changes + args.overrides


def recalibrated_images(recalibration: Recalibration | None, split_images: int) -> int:
    """Images one recalibration decodes: `batches` × `batch_size`, or the whole split."""
    if recalibration is None or not recalibration.enabled:
        return 0
    if recalibration.batches == 0:
        return split_images
    return min(split_images, recalibration.batches * recalibration.batch_size)


@dataclass
class Passes:
    """Model passes per run of a stage: full images forward, crops trained (forward and
    backward), crops forwarded in train mode (BN recalibration)."""

    full: float = 0.0
    crop_train: float = 0.0
    crop_recal: float = 0.0

    def cost(self, unit: dict[str, float]) -> float:
        return (self.full * unit["full"] + self.crop_train * unit["crop_train"]
                + self.crop_recal * unit["crop_recal"])


@dataclass
class Plan:
    """One stage: its command-line arguments, and its images and passes here and at paper scale
    (CPU images: what it decodes; disk images: what its per-image files are written for)."""

    name: str
    argv: list[str]
    images: int
    passes: Passes
    paper_images: int
    paper_passes: Passes
    disk_images: int
    paper_disk_images: int


def counts(config: Config, train: int, val: int,
           crops_per_step: int | None = None) -> dict[str, tuple[int, Passes]]:
    """Images processed and model passes of each stage for a config and split sizes."""
    warm = config.warmup
    warm_crops = warm.iterations * warm.batch_size * (2 if warm.adversarial.enabled else 1)
    flip = 2 if config.generate_pseudo.inference.flip else 1
    pseudo_recal = recalibrated_images(getattr(config.generate_pseudo, "recalibration", None),
                                       train)
    st = config.self_train
    iterations = st.iterations
    step = crops_per_step or st.source_batch_size + st.target_batch_size
    target_share = st.target_batch_size / (st.source_batch_size + st.target_batch_size)
    st_recal = recalibrated_images(st.recalibration, train)
    update_flip = 2 if config.update_offline.inference.flip else 1
    eval_recal = recalibrated_images(config.evaluate.recalibration, train)
    eval_flip = 2 if config.evaluate.inference.flip else 1
    return {
        "warmup": (warm_crops, Passes(crop_train=warm_crops)),
        "generate-pseudo": (train + pseudo_recal,
                            Passes(full=flip * train, crop_recal=pseudo_recal)),
        # The teacher sees each target image full size twice: train mode (the consistency
        # target) and eval mode (the online labels) (docs/method.md#one-step-in-execution-order).
        "self-train": (iterations * step,
                       Passes(crop_train=iterations * step,
                              full=2 * iterations * step * target_share, crop_recal=st_recal)),
        "update-offline": (train, Passes(full=update_flip * train)),
        "evaluate": (eval_recal + val, Passes(full=eval_flip * val, crop_recal=eval_recal)),
    }


def plans(args: argparse.Namespace, config: Config, paper: Config, root: Path,
          crops_per_step: int | None) -> list[Plan]:
    n = args.images
    here = counts(config, n, n, crops_per_step)
    there = counts(paper, PAPER_IMAGES["train"], PAPER_IMAGES["val"])
    a = {name: root / "runs" / name for name in
         ("data", "warmup", "pseudo", "self-train", "updated", "evaluate")}
    data = ["--data", str(a["data"])]
    argv = {
        "prepare-data": ["prepare-data", "--out", str(a["data"])],
        "warmup": ["warmup", *data, "--out", str(a["warmup"])],
        "generate-pseudo": ["generate-pseudo", *data, "--checkpoint", str(a["warmup"]),
                            "--out", str(a["pseudo"])],
        "self-train": ["self-train", *data, "--checkpoint", str(a["warmup"]),
                       "--pseudo", str(a["pseudo"]), "--out", str(a["self-train"])],
        "update-offline": ["update-offline", *data, "--checkpoint", str(a["self-train"]),
                           "--pseudo", str(a["self-train"] / "pseudo"),
                           "--out", str(a["updated"])],
        "evaluate": ["evaluate", *data, "--checkpoint", str(a["self-train"]),
                     "--out", str(a["evaluate"])],
    }
    all_here, all_there = 3 * n, sum(PAPER_IMAGES.values())
    result = [Plan("prepare-data", argv["prepare-data"], all_here, Passes(), all_there,
                   Passes(), all_here, all_there)]
    for name, (images, passes) in here.items():
        paper_images, paper_passes = there[name]
        disk, paper_disk = {"evaluate": (n, PAPER_IMAGES["val"]),
                            "warmup": (1, 1)}.get(name, (n, PAPER_IMAGES["train"]))
        result.append(Plan(name, argv[name], images, passes, paper_images, paper_passes,
                           disk, paper_disk))
    return result


# ------------------------------------------------------------------------------- measuring


@dataclass
class Measure:
    """What one stage's process used: CPU seconds, peak RSS, wall time, bytes added to disk."""

    cpu: float
    peak_rss: int
    wall: float
    image_bytes: int = 0  # files written per image (labels, store chunks, reports)
    model_bytes: int = 0  # model files (*.pt)
    paper_model_bytes: float = 0.0  # the same with ResNet-101 in place of the shrunk model


def run_measured(name: str, command: list[str], log: Path) -> Measure:
    """Run `command` (from the launcher); its rusage includes its waited-for children (loader
    workers), and `ru_maxrss` is that of its largest process."""
    start = time.perf_counter()
    with log.open("wb") as output:
        launched = subprocess.run([sys.executable, "-c", LAUNCHER, *command], cwd=ROOT,
                                  stdout=subprocess.PIPE, stderr=output, check=False)
    if launched.returncode != 0 or not launched.stdout.strip():
        sys.exit(f"{name} could not be launched:\n" + log.read_text()[-3000:])
    code, cpu, maxrss = json.loads(launched.stdout.splitlines()[-1])
    if code != 0:
        sys.exit(f"{name} failed (exit {code}):\n" + log.read_text()[-3000:])
    return Measure(cpu=cpu, peak_rss=maxrss * 1024, wall=time.perf_counter() - start)


def new_bytes(root: Path, seen: set[tuple[int, int]], model_keys: set[str],
              model_ratio: float) -> tuple[int, int, float]:
    """Bytes of the files under `root` not `seen` before (hard links of a file already seen add
    nothing): other files, model files, and model files with the segmentation model's tensors
    scaled to ResNet-101."""
    other, model, paper = 0, 0, 0.0
    for path in root.rglob("*"):
        if not path.is_file() or path.is_symlink():
            continue
        stat = path.stat()
        key = (stat.st_dev, stat.st_ino)
        if key in seen:
            continue
        seen.add(key)
        if path.suffix != ".pt":
            other += stat.st_size
            continue
        model += stat.st_size
        tensors = model_tensor_bytes(torch.load(path, weights_only=True), model_keys)
        paper += stat.st_size + tensors * (model_ratio - 1)
    return other, model, paper


def model_tensor_bytes(saved: object, model_keys: set[str]) -> int:
    """Bytes of the segmentation model's tensors in a saved object: its state dicts (keys of
    the model) and SGD's momentum buffers; a discriminator and its optimizer do not count."""
    if isinstance(saved, dict):
        total = 0
        for key, value in saved.items():
            if isinstance(value, torch.Tensor):
                if key in model_keys or key == "momentum_buffer":
                    total += value.numel() * value.element_size()
            else:
                total += model_tensor_bytes(value, model_keys)
        return total
    if isinstance(saved, (list, tuple)):
        return sum(model_tensor_bytes(value, model_keys) for value in saved)
    return 0


def model_unit_costs(config: Config) -> dict[str, float]:
    """CPU seconds of one pass of the shrunk model per image: full-size inference, a crop's
    training forward+backward, a crop's train-mode forward without gradients."""
    model = build_model(config.model, 19)
    full = torch.randn(1, 3, *config.input.target_size)
    crop = torch.randn(1, 3, *config.input.crop_size)

    def timed(function) -> float:
        function()  # warm-up: first calls pay one-off allocations
        start = time.process_time()
        function()
        return time.process_time() - start

    def inference() -> None:
        with torch.no_grad():
            model.eval()(full).softmax(1).max(1)

    def train() -> None:
        model.train()(crop).mean().backward()

    def recal() -> None:
        with torch.no_grad():
            model.train()(crop)

    return {"full": timed(inference), "crop_train": timed(train), "crop_recal": timed(recal)}


def paper_flops(paper: Config) -> tuple[dict[str, float], int]:
    """ResNet-101 FLOPs per pass (counted at FLOP_PROBE, scaled by pixels) and the number of
    its state dict's values."""
    model = build_model(paper.model.model_copy(update={"init": "none"}), 19)
    probe = torch.randn(1, 3, *FLOP_PROBE)
    pixels = FLOP_PROBE[0] * FLOP_PROBE[1]

    def counted(function) -> float:
        with FlopCounterMode(display=False) as counter:
            function()
        return counter.get_total_flops() / pixels

    with torch.no_grad():
        forward = counted(lambda: model.eval()(probe))
    train = counted(lambda: model.train()(probe).mean().backward())
    full = paper.input.target_size[0] * paper.input.target_size[1]
    crop = paper.input.crop_size[0] * paper.input.crop_size[1]
    parameters = sum(value.numel() for value in model.state_dict().values())
    return {"full": forward * full, "crop_train": train * crop,
            "crop_recal": forward * crop}, parameters


def startup_cpu(stage: str, log: Path) -> float:
    """CPU seconds of a process that only imports the command line and the stage."""
    code = f"import duda_cli.app, stages.{STAGE_MODULES[stage]}"
    return run_measured("start-up", [sys.executable, "-c", code], log).cpu


# ------------------------------------------------------------------------------- reporting


@dataclass
class Row:
    plan: Plan
    measure: Measure
    cpu_per_image: float
    model_per_image: float
    host_per_image: float
    host_hours: float
    gpu_hours: float
    paper_disk: float
    derived: bool = False  # figures taken from another stage's measurement
    rank_zero: bool = False  # runs on the first process alone, the others waiting


def row(plan: Plan, measure: Measure, startup: float, unit: dict[str, float],
        flops: dict[str, float], tflops: float) -> Row:
    cpu = max(measure.cpu - startup, 0.0) / plan.images
    model = plan.passes.cost(unit) / plan.images
    host = max(cpu - model, 0.0)
    gpu_seconds = plan.paper_passes.cost(flops) / (tflops * 1e12)
    paper_disk = (measure.image_bytes / plan.disk_images * plan.paper_disk_images
                  + measure.paper_model_bytes)
    return Row(plan, measure, cpu, model, host, host * plan.paper_images / 3600,
               gpu_seconds / 3600, paper_disk)


def evaluations_row(evaluate: Row, paper: Config, flops: dict[str, float],
                    tflops: float) -> Row:
    """Self-train's periodic evaluations at paper scale (the recalibration before model.pt is
    in the self-train row), at the evaluate stage's measured host cost per image."""
    st = paper.self_train
    count = st.iterations // st.eval_every if st.eval_every else 0
    recal = recalibrated_images(st.recalibration, PAPER_IMAGES["train"])
    images = count * (recal + PAPER_IMAGES["val"])
    passes = Passes(full=count * PAPER_IMAGES["val"], crop_recal=count * recal)
    plan = Plan(f"self-train evaluations ({count}×)", [], evaluate.plan.images, Passes(),
                images, passes, 1, 0)
    return Row(plan, evaluate.measure, evaluate.cpu_per_image, evaluate.model_per_image,
               evaluate.host_per_image, evaluate.host_per_image * images / 3600,
               passes.cost(flops) / (tflops * 1e12) / 3600, 0.0, derived=True,
               rank_zero=True)


def hours(row: Row, gpus: int, cores: int) -> str:
    """Estimated hours of a stage on `gpus` GPUs sharing `cores`, and what bounds them. Work
    on the first process alone gets one GPU and that process's share of the cores."""
    host = row.host_hours / (cores / gpus if row.rank_zero else cores)
    gpu = row.gpu_hours / (1 if row.rank_zero else gpus)
    bound = "host" if host > gpu else "GPU"
    return f"{max(host, gpu):.2f} ({bound})" if row.gpu_hours else f"{host:.2f} (host)"


def table(rows: list[Row], cores: int) -> str:
    header = ["stage", "images here", "CPU-s/img", "model CPU-s/img", "host CPU-s/img",
              "peak RSS MiB", "disk MB/img", "paper images", "host CPU-h", "GPU-h (est.)",
              "1 GPU h (est.)", "2 GPUs h (est.)", "paper disk GB (est.)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        measured = not r.derived
        disk = (r.measure.image_bytes / r.plan.disk_images / 1e6) if measured else 0.0
        cells = [r.plan.name, str(r.plan.images) if measured else "(from evaluate)",
                 f"{r.cpu_per_image:.3f}", f"{r.model_per_image:.3f}",
                 f"{r.host_per_image:.3f}", f"{r.measure.peak_rss / 2**20:.0f}",
                 f"{disk:.2f}" if measured else "-", f"{r.plan.paper_images:,}",
                 f"{r.host_hours:.2f}", f"{r.gpu_hours:.2f}" if r.gpu_hours else "-",
                 hours(r, 1, cores), hours(r, 2, cores), f"{r.paper_disk / 1e9:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    changes = overrides(args)
    paper = load_config(args.config)
    if args.work is None:
        with tempfile.TemporaryDirectory() as tmp:
            measure_all(args, Path(tmp), changes, paper, started)
    else:
        measure_all(args, args.work, changes, paper, started)


def measure_all(args: argparse.Namespace, root: Path, changes: list[str], paper: Config,
                started: float) -> None:
    datasets = root / "datasets"
    write_datasets(datasets, args.images, args.scale)
    config = load_config(args.config, changes, datasets)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch "
          f"{torch.__version__} with {torch.get_num_threads()} threads per process (CPU)")
    print(f"config:  {args.config} with --set " + " ".join(changes))
    print(f"data:    {args.images} GTA5 {'×'.join(map(str, scaled(GTA5_SIZE, args.scale)[::-1]))}"
          f", {args.images} + {args.images} Cityscapes train + val "
          f"{'×'.join(map(str, scaled(CITYSCAPES_SIZE, args.scale)[::-1]))}; "
          f"written in {time.perf_counter() - started:.0f} s", flush=True)
    unit = model_unit_costs(config)
    flops, r101_values = paper_flops(paper)
    shrunk = build_model(config.model, 19).state_dict()
    model_ratio = r101_values / sum(value.numel() for value in shrunk.values())
    rows = run_stages(args, root, changes, config, paper, unit, flops, (set(shrunk), model_ratio))
    rows.append(evaluations_row(rows[-1], paper, flops, args.gpu_tflops))
    print(f"model CPU-s per pass here: full image {unit['full']:.3f}, crop trained "
          f"{unit['crop_train']:.3f}, crop recalibrated {unit['crop_recal']:.3f}")
    print(f"ResNet-101 GFLOPs per pass (counted): full image {flops['full'] / 1e9:.0f}, crop "
          f"trained {flops['crop_train'] / 1e9:.0f}, crop recalibrated "
          f"{flops['crop_recal'] / 1e9:.0f}; GPU at {args.gpu_tflops:g} TFLOP/s sustained "
          f"(assumed); {args.cores} CPU cores assumed for the host work; model tensors in "
          f"model files × {model_ratio:.0f} (ResNet-101 / shrunk model)")
    print(f"wall time {time.perf_counter() - started:.0f} s\n")
    print(table(rows, args.cores))


def run_stages(args: argparse.Namespace, root: Path, changes: list[str], config: Config,
               paper: Config, unit: dict[str, float], flops: dict[str, float],
               model: tuple[set[str], float]) -> list[Row]:
    """Every stage in its own process, in pipeline order, measured."""
    logs = root / "logs"
    logs.mkdir()
    seen: set[tuple[int, int]] = set()
    new_bytes(root, seen, *model)  # the datasets are no stage's output
    common = ["-c", str(args.config.resolve()), "--data-root", str(root / "datasets"),
              "--quiet", *(item for change in changes for item in ("--set", change))]
    rows = []
    for plan in plans(args, config, paper, root, None):
        device = [] if plan.name == "prepare-data" else ["--device", "cpu"]
        startup = startup_cpu(plan.name, logs / f"{plan.name}.startup.log")
        measure = run_measured(plan.name, [sys.executable, "-m", "duda_cli", *plan.argv,
                                           *common, *device], logs / f"{plan.name}.log")
        measure.image_bytes, measure.model_bytes, measure.paper_model_bytes = new_bytes(
            root / "runs", seen, *model)
        if plan.name == "self-train":  # the crops a step trained, as the run records them
            step = read_manifest(root / "runs" / "self-train").summary.get("batch_per_step")
            plan = next(p for p in plans(args, config, paper, root, step)
                        if p.name == "self-train")
        rows.append(row(plan, measure, startup, unit, flops, args.gpu_tflops))
        print(f"{plan.name}: {measure.wall:.0f} s, {measure.cpu:.1f} CPU-s ({startup:.1f} of "
              "them start-up)", file=sys.stderr, flush=True)
    return rows


if __name__ == "__main__":
    main()
