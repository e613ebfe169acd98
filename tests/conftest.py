"""Shared fixtures: a tiny dataset index built directly (no prepare-data), a tiny config, and the
inputs of self-training (an index, a warmup checkpoint and its pseudo-label store)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from stages import generate_pseudo, warmup
from stages.artifacts.manifest import DATASET_INDEX
from stages.artifacts.writer import ArtifactWriter
from stages.config import Config
from stages.data.classes import cityscapes_table
from stages.data.index import INDEX_FILE, DomainEntry, IndexFile, SampleEntry, SplitEntry
from stages.store.pseudo_store import open_store

TINY_CONFIG = {
    "experiment": "tiny",
    "seed": 0,
    "data": {"source": {"layout": "synthetic", "splits": ["train", "val"]},
             "target": {"layout": "synthetic", "splits": ["train", "val"]},
             "synthetic": {"height": 32, "width": 64, "num_source_train": 8,
                           "num_source_val": 4, "num_target_train": 6, "num_target_val": 4}},
    "input": {"source_size": [32, 64], "target_size": [32, 64], "crop_size": [24, 48],
              "scale_range": [0.8, 1.2]},
    "model": {"backbone": "resnet18", "width_multiplier": 0.25, "dropout": 0.1,
              "normalization": "imagenet_rgb"},
    "warmup": {"iterations": 4, "batch_size": 2, "checkpoint_every": 2, "log_every": 1,
               "runtime": {"num_workers": 0}, "optimizer": {"lr": 0.01, "warmup_iterations": 1}},
    "generate_pseudo": {"inference": {"batch_size": 2, "num_workers": 0}},
    "self_train": {"iterations": 4, "checkpoint_every": 2, "eval_every": 0, "log_every": 1,
                   "offline_start": 2, "alpha": {"offset": 1}, "beta": {"offset": 1},
                   "runtime": {"num_workers": 0},
                   "optimizer": {"lr": 0.01, "warmup_iterations": 1}},
    "update_offline": {"inference": {"batch_size": 2, "num_workers": 0}},
    "evaluate": {"inference": {"batch_size": 2, "num_workers": 0}},
}


def _scene(rng: np.random.Generator, height: int, width: int, shift: int) -> tuple:
    """A crude street: sky (10) on top, building (2) band, road (0) below, a car (13) box."""
    label = np.full((height, width), 0, np.uint8)
    horizon = height // 3 + int(rng.integers(-2, 3))
    label[:horizon] = 10
    label[horizon:horizon + height // 6] = 2
    x = int(rng.integers(0, width - 12))
    label[height - 10:height - 4, x:x + 10] = 13
    label[0, 0] = 255
    colours = {0: (128, 64, 128), 2: (70, 70, 70), 10: (70, 130, 180), 13: (0, 0, 142),
               255: (0, 0, 0)}
    image = np.zeros((height, width, 3), np.int16)
    for cls, colour in colours.items():
        image[label == cls] = colour
    image = np.clip(image + shift + rng.integers(-10, 10, image.shape), 0, 255).astype(np.uint8)
    return image, label


def make_index(root: Path, sizes: dict[tuple[str, str], int] | None = None,
               height: int = 32, width: int = 64, seed: int = 0,
               unlabelled: tuple[tuple[str, str], ...] = ()) -> Path:
    """Write a finished dataset index artifact at `root` and return its path; the splits in
    `unlabelled` are indexed without their labels."""
    sizes = sizes or {("source", "train"): 8, ("source", "val"): 4,
                      ("target", "train"): 6, ("target", "val"): 4}
    rng = np.random.default_rng(seed)
    domains: dict[str, dict[str, SplitEntry]] = {}
    with ArtifactWriter(root, kind=DATASET_INDEX, stage="prepare_data", config={},
                        config_hash=f"test-{seed}-{sorted(sizes.items())}-{unlabelled}") as writer:
        for (domain, split), count in sizes.items():
            folder = root / domain / split
            folder.mkdir(parents=True)
            samples = []
            for i in range(count):
                image, label = _scene(rng, height, width, 0 if domain == "source" else 40)
                Image.fromarray(image).save(folder / f"{i:04d}.png")
                Image.fromarray(label, mode="L").save(folder / f"{i:04d}_label.png")
                label_path = f"{domain}/{split}/{i:04d}_label.png"
                samples.append(SampleEntry(id=f"{domain}_{split}_{i:04d}",
                                           image=f"{domain}/{split}/{i:04d}.png",
                                           label=None if (domain, split) in unlabelled
                                           else label_path))
            domains.setdefault(domain, {})[split] = SplitEntry(samples=samples)
        content = IndexFile(classes=cityscapes_table(),
                            domains={d: DomainEntry(layout="synthetic", splits=s)
                                     for d, s in domains.items()})
        (root / INDEX_FILE).write_text(content.model_dump_json(indent=1))
        writer.finish(summary={"splits": []}, content=[INDEX_FILE])
    return root


@pytest.fixture
def tiny_index(tmp_path: Path) -> Path:
    return make_index(tmp_path / "data")


@pytest.fixture
def tiny_config_file(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY_CONFIG, sort_keys=False))
    return path


@pytest.fixture
def tiny_config() -> Config:
    return Config.model_validate(TINY_CONFIG)


def tiny(**sections) -> Config:
    raw = json.loads(json.dumps(TINY_CONFIG))
    for dotted, value in sections.items():
        node = raw
        *parents, key = dotted.split("__")
        for part in parents:
            node = node.setdefault(part, {})
        node[key] = value
    return Config.model_validate(raw)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> dict[str, Path]:
    """A dataset index, a warmup checkpoint and its pseudo-label store, built once."""
    root = tmp_path_factory.mktemp("pipeline")
    config = tiny()
    data = make_index(root / "data")
    checkpoint = warmup.run(config, data, root / "warmup", device="cpu").path
    pseudo = generate_pseudo.run(config, data, checkpoint, root / "pseudo", device="cpu").path
    return {"data": data, "checkpoint": checkpoint, "pseudo": pseudo, "root": root}


def store_labels(path: Path) -> np.ndarray:
    store = open_store(path)
    return np.stack([store.read_labels(i) for i in range(len(store))])
