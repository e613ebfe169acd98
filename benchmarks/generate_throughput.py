"""generate-pseudo throughput as a ratio to bare model inference on the same images (target ≥ 0.9).

Both are measured side by side in one run, alternating, best of `--repeats`:
- bare: `model(images).softmax(1).max(1)` in eval mode under no_grad, on images already
  decoded, resized, normalised and batched in memory;
- generate: `stages.generate_pseudo.run` end to end on a dataset index of the same images
  (checkpoint loading, PNG decoding, resizing, inference, writing labels and confidences to the
  zarr store, the selection pass, statistics, diagnostics against the ground truth, manifest).
The default is a small output-stride-8 ResNet-18 on the CPU; `--backbone resnet101
--size 512 1024 --device cuda` measures the paper's model on a GPU.

    python benchmarks/generate_throughput.py [--images 64] [--size 128 256] [--selector cbst]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from common import add_common_arguments, best_times, memory_batches, write_checkpoint, write_index

from stages import generate_pseudo
from stages.config import Config, ModelConfig
from stages.devices import resolve_device
from stages.nn.model import build_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_arguments(parser)
    parser.add_argument("--selector", default="cbst", choices=["cbst", "iast", "fixed"])
    args = parser.parse_args()

    device = resolve_device(args.device)
    model_config = ModelConfig(backbone=args.backbone, width_multiplier=args.width,
                               normalization="imagenet_rgb")
    height, width = args.size
    config = Config.model_validate({
        "experiment": "bench",
        "data": {"source": {"layout": "synthetic"}, "target": {"layout": "synthetic"}},
        "input": {"target_size": [height, width], "crop_size": [height, width]},
        "generate_pseudo": {"inference": {"batch_size": args.batch_size,
                                          "num_workers": args.workers, "model": "student"},
                            "selector": {"name": args.selector}},
    })
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        index = write_index(root / "data", args.images, height, width)
        model = build_model(model_config, 19)
        write_checkpoint(root / "ckpt", model, model_config)

        batches = memory_batches(index, "train", (height, width), args.batch_size, device)
        model = model.to(device).eval()

        def bare() -> None:
            with torch.no_grad():
                for batch in batches:
                    model(batch).softmax(1).max(1)
            if device.type == "cuda":
                torch.cuda.synchronize()

        def full() -> None:
            generate_pseudo.run(config, index, root / "ckpt", root / "pseudo", force=True,
                                device=str(device.type))

        bare_best, generate_best = best_times(bare, full, args.repeats)
    bare_rate = args.images / bare_best
    generate_rate = args.images / generate_best
    print(f"device {device}, {args.backbone} (width {args.width:g}), {args.images} images "
          f"{height}x{width}, batch {args.batch_size}, {args.workers} loader worker(s), "
          f"selector {args.selector}")
    print(f"bare model inference:  {bare_rate:.2f} images/s")
    print(f"duda generate-pseudo:  {generate_rate:.2f} images/s")
    print(f"ratio generate / bare: {generate_rate / bare_rate:.3f} (target >= 0.9)")


if __name__ == "__main__":
    main()
