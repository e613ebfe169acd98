"""generate-pseudo throughput as a ratio to bare model inference on the same images (target ≥ 0.9).

Both are measured side by side in one run, alternating, best of `--repeats`:
- bare: `model(images).softmax(1).max(1)` in eval mode under no_grad, on images already
  decoded, resized, normalised and batched in memory;
- generate: `stages.generate_pseudo.run` end to end on a dataset index of the same images
  (checkpoint loading, PNG decoding, resizing, inference, writing labels and confidences to the
  zarr store, the selection pass, statistics, diagnostics against the ground truth, manifest).
The default is a small output-stride-8 ResNet-18 on the CPU; `--backbone resnet101
--size 512 1024 --device cuda` measures the paper's model on a GPU.

    python benchmarks/generate_throughput.py [--images 16] [--size 128 256] [--selector cbst]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from stages import generate_pseudo
from stages.artifacts import CHECKPOINT, DATASET_INDEX, ArtifactWriter
from stages.checkpoint import MODEL_FILE, write_model_file
from stages.classes import cityscapes_table
from stages.config import Config, ModelConfig
from stages.data.full_images import FullImageDataset
from stages.data.index import (
    INDEX_FILE,
    DomainEntry,
    IndexFile,
    SampleEntry,
    SplitEntry,
    load_dataset_index,
)
from stages.data.synthetic import generate_sample
from stages.devices import resolve_device
from stages.nn.model import build_model


def write_index(root: Path, count: int, height: int, width: int) -> Path:
    samples = []
    with ArtifactWriter(root, kind=DATASET_INDEX, stage="prepare_data", config={},
                        config_hash="bench") as writer:
        (root / "images").mkdir()
        for i in range(count):
            image, label = generate_sample(0, "target", "train", i, height, width)
            Image.fromarray(image).save(root / "images" / f"{i}.png")
            Image.fromarray(label, mode="L").save(root / "images" / f"{i}_label.png")
            samples.append(SampleEntry(id=str(i), image=f"images/{i}.png",
                                       label=f"images/{i}_label.png"))
        content = IndexFile(classes=cityscapes_table(), domains={"target": DomainEntry(
            layout="folder", splits={"train": SplitEntry(samples=samples)})})
        (root / INDEX_FILE).write_text(content.model_dump_json())
        writer.finish({}, digest="bench")
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--size", type=int, nargs=2, default=[128, 256], metavar=("H", "W"))
    parser.add_argument("--backbone", default="resnet18",
                        choices=["resnet18", "resnet50", "resnet101"])
    parser.add_argument("--width", type=float, default=1.0, help="resnet18 width multiplier")
    parser.add_argument("--selector", default="cbst", choices=["cbst", "iast", "fixed"])
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    device = resolve_device(args.device)
    model_config = ModelConfig(backbone=args.backbone, width_multiplier=args.width,
                               normalization="imagenet_rgb")
    height, width = args.size
    config = Config.model_validate({
        "experiment": "bench",
        "data": {"source": {"layout": "synthetic"}, "target": {"layout": "synthetic"}},
        "input": {"target_size": [height, width], "crop_size": [height, width]},
        "generate_pseudo": {"batch_size": args.batch_size, "num_workers": args.workers,
                            "model": "student", "selector": args.selector},
    })
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        index = write_index(root / "data", args.images, height, width)
        model = build_model(model_config, 19)
        with ArtifactWriter(root / "ckpt", kind=CHECKPOINT, stage="warmup", config={},
                            config_hash="bench") as writer:
            write_model_file(root / "ckpt" / MODEL_FILE, student=model, teacher=None,
                             model_config=model_config, class_names=cityscapes_table().names,
                             iteration=0)
            writer.finish({})

        dataset = FullImageDataset(load_dataset_index(index).samples("target", "train"),
                                   (height, width), "imagenet_rgb")
        images = torch.stack([dataset[i]["image"] for i in range(len(dataset))])
        batches = [images[i:i + args.batch_size].to(device)
                   for i in range(0, len(images), args.batch_size)]
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

        bare()  # warm up both paths once
        full()
        bare_times, generate_times = [], []
        for _ in range(args.repeats):
            start = time.perf_counter()
            bare()
            bare_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            full()
            generate_times.append(time.perf_counter() - start)
    bare_rate = args.images / min(bare_times)
    generate_rate = args.images / min(generate_times)
    print(f"device {device}, {args.backbone} (width {args.width:g}), {args.images} images "
          f"{height}x{width}, batch {args.batch_size}, {args.workers} loader worker(s), "
          f"selector {args.selector}")
    print(f"bare model inference:  {bare_rate:.2f} images/s")
    print(f"duda generate-pseudo:  {generate_rate:.2f} images/s")
    print(f"ratio generate / bare: {generate_rate / bare_rate:.3f} (target >= 0.9)")


if __name__ == "__main__":
    main()
