"""Predict throughput as a ratio to bare model inference on the same images (target ≥ 0.9).

Both are measured side by side in one run, alternating, best of `--repeats`:
- bare: `model(images)` in eval mode under no_grad, on images already decoded, resized,
  normalised and batched in memory;
- predict: `stages.predict.run` end to end on a dataset split of the same images (checkpoint
  loading, PNG decoding in loader workers, resizing, inference, the argmax and confidence at
  the images' size, PNG encoding on background threads, the listing and manifest), with
  `--force` so that every repeat writes every PNG again.
The default is 100 synthetic target images at 128×256 and a ResNet-18 on the CPU, writing
trainid and color PNGs; `--format trainid,labelid,color,confidence` writes all four.

    python benchmarks/predict_throughput.py [--images 100] [--workers 2] [--format trainid,color]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from common import add_common_arguments, best_times, memory_batches, write_checkpoint, write_index

from stages import predict
from stages.config import Config, ModelConfig
from stages.devices import resolve_device
from stages.nn.model import build_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_arguments(parser)
    parser.add_argument("--format", default="trainid,color", help="predict's --format")
    parser.set_defaults(images=100, workers=2)
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
            predict.run(config, root / "ckpt", root / "predictions", data=index, split="val",
                        formats=args.format, force=True, device=str(device.type))

        bare_best, predict_best = best_times(bare, full, args.repeats)
    bare_rate = args.images / bare_best
    predict_rate = args.images / predict_best
    print(f"device {device}, {args.backbone} (width {args.width:g}), {args.images} images "
          f"{height}x{width}, batch {args.batch_size}, {args.workers} loader worker(s), "
          f"formats {args.format}, {torch.get_num_threads()} torch thread(s)")
    print(f"bare model inference: {bare_rate:.2f} images/s")
    print(f"duda predict:         {predict_rate:.2f} images/s")
    print(f"ratio predict / bare: {predict_rate / bare_rate:.3f} (target >= 0.9)")


if __name__ == "__main__":
    main()
