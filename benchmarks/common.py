"""Shared set-up of the throughput benchmarks: a dataset index of synthetic target images and a
checkpoint of a randomly initialised model, written as real artifacts in a scratch folder."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from stages.artifacts.checkpoint import MODEL_FILE, write_model_file
from stages.artifacts.manifest import CHECKPOINT, DATASET_INDEX
from stages.artifacts.writer import ArtifactWriter
from stages.config import ModelConfig
from stages.data.classes import cityscapes_table
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


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--size", type=int, nargs=2, default=[128, 256], metavar=("H", "W"))
    parser.add_argument("--backbone", default="resnet18",
                        choices=["resnet18", "resnet50", "resnet101"])
    parser.add_argument("--width", type=float, default=1.0, help="resnet18 width multiplier")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")


def write_index(root: Path, count: int, height: int, width: int, source: bool = False) -> Path:
    """A dataset index whose target train and val splits (and with `source`, a source train
    split) are the same `count` synthetic target-domain images with their labels."""
    samples = []
    with ArtifactWriter(root, kind=DATASET_INDEX, stage="prepare_data", config={},
                        config_hash=f"bench-{count}-{height}-{width}") as writer:
        (root / "images").mkdir()
        for i in range(count):
            image, label = generate_sample(0, "target", "train", i, height, width)
            Image.fromarray(image).save(root / "images" / f"{i}.png")
            Image.fromarray(label, mode="L").save(root / "images" / f"{i}_label.png")
            samples.append(SampleEntry(id=str(i), image=f"images/{i}.png",
                                       label=f"images/{i}_label.png"))
        split = {"val": SplitEntry(samples=samples), "train": SplitEntry(samples=samples)}
        domains = {"target": DomainEntry(layout="folder", splits=split)}
        if source:
            domains["source"] = DomainEntry(layout="folder",
                                            splits={"train": SplitEntry(samples=samples)})
        content = IndexFile(classes=cityscapes_table(), domains=domains)
        (root / INDEX_FILE).write_text(content.model_dump_json())
        writer.finish({}, content=[INDEX_FILE])
    return root


def write_checkpoint(path: Path, model: nn.Module, model_config: ModelConfig) -> Path:
    """A checkpoint artifact holding `model` as its student."""
    with ArtifactWriter(path, kind=CHECKPOINT, stage="warmup", config={},
                        config_hash="bench") as writer:
        write_model_file(path / MODEL_FILE, student=model, teacher=None,
                         model_config=model_config, class_names=cityscapes_table().names,
                         iteration=0)
        writer.finish({})
    return path


def memory_batches(index: Path, split: str, size: tuple[int, int], batch_size: int,
                   device: torch.device) -> list[torch.Tensor]:
    """The split's images decoded, resized, normalised and batched on `device` ahead of time:
    the input of the bare-inference baseline."""
    dataset = FullImageDataset(load_dataset_index(index).samples("target", split), size,
                               "imagenet_rgb")
    images = torch.stack([dataset[i]["image"] for i in range(len(dataset))])
    return [images[i:i + batch_size].to(device) for i in range(0, len(images), batch_size)]


def best_times(bare: Callable[[], None], full: Callable[[], None],
               repeats: int) -> tuple[float, float]:
    """Best-of-`repeats` seconds of `bare` and `full`, run alternately after one warm-up
    each, so machine noise hits both alike."""
    bare()
    full()
    bare_times, full_times = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        bare()
        bare_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        full()
        full_times.append(time.perf_counter() - start)
    return min(bare_times), min(full_times)
