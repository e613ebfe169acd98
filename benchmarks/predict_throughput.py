"""Predict throughput as a ratio to bare model inference on the same images (target ≥ 0.9).

Both are measured side by side in one run, alternating, best of `--repeats`, in wall-clock
seconds (the ratio to meet) and in CPU seconds of the process and its loader workers (the work
each did):
- bare: `model(images)` in eval mode under no_grad, on images already decoded, resized,
  normalised and batched in memory;
- predict: `stages.predict.run` end to end on a dataset split of the same images (checkpoint
  loading, PNG decoding in loader workers, resizing, inference, the argmax and confidence at
  the images' size, PNG encoding on a background thread, the listing and manifest), with
  `--force` so that every repeat writes every PNG again.
The default is 100 synthetic target images at 128×256 and a ResNet-18 on the CPU, writing
trainid and color PNGs (`--format trainid,labelid,color,confidence` writes all four), decoding
in the main process as the evaluate benchmark does (`--workers 0`). On a two-core machine the
model's two threads already take both cores, so loader worker processes (`--workers 2`, the
config's default, which pays off on more cores and on GPUs) cost more than they save there.

    python benchmarks/predict_throughput.py [--images 100] [--workers 0] [--format trainid,color]
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from common import add_common_arguments, memory_batches, write_checkpoint, write_index

from stages import predict
from stages.config import Config, DeepLabV2Config
from stages.nn.model import build_model
from stages.runtime.devices import resolve_device


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_arguments(parser)
    parser.add_argument("--format", default="trainid,color", help="predict's --format")
    parser.set_defaults(images=100)
    args = parser.parse_args()

    device = resolve_device(args.device)
    model_config = DeepLabV2Config(backbone=args.backbone, width_multiplier=args.width,
                               normalization="imagenet_rgb")
    height, width = args.size
    config = Config.model_validate({
        "experiment": "bench",
        "data": {"source": {"layout": "synthetic"}, "target": {"layout": "synthetic"}},
        "input": {"target_size": [height, width], "crop_size": [height, width]},
        "evaluate": {"inference": {"batch_size": args.batch_size, "num_workers": args.workers,
                                   "model": "student"}},
    })
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        index = write_index(root / "data", args.images, height, width)
        model = build_model(model_config, 19)
        write_checkpoint(root / "ckpt", model, model_config)

        batches = memory_batches(index, "val", (height, width), args.batch_size, device)
        model = model.to(device).eval()

        def bare() -> None:
            with torch.no_grad():
                for batch in batches:
                    model(batch).argmax(1)
            if device.type == "cuda":
                torch.cuda.synchronize()

        def full() -> None:
            predict.run(config, root / "ckpt", root / "predictions", data=index, split="val",
                        formats=args.format, force=True, device=str(device.type))

        (bare_best, bare_cpu), (predict_best, predict_cpu) = best_times(bare, full,
                                                                        args.repeats)
    bare_rate = args.images / bare_best
    predict_rate = args.images / predict_best
    print(f"device {device}, {args.backbone} (width {args.width:g}), {args.images} images "
          f"{height}x{width}, batch {args.batch_size}, {args.workers} loader worker(s), "
          f"formats {args.format}, {torch.get_num_threads()} torch thread(s)")
    print(f"bare model inference: {bare_rate:.2f} images/s")
    print(f"duda predict:         {predict_rate:.2f} images/s")
    print(f"ratio predict / bare: {predict_rate / bare_rate:.3f} (target >= 0.9)")
    print(f"CPU seconds: bare {bare_cpu:.2f}, predict {predict_cpu:.2f}, "
          f"ratio bare / predict {bare_cpu / predict_cpu:.3f}")


def cpu_seconds() -> float:
    """User + system CPU time of this process and of its finished children (loader workers)."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


def best_times(bare: Callable[[], None], full: Callable[[], None],
               repeats: int) -> tuple[tuple[float, float], tuple[float, float]]:
    """Best-of-`repeats` (wall, CPU) seconds of `bare` and `full`, run alternately after one
    warm-up each, so machine noise hits both alike."""
    bare()
    full()
    times: dict[str, list[tuple[float, float]]] = {"bare": [], "full": []}
    for _ in range(repeats):
        for name, function in (("bare", bare), ("full", full)):
            wall, cpu = time.perf_counter(), cpu_seconds()
            function()
            times[name].append((time.perf_counter() - wall, cpu_seconds() - cpu))
    return ((min(t[0] for t in times["bare"]), min(t[1] for t in times["bare"])),
            (min(t[0] for t in times["full"]), min(t[1] for t in times["full"])))


if __name__ == "__main__":
    main()
