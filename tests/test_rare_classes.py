"""Rare-class sampling (DAFormer's RCS): the class probabilities, the eligible images, the crop
re-draw, reproducible items with and without loader workers, the per-image counts prepare-data
keeps for it, the refusal of an index without them, and an exactly resumable warmup."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_prepare_data import gta_cityscapes, prepare  # noqa: F401 (a fixture)
from typer.testing import CliRunner

from duda_cli.app import app
from stages import prepare_data, self_train, warmup
from stages.artifacts.checkpoint import load_torch
from stages.config import Config
from stages.data.crops import CropDataset, InfiniteLoader
from stages.data.index import Sample, load_dataset_index
from stages.data.rare_classes import (
    RareClassSampler,
    class_probabilities,
    crop_holds_class,
    eligible_images,
)
from stages.runtime.distributed import Ranks
from stages.runtime.errors import DudaError
from tests.conftest import TINY_CONFIG, make_index
from tests.test_warmup import Interrupt, InterruptingReporter, assert_same_checkpoints

# 32×64 synthetic labels hold 2,048 pixels, so DAFormer's 3,000 is scaled down with them.
RCS = {"enabled": True, "temperature": 0.01, "min_pixels": 40, "min_crop_ratio": 0.5}


def _config(rcs: dict | None = RCS, **warmup_overrides) -> Config:
    raw = json.loads(json.dumps(TINY_CONFIG))
    raw["data"]["workers"] = 1
    if rcs is not None:
        raw["input"]["rare_class_sampling"] = rcs
    raw["warmup"].update(warmup_overrides)
    return Config.model_validate(raw)


@pytest.fixture(scope="module")
def synthetic_index(tmp_path_factory) -> Path:
    """The tiny synthetic benchmark through prepare-data: an index with per-image counts."""
    return prepare_data.run(_config(), tmp_path_factory.mktemp("rcs") / "data").path


def test_a_rare_class_takes_almost_all_the_mass_at_the_default_temperature():
    counts = np.array([900_000, 90_000, 10_000, 0])
    probabilities = class_probabilities(counts, temperature=0.01)
    assert probabilities.sum() == pytest.approx(1.0)
    assert probabilities[3] == 0.0  # absent from the split: never drawn
    assert probabilities[2] > 0.99 and probabilities[0] < 1e-30
    # P(c) ∝ exp((1 − f_c) / T): the ratio of two classes is exp((f_b − f_a) / T).
    assert probabilities[2] / probabilities[1] == pytest.approx(np.exp((0.09 - 0.01) / 0.01))
    # A high temperature flattens the draw towards uniform over the present classes.
    assert np.allclose(class_probabilities(counts, 1e6)[:3], 1 / 3)


def test_only_images_above_min_pixels_are_drawn_for_a_class():
    counts = np.array([[5000, 3001, 0],
                       [5000, 3000, 0],  # exactly min_pixels: not eligible (DAFormer's `>`)
                       [5000, 10, 200],
                       [5000, 4000, 2999]])
    assert [list(e) for e in eligible_images(counts, 3000)] == [[0, 1, 2, 3], [0, 3], []]
    sampler = RareClassSampler.build(counts, temperature=0.01, min_pixels=3000,
                                     min_crop_ratio=0.5)
    # Class 2 is the rarest but no image holds enough of it: it is never drawn.
    assert sampler.classes.tolist() == [0, 1]
    rng = np.random.default_rng(0)
    draws = [sampler.draw(rng) for _ in range(500)]
    assert {image for cls, image in draws if cls == 1} == {0, 3}
    assert {cls for cls, _ in draws} <= {0, 1}
    assert sum(cls == 1 for cls, _ in draws) > 450  # the rarer of the two, at T = 0.01


def test_a_split_with_no_eligible_image_is_refused():
    with pytest.raises(DudaError) as error:
        RareClassSampler.build(np.array([[10, 5], [3, 0]]), 0.01, min_pixels=3000,
                               min_crop_ratio=0.5)
    assert "input.rare_class_sampling.min_pixels" in error.value.fix


def _corner_dataset(tmp_path: Path, min_crop_ratio: float) -> CropDataset:
    """One 48×48 scene of road (0) with a 24×24 pole (5) in its top-left corner."""
    label = np.zeros((48, 48), np.uint8)
    label[:24, :24] = 5
    Image.fromarray(np.full((48, 48, 3), 100, np.uint8)).save(tmp_path / "image.png")
    Image.fromarray(label, mode="L").save(tmp_path / "label.png")
    sample = Sample(id="corner", image=tmp_path / "image.png", label=tmp_path / "label.png",
                    num_classes=19)
    counts = np.bincount(label.ravel(), minlength=19)[None]
    sampler = RareClassSampler.build(counts, temperature=0.01, min_pixels=400,
                                     min_crop_ratio=min_crop_ratio)
    return CropDataset([sample], [48, 48], [24, 24], [1.0, 1.0], 0.0, "imagenet_rgb", seed=0,
                       rare_classes=sampler)


def test_the_crop_is_redrawn_until_it_holds_the_class(tmp_path):
    redrawn, first = _corner_dataset(tmp_path, 0.5), _corner_dataset(tmp_path, 0.0)
    assert crop_holds_class(np.full((4, 4), 5), 5, 15) and not crop_holds_class(
        np.full((4, 4), 5), 5, 16)
    holding = {"redrawn": 0, "first": 0}
    for position in range(60):
        for name, dataset in (("redrawn", redrawn), ("first", first)):
            item = dataset[(0, 0, position)]
            holding[name] += int((item["label"] == 5).sum()) > 200  # 400 × 0.5
    # About 28 % of the 24×24 crops of the scene hold more than 200 pixels of the corner;
    # re-drawn up to 10 times, about 97 % do.
    assert holding["first"] < 30 and holding["redrawn"] > 50


def test_the_same_key_gives_the_same_item_with_and_without_workers(synthetic_index):
    index = load_dataset_index(synthetic_index)
    sampler = RareClassSampler.build(index.image_pixel_counts("source", "train"), 0.01, 40, 0.5)

    def loader(workers: int) -> InfiniteLoader:
        dataset = CropDataset(index.samples("source", "train"), [32, 64], [24, 48], [0.8, 1.2],
                              0.5, "imagenet_rgb", seed=3, rare_classes=sampler)
        return InfiniteLoader(dataset, batch_size=2, seed=3, num_workers=workers)

    serial, parallel = loader(0), loader(2)
    try:
        for _ in range(6):
            a, b = next(serial), next(parallel)
            for key in ("index", "image", "label", "params"):
                assert torch.equal(a[key], b[key])
    finally:
        parallel.close()
    dataset = serial.dataset
    again = dataset[(0, 1, 2)]
    assert torch.equal(dataset[(5, 1, 2)]["image"], again["image"])  # the key's index is unused
    assert int(again["index"]) in range(len(index.samples("source", "train")))


def test_prepare_data_keeps_per_image_counts_that_sum_to_the_split(synthetic_index,
                                                                  gta_cityscapes,  # noqa: F811
                                                                  tmp_path):
    assert prepare(gta_cityscapes, tmp_path / "real").exit_code == 0
    for path in (synthetic_index, tmp_path / "real"):
        index = load_dataset_index(path)
        for domain, entry in index.content.domains.items():
            for split, split_entry in entry.splits.items():
                if split_entry.pixel_counts is None:
                    continue
                per_image = index.image_pixel_counts(domain, split)
                assert per_image.shape == (len(split_entry.samples), 19)
                assert per_image.sum(axis=0).tolist() == split_entry.pixel_counts
                # Each image's counts are its own label's.
                sample = index.samples(domain, split)[0]
                label = sample.read_label()
                assert per_image[0].tolist() == np.bincount(label.ravel(),
                                                            minlength=256)[:19].tolist()


def test_an_index_without_per_image_counts_is_refused_when_rcs_is_on(tmp_path):
    old = make_index(tmp_path / "old")  # as an index written before the counts were kept
    with pytest.raises(DudaError) as error:
        load_dataset_index(old).image_pixel_counts("source", "train")
    assert "rerun duda prepare-data --force" in error.value.fix
    config = tmp_path / "c.json"
    config.write_text(json.dumps(TINY_CONFIG))
    result = CliRunner().invoke(app, ["warmup", "-c", str(config), "--data", str(old),
                                      "--out", str(tmp_path / "w"), "--device", "cpu",
                                      "--set", "input.rare_class_sampling.enabled=true"])
    assert result.exit_code == 2, result.output
    assert "per-image class pixel counts" in result.stderr
    assert "rerun duda prepare-data --force" in result.stderr
    assert not (tmp_path / "w" / "manifest.json").exists()


def test_a_warmup_with_rcs_trains_and_resumes_bit_identically(synthetic_index, tmp_path):
    config = _config(iterations=2, checkpoint_every=1)
    straight = warmup.run(config, synthetic_index, tmp_path / "straight", device="cpu").path
    with pytest.raises(Interrupt):
        warmup.run(config, synthetic_index, tmp_path / "resumed", device="cpu",
                   reporter=InterruptingReporter(after=1))
    resumed = warmup.run(config, synthetic_index, tmp_path / "resumed", resume=True,
                         device="cpu").path
    assert_same_checkpoints(straight, resumed)
    assert (resumed / "metrics.jsonl").read_text() == (straight / "metrics.jsonl").read_text()
    # The sampling reached the training: without it the same run learns other weights.
    plain = warmup.run(_config(None, iterations=2, checkpoint_every=1), synthetic_index,
                       tmp_path / "plain", device="cpu").path
    rcs_weights, plain_weights = (load_torch(p / "model.pt")["student"] for p in (straight, plain))
    assert any(not torch.equal(rcs_weights[k], plain_weights[k]) for k in rcs_weights)


def test_self_train_draws_only_its_source_crops_by_rare_classes(synthetic_index):
    index = load_dataset_index(synthetic_index)
    ranks = Ranks(torch.device("cpu"))
    source = self_train._loader(_config(), index, "source", 2, 0, ranks)
    target = self_train._loader(_config(), index, "target", 2, 0, ranks)
    assert isinstance(source.dataset.rare_classes, RareClassSampler)
    assert target.dataset.rare_classes is None
    assert self_train._loader(_config(None), index, "source", 2, 0, ranks).dataset.rare_classes \
        is None
