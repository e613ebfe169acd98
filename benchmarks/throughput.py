"""Every stage's throughput against its bare model passes, measured side by side in one run.

For generate-pseudo, update-offline, evaluate and predict: the ratio of the stage's images per
second (`stages.<stage>.run` end to end: checkpoint loading, decoding in loader workers,
inference, store reads and writes or PNG encoding, the manifest) to bare inference on the same
images already decoded, resized, normalised and batched in memory (target ≥ 0.9). For
self-train: the seconds of one real iteration of the stage (its loaders, the offline labels read
from the store, the step, the teacher update, the in-loop offline update writing the store,
logging) over the seconds of its bare model passes (the same step and teacher update on batches
held in memory) (target ≤ 1.10). For self-train's periodic evaluation (`self-train-eval`): the
teacher's BN recalibration on `self_train.recalibrate_batches` target-train crops plus the
target-val mIoU, as the stage runs them (crops made by loader workers or a thread, the val
images decoded ahead), against the same recalibration passes and val forward passes on tensors
held in memory (target ≥ 0.9). The two sides of each pair alternate, best of `--repeats`, so
the machine's noise hits both alike. `--profile STAGE` prints where a stage's time goes.

    python benchmarks/throughput.py [--images 64] [--steps 40] [--device cpu]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import platform
import pstats
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from common import best_times, memory_batches, write_checkpoint, write_index

from stages import evaluate, generate_pseudo, predict, self_train, update_offline
from stages.config import Config, load_config
from stages.data.crops import CropDataset
from stages.data.index import load_dataset_index
from stages.engine.inference import RECALIBRATION_SEED_OFFSET
from stages.engine.inference import predict as predict_probabilities
from stages.method.step import self_train_step
from stages.nn.model import build_model
from stages.nn.teacher import MeanTeacher, recalibrate_batchnorm
from stages.runtime.devices import resolve_device
from stages.runtime.progress import Reporter, Task

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("generate-pseudo", "update-offline", "evaluate", "predict", "self-train",
          "self-train-eval")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "synthetic.yaml",
                        help="model, sizes, batches and workers come from this config")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="config overrides, as on the command line")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--steps", type=int, default=40, help="self-train iterations timed")
    parser.add_argument("--warm", type=int, default=5, help="self-train iterations not timed")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--only", default=",".join(STAGES))
    parser.add_argument("--profile", choices=STAGES, help="cProfile one stage instead")
    parser.add_argument("--json", action="store_true")
    return parser.parse_args(argv)


def bench_config(args: argparse.Namespace) -> Config:
    """The config's model and sizes, with every stage reading the scratch dataset's images."""
    config = load_config(args.config, args.overrides)
    height, width = config.input.target_size
    raw = config.model_dump(mode="json")
    raw["input"]["source_size"] = [height, width]
    raw["self_train"].update(iterations=args.warm + args.steps, offline_start=0,
                             checkpoint_every=10**6, eval_every=0, log_every=10)
    raw["evaluate"]["recalibration"]["enabled"] = False
    raw["generate_pseudo"]["recalibration"]["enabled"] = False
    for section in ("generate_pseudo", "update_offline", "evaluate"):
        raw[section]["inference"]["model"] = "student"
    return Config.model_validate(raw)


class StepTimes(Reporter):
    """Records the time of every iteration of the self-train task."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def task(self, description: str, total: int | None, completed: int = 0,
             log_every: int = 0) -> Task:
        task = super().task(description, total, completed, 0)
        if description == "self-train":
            original = task.advance

            def advance(steps: int = 1, **fields: Any) -> None:
                original(steps, **fields)
                self.times.append(time.perf_counter())

            task.advance = advance  # type: ignore[method-assign]
        return task

    def info(self, message: str) -> None:
        pass


def inference_pairs(config: Config, root: Path, index: Path, checkpoint: Path,
                    device: torch.device) -> dict[str, tuple[Callable[[], None],
                                                             Callable[[], None]]]:
    """(bare, full) callables of the four inference stages."""
    height, width = config.input.target_size
    model = build_model(config.model, 19).to(device).eval()
    model.load_state_dict(torch.load(checkpoint / "model.pt", weights_only=True)["student"])
    batch_size = config.evaluate.inference.batch_size
    batches = memory_batches(index, "train", (height, width), batch_size, device)

    def bare_probabilities() -> None:
        with torch.no_grad():
            for batch in batches:
                predict_probabilities(model, batch, (height, width)).max(1)
        synchronize(device)

    def bare_classes() -> None:
        with torch.no_grad():
            for batch in batches:
                model(batch).argmax(1)
        synchronize(device)

    store = root / "pseudo"
    generate_pseudo.run(config, index, checkpoint, store, device=device.type)
    return {
        "generate-pseudo": (bare_probabilities, lambda: generate_pseudo.run(
            config, index, checkpoint, root / "pseudo_again", force=True,
            device=device.type)),
        "update-offline": (bare_probabilities, lambda: update_offline.run(
            config, index, checkpoint, store, root / "updated", force=True,
            device=device.type)),
        "evaluate": (bare_classes, lambda: evaluate.run(
            config.model_copy(update={"evaluate": config.evaluate.model_copy(
                update={"split": "train"})}), index, checkpoint, root / "evaluation",
            force=True, device=device.type)),
        "predict": (bare_classes, lambda: predict.run(
            config, checkpoint, root / "predictions", data=index, split="train",
            formats="trainid,color", force=True, device=device.type)),
    }


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def self_train_pair(config: Config, args: argparse.Namespace, root: Path, index: Path,
                    checkpoint: Path, device: torch.device) -> tuple[Callable[[], float],
                                                                     Callable[[], float]]:
    """(bare, real) callables returning seconds per self-training iteration."""
    store = root / "pseudo"
    cfg = config.self_train
    # The bare passes: the same step on batches held in memory, from the same loaders.
    from stages.runtime.distributed import Ranks

    ranks = Ranks(device)
    data = load_dataset_index(index)
    loaders = [self_train._loader(config, data, domain, size, seed, ranks)
               for domain, size, seed in (("source", cfg.source_batch_size, config.seed),
                                          ("target", cfg.target_batch_size, config.seed + 1))]
    from stages.store.pseudo_store import open_store

    opened = open_store(store)
    batches = []
    for _ in range(args.warm + args.steps):
        source, target = (next(loader) for loader in loaders)
        batch, _ = self_train._batch(config, source, target, _Labels(opened), device)
        batches.append(batch)
    for loader in loaders:
        loader.close()
    student = build_model(config.model, 19).to(device).train()
    teacher = MeanTeacher(student)
    optimizer = torch.optim.SGD(student.parameters(), lr=1e-3, momentum=0.9, nesterov=True)
    scaler = torch.amp.GradScaler("cuda", enabled=False)

    def bare() -> float:
        started = 0.0
        for step, batch in enumerate(batches):
            if step == args.warm:
                synchronize(device)
                started = time.perf_counter()
            self_train_step(student, teacher, batch, weights=cfg.loss, alpha=0.2,
                            optimizer=optimizer, scaler=scaler, offline_update=True)
            teacher.update(student)
        synchronize(device)
        return (time.perf_counter() - started) / args.steps

    def real() -> float:
        timer = StepTimes()
        self_train.run(config, index, checkpoint, store, root / "run", force=True,
                       device=device.type, reporter=timer)
        return (timer.times[-1] - timer.times[args.warm - 1]) / args.steps

    return bare, real


def evaluation_pair(config: Config, index: Path, checkpoint: Path, device: torch.device,
                    ) -> tuple[Callable[[], None], Callable[[], None]]:
    """(bare, stage) callables of self-train's periodic evaluation: BN recalibration on
    target-train crops, then target-val mIoU."""
    data = load_dataset_index(index)
    model = build_model(config.model, 19).to(device)
    model.load_state_dict(torch.load(checkpoint / "model.pt", weights_only=True)["student"])
    settings = config.self_train.recalibration
    crops = CropDataset(data.samples("target", "train"), config.input.target_size,
                        config.input.crop_size, config.input.scale_range,
                        config.input.flip_probability, config.model.normalization,
                        seed=config.seed + RECALIBRATION_SEED_OFFSET, with_labels=False)
    count = settings.batches * settings.batch_size or len(crops)
    images = torch.stack([crops[(i % len(crops), 0, i)]["image"] for i in range(count)])
    crop_batches = [images[i:i + settings.batch_size].to(device)
                    for i in range(0, count, settings.batch_size)]
    val = memory_batches(index, "val", tuple(config.input.target_size), 1, device)

    def bare() -> None:
        recalibrate_batchnorm(model, crop_batches, device, config.inference_precision)
        model.eval()
        with torch.no_grad():
            for batch in val:
                model(batch).max(1)  # the class as the stage takes it
        synchronize(device)

    def stage() -> None:
        self_train.recalibrated_val_miou(config, data, model, device, Reporter())
        synchronize(device)

    return bare, stage


class _Labels:
    """What `self_train._batch` reads the offline labels through, for batches built ahead."""

    def __init__(self, store: Any) -> None:
        self.store = store

    def labels(self, indices: list[int]) -> list[Any]:
        return [self.store.read_labels(i) for i in indices]


def best_of(function: Callable[[], float], repeats: int) -> float:
    return min(function() for _ in range(repeats))


def main() -> None:
    args = parse_args()
    device = resolve_device(args.device)
    torch.manual_seed(0)
    config = bench_config(args)
    wanted = [name for name in args.only.split(",") if name]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        height, width = config.input.target_size
        index = write_index(root / "data", args.images, height, width, source=True)
        checkpoint = write_checkpoint(root / "ckpt", build_model(config.model, 19),
                                      config.model)
        pairs = inference_pairs(config, root, index, checkpoint, device)
        if args.profile:
            profile(args.profile, pairs, config, args, root, index, checkpoint, device)
            return
        for name in wanted:
            if name == "self-train":
                bare, real = self_train_pair(config, args, root, index, checkpoint, device)
                real(), bare()  # warm-up: first runs pay one-off costs
                bare_seconds, real_seconds = best_of(bare, args.repeats), best_of(
                    real, args.repeats)
                rows.append({"stage": name, "bare": bare_seconds, "stage_value": real_seconds,
                             "ratio": real_seconds / bare_seconds, "unit": "s/iteration",
                             "target": "<= 1.10"})
                continue
            if name == "self-train-eval":
                bare, full = evaluation_pair(config, index, checkpoint, device)
                bare_seconds, full_seconds = best_times(bare, full, args.repeats)
                rows.append({"stage": name, "bare": 1 / bare_seconds,
                             "stage_value": 1 / full_seconds, "ratio": bare_seconds / full_seconds,
                             "unit": "evals/s", "target": ">= 0.9"})
                continue
            bare, full = pairs[name]
            bare_seconds, full_seconds = best_times(bare, full, args.repeats)
            rows.append({"stage": name, "bare": args.images / bare_seconds,
                         "stage_value": args.images / full_seconds,
                         "ratio": bare_seconds / full_seconds, "unit": "images/s",
                         "target": ">= 0.9"})
    machine = (f"{platform.machine()}, {torch.get_num_threads()} torch threads, "
               f"device {device}")
    if args.json:
        print(json.dumps({"machine": machine, "rows": rows}))
        return
    print(f"{machine}; {config.model.backbone} ×{config.model.width_multiplier:g} at "
          f"{height}×{width}, {args.images} images, self-train {args.steps} iterations")
    print(f"{'stage':<16}{'bare':>10}{'stage':>10}  unit         ratio  target")
    for row in rows:
        print(f"{row['stage']:<16}{row['bare']:>10.3f}{row['stage_value']:>10.3f}  "
              f"{row['unit']:<12}{row['ratio']:>6.3f}  {row['target']}")


def profile(name: str, pairs: dict[str, Any], config: Config, args: argparse.Namespace,
            root: Path, index: Path, checkpoint: Path, device: torch.device) -> None:
    if name == "self-train":
        _, run = self_train_pair(config, args, root, index, checkpoint, device)
    elif name == "self-train-eval":
        _, run = evaluation_pair(config, index, checkpoint, device)
    else:
        run = pairs[name][1]
    profiler = cProfile.Profile()
    profiler.enable()
    run()
    profiler.disable()
    stream = io.StringIO()
    stats = pstats.Stats(profiler, stream=stream)
    stats.sort_stats("cumulative").print_stats(30)
    stats.sort_stats("tottime").print_stats(25)
    print(stream.getvalue())


if __name__ == "__main__":
    main()
