"""Evaluate throughput as a ratio to bare model inference on the same images (target ≥ 0.9).

Both are measured side by side in one run, alternating, best of `--repeats`:
- bare: `model(images)` in eval mode under no_grad, on images already decoded, resized,
  normalised and batched in memory;
- evaluate: `stages.evaluate.run` end to end on a dataset index of the same images (checkpoint
  loading, PNG decoding, resizing, inference, upsampling, the confusion matrix, report).
The default is a small output-stride-8 ResNet-18 on the CPU; `--backbone resnet101
--size 512 1024 --device cuda` measures the paper's model on a GPU.

    python benchmarks/evaluate_throughput.py [--images 64] [--size 128 256] [--backbone resnet18]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from common import add_common_arguments, best_times, memory_batches, write_checkpoint, write_index

from stages import evaluate
from stages.config import Config, ModelConfig
from stages.devices import resolve_device
from stages.nn.model import build_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_arguments(parser)
    args = parser.parse_args()

    device = resolve_device(args.device)
    model_config = ModelConfig(backbone=args.backbone, width_multiplier=args.width,
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
            evaluate.run(config, index, root / "ckpt", root / "eval", force=True,
                         device=str(device.type))

        bare_best, eval_best = best_times(bare, full, args.repeats)
    bare_rate = args.images / bare_best
    eval_rate = args.images / eval_best
    print(f"device {device}, {args.backbone} (width {args.width:g}), {args.images} images "
          f"{height}x{width}, batch {args.batch_size}, {args.workers} loader worker(s)")
    print(f"bare model inference: {bare_rate:.2f} images/s")
    print(f"duda evaluate:        {eval_rate:.2f} images/s")
    print(f"ratio evaluate / bare: {eval_rate / bare_rate:.3f} (target >= 0.9)")


if __name__ == "__main__":
    main()
